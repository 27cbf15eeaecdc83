import random

import pytest

from swarmllm.client.routing import (
    DEFAULT_RTT_S,
    ROW_COST,
    Demand,
    Hop,
    MissingBlocksError,
    has_replicas,
    route_forward,
    route_inference,
)
from swarmllm.dht import ServerInfo, ServerState


def server(
    peer: str,
    start: int,
    end: int,
    rps: float = 100.0,
    cache: int = 10_000,
    state=ServerState.ONLINE,
    forward_rps: float | None = None,
):
    return ServerInfo(
        peer_id=peer,
        state=state,
        start_block=start,
        end_block=end,
        throughput=rps,
        inference_rps=rps,
        forward_rps=rps if forward_rps is None else forward_rps,
        cache_tokens_left=cache,
        version="test",
        dtype="float32",
    )


def test_single_server_covers_everything():
    assert route_inference([server("a", 0, 8)], 8, {}) == [Hop("a", 0, 8)]


def test_prefers_fewer_hops_when_round_trips_dominate():
    servers = [server("a", 0, 4), server("b", 4, 8), server("c", 0, 8)]
    assert route_inference(servers, 8, {"a": 0.01, "b": 0.01, "c": 0.01}) == [Hop("c", 0, 8)]


def test_prefers_fast_servers_when_compute_dominates():
    servers = [server("a", 0, 4, rps=1000), server("b", 4, 8, rps=1000), server("slow", 0, 8, rps=1)]
    assert route_inference(servers, 8, {"a": 0.001, "b": 0.001, "slow": 0.001}) == [
        Hop("a", 0, 4),
        Hop("b", 4, 8),
    ]


def test_overlapping_spans_are_cut_where_the_next_server_starts():
    servers = [server("a", 0, 5), server("b", 3, 8)]
    hops = route_inference(servers, 8, {"a": 0.01, "b": 0.01})
    assert [h.peer_id for h in hops] == ["a", "b"]
    assert hops[0].start == 0 and hops[-1].end == 8 and hops[0].end == hops[1].start


def test_avoids_servers_without_cache_room():
    servers = [server("full", 0, 8, rps=1000, cache=10), server("a", 0, 8, rps=100)]
    assert route_inference(servers, 8, {}, min_cache_tokens=100) == [Hop("a", 0, 8)]


def test_missing_blocks_are_named():
    servers = [server("a", 0, 3), server("b", 5, 8), server("gone", 3, 5, state=ServerState.OFFLINE)]
    with pytest.raises(MissingBlocksError, match="3..4") as info:
        route_inference(servers, 8, {})
    assert info.value.missing == [3, 4]
    with pytest.raises(MissingBlocksError):
        route_forward(servers, 8, random.Random(0))


def test_joining_servers_are_not_routed_to():
    with pytest.raises(MissingBlocksError):
        route_inference([server("a", 0, 8, state=ServerState.JOINING)], 8, {})


def test_forward_covers_all_blocks_and_spreads_by_throughput():
    servers = [server("fast", 0, 8, rps=300), server("slow", 0, 8, rps=100)]
    rng = random.Random(0)
    picks = [route_forward(servers, 8, rng)[0].peer_id for _ in range(2000)]
    assert 0.7 < picks.count("fast") / len(picks) < 0.8
    hops = route_forward([server("a", 0, 3), server("b", 2, 8)], 8, rng)
    assert hops[0] == Hop("a", 0, 3) and hops[1] == Hop("b", 3, 8)


def test_a_session_goes_to_the_replica_with_fewer_rows_stepping():
    servers = [server("a", 0, 8), server("b", 0, 8)]
    rtt = {"a": 0.001, "b": 0.002}  # a is nearer: alone, it is chosen
    assert route_inference(servers, 8, rtt) == [Hop("a", 0, 8)]
    assert route_inference(servers, 8, rtt, load={"a": 2.0}) == [Hop("b", 0, 8)]
    # a far idle replica is not worth it: the round trip costs more than the rows slow a step
    assert route_inference(servers, 8, {"a": 0.001, "b": 0.5}, load={"a": 2.0}) == [Hop("a", 0, 8)]


def test_a_prompt_goes_where_its_beginning_is_held_as_the_steps_after_it_allow():
    servers = [server("a", 0, 8, forward_rps=10_000), server("b", 0, 8, forward_rps=10_000)]
    rtt, load = {"a": 0.001, "b": 0.001}, {"a": 1.0}  # a is busier
    held = {("a", 0, 8): 960}
    # 1000 positions to prefill, 960 held on a: 0.77 s of prefill saved there, against a's slower steps
    assert route_inference(servers, 8, rtt, load=load, demand=Demand(1000, 16, held)) == [Hop("a", 0, 8)]
    # a long answer: a's slower steps cost more than the prefill saved
    assert route_inference(servers, 8, rtt, load=load, demand=Demand(1000, 4000, held)) == [Hop("b", 0, 8)]
    # held by a server gone since: the idler replica
    gone = {("c", 0, 8): 960}
    assert route_inference(servers, 8, rtt, load=load, demand=Demand(1000, 16, gone)) == [Hop("b", 0, 8)]
    # held for blocks [0, 4) of a (an earlier session went on from there to another server): a hop for those
    held = {("a", 0, 4): 960}
    assert route_inference(servers, 8, rtt, load=load, demand=Demand(1000, 16, held)) == [
        Hop("a", 0, 4),
        Hop("b", 4, 8),
    ]


def _cost(hops, servers, rtt, load, demand, min_cache_tokens):
    """A chain's expected step time, as `route_inference` documents it."""
    by_peer, total = {s.peer_id: s for s in servers}, 0.0
    for hop in hops:
        s, blocks = by_peer[hop.peer_id], hop.end - hop.start
        uncached = max(demand.prompt - demand.cached.get((hop.peer_id, hop.start, hop.end), 0), 0)
        total += rtt.get(hop.peer_id, DEFAULT_RTT_S) + (
            0.0 if s.cache_tokens_left >= min_cache_tokens else 100.0
        )
        total += blocks * (1 + ROW_COST * load.get(hop.peer_id, 0.0)) / s.inference_rps
        total += blocks * uncached / (s.forward_rps * max(demand.steps, 1))
    return total


def _chains(servers, boundary, end):
    """Every chain of hops from `boundary` to `end` (brute force)."""
    if boundary == end:
        yield []
        return
    for s in servers:
        if s.start_block <= boundary < s.end_block:
            for stop in range(boundary + 1, min(s.end_block, end) + 1):
                for rest in _chains(servers, stop, end):
                    yield [Hop(s.peer_id, boundary, stop), *rest]


def test_the_chosen_chain_costs_least_of_all_chains():
    """Against brute force over random swarms of replicas and partial spans, with load, held beginnings and
    cache room: Dijkstra's chain costs what the cheapest of all chains does."""
    rng = random.Random(7)
    for _ in range(200):
        blocks = rng.randint(2, 6)
        servers = [server(f"full{i}", 0, blocks, rps=rng.uniform(50, 500)) for i in range(rng.randint(0, 2))]
        for i in range(rng.randint(1, 4)):
            a = rng.randrange(blocks)
            servers.append(
                server(
                    f"s{i}",
                    a,
                    rng.randint(a + 1, blocks),
                    rps=rng.uniform(50, 500),
                    cache=rng.choice([10, 10_000]),
                    forward_rps=rng.uniform(1_000, 50_000),
                )
            )
        if any(not any(s.start_block <= b < s.end_block for s in servers) for b in range(blocks)):
            continue
        rtt = {s.peer_id: rng.uniform(0.0005, 0.05) for s in servers if rng.random() < 0.8}
        load = {s.peer_id: float(rng.randint(0, 8)) for s in servers}
        spans = [(h.peer_id, h.start, h.end) for c in _chains(servers, 0, blocks) for h in c]
        held = {span: rng.choice([16, 64, 256]) for span in rng.sample(spans, min(len(spans), 3))}
        demand = Demand(rng.choice([0, 50, 300]), rng.choice([1, 20, 500]), held)
        args = (servers, rtt, load, demand, 100)
        chosen = route_inference(servers, blocks, rtt, load=load, demand=demand, min_cache_tokens=100)
        best = min(_cost(c, *args) for c in _chains(servers, 0, blocks))
        assert _cost(chosen, *args) == pytest.approx(best, rel=1e-9, abs=1e-12)


def test_replicas_are_two_online_servers_of_one_block_in_the_range():
    chain = [server("a", 0, 4), server("b", 4, 8)]
    assert not has_replicas(chain, 0, 8)
    assert has_replicas([*chain, server("c", 3, 5)], 0, 8)
    assert not has_replicas([*chain, server("c", 3, 5)], 5, 8)  # outside the range asked
    assert not has_replicas([*chain, server("c", 0, 8, state=ServerState.JOINING)], 0, 8)
