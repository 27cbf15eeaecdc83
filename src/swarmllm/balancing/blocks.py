"""Which blocks a joining server should hold: pure functions over the spans already in the swarm."""

from __future__ import annotations

from collections.abc import Iterable


def block_throughputs(num_blocks: int, spans: Iterable[tuple[int, int, float]]) -> list[float]:
    """Total announced throughput per block, from (start, end, throughput) of every live server."""
    totals = [0.0] * num_blocks
    for start, end, throughput in spans:
        for block in range(max(start, 0), min(end, num_blocks)):
            totals[block] += throughput
    return totals


def choose_blocks(
    num_blocks: int, span_length: int, spans: Iterable[tuple[int, int, float]]
) -> tuple[int, int]:
    """The window of `span_length` blocks that lifts the swarm's weakest blocks the most.

    Windows are compared by their sorted per-block throughput, smallest first, so a window containing an
    uncovered block always wins, and ties go to the earliest window.
    """
    if not 0 < span_length <= num_blocks:
        raise ValueError(f"cannot hold {span_length} of {num_blocks} blocks")
    totals = block_throughputs(num_blocks, spans)
    best = min(range(num_blocks - span_length + 1), key=lambda s: sorted(totals[s : s + span_length]))
    return best, best + span_length
