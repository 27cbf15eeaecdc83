import random

import pytest

from swarmllm.client.routing import Hop, MissingBlocksError, route_forward, route_inference
from swarmllm.dht import ServerInfo, ServerState


def server(
    peer: str, start: int, end: int, rps: float = 100.0, cache: int = 10_000, state=ServerState.ONLINE
):
    return ServerInfo(
        peer_id=peer,
        state=state,
        start_block=start,
        end_block=end,
        throughput=rps,
        inference_rps=rps,
        forward_rps=rps,
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
