"""Load balancing under churn: our rule (`should_move`, with its `min_gain` and `min_lift`) against Petals' rule.

Seeded swarms of heterogeneous servers (throughput log-uniform over 10x, span length 20-60% of the model) join
and leave; after each event every policy runs rebalancing rounds (each server, in a seeded random order, asks its
rule whether to move, until a round moves nobody or `--rounds` rounds). All policies see the same events.
The server's own policy ("server: next_move") runs what `Server._rebalance` runs: each round, `next_move` with
lookahead over the spans in peer-id order, and only the one server it names moves; rounds repeat until it names
nobody or a cap of moves per event (`--rounds` times the servers present; at internet scale `--large-checks`).

- small swarms (2-9 servers over 8-14 blocks): the bottleneck against the exact optimum of the servers present;
- an internet-scale swarm (1,000 servers over 80 blocks, round trips 10-300 ms): the bottleneck against
  `bottleneck_upper_bound`, and the step latency of an inference route (a shortest path over block boundaries,
  each hop costing the server's round trip plus its blocks' compute, as `route_inference` computes it). At this
  size only a seeded sample of servers checks after each event (the same servers for every policy), as a
  periodic check would in a swarm with churn faster than the check period. Some churn events are outages: every
  server starting in 4 neighbouring blocks leaves at once (a data center, a cloud region).

Moves count servers that move; "blocks loaded" counts the blocks a moving server did not hold before (a joiner's
first load is the same for every policy and not counted).

    python benchmarks/balancing_sim.py [--scenarios 40] [--events 40] [--min-gains 1.1 1.2 1.3]
        [--min-lifts 1.0 0.5 inf] [--large-servers 1000] [--large-events 200] [--large-checks 5] [--no-record]
"""

from __future__ import annotations

import argparse
import itertools
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common import append_results, markdown_table

from swarmllm.balancing import (
    DEFAULT_MIN_GAIN,
    DEFAULT_MIN_LIFT,
    BlockLoad,
    bottleneck_upper_bound,
    choose_start,
    optimal_bottleneck,
    petals_should_move,
    should_move,
)
from swarmllm.balancing.moves import next_move

# (num_blocks, spans, me, load) -> new span or None
MoveRule = Callable[[int, list[tuple[int, int, float]], int, BlockLoad], tuple[int, int] | None]
# (num_blocks, spans in peer-id order) -> (index of the one server that moves, its new span) or None
RoundRule = Callable[[int, list[tuple[int, int, float]]], tuple[int, tuple[int, int]] | None]


@dataclass(frozen=True)
class Peer:
    """A server of the simulation: its memory (span length), throughput (compute steps/s over one block, which is
    also what it adds to each block it holds) and round trip to clients."""

    peer_id: int
    length: int
    throughput: float
    rtt_s: float = 0.05


@dataclass(frozen=True)
class Event:
    kind: str  # "join" or "leave"
    peer: Peer | None = None  # the joiner
    pick: float = (
        0.0  # which present server leaves: a fraction of the sorted ids, so all policies drop the same
    )


@dataclass
class Policy:
    name: str
    rule: MoveRule | None = None  # each server asks whether it should move
    round_rule: RoundRule | None = None  # or the swarm makes one move per round; neither: servers never move


@dataclass
class Trace:
    ratios: list[float] = field(default_factory=list)  # bottleneck / optimum after each event settles
    raw_ratios: list[float] = field(default_factory=list)  # the same, right after the event, before moves
    moves: int = 0
    blocks_loaded: int = 0
    events: int = 0
    capped: int = 0  # events after which a round rule used all its moves (it may have had more to make)
    route_s: list[float] = field(default_factory=list)
    seconds: float = 0.0


def ours(min_gain: float, min_lift: float, lookahead: bool = False) -> Policy:
    name = f"ours, min_gain {min_gain:g}, min_lift {min_lift:g}" + (", lookahead" if lookahead else "")
    return Policy(
        name,
        lambda n, spans, me, load: should_move(
            n, spans, me, min_gain, min_lift=min_lift, lookahead=lookahead, load=load
        ),
    )


PETALS = Policy("Petals (0.75)", lambda n, spans, me, load: petals_should_move(n, spans, me, load=load))
# as `Server._rebalance` calls it; all servers of the simulation rebalance, so `movable` is all True (None)
SERVER = Policy(
    f"server: next_move (min_gain {DEFAULT_MIN_GAIN:g}, min_lift {DEFAULT_MIN_LIFT:g}, lookahead while uncovered)",
    round_rule=lambda n, spans: next_move(n, spans, lookahead=True),
)
NO_MOVES = Policy("no moves (join only)")
LARGE_SPEED = (20.0, 200.0)  # steps/s over one block: 5-50 ms of compute per block


def log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def make_peer(rng: random.Random, peer_id: int, num_blocks: int, speed: tuple[float, float]) -> Peer:
    length = max(1, min(num_blocks, round(rng.uniform(0.2, 0.6) * num_blocks)))
    return Peer(peer_id, length, log_uniform(rng, *speed), log_uniform(rng, 0.01, 0.3))


def make_events(
    rng: random.Random,
    num_blocks: int,
    initial: int,
    churn: int,
    low: int,
    high: int,
    speed: tuple[float, float] = (1.0, 10.0),
    outages: int = 0,
) -> list[Event]:
    """`initial` joins, then `churn` joins or leaves (coin flips, keeping between `low` and `high` servers), of
    which `outages` evenly spaced ones are outages (`Swarm.outage`)."""
    events, present, next_id = [], 0, 0
    every = churn // outages if outages else 0
    for step in range(initial + churn):
        if every and step >= initial and (step - initial) % every == every // 2:
            events.append(Event("outage", pick=rng.random()))
            present -= present // 10  # about what an outage takes
            continue
        join = step < initial or present <= low or (present < high and rng.random() < 0.5)
        if join:
            events.append(Event("join", make_peer(rng, next_id, num_blocks, speed)))
            next_id, present = next_id + 1, present + 1
        else:
            events.append(Event("leave", pick=rng.random()))
            present -= 1
    return events


class Swarm:
    """One policy's swarm: the servers present and their spans, with the per-block load kept up to date."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self.peers: dict[int, Peer] = {}
        self.starts: dict[int, int] = {}
        self.load = BlockLoad.from_spans(num_blocks, [])

    def spans(
        self, key: Callable[[int], int] | None = None
    ) -> tuple[list[int], list[tuple[int, int, float]]]:
        """The ids present, ordered by `key` of the id (default: the id), and their spans in that order."""
        ids = sorted(self.peers, key=key)
        return ids, [
            (self.starts[i], self.starts[i] + self.peers[i].length, self.peers[i].throughput) for i in ids
        ]

    def join(self, peer: Peer) -> None:
        start = choose_start(self.load, peer.length)
        self.peers[peer.peer_id], self.starts[peer.peer_id] = peer, start
        self.load.add(start, start + peer.length, peer.throughput)

    def leave(self, pick: float) -> None:
        ids = sorted(self.peers)
        peer = self.peers.pop(ids[min(int(pick * len(ids)), len(ids) - 1)])
        start = self.starts.pop(peer.peer_id)
        self.load.remove(start, start + peer.length, peer.throughput)

    def outage(self, pick: float, width: int = 4) -> None:
        """Every server starting in `width` blocks around `pick` of the model leaves at once (a data center, a
        cloud region): about a tenth of a large swarm, all over the same blocks."""
        first = int(pick * (self.num_blocks - width))
        for peer_id in [i for i, start in self.starts.items() if first <= start < first + width]:
            peer = self.peers.pop(peer_id)
            start = self.starts.pop(peer_id)
            self.load.remove(start, start + peer.length, peer.throughput)

    def move(self, peer_id: int, new_start: int) -> int:
        """Moves a server; returns the blocks it had not held."""
        peer, old = self.peers[peer_id], self.starts[peer_id]
        self.load.remove(old, old + peer.length, peer.throughput)
        self.load.add(new_start, new_start + peer.length, peer.throughput)
        self.starts[peer_id] = new_start
        kept = max(0, min(old, new_start) + peer.length - max(old, new_start))
        return peer.length - kept

    def rebalance(
        self, rule: MoveRule, rng: random.Random, rounds: int, checkers: list[int] | None
    ) -> tuple[int, int]:
        """Rounds of checks until nobody moves; returns (moves, blocks loaded)."""
        moves = loaded = 0
        for _ in range(rounds):
            order = sorted(self.peers) if checkers is None else [i for i in checkers if i in self.peers]
            rng.shuffle(order)
            moved = False
            for peer_id in order:
                ids, spans = self.spans()
                new_span = rule(self.num_blocks, spans, ids.index(peer_id), self.load)
                if new_span is not None:
                    loaded += self.move(peer_id, new_span[0])
                    moves, moved = moves + 1, True
            if not moved:
                break
        self.load = BlockLoad.from_spans(self.num_blocks, self.spans()[1])  # drop float drift
        return moves, loaded

    def settle(self, rule: RoundRule, max_moves: int) -> tuple[int, int, bool]:
        """Rounds of the swarm's one move until the rule names nobody or after `max_moves`; returns (moves,
        blocks loaded, whether it stopped at the cap). Servers order the swarm by peer id, which in a real swarm
        is a hash of the server's key, unrelated to when it joined; here ids count joins, so they are scrambled
        first (a fixed permutation) lest the oldest servers always move first."""
        moves = loaded = 0
        capped = True
        for _ in range(max_moves):
            ids, spans = self.spans(key=scrambled_id)
            move = rule(self.num_blocks, spans)
            if move is None:
                capped = False
                break
            loaded += self.move(ids[move[0]], move[1][0])
            moves += 1
        self.load = BlockLoad.from_spans(self.num_blocks, self.spans()[1])  # drop float drift
        return moves, loaded, capped


def scrambled_id(peer_id: int) -> int:
    return (peer_id * 0x9E3779B1) % 2**32  # an odd multiplier: a permutation of 32-bit ids


def route_latency_s(num_blocks: int, peers: list[Peer], starts: list[int]) -> float:
    """Seconds of one inference step over the fastest chain: a shortest path over block boundaries where a hop
    on server s from boundary a to b costs rtt_s + (b - a) / throughput_s (`route_inference`'s cost). Boundaries
    only increase, so one pass suffices; per server, the best boundary to enter it is kept as a running min."""
    cost = [math.inf] * (num_blocks + 1)
    cost[0] = 0.0
    by_start: dict[int, list[int]] = {}
    for k, start in enumerate(starts):
        by_start.setdefault(start, []).append(k)
    active: list[tuple[int, float]] = []  # (server index, min over entry boundaries a of cost[a] - a / speed)
    for boundary in range(1, num_blocks + 1):
        entry = boundary - 1
        active = [(k, best) for k, best in active if starts[k] + peers[k].length >= boundary]
        active += [(k, math.inf) for k in by_start.get(entry, [])]
        updated = []
        for k, best in active:
            best = min(best, cost[entry] - entry / peers[k].throughput)
            updated.append((k, best))
            cost[boundary] = min(cost[boundary], best + peers[k].rtt_s + boundary / peers[k].throughput)
        active = updated
    return cost[num_blocks]


def run(
    num_blocks: int,
    events: list[Event],
    policy: Policy,
    optimum: Callable[[list[Peer]], float],
    *,
    seed: int,
    rounds: int,
    checks: int | None = None,
    route_every: int = 0,
    judge_from: int = 0,
) -> Trace:
    """One policy through one event sequence; the events before `judge_from` (a large swarm's initial joins,
    the same for every policy) are applied with neither rebalancing nor measurement."""
    began = time.perf_counter()
    swarm, trace, rng = Swarm(num_blocks), Trace(), random.Random(seed)
    for index, event in enumerate(events):
        if event.kind == "join":
            swarm.join(event.peer)
        elif event.kind == "leave":
            swarm.leave(event.pick)
        else:
            swarm.outage(event.pick)
        if index < judge_from:
            continue
        trace.events += 1
        best = optimum(list(swarm.peers.values()))
        if best > 0:
            trace.raw_ratios.append(swarm.load.bottleneck / best)
        if policy.rule is not None:
            checkers = (
                None if checks is None else rng.sample(sorted(swarm.peers), min(checks, len(swarm.peers)))
            )
            moves, loaded = swarm.rebalance(policy.rule, rng, rounds, checkers)
            trace.moves += moves
            trace.blocks_loaded += loaded
        elif policy.round_rule is not None:
            # a round is one check by every server, which all compute the same move: as many moves as the
            # per-server rules may make (`rounds` rounds of every server, or `checks` checks)
            cap = rounds * len(swarm.peers) if checks is None else checks
            moves, loaded, capped = swarm.settle(policy.round_rule, cap)
            trace.moves += moves
            trace.blocks_loaded += loaded
            trace.capped += capped
        if best > 0:
            trace.ratios.append(swarm.load.bottleneck / best)
        if route_every and (index - judge_from) % route_every == 0 and not swarm.load.uncovered:
            ids = sorted(swarm.peers)
            trace.route_s.append(
                route_latency_s(num_blocks, [swarm.peers[i] for i in ids], [swarm.starts[i] for i in ids])
            )
    trace.seconds = time.perf_counter() - began
    return trace


def p10(values: list[float]) -> float:
    return sorted(values)[len(values) // 10] if values else float("nan")


def small_runs(args: argparse.Namespace, policies: list[Policy]) -> dict[str, list[Trace]]:
    cache: dict[tuple, float] = {}

    def exact(peers: list[Peer]) -> float:
        key = (num_blocks, tuple(sorted((p.length, p.throughput) for p in peers)))
        if key not in cache:
            cache[key] = optimal_bottleneck(num_blocks, [(p.length, p.throughput) for p in peers])
        return cache[key]

    traces: dict[str, list[Trace]] = {p.name: [] for p in policies}
    for seed in range(args.scenarios):
        rng = random.Random(seed)
        num_blocks = rng.randint(8, 14)
        events = make_events(rng, num_blocks, initial=3, churn=args.events, low=2, high=9)
        for policy in policies:
            traces[policy.name].append(run(num_blocks, events, policy, exact, seed=seed, rounds=args.rounds))
    return traces


def large_runs(args: argparse.Namespace, policies: list[Policy]) -> dict[str, Trace]:
    num_blocks = 80
    rng = random.Random(1000)
    n = args.large_servers
    events = make_events(
        rng,
        num_blocks,
        n,
        args.large_events,
        low=int(0.8 * n),
        high=int(1.1 * n),
        speed=LARGE_SPEED,
        outages=args.large_outages,
    )

    def bound(peers: list[Peer]) -> float:
        return bottleneck_upper_bound(num_blocks, [(p.length, p.throughput) for p in peers])

    out = {}
    for policy in policies:
        out[policy.name] = run(
            num_blocks,
            events,
            policy,
            bound,
            seed=1000,
            rounds=1,
            checks=args.large_checks,
            route_every=max(1, args.large_events // 20),
            judge_from=n,
        )
        print(f"  {policy.name}: {out[policy.name].seconds:.1f} s", flush=True)
    return out


def check_route_cost() -> None:
    """The simulator's route latency equals `route_inference`'s cost on a random swarm (one check per run)."""
    from swarmllm.client.routing import route_inference
    from swarmllm.dht import ServerInfo, ServerState

    rng = random.Random(5)
    peers = [make_peer(rng, i, 20, LARGE_SPEED) for i in range(30)]
    starts = [rng.randint(0, 20 - p.length) for p in peers]
    starts[0], peers[0] = 0, Peer(0, 20, 1.0, 1.0)  # everything covered
    infos = [
        ServerInfo(
            peer_id=str(p.peer_id),
            state=ServerState.ONLINE,
            start_block=s,
            end_block=s + p.length,
            throughput=p.throughput,
            inference_rps=p.throughput,
            forward_rps=p.throughput,
            cache_tokens_left=1,
            version="sim",
            dtype="float32",
        )
        for p, s in zip(peers, starts)
    ]
    hops = route_inference(infos, 20, {str(p.peer_id): p.rtt_s for p in peers})
    by_id = {str(p.peer_id): p for p in peers}
    theirs = sum(by_id[h.peer_id].rtt_s + (h.end - h.start) / by_id[h.peer_id].throughput for h in hops)
    ours_s = route_latency_s(20, peers, starts)
    assert math.isclose(theirs, ours_s, rel_tol=1e-9), (theirs, ours_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenarios", type=int, default=40)
    parser.add_argument("--events", type=int, default=40, help="churn events per small scenario")
    parser.add_argument(
        "--rounds", type=int, default=5, help="rebalancing rounds after each small-swarm event"
    )
    parser.add_argument("--min-gains", type=float, nargs="+", default=[1.1, DEFAULT_MIN_GAIN, 1.3])
    parser.add_argument("--min-lifts", type=float, nargs="+", default=[DEFAULT_MIN_LIFT, 0.5, math.inf])
    parser.add_argument("--large-servers", type=int, default=1000)
    parser.add_argument("--large-events", type=int, default=200)
    parser.add_argument(
        "--large-checks", type=int, default=5, help="servers that check after each large event"
    )
    parser.add_argument("--large-outages", type=int, default=4, help="outages among the large churn events")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    check_route_cost()
    variants = itertools.product(args.min_gains, args.min_lifts)
    lookahead = ours(DEFAULT_MIN_GAIN, DEFAULT_MIN_LIFT, lookahead=True)
    policies = [*(ours(*variant) for variant in variants), lookahead, SERVER, PETALS, NO_MOVES]
    began = time.perf_counter()
    small = small_runs(args, policies)
    small_s = time.perf_counter() - began
    rows = []
    for policy in policies:
        traces = small[policy.name]
        ratios = [r for t in traces for r in t.ratios]
        raw = [r for t in traces for r in t.raw_ratios]
        events = sum(t.events for t in traces)
        rows.append(
            [
                policy.name,
                f"{statistics.mean(ratios):.3f}",
                f"{p10(ratios):.3f}",
                f"{sum(r >= 1 - 1e-9 for r in ratios) / len(ratios):.0%}",
                f"{statistics.mean(raw):.3f}",
                f"{sum(t.moves for t in traces) / events:.2f}",
                f"{sum(t.blocks_loaded for t in traces) / events:.2f}",
            ]
        )
    header = [
        "policy",
        "bottleneck / optimum, mean",
        "p10",
        "at optimum",
        "before moves, mean",
        "moves / event",
        "blocks loaded / event",
    ]
    small_table = markdown_table(header, rows)
    print(small_table)
    small_capped = sum(t.capped for t in small[SERVER.name])
    small_events = sum(t.events for t in small[SERVER.name])
    print(f"next_move used all its moves after {small_capped} of {small_events} events")

    print(
        f"internet scale: {args.large_servers} servers, 80 blocks, {args.large_events} churn events",
        flush=True,
    )
    large_policies = [*(ours(DEFAULT_MIN_GAIN, lift) for lift in args.min_lifts), SERVER, PETALS, NO_MOVES]
    large = large_runs(args, large_policies)
    rows = []
    for name, trace in large.items():
        rows.append(
            [
                name,
                f"{statistics.mean(trace.ratios):.3f}",
                f"{p10(trace.ratios):.3f}",
                f"{trace.moves / args.large_events:.2f}",
                f"{trace.blocks_loaded / args.large_events:.1f}",
                f"{1000 * statistics.mean(trace.route_s):.0f}",
                f"{1000 * sorted(trace.route_s)[int(0.9 * len(trace.route_s))]:.0f}",
                f"{trace.seconds:.1f}",
            ]
        )
    header = [
        "policy",
        "bottleneck / bound, mean",
        "p10",
        "moves / event",
        "blocks loaded / event",
        "route ms, mean",
        "route ms, p90",
        "sim s",
    ]
    large_table = markdown_table(header, rows)
    print(large_table)
    large_capped = large[SERVER.name].capped
    print(f"next_move used all its moves after {large_capped} of {args.large_events} events")
    print(f"small scenarios: {small_s:.1f} s")

    if not args.no_record:
        append_results(
            "Load balancing under churn: small swarms against the exact optimum",
            small_table,
            f"{args.scenarios} seeded scenarios, each 3 joins then {args.events} joins or leaves (2-9 servers over "
            f"8-14 blocks; span 20-60% of the model, throughput log-uniform 1-10); after each event up to "
            f"{args.rounds} rounds in which every server asks its rule whether to move; 'server: next_move' (what "
            f"`Server._rebalance` runs) instead makes one move per round, `next_move(..., lookahead=True)` over "
            f"the spans in peer-id order (ids scrambled: a real peer id is a key's hash, unrelated to join "
            f"order), until it names nobody or after {args.rounds} x the servers present moves (the most the "
            f"per-server rules can make), which it reached after {small_capped} of {small_events} events. "
            f"Optimum: `optimal_bottleneck` (exact) of the servers present. 'before moves': right after the event "
            f"(joiners choose with the same rule for every policy). {small_s:.1f} s for all policies.",
        )
        append_results(
            f"Load balancing at internet scale: {args.large_servers} servers, 80 blocks, churn",
            large_table,
            f"{args.large_servers} joins, then {args.large_events} joins or leaves (between 80% and 110% of the "
            f"servers), {args.large_outages} of them outages (every server starting in 4 neighbouring blocks "
            f"leaves at once); after each, "
            f"{args.large_checks} seeded servers check their rule once; for 'server: next_move' a check is one "
            f"`next_move` call over the whole swarm (every server computes the same one, and the server it names "
            f"moves): up to {args.large_checks} rounds after each event, stopping when it names nobody, which "
            f"it had not done after {large_capped} of {args.large_events} events. Ratios over the churn events, "
            f"against `bottleneck_upper_bound` (not the optimum, so a lower bound of the true ratio). Route: the "
            f"fastest inference chain for one step (round trip 10-300 ms per server, compute 1/throughput per "
            f"block, throughput {LARGE_SPEED[0]:g}-{LARGE_SPEED[1]:g} steps/s per block), every "
            f"{max(1, args.large_events // 20)} events. "
            f"sim s: wall time of the policy's whole run (joins, churn, checks, routes).",
        )


if __name__ == "__main__":
    main()
