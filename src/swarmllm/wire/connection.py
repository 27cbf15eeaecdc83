"""Calls over one byte stream: the caller's ``Connection`` and the callee's ``serve_connection``.

Many concurrent calls share one persistent connection per peer, told apart by call id. A unary call is one REQUEST
answered by one REPLY or ERROR; a notice is a REQUEST answered only if it fails (an ERROR), for the hot path where an
ack would cost a frame each way; a stream is a REQUEST followed by MESSAGEs both ways until either side sends END
(or ERROR). Frames of one call are handled in order, different calls run concurrently. Each frame goes out with a
single ``writelines``, which the event loop never interleaves with another, so no write lock is needed.

What a peer can make either side hold is bounded: a frame that has started must finish within its deadline
(``FrameClock``), a server reads a call's payload only up to what the method may carry (registered with its
handler), stream inboxes are bounded in messages, and all of a connection's together in bytes, and
``ConnectionSlots`` caps a server's connections in total and per peer.

This module does not know how the byte stream was opened or who is at the other end: ``direct`` and ``libp2p``
open it, prove the peer's identity and hand the result here.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import select
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing, suppress
from dataclasses import dataclass
from typing import Any

from swarmllm.wire.framing import (
    ConnectionLost,
    Frame,
    FrameClock,
    FrameError,
    Kind,
    Message,
    PayloadTooLarge,
    RemoteError,
    WireError,
    WireLimits,
    encode_frame,
    read_frame,
)
from swarmllm.wire.peer_log import PeerFaultLog

logger = logging.getLogger(__name__)
peer_faults = PeerFaultLog(logger)

# Stream messages wait in a queue of this size per call (and of WireLimits.max_inbox_bytes, on a server for all the
# calls of a connection together); when it is full, the connection stops reading (backpressure).
STREAM_QUEUE_SIZE = 64
# While a server's read loop waits for room in an inbox, it asks the kernel this often whether the peer reset.
HANGUP_PROBE_S = 1.0
# Writes go to the transport's buffer; past this many buffered bytes a sender waits for the kernel to catch up.
_DRAIN_ABOVE_BYTES = 1 << 20
_WRITE_PIECE_BYTES = 256 << 10  # a bigger frame is sent in pieces of this size (`_FrameWriter`)
_CONNECTION_CALL_ID = 0  # ERROR frames about the connection itself (a frame we could not parse)
_CLOSE_TIMEOUT_S = 5.0  # how long closing waits for buffered bytes to reach a peer that may be hung
_MAX_ERROR_CHARS = 2000  # error texts are cut so that an ERROR frame always fits the metadata limit
# A notice that succeeded is never answered, so a caller remembers only its last this many, to hand an ERROR (or
# the connection's loss) to their `on_error`; an answer comes within a round trip, thousands of notices sooner.
MAX_NOTICES = 4096


class StreamClosed(WireError):
    """The stream is over: the peer sent END, or this side already closed it."""


class RequestError(Exception):
    """Raised by a handler to answer the caller with an ERROR frame carrying this code and message (and, for a
    refusal that clears by itself, `retry_after_s`: how long until asking again will do)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


@dataclass
class CallContext:
    peer_id: str | None  # the caller's proven libp2p peer id (base58), if the transport proved one
    transport: str  # "direct" | "libp2p"
    method: str
    # the caller's address as this end sees it (its TCP peer's, its libp2p connection's), where known
    remote_host: str | None = None


class Inbox(asyncio.Queue):
    """A queue of received messages bounded in messages and in their tensors' bytes.

    A message is admitted while less than ``max_bytes`` wait, so one message of any (capped) size always fits and
    the queue holds at most ``max_bytes`` + one message.
    """

    def __init__(self, maxsize: int, max_bytes: int, shared: SharedBudget | None = None):
        super().__init__(maxsize)
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self.shared = shared  # counts this queue's bytes too, and hears of every message taken from it

    def full(self) -> bool:
        return super().full() or self.queued_bytes >= self.max_bytes

    def _put(self, item) -> None:
        nbytes = _nbytes(item)
        self.queued_bytes += nbytes
        if self.shared is not None:
            self.shared.queued_bytes += nbytes
        super()._put(item)

    def _get(self):
        item = super()._get()
        nbytes = _nbytes(item)
        self.queued_bytes -= nbytes
        if self.shared is not None:
            self.shared.took(nbytes)
        return item

    def queued(self) -> list:
        """What waits in the queue, oldest first (left in it)."""
        return list(self._queue)


def _nbytes(item: object) -> int:
    if not isinstance(item, Message):
        return 0
    return sum(tensor.numel() * tensor.element_size() for tensor in item.tensors)


class SharedBudget:
    """The bytes queued in all the stream inboxes of one server connection, against one limit: its read loop admits
    a message while less than ``max_bytes`` wait in them all, so a peer with many unread streams makes the server
    hold ``max_bytes`` and one message, not that per stream. (A handler's own ``put_nowait`` counts, but is not
    refused for it: a push from another server never waits on this peer.)"""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.queued_bytes = 0
        self._taken: asyncio.Future | None = None

    def full(self) -> bool:
        return self.queued_bytes >= self.max_bytes

    def took(self, nbytes: int) -> None:
        self.queued_bytes -= nbytes
        if self._taken is not None and not self._taken.done():
            self._taken.set_result(None)

    def next_take(self) -> asyncio.Future:
        """Done when a message is next taken from any of the inboxes."""
        if self._taken is None or self._taken.done():
            self._taken = asyncio.get_running_loop().create_future()
        return self._taken


class Incoming(Inbox):
    """A stream call's messages from the caller, in order; None marks the caller's END. Iterating stops there.

    The handler may `put_nowait` messages of its own (a server puts what another peer pushed into a session),
    which are then handled in order with the caller's, with no task in between.
    """

    def __aiter__(self) -> Incoming:
        return self

    async def __anext__(self) -> Message:
        message = await self.get()
        if message is None:
            raise StopAsyncIteration
        return message


UnaryHandler = Callable[[Message, CallContext], Awaitable[Message]]
NoticeHandler = Callable[[Message, CallContext], Awaitable[None] | None]
ErrorCallback = Callable[[WireError], None]
Watcher = Callable[[Message | WireError], None]
StreamHandler = Callable[[Message, Incoming, CallContext], AsyncIterator[Message]]


class Handlers:
    """The methods a server answers, by name; shared by all its connections and transports.

    Each method may cap the payload of the frames its calls carry (the REQUEST and, for streams, every MESSAGE):
    the connection compares a frame's declared size with it before reading the payload, and refuses the call
    with ``too_large`` without holding the bytes. Without a cap, WireLimits.max_payload_bytes applies.
    """

    def __init__(self) -> None:
        self.unary: dict[str, UnaryHandler] = {}
        self.notice: dict[str, NoticeHandler] = {}
        self.stream: dict[str, StreamHandler] = {}
        self.max_payload_bytes: dict[str, int] = {}
        # asked for every call of a unary or stream method, by the caller's peer id, once the call's header is
        # read and before its payload is: a RequestError refuses the call and its payload is dropped unread and
        # never decoded (a peer over its request rate costs the server next to nothing); None admits every call
        self.admit: Callable[[str | None], RequestError | None] | None = None
        # told the code of each call the connection refuses by itself (`too_large`), for the server's count
        self.refused: Callable[[str], None] | None = None

    def add_unary(self, method: str, fn: UnaryHandler, *, max_payload_bytes: int | None = None) -> None:
        self._check_new(method, max_payload_bytes)
        self.unary[method] = fn

    def add_notice(self, method: str, fn: NoticeHandler, *, max_payload_bytes: int | None = None) -> None:
        """A one-way method (`Connection.notify`): a plain function called in the connection's read loop (no
        task), answered only when it raises, with an ERROR frame; for quick handlers on the hot path (a push
        between servers costs one frame, not a frame and an ack). A handler that cannot settle the notice at once
        returns an awaitable instead: it runs as an open call of the connection, answered only if it raises."""
        self._check_new(method, max_payload_bytes)
        self.notice[method] = fn

    def add_stream(self, method: str, fn: StreamHandler, *, max_payload_bytes: int | None = None) -> None:
        """``fn`` is an async generator: each Message it yields goes to the caller; returning ends the stream."""
        self._check_new(method, max_payload_bytes)
        self.stream[method] = fn

    def _check_new(self, method: str, max_payload_bytes: int | None) -> None:
        if not method or len(method.encode()) > 255:
            raise ValueError(f"method names must be 1-255 bytes, got {method!r}")
        if method in self.unary or method in self.notice or method in self.stream:
            raise ValueError(f"method {method!r} is already registered")
        if max_payload_bytes is not None:
            self.max_payload_bytes[method] = max_payload_bytes


class TooManyConnections(WireError):
    """A server refused a connection: it holds as many as its limits allow, in total or from this peer."""


class ConnectionSlots:
    """Counts a server's connections, in total and per proven peer id, against WireLimits' caps.

    One instance may be shared by both transports, so that the caps hold over direct and libp2p connections
    together. ``open`` is called when a connection arrives and ``identify`` once its peer id is proven.
    """

    def __init__(self, limits: WireLimits):
        self.limits = limits
        self.total = 0
        self.per_peer: dict[str, int] = {}

    def open(self) -> None:
        if self.total >= self.limits.max_connections:
            raise TooManyConnections(f"this server already holds {self.total} connections")
        self.total += 1

    def identify(self, peer_id: str) -> None:
        count = self.per_peer.get(peer_id, 0)
        if count >= self.limits.max_connections_per_peer:
            raise TooManyConnections(f"this server already holds {count} connections from {peer_id}")
        self.per_peer[peer_id] = count + 1

    def close(self, peer_id: str | None) -> None:
        """Release an ``open`` slot, and the peer's if ``identify`` accepted it."""
        self.total -= 1
        if peer_id is not None:
            left = self.per_peer.pop(peer_id) - 1
            if left:
                self.per_peer[peer_id] = left


def refuse_connection(writer: asyncio.StreamWriter, code: str, message: str) -> None:
    """Tell the peer why we close its connection (an ERROR frame about the connection itself), then close."""
    frame = Frame(
        Kind.ERROR, _CONNECTION_CALL_ID, Message({"code": code, "message": message[:_MAX_ERROR_CHARS]})
    )
    with suppress(OSError, RuntimeError):
        writer.writelines(encode_frame(frame))
    writer.close()


class _FrameWriter:
    """Writes whole frames to one transport; shared by every call on a connection.

    A big frame goes out in pieces, each once the transport has room: a TLS transport hands each write whole to
    the TCP transport beneath it, whose buffer it does not count, so a big frame written at once to a peer that
    reads nothing would leave `send` nothing to wait for (its timeout bound nothing). Frames written while one is
    in pieces are held and follow it whole."""

    def __init__(self, writer: asyncio.StreamWriter, limits: WireLimits):
        self._writer = writer
        self._transport = writer.transport
        self._limits = limits
        self._in_pieces = asyncio.Lock()  # one big frame in pieces at a time
        self._held: list[list[bytes | memoryview]] | None = None  # (None: no frame is in pieces)
        self._held_bytes = 0

    def buffered(self) -> int:
        """Bytes written and not yet handed to the kernel (the transport's buffer, and frames held)."""
        return self._transport.get_write_buffer_size() + self._held_bytes

    def write(self, frame: Frame) -> None:
        """Queue a frame without waiting for the buffer to drain (for small control frames)."""
        self._write(encode_frame(frame, self._limits))

    def _write(self, parts: list[bytes | memoryview]) -> None:
        if self._transport.is_closing():
            raise ConnectionLost("the connection is closed")
        if self._held is not None:
            self._held.append(parts)
            self._held_bytes += sum(map(len, parts))
            return
        self._writer.writelines(parts)

    async def send(self, frame: Frame, timeout: float | None = None) -> None:
        parts = encode_frame(frame, self._limits)
        try:
            if sum(map(len, parts)) > _WRITE_PIECE_BYTES:
                await asyncio.wait_for(self._send_in_pieces(parts), timeout)
                return
            self._write(parts)
            if self.buffered() > _DRAIN_ABOVE_BYTES:
                await asyncio.wait_for(self._writer.drain(), timeout)
        except TimeoutError:
            raise  # an OSError too, but the connection is only slow: the caller gets what it was promised
        except OSError as e:
            raise ConnectionLost(f"connection broke while sending: {e!r}") from e

    async def _send_in_pieces(self, parts: list[bytes | memoryview]) -> None:
        async with self._in_pieces:
            if self._transport.is_closing():
                raise ConnectionLost("the connection is closed")
            pieces = [
                memoryview(part)[start : start + _WRITE_PIECE_BYTES]
                for part in parts
                for start in range(0, len(part), _WRITE_PIECE_BYTES)
            ]
            self._held, sent = [], 0
            try:
                for piece in pieces:
                    await self._writer.drain()  # (at once while the transport has room)
                    self._writer.write(piece)
                    sent += 1
            finally:
                held, self._held, self._held_bytes = self._held, None, 0
                if not self._transport.is_closing():
                    # a timeout or cancel: a frame begun is finished unwaited for, so the stream stays whole;
                    # one not begun is dropped (a peer that reads nothing is not sent frame after frame)
                    if sent:
                        self._writer.writelines(pieces[sent:])
                    for frame in held:
                        self._writer.writelines(frame)

    def write_error(self, call_id: int, code: str, message: str, retry_after_s: float | None = None) -> None:
        """Best effort: the peer may already be gone, which is then not worth another error."""
        meta = {"code": code[:_MAX_ERROR_CHARS], "message": message[:_MAX_ERROR_CHARS]}
        if retry_after_s is not None:
            meta["retry_after_s"] = float(retry_after_s)
        with suppress(ConnectionLost):
            self.write(Frame(Kind.ERROR, call_id, Message(meta)))


def _remote_error(message: Message) -> RemoteError:
    retry_after_s = message.meta.get("retry_after_s")
    # absent, or not a time (NaN and negatives too): None; an infinite one is the caller's to bound
    if isinstance(retry_after_s, bool) or not (isinstance(retry_after_s, int | float) and retry_after_s >= 0):
        retry_after_s = None
    return RemoteError(
        str(message.meta.get("code", "unknown")), str(message.meta.get("message", "")), retry_after_s
    )


def _expire(future: asyncio.Future, method: str, timeout: float) -> None:
    if not future.done():
        future.set_exception(TimeoutError(f"{method!r} got no reply in {timeout} s"))


class Connection:
    """Many concurrent calls multiplexed over one byte stream (one persistent connection per peer)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        transport: str,
        remote_peer_id: str | None,
        limits: WireLimits,
    ):
        self.remote_peer_id = remote_peer_id
        self.transport = transport
        self._reader = reader
        self._writer = writer
        self._out = _FrameWriter(writer, limits)
        self._limits = limits
        self._call_ids = itertools.count(1)
        self._calls: dict[int, asyncio.Future[Message] | Stream] = {}
        self._notices: dict[int, ErrorCallback] = {}  # the last MAX_NOTICES notices sent, oldest first
        self._lost: ConnectionLost | None = None
        # why the connection is ending, when we know before the read loop does: a refusal or a late frame
        self._why_lost: ConnectionLost | None = None
        self._clock = FrameClock(limits, self._frame_late)
        self._read_task = asyncio.create_task(self._read_loop())

    def __repr__(self) -> str:
        state = "closed" if self.is_closed else "open"
        return f"<Connection {self.transport} peer={self.remote_peer_id} {state}>"

    @property
    def is_closed(self) -> bool:
        return self._lost is not None

    async def call(self, method: str, message: Message, *, timeout: float | None = None) -> Message:
        """One request, one reply. Raises RemoteError, ConnectionLost or asyncio.TimeoutError."""
        self._check_open()
        loop = asyncio.get_running_loop()
        call_id = next(self._call_ids)
        reply = loop.create_future()
        self._calls[call_id] = reply
        deadline = None if timeout is None else loop.time() + timeout
        timer = None
        try:
            await self._out.send(Frame(Kind.REQUEST, call_id, message, method), timeout)
            if deadline is not None:
                timer = loop.call_later(max(0.0, deadline - loop.time()), _expire, reply, method, timeout)
            return await reply
        finally:
            if timer is not None:
                timer.cancel()
            if self._calls.pop(call_id, None) is not None and not self.is_closed:
                # we gave up (timeout, cancellation, failed send): END lets the server cancel the handler
                with suppress(ConnectionLost):
                    self._out.write(Frame(Kind.END, call_id, Message()))

    async def notify(
        self, method: str, message: Message, on_error: ErrorCallback, *, timeout: float | None = None
    ) -> None:
        """A one-way call (`Handlers.add_notice`): returns once the frame is written, waiting (up to `timeout`)
        only while the send buffer is full. `on_error` gets the peer's ERROR, or ConnectionLost should the
        connection end while the notice is among the last MAX_NOTICES sent on it (the peer may not have
        handled it); a notice that succeeded is never answered. Raises ConnectionLost or asyncio.TimeoutError
        if it cannot be sent. Each failure is told once: a loss that `on_error` heard of is not raised too."""
        self._check_open()
        call_id = next(self._call_ids)
        told = False

        def tell(error: WireError) -> None:
            nonlocal told
            told = True
            on_error(error)

        notices = self._notices
        notices[call_id] = tell
        if len(notices) > MAX_NOTICES:
            del notices[next(iter(notices))]
        try:
            await self._out.send(Frame(Kind.REQUEST, call_id, message, method), timeout)
        except Exception:
            notices.pop(call_id, None)
            if told:
                # while it waited to be sent, its failure (the connection's loss) went to on_error: once
                return
            raise
        except BaseException:
            notices.pop(call_id, None)
            raise

    async def open_stream(self, method: str, message: Message, *, timeout: float | None = None) -> Stream:
        """Open a bidirectional stream; ``message`` is the handler's opening message. A refusal (e.g. a full
        cache) arrives as the stream's first ``recv``."""
        self._check_open()
        call_id = next(self._call_ids)
        stream = Stream(self, call_id, method)
        self._calls[call_id] = stream
        try:
            await self._out.send(Frame(Kind.REQUEST, call_id, message, method), timeout)
        except BaseException:
            # the REQUEST may be written already (a timed-out or cancelled wait for the buffer to drain): END
            # lets the server end the handler it starts for it, as for a unary call we give up on
            if self._calls.pop(call_id, None) is not None and not self.is_closed:
                with suppress(ConnectionLost):
                    self._out.write(Frame(Kind.END, call_id, Message()))
            raise
        return stream

    async def close(self) -> None:
        """Close the connection; pending calls fail with ConnectionLost. Idempotent."""
        self._read_task.cancel()
        self._writer.close()
        await asyncio.wait([self._read_task])
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT_S):
                await self._writer.wait_closed()
        except TimeoutError:
            self._writer.transport.abort()  # a hung peer does not read what we still had to send: drop it
        except OSError:
            pass  # the connection was already broken; closing it is all we wanted

    def _check_open(self) -> None:
        if self._lost is not None:
            raise ConnectionLost(str(self._lost))

    def _frame_late(self) -> None:
        limits = self._limits
        self._why_lost = ConnectionLost(
            f"the peer did not finish a frame within its deadline ({limits.frame_timeout_s} s + its size at "
            f"{limits.min_frame_rate:.0f} bytes/s)"
        )
        logger.warning(f"{self!r}: {self._why_lost}")
        self._writer.transport.abort()

    async def _read_loop(self) -> None:
        lost = ConnectionLost("the connection was closed locally")
        try:
            while True:
                frame = await read_frame(self._reader, self._limits, self._clock)
                target = self._calls.get(frame.call_id)
                if isinstance(target, Stream):
                    if frame.kind is not Kind.MESSAGE:
                        del self._calls[frame.call_id]
                    await target._deliver(frame)
                elif target is not None:
                    del self._calls[frame.call_id]
                    if target.done():
                        continue
                    if frame.kind is Kind.REPLY:
                        target.set_result(frame.message)
                    elif frame.kind is Kind.ERROR:
                        target.set_exception(_remote_error(frame.message))
                    else:
                        target.set_exception(FrameError(f"a unary call got a {frame.kind.name} frame"))
                elif frame.kind is Kind.ERROR and frame.call_id == _CONNECTION_CALL_ID:
                    refusal = _remote_error(frame.message)
                    logger.warning(f"{self!r}: the peer rejected our connection: {str(refusal)!r}")
                    self._why_lost = ConnectionLost(f"the peer rejected the connection: {refusal}")
                elif frame.kind is Kind.ERROR and (on_error := self._notices.pop(frame.call_id, None)):
                    _tell(on_error, _remote_error(frame.message), "a notice's on_error")
                # any other frame is for a call we already gave up on, or a notice forgotten
        except ConnectionLost as e:
            lost = self._why_lost or e
        except FrameError as e:
            logger.warning(f"{self!r}: the peer sent a bad frame: {e}")
            lost = self._why_lost or ConnectionLost(f"the peer sent a bad frame: {e}")
        finally:
            self._clock.stop()
            self._lost = lost
            self._writer.close()
            calls, self._calls = self._calls, {}
            for target in calls.values():
                if isinstance(target, Stream):
                    target._connection_lost(lost)
                elif not target.done():
                    target.set_exception(ConnectionLost(str(lost)))
            notices, self._notices = self._notices, {}
            for on_error in notices.values():
                _tell(on_error, ConnectionLost(str(lost)), "a notice's on_error")


def _tell(callback: Callable[[Any], None], item: object, what: str) -> None:
    """Hand `item` to a caller's callback, run in the connection's read loop, which must go on if it fails."""
    try:
        callback(item)
    except Exception:
        logger.warning(f"{what} failed", exc_info=True)


class Stream:
    """One bidirectional stream on a Connection; usable as ``async with``.

    Up to STREAM_QUEUE_SIZE received messages (and WireLimits.max_inbox_bytes) wait here for ``recv``; beyond
    that the whole connection stops reading until this stream is read or closed, so a stream that is no longer
    read must be closed.
    """

    def __init__(self, connection: Connection, call_id: int, method: str):
        self.method = method
        self._connection = connection
        self._call_id = call_id
        self._inbox: Inbox = Inbox(STREAM_QUEUE_SIZE, connection._limits.max_inbox_bytes)
        self._ended: WireError | None = None  # how the stream ended, raised again by every later recv
        self._peer_ended: WireError | None = (
            None  # the peer's END or ERROR, received but perhaps not yet read
        )
        self._lost: ConnectionLost | None = None
        self._closed = False
        self._watcher: Watcher | None = None

    async def __aenter__(self) -> Stream:
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    async def send(self, message: Message, *, timeout: float | None = None) -> None:
        """Queue a message; waits (up to `timeout`) only when the connection's send buffer is full."""
        if self._closed:
            raise StreamClosed(f"stream {self.method!r} was closed by this side")
        if self._ended is not None:
            raise self._ended
        if self._peer_ended is not None:
            raise self._peer_ended  # the peer's reason beats a later "connection closed"
        await self._connection._out.send(Frame(Kind.MESSAGE, self._call_id, message), timeout)

    async def recv(self, *, timeout: float | None = None) -> Message:
        """The peer's next message; StreamClosed after its END, RemoteError after its ERROR, or ConnectionLost."""
        if self._ended is not None:
            raise self._ended
        if self._closed:
            raise StreamClosed(f"stream {self.method!r} was closed by this side")
        if not self._inbox.empty():
            item = self._inbox.get_nowait()
        elif self._lost is not None:
            item = self._lost
        else:
            # asyncio.timeout, unlike wait_for on Python 3.11, runs no extra task: this is the client's hot path
            async with asyncio.timeout(timeout):
                item = await self._inbox.get()
        if isinstance(item, WireError):
            self._ended = item
            raise item
        return item

    def watch(self, watcher: Watcher | None) -> None:
        """Show `watcher` what waits to be received and, until `watch(None)`, each message (or the error that
        ends the stream) as it arrives; all of it is still received as usual. For a caller that waits on
        another stream meanwhile and must react to this one without a task of its own."""
        self._watcher = watcher
        for item in self._inbox.queued() if watcher is not None else ():
            _tell(watcher, item, f"a watcher of stream {self.method!r}")

    async def close(self) -> None:
        """Send END (once) and forget the stream; messages still in flight from the peer are dropped."""
        if self._closed:
            return
        self._closed = True
        while not self._inbox.empty():  # a read loop blocked on our full inbox must not stay blocked
            self._inbox.get_nowait()
        # a recv waiting in another task (a step of a session closed meanwhile) ends now, not at its timeout
        self._inbox.put_nowait(StreamClosed(f"stream {self.method!r} was closed by this side"))
        connection = self._connection
        if connection._calls.pop(self._call_id, None) is not None and not connection.is_closed:
            with suppress(ConnectionLost):
                connection._out.write(Frame(Kind.END, self._call_id, Message()))

    async def _deliver(self, frame: Frame) -> None:
        if frame.kind is Kind.MESSAGE:
            item: Message | WireError = frame.message
        elif frame.kind is Kind.END:
            item = StreamClosed(f"the peer ended stream {self.method!r}")
        elif frame.kind is Kind.ERROR:
            item = _remote_error(frame.message)
        else:
            item = FrameError(f"a stream got a {frame.kind.name} frame")
        if isinstance(item, WireError):
            self._peer_ended = item
        if self._watcher is not None:
            _tell(self._watcher, item, f"a watcher of stream {self.method!r}")
        await self._inbox.put(item)

    def _connection_lost(self, error: ConnectionLost) -> None:
        self._lost = ConnectionLost(str(error))
        if self._watcher is not None:
            _tell(self._watcher, self._lost, f"a watcher of stream {self.method!r}")
        if self._inbox.empty():
            self._inbox.put_nowait(self._lost)  # wakes a recv that is waiting; a full inbox has no waiter


class _ServerCall:
    __slots__ = ("task", "inbox", "max_payload_bytes")

    def __init__(self, task: asyncio.Task, inbox: Incoming | None, max_payload_bytes: int):
        self.task = task
        self.inbox = inbox  # a stream's incoming messages; None for unary calls
        self.max_payload_bytes = max_payload_bytes  # of each MESSAGE frame the caller sends on a stream


async def serve_connection(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    handlers: Handlers,
    *,
    limits: WireLimits,
    peer_id: str | None,
    transport: str,
    remote_host: str | None = None,
) -> None:
    """Answer calls on one connection until it closes; handler failures become ERROR frames, never crashes.
    `remote_host`: the caller's address as this end sees it, where the transport knows it (`CallContext`).

    When the connection ends, every running handler is cancelled, so session resources can be freed in their
    ``finally`` blocks. A frame larger than its method may carry fails only its call; a frame that does not
    arrive within its deadline closes the connection.
    """
    out = _FrameWriter(writer, limits)
    calls: dict[int, _ServerCall] = {}
    caps = handlers.max_payload_bytes
    methods = handlers.unary.keys() | handlers.notice.keys() | handlers.stream.keys()

    refused: dict[int, RequestError] = {}  # calls refused at their header, until their error is written
    budget = SharedBudget(limits.max_inbox_bytes)  # of every stream inbox of this connection together

    def payload_cap(kind: Kind, call_id: int, method: str) -> int:
        if kind is Kind.REQUEST:
            if method not in methods:
                return 0
            if handlers.admit is not None and method not in handlers.notice:
                if (refusal := handlers.admit(peer_id)) is not None:
                    refused[call_id] = refusal
                    return -1  # drop the payload, however small
            return caps.get(method, limits.max_payload_bytes)
        if kind is Kind.MESSAGE:
            call = calls.get(call_id)
            return call.max_payload_bytes if call is not None and call.inbox is not None else 0
        return 0  # END, and the REPLY/ERROR frames a caller has no reason to send

    def frame_late() -> None:
        message = f"a frame did not arrive within its deadline ({limits.frame_timeout_s} s + its size at "
        message += f"{limits.min_frame_rate:.0f} bytes/s)"
        peer_faults.log(
            logging.WARNING, "late frame", f"Closing a {transport} connection from {peer_id}: {message}"
        )
        out.write_error(_CONNECTION_CALL_ID, "frame_timeout", message)
        writer.transport.abort()

    def refuse_call(error: PayloadTooLarge) -> None:
        frame = error.frame
        if frame.kind is Kind.REQUEST:
            if (refusal := refused.pop(frame.call_id, None)) is not None:
                out.write_error(frame.call_id, refusal.code, refusal.message, refusal.retry_after_s)
            elif frame.method in methods:
                too_large(frame.call_id, error)
            else:
                out.write_error(frame.call_id, "unknown_method", f"no method {frame.method!r}")
            return
        call = calls.pop(frame.call_id, None)
        if call is not None:  # a stream message too large for its method ends the stream
            call.task.cancel()
            too_large(frame.call_id, error)

    def too_large(call_id: int, error: PayloadTooLarge) -> None:
        if handlers.refused is not None:
            handlers.refused("too_large")
        out.write_error(call_id, "too_large", str(error))

    clock = FrameClock(limits, frame_late)

    async def run_unary(call_id: int, fn: UnaryHandler, request: Message, context: CallContext) -> None:
        try:
            reply = await fn(request, context)
            await out.send(Frame(Kind.REPLY, call_id, _checked_reply(reply, context)))
        except Exception as e:
            _report_failure(out, call_id, context, e)
        finally:
            calls.pop(call_id, None)

    async def run_notice(call_id: int, later: Awaitable[None], context: CallContext) -> None:
        try:
            await later
        except Exception as e:
            _report_failure(out, call_id, context, e)
        finally:
            calls.pop(call_id, None)

    async def run_stream(
        call_id: int, fn: StreamHandler, opening: Message, inbox: Incoming, context: CallContext
    ) -> None:
        try:
            async with aclosing(fn(opening, inbox, context)) as replies:
                async for reply in replies:
                    await out.send(Frame(Kind.MESSAGE, call_id, _checked_reply(reply, context)))
            await out.send(Frame(Kind.END, call_id, Message()))
        except Exception as e:
            _report_failure(out, call_id, context, e)
        finally:
            calls.pop(call_id, None)
            while not inbox.empty():  # the read loop may be blocked on this full inbox; unblock it
                inbox.get_nowait()

    def start_call(frame: Frame) -> None:
        call_id, method = frame.call_id, frame.method
        if call_id in calls:
            out.write_error(call_id, "duplicate_call", f"call {call_id} is already open")
            return
        if len(calls) >= limits.max_open_calls:
            out.write_error(
                call_id, "too_many_calls", f"{len(calls)} calls are already open on this connection"
            )
            return
        context = CallContext(peer_id=peer_id, transport=transport, method=method, remote_host=remote_host)
        if method in handlers.notice:
            try:
                later = handlers.notice[method](frame.message, context)
            except Exception as e:
                _report_failure(out, call_id, context, e)
            else:
                if later is not None:
                    calls[call_id] = _ServerCall(
                        asyncio.ensure_future(run_notice(call_id, later, context)), None, 0
                    )
        elif method in handlers.unary:
            task = asyncio.create_task(run_unary(call_id, handlers.unary[method], frame.message, context))
            calls[call_id] = _ServerCall(task, None, 0)
        elif method in handlers.stream:
            inbox = Incoming(STREAM_QUEUE_SIZE, limits.max_inbox_bytes, budget)
            task = asyncio.create_task(
                run_stream(call_id, handlers.stream[method], frame.message, inbox, context)
            )
            calls[call_id] = _ServerCall(task, inbox, caps.get(method, limits.max_payload_bytes))
        else:
            out.write_error(call_id, "unknown_method", f"no method {method!r}")

    closed: asyncio.Future | None = None  # done once the transport is gone; made when an inbox is first full

    async def deliver(inbox: Incoming, item: Message | None) -> bool:
        """Queue `item` for a stream's handler; while its inbox, or the connection's budget, is full this loop
        reads nothing more (the peer stalls). False if the connection ends meanwhile (the peer left, or a
        stopping server aborted it): a handler that does not read must not keep the loop, and so itself, alive
        past its connection."""
        nonlocal closed
        while inbox.full() or budget.full():
            if closed is None:
                closed = asyncio.ensure_future(writer.wait_closed())
                closed.add_done_callback(lambda done: done.cancelled() or done.exception())
            waited = (budget.next_take(), closed)
            await asyncio.wait(waited, timeout=HANGUP_PROBE_S, return_when=asyncio.FIRST_COMPLETED)
            if closed.done():
                return False
            if _hung_up(writer):  # a reset behind the unread bytes, which this transport does not read to see
                writer.transport.abort()
                return False
        inbox.put_nowait(item)
        return True

    try:
        while True:
            if out.buffered() > _DRAIN_ABOVE_BYTES:
                # a peer that reads none of our answers (the errors this loop writes by itself included) is not
                # read either, or its answers would pile up here without bound
                try:
                    await writer.drain()
                except OSError:
                    return
            try:
                frame = await read_frame(reader, limits, clock, payload_cap)
            except PayloadTooLarge as e:
                refuse_call(e)
                continue
            except ConnectionLost:
                return
            except FrameError as e:
                if writer.transport.is_closing():
                    return  # we closed it (a late frame), which cut the frame short
                peer_faults.log(
                    logging.WARNING,
                    "bad frame",
                    f"Closing a {transport} connection from {peer_id}: bad frame: {e}",
                )
                out.write_error(_CONNECTION_CALL_ID, "bad_frame", str(e))
                return
            if frame.kind is Kind.REQUEST:
                start_call(frame)
                continue
            call = calls.get(frame.call_id)
            if call is None:
                continue  # the call already finished; late MESSAGE/END frames are expected
            if frame.kind is Kind.MESSAGE and call.inbox is not None:
                if not await deliver(call.inbox, frame.message):
                    return
            elif frame.kind is Kind.END:
                if call.inbox is not None:
                    if not await deliver(call.inbox, None):
                        return
                else:
                    call.task.cancel()  # the caller gave up on this unary call
            else:
                logger.debug(f"Ignoring a {frame.kind.name} frame for call {frame.call_id} from {peer_id}")
    finally:
        clock.stop()
        tasks = [call.task for call in calls.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.close()


def _hung_up(writer: asyncio.StreamWriter) -> bool:
    """Whether the kernel says the peer reset (or the other end closed) this connection's socket. A transport
    that stopped reading (backpressure) never learns it otherwise: the unread bytes stand before the news."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLERR | select.POLLHUP)
    return bool(poller.poll(0))


def _checked_reply(reply: Message, context: CallContext) -> Message:
    if not isinstance(reply, Message):
        raise TypeError(f"handler {context.method!r} produced a {type(reply).__name__}, not a Message")
    return reply


def _report_failure(out: _FrameWriter, call_id: int, context: CallContext, error: Exception) -> None:
    if isinstance(error, RequestError):
        out.write_error(call_id, error.code, error.message, error.retry_after_s)
    elif isinstance(error, ConnectionLost):
        logger.debug(f"{context.method!r} from {context.peer_id}: the caller is gone ({error})")
    else:
        logger.warning(f"{context.method!r} from {context.peer_id} failed", exc_info=True)
        out.write_error(call_id, "internal", f"{type(error).__name__}: {error}")
