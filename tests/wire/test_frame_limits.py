"""What a peer can make a server hold: memory only as bytes arrive, per-method payload caps, frame deadlines,
connection caps and stream inboxes bounded in bytes. In-process DirectServers, real sockets, raw frames."""

import asyncio
import struct

import psutil
import pytest
import torch

from swarmllm.wire import (
    ConnectionLost,
    DirectServer,
    Frame,
    Handlers,
    HandshakeError,
    Identity,
    Kind,
    Message,
    RemoteError,
    StreamClosed,
    WireLimits,
    connect_direct,
    encode_frame,
    read_frame,
)
from swarmllm.wire.connection import Inbox
from swarmllm.wire.direct import _client_handshake
from swarmllm.wire.framing import HEADER_SIZE
from swarmllm.wire.tls import client_context

BOUND = 10  # seconds; only to fail a test instead of hanging
MiB = 1 << 20
_HEADER = struct.Struct("<2sBBBBQIIQ")


def declaration(method: str, payload_len: int, call_id: int = 1) -> bytes:
    """A REQUEST frame's header and head for one uint8 tensor of `payload_len` bytes, without the payload."""
    name = method.encode()
    desc = struct.pack("<BBQ", 9, 1, payload_len)
    header = _HEADER.pack(b"SW", 1, Kind.REQUEST, len(name), 1, call_id, 0, len(desc), payload_len)
    return header + name + desc


async def open_raw(server: DirectServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has proven a fresh identity, as raw streams (to send hand-made frames)."""
    reader, writer = await asyncio.open_connection(*server.address, ssl=client_context(), server_hostname="")
    await _client_handshake(reader, writer, Identity.generate(), None, None)
    return reader, writer


async def closed_by_server(reader: asyncio.StreamReader, limits: WireLimits) -> Frame:
    """Wait for the server's last frame (its reason for closing) and its EOF."""
    frame = await asyncio.wait_for(read_frame(reader, limits), BOUND)
    assert await asyncio.wait_for(reader.read(), BOUND) == b""
    return frame


def uncapped_sink() -> Handlers:
    handlers = Handlers()

    async def sink(request: Message, context) -> Message:
        return Message({"bytes": sum(t.numel() for t in request.tensors)})

    handlers.add_unary("sink", sink)
    return handlers


async def test_stalled_declarations_commit_no_memory_and_are_dropped_at_their_deadline():
    limits = WireLimits(frame_timeout_s=1.0, min_frame_rate=float(1 << 30))  # 1 GiB: 1 s + 1 s
    server = DirectServer(uncapped_sink(), Identity.generate(), limits=limits)
    await server.start()
    process = psutil.Process()
    try:
        peers = [await open_raw(server) for _ in range(2)]
        rss_before = process.memory_info().rss
        loop = asyncio.get_running_loop()
        began = loop.time()
        for _, writer in peers:  # each declares 1 GiB, sends 1 MiB of it, then stalls
            writer.write(declaration("sink", 1 << 30) + bytes(MiB))
        closing = [asyncio.ensure_future(closed_by_server(reader, limits)) for reader, _ in peers]
        peak = rss_before
        while not all(task.done() for task in closing):
            peak = max(peak, process.memory_info().rss)
            await asyncio.wait(closing, timeout=0.05)
        took = loop.time() - began
        for task in closing:
            frame = task.result()
            assert frame.kind is Kind.ERROR and frame.message.meta["code"] == "frame_timeout"
        assert peak - rss_before < 64 * MiB  # before: 2 GiB, allocated and zeroed on the declarations
        assert 1.9 < took < 2.0 + 1.5
        # honest traffic on a new connection is unaffected, and large frames still arrive whole
        conn = await connect_direct(
            *server.address, Identity.generate(), expected_peer_id=None, limits=limits
        )
        reply = await conn.call("sink", Message(tensors=[torch.ones(3 * MiB + 5, dtype=torch.uint8)]))
        assert reply.meta == {"bytes": 3 * MiB + 5}
        await conn.close()
        for _, writer in peers:
            writer.close()
    finally:
        await server.stop()


async def test_a_partial_header_has_a_deadline_but_an_idle_connection_does_not():
    limits = WireLimits(frame_timeout_s=0.5)
    server = DirectServer(uncapped_sink(), Identity.generate(), limits=limits)
    await server.start()
    try:
        (idle_reader, idle_writer), (reader, writer) = await open_raw(server), await open_raw(server)
        began = asyncio.get_running_loop().time()
        writer.write(declaration("sink", 8)[: HEADER_SIZE // 2])
        frame = await closed_by_server(reader, limits)
        assert frame.message.meta["code"] == "frame_timeout"
        assert asyncio.get_running_loop().time() - began < 0.5 + 1.0
        # the idle connection outlived that deadline and still works
        assert not idle_reader.at_eof()
        idle_writer.writelines(encode_frame(Frame(Kind.REQUEST, 7, Message(), "sink")))
        reply = await asyncio.wait_for(read_frame(idle_reader, limits), BOUND)
        assert reply.kind is Kind.REPLY and reply.call_id == 7
        idle_writer.close()
        writer.close()
    finally:
        await server.stop()


async def test_payloads_beyond_the_method_cap_fail_only_their_call():
    handlers = Handlers()

    async def small(request: Message, context) -> Message:
        return Message({"n": sum(t.numel() for t in request.tensors)})

    async def stream(opening: Message, incoming, context):
        async for message in incoming:
            yield Message({"n": sum(t.numel() for t in message.tensors)})

    handlers.add_unary("small", small, max_payload_bytes=1024)
    handlers.add_unary("nothing", small, max_payload_bytes=0)
    handlers.add_stream("stream", stream, max_payload_bytes=1024)
    server = DirectServer(handlers, Identity.generate())
    await server.start()
    conn = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
    try:
        with pytest.raises(RemoteError, match="too_large.*2048 bytes exceeds the 1024"):
            await conn.call("small", Message(tensors=[torch.zeros(2048, dtype=torch.uint8)]))
        with pytest.raises(RemoteError, match="too_large"):
            await conn.call("nothing", Message(tensors=[torch.zeros(1, dtype=torch.uint8)]))
        with pytest.raises(RemoteError, match="unknown_method"):
            await conn.call("nope", Message(tensors=[torch.zeros(8, dtype=torch.uint8)]))
        assert (await conn.call("small", Message(tensors=[torch.zeros(1024, dtype=torch.uint8)]))).meta == {
            "n": 1024
        }
        async with await conn.open_stream("stream", Message()) as s:
            await s.send(Message(tensors=[torch.zeros(1000, dtype=torch.uint8)]))
            assert (await s.recv(timeout=BOUND)).meta == {"n": 1000}
            await s.send(Message(tensors=[torch.zeros(1025, dtype=torch.uint8)]))
            with pytest.raises(RemoteError, match="too_large"):
                await s.recv(timeout=BOUND)
        assert (await conn.call("nothing", Message())).meta == {"n": 0}  # the connection is still usable
    finally:
        await conn.close()
        await server.stop()


async def wait_until(predicate, timeout_s: float = BOUND) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_connections_are_capped_per_peer_and_in_total():
    limits = WireLimits(max_connections=3, max_connections_per_peer=2)
    server = DirectServer(uncapped_sink(), Identity.generate(), limits=limits)
    await server.start()
    alice, bob, carol = Identity.generate(), Identity.generate(), Identity.generate()

    async def connect(identity: Identity):
        return await connect_direct(*server.address, identity, expected_peer_id=None)

    try:
        a1, a2 = await connect(alice), await connect(alice)
        a3 = await connect(alice)  # proven, then refused: alice already holds 2
        with pytest.raises(ConnectionLost, match="too_many_connections.*2 connections from"):
            await asyncio.wait_for(a3.call("sink", Message()), BOUND)
        await wait_until(lambda: server.slots.total == 2)
        b1 = await connect(bob)
        with pytest.raises(HandshakeError, match="too_many_connections.*3 connections"):
            await connect(carol)  # refused on arrival: the server holds 3
        for conn in (a1, a2, b1):
            assert (await conn.call("sink", Message())).meta == {"bytes": 0}
        await a1.close()
        await wait_until(lambda: server.slots.total == 2)
        c1 = await connect(carol)
        assert (await c1.call("sink", Message())).meta == {"bytes": 0}
        for conn in (a2, a3, b1, c1):
            await conn.close()
        await wait_until(lambda: server.slots.total == 0 and not server.slots.per_peer)
    finally:
        await server.stop()


def test_inbox_is_bounded_in_bytes_but_admits_one_large_message():
    inbox = Inbox(maxsize=64, max_bytes=1000)
    big = Message(tensors=[torch.zeros(5000, dtype=torch.uint8)])
    small = Message(tensors=[torch.zeros(400, dtype=torch.uint8)])
    inbox.put_nowait(big)  # alone, any (capped) message fits
    with pytest.raises(asyncio.QueueFull):
        inbox.put_nowait(small)
    assert inbox.get_nowait() is big and inbox.queued_bytes == 0
    inbox.put_nowait(small)
    inbox.put_nowait(small)
    inbox.put_nowait(small)  # 800 queued: still below the bound
    with pytest.raises(asyncio.QueueFull):
        inbox.put_nowait(None)  # even an END waits while the bytes are over the bound
    assert inbox.queued_bytes == 1200


async def test_a_stream_that_is_not_read_stops_the_connection_at_its_byte_bound():
    """10 MiB sent into a stream whose handler reads nothing: its inbox holds 1 MiB (4 messages), the read loop
    stops, the stream reader's buffer fills and pauses the connection's transport, and the rest waits in the
    kernel's buffers and then in the sender, whose sends block. How much the kernel takes depends on the host's
    TCP settings (all 10 MiB on one, the sends hung on another), so the sends run in a task of their own and the
    bound is checked once the transport has paused (without the bound, it never does)."""
    release = asyncio.Event()
    seen: list = []
    handlers = Handlers()

    async def slow(opening: Message, incoming, context):
        seen.append(incoming)
        await release.wait()
        async for message in incoming:
            yield Message({"n": message.tensors[0].numel()})

    handlers.add_stream("slow", slow)
    limits = WireLimits(max_inbox_bytes=MiB)
    server = DirectServer(handlers, Identity.generate(), limits=limits)
    await server.start()
    conn = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
    try:
        stream = await conn.open_stream("slow", Message())
        chunk, sent = 256 * 1024, []

        async def send_all() -> None:
            for i in range(40):  # 10 MiB, far beyond the bound
                await stream.send(Message(tensors=[torch.full((chunk + i,), i, dtype=torch.uint8)]))
                sent.append(i)

        sending = asyncio.create_task(send_all())
        (writer,) = server._connections.values()
        await wait_until(lambda: not writer.transport.is_reading())
        inbox = seen[0]
        assert inbox.qsize() == 4 and inbox.queued_bytes < MiB + chunk + 40  # not 40 messages, not 10 MiB
        assert len(sent) >= 12  # (3 MiB: the inbox's and the stream reader's 2 MiB, before the pause)
        release.set()
        for i in range(40):
            assert (await stream.recv(timeout=BOUND)).meta == {"n": chunk + i}
        await asyncio.wait_for(sending, BOUND)
        await stream.close()
        with pytest.raises(StreamClosed):
            await stream.recv()
    finally:
        await conn.close()
        await server.stop()
