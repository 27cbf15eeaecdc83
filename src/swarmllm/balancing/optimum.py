"""The best bottleneck any arrangement of a given set of servers can reach: what rebalancing is measured against.

Each server has a fixed span length (its memory) and throughput and may sit at any start. `optimal_bottleneck`
is exact (for small swarms: its search grows with the number of distinct servers); `bottleneck_upper_bound` is a
cheap bound that holds for any size. Pure functions; the simulator and the tests use them, servers do not.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from itertools import combinations

_REL_TOL = 1e-9


def bottleneck_upper_bound(num_blocks: int, servers: Sequence[tuple[int, float]]) -> float:
    """No arrangement's bottleneck exceeds this.

    For every spacing d, take the blocks 0, d, 2d, ... (m of them): every one needs the bottleneck, and a window
    of L blocks holds at most ceil(L / d) of them, so bottleneck <= sum_i t_i * min(m, ceil(L_i / d)) / m.
    d = 1 is the total capacity sum_i t_i * L_i / num_blocks; larger d catch servers too long to count fully
    (e.g. d = num_blocks - 1: both end blocks need it, and only a whole-model server holds both).
    """
    if not servers:
        return 0.0
    by_length: dict[int, float] = {}  # a thousand servers have a few dozen lengths
    for length, t in servers:
        by_length[length] = by_length.get(length, 0.0) + t
    best = sum(t * length for length, t in by_length.items()) / num_blocks
    for d in range(2, num_blocks):
        m = (num_blocks - 1) // d + 1
        best = min(best, sum(t * min(m, -(-length // d)) for length, t in by_length.items()) / m)
    return best


def optimal_bottleneck(num_blocks: int, servers: Sequence[tuple[int, float]]) -> float:
    """The largest bottleneck over all placements of `servers` (exact).

    The answer is the sum of some servers' throughputs (those holding the weakest block), so it is found by
    bisection over those sums with `_feasible`. Exponential in the number of distinct servers: use it for
    swarms of about a dozen servers, `bottleneck_upper_bound` beyond.
    """
    if not servers:
        return 0.0
    servers = [(min(length, num_blocks), t) for length, t in servers]  # a longer server holds each block once
    bound = bottleneck_upper_bound(num_blocks, servers)
    sums = sorted(
        {sum(c) for k in range(1, len(servers) + 1) for c in combinations([t for _, t in servers], k)}
    )
    sums = [s for s in sums if s <= bound * (1 + _REL_TOL)]
    kinds = Counter((length, t) for length, t in servers)
    low, high, best = 0, len(sums) - 1, 0.0
    while low <= high:
        mid = (low + high) // 2
        if _feasible(num_blocks, kinds, sums[mid]):
            best, low = sums[mid], mid + 1
        else:
            high = mid - 1
    return best


def _feasible(num_blocks: int, kinds: Counter, target: float) -> bool:
    """Can the servers give every block at least `target`?

    Search in order of the first block still short of the target: some unplaced server must hold it, and
    starting that server exactly there (or as far right as the model allows) is never worse than starting it
    earlier, since every block before is already at the target. So only which server to place branches, never
    where. Servers with the same length and throughput are interchangeable and tried once.
    """
    need = target * (1 - _REL_TOL)
    items = sorted(kinds.items(), key=lambda kv: -kv[0][1] * kv[0][0])
    seen: set[tuple] = set()

    def search(coverage: list[float], left: tuple[int, ...]) -> bool:
        short = next((b for b, c in enumerate(coverage) if c < need), None)
        if short is None:
            return True
        key = (tuple(coverage), left)
        if key in seen:
            return False
        seen.add(key)
        capacity = sum(n * length * t for n, ((length, t), _) in zip(left, items))
        deficit = sum(need - c for c in coverage if c < need)
        if capacity < deficit * (1 - _REL_TOL):
            return False
        for k, ((length, t), _) in enumerate(items):
            if not left[k]:
                continue
            start = min(short, num_blocks - length)
            placed = list(coverage)
            for b in range(start, start + length):
                placed[b] += t
            if search(placed, left[:k] + (left[k] - 1,) + left[k + 1 :]):
                return True
        return False

    return search([0.0] * num_blocks, tuple(n for _, n in items))
