"""Inference sessions whose hops must be rebuilt (after a spot check found a wrong hop, or a server failed), against
real servers in this process (no DHT): a rebuild that fails leaves the session able to give right outputs, and
blames nobody again, once servers are back; a session closed while its step runs opens no new server sessions;
spot checks of a session whose codec is not the client's allow for both codecs' error."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from server_infos import online_server

from swarmllm.client.routing import MissingBlocksError
from swarmllm.client.session import InferenceSession
from swarmllm.client.swarm import SwarmClient
from swarmllm.models import load_span
from swarmllm.server.backend import Backend
from swarmllm.server.corrupt import corrupt_outputs
from swarmllm.server.handler import RequestHandler
from swarmllm.wire import DirectServer, Identity


async def _servers(path: str, spans: list[tuple[int, int]], corrupt: set[int] = frozenset()):
    """In-process servers of these spans (those numbered in `corrupt` lie on every output), started."""
    ids, servers = [], []
    for k, (a, b) in enumerate(spans):
        backend = Backend(load_span(path, a, b), cache_tokens=64)
        if k in corrupt:
            corrupt_outputs(backend, 1)
        ids.append(Identity.generate())
        servers.append(DirectServer(RequestHandler(backend, dict).handlers(), ids[-1]))
        await servers[-1].start()
    return ids, servers


async def test_a_failed_rebuild_after_a_wrong_hop_does_not_keep_the_wrong_hops_outputs(llama_checkpoint):
    """A liar on [0, 2) feeds [2, 4) a wrong prompt (unchecked); the next step is checked, the liar and its only
    checker disagree and both are banned, so rebuilding [0, 4) finds no server for [0, 2) and the step fails.
    Once an honest server of [0, 2) joins, the step is taken again: the later hop's kept inputs came from the
    liar, so the blocks after it must be rebuilt from the first hop's (right) inputs, not from those."""
    path = str(llama_checkpoint)
    spans = [(0, 2), (0, 2), (2, 4), (2, 4), (0, 2)]  # the liar, its checker, two of [2, 4), a late joiner
    ids, servers = await _servers(path, spans, corrupt={0})
    speed = {0: 1e9}  # routes go through the liar
    infos = [
        online_server(i.peer_id, a, b, address=s.address, inference_rps=speed.get(k, 1.0))
        for k, (i, s, (a, b)) in enumerate(zip(ids, servers, spans, strict=True))
    ]
    swarm = SwarmClient([], "failed-rebuild", 4, missing_blocks_timeout_s=0, spot_check_fraction=0)
    swarm.use_servers(infos[:4])
    hidden = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(0))
    try:
        session = InferenceSession(swarm, max_length=16)
        await session.step(hidden[:, :5])  # the liar's wrong output is not checked
        liar, after = session.hops
        assert liar.peer_id == ids[0].peer_id
        swarm.spot_check_fraction = 1.0
        with pytest.raises(MissingBlocksError):
            await session.step(hidden[:, 5:6])
        assert [r.wrong for r in swarm.reports] == [(ids[0].peer_id, ids[1].peer_id)]
        swarm.use_servers(infos)
        out = torch.cat([await session.step(hidden[:, 5:6]), await session.step(hidden[:, 6:7])], dim=1)
        with torch.inference_mode():
            want = load_span(path, 0, 4)(hidden)[:, 5:]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert liar.peer_id not in [h.peer_id for h in session.hops]
        assert after.peer_id not in swarm.bans.banned(0.0)  # the honest hop after the liar was never blamed
        assert liar.peer_id in swarm.bans.banned(time.monotonic() + 60)  # the longest ban, not cut short
        await session.close()
    finally:
        await swarm.shutdown()
        for server in servers:
            await server.stop()


async def test_a_server_back_after_its_replacement_failed_is_taken_back_at_the_next_step(llama_checkpoint):
    """The only server of [2, 4) drops off (its connection breaks): it is banned as unreachable, nobody else
    holds its blocks, and the step fails. When it answers again, the next step takes it back (a ping lifts the
    ban of a server banned for not answering): the client closing the lost hop's stream is no new failure of
    that server, which would make its ban a plain one and the session fail for good."""
    path = str(llama_checkpoint)
    spans = [(0, 2), (2, 4)]
    ids, servers = await _servers(path, spans)
    infos = [
        online_server(i.peer_id, a, b, address=s.address)
        for i, s, (a, b) in zip(ids, servers, spans, strict=True)
    ]
    swarm = SwarmClient([], "server-back", 4, missing_blocks_timeout_s=0, spot_check_fraction=0)
    swarm.use_servers(infos)
    hidden = torch.randn(1, 7, 64, generator=torch.Generator().manual_seed(1))
    try:
        session = InferenceSession(swarm, max_length=16)
        await session.step(hidden[:, :5])
        await servers[1].stop()
        with pytest.raises(MissingBlocksError):
            await session.step(hidden[:, 5:6])
        host, port = servers[1].address
        backend = Backend(load_span(path, 2, 4), cache_tokens=64)
        servers[1] = DirectServer(RequestHandler(backend, dict).handlers(), ids[1], host=host, port=port)
        await servers[1].start()
        out = torch.cat([await session.step(hidden[:, 5:6]), await session.step(hidden[:, 6:7])], dim=1)
        with torch.inference_mode():
            want = load_span(path, 0, 4)(hidden)[:, 5:]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        await session.close()
    finally:
        await swarm.shutdown()
        for server in servers:
            await server.stop()


class _HoldsAStep(RequestHandler):
    """A server that, once armed, holds the next step it gets until released (the client meanwhile waits)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.armed, self.entered, self.release = False, asyncio.Event(), asyncio.Event()

    async def _step(self, backend, session, step, compression, target):
        if self.armed:
            self.armed = False
            self.entered.set()
            await self.release.wait()
        return await super()._step(backend, session, step, compression, target)


async def test_a_session_closed_while_a_step_waits_opens_no_new_server_session(llama_checkpoint):
    """`with model.inference_session(): model.generate(...)` interrupted (Ctrl-C in a notebook) closes the
    session while its step still runs on the client's loop: that step must not take the closed hop for a failed
    server, ban it and open sessions on other servers, which nobody would close (they hold their cache until
    the servers' idle timeout)."""
    path = str(llama_checkpoint)
    spans = [(0, 2), (2, 4), (2, 4)]
    ids = [Identity.generate() for _ in spans]
    held = _HoldsAStep(Backend(load_span(path, 2, 4), cache_tokens=64), dict)
    handlers = [
        RequestHandler(Backend(load_span(path, 0, 2), cache_tokens=64), dict),
        held,
        RequestHandler(Backend(load_span(path, 2, 4), cache_tokens=64), dict),
    ]
    servers = [DirectServer(h.handlers(), i) for h, i in zip(handlers, ids, strict=True)]
    for server in servers:
        await server.start()
    speed = {1: 1e9}  # routes go through the server that holds the step
    infos = [
        online_server(i.peer_id, a, b, address=s.address, inference_rps=speed.get(k, 1.0))
        for k, (i, s, (a, b)) in enumerate(zip(ids, servers, spans, strict=True))
    ]
    swarm = SwarmClient([], "closed-mid-step", 4, step_timeout_s=1, spot_check_fraction=0)
    swarm.use_servers(infos)
    hidden = torch.randn(1, 6, 64, generator=torch.Generator().manual_seed(2))
    try:
        session = InferenceSession(swarm, max_length=16)
        await session.step(hidden[:, :5])
        assert session.hops[1].peer_id == ids[1].peer_id
        held.armed = True
        step = asyncio.ensure_future(session.step(hidden[:, 5:6]))
        await held.entered.wait()
        await session.close()
        held.release.set()
        with pytest.raises(RuntimeError, match="closed"):
            await step
        assert handlers[2].backend.used_tokens == 0  # no session was opened there for the closed one
        assert ids[1].peer_id not in swarm.bans.banned(time.monotonic())
    finally:
        await swarm.shutdown()
        for server in servers:
            await server.stop()


async def test_a_session_of_another_codec_than_the_clients_spot_checks_honest_servers_without_banning(
    llama_checkpoint,
):
    """A session whose hidden states travel as float16 (`inference_session(compression=...)`) on a client whose
    forwards travel as blockwise8: a spot check compares the session's output with a checker's forward, whose
    input and output went through blockwise8, so the tolerance must allow for that codec's error too; otherwise
    both honest servers of [0, 2) are judged wrong (two opinions), banned, and the session fails."""
    path = str(llama_checkpoint)
    spans = [(0, 2), (0, 2), (2, 4)]
    ids, servers = await _servers(path, spans)
    infos = [
        online_server(i.peer_id, a, b, address=s.address)
        for i, s, (a, b) in zip(ids, servers, spans, strict=True)
    ]
    swarm = SwarmClient(
        [], "codecs", 4, missing_blocks_timeout_s=0, spot_check_fraction=1.0, compression="blockwise8"
    )
    swarm.use_servers(infos)
    hidden = torch.randn(1, 8, 64, generator=torch.Generator().manual_seed(3))
    try:
        session = InferenceSession(swarm, max_length=16, compression="float16")
        outs = [await session.step(hidden[:, :5])]
        outs += [await session.step(hidden[:, t : t + 1]) for t in range(5, 8)]
        assert [c.outcome for c in swarm.spot_checks if c.start == 0] == ["agreed"] * 4
        assert not swarm.reports and not swarm.bans.banned(time.monotonic())
        with torch.inference_mode():
            want = load_span(path, 0, 4)(hidden)
        torch.testing.assert_close(torch.cat(outs, dim=1).float(), want, rtol=1e-2, atol=1e-2)
        await session.close()
    finally:
        await swarm.shutdown()
        for server in servers:
            await server.stop()
