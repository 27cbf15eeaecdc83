"""Closing a stream (or giving up on a notice) on this side, while another task waits on it: the waiter hears of it
at once, and only once, over real loopback connections."""

from __future__ import annotations

import asyncio
import time

import pytest
import pytest_asyncio
import torch

from swarmllm.wire import (
    Connection,
    DirectServer,
    Handlers,
    Identity,
    Message,
    StreamClosed,
    WireLimits,
    connect_direct,
)

BOUND = 10.0  # seconds; only to fail a test instead of hanging, never to wait for something to happen


class Silent:
    """A real server whose `silent` stream never answers (it reads until the caller's END)."""

    def __init__(self) -> None:
        self.identity = Identity.generate()
        handlers = Handlers()

        async def silent(opening, incoming, context):
            async for _ in incoming:
                pass
            yield Message()

        handlers.add_stream("silent", silent)
        self.server = DirectServer(handlers, self.identity)


@pytest_asyncio.fixture(loop_scope="function")
async def peer():
    peer = Silent()
    await peer.server.start()
    peer.client = await connect_direct(
        *peer.server.address, Identity.generate(), expected_peer_id=peer.identity.peer_id
    )
    yield peer
    await peer.client.close()
    await peer.server.stop()


async def test_closing_a_stream_wakes_the_task_waiting_in_its_recv(peer):
    """A recv waiting on a stream that this side closes (an inference session closed while its step waits) ends
    at once with StreamClosed, not at its timeout; the connection and its other calls go on."""
    stream = await peer.client.open_stream("silent", Message(), timeout=BOUND)
    closer = asyncio.ensure_future(stream.close())  # runs once the recv below waits
    began = time.monotonic()
    with pytest.raises(StreamClosed, match="closed by this side"):
        await stream.recv(timeout=BOUND)
    assert time.monotonic() - began < BOUND / 10
    await closer
    with pytest.raises(StreamClosed, match="closed by this side"):  # and every later recv, likewise
        await stream.recv(timeout=BOUND)
    other = await peer.client.open_stream("silent", Message(), timeout=BOUND)
    await other.close()
    assert not peer.client.is_closed


async def test_closing_a_stream_wakes_a_recv_without_timeout(peer):
    """The same for a recv with no timeout at all, which would otherwise wait for ever."""
    stream = await peer.client.open_stream("silent", Message(), timeout=BOUND)
    closer = asyncio.ensure_future(stream.close())
    with pytest.raises(StreamClosed):
        async with asyncio.timeout(BOUND):  # (no task of its own: the recv waits before the close runs)
            await stream.recv()
    await closer


class DeafPeer:
    """A plain TCP peer that accepts a `Connection` and never reads from it, until it drops the connection."""

    async def __aenter__(self) -> DeafPeer:
        accepted: asyncio.Future = asyncio.get_running_loop().create_future()
        self.server = await asyncio.start_server(lambda r, w: accepted.set_result(w), "127.0.0.1", 0)
        reader, writer = await asyncio.open_connection(*self.server.sockets[0].getsockname()[:2])
        self.writer = await asyncio.wait_for(accepted, BOUND)
        self.connection = Connection(
            reader, writer, transport="direct", remote_peer_id=None, limits=WireLimits()
        )
        return self

    def drop(self) -> None:
        self.writer.transport.abort()

    async def __aexit__(self, *exc_info) -> None:
        self.drop()
        await self.connection.close()
        self.server.close()


async def _fill(connection: Connection) -> None:
    """Send 128 KiB notices until one times out: the kernel's and the transport's buffers are full, so the
    connection's next send waits for a drain. (Frames this small are written whole, then waited for.)"""
    chunk = Message(tensors=[torch.zeros(1 << 15)])
    with pytest.raises(TimeoutError):
        for _ in range(1024):
            await connection.notify("note", chunk, lambda error: None, timeout=0.5)


async def test_a_notice_whose_connection_breaks_while_it_is_sent_is_reported_once():
    """A notice waiting for a full send buffer when its connection breaks: the caller hears of the failure once,
    either raised from `notify` or handed to its `on_error`, never both (a server would tell its client twice
    that one push failed)."""
    async with DeafPeer() as peer:
        connection = peer.connection
        await _fill(connection)
        told: list = []
        sending = asyncio.ensure_future(connection.notify("note", Message(), told.append, timeout=BOUND))
        peer.drop()  # runs once the notice waits for the buffer to drain
        raised = None
        try:
            async with asyncio.timeout(BOUND):
                await sending
        except Exception as e:  # noqa: BLE001 - what notify raised, checked below
            raised = e
        assert not isinstance(raised, TimeoutError)
        assert (raised is not None) + len(told) == 1, (raised, told)


async def test_a_notice_whose_send_timed_out_is_reported_once():
    """A notice whose send timed out raised TimeoutError: its on_error is not called later as well, when the
    connection ends."""
    async with DeafPeer() as peer:
        connection = peer.connection
        await _fill(connection)
        told: list = []
        with pytest.raises(TimeoutError):
            await connection.notify("note", Message({"fail": True}), told.append, timeout=0.1)
        peer.drop()
        await connection.close()
        assert told == []
