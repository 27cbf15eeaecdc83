"""A server that answers with garbage gets a clear error at the client, never a crash deep inside the model: it
is banned, and with no other server for its blocks the user learns which blocks and why."""

import asyncio

import pytest
import torch
from server_infos import online_server

from swarmllm.client.replies import BadReplyError, SessionError
from swarmllm.client.routing import MissingBlocksError
from swarmllm.client.session import InferenceSession
from swarmllm.client.swarm import SwarmClient
from swarmllm.wire import DirectServer, Handlers, Identity, Message

HIDDEN = 8


def garbage_server(reply_tensor: torch.Tensor) -> Handlers:
    handlers = Handlers()

    async def info(request, context):
        return Message()

    async def forward(request, context):
        return Message({}, [reply_tensor])

    async def inference(request, incoming, context):
        async for step in incoming:
            yield Message({"position": step.meta["position"], "step": step.meta.get("step")}, [reply_tensor])

    handlers.add_unary("info", info)
    handlers.add_unary("forward", forward)
    handlers.add_stream("inference", inference)
    return handlers


@pytest.mark.parametrize(
    ("reply", "problem"),
    [
        (torch.randn(1, 2, HIDDEN + 1), "expected"),
        (torch.ones(1, 2, HIDDEN, dtype=torch.int64), "expected"),
        (torch.full((1, 2, HIDDEN), float("nan")), "NaN"),
    ],
)
async def test_garbage_replies_raise_bad_reply_errors(reply, problem):
    identity = Identity.generate()
    server = DirectServer(garbage_server(reply), identity)
    await server.start()
    swarm = SwarmClient([], "garbage", 2, missing_blocks_timeout_s=0)
    host, port = server.address
    swarm.use_servers([online_server(identity.peer_id, 0, 2, address=(host, port), version="evil")])
    try:
        hidden = torch.randn(1, 2, HIDDEN)
        with pytest.raises(MissingBlocksError, match="0..1 of 2 that works") as info:
            await swarm.forward(hidden)
        assert isinstance(info.value.__cause__, BadReplyError)
        assert info.value.__cause__.peer_id == identity.peer_id
        assert problem in str(info.value.__cause__)
        swarm.bans.lift(identity.peer_id)
        session = InferenceSession(swarm, max_length=8)
        with pytest.raises(MissingBlocksError) as info:
            await session.step(hidden)
        assert isinstance(info.value.__cause__, BadReplyError) and problem in str(info.value.__cause__)
        await session.close()
    finally:
        await swarm.shutdown()
        await server.stop()


def step_server(reply) -> Handlers:
    """A server whose inference session answers every step with `reply(step message)`."""
    handlers = Handlers()

    async def info(request, context):
        return Message()

    async def inference(request, incoming, context):
        async for step in incoming:
            yield reply(step)

    handlers.add_unary("info", info)
    handlers.add_stream("inference", inference)
    return handlers


def _ok(step, **meta):
    return {"position": step.meta["position"], "step": step.meta.get("step"), **meta}


@pytest.mark.parametrize(
    ("reply", "error", "problem"),
    [
        (lambda s: Message({"error": "boom"}), BadReplyError, "a malformed error: 'boom'"),
        (lambda s: Message({"error": {"code": ["x"]}}), BadReplyError, "a malformed error"),
        (
            lambda s: Message({"error": {"code": "busy", "message": "no"}}),
            SessionError,
            "refused the step (busy)",
        ),
        (lambda s: Message({"step": "1", "position": 0}, [torch.randn(1, 2, HIDDEN)]), BadReplyError, "'1'"),
        (lambda s: Message({"step": 7, "position": 0}, [torch.randn(1, 2, HIDDEN)]), BadReplyError, "step 7"),
        (lambda s: Message(_ok(s, position=5), [torch.randn(1, 2, HIDDEN)]), BadReplyError, "position 5"),
        (
            lambda s: Message(_ok(s, compute_s=float("nan")), [torch.randn(1, 2, HIDDEN)]),
            BadReplyError,
            "nan",
        ),
        (lambda s: Message(_ok(s, compute_s="1"), [torch.randn(1, 2, HIDDEN)]), BadReplyError, "compute_s"),
        (lambda s: Message(_ok(s, copied=3), [torch.randn(1, 2, HIDDEN)]), BadReplyError, "copied 3"),
        (lambda s: Message(_ok(s, copied=True), [torch.randn(1, 2, HIDDEN)]), BadReplyError, "copied True"),
        (
            lambda s: Message(_ok(s), [torch.randn(1, 2, HIDDEN, dtype=torch.float64)]),
            BadReplyError,
            "float64",
        ),
        (lambda s: Message(_ok(s)), BadReplyError, "needs hidden states"),
    ],
)
async def test_garbage_in_a_session_is_a_typed_error_naming_the_server(reply, error, problem):
    identity = Identity.generate()
    server = DirectServer(step_server(reply), identity)
    await server.start()
    swarm = SwarmClient([], "garbage", 2, missing_blocks_timeout_s=0, step_timeout_s=30)
    host, port = server.address
    swarm.use_servers([online_server(identity.peer_id, 0, 2, address=(host, port), version="evil")])
    session = InferenceSession(swarm, max_length=8)
    try:
        async with asyncio.timeout(10):  # an error at once, not a wait for the step's deadline
            with pytest.raises(MissingBlocksError) as info:
                await session.step(torch.randn(1, 2, HIDDEN))
        cause = info.value.__cause__
        assert isinstance(cause, error) and cause.peer_id == identity.peer_id
        assert identity.peer_id in str(cause) and problem in str(cause)
    finally:
        await session.close()
        await swarm.shutdown()
        await server.stop()
