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
from test_server_stop_and_backpressure import BOUND, MiB, Stuck, _open_raw

from swarmllm.wire import (
    Frame,
    Identity,
    Kind,
    Message,
    WireLimits,
    connect_direct,
    encode_frame,
)

KiB = 1 << 10
STREAMS = 8


async def _until(condition) -> None:
    async with asyncio.timeout(BOUND):
        while not condition():
            await asyncio.sleep(0.01)


async def test_unread_streams_of_one_connection_share_one_inbox_budget():
    stuck = Stuck(WireLimits(max_inbox_bytes=MiB))
    await stuck.server.start()
    client = await connect_direct(*stuck.server.address, Identity.generate(), expected_peer_id=None)
    try:
        streams = [await client.open_stream("stuck", Message(), timeout=BOUND) for _ in range(STREAMS)]
        await _until(lambda: len(stuck.inboxes) == STREAMS)
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
        assert stuck.queued_bytes() <= MiB + 256 * KiB, stuck.queued_bytes()
        # the handlers read again: every stream gets every message it sent through, none is stuck
        stuck.release.set()
        for stream in streams:
            await stream.send(Message(tensors=[torch.zeros(3)]), timeout=BOUND)
            while (await stream.recv(timeout=BOUND)).meta["n"] != 3:
                pass
        assert stuck.queued_bytes() == 0
    finally:
        stuck.release.set()
        await client.close()
        await stuck.server.stop()


async def test_a_peer_that_resets_while_its_connection_is_stalled_frees_the_handler():
    """The peer fills its stream's inbox and the server's socket buffers (the server has stopped reading it: no
    read would see the reset), then resets the connection: the handler is cancelled within about a second, not
    whenever it next reads (its step's end, or its session's idle timeout)."""
    stuck = Stuck(WireLimits(max_inbox_bytes=MiB))
    await stuck.server.start()
    _, writer = await _open_raw(stuck.server)
    try:
        writer.write(b"".join(encode_frame(Frame(Kind.REQUEST, 1, Message(), "stuck"))))
        await _until(lambda: len(stuck.inboxes) == 1)
        chunk = b"".join(encode_frame(Frame(Kind.MESSAGE, 1, Message(tensors=[torch.zeros(256 * KiB // 4)]))))
        with suppress(TimeoutError):
            for _ in range(1024):  # until a drain takes over a second: the server stopped reading
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 1.0)
        assert stuck.queued_bytes() >= MiB
        sock = writer.transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close sends a reset
        writer.transport.abort()
        await asyncio.wait_for(stuck.finished.wait(), BOUND)
        assert not stuck.release.is_set()
    finally:
        writer.transport.abort()
        stuck.release.set()
        await asyncio.wait_for(stuck.server.stop(), BOUND)
