"""Which blocks a joining server should hold: pure functions over the spans already in the swarm.

The swarm serves a request only as fast as its weakest block (the bottleneck: the least total throughput of the
servers holding one block), so a joining server takes the window that raises that minimum the most. This module
owns the per-block load (`BlockLoad`), the bottleneck and the choice of a window; whether a server already in
the swarm should move lives in `moves.py`, the best any arrangement can do in `optimum.py`. No networking.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_REL_TOL = 1e-9  # throughputs this close count as equal (sums in another order differ in the last bits)


@dataclass
class BlockLoad:
    """Per block: the summed throughput and the number of servers holding it (counts tell "uncovered" exactly,
    where a float total may keep a rounding residue after a server leaves)."""

    totals: list[float]
    holders: list[int]

    @classmethod
    def from_spans(cls, num_blocks: int, spans: Iterable[tuple[int, int, float]]) -> BlockLoad:
        load = cls([0.0] * num_blocks, [0] * num_blocks)
        for start, end, throughput in spans:
            load.add(start, end, throughput)
        return load

    def add(self, start: int, end: int, throughput: float, sign: int = 1) -> None:
        first, step = max(start, 0), sign * throughput
        last = max(first, min(end, len(self.totals)))  # an empty slice, never a negative index, if end <= 0
        self.totals[first:last] = [total + step for total in self.totals[first:last]]
        self.holders[first:last] = [count + sign for count in self.holders[first:last]]

    def remove(self, start: int, end: int, throughput: float) -> None:
        self.add(start, end, throughput, sign=-1)

    def values(self) -> list[float]:
        """The totals, with exactly 0 where no server is left (a float total may keep a rounding residue)."""
        if self.covered:
            return list(self.totals)
        return [t if h > 0 else 0.0 for t, h in zip(self.totals, self.holders)]

    def copy(self) -> BlockLoad:
        return BlockLoad(list(self.totals), list(self.holders))

    @property
    def bottleneck(self) -> float:
        """The swarm's throughput: its weakest block's (0 while a block has no server)."""
        return min(self.values(), default=0.0)

    @property
    def uncovered(self) -> int:
        return 0 if self.covered else sum(1 for count in self.holders if count <= 0)

    @property
    def covered(self) -> bool:
        """Whether every block has a server (the common case, checked first since it is cheap)."""
        return min(self.holders, default=1) > 0


def block_throughputs(num_blocks: int, spans: Iterable[tuple[int, int, float]]) -> list[float]:
    """Total announced throughput per block, from (start, end, throughput) of every live server."""
    return BlockLoad.from_spans(num_blocks, spans).totals


def swarm_bottleneck(num_blocks: int, spans: Iterable[tuple[int, int, float]]) -> float:
    """The least total throughput over the blocks (0 if a block has no server): what the swarm can serve."""
    return BlockLoad.from_spans(num_blocks, spans).bottleneck


def choose_blocks(
    num_blocks: int,
    span_length: int,
    spans: Iterable[tuple[int, int, float]],
    *,
    throughput: float | None = None,
    rng: random.Random | None = None,
) -> tuple[int, int]:
    """The window of `span_length` blocks that lifts the swarm's weakest blocks the most.

    Windows are compared by their sorted per-block throughput, smallest first, so a window containing an
    uncovered block always wins, and ties go to the earliest window. This is also the window that raises the
    bottleneck most, whatever the joiner's throughput (the smallest sorted window leaves the largest sorted rest).
    With `rng`, the joiner instead picks at random among the windows that reach the best bottleneck with its
    `throughput` and hold the weakest block any of them holds, so that servers joining at the same moment,
    which see the same swarm, spread out.
    """
    if not 0 < span_length <= num_blocks:
        raise ValueError(f"cannot hold {span_length} of {num_blocks} blocks")
    load = BlockLoad.from_spans(num_blocks, spans)
    start = choose_start(load, span_length, throughput=throughput, rng=rng)
    return start, start + span_length


def choose_start(
    load: BlockLoad,
    span_length: int,
    *,
    throughput: float | None = None,
    rng: random.Random | None = None,
    keep: tuple[int, int] | None = None,
) -> int:
    """`choose_blocks` on a `BlockLoad` the caller keeps (the rebalancing rules and the simulator). `keep`: the
    span a moving server holds now; among the windows that reach the best bottleneck, the one that keeps the
    most of it wins (fewer blocks to load), before the lexicographic rule."""
    totals = load.values()
    windows = range(len(totals) - span_length + 1)
    if throughput is not None and (rng is not None or keep is not None):
        scores = _scores_with(load, span_length, throughput)
        best = max(scores)
        # a cheap bound first (the windows _close to the best lie within twice the tolerance of it), then _close
        near = best[1] - 2 * _REL_TOL * max(abs(best[1]), 1e-12)
        windows = [
            s
            for s in windows
            if scores[s][0] == best[0] and scores[s][1] >= near and _close(scores[s][1], best[1])
        ]
    if keep is not None and len(windows) > 1:
        # windows clear of the span all keep none of it (not less the farther they are): the next rule decides
        kept = {s: max(0, min(s + span_length, keep[1]) - max(s, keep[0])) for s in windows}
        most = max(kept.values())
        windows = [s for s in windows if kept[s] == most]
    if rng is not None and len(windows) > 1:
        floors = {s: min(totals[s : s + span_length]) for s in windows}
        lowest = min(floors.values())
        return rng.choice([s for s in windows if _close(floors[s], lowest)])
    # an uncovered block ranks below one held only by servers of throughput 0, so that windows holding it win
    ranked = totals if load.covered else [t if h > 0 else -1.0 for t, h in zip(totals, load.holders)]
    return lexicographic_start(ranked, span_length, windows)


def lexicographic_start(totals: Sequence[float], span_length: int, windows: Iterable[int]) -> int:
    """The window (among `windows`) whose sorted per-block throughputs are lexicographically smallest.

    Rather than sorting every window, blocks are visited from the weakest up: at each value, the windows holding
    the most blocks of that value win (their sorted vector has it where the others have something larger), until
    one window is left; equal vectors go to the earliest window.
    """
    candidates = sorted(windows)
    if len(candidates) <= 1:
        return candidates[0]
    order = sorted(range(len(totals)), key=totals.__getitem__)
    i = 0
    while len(candidates) > 1 and i < len(order):
        value, marks = totals[order[i]], [0] * (len(totals) + 1)
        while i < len(order) and _close(totals[order[i]], value):
            marks[order[i] + 1] = 1
            i += 1
        for block in range(len(totals)):
            marks[block + 1] += marks[block]
        counts = [marks[s + span_length] - marks[s] for s in candidates]
        most = max(counts)
        candidates = [s for s, c in zip(candidates, counts) if c == most]
    return candidates[0]


def window_minima(load: BlockLoad, span_length: int) -> tuple[list[float], list[float]]:
    """For each window of `span_length` blocks: the least throughput outside it and inside it. O(blocks)."""
    values = load.values()
    inf = float("inf")
    prefix_min = [inf, *itertools.accumulate(values, min)]  # prefix_min[b]: least of values[:b]
    suffix_min = [*itertools.accumulate(reversed(values), min)][::-1] + [inf]  # least of values[b:]
    inside = _sliding_min(values, span_length)
    return [min(prefix_min[s], suffix_min[s + span_length]) for s in range(len(inside))], inside


def _scores_with(load: BlockLoad, span_length: int, throughput: float) -> list[tuple[int, float]]:
    """For each window, if one more server of `throughput` held it: (uncovered blocks it covers, the swarm's
    bottleneck then). Larger is better. O(blocks)."""
    outside, inside = window_minima(load, span_length)
    if load.covered:
        return [(0, min(out, low + throughput)) for out, low in zip(outside, inside)]
    empty = [0, *itertools.accumulate(int(count <= 0) for count in load.holders)]
    return [
        (empty[s + span_length] - empty[s], min(outside[s], inside[s] + throughput))
        for s in range(len(inside))
    ]


def _sliding_min(values: Sequence[float], width: int) -> list[float]:
    """The least value of every window of `width` (van Herk / Gil-Werman: cut the values into pieces of `width`;
    a window spans the end of one piece and the start of the next, whose running minima are precomputed)."""
    forward: list[float] = []  # least from the start of the piece up to here
    backward: list[float] = []  # least from here to the end of the piece
    for begin in range(0, len(values), width):
        piece = values[begin : begin + width]
        forward += itertools.accumulate(piece, min)
        backward += [*itertools.accumulate(reversed(piece), min)][::-1]
    return [min(backward[s], forward[s + width - 1]) for s in range(len(values) - width + 1)]


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= _REL_TOL * max(abs(a), abs(b), 1e-12)
