"""The server side of a connection when handlers or peers are slow, stuck or hostile: `DirectServer.stop()` is
bounded, a stream that is not read stalls its peer (not the server), a connection that ends frees its handlers.
In-process DirectServers over real loopback sockets."""

from __future__ import annotations

import asyncio
import socket
import time
from contextlib import suppress

import psutil
import pytest
import torch
import uvloop

from swarmllm.wire import (
    ConnectionLost,
    DirectServer,
    Frame,
    Handlers,
    Identity,
    Kind,
    Message,
    WireError,
    WireLimits,
    connect_direct,
    encode_frame,
    read_frame,
)
from swarmllm.wire.connection import _FrameWriter
from swarmllm.wire.direct import _client_handshake
from swarmllm.wire.tls import client_context, server_context

BOUND = 10.0  # seconds; only to fail a test instead of hanging, never to wait for something to happen
MiB = 1 << 20


class Stuck:
    """A real server whose `stuck` stream handlers wait for `release` before they read anything, then answer each
    message with its size."""

    def __init__(self, limits: WireLimits) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.finished = asyncio.Event()
        self.inboxes: list = []  # every stream's, to count what waits in them
        handlers = Handlers()

        async def stuck(opening, incoming, context):
            self.started.set()
            self.inboxes.append(incoming)
            try:
                await self.release.wait()
                async for message in incoming:
                    yield Message({"n": sum(t.numel() for t in message.tensors)})
            finally:
                self.finished.set()

        handlers.add_stream("stuck", stuck)
        self.server = DirectServer(handlers, Identity.generate(), limits=limits)

    def queued_bytes(self) -> int:
        return sum(inbox.queued_bytes for inbox in self.inboxes)


async def _fill_stream(stream) -> None:
    """Send 1 MiB messages until one times out: the server stopped reading this connection."""
    chunk = Message(tensors=[torch.zeros(MiB // 4)])
    with pytest.raises(TimeoutError):
        for _ in range(1024):
            await stream.send(chunk, timeout=0.5)


async def test_stop_is_bounded_while_a_full_inbox_blocks_the_read_loop():
    """A handler that does not read and a peer that filled its inbox (the read loop waits for room): stop()
    still cancels the handler and returns; the peer's connection is lost."""
    stuck = Stuck(WireLimits(max_inbox_bytes=MiB))
    await stuck.server.start()
    client = await connect_direct(*stuck.server.address, Identity.generate(), expected_peer_id=None)
    try:
        stream = await client.open_stream("stuck", Message(), timeout=BOUND)
        await asyncio.wait_for(stuck.started.wait(), BOUND)
        await _fill_stream(stream)  # backpressure: the peer stalls rather than the server buffering it all
        await asyncio.wait_for(stuck.server.stop(), BOUND)
        assert stuck.finished.is_set()  # the handler was cancelled, not left waiting for `release`
        with pytest.raises(ConnectionLost):
            await stream.recv(timeout=BOUND)
    finally:
        stuck.release.set()
        await client.close()
        await asyncio.wait_for(stuck.server.stop(), BOUND)


async def test_a_peer_that_leaves_while_its_inbox_is_full_frees_the_handler():
    """The peer closes its connection while the server's read loop waits for room in a stuck handler's inbox:
    the handler is cancelled (its session freed) at once, not whenever it next reads."""
    stuck = Stuck(WireLimits(max_inbox_bytes=MiB))
    await stuck.server.start()
    client = await connect_direct(*stuck.server.address, Identity.generate(), expected_peer_id=None)
    try:
        stream = await client.open_stream("stuck", Message(), timeout=BOUND)
        await asyncio.wait_for(stuck.started.wait(), BOUND)
        chunk = Message(tensors=[torch.zeros(MiB // 4)])
        for _ in range(3):  # the first fills the inbox, the second waits for room, the third stays unread
            await stream.send(chunk, timeout=BOUND)
        await client.close()
        await asyncio.wait_for(stuck.finished.wait(), BOUND)
        assert not stuck.release.is_set()
    finally:
        stuck.release.set()
        await client.close()
        await asyncio.wait_for(stuck.server.stop(), BOUND)


async def _open_raw(server: DirectServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection that has proven a fresh identity, as raw streams (to send hand-made frames)."""
    reader, writer = await asyncio.open_connection(*server.address, ssl=client_context(), server_hostname="")
    await _client_handshake(reader, writer, Identity.generate(), None, None)
    return reader, writer


async def _send_until_stalled(writer: asyncio.StreamWriter, frames: bytes, most: int) -> int:
    """Write `frames` again and again until a drain takes over a second or `most` bytes went out; how many did."""
    sent = 0
    with suppress(TimeoutError):
        while sent < most:
            writer.write(frames)
            await asyncio.wait_for(writer.drain(), 1.0)
            sent += len(frames)
    return sent


async def test_a_peer_that_reads_no_answers_is_not_read_either():
    """A peer sends requests that the connection answers by itself (an unknown method: an ERROR frame each) and
    never reads: the server stops reading it once its send buffer is full, rather than buffering every answer
    (64 MiB of requests left 73 MiB of answers in the server's memory); an honest peer is served meanwhile."""
    handlers = Handlers()

    async def echo(request: Message, context) -> Message:
        return request

    handlers.add_unary("echo", echo)
    server = DirectServer(handlers, Identity.generate())
    await server.start()
    reader, writer = await _open_raw(server)
    try:
        request = b"".join(encode_frame(Frame(Kind.REQUEST, 5, Message(), "x" * 255)))
        # (it stalls after ~20 MB here, ~41 MB on a loaded CI machine whose socket buffers grew larger: what the
        # kernel holds of the unread answers; without the back-pressure it never stalls)
        sent = await _send_until_stalled(writer, request * 1000, 128 * MiB)
        assert sent < 64 * MiB
        honest = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
        assert (await honest.call("echo", Message({"ok": 1}), timeout=BOUND)).meta == {"ok": 1}
        await honest.close()
        # what the server sent so far is every answer it owes for what it read: a stall, not a lost frame
        answer = await asyncio.wait_for(read_frame(reader, WireLimits()), BOUND)
        assert answer.kind is Kind.ERROR and answer.message.meta["code"] == "unknown_method"
    finally:
        writer.transport.abort()
        await asyncio.wait_for(server.stop(), BOUND)


async def test_a_connection_accepted_before_stop_is_not_served_after_it():
    """A connection the server accepted but whose TLS handshake was not done when stop() began: it is not served
    once stop() returned (Python 3.11's Server.wait_closed does not wait for it), as the server's backend may be
    gone by then."""
    handlers = Handlers()
    served: list[str | None] = []

    async def echo(request: Message, context) -> Message:
        served.append(context.peer_id)
        return request

    handlers.add_unary("echo", echo)
    server = DirectServer(handlers, Identity.generate())
    await server.start()
    reader, writer = await asyncio.open_connection(*server.address)  # TCP only, no TLS yet
    # accepted in order: once this later connection is served, the first one was accepted too
    other = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
    await asyncio.wait_for(server.stop(), BOUND)
    await other.close()
    late = Identity.generate()
    try:
        await asyncio.wait_for(writer.start_tls(client_context(), server_hostname=""), BOUND)
        await asyncio.wait_for(_client_handshake(reader, writer, late, None, None), BOUND)
        writer.writelines(encode_frame(Frame(Kind.REQUEST, 1, Message({"ok": 1}), "echo")))
        await asyncio.wait_for(read_frame(reader, WireLimits()), BOUND)
    except (OSError, WireError, asyncio.IncompleteReadError):
        pass  # refused: as it should be
    finally:
        writer.transport.abort()
    assert late.peer_id not in served


async def test_connection_churn_returns_fds_tasks_and_slots_to_their_baseline():
    """Connections that come and go every way a peer can leave (clean close; dropped mid-call, mid-stream, with a
    full inbox, before TLS, before the identity handshake): the server's fds, tasks and slots return to where
    they were."""
    stuck = Stuck(WireLimits(max_inbox_bytes=MiB))
    server = stuck.server

    async def echo(request: Message, context) -> Message:
        await asyncio.sleep(0)
        return request

    server.handlers.add_unary("echo", echo)
    await server.start()
    process = psutil.Process()
    client_identity = Identity.generate()

    async def clean() -> None:
        conn = await connect_direct(*server.address, client_identity, expected_peer_id=None)
        assert (await conn.call("echo", Message({"ok": 1}), timeout=BOUND)).meta == {"ok": 1}
        await conn.close()

    async def dropped_mid_call_and_stream() -> None:
        conn = await connect_direct(*server.address, client_identity, expected_peer_id=None)
        stream = await conn.open_stream("stuck", Message(), timeout=BOUND)
        for _ in range(3):  # more than the inbox holds
            await stream.send(Message(tensors=[torch.zeros(MiB // 4)]), timeout=BOUND)
        calling = asyncio.ensure_future(conn.call("echo", Message(), timeout=BOUND))
        await asyncio.sleep(0)  # (lets the call be written; it may or may not be answered)
        conn._writer.transport.abort()
        with suppress(Exception):
            await calling
        await conn.close()

    async def before_tls() -> None:
        _, writer = await asyncio.open_connection(*server.address)
        writer.transport.abort()

    async def before_handshake() -> None:
        _, writer = await asyncio.open_connection(*server.address, ssl=client_context(), server_hostname="")
        writer.transport.abort()

    async def churn(rounds: int) -> None:
        for _ in range(rounds):
            await asyncio.gather(clean(), dropped_mid_call_and_stream(), before_tls(), before_handshake())

    await churn(2)  # warm up: lazily made objects (thread pools, caches) are not leaks
    fds, tasks = process.num_fds(), len(asyncio.all_tasks())
    try:
        await churn(50)
        async with asyncio.timeout(BOUND):
            while server._connections or server.slots.total:  # the last drops are still being noticed
                await asyncio.sleep(0.01)
        assert server.slots.total == 0 and server.slots.per_peer == {}
        assert len(asyncio.all_tasks()) <= tasks
        assert process.num_fds() <= fds
    finally:
        stuck.release.set()
        await asyncio.wait_for(server.stop(), BOUND)


class SlowReader:
    """A TLS peer on 127.0.0.1 that reads nothing until `release` is set, then reads frames into `frames`; small
    socket buffers on both ends, so that the kernel holds little of what is sent. `out`: a `_FrameWriter` to it."""

    def __init__(self) -> None:
        self.release, self.frames, self._peers = asyncio.Event(), [], []

    async def __aenter__(self) -> SlowReader:
        async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self._peers.append(writer)
            await self.release.wait()
            with suppress(ConnectionLost):
                while True:
                    self.frames.append(await read_frame(reader, WireLimits()))

        identity = Identity.generate()
        self._server = await asyncio.start_server(on_connection, "127.0.0.1", 0, ssl=server_context(identity))
        self._server.sockets[0].setsockopt(
            socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10
        )  # (accepted: inherited)
        port = self._server.sockets[0].getsockname()[1]
        _, self.writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(), server_hostname=""
        )
        self.writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        self.out = _FrameWriter(self.writer, WireLimits())
        return self

    async def until_read(self, count: int) -> list[Frame]:
        async with asyncio.timeout(BOUND):
            while len(self.frames) < count:
                await asyncio.sleep(0.01)  # polling interval of a condition with a deadline
        return self.frames

    async def __aexit__(self, *exc_info) -> None:
        self.writer.transport.abort()
        for peer in self._peers:
            peer.transport.abort()
        self._server.close()


def numbered(call_id: int, size: int) -> Frame:
    """Frame `call_id` with `size` bytes of payload, each its offset mod 256: a frame cut short, or spliced with
    another's bytes, does not read back equal."""
    return Frame(
        Kind.MESSAGE, call_id, Message(tensors=[torch.arange(size, dtype=torch.int64).to(torch.uint8)])
    )


def same(got: Frame, sent: Frame) -> bool:
    return got.call_id == sent.call_id and torch.equal(got.message.tensors[0], sent.message.tensors[0])


def run_on(loop: str, scenario) -> None:
    factory = uvloop.new_event_loop if loop == "uvloop" else asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(asyncio.wait_for(scenario(), 3 * BOUND))


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_big_frame_over_tls_to_a_peer_that_reads_nothing_waits_and_times_out(loop):
    """A TLS transport hands one write whole to the TCP transport beneath it, whose buffer it does not count: a
    16 MiB frame sent in one write to a peer that reads nothing returned at once, as if sent. In pieces, each
    once there is room, the send waits for the peer, and its timeout ends it. On both event loops (the servers
    and clients run uvloop)."""

    async def scenario() -> None:
        async with SlowReader() as peer:
            await peer.out.send(numbered(1, 128 << 10), timeout=0.5)  # a small one goes at once
            began = time.monotonic()
            with pytest.raises(TimeoutError):
                await peer.out.send(numbered(2, 16 * MiB), timeout=0.5)
            assert time.monotonic() - began >= 0.5

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_frames_written_while_a_big_one_goes_in_pieces_follow_it_whole(loop):
    """While a big frame waits in pieces for a slow peer, a control frame written and a second big frame sent
    meanwhile do not cut into it: the peer reads the big frame, the control frame, then the second, each intact."""

    async def scenario() -> None:
        async with SlowReader() as peer:
            first, control, second = numbered(1, 8 * MiB), numbered(2, 100), numbered(3, 3 * MiB)
            sending = asyncio.ensure_future(peer.out.send(first, timeout=BOUND))
            async with asyncio.timeout(BOUND):
                while peer.out._held is None:  # until the first frame goes in pieces
                    await asyncio.sleep(0.01)  # polling interval of a condition with a deadline
            peer.out.write(control)
            queued = asyncio.ensure_future(peer.out.send(second, timeout=BOUND))
            assert not sending.done() and not queued.done()
            peer.release.set()
            await asyncio.gather(sending, queued)
            frames = await peer.until_read(3)
            assert [same(got, sent) for got, sent in zip(frames, [first, control, second])] == [True] * 3

    run_on(loop, scenario)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_big_frame_whose_send_timed_out_half_way_is_still_whole_on_the_wire(loop):
    """The send's timeout ends the wait, not a frame begun: the pieces left go out unwaited for, so the frame
    after it reads whole. A big frame whose send timed out before its first piece is not sent at all (a peer that
    reads nothing is not handed frame after frame)."""

    async def scenario() -> None:
        async with SlowReader() as peer:
            cut, dropped, after = numbered(1, 8 * MiB), numbered(2, 4 * MiB), numbered(3, 100)
            with pytest.raises(TimeoutError):
                await peer.out.send(cut, timeout=0.3)
            with pytest.raises(TimeoutError):
                await peer.out.send(dropped, timeout=0.3)
            peer.out.write(after)
            peer.out.write(last := numbered(4, 100))
            peer.release.set()
            frames = await peer.until_read(3)
            sent = [cut, after, last]
            assert [same(got, want) for got, want in zip(frames, sent, strict=True)] == [True] * 3

    run_on(loop, scenario)
