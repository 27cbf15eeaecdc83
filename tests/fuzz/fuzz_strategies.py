"""Hypothesis strategies shared by the fuzz tests: msgpack-able metadata, tensors of any dtype and shape, encoded
frames of every RPC and ways to damage them.

Tensors are drawn as a recipe (dtype, shape, fill) and built with torch, which is far cheaper than drawing every
element; the fill covers NaN, infinity, zeros and random values.
"""

from __future__ import annotations

import struct

import torch
from hypothesis import strategies as st

from swarmllm.wire import Frame, Kind, Message, encode_frame
from swarmllm.wire.messages import (
    ForwardRequest,
    OpenSession,
    PushTarget,
    Repoint,
    Step,
    StepError,
    StepReply,
)

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
# the header layout, restated as the spec: magic, version, kind, method_len, n_tensors, call_id, meta_len,
# desc_len, payload_len
HEADER = struct.Struct("<2sBBBBQIIQ")
HEADER_FIELD_BITS = [None, 8, 8, 8, 8, 64, 32, 32, 64]  # None: the 2-byte magic
METHODS = ["info", "ping", "room", "forward", "inference", "push"]
FILLS = ["randn", "zeros", "nan", "inf", "-inf", "huge"]

# metadata: every msgpack type, nested; ints span the whole msgpack range
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
    | st.binary(max_size=20)
)
meta_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=5,
)
# values that break naive checks, drawn in one step: generating structured values costs ~1 ms each, too slow
# for tens of thousands of messages, so these carry most of the batches and `meta_values` the rest
TRICKY = [
    None,
    True,
    False,
    0,
    1,
    -1,
    2,
    3,
    4,
    5,
    8,
    16,
    31,
    32,
    33,
    2**31,
    2**63 - 1,
    2**63,
    2**64 - 1,
    -(2**63),
    0.0,
    0.5,
    -1.5,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "0",
    "step",
    "repoint",
    "x" * 16,
    "é" * 40,
    "x" * 200,
    b"",
    b"\x00" * 16,
    [],
    [0],
    [[[[]]]],
    {},
    {"a": None},
    {"peer_id": 1},
    [{"peer_id": "Qm", "session_id": "s" * 16}],
    [{"peer_id": "Qm"}],
    {0: 1},
]
tricky = st.sampled_from(TRICKY)
values = st.one_of([tricky] * 7 + [meta_values])


def metas(keys: list[str], fields: dict[str, st.SearchStrategy] | None = None) -> st.SearchStrategy[dict]:
    """Dicts over the fields a message should have (each may be missing, of the given strategy or of any type)
    and sometimes a stray one."""
    fields = fields or {}
    known = st.fixed_dictionaries({}, optional={key: fields.get(key, values) | values for key in keys})
    stray = st.just({}) | st.just({}) | st.dictionaries(st.text(max_size=12), values, max_size=2)
    return st.builds(lambda a, b: {**b, **a}, known, stray)


@st.composite
def tensor_recipes(draw, hidden: int = 64, *, max_dim: int = 6) -> tuple[torch.dtype, tuple[int, ...], str]:
    """A tensor to build: a third of them valid activations [batch, length, hidden], a third near that (wrong
    dtype, size, fill), a third of any shape."""
    how = draw(st.sampled_from(["valid", "near", "any"]))
    if how == "valid":
        dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
        return dtype, (draw(st.integers(1, 2)), draw(st.integers(1, max_dim)), hidden), "randn"
    dtype = draw(st.sampled_from(DTYPES))
    if how == "near":
        shape = (
            draw(st.integers(0, 3)),
            draw(st.integers(0, max_dim)),
            draw(st.sampled_from([hidden, hidden, hidden - 1, hidden + 1, 0, 1])),
        )
    else:
        shape = tuple(draw(st.lists(st.integers(0, max_dim), max_size=4)))
    return dtype, shape, draw(st.sampled_from(FILLS))


def build_tensor(recipe: tuple[torch.dtype, tuple[int, ...], str], seed: int = 0) -> torch.Tensor:
    dtype, shape, fill = recipe
    if dtype is torch.bool:
        return (
            torch.ones(shape, dtype=torch.bool) if fill == "randn" else torch.zeros(shape, dtype=torch.bool)
        )
    if not dtype.is_floating_point:
        return torch.full(shape, seed % 7, dtype=dtype)
    if fill == "randn":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    value = {"zeros": 0.0, "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "huge": 3e38}[
        fill
    ]
    return torch.full(shape, value).to(dtype)  # 3e38 overflows to inf in float16, stays finite in bfloat16


def seed_frames(hidden: int = 64) -> list[Frame]:
    """One valid frame of every kind of message the RPCs carry, to damage."""
    x = torch.randn(1, 3, hidden)
    mask = torch.ones(1, 3, dtype=torch.bool)
    push = [PushTarget("Qm" + "a" * 44, "s" * 24)]
    return [
        Frame(Kind.REQUEST, 1, Message(), "info"),
        Frame(Kind.REQUEST, 2, Message(tensors=[torch.zeros(100, dtype=torch.uint8)]), "ping"),
        Frame(Kind.REQUEST, 3, ForwardRequest(0, 4, x, mask).to_message(), "forward"),
        Frame(Kind.REQUEST, 4, OpenSession(0, 4, 1, 8, "t" * 24, "Qm" + "b" * 44).to_message(), "inference"),
        Frame(Kind.MESSAGE, 4, Step(0, x, mask, 1, push, 2.5).to_message()),
        Frame(Kind.MESSAGE, 4, Repoint("Qm" + "c" * 44).to_message()),
        Frame(Kind.REQUEST, 5, Step(3, x[:, :1], step=2, session_id="t" * 24).to_message(), "push"),
        Frame(Kind.MESSAGE, 4, StepReply(0, 1, x, 0.001, True).to_message()),
        Frame(Kind.MESSAGE, 4, StepError("bad_request", "no").to_message()),
        Frame(Kind.REPLY, 3, Message({}, [x])),
        Frame(Kind.END, 4, Message()),
        Frame(Kind.ERROR, 0, Message({"code": "bad_frame", "message": "x"})),
    ]


def frame_bytes(frame: Frame) -> bytes:
    return b"".join(bytes(part) for part in encode_frame(frame))


@st.composite
def damaged(draw, data: bytes) -> bytes:
    """`data` with bits flipped, a header field replaced, cut short, or with bytes added."""
    how = draw(st.sampled_from(["flip", "field", "truncate", "extend", "splice"]))
    out = bytearray(data)
    if how == "flip":
        for pos in draw(st.lists(st.integers(0, len(out) * 8 - 1), min_size=1, max_size=8)):
            out[pos // 8] ^= 1 << (pos % 8)
    elif how == "field":
        fields = list(HEADER.unpack_from(out))
        index = draw(st.integers(0, len(fields) - 1))
        bits = HEADER_FIELD_BITS[index]
        fields[index] = (
            draw(st.binary(min_size=2, max_size=2)) if bits is None else draw(st.integers(0, 2**bits - 1))
        )
        out[: HEADER.size] = HEADER.pack(*fields)
    elif how == "truncate":
        del out[draw(st.integers(0, len(out) - 1)) :]
    elif how == "extend":
        out += draw(st.binary(min_size=1, max_size=64))
    else:
        at = draw(st.integers(0, len(out)))
        out[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(out)


def descriptor(code: int, shape: tuple[int, ...]) -> bytes:
    return struct.pack(f"<BB{len(shape)}Q", code, len(shape), *shape)


@st.composite
def handmade_frames(draw) -> bytes:
    """A valid header with random but self-consistent sizes, random descriptors (huge dims included), nested
    msgpack and a payload that may be shorter than declared."""
    method = draw(st.sampled_from(METHODS + ["", "nope"])).encode()
    meta = draw(
        st.sampled_from([b"", b"\x80", b"\x91" * 2000 + b"\xc0", b"\x81\xa1a" * 500, b"\xdd\xff\xff\xff\xff"])
    )
    meta = meta or draw(st.binary(max_size=40))
    n = draw(st.integers(0, 3))
    dims = st.integers(0, 4) | st.sampled_from([2**31, 2**32, 2**62, 2**63, 2**64 - 1])
    descs = b"".join(
        descriptor(draw(st.integers(0, 12)), tuple(draw(st.lists(dims, max_size=9)))) for _ in range(n)
    )
    payload_len = draw(st.integers(0, 256) | st.sampled_from([2**20 + 1, 2**30, 2**30 + 1, 2**64 - 1]))
    payload = draw(st.binary(max_size=min(payload_len, 512)))
    kind = draw(st.integers(0, 6))
    header = HEADER.pack(
        b"SW", 1, kind, len(method), n, draw(st.integers(0, 9)), len(meta), len(descs), payload_len
    )
    return header + method + meta + descs + payload
