"""What the client does to an inference session while one of its steps waits on a server: closing the session
ends the step at once and blames no server; cancelling the step (a caller's timeout) leaves no server session
open behind it. Real servers in this process (a `RequestHandler` behind a `DirectServer` on 127.0.0.1), whose
steps wait at a gate the test opens."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from server_infos import online_server

from swarmllm.client.session import InferenceSession
from swarmllm.client.swarm import SwarmClient
from swarmllm.models import load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler
from swarmllm.wire import DirectServer, Identity

BOUND = 10.0  # seconds; only to fail a test instead of hanging, never to wait for something to happen
BLOCKS = 4
HIDDEN = 64


class GatedHandler(RequestHandler):
    """A real handler whose steps wait for `gate` while `gated`, and tell `reached` when one arrives; a step
    fails (the server breaks) while `broken`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gated = self.broken = False
        self.gate, self.reached = asyncio.Event(), asyncio.Event()

    async def _step(self, *args, **kwargs):
        if self.broken:
            raise ValueError("injected: this server broke")
        if self.gated:
            self.reached.set()
            await self.gate.wait()
        return await super()._step(*args, **kwargs)

    def sessions_open(self) -> float:
        return self.metrics.registry.get_sample_value("swarmllm_server_sessions_open")


class Server:
    def __init__(self, checkpoint: str):
        self.identity, self.checkpoint = Identity.generate(), checkpoint
        self.handler = GatedHandler(Backend(load_span(checkpoint, 0, BLOCKS), cache_tokens=256), dict)
        self.server = DirectServer(self.handler.handlers(), self.identity)

    @property
    def info(self):
        return online_server(self.identity.peer_id, 0, BLOCKS, address=self.server.address)


@pytest.fixture
async def servers(llama_checkpoint):
    servers = [Server(str(llama_checkpoint)) for _ in range(2)]
    for s in servers:
        await s.server.start()
    yield servers
    for s in servers:
        s.handler.gate.set()
        await s.server.stop()


async def step_replaying(first: Server, second: Server, swarm: SwarmClient, prompt: torch.Tensor):
    """A session whose prompt ran on `first`, then a step in flight for which `first` breaks and `second`, its
    replacement, holds the replayed inputs at its gate. Returns the session and the step's task."""
    swarm.use_servers([first.info])
    session = InferenceSession(swarm, max_length=16)
    await session.step(prompt)
    first.handler.broken = True
    second.handler.gated = True
    swarm.use_servers([first.info, second.info])
    step = asyncio.ensure_future(session.step(torch.randn(1, 1, HIDDEN)))
    async with asyncio.timeout(BOUND):
        await second.handler.reached.wait()  # the replacement got the replayed inputs
    return session, step


async def close_ends_it_at_once(session: InferenceSession, step: asyncio.Future) -> None:
    """Close `session` while `step` waits: the step ends within a second, saying why."""
    began = time.monotonic()
    await session.close()
    with pytest.raises(RuntimeError, match="closed during this step"):
        async with asyncio.timeout(BOUND):
            await step
    assert time.monotonic() - began < 1.0


async def test_closing_a_session_ends_its_step_at_once_and_bans_nobody(servers):
    """A session closed (by another task or thread: a `with` block left, Ctrl-C) while its step waits for a
    server ends that step at once, with an error that says so, not at the hop's deadline (30 s here); the
    server did nothing wrong and is neither banned nor replaced."""
    server = servers[0]
    swarm = SwarmClient([], "close-during-step", BLOCKS, missing_blocks_timeout_s=0, step_timeout_s=30.0)
    swarm.use_servers([server.info])
    try:
        session = InferenceSession(swarm, max_length=16)
        await session.step(torch.randn(1, 3, HIDDEN))
        server.handler.gated = True
        step = asyncio.ensure_future(session.step(torch.randn(1, 1, HIDDEN)))
        async with asyncio.timeout(BOUND):
            await server.handler.reached.wait()  # the step waits for the server's reply
        await close_ends_it_at_once(session, step)
        assert swarm.bans.banned(time.monotonic()) == set() and not session.failovers
    finally:
        await swarm.shutdown()


async def test_a_step_cancelled_during_a_failover_leaves_no_server_session_open(servers):
    """A step cancelled by its caller (`asyncio.wait_for` ran out) while a replacement server replays the lost
    hop's inputs: the session, closed then, leaves no session open on the replacement (it holds cache)."""
    first, second = servers
    swarm = SwarmClient([], "cancel-during-failover", BLOCKS, missing_blocks_timeout_s=0)
    try:
        session, step = await step_replaying(first, second, swarm, torch.randn(1, 3, HIDDEN))
        assert second.handler.sessions_open() == 1
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        await session.close()
        second.handler.gate.set()
        await second.handler.sessions_closed(None, BOUND)
        assert second.handler.sessions_open() == 0
    finally:
        await swarm.shutdown()


async def test_the_step_after_a_cancelled_failover_blames_the_failed_server_once(servers):
    """After a step cancelled during a failover, the next step finishes it: the hop is replaced for the server's
    own failure, and the client's closing of that hop's stream (its own doing) is not taken for another one
    (a second ban, doubled)."""
    first, second = servers
    swarm = SwarmClient([], "cancel-then-step", BLOCKS, missing_blocks_timeout_s=0)
    try:
        prompt = torch.randn(1, 3, HIDDEN)
        session, step = await step_replaying(first, second, swarm, prompt)
        step.cancel()
        with pytest.raises(asyncio.CancelledError):
            await step
        second.handler.gated = False
        second.handler.gate.set()
        token = torch.randn(1, 1, HIDDEN)
        got = await session.step(token, position=3)
        span = load_span(str(first.checkpoint), 0, BLOCKS)
        with torch.inference_mode():
            want = span(torch.cat([prompt, token], dim=1))[:, 3:]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert [f.peer_id for f in session.failovers] == [first.identity.peer_id]
        assert "injected: this server broke" in session.failovers[0].reason
        assert swarm.bans.banned(time.monotonic()) == {first.identity.peer_id}
        assert swarm.bans._strikes == {first.identity.peer_id: 1}  # banned once, for its own failure
        await session.close()
    finally:
        await swarm.shutdown()


async def test_closing_a_session_during_a_replay_ends_its_step_at_once_and_bans_the_replacement_not(servers):
    """A session closed while a replacement server replays the lost hop's inputs ends its step at once (not at the
    replay's deadline, 30 s here), with the error that says so; only the server that failed is banned, and the
    replacement keeps no session open."""
    first, second = servers
    swarm = SwarmClient([], "close-during-replay", BLOCKS, missing_blocks_timeout_s=0, replay_timeout_s=30.0)
    try:
        session, step = await step_replaying(first, second, swarm, torch.randn(1, 3, HIDDEN))
        await close_ends_it_at_once(session, step)
        assert swarm.bans.banned(time.monotonic()) == {first.identity.peer_id}
        second.handler.gate.set()
        await second.handler.sessions_closed(None, BOUND)
        assert second.handler.sessions_open() == 0
    finally:
        await swarm.shutdown()
