"""How the client takes each refusal a server can make: a load-shedding refusal (`quota`, `busy`) is routed
around or waited out, never a ban; the server stays usable and the tokens are transformers'."""

import torch
from in_process import model_over_one_server, refusals
from transformers import AutoModelForCausalLM

from swarmllm.server.handler import ServerLimits
from swarmllm.server.metrics import ServerMetrics

RATE = ServerLimits(peer_rate_per_s=20.0, peer_burst=2)  # a tight loop of calls goes past it at once


def over_rate_limited_server(path, prefix: str):
    """(the model over one in-process server of `path` with a low request rate, that server's metrics)."""
    metrics = ServerMetrics()
    return model_over_one_server(path, prefix, limits=RATE, metrics=metrics), metrics


def test_generates_past_the_request_rate_wait_not_banned(llama_checkpoint):
    """A tight loop of generates over the only server, past its request rate, gets its session openings
    refused (`quota`, saying when the rate allows another: `retry_after_s`): as README says, the client waits that
    out and opens there again, so every generate gets transformers' tokens, and the server is not banned."""
    local = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        expected = local.generate(ids, max_new_tokens=4, do_sample=False)
    server, metrics = over_rate_limited_server(llama_checkpoint, "refusal-rate")
    with server as model:
        for _ in range(6):
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=4, do_sample=False)
            assert torch.equal(out, expected)
        assert refusals(metrics, "quota") > 0
        assert model.swarm.bans._strikes == {} and not model.swarm.failovers


def test_forwards_past_the_request_rate_are_not_a_ban(llama_checkpoint):
    """A tight loop of batch forwards (`model(ids)`, plain `forward` calls) past the server's request rate gets
    `quota` refusals: the server is healthy and stays unbanned, each forward's logits are transformers'."""
    local = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        expected = local(ids).logits
    server, metrics = over_rate_limited_server(llama_checkpoint, "refusal-forward-rate")
    with server as model:
        for _ in range(8):
            with torch.no_grad():
                logits = model(ids).logits
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert refusals(metrics, "quota") > 0  # the rate limit was reached
        assert model.swarm.bans._strikes == {}


def test_training_steps_past_the_request_rate_are_not_a_ban(llama_checkpoint):
    """Forward and backward calls of differentiable passes (gradients of the input embeddings) past the
    server's request rate get `quota` refusals: no ban, and the gradients are transformers'."""
    local = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    want = local.get_input_embeddings()(ids).detach().requires_grad_()
    local(inputs_embeds=want).logits.sum().backward()
    server, metrics = over_rate_limited_server(llama_checkpoint, "refusal-train-rate")
    with server as model:
        for _ in range(4):
            embeds = model.head.embed(ids).detach().requires_grad_()
            model(inputs_embeds=embeds).logits.sum().backward()
            torch.testing.assert_close(embeds.grad, want.grad, rtol=1e-3, atol=1e-4)
        assert refusals(metrics, "quota") > 0  # the rate limit was reached
        assert model.swarm.bans._strikes == {}
