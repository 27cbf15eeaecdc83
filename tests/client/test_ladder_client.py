"""The client's side of Ladder Residual without a network: which servers it may chain (only those announcing its
own checkpoint's ladder layers, with a clear error when none does), the checks on a server's p, and the kept
inputs that carry p for replay."""

import pytest
import torch
from server_infos import online_server

from swarmllm.client.hop import History, KeptInput
from swarmllm.client.replies import BadReplyError, step_reply
from swarmllm.client.routing import MissingBlocksError
from swarmllm.client.swarm import SwarmClient
from swarmllm.dht import ServerInfo, parse_server_info
from swarmllm.models.ladder import carries_pending, layer_ranges
from swarmllm.wire.messages import StepReply

LADDER = (1, 2, 3, 4)  # of 6 layers


def info(peer_id: str, start: int, end: int, ladder: tuple = ()) -> ServerInfo:
    return online_server(peer_id, start, end, ladder=ladder)


def test_layer_ranges_and_the_boundaries_that_carry_the_pair():
    assert layer_ranges(()) == ()
    assert layer_ranges((1, 2, 3, 7, 9, 10)) == ((1, 4), (7, 8), (9, 11))
    assert [b for b in range(7) if carries_pending(LADDER, b)] == [2, 3, 4]


def test_the_announcement_round_trips_and_old_records_read_as_standard():
    ladder = info("QmA", 0, 2, layer_ranges(LADDER))
    assert parse_server_info(ladder.to_record()) == ladder
    record = info("QmB", 0, 2).to_record()
    del record["ladder"]  # a server from before the field
    assert parse_server_info(record).ladder == ()


async def test_a_client_chains_only_servers_of_its_own_checkpoint():
    ladder = layer_ranges(LADDER)
    servers = [info("QmStandard", 0, 6), info("QmLadderA", 0, 3, ladder), info("QmLadderB", 3, 6, ladder)]
    client = SwarmClient([], "one-name", 6, ladder_layers=LADDER, missing_blocks_timeout_s=0)
    client.rtt_s = dict.fromkeys(("QmStandard", "QmLadderA", "QmLadderB"), 0.001)  # no pings: no network here
    client.use_servers(servers)
    hops = await client.route_inference()
    assert [h.peer_id for h in hops] == ["QmLadderA", "QmLadderB"]
    assert set(client.other_checkpoints) == {"QmStandard"}

    standard = SwarmClient([], "one-name", 6, missing_blocks_timeout_s=0)
    standard.rtt_s = dict(client.rtt_s)
    standard.use_servers(servers[1:])  # only the ladder servers hold its blocks
    with pytest.raises(MissingBlocksError) as missing:
        await standard.route_inference()
    message = str(missing.value)
    assert "standard (no ladder layers)" in message and "ladder layers 1:5" in message
    assert "never chained" in message
    for swarm in (client, standard):
        await swarm.shutdown()


@pytest.mark.parametrize(
    ("pending", "expected", "problem"),
    [
        (None, True, "pending missing where the state is the pair"),
        (torch.randn(1, 2, 8), False, "pending sent where the state is r alone"),
        (torch.randn(1, 3, 8), True, "expected"),
        (torch.full((1, 2, 8), float("nan")), True, "NaN"),
    ],
)
def test_a_reply_must_bring_p_exactly_where_the_boundary_carries_it(pending, expected, problem):
    sent = torch.randn(1, 2, 8)
    message = StepReply(0, 1, torch.randn(1, 2, 8), pending=pending).to_message()
    with pytest.raises(BadReplyError, match=problem):
        step_reply(message, "QmServer", sent, 0, expected)


def test_kept_inputs_keep_p_aligned_with_r_when_a_rewind_cuts_them():
    history = History()
    r, p = torch.randn(1, 5, 4), torch.randn(1, 5, 4)
    history.add(KeptInput(0, r, None, p))
    history.add(KeptInput(5, r[:, :1], None, p[:, :1]))
    assert history.nbytes == 2 * 6 * 4 * 4
    history.add(KeptInput(3, r[:, :1], None, p[:, :1]))  # a rewind to position 3
    assert [e.hidden.shape[1] for e in history.entries] == [3, 1]
    assert torch.equal(history.entries[0].pending, p[:, :3])
