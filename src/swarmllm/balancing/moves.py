"""Whether a server already in the swarm should move to other blocks: pure functions over the swarm's spans.

Servers leave and join, so the arrangement chosen at join time decays. Moving costs a server its loaded blocks
(it reads new weights and drops the sessions it serves), so a move must pay for itself: `should_move` moves only
when the swarm's bottleneck rises by a factor of at least `min_gain`, or when the move covers blocks no server
holds. `petals_should_move` is Petals' published rule, re-implemented from its description for comparison
(`benchmarks/balancing_sim.py`). No networking; the caller announces the move.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from swarmllm.balancing.blocks import BlockLoad, choose_start

# From benchmarks/balancing_sim.py (RESULTS.md, "Load balancing"): 1.1 keeps the swarm as close to the optimum
# as any lower threshold did, with fewer moves; higher thresholds leave weak blocks unfixed after churn.
DEFAULT_MIN_GAIN = 1.1
PETALS_BALANCE_QUALITY = 0.75  # Petals moves if old bottleneck / new bottleneck < this


def should_move(
    num_blocks: int,
    spans: Sequence[tuple[int, int, float]],
    me: int,
    min_gain: float = DEFAULT_MIN_GAIN,
    *,
    rng: random.Random | None = None,
    load: BlockLoad | None = None,
) -> tuple[int, int] | None:
    """The span server `spans[me]` should move to, or None to stay.

    Simulates the server leaving and choosing again as a joiner would (`choose_blocks` with its throughput). It
    moves if the swarm's bottleneck then rises by a factor >= `min_gain` (>= 1), or, while some blocks have no
    server, if the move leaves fewer of them uncovered; so a move never lowers the bottleneck. `load`: the
    caller's `BlockLoad` of `spans`, to skip recomputing it (left unchanged).
    """
    if min_gain < 1:
        raise ValueError(f"min_gain {min_gain} < 1 would let moves lower the swarm's throughput")
    start, end, throughput = spans[me]
    load = load.copy() if load is not None else BlockLoad.from_spans(num_blocks, spans)
    old_bottleneck, old_uncovered = load.bottleneck, load.uncovered
    load.remove(start, end, throughput)
    new_start = choose_start(load, end - start, throughput=throughput, rng=rng)
    if new_start == start:
        return None
    load.add(new_start, new_start + end - start, throughput)
    if old_uncovered:
        better = load.uncovered < old_uncovered
    else:
        better = load.bottleneck > old_bottleneck and load.bottleneck >= min_gain * old_bottleneck
    return (new_start, new_start + end - start) if better else None


def petals_should_move(
    num_blocks: int,
    spans: Sequence[tuple[int, int, float]],
    me: int,
    threshold: float = PETALS_BALANCE_QUALITY,
    *,
    load: BlockLoad | None = None,
) -> tuple[int, int] | None:
    """Petals' rule: the server re-chooses its window (lexicographically smallest sorted per-block throughput,
    the rule Petals joiners use), then every other server re-chooses in turn in the simulation; the server
    moves to its re-chosen window if old bottleneck / simulated bottleneck < `threshold`."""
    start, end, throughput = spans[me]
    load = load.copy() if load is not None else BlockLoad.from_spans(num_blocks, spans)
    old_bottleneck = load.bottleneck
    load.remove(start, end, throughput)
    new_start = choose_start(load, end - start)
    if new_start == start:
        return None
    load.add(new_start, new_start + end - start, throughput)
    for other, (s, e, t) in enumerate(spans):
        if other == me:
            continue
        load.remove(s, e, t)
        chosen = choose_start(load, e - s)
        load.add(chosen, chosen + e - s, t)
    new_bottleneck = load.bottleneck
    if new_bottleneck <= 0 or old_bottleneck / new_bottleneck >= threshold:
        return None
    return new_start, new_start + end - start
