import pytest

from swarmllm.balancing import block_throughputs, choose_blocks


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
