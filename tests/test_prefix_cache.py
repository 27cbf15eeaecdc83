"""The servers' prefix cache through real server processes: a conversation's next turn, sent by another client,
copies the positions the first turn computed (its prompt and its reply) on the server that keeps them, computes
them on the server started with `--prefix-cache-tokens 0`, and both clients get transformers' greedy tokens; a
prompt repeated for beams is computed once, and finds what a one-row session kept; over replicas, a next turn goes
back where its first is kept, and sessions go where other clients' leave room (below)."""

import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.health import Speeds
from swarmllm.client.loop import run_sync
from swarmllm.local import LocalSwarm
from swarmllm.wire.prefix import BLOCK_TOKENS

METRICS = ["--metrics-port", "0"]


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


@pytest.fixture(scope="module")
def swarm(llama_checkpoint):
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.infos = local.add_servers(
            [
                (str(llama_checkpoint), (0, 2), METRICS),
                (str(llama_checkpoint), (2, 4), [*METRICS, "--prefix-cache-tokens", "0"]),
            ]
        )
        yield local


def test_a_next_turn_copies_the_first_turns_positions(swarm, llama_checkpoint):
    reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(5)
    prompt = torch.randint(3, reference.config.vocab_size, (1, 40), generator=generator)
    new = 3 * BLOCK_TOKENS + 1 - prompt.shape[1]  # positions [0, 48) go through the blocks: 3 whole blocks
    first = reference.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    more = torch.randint(3, reference.config.vocab_size, (1, 10), generator=generator)
    turn = torch.cat([first, more], 1)
    second = reference.generate(turn, max_new_tokens=6, min_new_tokens=6, do_sample=False)

    kept, plain = (info["metrics"] for info in swarm.infos)
    outs, memories = [], 0
    for prompt_ids, new_tokens in ((prompt, new), (turn, 6)):
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(llama_checkpoint), initial_peers=swarm.initial_peers
        )
        try:
            outs.append(model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens))
            memories += len(model.swarm.affinity)
        finally:
            model.shutdown()
    assert torch.equal(outs[0], first) and torch.equal(outs[1], second)
    assert not memories  # a single chain: nothing hashed or noted of where beginnings went

    # the sessions' last steps are in once the servers saw their streams end (a moment after generate returns)
    deadline = time.monotonic() + 30
    while scrape(kept)["swarmllm_server_sessions_open"] and time.monotonic() < deadline:
        time.sleep(0.1)  # the poll interval of a condition with a deadline
    counts = scrape(kept)
    assert counts["swarmllm_server_prefix_cache_hit_tokens_total"] == 3 * BLOCK_TOKENS
    # kept: the first turn's 3 blocks, and the second's 4th ([48, 64) of its 64 positions)
    assert counts["swarmllm_server_prefix_cache_tokens"] == 4 * BLOCK_TOKENS
    assert counts["swarmllm_server_cache_used_tokens"] == 0  # what it keeps is free for sessions
    counts = scrape(plain)
    assert counts["swarmllm_server_prefix_cache_hit_tokens_total"] == 0
    assert counts["swarmllm_server_prefix_cache_tokens"] == 0


def test_beams_of_a_prompt_copy_it_once_and_equal_transformers(swarm, llama_checkpoint):
    """A generate with beams repeats its prompt in every row: the server computes it as one row, so it finds what a
    one-row session kept of it (and the beams still equal transformers')."""
    reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(6)
    prompt = torch.randint(3, reference.config.vocab_size, (1, 40), generator=generator)
    kept = swarm.infos[0]["metrics"]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=swarm.initial_peers
    )
    try:
        model.generate(prompt, max_new_tokens=2)  # keeps [0, 32) of the prompt
        before = scrape(kept)["swarmllm_server_prefix_cache_hit_tokens_total"]
        out = model.generate(prompt, max_new_tokens=6, min_new_tokens=6, num_beams=3, num_return_sequences=2)
    finally:
        model.shutdown()
    want = reference.generate(prompt, max_new_tokens=6, min_new_tokens=6, num_beams=3, num_return_sequences=2)
    assert torch.equal(out, want)
    assert scrape(kept)["swarmllm_server_prefix_cache_hit_tokens_total"] - before == 2 * BLOCK_TOKENS


# ---- replicas: servers holding the same blocks ----
#
# A conversation's next turn goes back to the replica that keeps its first turn (its client noted where it sent
# it: `client.affinity`) though the other replica is now nearer, copying the first turn from that server's prefix
# cache; and a new client's session goes to the replica that another client's running session leaves idle (the
# servers announce their busy rows as they change). Round trips are set rather than measured: on loopback they
# differ by noise, which would decide.


@pytest.fixture(scope="module")
def replicas(llama_checkpoint):
    with LocalSwarm() as local:
        local.start_bootstrap()
        # (a period longer than the module's tests: a change of busy rows is announced when it happens)
        flags = [*METRICS, "--update-period", "120"]
        local.infos = local.add_servers([(str(llama_checkpoint), (0, 4), flags)] * 2)
        yield local


def client(replicas, llama_checkpoint, rtt: dict[str, float]):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=replicas.initial_peers
    )
    model.swarm.rtt_s.update(rtt)
    return model


def greedy(reference, prompt, new):
    return reference.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)


def test_a_next_turn_goes_back_to_the_replica_that_keeps_its_first(replicas, llama_checkpoint):
    """The replica that keeps the first turn is made farther by half what the copy saves (the prefill of 512
    positions through 4 blocks at its announced rate), so only the memory makes it worth it. What the client
    measured of the keeper's decode steps in the first turn is dropped: on a loaded machine it fell below the
    other's announced rate by more than that half (~4 ms a step on the tiny model), and decided."""
    reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(11)
    vocab = reference.config.vocab_size
    prompt = torch.randint(3, vocab, (1, 500), generator=generator)
    blocks = 32
    new = (
        blocks * BLOCK_TOKENS + 1 - prompt.shape[1]
    )  # positions [0, 512) go through the blocks: 32 whole blocks
    first = greedy(reference, prompt, new)
    turn = torch.cat([first, torch.randint(3, vocab, (1, 10), generator=generator)], 1)
    keeper, other = (info["peer_id"] for info in replicas.infos)
    urls = {info["peer_id"]: info["metrics"] for info in replicas.infos}
    hits = {peer: scrape(url)["swarmllm_server_prefix_cache_hit_tokens_total"] for peer, url in urls.items()}

    model = client(replicas, llama_checkpoint, {keeper: 0.001, other: 0.00101})
    try:
        with model.inference_session(max_length=600) as session:
            assert torch.equal(model.generate(prompt, max_new_tokens=new, min_new_tokens=new), first)
            assert {hop.peer_id for hop in session.session.hops} == {keeper}  # the nearer, then
        saved_s = blocks * BLOCK_TOKENS * 4 / model.swarm._servers[keeper].forward_rps
        model.swarm.rtt_s[keeper] = model.swarm.rtt_s[other] + saved_s / 2
        model.swarm.speeds = Speeds()
        with model.inference_session(max_length=turn.shape[1] + 1) as session:
            assert torch.equal(
                model.generate(turn, max_new_tokens=1, min_new_tokens=1), greedy(reference, turn, 1)
            )
            assert {hop.peer_id for hop in session.session.hops} == {keeper}
            assert session.session.copied == blocks * BLOCK_TOKENS
    finally:
        model.shutdown()
    # and the servers say so: the keeper copied the first turn's blocks, the other nothing
    deadline = time.monotonic() + 30
    while (
        any(scrape(u)["swarmllm_server_sessions_open"] for u in urls.values()) and time.monotonic() < deadline
    ):
        time.sleep(0.1)  # the poll interval of a condition with a deadline
    gained = {
        peer: scrape(url)["swarmllm_server_prefix_cache_hit_tokens_total"] - hits[peer]
        for peer, url in urls.items()
    }
    assert gained == {keeper: blocks * BLOCK_TOKENS, other: 0}


def test_a_session_goes_to_the_replica_that_other_clients_leave_idle(replicas, llama_checkpoint):
    reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    prompt = torch.randint(
        3, reference.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(12)
    )
    expected = greedy(reference, prompt, 4)
    near, far = (info["peer_id"] for info in replicas.infos)
    rtt = {near: 0.001, far: 0.00101}
    busy, fresh = client(replicas, llama_checkpoint, rtt), client(replicas, llama_checkpoint, rtt)
    try:
        with busy.inference_session(max_length=64) as running:
            assert torch.equal(busy.generate(prompt, max_new_tokens=4, min_new_tokens=4), expected)
            assert {hop.peer_id for hop in running.session.hops} == {near}
            deadline = time.monotonic() + 15  # until the near one has announced the session's row (at once)
            while time.monotonic() < deadline:
                loads = {s.peer_id: s.busy_rows for s in run_sync(fresh.swarm.servers(refresh=True))}
                if loads.get(near):
                    break
                time.sleep(0.2)  # the poll interval of a condition with a deadline
            assert loads == {near: 1, far: 0}
            # the other client's session goes to the idle replica, though the busy one is nearer
            with fresh.inference_session(max_length=64) as session:
                assert torch.equal(fresh.generate(prompt, max_new_tokens=4, min_new_tokens=4), expected)
                assert {hop.peer_id for hop in session.session.hops} == {far}
            # while to the client whose session it is, the near one is as idle as the other (its own sessions share
            # its steps: they are not spread)
            assert busy.swarm.load(run_sync(busy.swarm.servers(refresh=True))) == {near: 0.0, far: 0.0}
    finally:
        busy.shutdown()
        fresh.shutdown()
