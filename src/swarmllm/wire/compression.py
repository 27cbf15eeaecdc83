"""Compressed activations: how a session's hidden states travel (client -> server, server -> server push,
server -> client reply), chosen by the client per session (`OpenSession.compression`).

Codecs, per value of a hidden state (error against float32 measured in benchmarks/compression.py):
- "none": as computed (float32 from a float32 server or client: 4 bytes);
- "float16" / "bfloat16": cast (2 bytes); finite values beyond the type's range saturate at its largest, as
  hivemind's Float16Compression does, instead of travelling as infinities that every receiver refuses (a server's
  honest reply of massive activations would get it banned); NaN and infinities stay what they are, to be refused;
- "blockwise8": int8 codes with one bfloat16 scale per BLOCK consecutive values of a token's hidden state
  (absmax / 127, symmetric rounding): 1 + 2 / BLOCK bytes, about half of float16. Blocks never cross tokens, so
  one outlier dimension costs precision in its own block only.

`compress` returns the tensors that go on the wire (the codes and, for blockwise8, the scales); `decompress`
gives float32 back. Compressing what `decompress` returned gives the same codes again, so a client that resends
a server's (decompressed) output after a failed push sends exactly what the push carried. This module knows
nothing about messages: `wire.messages` lays the tensors out.
"""

from __future__ import annotations

import torch
from torch import Tensor

CODECS = ("none", "float16", "bfloat16", "blockwise8")
BLOCK = 64  # values per blockwise8 scale
_CAST = {"float16": torch.float16, "bfloat16": torch.bfloat16}
_SCALE_DTYPE = torch.bfloat16  # float32's range: no overflow for huge activations, no underflow for tiny ones


def check_codec(codec: str) -> str:
    if codec not in CODECS:
        raise ValueError(f"unknown activation compression {codec!r}; use one of {CODECS}")
    return codec


def scale_blocks(hidden_size: int) -> int:
    """Scales per token of blockwise8 (the last block may be shorter)."""
    return -(-hidden_size // BLOCK)


def compress(hidden: Tensor, codec: str) -> tuple[Tensor, Tensor | None]:
    """hidden [..., H] as (values, scales or None) for the wire."""
    if codec == "none":
        return hidden, None
    if codec in _CAST:
        return _saturated(hidden, _CAST[codec]), None
    if codec != "blockwise8":
        raise ValueError(f"unknown activation compression {codec!r}")
    blocks = _blocks(hidden.float())  # [..., n, BLOCK]
    scales = (blocks.abs().amax(-1) / 127).to(_SCALE_DTYPE)  # [..., n]
    # an all-zero block (or one too small for a bfloat16 scale) has scale 0 and codes 0, whatever it is divided by;
    # any other block is divided by its own scale, however tiny (a floor on it would shrink tiny blocks' values)
    divisor = scales.float()
    divisor = torch.where(divisor > 0, divisor, 1.0)
    codes = (blocks / divisor[..., None]).round_().clamp_(-127, 127)
    codes = codes.to(torch.int8).flatten(-2)[..., : hidden.shape[-1]]
    return codes.contiguous(), scales


def decompress(values: Tensor, scales: Tensor | None) -> Tensor:
    """The float32 hidden states that `compress` encoded as (values, scales)."""
    if scales is None:
        return values.float()
    blocks = _blocks(values.float())
    return (blocks * scales.float()[..., None]).flatten(-2)[..., : values.shape[-1]]


def bytes_per_value(codec: str, source_dtype: torch.dtype = torch.float32) -> float:
    """Wire bytes per value of a hidden state (`source_dtype`: what "none" sends)."""
    if codec == "none":
        return source_dtype.itemsize
    if codec in _CAST:
        return _CAST[codec].itemsize
    return 1 + _SCALE_DTYPE.itemsize / BLOCK


def _saturated(hidden: Tensor, dtype: torch.dtype) -> Tensor:
    """hidden cast to dtype, its finite values beyond dtype's range at dtype's largest (see the module doc)."""
    top = torch.finfo(dtype).max
    if torch.finfo(hidden.dtype).max <= top:
        return hidden.to(dtype)
    wide = hidden.float()  # (a bfloat16 state cannot hold float16's largest value: it would round up past it)
    return torch.where(wide.isinf(), wide, wide.clamp(-top, top)).to(dtype)


def _blocks(x: Tensor) -> Tensor:
    """x [..., H] as [..., ceil(H / BLOCK), BLOCK], zero-padded."""
    pad = -x.shape[-1] % BLOCK
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.unflatten(-1, (-1, BLOCK))
