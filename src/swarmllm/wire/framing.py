"""The wire format: how one frame (metadata + tensors) is laid out as bytes, written and read back.

A frame is three parts, each read with a single ``readexactly`` (the head and payload of a frame under 64 KiB
together, payloads above 1 MiB in chunks, into a buffer that grows as they arrive):

1. a fixed 30-byte header (magic, version, kind, sizes, call id);
2. the head: the method name (REQUEST frames only), msgpack metadata and one binary descriptor per tensor
   (dtype code, ndim, dims as u64);
3. the payload: the raw bytes of every tensor, each starting at an 8-byte aligned offset.

Every declared size is checked against ``WireLimits`` (and the reader's per-call cap on the payload) before
anything is allocated, and memory is committed only as bytes arrive, so a garbage or hostile frame costs at most
what its peer actually sent. Once a frame has started, a ``FrameClock`` says by when the rest must be in, and
tells its connection when it is not. This module knows nothing about calls, connections or transports.
"""

from __future__ import annotations

import asyncio
import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgpack
import numpy as np
import torch

MAGIC = b"SW"
VERSION = 1
# every tensor starts 8-byte aligned, so torch.frombuffer views are naturally aligned for any dtype
_ALIGN = 8
_PADDING = bytes(_ALIGN)
# magic, version, kind, method_len, n_tensors, call_id, meta_len, desc_len, payload_len
_HEADER = struct.Struct("<2sBBBBQIIQ")
HEADER_SIZE = _HEADER.size
_DESC_PREFIX = struct.Struct("<BB")  # dtype code, ndim; followed by ndim u64 dims
_DIM = struct.Struct("<Q")
# Payloads above this are received in chunks appended to one growing buffer (realloc grows large buffers in place),
# so a 1 GiB tensor needs ~1.1 GiB of RAM instead of the ~3 GiB that readexactly (stream buffer + bytes + bytearray)
# would hold at its peak, and a peer that declares 1 GiB and stalls costs only what it sent.
_CHUNKED_PAYLOAD_BYTES = 1 << 20
_CHUNK_BYTES = 1 << 20
# A frame whose head and payload together are at most this is read whole, with one read: a refused payload of
# that size is then read rather than dropped, which costs the same
_ONE_READ_BYTES = 64 << 10

_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
    torch.float64: 4,
    torch.int64: 5,
    torch.int32: 6,
    torch.int16: 7,
    torch.int8: 8,
    torch.uint8: 9,
    torch.bool: 10,
}
_CODE_DTYPES: dict[int, torch.dtype] = {code: dtype for dtype, code in _DTYPE_CODES.items()}
# what a received tensor is read as (bfloat16, which numpy lacks, as its int16 bits, then viewed as bfloat16)
_NUMPY_DTYPES: dict[torch.dtype, np.dtype] = {
    dtype: torch.empty(0, dtype=torch.int16 if dtype is torch.bfloat16 else dtype).numpy().dtype
    for dtype in _DTYPE_CODES
}


class Kind(IntEnum):
    REQUEST = 1  # opens a call (unary or stream); carries the method name
    MESSAGE = 2  # one stream message, either direction
    REPLY = 3  # the answer to a unary call
    END = 4  # this side is done with the call (stream end, or a caller cancelling a unary call)
    ERROR = 5  # the call failed; meta holds "code" and "message"


_KINDS = {kind.value: kind for kind in Kind}


@dataclass
class Message:
    """What a call carries: plain msgpack-able metadata and a list of tensors.

    Tensors are sent straight from their storage (no copy), so a sent tensor must not be modified in place
    until the send has completed. Received tensors share one freshly allocated buffer per frame.
    msgpack turns tuples into lists.
    """

    meta: dict[str, Any] = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)


@dataclass
class Frame:
    kind: Kind
    call_id: int
    message: Message
    method: str = ""  # only REQUEST frames name a method


@dataclass(frozen=True)
class WireLimits:
    """What a peer may make us allocate, track or wait for; sizes are checked before allocation."""

    max_meta_bytes: int = 64 * 1024
    max_payload_bytes: int = 1 << 30  # per frame; a server also caps each method's payload (``Handlers``)
    max_tensors: int = 16
    max_dims: int = 8
    max_open_calls: int = 4096  # concurrent calls one connection may have open on a server
    # once a frame has started, the rest must arrive within frame_timeout_s + its size at min_frame_rate, or the
    # connection is dropped (idle connections between frames may stay open)
    frame_timeout_s: float = 30.0
    min_frame_rate: float = 256 * 1024  # bytes/s
    max_inbox_bytes: int = 64 << 20  # queued stream messages (server: per connection); then it stops reading
    max_connections: int = 1024  # a server's connections (direct and libp2p together, handshakes included)
    max_connections_per_peer: int = 8  # a server's connections from one proven peer id


DEFAULT_LIMITS = WireLimits()


class WireError(Exception):
    """Base of every error this package raises about the wire."""


class FrameError(WireError):
    """A frame is malformed, truncated, oversized or otherwise not something we will decode."""


class ConnectionLost(WireError):
    """The peer closed the connection or it broke; every pending call on it fails with this at once."""


class PayloadTooLarge(WireError):
    """A well-formed frame whose payload exceeds what its call may carry; the payload was read and dropped, so
    the connection stays usable and only the call is refused."""

    def __init__(self, frame: Frame, payload_len: int, cap: int):
        super().__init__(f"a payload of {payload_len} bytes exceeds the {cap} bytes this call may carry")
        self.frame = frame  # kind, call id and method; its message is empty


class FrameClock:
    """By when the frame being read must be complete, and the timer that calls ``on_late`` once it is not.

    ``read_frame`` starts the deadline at a frame's first byte, extends it once the frame's size is known and
    clears it at the frame's end: between frames there is none, so idle connections may stay open. The hot path
    pays one clock read per frame; the timer wakes only once per ``frame_timeout_s`` (no frame can be late
    sooner), or at the deadline of the frame in progress.
    """

    __slots__ = ("deadline", "_started", "_limits", "_loop", "_on_late", "_timer")

    def __init__(self, limits: WireLimits, on_late: Callable[[], None]):
        self.deadline: float | None = None
        self._started: float | None = None
        self._limits = limits
        self._loop = asyncio.get_running_loop()
        self._on_late = on_late
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(limits.frame_timeout_s, self._check)

    def begin(self, remaining_bytes: int) -> None:
        if self._started is None:
            self._started = self._loop.time()
        limits = self._limits
        self.deadline = self._started + limits.frame_timeout_s + remaining_bytes / limits.min_frame_rate

    def end(self) -> None:
        self.deadline = self._started = None

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        now = self._loop.time()
        if self.deadline is not None and now >= self.deadline:
            self._timer = None
            self._on_late()
            return
        wake = self.deadline if self.deadline is not None else now + self._limits.frame_timeout_s
        self._timer = self._loop.call_at(wake, self._check)


# the largest payload a frame may carry, given its kind, call id and method (called before the payload is read)
PayloadCap = Callable[[Kind, int, str], int]


class RemoteError(WireError):
    """The peer answered a call with an ERROR frame (`retry_after_s`: when it says asking again will do, if it
    does)."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s


def _extent(shape: tuple[int, ...]) -> int:
    """The elements a tensor of `shape` would hold with each empty dimension counted as 1: what its other
    dimensions span (torch cannot make a tensor whose sizes or strides overflow int64, empty or not)."""
    extent = 1
    for dim in shape:
        extent *= max(dim, 1)
    return extent


def _aligned(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A byte view of the tensor's (contiguous, CPU) storage: no copy for the common case."""
    if tensor.requires_grad:
        tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    # via uint8 because bfloat16 has no numpy dtype; reshape(-1) also handles 0-d tensors
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


def encode_frame(frame: Frame, limits: WireLimits | None = None) -> list[bytes | memoryview]:
    """Lay a frame out as buffers for ``writer.writelines``; tensor buffers alias the tensors' memory.

    With ``limits``, a frame the peer would reject is refused here with FrameError, so a too-large message fails
    only its own call instead of getting the whole connection closed by the peer.
    """
    message = frame.message
    method = frame.method.encode()
    meta = msgpack.packb(message.meta) if message.meta else b""
    head = [b"", method, meta]  # head[0] becomes the fixed header once the sizes are known
    buffers: list[bytes | memoryview] = []
    payload_len = 0
    for tensor in message.tensors:
        code = _DTYPE_CODES.get(tensor.dtype)
        if code is None:
            raise TypeError(f"dtype {tensor.dtype} cannot be sent over the wire")
        shape = tuple(tensor.shape)
        if limits is not None and len(shape) > limits.max_dims:
            raise FrameError(f"tensor of {len(shape)} dims (max {limits.max_dims})")
        if limits is not None and _extent(shape) * tensor.element_size() > limits.max_payload_bytes:
            # the reader's rule: even an empty tensor's other dims must fit a frame
            raise FrameError(f"tensor shape {shape} is larger than any frame may carry")
        head.append(struct.pack(f"<BB{len(shape)}Q", code, len(shape), *shape))
        data = _tensor_bytes(tensor)
        if data.nbytes:
            start = _aligned(payload_len)
            if start != payload_len:
                buffers.append(_PADDING[: start - payload_len])
            buffers.append(data)
            payload_len = start + data.nbytes
    desc_len = sum(len(part) for part in head[3:])
    if len(method) > 255 or len(message.tensors) > 255:  # the header's u8 fields
        raise FrameError(
            f"method name of {len(method)} bytes or {len(message.tensors)} tensors (max 255 each)"
        )
    if limits is not None:
        _check_sizes(len(message.tensors), len(meta), desc_len, payload_len, limits)
    head[0] = _HEADER.pack(
        MAGIC,
        VERSION,
        frame.kind,
        len(method),
        len(message.tensors),
        frame.call_id,
        len(meta),
        desc_len,
        payload_len,
    )
    return [b"".join(head), *buffers]


def _check_sizes(n_tensors: int, meta_len: int, desc_len: int, payload_len: int, limits: WireLimits) -> None:
    if n_tensors > limits.max_tensors:
        raise FrameError(f"{n_tensors} tensors (max {limits.max_tensors})")
    if meta_len > limits.max_meta_bytes:
        raise FrameError(f"metadata of {meta_len} bytes (max {limits.max_meta_bytes})")
    if desc_len > n_tensors * (_DESC_PREFIX.size + _DIM.size * limits.max_dims):
        raise FrameError(f"tensor descriptors of {desc_len} bytes for {n_tensors} tensors")
    if payload_len > limits.max_payload_bytes:
        raise FrameError(f"payload of {payload_len} bytes (max {limits.max_payload_bytes})")


async def read_frame(
    reader: asyncio.StreamReader,
    limits: WireLimits,
    clock: FrameClock | None = None,
    payload_cap: PayloadCap | None = None,
) -> Frame:
    """Read one frame. ConnectionLost on a clean EOF between frames or a broken socket, FrameError otherwise;
    PayloadTooLarge (after dropping the payload) when ``payload_cap`` refuses its size.

    Waiting for a frame to start has no deadline; from its first byte on, ``clock`` holds the deadline.
    """
    try:
        # read(), unlike readexactly(), returns as soon as the frame has started, so its deadline can start too
        header = await reader.read(HEADER_SIZE)
        if not header:
            raise ConnectionLost("the peer closed the connection")
        if len(header) < HEADER_SIZE:
            if clock is not None:
                clock.begin(0)
            header += await reader.readexactly(HEADER_SIZE - len(header))
    except asyncio.IncompleteReadError as e:
        raise FrameError(
            f"truncated header ({len(header) + len(e.partial)} of {HEADER_SIZE} bytes)"
        ) from None
    except OSError as e:
        raise ConnectionLost(f"connection broke: {e!r}") from e

    magic, version, code, method_len, n_tensors, call_id, meta_len, desc_len, payload_len = _HEADER.unpack(
        header
    )
    if magic != MAGIC:
        raise FrameError(f"bad magic {magic!r}")
    if version != VERSION:
        raise FrameError(f"unsupported wire version {version} (expected {VERSION})")
    kind = _KINDS.get(code)  # (not Kind(code): an Enum's call is a few Python frames, on every frame's path)
    if kind is None:
        raise FrameError(f"unknown frame kind {code}")
    _check_sizes(n_tensors, meta_len, desc_len, payload_len, limits)
    head_len = method_len + meta_len + desc_len
    if clock is not None:
        clock.begin(head_len + payload_len)

    if head_len + payload_len <= _ONE_READ_BYTES:
        # a small frame (every decode step's): head and payload in one read, one buffer
        head, payload, base = await _read_small(reader, head_len, payload_len)
    else:
        head, payload, base = await _read_part(reader, head_len, "head"), None, 0
    try:
        method = head[:method_len].decode()
        meta = (
            msgpack.unpackb(head[method_len : method_len + meta_len], strict_map_key=False)
            if meta_len
            else {}
        )
    except (
        Exception
    ) as e:  # msgpack raises a zoo of types (ExtraData, FormatError, ValueError, ...) on garbage
        raise FrameError(f"undecodable metadata: {e!r}") from None
    if not isinstance(meta, dict):
        raise FrameError(f"metadata must be a map, got {type(meta).__name__}")
    layout = _parse_descriptors(head[method_len + meta_len :], n_tensors, payload_len, limits)

    if payload_cap is not None:
        cap = payload_cap(kind, call_id, method)
        if payload_len > cap:
            if payload is None:
                await _drop_payload(reader, payload_len)
            if clock is not None:
                clock.end()
            raise PayloadTooLarge(Frame(kind, call_id, Message(meta), method), payload_len, cap)
    if payload is None:
        payload = await _read_payload(reader, payload_len)
    if clock is not None:
        clock.end()
    tensors = []
    for dtype, shape, offset, count in layout:
        if count:
            # through numpy: torch.frombuffer's argument parsing cost more than the view itself (2.2 against
            # 1.3 us a tensor, warm); bfloat16, which numpy lacks, as int16 bits
            array = np.frombuffer(payload, dtype=_NUMPY_DTYPES[dtype], count=count, offset=base + offset)
            tensor = torch.from_numpy(array.reshape(shape))
            tensors.append(tensor.view(torch.bfloat16) if dtype is torch.bfloat16 else tensor)
        else:  # (an empty tensor reads no bytes)
            tensors.append(torch.empty(shape, dtype=dtype))
    return Frame(kind, call_id, Message(meta, tensors), method)


@functools.lru_cache(maxsize=256)
def _parse_descriptors(
    descriptors: bytes, n_tensors: int, payload_len: int, limits: WireLimits
) -> tuple[tuple[torch.dtype, tuple[int, ...], int, int], ...]:
    """(dtype, shape, byte offset, element count) per tensor; checks they tile the declared payload exactly.
    Kept for the last few hundred layouts: a session's steps carry the same shapes, step after step (a layout
    that fails is not kept, and a peer sending new ones only turns the cache over)."""
    layout = []
    pos, end = 0, len(descriptors)
    offset = 0
    for _ in range(n_tensors):
        if pos + _DESC_PREFIX.size > end:
            raise FrameError("truncated tensor descriptor")
        code, ndim = _DESC_PREFIX.unpack_from(descriptors, pos)
        pos += _DESC_PREFIX.size
        dtype = _CODE_DTYPES.get(code)
        if dtype is None:
            raise FrameError(f"unknown dtype code {code}")
        if ndim > limits.max_dims:
            raise FrameError(f"tensor of {ndim} dims (max {limits.max_dims})")
        if pos + ndim * _DIM.size > end:
            raise FrameError("truncated tensor shape")
        shape = struct.unpack_from(f"<{ndim}Q", descriptors, pos)
        pos += ndim * _DIM.size
        count = 1
        for dim in shape:
            count *= dim
        if _extent(shape) * dtype.itemsize > limits.max_payload_bytes:
            # even an empty tensor's other dims must fit a frame: torch cannot make one with int64-overflowing
            # sizes or strides
            raise FrameError(f"tensor shape {shape} is larger than any frame may carry")
        nbytes = count * dtype.itemsize
        if nbytes:
            offset = _aligned(offset)
            if offset + nbytes > payload_len:
                raise FrameError(f"tensor shapes need more than the declared {payload_len} payload bytes")
        layout.append((dtype, shape, offset, count))
        offset += nbytes
    if pos != end:
        raise FrameError(f"{end - pos} stray bytes after the tensor descriptors")
    if offset != payload_len:
        raise FrameError(f"tensor shapes cover {offset} bytes but the payload declares {payload_len}")
    return tuple(layout)


async def _read_part(reader: asyncio.StreamReader, size: int, what: str) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as e:
        raise FrameError(f"truncated {what} ({len(e.partial)} of {size} bytes)") from None
    except OSError as e:
        raise ConnectionLost(f"connection broke: {e!r}") from e


async def _read_small(
    reader: asyncio.StreamReader, head_len: int, payload_len: int
) -> tuple[bytes, bytearray, int]:
    """A small frame's head, and a writable buffer (torch.frombuffer then gives writable tensors) holding its
    payload from an 8-byte aligned offset, returned too."""
    try:
        data = await reader.readexactly(head_len + payload_len)
    except asyncio.IncompleteReadError as e:
        got = len(e.partial)
        if got < head_len:
            raise FrameError(f"truncated head ({got} of {head_len} bytes)") from None
        raise FrameError(f"truncated payload ({got - head_len} of {payload_len} bytes)") from None
    except OSError as e:
        raise ConnectionLost(f"connection broke: {e!r}") from e
    base = _aligned(head_len)
    buffer = bytearray(base - head_len + len(data))
    buffer[base - head_len :] = data
    return data[:head_len], buffer, base


async def _read_payload(reader: asyncio.StreamReader, size: int) -> bytearray:
    """Tensor bytes in a writable buffer, so torch.frombuffer gives ordinary writable tensors."""
    if size <= _CHUNKED_PAYLOAD_BYTES:
        return bytearray(await _read_part(reader, size, "payload"))
    payload = bytearray()
    try:
        while len(payload) < size:
            chunk = await reader.read(min(size - len(payload), _CHUNK_BYTES))
            if not chunk:
                raise FrameError(f"truncated payload ({len(payload)} of {size} bytes)")
            payload += chunk
    except OSError as e:
        raise ConnectionLost(f"connection broke: {e!r}") from e
    return payload


async def _drop_payload(reader: asyncio.StreamReader, size: int) -> None:
    """Read and forget a payload we refuse, keeping the stream in step without holding the bytes."""
    left = size
    try:
        while left:
            chunk = await reader.read(min(left, _CHUNK_BYTES))
            if not chunk:
                raise FrameError(f"truncated payload ({size - left} of {size} bytes)")
            left -= len(chunk)
    except OSError as e:
        raise ConnectionLost(f"connection broke: {e!r}") from e
