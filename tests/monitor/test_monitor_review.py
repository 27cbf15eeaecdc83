"""The monitor and the servers' `/metrics` against a real local swarm whose state the test knows (two servers
with known spans, sessions it opens itself), while a server pauses (SIGSTOP) and comes back, and a server
announces a public name with markup in it. Every wait is on a condition with a deadline."""

import asyncio

import pytest
import torch
from test_monitor import metrics, state, wait_until
from transformers import AutoConfig

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.directory import Directory
from swarmllm.local import LocalSwarm
from swarmllm.wire.framing import RemoteError
from swarmllm.wire.messages import ForwardRequest

PREFIX = "reviewed"
EVIL_NAME = '<b id="injected">x</b><img src=x onerror="window.injected=1">'
# prefill chunks of 100 tokens: the first server computes a 256-token prompt (long enough for the client to ask
# for a push before the next session answers) in 3 chunks, and pushes each on to the second server as a part
SERVER_ARGS = [
    "--dht-prefix",
    PREFIX,
    "--metrics-port",
    "0",
    "--throughput",
    "50",
    "--prefill-chunk-tokens",
    "100",
]
PROMPT = torch.randint(3, 100, (1, 256), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def swarm(llama_checkpoint):
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.infos = local.add_servers(
            [
                (str(llama_checkpoint), (0, 2), ["--public-name", EVIL_NAME]),
                (str(llama_checkpoint), (2, 4), ["--max-queued-per-peer", "1"]),
            ],
            extra=SERVER_ARGS,
        )
        local.url = local.start_monitor(extra=["--refresh", "1"])
        yield local


def rows_by_peer(current: dict) -> dict[str, dict]:
    return {row["peer_id"]: row for row in current["servers"] if row["model"] == PREFIX}


def test_a_prompt_pushed_in_parts_counts_as_one_prefill_step(swarm, llama_checkpoint):
    """The second server receives the 256-token prompt as 3 pushed parts (85, 85 and 86 tokens): one prefill
    step of 256 tokens, not 3."""
    first, second = (info["metrics"] for info in swarm.infos)
    before = {url: metrics(url) for url in (first, second)}
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=swarm.initial_peers, dht_prefix=PREFIX
    )
    try:
        with model.inference_session(max_length=PROMPT.shape[1] + 3):
            out = model.generate(PROMPT, max_new_tokens=3, do_sample=False)
            during = metrics(second)
            assert during[("swarmllm_server_sessions_open", ())] == 1
            assert during[("swarmllm_server_cache_used_tokens", ())] > 0
    finally:
        model.shutdown()
    generated = out.shape[1] - PROMPT.shape[1]

    def closed(samples):
        return samples[("swarmllm_server_sessions_open", ())] == 0

    for url in (first, second):
        after = wait_until(lambda url=url: metrics(url), closed, 30, "closed the session")
        assert after[("swarmllm_server_cache_used_tokens", ())] == 0

        def grew(name, kind, after=after, url=url):
            key = (name, (("kind", kind),))
            return after[key] - before[url][key]

        assert grew("swarmllm_server_inference_steps_total", "prefill") == 1, url
        assert grew("swarmllm_server_inference_steps_total", "decode") == generated - 1, url
        assert grew("swarmllm_server_tokens_total", "prefill") == PROMPT.shape[1], url
        assert grew("swarmllm_server_tokens_total", "decode") == generated - 1, url
        assert grew("swarmllm_server_step_duration_seconds_count", "prefill") == 1, url


def test_a_paused_server_is_unreachable_then_online_again(swarm):
    """SIGSTOP: the monitor shows the server unreachable (the verdict broken, `up` 0); SIGCONT: online again."""
    a, b = (info["peer_id"] for info in swarm.infos)
    read = lambda: state(swarm.url)  # noqa: E731
    wait_until(
        read, lambda s: {r["state"] for r in rows_by_peer(s).values()} == {"online"}, 60, "both online"
    )
    swarm.servers[1].pause()
    try:
        paused = wait_until(read, lambda s: rows_by_peer(s)[b]["state"] == "unreachable", 30, "unreachable")
    finally:
        swarm.servers[1].resume()
    (model,) = [m for m in paused["models"] if m["name"] == PREFIX]
    assert model["verdict"] == "broken" and model["missing_blocks"] == [2, 3]
    assert rows_by_peer(paused)[a]["state"] == "online" and rows_by_peer(paused)[b]["rtt_ms"] is None
    back = wait_until(read, lambda s: rows_by_peer(s)[b]["state"] == "online", 30, "online again")
    (model,) = [m for m in back["models"] if m["name"] == PREFIX]
    assert model["verdict"] == "healthy" and model["servers"]["online"] == 2
    samples = metrics(swarm.url + "metrics")
    for peer in (a, b):
        (up,) = [
            v
            for (name, labels), v in samples.items()
            if name == "swarmllm_server_up" and ("peer_id", peer) in labels
        ]
        assert up == 1


def test_a_public_name_with_markup_is_shown_as_text(swarm, browser):
    a = swarm.infos[0]["peer_id"]
    browser.open(swarm.url)
    browser.wait_for(f"document.querySelector('tr[data-peer-id=\"{a}\"]') !== null", 60, "the server's row")
    assert browser.evaluate("document.getElementById('injected') === null && window.injected === undefined")
    assert browser.evaluate("document.querySelectorAll('img').length") == 0
    names = browser.evaluate(
        "[...document.querySelectorAll('td[data-label=name], .map .label')].map(e => e.textContent)"
    )
    assert EVIL_NAME in names
    samples = metrics(swarm.url + "metrics")
    assert any(dict(labels).get("public_name") == EVIL_NAME for _, labels in samples)


def test_forward_calls_refused_are_not_counted_as_served(swarm, llama_checkpoint):
    """The second server lets one forward of a peer wait for compute: of concurrent forwards, those refused
    (`quota`) count as refusals, not as forwards served nor as tokens computed."""
    info = swarm.infos[1]
    hidden = AutoConfig.from_pretrained(llama_checkpoint).hidden_size
    batch, length, calls = 8, 256, 12  # each forward outlasts the requests arriving: some must wait

    async def burst() -> list[str]:
        directory = Directory(swarm.initial_peers)
        await directory.start()
        try:
            conn = await directory.connection(info["peer_id"], [info["direct"]])
            request = ForwardRequest(2, 4, torch.randn(batch, length, hidden)).to_message()

            async def one() -> str:
                try:
                    await conn.call("forward", request, timeout=60)
                    return "served"
                except RemoteError as e:
                    return e.code

            return await asyncio.gather(*(one() for _ in range(calls)))
        finally:
            await directory.shutdown()

    before = metrics(info["metrics"])
    outcomes = asyncio.run(burst())
    after = metrics(info["metrics"])
    served, refused = outcomes.count("served"), outcomes.count("quota")
    assert served + refused == calls and served >= 1 and refused >= 1, outcomes

    def grew(name, labels=()):
        return after[(name, labels)] - before.get((name, labels), 0.0)

    assert grew("swarmllm_server_refusals_total", (("reason", "quota"),)) == refused
    assert grew("swarmllm_server_forward_requests_total") == served
    assert grew("swarmllm_server_tokens_total", (("kind", "forward"),)) == served * batch * length


def test_a_server_that_left_vanishes_from_the_json_the_metrics_and_the_page(swarm, browser, llama_checkpoint):
    """A server announcing every second (its records expire in 3 s) leaves: offline first, then gone from the
    state, the Prometheus text and the open page, while the other two stay."""
    a, b = (info["peer_id"] for info in swarm.infos)
    spare = swarm.add_server(str(llama_checkpoint), (0, 2), extra=[*SERVER_ARGS, "--update-period", "1"])
    c = spare["peer_id"]
    read = lambda: state(swarm.url)  # noqa: E731
    wait_until(read, lambda s: rows_by_peer(s).get(c, {}).get("state") == "online", 60, "the spare online")
    browser.open(swarm.url)
    rows = "[...document.querySelectorAll('tr[data-peer-id]')].map(r => r.dataset.peerId).sort().join()"
    browser.wait_for(f"{rows} === '{','.join(sorted([a, b, c]))}'", 30, "three rows")
    swarm.servers[-1].stop()
    gone = wait_until(read, lambda s: c not in rows_by_peer(s), 30, "forgot the spare")
    assert set(rows_by_peer(gone)) == {a, b}
    (model,) = [m for m in gone["models"] if m["name"] == PREFIX]
    assert sum(model["servers"].values()) == 2 and model["verdict"] == "healthy"
    assert all(c not in [s["peer_id"] for s in block["servers"]] for block in model["blocks"])
    samples = metrics(swarm.url + "metrics")
    assert not [key for key in samples if ("peer_id", c) in key[1]]
    browser.wait_for(f"{rows} === '{','.join(sorted([a, b]))}'", 30, "two rows")
    assert browser.evaluate(f"document.querySelector('[data-peer-id=\"{c}\"]') === null")
