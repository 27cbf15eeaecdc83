"""One budget for the bytes queued in all the stream inboxes of a server's connection: a peer that opens many
streams and reads nothing makes the server hold `max_inbox_bytes` (plus one message), not that per stream. In-process
DirectServers over real loopback sockets."""

from __future__ import annotations

import asyncio

import torch

from swarmllm.wire import DirectServer, Handlers, Identity, Message, WireLimits, connect_direct

BOUND = 10.0  # seconds; only to fail a test instead of hanging, never to wait for something to happen
KiB, MiB = 1 << 10, 1 << 20
STREAMS = 8


class Gated:
    """A real server whose `gated` streams read nothing until `release`, then answer each message with its size;
    it keeps every stream's inbox, to count what waits in them."""

    def __init__(self, limits: WireLimits) -> None:
        self.release = asyncio.Event()
        self.inboxes: list = []
        handlers = Handlers()

        async def gated(opening, incoming, context):
            self.inboxes.append(incoming)
            await self.release.wait()
            async for message in incoming:
                yield Message({"n": sum(t.numel() for t in message.tensors)})

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
