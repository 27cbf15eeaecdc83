import itertools
import math

import pytest
from balancing_oracle import best_bottleneck, random_swarm

from swarmllm.balancing import DEFAULT_MIN_LIFT, petals_should_move, should_move, swarm_bottleneck


def _moved(spans, me, new_span):
    return [(*new_span, t) if i == me else (s, e, t) for i, (s, e, t) in enumerate(spans)]


@pytest.mark.parametrize("seed", range(80))
def test_a_move_never_lowers_the_bottleneck(seed):
    num_blocks, spans = random_swarm(seed)
    before = swarm_bottleneck(num_blocks, spans)
    best = best_bottleneck(num_blocks, [(e - s, t) for s, e, t in spans])
    for min_gain, lookahead in itertools.product((1.0, 1.15, 1.5), (False, True)):
        for me in range(len(spans)):
            new_span = should_move(num_blocks, spans, me, min_gain, lookahead=lookahead)
            if new_span is None:
                continue
            assert new_span[1] - new_span[0] == spans[me][1] - spans[me][0]
            after = swarm_bottleneck(num_blocks, _moved(spans, me, new_span))
            assert after >= before
            assert after <= best + 1e-9
            if before > 0 and not lookahead:
                lift = after - before
                assert after >= min_gain * before - 1e-9 or lift >= DEFAULT_MIN_LIFT * spans[me][2] - 1e-9


def test_moves_to_cover_blocks_no_one_holds():
    spans = [(0, 2, 1.0), (0, 2, 1.0), (2, 3, 1.0)]
    assert should_move(4, spans, 0) == (2, 4)


def test_stays_unless_the_gain_pays_for_the_move():
    spans = [(0, 2, 10.0), (2, 4, 5.0), (2, 4, 5.3), (2, 4, 0.4)]  # bottleneck 10.0 on blocks 0-1
    # the 0.4 server moving to the front would give min(10.4, 10.3) / 10.0 = 1.03
    assert should_move(4, spans, 3, min_gain=1.01, min_lift=math.inf) == (0, 2)
    assert should_move(4, spans, 3, min_gain=1.1, min_lift=math.inf) is None
    # ... or if the bottleneck rises by enough of the server's own throughput: 0.3 of its 0.4 here
    assert should_move(4, spans, 3, min_gain=1.1, min_lift=0.7) == (0, 2)
    assert should_move(4, spans, 3, min_gain=1.1, min_lift=0.8) is None


def test_stays_where_it_already_is_best():
    spans = [(0, 2, 1.0), (2, 4, 1.0)]
    assert should_move(4, spans, 0) is None
    assert petals_should_move(4, spans, 0) is None


def test_rejects_gains_below_one():
    with pytest.raises(ValueError):
        should_move(4, [(0, 4, 1.0)], 0, min_gain=0.9)


def test_petals_rule_moves_when_the_simulated_swarm_is_much_better():
    # the fast server doubles up on blocks 0-1 while 2-3 have only a slow one: bottleneck 1.0
    spans = [(0, 2, 4.0), (0, 2, 4.0), (2, 4, 1.0)]
    assert petals_should_move(4, spans, 1) == (2, 4)
    # a small imbalance (old / new = 4 / 4.5 > 0.75) is left alone
    spans = [(0, 2, 4.0), (0, 2, 0.5), (2, 4, 4.0)]
    assert petals_should_move(4, spans, 1) is None


@pytest.mark.parametrize("seed", range(40))
def test_petals_rule_keeps_span_lengths(seed):
    num_blocks, spans = random_swarm(seed)
    for me, (start, end, _) in enumerate(spans):
        new_span = petals_should_move(num_blocks, spans, me)
        assert new_span is None or new_span[1] - new_span[0] == end - start


def test_only_the_server_whose_move_helps_most_moves():
    # blocks 2-3 lost their server; either 0-1 server can fill them, the faster one lifts the bottleneck more
    spans = [(0, 2, 2.0), (0, 2, 3.0), (0, 2, 1.0), (2, 4, 0.5)]
    assert should_move(4, spans, 1) == (2, 4)
    assert should_move(4, spans, 0) is None
    # ... unless that server never moves
    assert should_move(4, spans, 0, movable=[True, False, True, True]) == (2, 4)


def test_lookahead_moves_when_a_second_move_then_pays():
    spans = [(2, 6, 1.3), (3, 6, 2.4), (0, 5, 3.9), (2, 5, 5.1)]
    before = swarm_bottleneck(6, spans)  # 3.7, on block 5
    assert all(should_move(6, spans, me) is None for me in range(4))
    # the 5.1 server taking 3-6 lifts block 5 but leaves block 2 as weak (3.9, +5%)...
    assert should_move(6, spans, 3, lookahead=True) == (3, 6)
    spans = _moved(spans, 3, (3, 6))
    # ... so the 2.4 server, no longer needed there, can lift blocks 0-2
    assert should_move(6, spans, 1) == (0, 3)
    assert swarm_bottleneck(6, _moved(spans, 1, (0, 3))) >= 1.15 * before
