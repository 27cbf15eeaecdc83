"""Fine-tuning RPCs over a real direct connection: `backward` against local autograd on the same span, adapter
uploads that belong to one client only, and clear errors for bad requests."""

import pytest
import torch

from swarmllm.models import load_span
from swarmllm.models.lora import LoraSettings, lora_shapes, span_lora
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.wire import DirectServer, Identity, Message, RemoteError, connect_direct
from swarmllm.wire.messages import (
    AdapterRef,
    AdapterUpload,
    BackwardReply,
    BackwardRequest,
    ForwardRequest,
    OpenSession,
    Step,
)

HIDDEN = 64
SETTINGS = LoraSettings(rank=2, alpha=4, modules=("q_proj", "v_proj", "down_proj"))


@pytest.fixture(scope="module")
def span(llama_checkpoint):
    return load_span(str(llama_checkpoint), 0, 4)


def adapter_tensors(span, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = lora_shapes(span.config, SETTINGS, range(4))
    return {name: torch.randn(shape, generator=generator) * 0.2 for name, shape in shapes.items()}


def upload_of(name, version, tensors):
    return AdapterUpload(name, version, 2, 4.0, 0.0, SETTINGS.modules, False, 0, 4, tensors).to_message()


@pytest.fixture
async def served(span):
    backend = Backend(span, cache_tokens=64)
    limits = ServerLimits(max_forward_tokens=256, max_prompt_tokens=32, max_cache_share_per_peer=1.0)
    handler = RequestHandler(backend, lambda: {"start_block": 0, "end_block": 4}, limits)
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    conns = [
        await connect_direct(*server.address, Identity.generate(), expected_peer_id=None) for _ in range(2)
    ]
    yield handler, conns
    for conn in conns:
        await conn.close()
    await server.stop()


async def upload(conn, name, version, tensors):
    stream = await conn.open_stream("adapters", Message())
    await stream.send(upload_of(name, version, tensors))
    reply = await stream.recv()
    assert reply.meta == {"name": name, "version": version}, reply.meta
    return stream


async def test_backward_equals_local_autograd(served, span):
    _, (conn, _) = served
    tensors = adapter_tensors(span, 0)
    stream = await upload(conn, "mine", 1, tensors)
    hidden, grad = torch.randn(2, 5, HIDDEN), torch.randn(2, 5, HIDDEN)
    prompts = torch.randn(2, 1, 3, HIDDEN) * 0.1  # blocks 1 and 2, shared by the batch, first 3 positions
    request = BackwardRequest(1, 3, hidden, grad, None, prompts, AdapterRef("mine", 1), lora_grads=True)
    reply = BackwardReply.parse(await conn.call("backward", request.to_message()))

    x, p = hidden.clone().requires_grad_(), prompts.clone().requires_grad_()
    leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    out = span(x, blocks=slice(1, 3), prompts=p, lora=span_lora(span.config, SETTINGS, leaves, range(1, 3)))
    out.backward(grad)
    torch.testing.assert_close(reply.grad_hidden, x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(reply.grad_prompts, p.grad, rtol=1e-5, atol=1e-6)
    assert sorted(reply.grad_lora) == sorted(k for k in tensors if k.split(".")[0] in ("1", "2"))
    for name, g in reply.grad_lora.items():
        torch.testing.assert_close(g, leaves[name].grad, rtol=1e-5, atol=1e-6)

    # the forward of the same request is what the backward differentiated
    forward = ForwardRequest(1, 3, hidden, None, prompts, AdapterRef("mine", 1))
    got = (await conn.call("forward", forward.to_message())).tensors[0]
    torch.testing.assert_close(got, out.detach(), rtol=1e-5, atol=1e-6)
    await stream.close()


async def test_adapters_belong_to_their_client(served, span):
    _, (alice, bob) = served
    hidden = torch.randn(1, 4, HIDDEN)
    plain = (await alice.call("forward", ForwardRequest(0, 4, hidden).to_message())).tensors[0]
    a_stream = await upload(alice, "a", 1, adapter_tensors(span, 1))
    b_stream = await upload(bob, "a", 7, adapter_tensors(span, 2))  # the same name, another client
    ours = await alice.call("forward", ForwardRequest(0, 4, hidden, adapter=AdapterRef("a", 1)).to_message())
    theirs = await bob.call("forward", ForwardRequest(0, 4, hidden, adapter=AdapterRef("a", 7)).to_message())
    assert not torch.allclose(ours.tensors[0], theirs.tensors[0])
    assert not torch.allclose(ours.tensors[0], plain)
    with pytest.raises(RemoteError, match="version 7 was not uploaded") as info:
        await alice.call("forward", ForwardRequest(0, 4, hidden, adapter=AdapterRef("a", 7)).to_message())
    assert info.value.code == "unknown_adapter"
    # an inference session with the adapter computes what the forward does, decode steps included
    session = await alice.open_stream(
        "inference", OpenSession(0, 4, 1, 8, adapter=AdapterRef("a", 1)).to_message()
    )
    outs = []
    for lo, hi in [(0, 3), (3, 4)]:
        await session.send(Step(lo, hidden[:, lo:hi]).to_message())
        outs.append((await session.recv()).tensors[0])
    torch.testing.assert_close(torch.cat(outs, 1), ours.tensors[0], rtol=1e-5, atol=1e-5)
    await session.close()
    # closing the stream that uploaded it drops the adapter, and only that one
    await a_stream.close()
    with pytest.raises(RemoteError, match="was not uploaded"):
        await alice.call("forward", ForwardRequest(0, 4, hidden, adapter=AdapterRef("a", 1)).to_message())
    again = await bob.call("forward", ForwardRequest(0, 4, hidden, adapter=AdapterRef("a", 7)).to_message())
    torch.testing.assert_close(again.tensors[0], theirs.tensors[0], rtol=0, atol=0)
    await b_stream.close()


def bad_backwards(span):
    h = torch.randn(1, 3, HIDDEN)
    return [
        (BackwardRequest(0, 4, h, torch.randn(1, 2, HIDDEN)).to_message(), "axis 1"),
        (BackwardRequest(0, 4, h, torch.full((1, 3, HIDDEN), float("nan"))).to_message(), "NaN"),
        (Message({"start": 0, "end": 4}, [h]), "2..10 tensors"),
        (BackwardRequest(0, 4, h, h, prompts=torch.randn(3, 1, 2, HIDDEN)).to_message(), "axis 0"),
        (BackwardRequest(0, 4, h, h, prompts=torch.randn(4, 1, 5, HIDDEN)).to_message(), "do not fit"),
        (BackwardRequest(0, 4, h, h, adapter=AdapterRef("nobody", 3)).to_message(), "unknown_adapter"),
        (BackwardRequest(0, 4, h, h, lora_grads=True).to_message(), "lora_grads"),
        (
            BackwardRequest(0, 4, torch.randn(1, 300, HIDDEN), torch.randn(1, 300, HIDDEN)).to_message(),
            "too_large",
        ),
        (Message({"start": 0, "end": 4, "tensors": ["hidden", "bogus"]}, [h, h]), "tensor names"),
    ]


async def test_bad_backward_requests_get_clear_errors(served, span):
    _, (conn, _) = served
    for message, match in bad_backwards(span):
        with pytest.raises(RemoteError, match=match):
            await conn.call("backward", message)
    hidden = torch.randn(1, 3, HIDDEN)
    reply = BackwardReply.parse(
        await conn.call("backward", BackwardRequest(0, 4, hidden, hidden).to_message())
    )
    assert reply.grad_hidden.shape == hidden.shape and torch.isfinite(reply.grad_hidden).all()


async def test_bad_uploads_are_refused_in_band(served, span):
    _, (conn, _) = served
    stream = await conn.open_stream("adapters", Message())
    good = adapter_tensors(span, 3)
    wrong_shape = {**good, "0.self_attn.q_proj.lora_A": torch.randn(3, HIDDEN)}
    not_finite = {**good, "0.self_attn.q_proj.lora_A": torch.full((2, HIDDEN), float("inf"))}
    for message, match in [
        (upload_of("x", 1, wrong_shape), "do not match"),
        (upload_of("x", 1, not_finite), "finite"),
        (AdapterUpload("x", 1, 2, 4.0, 0.0, ("lm_head",), False, 0, 4, good).to_message(), "target modules"),
        (AdapterUpload("x", 1, 2, 4.0, 0.0, SETTINGS.modules, False, 0, 9, good).to_message(), "not in"),
        (Message({**upload_of("x", 1, good).meta, "manifest": [["a", [2]]]}, [torch.zeros(3)]), "manifest"),
    ]:
        await stream.send(message)
        error = (await stream.recv()).meta["error"]
        assert match in error["message"], (match, error)
    await stream.send(upload_of("x", 2, good))  # the stream is still usable
    assert (await stream.recv()).meta == {"name": "x", "version": 2}
    await stream.close()
