"""Greedy tokens from a CPU LM head at about a quarter of its read, exactly: a screen of int8 codes finds the few
outputs that can be the largest, and only those are computed in full.

A client computes the LM head for every token it generates, and on a CPU that is mostly the read of the head's
weights (32,000 x 1,024 float32 values: 131 MB; a 128k vocabulary at hidden size 4,096 in float32: 2.1 GB). A
greedy step needs only the index of the largest logit. So the head is read as int8 codes first (a scale per
output, the row's absmax / 127, as `models.quant` makes them), and each output gets a bound on how far its full
float32 logit can be from its int8 estimate: the codes' residual r = W - codes * scale, by Cauchy-Schwarz over
groups of `GROUP_INPUTS` inputs (sum over groups of |r_g| |x_g|), plus what float32 rounding can add (of both
products, of the residual as computed here and of the comparisons: ~`(in + 5) * 2^-24 * |x| (|W| + |codes *
scale|)`). An output whose estimate plus bound is below the largest estimate minus its bound cannot be the largest;
the panels of the rest are multiplied in float32 by the same kernel as the full product, whose every output is one
FMA chain over the input in order: the same bits. The logits returned are those values and -inf elsewhere, so
their argmax, ties included (the first index), is the full product's. A handful of outputs are left: 1-18 of
32,000 on random weights, 1-3 of 49,152 (median 1) on SmolLM2-135M's head over English text
(`benchmarks/head_matmul.py`); one row then takes 1.7-1.8 ms against 5.3-7.5 for the full panels on one thread.

`argmax_logits` is for callers that take the argmax and nothing else (a greedy generate with no logits
processors, `client.model`, through `PackedCopy`'s panel copy: heads up to its 1 GiB); where the screen cannot
decide (non-finite values, more than `MAX_SHARE` of the panels left) it computes the full product. A float32 head
too large to copy is screened from its plain weight: the panels of the outputs left are made at each call (a
[128256, 4096] head, Llama 3's: one row 39 ms against 151 for the plain product on one thread).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from swarmllm.models.panels import PANEL, panel_matmul, panel_outputs, to_panels

GROUP_INPUTS = 64  # inputs per group of the residual's bound (finer groups: a tighter bound, more to read)
MAX_GROUPS = 32
MAX_SHARE = 1 / 8  # more of the panels left than this: the full product is cheaper
UNIT = 2.0**-24  # float32's unit roundoff
SLACK = 2.0**-10  # relative, on the bound: covers the bound's own float32 arithmetic
CHUNK_OUTPUTS = 4096  # outputs a screen is made of at a time (a [4096, 4096] float32 part: 64 MB a temporary)


@dataclass(frozen=True)
class Screen:
    """A head's int8 screen: codes as panels with their scales (one per panel output, the padding's 0), and the
    terms of each output's bound: per group of inputs the residual's norm, then the rounding term."""

    codes: Tensor  # [panels, in, 16] int8
    scales: Tensor  # [panels * 16] float32
    terms: Tensor  # [groups + 2, out] float32: what `bounds` multiplies the input's norms (and a 1) by
    group: int  # inputs per group

    @classmethod
    def of(cls, weight: Tensor, chunk_outputs: int = CHUNK_OUTPUTS) -> Screen | None:
        """The screen of a float32 [out, in] weight; None if it holds non-finite values (no bound holds). Made
        `chunk_outputs` outputs at a time (a multiple of 16), so that its temporaries stay small beside a head of
        gigabytes."""
        if chunk_outputs <= 0 or chunk_outputs % PANEL:
            raise ValueError(
                f"a screen is made in chunks of whole panels ({PANEL} outputs), not {chunk_outputs}"
            )
        w = weight.detach().float()
        out_features, in_features = w.shape
        groups = min(MAX_GROUPS, -(-in_features // GROUP_INPUTS))
        group = -(-in_features // groups)
        codes, scales, terms = [], [], []
        for first in range(0, out_features, chunk_outputs):
            part = _screen_part(w[first : first + chunk_outputs], groups, group)
            if part is None:
                return None
            codes.append(part[0])
            scales.append(part[1])
            terms.append(part[2])
        padded = torch.zeros(panel_outputs(out_features))
        padded[:out_features] = torch.cat(scales)
        return cls(torch.cat(codes), padded, torch.cat(terms, dim=1).contiguous(), group)

    @property
    def out_features(self) -> int:
        return self.terms.shape[1]

    def bounds(self, rows: Tensor) -> Tensor:
        """[m, out]: how far each full float32 logit of `rows` ([m, in] float32) can be from its estimate."""
        groups = self.terms.shape[0] - 2
        padded = torch.nn.functional.pad(rows.double(), (0, groups * self.group - rows.shape[1]))
        ones = torch.ones(rows.shape[0], 1, dtype=torch.float64)
        norms = torch.cat(
            [padded.view(rows.shape[0], groups, self.group).norm(dim=2), padded.norm(dim=1)[:, None], ones], 1
        )
        return (norms * (1 + SLACK)).float() @ self.terms


def _screen_part(w: Tensor, groups: int, group: int) -> tuple[Tensor, Tensor, Tensor] | None:
    """Outputs w [n, in] of a screen (n a multiple of 16 unless they are the last): their code panels, their
    scales and their bound's terms [groups + 2, n]; None if w holds non-finite values."""
    if not bool(torch.isfinite(w).all()):
        return None
    out_features, in_features = w.shape
    scale = w.abs().amax(1) / 127  # what the kernel multiplies by
    codes = torch.round(w / scale.clamp_min(torch.finfo(torch.float32).tiny)[:, None]).clamp_(-127, 127)
    estimate = codes * scale[:, None]
    residual = torch.nn.functional.pad(w - estimate, (0, groups * group - in_features))
    residual_norms = residual.view(out_features, groups, group).norm(dim=2).T  # [groups, out]
    # float32 rounding: of both products (`in` FMAs and the scale's product: gamma_(in + 2)), and of the
    # residual just computed (3 more: its product and difference, the estimate's own), each at most
    # gamma_(in + 5) |x| (|W| + |codes * scale|) by Cauchy-Schwarz; and of the comparisons (4 units of the
    # estimate, which is at most |x| |codes * scale|)
    n = in_features + 5
    w_norms, estimate_norms = w.norm(dim=1), estimate.norm(dim=1)
    last = n * UNIT / (1 - n * UNIT) * (w_norms + estimate_norms) + 4 * UNIT * estimate_norms
    # (1 + SLACK): the norms' own rounding, and that of the bound's float32 sums
    terms = torch.cat([residual_norms, last[None]]) * (1 + SLACK)
    # and, times a 1, what underflow can take: 2^-149 a product and a sum, 2^-100 in all (a normal float)
    terms = torch.cat([terms, torch.full((1, out_features), 2.0**-100)])
    return to_panels(codes.to(torch.int8)), scale, terms


def candidates(estimates: Tensor, bounds: Tensor) -> Tensor:
    """[m, out] bool: the outputs that can hold their row's largest value, each being within `bounds` of its
    estimate: those whose estimate plus bound reaches the largest estimate minus its bound."""
    floor = (estimates - bounds).amax(dim=-1, keepdim=True)
    return estimates + bounds >= floor


def argmax_logits(x: Tensor, head: Tensor, screen: Screen) -> Tensor:
    """Logits of float32 rows `x` [..., in] by a head, as `panel_matmul` gives them, for the outputs that can be a
    row's largest (and the rest of their panels), -inf elsewhere: their argmax is the full panel product's.
    head: its float32 panels [P, in, 16] (a client's panel copy), or its plain [out, in] weight (a head too large
    to copy): the panels of the outputs left are then made from it at each call, and where the screen cannot
    decide the logits are the plain product's (`F.linear`, whose sums may round differently in the last bit)."""
    out_features = screen.out_features
    rows = x.reshape(-1, x.shape[-1])
    estimates = panel_matmul(rows, screen.codes, out_features, screen.scales)
    bounds = screen.bounds(rows)
    # a non-finite input, estimate or bound (or an input so large that a sum overflows) makes this non-finite
    if rows.shape[0] == 0 or not bool(torch.isfinite(estimates.sum() + bounds.sum())):
        return _full(x, head, out_features)
    taken = torch.unique(candidates(estimates, bounds).any(dim=0).nonzero().squeeze(1) // PANEL)
    if taken.numel() > MAX_SHARE * screen.codes.shape[0]:
        return _full(x, head, out_features)
    outputs = (taken[:, None] * PANEL + torch.arange(PANEL)).view(-1)
    kept = outputs < out_features  # (the last panel's padding)
    if head.dim() == 3:
        panels = head[taken]
    else:  # the taken outputs' rows of the plain weight, as panels (the padding's rows zero)
        weight = torch.zeros(outputs.numel(), head.shape[1])
        weight[kept] = head[outputs[kept]].float()
        panels = to_panels(weight)
    exact = panel_matmul(rows, panels, taken.numel() * PANEL)
    logits = torch.full((rows.shape[0], out_features), float("-inf"))
    logits[:, outputs[kept]] = exact[:, kept]
    return logits.view(*x.shape[:-1], out_features)


def _full(x: Tensor, head: Tensor, out_features: int) -> Tensor:
    return panel_matmul(x, head, out_features) if head.dim() == 3 else torch.nn.functional.linear(x, head)
