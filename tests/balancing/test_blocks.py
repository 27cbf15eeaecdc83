import random

import pytest
from balancing_oracle import random_swarm

from swarmllm.balancing import block_throughputs, choose_blocks, swarm_bottleneck


def test_empty_swarm_starts_at_the_front():
    assert choose_blocks(8, 3, []) == (0, 3)


def test_fills_uncovered_blocks_first():
    assert choose_blocks(8, 4, [(0, 4, 10.0)]) == (4, 8)
    assert choose_blocks(8, 2, [(0, 3, 10.0), (5, 8, 10.0)]) == (3, 5)


def test_strengthens_the_weakest_blocks():
    spans = [(0, 4, 10.0), (4, 8, 1.0)]
    assert choose_blocks(8, 4, spans) == (4, 8)


def test_throughputs_add_up_and_clip():
    assert block_throughputs(4, [(0, 2, 1.0), (1, 9, 2.0)]) == [1.0, 3.0, 2.0, 2.0]


def test_rejects_impossible_lengths():
    with pytest.raises(ValueError):
        choose_blocks(4, 5, [])


@pytest.mark.parametrize("seed", range(60))
def test_a_joiner_reaches_the_best_bottleneck_it_can(seed):
    num_blocks, spans = random_swarm(seed)
    joiner_length, joiner_throughput = random.Random(seed).randint(1, num_blocks), 2.5
    best = max(
        swarm_bottleneck(num_blocks, [*spans, (s, s + joiner_length, joiner_throughput)])
        for s in range(num_blocks - joiner_length + 1)
    )
    for rng in (None, random.Random(seed)):
        start, end = choose_blocks(num_blocks, joiner_length, spans, throughput=joiner_throughput, rng=rng)
        assert end - start == joiner_length
        got = swarm_bottleneck(num_blocks, [*spans, (start, end, joiner_throughput)])
        assert got == pytest.approx(best)


@pytest.mark.parametrize("seed", range(60))
def test_lexicographic_rule_matches_sorting_every_window(seed):
    num_blocks, spans = random_swarm(seed)
    totals = block_throughputs(num_blocks, spans)
    for length in range(1, num_blocks + 1):
        want = min(range(num_blocks - length + 1), key=lambda s: sorted(totals[s : s + length]))
        assert choose_blocks(num_blocks, length, spans) == (want, want + length)


def test_simultaneous_joiners_spread_with_jitter():
    starts = {choose_blocks(12, 3, [], throughput=1.0, rng=random.Random(seed))[0] for seed in range(40)}
    assert len(starts) > 5
    assert choose_blocks(12, 3, [], throughput=1.0) == (0, 3)


def test_server_call_is_unchanged():
    live = [(0, 4, 10.0), (4, 6, 1.0)]
    assert choose_blocks(8, 2, live) == (6, 8)


def test_jitter_still_covers_the_most_uncovered_blocks():
    # blocks 0, 1, 3, 4, 5 have no server; a 2-block window covers two of them at best
    for seed in range(20):
        start, _ = choose_blocks(6, 2, [(2, 3, 1.0)], throughput=1.0, rng=random.Random(seed))
        assert start in (0, 3, 4)
