"""Ladder Residual: how one layer's sub-layer outputs join the residual stream, and when they are summed over
tensor-parallel ranks.

A ladder checkpoint lists its ladder layers in config.json (`"ladder_layers": [i, ...]`, read into
`BlockConfig.ladder_layers`). With r the residual stream (starting at the embeddings) and p the pending output of
the sub-layer just before (starting at none), a ladder layer computes

    a = attn(norm1(r)); r = r + p; p = a; m = mlp(norm2(r)); r = r + p; p = m

so each sub-layer reads the stream without the output of the sub-layer right before it; under tensor
parallelism that output's all-reduce then runs while the next sub-layer computes. A standard layer first settles
(r = r + p; p = none) and then runs as usual; after the last layer r = r + p before the final norm. The state
between two layers is the pair (r, p); it is r alone wherever p is none, which is every boundary except those
between two ladder layers (`BlockConfig.carries_pending`).

Owns the rule of which boundaries carry p (`carries_pending`), those per-layer functions (full-sequence, the lean
one-token form and the merged one-token form of several sessions, all over a block's own Attention and MLP
submodules) and `Comm`, the seam where tensor parallelism (models/tp.py) plugs in its all-reduces. The span loop
that strings the layers together is `BlockSpan.forward_pair` / `decode_pair` / `decode_batch_pair`.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from swarmllm.models.llama import BlockLora, DecodeSegment, LlamaBlock


def carries_pending(ladder_layers: Collection[int], boundary: int) -> bool:
    """Whether the state crossing the boundary before layer `boundary` is the pair (r, p) rather than r alone:
    only between two ladder layers. Elsewhere p is settled into r by then (a standard layer settles first, the
    model's end settles before the final norm), so a span may settle it early and hand on r alone. So the
    model's first and last boundaries (the client's embeddings and final norm) always carry r alone."""
    return boundary - 1 in ladder_layers and boundary in ladder_layers


def layer_ranges(layers: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Sorted distinct layer indices as half-open [start, end) ranges: (1, 2, 3, 7) -> ((1, 4), (7, 8)). How a
    server announces its ladder layers: short whatever the model's depth."""
    ranges: list[tuple[int, int]] = []
    for layer in layers:
        if ranges and ranges[-1][1] == layer:
            ranges[-1] = (ranges[-1][0], layer + 1)
        else:
            ranges.append((layer, layer + 1))
    return tuple(ranges)


class Comm:
    """How sub-layer outputs are summed over tensor-parallel ranks. This base class is one process: each output
    is already whole, so every method returns its input (and a span without tensor parallelism runs no extra op).

    `start(x)` launches the sum of x over the ranks and returns a handle; `wait(handle)` returns the summed
    tensor once it is there; `ready(x)` is the handle of a tensor that is already complete (a p that arrived
    from the previous span); `all_reduce(x)` is start then wait, for standard layers.
    """

    def start(self, x: Tensor) -> Any:
        return x

    def wait(self, handle: Any) -> Tensor:
        return handle

    def ready(self, x: Tensor) -> Any:
        return x

    def all_reduce(self, x: Tensor) -> Tensor:
        return self.wait(self.start(x))


LOCAL = Comm()


def ladder_forward(
    block: LlamaBlock,
    r: Tensor,
    p: Any,
    comm: Comm,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor | None,
    cache: tuple[Tensor, Tensor] | None,
    pos: int,
    lora: BlockLora,
) -> tuple[Tensor, Any]:
    """A ladder layer over r [B, T, H]; p is the handle of the previous sub-layer's output, or None.
    Returns (r, handle of this layer's MLP output, still being summed)."""
    a = comm.start(block.self_attn(block.input_layernorm(r), cos, sin, mask, cache, pos, lora))
    if p is not None:
        r = r + comm.wait(p)
    m = comm.start(block.mlp(block.post_attention_layernorm(r), lora))
    return r + comm.wait(a), m


def ladder_decode(
    block: LlamaBlock,
    r: Tensor,
    p: Any,
    comm: Comm,
    cos: Tensor,
    sin: Tensor,
    slot: Tensor,
    keys: Tensor,
    values: Tensor,
    mask: Tensor | None,
    lora: BlockLora,
) -> tuple[Tensor, Any]:
    """`ladder_forward` for one token per sequence, r [B, H], through the lean decode calls (`LlamaBlock.decode`)."""
    attn = block.self_attn.decode(block.input_layernorm.forward(r), cos, sin, slot, keys, values, mask, lora)
    a = comm.start(attn)
    if p is not None:
        r = r + comm.wait(p)
    m = comm.start(block.mlp.forward(block.post_attention_layernorm.forward(r), lora))
    return r + comm.wait(a), m


def standard_forward(
    block: LlamaBlock,
    r: Tensor,
    comm: Comm,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor | None,
    cache: tuple[Tensor, Tensor] | None,
    pos: int,
    lora: BlockLora,
) -> Tensor:
    """A standard layer with each sub-layer's output summed over the ranks before it joins r (`LlamaBlock.forward`
    with an all-reduce; without tensor parallelism the span calls the block itself)."""
    r = r + comm.all_reduce(block.self_attn(block.input_layernorm(r), cos, sin, mask, cache, pos, lora))
    return r + comm.all_reduce(block.mlp(block.post_attention_layernorm(r), lora))


def standard_decode(
    block: LlamaBlock,
    r: Tensor,
    comm: Comm,
    cos: Tensor,
    sin: Tensor,
    slot: Tensor,
    keys: Tensor,
    values: Tensor,
    mask: Tensor | None,
    lora: BlockLora,
) -> Tensor:
    """`standard_forward` for one token per sequence, r [B, H] (`LlamaBlock.decode` with an all-reduce)."""
    attn = block.self_attn.decode(block.input_layernorm.forward(r), cos, sin, slot, keys, values, mask, lora)
    r = r + comm.all_reduce(attn)
    return r + comm.all_reduce(block.mlp.forward(block.post_attention_layernorm.forward(r), lora))


def ladder_decode_batch(
    block: LlamaBlock,
    r: Tensor,
    p: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    segments: Sequence[DecodeSegment],
    n: int,
    masks: Sequence[Tensor | None],
    lora: BlockLora,
) -> tuple[Tensor, Tensor]:
    """`ladder_decode` for several sessions' rows at once (`LlamaBlock.decode_batch`'s ladder form; merged steps
    run in one process, so there is nothing to sum over ranks)."""
    a = block.self_attn.decode_batch(block.input_layernorm.forward(r), cos, sin, segments, n, masks, lora)
    if p is not None:
        r = r + p
    m = block.mlp.forward(block.post_attention_layernorm.forward(r), lora)
    return r + a, m
