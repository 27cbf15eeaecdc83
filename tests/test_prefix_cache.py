"""The servers' prefix cache through real server processes: a conversation's next turn, sent by another client,
copies the positions the first turn computed (its prompt and its reply) on the server that keeps them, computes
them on the server started with `--prefix-cache-tokens 0`, and both clients get transformers' greedy tokens; a
prompt repeated for beams is computed once, and finds what a one-row session kept."""

import time
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.local import LocalSwarm
from swarmllm.server.prefix import BLOCK_TOKENS

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
