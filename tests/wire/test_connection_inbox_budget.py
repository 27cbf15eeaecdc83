"""A server connection whose read loop waits for room in its inboxes: one budget for the bytes queued in all its
stream inboxes (a peer that opens many streams and reads nothing makes the server hold `max_inbox_bytes` plus one
message, not that per stream), and a peer that resets meanwhile noticed at once. In-process DirectServers over real
loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import struct
from contextlib import suppress

import torch

from swarmllm.wire import (
    DirectServer,
    Frame,
    Handlers,
    Identity,
    Kind,
    Message,
    WireLimits,
    connect_direct,
    encode_frame,
)
from swarmllm.wire.direct import _client_handshake
from swarmllm.wire.tls import client_context

BOUND = 10.0  # seconds; only to fail a test instead of hanging, never to wait for something to happen
KiB, MiB = 1 << 10, 1 << 20
STREAMS = 8


class Gated:
    """A real server whose `gated` streams read nothing until `release`, then answer each message with its size;
    it keeps every stream's inbox, to count what waits in them."""

    def __init__(self, limits: WireLimits) -> None:
        self.release, self.finished = asyncio.Event(), asyncio.Event()
        self.inboxes: list = []
        handlers = Handlers()

        async def gated(opening, incoming, context):
            self.inboxes.append(incoming)
            try:
                await self.release.wait()
                async for message in incoming:
                    yield Message({"n": sum(t.numel() for t in message.tensors)})
            finally:
                self.finished.set()

        handlers.add_stream("gated", gated)
        self.server = DirectServer(handlers, Identity.generate(), limits=limits)

    def queued_bytes(self) -> int:
        return sum(inbox.queued_bytes for inbox in self.inboxes)


async def _until(condition) -> None:
    async with asyncio.timeout(BOUND):
        while not condition():
            await asyncio.sleep(0.01)


async def test_unread_streams_of_one_connection_share_one_inbox_budget():
    gated = Gated(WireLimits(max_inbox_bytes=MiB))
    await gated.server.start()
    client = await connect_direct(*gated.server.address, Identity.generate(), expected_peer_id=None)
    try:
        streams = [await client.open_stream("gated", Message(), timeout=BOUND) for _ in range(STREAMS)]
        await _until(lambda: len(gated.inboxes) == STREAMS)
        message = Message(tensors=[torch.zeros(256 * KiB // 4)])  # 256 KiB
        sent = [0] * STREAMS
        stalled = False
        for _ in range(64):  # until the server stops reading this connection (a send times out)
            for i, stream in enumerate(streams):
                try:
                    await stream.send(message, timeout=0.5)
                except TimeoutError:
                    stalled = True
                    break
                sent[i] += 1
            if stalled:
                break
        assert stalled, f"the server read all {sum(sent)} messages of unread streams"
        # what the server holds for this peer: one budget and one message past it (8x that, per stream, before)
        assert gated.queued_bytes() <= MiB + 256 * KiB, gated.queued_bytes()
        # the handlers read again: every stream gets every message it sent through, none is stuck
        gated.release.set()
        for stream in streams:
            await stream.send(Message(tensors=[torch.zeros(3)]), timeout=BOUND)
            while (await stream.recv(timeout=BOUND)).meta["n"] != 3:
                pass
        assert gated.queued_bytes() == 0
    finally:
        gated.release.set()
        await client.close()
        await gated.server.stop()


async def test_a_peer_that_resets_while_its_connection_is_stalled_frees_the_handler():
    """The peer fills its stream's inbox and the server's socket buffers (the server has stopped reading it: no
    read would see the reset), then resets the connection: the handler is cancelled within about a second, not
    whenever it next reads (its step's end, or its session's idle timeout)."""
    gated = Gated(WireLimits(max_inbox_bytes=MiB))
    await gated.server.start()
    reader, writer = await asyncio.open_connection(
        *gated.server.address, ssl=client_context(), server_hostname=""
    )
    try:
        await _client_handshake(reader, writer, Identity.generate(), None, None)
        writer.write(b"".join(encode_frame(Frame(Kind.REQUEST, 1, Message(), "gated"))))
        await _until(lambda: len(gated.inboxes) == 1)
        chunk = b"".join(encode_frame(Frame(Kind.MESSAGE, 1, Message(tensors=[torch.zeros(256 * KiB // 4)]))))
        with suppress(TimeoutError):
            for _ in range(1024):  # until a drain takes over a second: the server stopped reading
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 1.0)
        assert gated.queued_bytes() >= MiB
        sock = writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset
        writer.transport.abort()
        await asyncio.wait_for(gated.finished.wait(), BOUND)
        assert not gated.release.is_set()
    finally:
        writer.transport.abort()
        gated.release.set()
        await asyncio.wait_for(gated.server.stop(), BOUND)
