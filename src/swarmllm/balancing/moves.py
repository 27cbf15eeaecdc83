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

# From benchmarks/balancing_sim.py (RESULTS.md, "Load balancing under churn"): at 1.15 the swarm stays closer to
# the optimum than under Petals' rule, with fewer moves and fewer blocks loaded; 1.0-1.1 gain 1-2% more for
# 10-60% more moves, 1.3 and above fall behind Petals'.
DEFAULT_MIN_GAIN = 1.15
PETALS_BALANCE_QUALITY = 0.75  # Petals moves if old bottleneck / new bottleneck < this

Outcome = tuple[int, float]  # the swarm's (uncovered blocks, bottleneck)


def should_move(
    num_blocks: int,
    spans: Sequence[tuple[int, int, float]],
    me: int,
    min_gain: float = DEFAULT_MIN_GAIN,
    *,
    movable: Sequence[bool] | None = None,
    lookahead: bool = False,
    rng: random.Random | None = None,
    load: BlockLoad | None = None,
) -> tuple[int, int] | None:
    """The span server `spans[me]` should move to, or None to stay.

    Simulates the server leaving and choosing again as a joiner would (`choose_blocks` with its throughput,
    keeping as many of its blocks as an equally good window allows). It moves if the swarm's bottleneck then
    rises by a factor >= `min_gain` (>= 1), or, while some blocks have no server, if the move leaves fewer of
    them uncovered; so a move never lowers the bottleneck.

    Every server sees the same spans, so each can tell whether another server's move would help more; it then
    stays and lets that one move (servers checking at the same moment would otherwise all rush to one weak
    spot). `movable`: per span, whether that server rebalances at all (one pinned to its blocks must not be
    waited for); default all. `lookahead`: also move when the move alone does not pay but does not lower the
    bottleneck and lets one other server's move then pay (escapes arrangements no single move improves, for
    more moves). `load`: the caller's `BlockLoad` of `spans`, to skip recomputing it (left unchanged).
    """
    if min_gain < 1:
        raise ValueError(f"min_gain {min_gain} < 1 would let moves lower the swarm's throughput")
    load = load if load is not None else BlockLoad.from_spans(num_blocks, spans)
    others = [i for i in range(len(spans)) if i != me and (movable is None or movable[i])]
    old = (load.uncovered, load.bottleneck)
    mine = _best_move(load, spans[me], rng)
    if mine is None:
        return None
    new_start, after = mine
    new_span = (new_start, new_start + spans[me][1] - spans[me][0])
    if _pays(old, after, min_gain):
        for other in others:
            theirs = _best_move(load, spans[other], rng)
            if theirs is not None and (_rank(theirs[1]), -other) > (_rank(after), -me):
                return None
        return new_span
    if lookahead and _rank(after) >= _rank(old):
        moved, moved_spans = load.copy(), list(spans)
        moved.remove(*spans[me])
        moved.add(*new_span, spans[me][2])
        moved_spans[me] = (*new_span, spans[me][2])
        for other in others:
            follow = _best_move(moved, moved_spans[other], rng)
            if follow is not None and _pays(old, follow[1], min_gain):
                return new_span
    return None


def _best_move(
    load: BlockLoad, span: tuple[int, int, float], rng: random.Random | None
) -> tuple[int, Outcome] | None:
    """Where the server of `span` would go as a joiner, and the swarm's outcome then; None if it would stay."""
    start, end, throughput = span
    trial = load.copy()
    trial.remove(start, end, throughput)
    new_start = choose_start(trial, end - start, throughput=throughput, rng=rng, keep=(start, end))
    if new_start == start:
        return None
    trial.add(new_start, new_start + end - start, throughput)
    return new_start, (trial.uncovered, trial.bottleneck)


def _pays(old: Outcome, new: Outcome, min_gain: float) -> bool:
    if old[0]:
        return new[0] < old[0]
    return new[1] > old[1] and new[1] >= min_gain * old[1]


def _rank(outcome: Outcome) -> tuple[int, float]:
    """Larger is better: fewer uncovered blocks first, then a larger bottleneck."""
    return -outcome[0], outcome[1]


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
