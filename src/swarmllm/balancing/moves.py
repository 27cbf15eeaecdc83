"""Whether a server already in the swarm should move to other blocks: pure functions over the swarm's spans.

Servers leave and join, so the arrangement chosen at join time decays. Moving costs a server its loaded blocks
(it reads new weights and drops the sessions it serves), so a move must pay for itself: `should_move` moves only
when the swarm's bottleneck rises by a factor of at least `min_gain` (what counts in a small swarm), or by at
least `min_lift` of the mover's own throughput and by `MIN_LIFT_FRACTION` (in a large one, where no single
server lifts the bottleneck by much, but one that fills a dip left by an outage lifts it by all it brings), or
when the move covers blocks no server holds; and only the server whose move helps most moves.
`petals_should_move` is Petals' published rule, re-implemented from its description for comparison
(`benchmarks/balancing_sim.py`). No networking; the caller announces the move.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable, Sequence

from swarmllm.balancing.blocks import BlockLoad, choose_start, window_minima

# From benchmarks/balancing_sim.py (RESULTS.md, "Load balancing under churn"). Small swarms: min_gain 1.2 keeps
# the swarm slightly closer to the optimum than Petals' rule does, with 9% fewer moves (1.1: +1.5% for 23% more
# moves; 1.3 falls behind Petals). 1,000 servers: min_lift 1.0 (a move must bring the bottleneck all of the
# mover's throughput) fills the dips of outages that no min_gain below 2 acts on, at 0.3 moves per event; 0.5
# fills more (p10 0.925 vs 0.896 of the bound) for 1.5x the moves.
DEFAULT_MIN_GAIN = 1.2
DEFAULT_MIN_LIFT = 1.0
# ... and a move paying by min_lift must lift the bottleneck by 0.5% at least: at 1,000 servers one server's
# throughput is ~0.1% of the bottleneck, and the server's rule (`next_move`, which looks at every server) found a
# stream of such moves (2.5 per event, each reloading ~22 blocks) for +4% over Petals' rule; with this floor it
# makes 0.11 moves per event for +2% (0.965 vs 0.946 of the bound; a 1% floor stops every move). Small swarms,
# where a server is a large part of the bottleneck, are unchanged.
MIN_LIFT_FRACTION = 0.005
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
    load = load if load is not None else BlockLoad.from_spans(num_blocks, spans)
    return _Swarm(load, spans, movable, min_gain, min_lift, rng).should_move(me, lookahead)


def next_move(
    num_blocks: int,
    spans: Sequence[tuple[int, int, float]],
    *,
    movable: Sequence[bool] | None = None,
    lookahead: bool = False,
    min_gain: float = DEFAULT_MIN_GAIN,
    min_lift: float = DEFAULT_MIN_LIFT,
    rng: random.Random | None = None,
) -> tuple[int, tuple[int, int]] | None:
    """The one move the swarm makes now, as (server index, new span): the first server, in the order given, whose
    move pays by itself (`should_move`), else, with `lookahead` and while some blocks have no server, the first
    whose move prepares one that pays (when every block has a server, such moves bought the simulator ~1% of
    throughput for +15% moves in small swarms, and 3x the moves at 1,000 servers).
    Servers that see the same spans in the same order agree on it, so exactly one of them moves per round, and
    a move that only prepares another never goes ahead of one that pays now (they would undo each other)."""
    swarm = _Swarm(BlockLoad.from_spans(num_blocks, spans), spans, movable, min_gain, min_lift, rng)
    for ahead in (False, True) if lookahead and swarm.old[0] else (False,):
        for i in swarm.movers:
            target = swarm.should_move(i, ahead)
            if target is not None:
                return i, target
    return None


class _Swarm:
    """The swarm one decision looks at: its spans, their load, who may move, and each server's own best move,
    simulated once however often it is asked for (`next_move` asks about every server twice, and each question
    looks at other servers' moves). With an `rng` every simulation draws afresh, in the order it always did."""

    def __init__(
        self,
        load: BlockLoad,
        spans: Sequence[tuple[int, int, float]],
        movable: Sequence[bool] | None,
        min_gain: float,
        min_lift: float,
        rng: random.Random | None,
    ):
        if min_gain < 1:
            raise ValueError(f"min_gain {min_gain} < 1 would let moves lower the swarm's throughput")
        for start, end, _ in spans:
            if not 0 <= start < end <= len(load.totals):
                raise ValueError(f"span ({start}, {end}) is not within the model's {len(load.totals)} blocks")
        self.load, self.spans, self.rng = load, spans, rng
        self.min_gain, self.min_lift = min_gain, min_lift
        self.old: Outcome = (load.uncovered, load.bottleneck)
        self.movers = [i for i in range(len(spans)) if movable is None or movable[i]]
        self._fastest_first: list[int] | None = None
        self._moves: dict[int, tuple[int, Outcome] | None] = {}
        self._may_pay: Callable[[tuple[int, int, float]], bool] | None = None
        self._minima: dict[int, tuple[list[float], list[float]]] = {}  # window_minima by span length

    def best_move(self, i: int) -> tuple[int, Outcome] | None:
        """`_best_move` of server i in this swarm."""
        if self.rng is not None:
            return _best_move(self.load, self.spans[i], self.rng)
        if i not in self._moves:
            self._moves[i] = _best_move(self.load, self.spans[i], None)
        return self._moves[i]

    def pays(self, i: int, outcome: Outcome, old: Outcome | None = None) -> bool:
        """Whether server i's move to `outcome` pays against `old` (default: the swarm now)."""
        return _pays(old or self.old, outcome, self.min_gain, self.min_lift * self.spans[i][2])

    def should_move(self, me: int, lookahead: bool) -> tuple[int, int] | None:
        """`should_move` of server `me`."""
        spans, old = self.spans, self.old
        if not lookahead and self.rng is None:
            if self._may_pay is None:
                self._may_pay = _may_pay(self.load, old, self.min_gain, self.min_lift)
            if not self._may_pay(spans[me]):
                return None  # my move cannot pay, and only lookahead moves me otherwise
        mine = self.best_move(me)
        if mine is None:
            return self._unstick(me) if lookahead and old[0] else None
        new_start, after = mine
        new_span = (new_start, new_start + spans[me][1] - spans[me][0])
        if self.pays(me, after):
            better = self._better_move(me, after)
            if better is None:
                return new_span
            # stay if that move makes mine useless, move too if mine still pays after it
            other, start = better
            then, then_spans = self.load.copy(), list(spans)
            then_spans[other] = (start, start + spans[other][1] - spans[other][0], spans[other][2])
            then.remove(*spans[other])
            then.add(*then_spans[other])
            still = _best_move(then, then_spans[me], self.rng)
            if still is not None and self.pays(me, still[1], (then.uncovered, then.bottleneck)):
                return new_span
            return None
        if lookahead and _rank(after) >= _rank(old):
            moved = self.load.copy()
            moved.remove(*spans[me])
            moved.add(*new_span, spans[me][2])
            may_pay = _may_pay(moved, old, self.min_gain, self.min_lift) if self.rng is None else None
            for other in self.movers:
                if other == me or (may_pay is not None and not may_pay(spans[other])):
                    continue
                follow = _best_move(moved, spans[other], self.rng)
                if follow is not None and self.pays(other, follow[1]):
                    return new_span
        return None

    def _unstick(self, me: int) -> tuple[int, int] | None:
        """While blocks have no server and no single move helps (e.g. spans (1, 3) and (3, 5) around uncovered 0:
        each holds a block alone), the first window for me that leaves as many blocks uncovered and lets another
        server's move then cover more. Tried only in that case: it simulates a move per window and other
        server."""
        start, end, throughput = self.spans[me]
        for window in range(len(self.load.totals) - (end - start) + 1):
            if window == start:
                continue
            moved = self.load.copy()
            moved.remove(start, end, throughput)
            moved.add(window, window + end - start, throughput)
            if moved.uncovered > self.old[0]:
                continue
            for other in self.movers:
                if other == me:
                    continue
                follow = _best_move(moved, self.spans[other], None)
                if follow is not None and self.pays(other, follow[1]):
                    return window, window + end - start
        return None

    def _better_move(self, me: int, mine: Outcome) -> tuple[int, int] | None:
        """Another server whose move leaves the swarm better off than mine (ties: the lower index) and pays for
        it (so that it makes it: deferring to one that does not left us both where we were), as (its index, its
        new start), or None. The fastest are tried first, since they are the likeliest to lift the
        bottleneck most, and those too slow to reach my outcome are skipped, so a large swarm costs a few
        simulated moves."""
        spans, load = self.spans, self.load
        if self._fastest_first is None:
            self._fastest_first = sorted(self.movers, key=lambda i: -spans[i][2])
        needed: dict[int, float] = {}
        for other in self._fastest_first:
            if other == me:
                continue
            start, end, throughput = spans[other]
            if not mine[0] and self.old[0] == 0:
                if end - start not in needed:
                    if end - start not in self._minima:
                        self._minima[end - start] = window_minima(load, end - start)
                    needed[end - start] = _throughput_to_reach(self._minima[end - start], mine[1])
                if throughput < needed[end - start]:
                    continue
            theirs = self.best_move(other)
            if (
                theirs is not None
                and (_rank(theirs[1]), -other) > (_rank(mine), -me)
                and self.pays(other, theirs[1])
            ):
                return other, theirs[0]
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


def _may_pay(
    load: BlockLoad, old: Outcome, min_gain: float, min_lift: float
) -> Callable[[tuple[int, int, float]], bool]:
    """A quick test that rules out servers whose move in `load` cannot pay against `old` (True: it may). Wherever
    a server goes, the blocks outside its new window keep at most their load now, so every block below the
    bottleneck a paying move must reach has to fit in its window. Only while every block has a server (else
    a move pays by covering blocks, whatever the bottleneck); slightly generous, as `_throughput_to_reach`."""
    if old[0]:
        return lambda span: True
    values = load.values()
    order = sorted(range(len(values)), key=values.__getitem__)
    ordered = [values[b] for b in order]
    first, last = list(itertools.accumulate(order, min)), list(itertools.accumulate(order, max))

    def may_pay(span: tuple[int, int, float]) -> bool:
        start, end, throughput = span
        # the least a paying move reaches: min_gain times the bottleneck, or min_lift of its throughput more
        lift = max(min_lift * throughput, MIN_LIFT_FRACTION * old[1]) * (1 - 1e-9)
        target = min(min_gain * old[1], old[1] + lift)
        below = bisect.bisect_left(ordered, target - 1e-9 * abs(target))
        return below == 0 or last[below - 1] - first[below - 1] < end - start

    return may_pay


def _throughput_to_reach(minima: tuple[list[float], list[float]], target: float) -> float:
    """Below this throughput, no server of a span length can bring the bottleneck to `target` by moving, given
    `window_minima` of the load for that length (its leaving only lowers blocks, so the current load bounds what
    it reaches). Slightly generous, so that a move reaching exactly `target` is never ruled out by rounding."""
    outside, inside = minima
    reachable = [target - low for out, low in zip(outside, inside) if out >= target * (1 - 1e-9)]
    return min(reachable, default=math.inf) - 1e-9 * abs(target)


def _pays(old: Outcome, new: Outcome, min_gain: float, min_lift: float) -> bool:
    if old[0]:
        return new[0] < old[0]
    lift = max(min_lift, MIN_LIFT_FRACTION * old[1]) * (1 - 1e-9)
    return new[1] > old[1] and (new[1] >= min_gain * old[1] or new[1] - old[1] >= lift)


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
