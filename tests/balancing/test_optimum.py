import pytest
from balancing_oracle import best_bottleneck, random_swarm

from swarmllm.balancing import bottleneck_upper_bound, optimal_bottleneck


@pytest.mark.parametrize("seed", range(60))
def test_optimum_equals_brute_force_and_bound_holds(seed):
    num_blocks, spans = random_swarm(seed)
    servers = [(end - start, t) for start, end, t in spans]
    best = best_bottleneck(num_blocks, servers)
    assert optimal_bottleneck(num_blocks, servers) == pytest.approx(best)
    assert bottleneck_upper_bound(num_blocks, servers) >= best - 1e-9


def test_bound_is_total_capacity_when_spans_tile():
    servers = [(4, 2.0), (4, 2.0), (4, 2.0), (4, 2.0)]
    assert bottleneck_upper_bound(8, servers) == pytest.approx(4.0)
    assert optimal_bottleneck(8, servers) == pytest.approx(4.0)


def test_bound_sees_that_short_servers_cannot_hold_both_ends():
    # capacity / blocks = 4 * 3 / 4 = 3, but each block 0 and 3 needs its own server of length 3
    assert bottleneck_upper_bound(4, [(3, 1.0)] * 4) == pytest.approx(2.0)
    assert optimal_bottleneck(4, [(3, 1.0)] * 4) == pytest.approx(2.0)


def test_empty_and_uncoverable_swarms():
    assert optimal_bottleneck(4, []) == 0.0
    assert optimal_bottleneck(4, [(1, 5.0)]) == 0.0
