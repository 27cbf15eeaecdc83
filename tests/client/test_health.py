"""Bans and step deadlines: pure bookkeeping, no network."""

import pytest

from swarmllm.client.health import Bans, step_deadline_s


def test_bans_expire_and_back_off_per_peer():
    bans = Bans(base_s=10, max_s=35)
    assert bans.ban("a", now=0) == 10
    assert bans.banned(now=5) == {"a"}
    assert bans.banned(now=10) == set()
    assert [bans.ban("a", now=t) for t in (20, 40, 80)] == [20, 35, 35]  # doubles, capped
    assert bans.ban("b", now=80) == 10  # strikes are per peer
    assert bans.banned(now=90) == {"a"}


def test_only_peers_that_did_not_answer_may_be_taken_back_early():
    bans = Bans()
    bans.ban("silent", now=0, unreachable=True)
    bans.ban("liar", now=0)
    assert bans.unreachable(now=1) == {"silent"}
    bans.lift("silent")
    assert bans.banned(now=1) == {"liar"} and bans.unreachable(now=1) == set()
    assert bans.ban("silent", now=2) == 30  # a lifted ban still counts: a flapping peer is banned longer
    assert bans.unreachable(now=3) == set()  # it answered wrongly this time


@pytest.mark.parametrize(
    ("tokens", "blocks", "rate", "want"),
    [(1, 2, 100.0, 5.0 + 4 * 0.02), (128, 4, 64.0, 5.0 + 4 * 8.0), (1, 1, 0.0, None)],
)
def test_step_deadline_is_a_floor_plus_slack_times_the_announced_compute(tokens, blocks, rate, want):
    deadline = step_deadline_s(tokens, blocks, rate, floor_s=5.0)
    if want is None:
        assert deadline > 1e6  # a server announcing no speed gets no early deadline
    else:
        assert deadline == pytest.approx(want)
