"""How the client takes each refusal a server can make: a load-shedding refusal (`quota`, `busy`) is routed
around or waited out, never a ban; the server stays usable and the tokens are transformers'."""

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from server_infos import online_server
from transformers import AutoModelForCausalLM

from swarmllm.client.loop import run_sync
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.swarm import SessionRefused, SwarmClient
from swarmllm.models import load_client_head, load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.server.metrics import ServerMetrics
from swarmllm.wire import DirectServer, Identity


@contextmanager
def model_over_limited_server(
    path: str, prefix: str, limits: ServerLimits, metrics: ServerMetrics, **client: float
) -> Iterator[DistributedModelForCausalLM]:
    """The model of `path` over one in-process server of all its blocks, with `limits`."""
    config, head = load_client_head(path)
    blocks = config.num_hidden_layers
    identity = Identity.generate()

    async def start() -> DirectServer:
        backend = Backend(load_span(path, 0, blocks), cache_tokens=4096)
        handler = RequestHandler(backend, dict, limits, metrics=metrics)
        server = DirectServer(handler.handlers(), identity)
        await server.start()
        return server

    server = run_sync(start())
    swarm = SwarmClient([], prefix, blocks, missing_blocks_timeout_s=0, **client)
    swarm.use_servers([online_server(identity.peer_id, 0, blocks, address=server.address)])
    try:
        yield DistributedModelForCausalLM(config, head, swarm).eval()
    finally:
        run_sync(swarm.shutdown())
        run_sync(server.stop())


def refused(metrics: ServerMetrics, reason: str) -> float:
    value = metrics.registry.get_sample_value("swarmllm_server_refusals_total", {"reason": reason})
    return 0.0 if value is None else value


def test_generates_past_the_request_rate_are_refused_not_banned(llama_checkpoint):
    """A tight loop of generates over the only server, past its request rate, gets its session openings
    refused (`quota`): as README says, the error names the reason (SessionRefused) and the server is not banned,
    so a later generate, once the rate allows, opens there again with transformers' tokens."""
    local = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        expected = local.generate(ids, max_new_tokens=4, do_sample=False)
    metrics = ServerMetrics()
    limits = ServerLimits(peer_rate_per_s=20.0, peer_burst=2)
    with model_over_limited_server(llama_checkpoint, "refusal-rate", limits, metrics) as model:
        refusals, after = 0, 0
        for _ in range(400):  # until a generate succeeds after the third refusal (the bucket refills)
            try:
                with torch.no_grad():
                    out = model.generate(ids, max_new_tokens=4, do_sample=False)
            except SessionRefused as e:
                assert e.codes == {"quota"} and "request rate limit" in str(e)
                refusals += 1
                continue
            assert torch.equal(out, expected)
            after += refusals >= 3
            if after:
                break
        assert refusals >= 3 and after
        assert refused(metrics, "quota") >= refusals
        assert model.swarm.bans._strikes == {} and not model.swarm.failovers


def test_forwards_past_the_request_rate_are_not_a_ban(llama_checkpoint):
    """A tight loop of batch forwards (`model(ids)`, plain `forward` calls) past the server's request rate gets
    `quota` refusals: the server is healthy and stays unbanned, each forward's logits are transformers'."""
    local = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        expected = local(ids).logits
    metrics = ServerMetrics()
    limits = ServerLimits(peer_rate_per_s=20.0, peer_burst=2)
    with model_over_limited_server(llama_checkpoint, "refusal-forward-rate", limits, metrics) as model:
        for _ in range(8):
            with torch.no_grad():
                logits = model(ids).logits
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert refused(metrics, "quota") > 0  # the rate limit was reached
        assert model.swarm.bans._strikes == {}


def test_training_steps_past_the_request_rate_are_not_a_ban(llama_checkpoint):
    """Forward and backward calls of differentiable passes (gradients of the input embeddings) past the
    server's request rate get `quota` refusals: no ban, and the gradients are transformers'."""
    local = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    want = local.get_input_embeddings()(ids).detach().requires_grad_()
    local(inputs_embeds=want).logits.sum().backward()
    metrics = ServerMetrics()
    limits = ServerLimits(peer_rate_per_s=20.0, peer_burst=2)
    with model_over_limited_server(llama_checkpoint, "refusal-train-rate", limits, metrics) as model:
        for _ in range(4):
            embeds = model.head.embed(ids).detach().requires_grad_()
            model(inputs_embeds=embeds).logits.sum().backward()
            torch.testing.assert_close(embeds.grad, want.grad, rtol=1e-3, atol=1e-4)
        assert refused(metrics, "quota") > 0  # the rate limit was reached
        assert model.swarm.bans._strikes == {}
