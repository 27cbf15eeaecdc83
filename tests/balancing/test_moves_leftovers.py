"""`next_move` against a brute-force oracle: a swarm where some server's move pays by itself gets a move (a server
deferred to an equally good move that did not pay for its own server, so nobody moved), and a span outside the
model is refused by name."""

import random
from fractions import Fraction

import pytest

from swarmllm.balancing import should_move
from swarmllm.balancing.moves import (
    DEFAULT_MIN_GAIN,
    DEFAULT_MIN_LIFT,
    MIN_LIFT_FRACTION,
    next_move,
)

# sums of these are exact in floats, so the oracle's exact arithmetic and the code's floats agree on every total
DYADIC_RATES = (0.25, 0.5, 1.0, 2.0, 3.0, 7.5, 8.0)


def exact_outcome(num_blocks, spans):
    """(uncovered blocks, bottleneck), summed from scratch in exact arithmetic."""
    totals, holders = [Fraction(0)] * num_blocks, [0] * num_blocks
    for start, end, throughput in spans:
        for block in range(start, end):
            totals[block] += Fraction(throughput)
            holders[block] += 1
    return sum(count == 0 for count in holders), min(totals)


def exact_pays(old, new, throughput):
    """`should_move`'s documented rule: fewer uncovered blocks while some are, else a bottleneck rising by
    `DEFAULT_MIN_GAIN` times, or by `DEFAULT_MIN_LIFT` of the mover's throughput (and `MIN_LIFT_FRACTION`)."""
    if old[0]:
        return new[0] < old[0]
    lift = max(Fraction(DEFAULT_MIN_LIFT) * Fraction(throughput), Fraction(MIN_LIFT_FRACTION) * old[1])
    return new[1] > old[1] and (new[1] >= Fraction(DEFAULT_MIN_GAIN) * old[1] or new[1] - old[1] >= lift)


def paying_moves(num_blocks, spans, movable):
    """Every (server, new start) whose move, alone, pays, found by trying every window of every movable server."""
    old = exact_outcome(num_blocks, spans)
    found = []
    for i, (start, end, throughput) in enumerate(spans):
        for window in range(num_blocks - (end - start) + 1):
            if movable[i] and window != start:
                moved = [*spans[:i], (window, window + end - start, throughput), *spans[i + 1 :]]
                if exact_pays(old, exact_outcome(num_blocks, moved), throughput):
                    found.append((i, window))
    return found


def test_a_move_that_pays_is_not_held_back_by_an_equally_good_one_that_does_not():
    # blocks: 7.5 and 15.25. The 0.25 server moving to block 0 lifts the bottleneck by all it brings (pays by
    # min_lift); the first 7.5 server's move lifts it as much, which does not pay a 7.5 server. The 0.25 server
    # stayed for it (ties go to the lower index), and the 7.5 server stayed as its move did not pay: no move.
    spans = [(1, 2, 7.5), (1, 2, 0.25), (0, 2, 7.5)]
    assert paying_moves(2, spans, [True] * 3) == [(1, 0)]
    assert should_move(2, spans, 1) == (0, 1)
    assert next_move(2, spans) == (1, (0, 1))


@pytest.mark.parametrize("seed", range(400))
def test_next_move_moves_exactly_when_some_move_pays(seed):
    rng = random.Random(seed)
    num_blocks = rng.randint(2, 6)
    spans = []
    for _ in range(rng.randint(2, 6)):
        length = rng.randint(1, num_blocks)
        start = rng.randint(0, num_blocks - length)
        spans.append((start, start + length, rng.choice(DYADIC_RATES)))
    movable = [rng.random() < 0.8 for _ in spans]
    paying = paying_moves(num_blocks, spans, movable)
    move = next_move(num_blocks, spans, movable=movable)
    if not paying:
        assert move is None
    else:
        assert move is not None
        mover, (start, end) = move
        assert movable[mover] and end - start == spans[mover][1] - spans[mover][0]
        moved = [*spans[:mover], (start, end, spans[mover][2]), *spans[mover + 1 :]]
        old = exact_outcome(num_blocks, spans)
        assert exact_pays(old, exact_outcome(num_blocks, moved), spans[mover][2])


@pytest.mark.parametrize("bad", [(0, 6), (2, 6), (3, 3)])
def test_a_span_outside_the_model_is_refused_by_name(bad):
    spans = [(*bad, 1.0), (0, 2, 1.0)]
    with pytest.raises(ValueError, match=rf"\({bad[0]}, {bad[1]}\)"):
        next_move(4, spans)
    with pytest.raises(ValueError, match=rf"\({bad[0]}, {bad[1]}\)"):
        should_move(4, spans, 1)
