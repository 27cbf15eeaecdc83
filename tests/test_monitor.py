"""`swarmllm monitor` against a real local swarm (bootstrap, servers and the monitor as processes on 127.0.0.1):
its JSON and Prometheus text match what the servers announce, the servers' own `/metrics` count what they did,
and the page, in headless Chromium, shows the swarm and follows it (a server joining, one killed, one leaving)
without a reload. Every wait is on a condition with a deadline."""

import json
import os
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.local import LocalSwarm

PREFIX = "monitored"
SERVER_ARGS = ["--dht-prefix", PREFIX, "--metrics-port", "0", "--throughput", "50", "--bandwidth", "1000"]
PROMPT = torch.tensor([[1, 30, 40, 50, 7]])
NEW_TOKENS = 16
CACHE_TOKENS = 16384  # serve's default --max-cache-tokens


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read()


def state(monitor: str) -> dict:
    return json.loads(get(monitor + "api/v1/state"))


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of a Prometheus page: (name, sorted labels) -> value."""
    out = {}
    for family in text_string_to_metric_families(get(url).decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def wait_until(read, predicate, timeout_s: float, what: str):
    """`read()` once `predicate` holds for it; fails after `timeout_s`, saying `what` never happened."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = read()
        if predicate(current):
            return current
        if time.monotonic() > deadline:
            raise AssertionError(f"never {what}: {json.dumps(current, default=str)[:2000]}")
        time.sleep(0.2)  # the poll interval of a condition with a deadline


def wait_state(monitor: str, predicate, timeout_s: float = 60.0) -> dict:
    return wait_until(lambda: state(monitor), predicate, timeout_s, "reached the expected state")


@pytest.fixture(scope="module")
def swarm(llama_checkpoint):
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.infos = local.add_servers(
            [(str(llama_checkpoint), (0, 2)), (str(llama_checkpoint), (2, 4))], extra=SERVER_ARGS
        )
        local.url = local.start_monitor(extra=["--refresh", "1"])
        yield local


def online(model_name: str, count: int):
    def check(current: dict) -> bool:
        models = [m for m in current["models"] if m["name"] == model_name]
        return bool(models) and models[0]["servers"]["online"] == count

    return check


def test_state_and_metrics_match_the_swarm(swarm):
    current = wait_state(swarm.url, online(PREFIX, 2))
    assert current["schema"] == "swarmllm.monitor.state/1" and current["dht"]["status"] == "ok"
    (model,) = [m for m in current["models"] if m["name"] == PREFIX]
    a, b = (info["peer_id"] for info in swarm.infos)
    assert model["num_blocks"] == 4 and model["verdict"] == "healthy" and model["missing_blocks"] == []
    assert [[s["peer_id"] for s in block["servers"]] for block in model["blocks"]] == [[a], [a], [b], [b]]
    assert [block["throughput_tps"] for block in model["blocks"]] == [50.0] * 4
    rows = {row["peer_id"]: row for row in current["servers"]}
    assert set(rows) == {a, b}
    assert (rows[a]["start_block"], rows[a]["end_block"], rows[b]["start_block"], rows[b]["end_block"]) == (
        0,
        2,
        2,
        4,
    )
    for row in rows.values():
        assert row["state"] == "online" and row["connection"] == "direct" and row["rtt_ms"] > 0
        assert row["dtype"] == "float32" and row["cache_tokens_left"] == CACHE_TOKENS
        assert row["busy_rows"] == 0  # no session has stepped yet

    samples = metrics(swarm.url + "metrics")
    assert samples[("swarmllm_model_servers", (("model", PREFIX), ("state", "online")))] == 2
    assert samples[("swarmllm_model_healthy", (("model", PREFIX),))] == 1
    for block in range(4):
        labels = (("block", str(block)), ("model", PREFIX))
        assert samples[("swarmllm_block_servers", labels)] == 1
        assert samples[("swarmllm_block_throughput_steps_per_second", labels)] == 50.0
    for peer in (a, b):
        labels = (("model", PREFIX), ("peer_id", peer), ("public_name", ""))
        assert samples[("swarmllm_server_cache_free_tokens", labels)] == CACHE_TOKENS
        assert samples[("swarmllm_server_busy_rows", labels)] == 0
        assert samples[("swarmllm_server_up", labels)] == 1
    assert samples[("swarmllm_dht_lookup_duration_seconds", ())] > 0


def test_status_prints_the_monitors_view_once_and_fails_where_blocks_are_missing(
    swarm, llama_checkpoint, capsys
):
    """`swarmllm status`: the monitor's look-up once, in the terminal (or its JSON), status 0 for a healthy
    swarm; 1, with one line saying why, for a swarm with no model announced or with blocks missing."""
    from swarmllm.cli import main

    a, b = (info["peer_id"] for info in swarm.infos)
    assert main(["status", "--initial-peers", *swarm.initial_peers]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{PREFIX}: healthy; 4 blocks") and "2 online" in lines[0]
    assert lines[1].startswith(f"  [0, 2)  {a}  online") and lines[2].startswith(f"  [2, 4)  {b}  online")
    assert all("float32  direct  " in line for line in lines[1:3])  # how clients reach them
    assert main(["status", "--initial-peers", *swarm.initial_peers, "--json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["schema"] == "swarmllm.monitor.state/1"
    assert [m["verdict"] for m in document["models"] if m["name"] == PREFIX] == ["healthy"]

    with LocalSwarm() as other:
        peers = other.start_bootstrap()
        assert main(["status", "--initial-peers", *peers]) == 1
        assert (
            "swarmllm status: DHT empty: the DHT answered, but no model is announced"
            in capsys.readouterr().err
        )
        other.add_server(str(llama_checkpoint), (0, 2), extra=SERVER_ARGS)
        assert main(["status", "--initial-peers", *peers]) == 1
        out, err = capsys.readouterr()
        assert out.startswith(f"{PREFIX}: broken (blocks 2..3 missing)")
        assert f"swarmllm status: blocks are missing in {PREFIX}" in err


class AtToken(BaseStreamer):
    def __init__(self, at: int, action):
        self.at, self.action, self.tokens = at, action, -1

    def put(self, value):
        self.tokens += 1  # the first call carries the prompt
        if self.tokens == self.at:
            self.action()

    def end(self):
        pass


def test_page_follows_the_swarm_and_servers_count_their_work(swarm, browser, llama_checkpoint, tmp_path):
    a, b = (info["peer_id"] for info in swarm.infos)
    browser.open(swarm.url)
    rows = "[...document.querySelectorAll('tr[data-peer-id]')].map(r => r.dataset.peerId + ' ' + r.dataset.state)"
    browser.wait_for(f"{rows}.sort().join()", 60, "both servers online")
    shown = browser.evaluate(f"{rows}.sort()")
    assert shown == sorted([f"{a} online", f"{b} online"])
    cells = "[...document.querySelectorAll('.cell[data-block]')].map(c => c.dataset.peerId.slice(-6) + c.dataset.block)"
    assert sorted(browser.evaluate(cells)) == sorted([a[-6:] + "0", a[-6:] + "1", b[-6:] + "2", b[-6:] + "3"])
    assert browser.evaluate("document.querySelector('[data-verdict]').dataset.verdict") == "healthy"

    # a server joins: the open page shows it, without a reload
    spare = swarm.add_server(str(llama_checkpoint), (0, 2), extra=SERVER_ARGS)
    c = spare["peer_id"]
    browser.wait_for(f"{rows}.includes('{c} online')", 60, "the new server")

    # a generation during which the first hop's server is killed: the replacement serves a replay
    reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    expected = reference.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=swarm.initial_peers, dht_prefix=PREFIX
    )
    index = {info["peer_id"]: i for i, info in enumerate([*swarm.infos, spare])}
    killed = []

    def kill_first_hop():
        killed.append(model._active.session.hops[0].peer_id)
        swarm.servers[index[killed[0]]].kill()

    try:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS):
            out = model.generate(
                PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=AtToken(5, kill_first_hop)
            )
    finally:
        model.shutdown()
    assert torch.equal(out, expected)
    (dead,) = killed
    (replacement,) = {a, c} - {dead}
    browser.wait_for(f"{rows}.includes('{dead} unreachable')", 30, "the killed server as unreachable")
    assert browser.evaluate("document.querySelector('[data-verdict]').dataset.verdict") == "healthy"
    shots = Path(os.environ.get("SWARMLLM_SCREENSHOTS", tmp_path))
    browser.screenshot(shots / "monitor.png")

    infos = {info["peer_id"]: info for info in [*swarm.infos, spare]}
    generated = (
        out.shape[1] - PROMPT.shape[1]
    )  # (the random model may end early, with EOS, as transformers does)
    steps_sent = PROMPT.shape[1] + generated - 1  # every token but the last one goes through the blocks
    deadline = time.monotonic() + 30
    while (
        True
    ):  # the servers close the session when the client's stream ends, a moment after generate returns
        last = metrics(infos[b]["metrics"])
        if last[("swarmllm_server_sessions_open", ())] == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert last[("swarmllm_server_sessions_open", ())] == 0
    assert last[("swarmllm_server_sessions_opened_total", ())] == 1
    assert last[("swarmllm_server_cache_used_tokens", ())] == 0
    assert last[("swarmllm_server_cache_capacity_tokens", ())] == CACHE_TOKENS
    tokens = last[("swarmllm_server_tokens_total", (("kind", "decode"),))]
    tokens += last[("swarmllm_server_tokens_total", (("kind", "prefill"),))]
    assert tokens == steps_sent, {k: v for k, v in last.items() if "bucket" not in k[0]}
    assert last[("swarmllm_server_inference_steps_total", (("kind", "prefill"),))] == 1
    decode_steps = last[("swarmllm_server_inference_steps_total", (("kind", "decode"),))]
    assert decode_steps == generated - 1
    assert last[("swarmllm_server_step_duration_seconds_count", (("kind", "decode"),))] == decode_steps
    assert last[("swarmllm_server_replays_total", ())] == 0
    took_over = metrics(infos[replacement]["metrics"])
    assert took_over[("swarmllm_server_replays_total", ())] == 1
    assert took_over[("swarmllm_server_replayed_tokens_total", ())] == PROMPT.shape[1] + 4  # the kept inputs

    # the only server of blocks 2..3 leaves (SIGTERM: it announces offline): the verdict names them
    swarm.servers[index[b]].stop()
    browser.wait_for(
        "document.querySelector('[data-verdict]').textContent.includes('no server for blocks 2..3')",
        30,
        "the broken verdict",
    )
    # (a poll between its SIGTERM and its offline record landing shows it unreachable, which breaks the verdict
    # too; the record says offline a moment later)
    browser.wait_for(f"{rows}.includes('{b} offline')", 30, "the stopped server as offline")
    missing = "[...document.querySelectorAll('[data-missing=true]')].map(c => c.dataset.coverage).join()"
    assert browser.evaluate(missing) == "2,3"

    # a phone-sized window: everything fits its width (the table turns into cards)
    browser.emulate(390, 844, mobile=True)
    browser.wait_for("document.readyState === 'complete'", 10)
    assert browser.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    browser.screenshot(shots / "monitor-phone.png")
