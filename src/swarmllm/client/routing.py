"""Choosing servers for a request: pure functions over announced spans and measured latencies.

Inference wants the chain with the lowest expected time per step (a shortest path over block boundaries, each
hop costing a round trip plus its blocks' compute); batch forward wants load spread over servers, so it picks
among the servers that cover each next block at random, weighted by their throughput.

Servers holding the same blocks (replicas) are told apart by what a session would find there: the rows of other
clients' sessions that their merged decode steps carry (their load: a server steps all its sessions at once, so
each row more slows every step a little, `ROW_COST`), and the session's beginning where a server likely keeps it
in its prefix cache (its prefill there is mostly a copy). A session weighs its prefill against its decode steps
(`Demand`): a long prompt goes where it is held even onto a busier server, a long answer to the idler one.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from swarmllm.dht import ServerInfo, ServerState

DEFAULT_RTT_S = 0.05  # assumed round trip to a server not yet pinged
# what one more row in a server's merged decode step adds to the step's time, as a share of a lone row's step: on
# the 2-core CPU box 8 sessions step in 1.83x one's time (0.12 a row); a GPU's steps, bound by reading the
# weights, grow less
ROW_COST = 0.1
# the most of a measured server's shortfall against its announced speed taken as the client's own path (its loop,
# the wire, a server's per-step work: what any server would show it), and so applied to a server not measured yet
# (`cap_throughput`); what a server falls short beyond it is its own, so announcing more than it delivers makes the
# others look at most this much slower
MIN_UNMEASURED_SHARE = 0.5


class MissingBlocksError(RuntimeError):
    """No online server holds some blocks of the model."""

    def __init__(self, missing: list[int], num_blocks: int, detail: str = ""):
        self.missing = missing
        super().__init__(
            f"no online server holds blocks {_ranges(missing)} of {num_blocks}{detail}; start a server for them "
            f"(swarmllm serve MODEL --blocks a:b) or wait for one to join"
        )


@dataclass(frozen=True)
class Hop:
    """Blocks [start, end) computed by one server."""

    peer_id: str
    start: int
    end: int


@dataclass(frozen=True)
class Demand:
    """What a session about to open asks of its servers beside its decode steps: `prompt` positions to prefill
    first, over `steps` decode steps after it (the prefill's time is shared among them), of which `cached`
    (peer id, start, end) -> positions the server of that span likely holds in its prefix cache."""

    prompt: int = 0
    steps: int = 1
    cached: Mapping[tuple[str, int, int], int] = field(default_factory=dict)


def _ranges(blocks: list[int]) -> str:
    out, first = [], None
    for i, b in enumerate(blocks):
        if first is None:
            first = b
        if i + 1 == len(blocks) or blocks[i + 1] != b + 1:
            out.append(f"{first}" if first == b else f"{first}..{b}")
            first = None
    return ", ".join(out)


def _online(servers: Sequence[ServerInfo]) -> list[ServerInfo]:
    return [s for s in servers if s.state == ServerState.ONLINE]


def cap_throughput(
    servers: Sequence[ServerInfo], inference_rps: Mapping[str, float], forward_rps: Mapping[str, float]
) -> list[ServerInfo]:
    """The servers with their announced speeds capped by what the client measured of them (peer id -> rate):
    a server that announces more than it delivers is routed by what it delivers. A server not measured yet is
    taken at the share of its announced speed that the best measured one delivers (at least
    `MIN_UNMEASURED_SHARE`): measures include the client's own path, which an announced speed does not, and
    otherwise an unused replica looks faster than a used one of the same speed (and draws a conversation away
    from the server that keeps its beginning)."""

    def share(measured: Mapping[str, float], announced: Callable[[ServerInfo], float]) -> float:
        shares = [
            min(measured[s.peer_id] / a, 1.0)
            for s in servers
            if s.peer_id in measured and (a := announced(s))
        ]
        return max(max(shares), MIN_UNMEASURED_SHARE) if shares else 1.0

    decode_share = share(inference_rps, lambda s: s.inference_rps)
    forward_share = share(forward_rps, lambda s: s.forward_rps)
    out = []
    for s in servers:
        decode = min(s.inference_rps, inference_rps.get(s.peer_id, s.inference_rps * decode_share))
        forward = min(s.forward_rps, forward_rps.get(s.peer_id, s.forward_rps * forward_share))
        if (decode, forward) != (s.inference_rps, s.forward_rps):
            s = s.model_copy(update={"inference_rps": decode, "forward_rps": forward})
        out.append(s)
    return out


def missing_blocks(servers: Sequence[ServerInfo], num_blocks: int) -> list[int]:
    covered = [False] * num_blocks
    for s in _online(servers):
        for b in range(s.start_block, min(s.end_block, num_blocks)):
            covered[b] = True
    return [b for b, ok in enumerate(covered) if not ok]


def has_replicas(servers: Sequence[ServerInfo], start: int, end: int) -> bool:
    """Whether two online servers hold one of the blocks [start, end): only then can where a session's beginning
    went decide a route (`client.affinity`)."""
    held = [0] * max(end - start, 0)
    for s in _online(servers):
        for b in range(max(s.start_block, start), min(s.end_block, end)):
            held[b - start] += 1
    return any(n > 1 for n in held)


def route_inference(
    servers: Sequence[ServerInfo],
    num_blocks: int,
    rtt_s: Mapping[str, float],
    *,
    start: int = 0,
    end: int | None = None,
    min_cache_tokens: int = 0,
    load: Mapping[str, float] | None = None,
    demand: Demand | None = None,
) -> list[Hop]:
    """The chain of hops covering [start, end) with the least expected step time.

    Dijkstra over block boundaries: from boundary b a server holding b can take us to any boundary up to its end,
    at the cost of its round trip plus, per block, its decode step slowed by the rows it already steps (`load`:
    peer id -> rows) and its share of the prefill of what it does not hold of the prompt (`demand`). Servers
    without room for the session's cache are avoided unless nothing else covers their blocks.
    """
    load = load or {}
    demand = demand or Demand()
    steps = max(demand.steps, 1)
    end = num_blocks if end is None else end
    online = _online(servers)
    if missing := [b for b in missing_blocks(online, num_blocks) if start <= b < end]:
        raise MissingBlocksError(missing, num_blocks)
    best: dict[int, float] = {start: 0.0}
    came_from: dict[int, Hop] = {}
    queue = [(0.0, start)]
    while queue:
        cost, boundary = heapq.heappop(queue)
        if boundary == end:
            break
        if cost > best.get(boundary, float("inf")):
            continue
        for s in online:
            if not s.start_block <= boundary < s.end_block:
                continue
            per_block = (1.0 + ROW_COST * load.get(s.peer_id, 0.0)) / max(s.inference_rps, 1e-9)
            prefill = 1.0 / (max(s.forward_rps, 1e-9) * steps)  # a prompt position through a block, shared
            penalty = 0.0 if s.cache_tokens_left >= min_cache_tokens else 100.0
            hop_cost = rtt_s.get(s.peer_id, DEFAULT_RTT_S) + penalty
            for stop in range(boundary + 1, min(s.end_block, end) + 1):
                uncached = max(demand.prompt - demand.cached.get((s.peer_id, boundary, stop), 0), 0)
                new_cost = cost + hop_cost + (per_block + prefill * uncached) * (stop - boundary)
                if new_cost < best.get(stop, float("inf")):
                    best[stop] = new_cost
                    came_from[stop] = Hop(s.peer_id, boundary, stop)
                    heapq.heappush(queue, (new_cost, stop))
    hops, boundary = [], end
    while boundary != start:
        hop = came_from[boundary]
        hops.append(hop)
        boundary = hop.start
    return hops[::-1]


def route_forward(
    servers: Sequence[ServerInfo],
    num_blocks: int,
    rng: random.Random,
    *,
    start: int = 0,
    end: int | None = None,
) -> list[Hop]:
    """Hops covering [start, end), each chosen at random among the servers holding the next block,
    weighted by throughput, and run as far as that server's span reaches."""
    end = num_blocks if end is None else end
    online = _online(servers)
    if missing := [b for b in missing_blocks(online, num_blocks) if start <= b < end]:
        raise MissingBlocksError(missing, num_blocks)
    hops, boundary = [], start
    while boundary < end:
        candidates = [s for s in online if s.start_block <= boundary < s.end_block]
        weights = [max(s.forward_rps, 1e-9) for s in candidates]
        chosen = rng.choices(candidates, weights=weights)[0]
        stop = min(chosen.end_block, end)
        hops.append(Hop(chosen.peer_id, boundary, stop))
        boundary = stop
    return hops
