"""Projections whose weights are stored in oneDNN's blocked layout, for a server's CPU blocks where our own panel
kernel cannot run (`models.panels`, which `pack_block` prefers: faster at every row count).

With the weight in PyTorch's plain layout, the CPU matmul (MKL) costs 1.5-2.5x as much for 2-16 rows as for
one: it repacks the weight on every call. Reordered once, at load, for oneDNN's own kernels
(`torch.ops.mkldnn._reorder_linear_weight`, what Inductor's frozen CPU graphs use), a float32 weight serves one
row ~20% faster than the plain layout when laid out for one row, and 8 rows in ~1.3x one row's time when laid
out for many (measured in `benchmarks/RESULTS.md`). In float32 no one layout is best for both, so a server's
projections follow its load: laid out for one row while its decode steps carry one session, for `MANY_ROWS`
while it merges several (continuous batching), switched by `layout_for` over its recent steps. In bfloat16 the
layout for many rows is as fast for one row as the other, so it is kept.

Each oneDNN call costs ~12 us more than a plain `F.linear`, so only weights of at least `MIN_PACKED_ELEMENTS`
values are packed (at hidden size 64 that overhead would double a matmul). `PackedProjection` keeps
`Projection`'s interface, `forward(x, lora)`: an adapter adds its update on top as on a plain projection, and the
input's gradient (fine-tuning through frozen servers) is computed from the plain weight recovered for the
backward pass, so the packed weight is the only copy held.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from swarmllm.models.llama import LlamaBlock, Lora, Projection, RowLoras
from swarmllm.models.panels import MIN_PANEL_ELEMENTS, PANEL_DTYPES, PanelProjection, kernel, panel_outputs
from swarmllm.models.screen import Screen, argmax_logits

logger = logging.getLogger(__name__)

MIN_PACKED_ELEMENTS = 1 << 20  # e.g. 1024 x 1024: ~0.3 ms a row in float32 on one core
ONE_ROW, MANY_ROWS = 1, 16  # the row counts a weight is laid out for
PACKED_DTYPES = (torch.float32, torch.bfloat16)
MERGED_SHARE_UP, MERGED_SHARE_DOWN = 0.5, 0.2  # hysteresis of `layout_for`
MAX_COPY_BYTES = 1 << 30  # the largest head a client copies packed (a [32000, 4096] float32 head is 0.5 GiB)


def can_pack(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether this PyTorch build packs weights of `dtype` on `device` (CPU builds with oneDNN; bfloat16 only on
    CPUs whose instructions oneDNN needs for it, AVX-512 or AVX-NE-CONVERT: an AVX2-only CPU refuses)."""
    if (
        torch.device(device).type != "cpu"
        or dtype not in PACKED_DTYPES
        or not torch.backends.mkldnn.is_available()
    ):
        return False
    return dtype != torch.bfloat16 or torch.ops.mkldnn._is_mkldnn_bf16_supported()


def initial_rows(dtype: torch.dtype) -> int:
    """The layout a weight of `dtype` starts in: one row in float32 (a lone session), else many (as fast)."""
    return ONE_ROW if dtype == torch.float32 else MANY_ROWS


def layout_for(recent_rows: Sequence[int], current: int) -> int:
    """The row count to lay float32 weights out for, given the rows of the recent decode steps: many once at
    least half of them merged several rows, one once at most a fifth did, else unchanged (no flapping)."""
    if not recent_rows:
        return current
    merged = sum(rows > 1 for rows in recent_rows) / len(recent_rows)
    if merged >= MERGED_SHARE_UP:
        return MANY_ROWS
    if merged <= MERGED_SHARE_DOWN:
        return ONE_ROW
    return current


def _reorder(weight: Tensor, rows: int) -> Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight, rows)


class _PackedLinear(torch.autograd.Function):
    """y = x W^T + b with W packed; backward gives x's gradient only (server weights are frozen)."""

    @staticmethod
    def forward(ctx, x: Tensor, packed: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(packed)
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad: Tensor):
        (packed,) = ctx.saved_tensors
        return grad @ packed.to_dense(), None, None


class PackedProjection(nn.Module):
    """A `Projection` whose weight is stored packed for oneDNN, laid out for `rows` rows (see the module doc)."""

    def __init__(self, packed: Tensor, bias: Tensor | None, rows: int):
        super().__init__()
        self.register_buffer("packed", packed)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.rows = rows

    @classmethod
    def from_projection(cls, projection: Projection | nn.Linear, rows: int) -> PackedProjection:
        bias = None if projection.bias is None else projection.bias.detach()
        return cls(_reorder(projection.weight.detach(), rows), bias, rows)

    @property
    def weight(self) -> Tensor:
        """The plain [out, in] weight (a copy: for inspection and tests, not for the hot path)."""
        return self.packed.to_dense()

    def repack(self, rows: int) -> None:
        """Lay the weight out for `rows` rows. A step running meanwhile (on another thread) keeps the old one."""
        if rows != self.rows:
            self.packed, self.rows = _reorder(self.packed.to_dense(), rows), rows

    def forward(self, x: Tensor, lora: Lora | RowLoras | None = None) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            y = _PackedLinear.apply(x, self.packed, self.bias)
        else:
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y if lora is None else y + lora(x)


class PackedCopy:
    """`packed(linear, x)`: `linear(x)` without gradients, through a copy of `linear`'s weight in a faster layout:
    a CPU client's LM head. In PyTorch's plain layout the head's matmul costs one row's time per row (a [32000,
    1024] float32 head: 6.4 ms for 1 row, 24 for 4 on one thread) and one thread whatever the threads: copied,
    the rows of concurrent generates merged into one call (`client/heads.py`) share one read of the weight and
    a lone row runs on every thread (`benchmarks/head_matmul.py`). A float32 head is copied as panels for our
    kernel where it runs (`models.panels`: 4.7 ms for 1 row and 7.1 for 8 on 2 threads); otherwise packed for
    oneDNN (3.7-5.6 and 9.2 ms), laid out as `layout_for` says over the rows of its recent calls, as a server's
    projections are.

    `argmax_logits(linear, x)` is for a greedy step, which takes each row's argmax and nothing else: a float32
    panel copy is then read through its int8 screen (`models.screen`: a quarter of the bytes, then the few
    outputs that can be the largest in full), with the same argmax.

    The copy is made at the first call and again when the weight is replaced, changed in place or given other data
    (the screen at the first `argmax_logits` call after that). A trainable head is never copied: a fused optimizer
    (transformers' Trainer's default) changes it in place without bumping its version counter, so a copy would go
    stale. It costs the head's size again, and the screen a quarter more (the plain weight stays: the embeddings may
    share it, training reads it), so a head over `max_copy_bytes` is not copied; nor is one that can't be packed (a
    GPU, float16, a small head): those are `linear(x)`. A float32 head too large to copy still gets its screen for
    greedy steps, up to `max_copy_bytes` of codes (a 128k vocabulary at hidden size 4,096: 0.5 GB of codes for a 2.1
    GB head), the panels of the outputs it leaves made from the plain weight at each call
    (`models.screen.argmax_logits`).
    """

    def __init__(self, history: int = 16, max_copy_bytes: int = MAX_COPY_BYTES) -> None:
        self.max_copy_bytes = max_copy_bytes
        self._copy: PackedProjection | PanelProjection | None = None
        # what it was packed from: holding the weight keeps a new one from taking its place at the same address
        self._weight: Tensor | None = None
        self._stamp: tuple = ()  # `_stamp` of the weight then
        self._lock = threading.Lock()
        self._recent: deque[int] = deque(maxlen=history)  # rows of the recent calls
        self._screen: Screen | None = None  # of the panel copy, once a greedy step asked for it
        self._screened = False  # whether `_screen` is made for the current copy (None: it can't be)
        self.screened_calls = 0  # `argmax_logits` calls that went through the screen: for tests

    def __call__(self, linear: nn.Linear, x: Tensor) -> Tensor:
        if not self._copied(linear, x):
            return linear(x)
        if _panel_head(linear):  # panels: one layout for any rows
            with self._lock:  # one thread makes it (~0.3 s for 131 MB under load), the others wait for it
                panels = self._panels(linear)
            return panels(x)
        weight = linear.weight
        with self._lock:
            # (a panel copy: the head was float32 before `model.to(torch.bfloat16)`)
            copy = self._copy if isinstance(self._copy, PackedProjection) else None
            stale = copy is None or self._changed(weight)
            self._recent.append(x.numel() // x.shape[-1])
            current = copy.rows if copy is not None else initial_rows(weight.dtype)
            if weight.dtype != torch.float32:
                rows = MANY_ROWS
            else:  # re-laid only once its history is whole (a generate's first call, its prompt, is no sign)
                full = len(self._recent) == self._recent.maxlen
                rows = layout_for(self._recent, current) if full else current
            if stale or copy.rows != rows:
                copy = self._copy = PackedProjection.from_projection(linear, rows)
                self._weight, self._stamp = weight, _stamp(weight)
        return copy(x)

    def argmax_logits(self, linear: nn.Linear, x: Tensor) -> Tensor:
        """`linear(x)` where only each row's argmax counts: -inf at outputs that cannot be the largest."""
        alone = self._screened_alone(linear, x)
        if not alone and (not self._copied(linear, x) or not _panel_head(linear)):
            return self(linear, x)
        with self._lock:
            if alone:  # too large to copy: the outputs the screen leaves are read from the plain weight
                self._without_copy(linear)
                full, head = linear, linear.weight.detach()
            else:
                full = self._panels(linear)
                head = full.panels
            # once a weight: ~0.4 s for 131 MB, ~12 s for Llama 3's 2.1 GB on a slow core (said: it holds a step)
            if not self._screened:
                codes = linear.weight.numel() >> 20
                logger.info("making the LM head's int8 screen for greedy steps (%d MB of codes)", codes)
                self._screen, self._screened = Screen.of(linear.weight), True  # (None: non-finite weights)
            screen = self._screen
            self.screened_calls += screen is not None
        return full(x) if screen is None else argmax_logits(x, head, screen)

    def _copied(self, linear: nn.Linear, x: Tensor) -> bool:
        """Whether `linear(x)` goes through a copy: without gradients, a large head that fits and can be packed."""
        weight = linear.weight
        return not (
            _wants_grad(weight, x)
            or weight.numel() < MIN_PACKED_ELEMENTS
            or weight.numel() * weight.element_size() > self.max_copy_bytes
            or x.dtype != weight.dtype
            or not can_pack(weight.device, weight.dtype)
        )

    def _screened_alone(self, linear: nn.Linear, x: Tensor) -> bool:
        """Whether a greedy step of `linear` goes through a screen without a copy: a float32 CPU head too large to
        copy, whose codes (a quarter of it) fit, without gradients, where the panel kernel runs."""
        weight = linear.weight
        size = weight.numel() * weight.element_size()
        return (
            not _wants_grad(weight, x)
            and weight.dtype == x.dtype == torch.float32
            and weight.device.type == "cpu"
            and linear.bias is None
            and self.max_copy_bytes < size <= 4 * self.max_copy_bytes
            and kernel() is not None
        )

    def _without_copy(self, linear: nn.Linear) -> None:
        """Under the lock: no copy for `linear`, whose screen is made anew if its weight changed."""
        weight = linear.weight
        if self._copy is not None or self._changed(weight):
            self._copy, self._weight, self._stamp = None, weight, _stamp(weight)
            self._screen, self._screened = None, False

    def _panels(self, linear: nn.Linear) -> PanelProjection:
        """Under the lock: the panel copy of `linear`'s current weight, made anew if it changed."""
        weight = linear.weight
        if self._changed(weight) or not isinstance(self._copy, PanelProjection):
            self._copy = PanelProjection.from_projection(linear)
            self._weight, self._stamp = weight, _stamp(weight)
            self._screen, self._screened = None, False
        return self._copy

    def _changed(self, weight: Tensor) -> bool:
        """Whether `weight` is not what the copy was made from: another tensor, or the same one changed in
        place or given other data (transformers' `resize_token_embeddings` swaps a Parameter's `.data`, which
        leaves its version counter as it was)."""
        return self._weight is not weight or self._stamp != _stamp(weight)

    @property
    def rows(self) -> int | None:
        """The row count a oneDNN copy is laid out for (None before one is made, or for panels): for tests."""
        return getattr(self._copy, "rows", None)


def _stamp(weight: Tensor) -> tuple:
    """What changes when a tensor does: its version counter (in place), its data's address and shape (`.data`
    swapped)."""
    return weight._version, weight.data_ptr(), weight.shape


def _panel_head(linear: nn.Linear) -> bool:
    """Whether `PackedCopy` copies this head as panels (float32, where our kernel runs), not for oneDNN."""
    return linear.weight.dtype == torch.float32 and kernel() is not None


def pack_block(block: LlamaBlock) -> LlamaBlock:
    """Store the block's large plain CPU projections in place for faster kernels: as panels for our own kernel
    where it runs here (`models.panels`: float32, bfloat16 and float16; faster than oneDNN at every row count, in
    one layout), else packed for oneDNN where `can_pack` (quantized and small ones stay)."""
    for parent in (block.self_attn, block.mlp):
        for name, child in list(parent.named_children()):
            weight = child.weight if isinstance(child, Projection) else None
            if weight is None:
                continue
            kind = packed_kind(weight.numel(), weight.dtype, weight.device)
            if kind is PanelProjection:
                setattr(parent, name, PanelProjection.from_projection(child))
            elif kind is PackedProjection:
                setattr(parent, name, PackedProjection.from_projection(child, initial_rows(weight.dtype)))
    return block


def packed_kind(numel: int, dtype: torch.dtype, device: torch.device | str) -> type[nn.Module] | None:
    """What `pack_block` stores a plain projection of `numel` weights as: panels where our kernel runs here, else
    oneDNN's layout where `can_pack` (each for large weights only); None: it stays as it is."""
    panels = torch.device(device).type == "cpu" and dtype in PANEL_DTYPES and kernel() is not None
    if panels and numel >= MIN_PANEL_ELEMENTS:
        return PanelProjection
    if not panels and numel >= MIN_PACKED_ELEMENTS and can_pack(device, dtype):
        return PackedProjection
    return None


def packed_weight_bytes(
    out_features: int, in_features: int, dtype: torch.dtype, device: torch.device | str
) -> int:
    """Bytes a plain [out, in] weight takes once `pack_block` stored it: as panels its outputs are padded to whole
    panels; oneDNN's layout is counted as the plain one."""
    panels = packed_kind(out_features * in_features, dtype, device) is PanelProjection
    return (panel_outputs(out_features) if panels else out_features) * in_features * dtype.itemsize


def packed_projections(module: nn.Module) -> list[PackedProjection]:
    return [m for m in module.modules() if isinstance(m, PackedProjection)]


def _wants_grad(weight: Tensor, x: Tensor) -> bool:
    """Whether `weight` is trained, or a product with `x` is recorded for a backward: a copy or screen would not
    carry the gradient, and would not see a fused optimizer's step (it bumps no version counter)."""
    return weight.requires_grad or (torch.is_grad_enabled() and x.requires_grad)
