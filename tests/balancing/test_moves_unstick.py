"""Rounds of `next_move` on swarms that single moves cannot fix: one mover per round, until every block has a
server (what servers started together, or left with a gap, go through)."""

import itertools

import pytest

from swarmllm.balancing.blocks import BlockLoad
from swarmllm.balancing.moves import next_move


def rounds_until_covered(num_blocks: int, spans: list[tuple[int, int, float]], limit: int = 20) -> int:
    for round_ in range(limit):
        if BlockLoad.from_spans(num_blocks, spans).uncovered == 0:
            return round_
        move = next_move(num_blocks, spans, lookahead=True)
        assert move is not None, f"stuck with blocks uncovered: {spans}"
        i, (start, end) = move
        before = BlockLoad.from_spans(num_blocks, spans).uncovered
        spans[i] = (start, end, spans[i][2])
        assert BlockLoad.from_spans(num_blocks, spans).uncovered <= before  # a round never uncovers more
    raise AssertionError(f"not covered after {limit} rounds: {spans}")


@pytest.mark.parametrize("starts", [s for s in itertools.product(range(5), repeat=3) if list(s) == sorted(s)])
def test_three_servers_of_two_blocks_always_end_up_tiling_six(starts):
    """Every arrangement of 3 servers x 2 blocks over 6 blocks reaches full cover, one move per round."""
    spans = [(s, s + 2, 1.0) for s in starts]
    assert rounds_until_covered(6, spans) <= 4
