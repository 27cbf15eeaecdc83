"""A server of a ladder checkpoint over a real direct connection, with request edges inside the ladder region: the
pair (r, p) in forwards, session steps (prefill and merged decode steps) and backwards equals the local span's, and
a request that brings p where the checkpoint has none, or none where it has one, gets a clear error while the
server goes on serving."""

import asyncio

import pytest
import torch

from swarmllm.models import load_span
from swarmllm.models.convert import convert_to_ladder
from swarmllm.models.tiny import make_tiny_checkpoint
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.wire import DirectServer, Identity, RemoteError, connect_direct
from swarmllm.wire.messages import (
    BackwardReply,
    BackwardRequest,
    ForwardReply,
    ForwardRequest,
    OpenSession,
    Step,
    StepReply,
)

HIDDEN = 64
LADDER = (1, 5)  # of 6 layers: boundaries 2, 3 and 4 carry (r, p)


@pytest.fixture(scope="module")
def span(tmp_path_factory):
    root = tmp_path_factory.mktemp("ladder-handler")
    path = convert_to_ladder(
        make_tiny_checkpoint(root / "source", "llama", num_layers=6), root / "ladder", *LADDER
    )
    return load_span(str(path), 0, 6)


@pytest.fixture
async def served(span):
    backend = Backend(span, cache_tokens=256, batch_wait_s=0.05)
    limits = ServerLimits(max_forward_tokens=256, max_session_length=32, max_cache_share_per_peer=1.0)
    handler = RequestHandler(backend, lambda: {"start_block": 0, "end_block": 6}, limits)
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    conn = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
    yield backend, conn
    await conn.close()
    await server.stop()


def local(span, r, p, blocks):
    with torch.inference_mode():
        return span.forward_pair(r, p, blocks=blocks)


async def forward(conn, start, end, r, p=None):
    reply = ForwardReply.parse(
        await conn.call("forward", ForwardRequest(start, end, r, pending=p).to_message())
    )
    return reply.hidden, reply.pending


async def test_forwards_hand_on_the_pair_across_cuts_inside_the_ladder_region(served, span):
    _, conn = served
    hidden = torch.randn(2, 5, HIDDEN)
    state = hidden, None
    for start, end in ((0, 2), (2, 4), (4, 6)):
        state = await forward(conn, start, end, *state)
        assert (state[1] is not None) == (end in (2, 4))
    torch.testing.assert_close(state[0], local(span, hidden, None, slice(0, 6))[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("start", "end", "pending", "match"),
    [
        (2, 4, None, "boundary 2 lies inside a ladder region.*pending is missing"),
        (0, 2, torch.randn(1, 3, HIDDEN), "boundary 0 carries r alone.*pending must be absent"),
        (5, 6, torch.randn(1, 3, HIDDEN), "boundary 5 carries r alone"),
        (3, 4, torch.randn(1, 2, HIDDEN), "pending.*axis 1"),
        (3, 4, torch.full((1, 3, HIDDEN), float("nan")), "NaN"),
        (3, 4, torch.ones(1, 3, HIDDEN, dtype=torch.int64), "dtype"),
    ],
)
async def test_misplaced_or_malformed_pending_is_refused_and_the_server_goes_on(
    served, span, start, end, pending, match
):
    _, conn = served
    hidden = torch.randn(1, 3, HIDDEN)
    with pytest.raises(RemoteError, match=match) as refused:
        await forward(conn, start, end, hidden, pending)
    assert refused.value.code == "bad_request"
    p = torch.randn(1, 3, HIDDEN) if span.config.carries_pending(start) else None
    got = await forward(conn, start, end, hidden, p)
    want = local(span, hidden, p, slice(start, end))
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)


async def test_session_steps_take_and_return_the_pair_and_merge_their_decode_steps(served, span):
    """Two sessions over blocks [2, 4) (both edges inside the region): a step without p is refused in-band and
    the session goes on; prefill and decode steps equal the local span; concurrent decode steps are merged."""
    backend, conn = served
    generator = torch.Generator().manual_seed(1)
    length = 6
    inputs = [
        (
            torch.randn(1, length, HIDDEN, generator=generator),
            torch.randn(1, length, HIDDEN, generator=generator),
        )
        for _ in range(2)
    ]

    async def run(r, p):
        stream = await conn.open_stream("inference", OpenSession(2, 4, 1, 16).to_message())
        await stream.send(Step(0, r[:, :3]).to_message())
        refusal = await stream.recv()
        assert refusal.meta["error"]["code"] == "bad_request"
        assert "pending is missing" in refusal.meta["error"]["message"]
        outputs = []
        for step, (lo, hi) in enumerate([(0, 3), *((t, t + 1) for t in range(3, length))]):
            await stream.send(Step(lo, r[:, lo:hi], step=step, pending=p[:, lo:hi]).to_message())
            reply = await stream.recv()
            outputs.append(StepReply.states(reply))
            await asyncio.sleep(0)  # the round trip to the client: the other session's step comes meanwhile
        await stream.close()
        return torch.cat([h for h, _ in outputs], 1), torch.cat([q for _, q in outputs], 1)

    merged_before = backend.batcher.merged - backend.batcher.steps
    results = await asyncio.gather(*(run(r, p) for r, p in inputs))
    assert backend.batcher.merged - backend.batcher.steps > merged_before  # some steps ran together
    for (r, p), (got_r, got_p) in zip(inputs, results, strict=True):
        want_r, want_p = local(span, r, p, slice(2, 4))
        torch.testing.assert_close(got_r, want_r, atol=1e-5, rtol=0)
        torch.testing.assert_close(got_p, want_p, atol=1e-5, rtol=0)


async def test_backward_through_cuts_inside_the_ladder_region_equals_local_autograd(served, span):
    _, conn = served
    generator = torch.Generator().manual_seed(2)
    r, p, grad_r, grad_p = (torch.randn(2, 4, HIDDEN, generator=generator) for _ in range(4))
    request = BackwardRequest(2, 4, r, grad_r, pending=p, grad_pending=grad_p)
    reply = BackwardReply.parse(await conn.call("backward", request.to_message()))
    leaves = r.clone().requires_grad_(), p.clone().requires_grad_()
    out_r, out_p = span.forward_pair(*leaves, blocks=slice(2, 4))
    want = torch.autograd.grad([out_r, out_p], leaves, [grad_r, grad_p])
    torch.testing.assert_close(reply.grad_hidden, want[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(reply.grad_pending, want[1], atol=1e-5, rtol=0)
    with pytest.raises(RemoteError, match="grad_pending is missing"):
        await conn.call("backward", BackwardRequest(2, 4, r, grad_r, pending=p).to_message())
    with pytest.raises(RemoteError, match="grad_pending must be absent"):
        await conn.call("backward", BackwardRequest(0, 1, r, grad_r, grad_pending=grad_p).to_message())


def test_a_pair_sessions_decode_steps_merge_and_its_prompts_do_not(span):
    """`Backend.merges`: a prompt merges into the decode pass only where the session's edges carry r alone (a
    merged chunk carries no p) and it runs inline; decode steps merge either way."""
    backend = Backend(span, cache_tokens=256)
    try:
        pair, plain = backend.open_session(2, 4, 1, 16), backend.open_session(0, 1, 1, 16)
        assert pair.pair and not plain.pair
        assert backend.merges(pair, 1, 1) and not backend.merges(pair, 1, 3)
        assert backend.merges(plain, 1, 3) and backend.merges(plain, 4, 8)
        assert not backend.merges(plain, 4, 9)  # 36 rows > inline_tokens (32): the compute thread's
    finally:
        backend.shutdown()
