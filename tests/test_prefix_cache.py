"""The servers' prefix cache through real server processes: a conversation's next turn, sent by another client,
copies the positions the first turn computed (its prompt and its reply) on the server that keeps them, computes
them on the server started with `--prefix-cache-tokens 0`, and both clients get transformers' greedy tokens; a
prompt repeated for beams is computed once, and finds what a one-row session kept; over replicas, sessions spread
and a next turn goes back where its first is kept (below)."""

import threading
import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
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
    outs = []
    for prompt_ids, new_tokens in ((prompt, new), (turn, 6)):
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(llama_checkpoint), initial_peers=swarm.initial_peers
        )
        try:
            outs.append(model.generate(prompt_ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens))
        finally:
            model.shutdown()
    assert torch.equal(outs[0], first) and torch.equal(outs[1], second)

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
# A session goes to the replica that its client's running sessions leave idle, and a conversation's next turn goes
# back to the replica that keeps its first turn (the client noted where it sent it: `client.affinity`), copying it
# from that server's prefix cache, though the other replica is nearer. The client's round trips to the two are set
# (the first a little nearer) rather than measured: on loopback they differ by noise, which would decide. The
# first turn is long and the next asks one token, so that its prefill outweighs the noise in the client's measures
# of the two replicas' speeds.


@pytest.fixture(scope="module")
def replicas(llama_checkpoint):
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.infos = local.add_servers([(str(llama_checkpoint), (0, 4), METRICS)] * 2)
        yield local


@pytest.fixture(scope="module")
def reference(llama_checkpoint):
    return AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()


def greedy(reference, prompt, new):
    return reference.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)


def generate_beside(model, prompt, new, max_length):
    """A generate in a session of its own, on another thread (a model holds one session per thread), while the
    caller's session stays open and running; its tokens and its servers."""
    out = {}

    def run():
        with model.inference_session(max_length=max_length) as session:
            out["tokens"] = model.generate(prompt, max_new_tokens=new, min_new_tokens=new)
            out["peers"] = {hop.peer_id for hop in session.session.hops}

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    assert "peers" in out, "the generate beside did not finish"
    return out["tokens"], out["peers"]


def test_sessions_spread_over_replicas_and_a_next_turn_returns_where_its_first_is_kept(
    replicas, llama_checkpoint, reference
):
    generator = torch.Generator().manual_seed(11)
    vocab = reference.config.vocab_size
    other, prompt = (torch.randint(3, vocab, (1, n), generator=generator) for n in (12, 500))
    blocks = 32
    new = (
        blocks * BLOCK_TOKENS + 1 - prompt.shape[1]
    )  # positions [0, 512) go through the blocks: 32 whole blocks
    first = greedy(reference, prompt, new)
    turn = torch.cat([first, torch.randint(3, vocab, (1, 10), generator=generator)], 1)

    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=replicas.initial_peers
    )
    near, far = (info["peer_id"] for info in replicas.infos)
    model.swarm.rtt_s.update({near: 0.001, far: 0.00101})
    try:
        with model.inference_session(max_length=128) as running:
            assert torch.equal(
                model.generate(other, max_new_tokens=4, min_new_tokens=4), greedy(reference, other, 4)
            )
            assert {hop.peer_id for hop in running.session.hops} == {near}  # both idle: the nearer one
            # while it runs, a conversation's first turn goes to the other replica
            tokens, peers = generate_beside(model, prompt, new, 600)
            assert torch.equal(tokens, first) and peers == {far}
        # both idle again, and `far` now farther by half of what its copy saves (the prefill of 512 positions
        # through 4 blocks at its announced rate, weighed against the one step asked): the next turn goes back to
        # where its first is kept, and only that makes `far` worth it
        saved_s = blocks * BLOCK_TOKENS * 4 / model.swarm._servers[far].forward_rps
        model.swarm.rtt_s[far] = model.swarm.rtt_s[near] + saved_s / 2
        with model.inference_session(max_length=turn.shape[1] + 1) as session:
            assert torch.equal(
                model.generate(turn, max_new_tokens=1, min_new_tokens=1), greedy(reference, turn, 1)
            )
            assert {hop.peer_id for hop in session.session.hops} == {far}
            assert session.session.copied == blocks * BLOCK_TOKENS
    finally:
        model.shutdown()

    # and the servers say so: the far one copied the first turn's blocks, the near one nothing
    urls = {info["peer_id"]: info["metrics"] for info in replicas.infos}
    deadline = time.monotonic() + 30
    while (
        any(scrape(u)["swarmllm_server_sessions_open"] for u in urls.values()) and time.monotonic() < deadline
    ):
        time.sleep(0.1)  # the poll interval of a condition with a deadline
    assert scrape(urls[far])["swarmllm_server_prefix_cache_hit_tokens_total"] == blocks * BLOCK_TOKENS
    assert scrape(urls[near])["swarmllm_server_prefix_cache_hit_tokens_total"] == 0
