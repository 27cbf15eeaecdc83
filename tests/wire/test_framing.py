"""The frame layout: exact round trips, and rejection of malformed, truncated and oversized frames."""

import asyncio
import struct

import pytest
import torch

from swarmllm.wire import (
    ConnectionLost,
    Frame,
    FrameError,
    Kind,
    Message,
    WireLimits,
    encode_frame,
    read_frame,
)
from swarmllm.wire.framing import HEADER_SIZE

LIMITS = WireLimits()
# The header layout, restated here as the spec: magic, version, kind, method_len, n_tensors, call_id,
# meta_len, desc_len, payload_len.
HEADER = struct.Struct("<2sBBBBQIIQ")

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
]
SHAPES = [(), (0,), (3, 0, 2), (1,), (7,), (2, 3), (1, 1, 4096), (2, 1, 3, 1, 2, 1, 2, 1)]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype is torch.bool:
        return torch.randint(0, 2, shape, dtype=torch.bool)
    if dtype.is_floating_point:
        return torch.randn(shape, dtype=torch.float32).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, dtype=dtype)


def stream_of(data: bytes, *, eof: bool = True) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    if eof:
        reader.feed_eof()
    return reader


def frame_bytes(frame: Frame) -> bytes:
    return b"".join(bytes(part) for part in encode_frame(frame))


async def round_trip(frame: Frame, limits: WireLimits = LIMITS) -> Frame:
    return await read_frame(stream_of(frame_bytes(frame)), limits)


def assert_same_tensors(got: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == e.dtype and g.shape == e.shape
        assert torch.equal(g, e)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
async def test_every_dtype_and_shape_round_trips(dtype):
    tensors = [random_tensor(shape, dtype) for shape in SHAPES]
    got = await round_trip(Frame(Kind.MESSAGE, 7, Message({"dtype": str(dtype)}, tensors)))
    assert got.kind is Kind.MESSAGE and got.call_id == 7 and got.method == ""
    assert got.message.meta == {"dtype": str(dtype)}
    assert_same_tensors(got.message.tensors, tensors)
    for tensor in got.message.tensors:
        assert tensor.data_ptr() % tensor.element_size() == 0  # views into the payload are naturally aligned


async def test_mixed_dtypes_stay_aligned_and_writable():
    tensors = [
        torch.tensor([1, 2, 3], dtype=torch.int8),
        torch.randn(5, dtype=torch.float64),
        torch.tensor(True),
    ]
    got = await round_trip(Frame(Kind.REPLY, 1, Message(tensors=tensors)))
    assert_same_tensors(got.message.tensors, tensors)
    assert [t.data_ptr() % 8 for t in got.message.tensors[:2]] == [0, 0]
    got.message.tensors[1].add_(1)  # received tensors are ordinary writable tensors
    assert torch.equal(got.message.tensors[1], tensors[1] + 1)


async def test_non_contiguous_tensors_arrive_contiguous():
    base = torch.randn(6, 8)
    views = [base.t(), base[::2, 1::3], base[:, 3], torch.randn(4, 4, dtype=torch.bfloat16).t()]
    assert not any(view.is_contiguous() for view in views)
    got = await round_trip(Frame(Kind.MESSAGE, 2, Message(tensors=views)))
    assert_same_tensors(got.message.tensors, views)
    assert all(tensor.is_contiguous() for tensor in got.message.tensors)


async def test_large_tensor_round_trips():
    big = torch.randn(1024, 1024 + 3)  # ~4 MiB: received in chunks into one buffer
    got = await round_trip(Frame(Kind.MESSAGE, 3, Message(tensors=[big, torch.ones(3)])))
    assert_same_tensors(got.message.tensors, [big, torch.ones(3)])


async def test_meta_with_nested_data_and_method():
    meta = {
        "session": "abc",
        "position": 12,
        "nested": {"floats": [1.5, -2.25], "none": None, "flag": True, "raw": b"\x00\xff"},
        "list": [[1, 2], {"deep": "x"}],
        7: "int keys are allowed",
    }
    got = await round_trip(Frame(Kind.REQUEST, 2**63, Message(meta), method="inference"))
    assert got.kind is Kind.REQUEST and got.call_id == 2**63 and got.method == "inference"
    assert got.message.meta == meta and got.message.tensors == []


async def test_requires_grad_tensor_is_sent():
    weight = torch.randn(3, requires_grad=True)
    got = await round_trip(Frame(Kind.MESSAGE, 1, Message(tensors=[weight])))
    assert torch.equal(got.message.tensors[0], weight.detach())


def test_encoding_does_not_copy_tensor_memory():
    tensor = torch.zeros(4)
    parts = encode_frame(Frame(Kind.MESSAGE, 1, Message(tensors=[tensor])))
    tensor[0] = 42.0
    assert bytes(parts[1][:4]) == struct.pack("<f", 42.0)


def test_encoding_refuses_unsupported_and_oversized():
    with pytest.raises(TypeError):
        encode_frame(Frame(Kind.MESSAGE, 1, Message(tensors=[torch.zeros(2, dtype=torch.complex64)])))
    small = WireLimits(max_meta_bytes=16, max_payload_bytes=64, max_tensors=1, max_dims=8)
    for message in [
        Message({"text": "x" * 100}),
        Message(tensors=[torch.zeros(100)]),
        Message(tensors=[torch.zeros(1), torch.zeros(1)]),
        Message(tensors=[torch.zeros((1,) * 9)]),
    ]:
        with pytest.raises(FrameError):
            encode_frame(Frame(Kind.MESSAGE, 1, message), small)


async def test_clean_eof_between_frames_is_connection_lost():
    with pytest.raises(ConnectionLost):
        await read_frame(stream_of(b""), LIMITS)


@pytest.mark.parametrize("where", ["mid-header", "mid-head", "mid-payload", "mid-large-payload"])
async def test_truncated_frames(where):
    meta = {"key": "value" * 10}
    tensors = [torch.randn(1 << 19)] if where == "mid-large-payload" else [torch.randn(64)]
    data = frame_bytes(Frame(Kind.REQUEST, 5, Message(meta, tensors), method="m"))
    cut = {
        "mid-header": HEADER_SIZE // 2,
        "mid-head": HEADER_SIZE + 10,
        "mid-payload": len(data) - 100,
        "mid-large-payload": len(data) // 2,
    }[where]
    with pytest.raises(FrameError, match="truncated"):
        await read_frame(stream_of(data[:cut]), LIMITS)


def header(**fields) -> bytes:
    values = dict(
        magic=b"SW",
        version=1,
        kind=2,
        method_len=0,
        n_tensors=0,
        call_id=1,
        meta_len=0,
        desc_len=0,
        payload_len=0,
    )
    values.update(fields)
    return HEADER.pack(*values.values())


@pytest.mark.parametrize(
    "fields",
    [
        dict(payload_len=1 << 40, n_tensors=1, desc_len=10),
        dict(meta_len=1 << 31),
        dict(n_tensors=200, desc_len=200 * 10),
        dict(n_tensors=1, desc_len=1 << 30),
    ],
    ids=["payload", "meta", "tensor-count", "descriptors"],
)
async def test_oversized_declarations_fail_before_reading(fields):
    # no EOF and nothing after the header: had the reader tried to allocate and read the declared sizes,
    # it would wait for data forever and the wait_for bound would fail the test
    reader = stream_of(header(**fields), eof=False)
    with pytest.raises(FrameError):
        await asyncio.wait_for(read_frame(reader, LIMITS), timeout=10)


@pytest.mark.parametrize(
    "fields,match",
    [(dict(magic=b"HT"), "magic"), (dict(version=9), "version"), (dict(kind=77), "kind")],
    ids=["magic", "version", "kind"],
)
async def test_bad_header_fields(fields, match):
    with pytest.raises(FrameError, match=match):
        await asyncio.wait_for(read_frame(stream_of(header(**fields), eof=False), LIMITS), timeout=10)


async def test_http_request_is_rejected():
    with pytest.raises(FrameError, match="magic"):
        await read_frame(stream_of(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n"), LIMITS)


def descriptor(code: int, shape: tuple[int, ...]) -> bytes:
    return struct.pack(f"<BB{len(shape)}Q", code, len(shape), *shape)


@pytest.mark.parametrize(
    "descriptors,payload_len,match",
    [
        ([descriptor(99, (4,))], 16, "unknown dtype"),
        ([descriptor(1, (4,))], 8, "need more than"),  # 4 float32 = 16 bytes declared as 8
        ([descriptor(1, (4,))], 24, "cover 16 bytes"),  # ... or as 24
        (
            [descriptor(1, (1 << 62, 1 << 62))],
            16,
            "larger than any frame",
        ),  # dims whose product overflows 64 bits
        ([descriptor(1, (0, 1 << 63))], 0, "larger than any frame"),  # empty, but not an int64 shape
        ([descriptor(1, (0, 1 << 62, 1 << 62))], 0, "larger than any frame"),  # empty, strides overflow
        ([descriptor(1, ()), descriptor(1, (1,) * 9)], 8, "9 dims"),
        ([descriptor(1, (4,))[:5]], 16, "truncated tensor shape"),
        ([descriptor(1, (4,)) + b"\x00"], 16, "stray"),
    ],
    ids=[
        "dtype",
        "short-payload",
        "long-payload",
        "huge-dims",
        "empty-huge-dim",
        "empty-huge-strides",
        "too-many-dims",
        "short-descriptor",
        "stray",
    ],
)
async def test_bad_tensor_descriptors(descriptors, payload_len, match):
    desc = b"".join(descriptors)
    fields = dict(n_tensors=len(descriptors), desc_len=len(desc), payload_len=payload_len)
    data = header(**fields) + desc + bytes(payload_len)
    with pytest.raises(FrameError, match=match):
        await read_frame(stream_of(data), LIMITS)


@pytest.mark.parametrize(
    "meta,match", [(b"\xc1", "undecodable"), (b"\x93\x01\x02\x03", "must be a map")], ids=["garbage", "list"]
)
async def test_bad_metadata(meta, match):
    with pytest.raises(FrameError, match=match):
        await read_frame(stream_of(header(meta_len=len(meta)) + meta), LIMITS)
