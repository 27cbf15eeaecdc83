import pytest
from balancing_oracle import best_bottleneck, random_swarm

from swarmllm.balancing import petals_should_move, should_move, swarm_bottleneck


def _moved(spans, me, new_span):
    return [(*new_span, t) if i == me else (s, e, t) for i, (s, e, t) in enumerate(spans)]


@pytest.mark.parametrize("seed", range(80))
def test_a_move_never_lowers_the_bottleneck(seed):
    num_blocks, spans = random_swarm(seed)
    before = swarm_bottleneck(num_blocks, spans)
    best = best_bottleneck(num_blocks, [(e - s, t) for s, e, t in spans])
    for min_gain in (1.0, 1.1, 1.5):
        for me in range(len(spans)):
            new_span = should_move(num_blocks, spans, me, min_gain)
            if new_span is None:
                continue
            assert new_span[1] - new_span[0] == spans[me][1] - spans[me][0]
            after = swarm_bottleneck(num_blocks, _moved(spans, me, new_span))
            assert after >= before
            assert after <= best + 1e-9
            if before > 0:
                assert after >= min_gain * before - 1e-9


def test_moves_to_cover_blocks_no_one_holds():
    spans = [(0, 2, 1.0), (0, 2, 1.0), (2, 3, 1.0)]
    assert should_move(4, spans, 0) == (2, 4)


def test_stays_unless_the_gain_pays_for_the_move():
    spans = [(0, 2, 10.0), (2, 4, 5.0), (2, 4, 5.3), (2, 4, 0.4)]  # bottleneck 10.0 on blocks 0-1
    # the 0.4 server moving to the front would give min(10.4, 10.3) / 10.0 = 1.03
    assert should_move(4, spans, 3, min_gain=1.01) == (0, 2)
    assert should_move(4, spans, 3, min_gain=1.1) is None


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
