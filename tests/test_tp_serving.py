"""`swarmllm serve --tp 2`: a server whose blocks run tensor-parallel over 2 gloo processes, as real processes on
127.0.0.1. It generates the same greedy tokens as a TP=1 server of the same checkpoint, hands a ladder pair (r, p)
to the next server where its span ends inside a ladder region, and refuses what it cannot do yet."""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.forking import forked
from swarmllm.models.causal_lm import load_causal_lm
from swarmllm.models.convert import convert_to_ladder
from swarmllm.wire import RemoteError
from swarmllm.wire.messages import ForwardRequest

PROMPT = torch.tensor([[1, 30, 40, 50, 7, 9]])
NEW_TOKENS = 8


def client(path, local, prefix, **options):
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=local.initial_peers, dht_prefix=prefix, **options
    )


def test_a_tp2_server_generates_the_tokens_of_a_tp1_server(local, llama_checkpoint):
    local.add_server(str(llama_checkpoint), (0, 4), extra=["--dht-prefix", "tp1"])
    local.add_server(str(llama_checkpoint), (0, 4), extra=["--dht-prefix", "tp2", "--tp", "2"])
    assert any("tensor-parallel over 2 processes" in line for line in local.servers[-1].log)
    one, two = client(llama_checkpoint, local, "tp1"), client(llama_checkpoint, local, "tp2")
    try:
        want = one.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        got = two.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert got.tolist() == want.tolist()
        reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
        assert (
            want.tolist() == reference.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
        )
        with torch.no_grad():
            torch.testing.assert_close(two(PROMPT).logits, one(PROMPT).logits, atol=1e-4, rtol=0)
        (server,) = run_sync(two.swarm.servers())
        conn = run_sync(two.swarm.connection(server.peer_id))
        hidden = torch.randn(1, 3, two.config.hidden_size)
        request = ForwardRequest(0, 4, hidden, prompts=torch.zeros(4, 1, 2, two.config.hidden_size))
        with pytest.raises(RemoteError, match="deep prompts: not supported by this server.*--tp"):
            run_sync(conn.call("forward", request.to_message()))
    finally:
        one.shutdown()
        two.shutdown()


def test_a_tp2_server_hands_the_ladder_pair_to_the_next_server(local, checkpoints, tmp_path):
    """An all-ladder model cut at 2, inside the ladder region: [0, 2) on a --tp 2 server returns (r, p), and the
    TP=1 server of [2, 4) continues from it; the tokens are the local ladder model's."""
    path = convert_to_ladder(checkpoints("qwen2"), tmp_path / "qwen2-ladder", 0, 4)
    local.add_server(str(path), (0, 2), extra=["--dht-prefix", "tp-ladder", "--tp", "2"])
    local.add_server(str(path), (2, 4), extra=["--dht-prefix", "tp-ladder"])
    remote = client(path, local, "tp-ladder")
    try:
        got = remote.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False)
        assert got.tolist() == load_causal_lm(path).generate_greedy(PROMPT, NEW_TOKENS).tolist()
    finally:
        remote.shutdown()


def test_tp_needs_pinned_blocks():
    proc = forked(
        ["serve", "some-model", "--new-swarm", "--tp", "2"], {**os.environ, "PYTHONUNBUFFERED": "1"}
    )
    code, output = proc.wait(120), proc.stdout.read()  # (a forked process: one pipe for stdout and stderr)
    assert code == 2 and "--tp 2 needs --blocks" in output, output
