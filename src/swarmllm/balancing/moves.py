"""Whether a server already in the swarm should move to other blocks: pure functions over the swarm's spans.

Servers leave and join, so the arrangement chosen at join time decays. Moving costs a server its loaded blocks
(it reads new weights and drops the sessions it serves), so a move must pay for itself: `should_move` moves only
when the swarm's bottleneck rises by a factor of at least `min_gain` (what counts in a small swarm), or by at
least `min_lift` of the mover's own throughput (in a large one, where no single server lifts the bottleneck by
much, but one that fills a dip left by an outage lifts it by all it brings), or when the move covers blocks no
server holds; and only the server whose move helps most moves. `petals_should_move` is Petals' published rule, re-implemented from its description for comparison
(`benchmarks/balancing_sim.py`). No networking; the caller announces the move.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from swarmllm.balancing.blocks import BlockLoad, choose_start, window_minima

# From benchmarks/balancing_sim.py (RESULTS.md, "Load balancing under churn"). Small swarms: min_gain 1.2 keeps
# the swarm slightly closer to the optimum than Petals' rule does, with 9% fewer moves (1.1: +1.5% for 23% more
# moves; 1.3 falls behind Petals). 1,000 servers: min_lift 1.0 (a move must bring the bottleneck all of the
# mover's throughput) fills the dips of outages that no min_gain below 2 acts on, at 0.3 moves per event; 0.5
# fills more (p10 0.925 vs 0.896 of the bound) for 1.5x the moves.
DEFAULT_MIN_GAIN = 1.2
DEFAULT_MIN_LIFT = 1.0
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
    min_lift: float = DEFAULT_MIN_LIFT,
    rng: random.Random | None = None,
    load: BlockLoad | None = None,
) -> tuple[int, int] | None:
    """The span server `spans[me]` should move to, or None to stay.

    Simulates the server leaving and choosing again as a joiner would (`choose_blocks` with its throughput,
    keeping as many of its blocks as an equally good window allows). It moves if the swarm's bottleneck then
    rises by a factor >= `min_gain` (>= 1) or by >= `min_lift` times the server's throughput, or, while some
    blocks have no server, if the move leaves fewer of them uncovered; so a move never lowers the bottleneck.

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
        return _unstick(load, spans, me, others, min_gain, min_lift) if lookahead and old[0] else None
    new_start, after = mine
    new_span = (new_start, new_start + spans[me][1] - spans[me][0])
    if _pays(old, after, min_gain, min_lift * spans[me][2]):
        better = _better_move(load, spans, me, after, others, rng)
        if better is None:
            return new_span
        # stay if that move makes mine useless, move too if mine still pays after it
        other, start = better
        then, then_spans = load.copy(), list(spans)
        then_spans[other] = (start, start + spans[other][1] - spans[other][0], spans[other][2])
        then.remove(*spans[other])
        then.add(*then_spans[other])
        still = _best_move(then, then_spans[me], rng)
        then_old = (then.uncovered, then.bottleneck)
        if still is not None and _pays(then_old, still[1], min_gain, min_lift * spans[me][2]):
            return new_span
        return None
    if lookahead and _rank(after) >= _rank(old):
        moved, moved_spans = load.copy(), list(spans)
        moved.remove(*spans[me])
        moved.add(*new_span, spans[me][2])
        moved_spans[me] = (*new_span, spans[me][2])
        for other in others:
            follow = _best_move(moved, moved_spans[other], rng)
            if follow is not None and _pays(old, follow[1], min_gain, min_lift * spans[other][2]):
                return new_span
    return None


def next_move(
    num_blocks: int,
    spans: Sequence[tuple[int, int, float]],
    *,
    movable: Sequence[bool] | None = None,
    lookahead: bool = False,
    **options,
) -> tuple[int, tuple[int, int]] | None:
    """The one move the swarm makes now, as (server index, new span): the first server, in the order given, whose
    move pays by itself (`should_move`), else, with `lookahead`, the first whose move prepares one that pays.
    Servers that see the same spans in the same order agree on it, so exactly one of them moves per round, and
    a move that only prepares another never goes ahead of one that pays now (they would undo each other)."""
    load = BlockLoad.from_spans(num_blocks, spans)
    for ahead in (False, True) if lookahead else (False,):
        for i in range(len(spans)):
            if movable is None or movable[i]:
                target = should_move(
                    num_blocks, spans, i, movable=movable, lookahead=ahead, load=load, **options
                )
                if target is not None:
                    return i, target
    return None


def _unstick(
    load: BlockLoad,
    spans: Sequence[tuple[int, int, float]],
    me: int,
    others: list[int],
    min_gain: float,
    min_lift: float,
) -> tuple[int, int] | None:
    """While blocks have no server and no single move helps (e.g. spans (1, 3) and (3, 5) around uncovered 0:
    each holds a block alone), the first window for me that leaves as many blocks uncovered and lets another
    server's move then cover more. Tried only in that case: it simulates a move per window and other server."""
    start, end, throughput = spans[me]
    old = (load.uncovered, load.bottleneck)
    for window in range(len(load.totals) - (end - start) + 1):
        if window == start:
            continue
        moved, moved_spans = load.copy(), list(spans)
        moved.remove(start, end, throughput)
        moved.add(window, window + end - start, throughput)
        if moved.uncovered > old[0]:
            continue
        moved_spans[me] = (window, window + end - start, throughput)
        for other in others:
            follow = _best_move(moved, moved_spans[other], None)
            if follow is not None and _pays(old, follow[1], min_gain, min_lift * spans[other][2]):
                return window, window + end - start
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


def _better_move(
    load: BlockLoad,
    spans: Sequence[tuple[int, int, float]],
    me: int,
    mine: Outcome,
    others: list[int],
    rng: random.Random | None,
) -> tuple[int, int] | None:
    """Another server whose move leaves the swarm better off than mine (ties: the lower index), as (its index,
    its new start), or None. The fastest are tried first, since they are the likeliest to lift the bottleneck
    most, and those too slow to reach my outcome are skipped, so a large swarm costs a few simulated moves."""
    needed: dict[int, float] = {}
    for other in sorted(others, key=lambda i: -spans[i][2]):
        start, end, throughput = spans[other]
        if not mine[0] and load.uncovered == 0:
            if end - start not in needed:
                needed[end - start] = _throughput_to_reach(load, end - start, mine[1])
            if throughput < needed[end - start]:
                continue
        theirs = _best_move(load, spans[other], rng)
        if theirs is not None and (_rank(theirs[1]), -other) > (_rank(mine), -me):
            return other, theirs[0]
    return None


def _throughput_to_reach(load: BlockLoad, span_length: int, target: float) -> float:
    """Below this throughput, no server of `span_length` blocks can bring the bottleneck to `target` by moving
    (its leaving only lowers blocks, so the current load bounds what it reaches). Slightly generous, so that a
    move reaching exactly `target` is never ruled out by rounding."""
    outside, inside = window_minima(load, span_length)
    reachable = [target - low for out, low in zip(outside, inside) if out >= target * (1 - 1e-9)]
    return min(reachable, default=math.inf) - 1e-9 * abs(target)


def _pays(old: Outcome, new: Outcome, min_gain: float, min_lift: float) -> bool:
    if old[0]:
        return new[0] < old[0]
    return new[1] > old[1] and (new[1] >= min_gain * old[1] or new[1] - old[1] >= min_lift * (1 - 1e-9))


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
