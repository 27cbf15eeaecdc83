"""Spot checks of untrusted servers, as pure functions: which steps are checked, how far two servers' outputs
may differ before one of them is wrong, and which one is, given several opinions.

A client checks a random `fraction` of its hops' steps (and of a training backward's hops, whose input and
adapter gradients are compared as `Gradients`) by computing the same blocks on the same inputs on other
servers. Honest servers differ only by floating-point noise (other kernels, another dtype, another thread count),
so outputs are compared per token by their relative L2 distance, `mismatch`, against a tolerance that depends on
the coarsest dtype involved (`tolerance`). A server that corrupts a fraction `corrupt_rate` of its outputs is
caught after n steps with probability 1 - (1 - fraction * corrupt_rate)^n (`detection_odds`); `steps_to_catch`
plays one seeded run of that, step by step, for the benchmark.

What this does not catch: a change smaller than the tolerance (a few percent of a hidden state's norm in half
precision), a corruption on a step that is not checked, and several colluding servers that all answer the same
wrong output (they win the vote).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

T = TypeVar("T")

# the most two honest servers' outputs may differ, relative to the output's norm, per token. float32 servers
# differ by kernel order only (~1e-6 after a span of blocks); half precision rounds every op to 8 (bfloat16) or
# 11 (float16) mantissa bits, which grows over a span and a session (measured: benchmarks/spot_checks.py, up to
# 0.039 for bfloat16 over 128-token sessions of a 6-block model). Quantized weights differ from full precision
# by far more (tests/models/test_quant.py, over 4 tiny random blocks: int8 up to 0.05, nf4 up to 0.75): against an
# nf4 server a spot check catches only gross corruption
TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1, "int8": 0.15, "nf4": 1.0}
UNKNOWN_DTYPE_TOLERANCE = TOLERANCE["bfloat16"]
# what compressing a server's output for the wire adds (wire.compression; measured in benchmarks/compression.py)
COMPRESSION_TOLERANCE = {"none": 0.0, "float16": 2e-3, "bfloat16": 1e-2, "blockwise8": 5e-2}


def tolerance(dtypes: Sequence[str], compression: str = "none") -> float:
    """The tolerance for comparing outputs of servers computing in these dtypes, one of which came over the wire
    compressed with `compression`: the coarsest dtype's, plus the codec's error."""
    coarsest = max(
        (TOLERANCE.get(d, UNKNOWN_DTYPE_TOLERANCE) for d in dtypes), default=UNKNOWN_DTYPE_TOLERANCE
    )
    return coarsest + COMPRESSION_TOLERANCE.get(compression, max(COMPRESSION_TOLERANCE.values()))


def mismatch(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-token relative L2 distance between two [batch, tokens, hidden] outputs (0 = equal)."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.float(), b.float()
    scale = torch.maximum(a.norm(dim=-1), b.norm(dim=-1)).clamp_min(1e-12)
    return float(((a - b).norm(dim=-1) / scale).max()) if a.numel() else 0.0


def should_check(rng: random.Random, fraction: float) -> bool:
    """Whether to spot-check this step (one draw per hop and step)."""
    return fraction > 0 and rng.random() < fraction


def judge(outputs: Sequence[T], tol: float, distance: Callable[[T, T], float] = mismatch) -> list[int]:
    """Which of several opinions on the same computation are wrong: those that agree with no other opinion
    (`distance` at most `tol`). When no two agree, all of them are (nobody can be trusted: with two opinions, a
    disagreement always ends so). The first opinion is usually the checked server's, the others its
    checkers'."""
    agrees = [
        any(i != j and distance(outputs[i], outputs[j]) <= tol for j in range(len(outputs)))
        for i in range(len(outputs))
    ]
    return [i for i, ok in enumerate(agrees) if not ok]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """The relative L2 distance between two tensors as wholes (0 = equal)."""
    if a.shape != b.shape:
        return float("inf")
    a, b = a.float(), b.float()
    return float((a - b).norm() / torch.maximum(a.norm(), b.norm()).clamp_min(1e-12))


@dataclass(frozen=True)
class Gradients:
    """What a backward of a span answers, as one opinion for a spot check: the gradient of its input [B, T, H]
    (with p's beside r's where the pair crosses), of the deep prompts of its blocks (or None), of the adapter's
    tensors of its layers."""

    hidden: torch.Tensor
    prompts: torch.Tensor | None
    lora: dict[str, torch.Tensor]

    @staticmethod
    def distance(a: Gradients, b: Gradients) -> float:
        """The largest of: the input gradients' per-token distance (`mismatch`), and the relative distances of
        the prompts' and of the adapter's gradients (infinite when they do not cover the same tensors)."""
        if (a.prompts is None) != (b.prompts is None) or set(a.lora) != set(b.lora):
            return float("inf")
        parts = [mismatch(a.hidden, b.hidden)]
        if a.prompts is not None:
            parts.append(relative(a.prompts, b.prompts))
        if a.lora:
            names = sorted(a.lora)
            flat = [torch.cat([g[n].float().flatten() for n in names]) for g in (a.lora, b.lora)]
            parts.append(relative(*flat))
        return max(parts)


def detection_odds(fraction: float, corrupt_rate: float, steps: int) -> float:
    """The probability that a server corrupting each output with probability `corrupt_rate` is caught within
    `steps` steps when each step is checked with probability `fraction`."""
    return 1.0 - (1.0 - fraction * corrupt_rate) ** steps


def steps_to_catch(
    rng: random.Random, fraction: float, corrupted: Sequence[bool] | None, corrupt_rate: float, max_steps: int
) -> int | None:
    """One seeded run: the step (from 1) at which the client first checks a corrupted output, or None within
    `max_steps`. Corruption either follows `corrupted` (a fixed pattern, repeated) or happens at random with
    probability `corrupt_rate`; the checks are the client's own `should_check` draws."""
    for step in range(1, max_steps + 1):
        bad = corrupted[(step - 1) % len(corrupted)] if corrupted else rng.random() < corrupt_rate
        if should_check(rng, fraction) and bad:
            return step
    return None
