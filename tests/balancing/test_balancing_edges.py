"""Edge cases of balancing and of the records it reads: ties between windows that keep none of a mover's blocks,
servers longer than the model, servers of throughput 0, non-finite throughputs, and a peer's stale record of
another span."""

import math

import pytest
from balancing_oracle import best_bottleneck
from server_infos import online_server

from swarmllm.balancing import choose_blocks, optimal_bottleneck, should_move
from swarmllm.balancing.moves import next_move
from swarmllm.dht import (
    ModelInfo,
    announce,
    find_servers,
    parse_server_info,
    start_dht,
)
from swarmllm.wire import Identity


def test_windows_that_keep_none_of_the_span_tie_and_go_by_the_lexicographic_rule():
    # the 1.0 server at 4-6 lifts block 1 (1.0) to 2.0 from window 0 or 1, keeping none of its blocks either way;
    # window 0 also lifts the next weakest block (0: 3.0), window 1 only one of 10.0 (the nearer window)
    spans = [(0, 1, 3.0), (1, 2, 1.0), (2, 4, 10.0), (4, 6, 10.0), (4, 6, 1.0)]
    assert should_move(6, spans, 4) == (0, 2)
    assert next_move(6, spans) == (4, (0, 2))


def test_a_server_longer_than_the_model_counts_once_per_block():
    # the 3-block server holds both blocks of a 2-block model once, the other adds 1.0 to one of them
    assert optimal_bottleneck(2, [(3, 1.0), (1, 1.0)]) == best_bottleneck(2, [(2, 1.0), (1, 1.0)]) == 1.0


def test_a_block_held_only_by_a_zero_throughput_server_is_not_uncovered():
    # blocks 1 and 2 have no server; block 0 has one that serves nothing: a joiner must still cover a free block
    assert choose_blocks(3, 1, [(0, 1, 0.0)]) != (0, 1)
    assert choose_blocks(4, 2, [(0, 3, 0.0)]) == (2, 4)


RECORD = online_server("x", 0, 2).model_dump(mode="json")


@pytest.mark.parametrize(
    "field, value",
    [
        ("throughput", math.inf),
        ("inference_rps", math.inf),
        ("forward_rps", math.inf),
    ],
)
def test_records_with_non_finite_rates_are_dropped(field, value):
    """One peer announcing an infinite throughput made every server's `next_move` raise (its blocks' load
    became inf - inf when it was simulated leaving), which ended their serve loops."""
    assert parse_server_info(RECORD) is not None
    assert parse_server_info({**RECORD, field: value}) is None


async def test_a_peers_newest_record_wins_over_a_stale_one_in_the_same_state():
    """A server restarted with its --identity (or one that crashed mid-move) announces a new span while its
    earlier online records live on under the old blocks until they expire: readers must see the new span."""
    model = ModelInfo(dht_prefix="restarted", num_blocks=8)
    identity = Identity.generate()
    dht, tag = start_dht(identity)
    try:
        assert await announce(
            dht, tag, "restarted", online_server(identity.peer_id, 0, 4), model, expiration_s=60
        )
        # announced later, so it expires later (every announcement of a server lives equally long)
        assert await announce(
            dht, tag, "restarted", online_server(identity.peer_id, 4, 8), model, expiration_s=90
        )
        found = await find_servers(dht, "restarted", 8)
        assert [(s.peer_id, s.start_block, s.end_block) for s in found] == [(identity.peer_id, 4, 8)]
    finally:
        dht.shutdown()
