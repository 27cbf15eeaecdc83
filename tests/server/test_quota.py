"""Per-peer accounting (`server.quota`) against simple oracles: plain counters and a token bucket recomputed
from the whole history of requests."""

import random

import pytest
from clocks import Clock

from swarmllm.server.quota import PeerLimits, PeerQuotas


def test_sessions_and_cache_share_match_counters():
    limits = PeerLimits(max_sessions=3, max_cache_share=0.5)
    quotas = PeerQuotas(limits)
    rng = random.Random(0)
    held: dict[str, list[int]] = {"a": [], "b": []}  # the oracle: each peer's open sessions' tokens
    for _ in range(2000):
        peer = rng.choice("ab")
        if held[peer] and rng.random() < 0.4:
            tokens = held[peer].pop(rng.randrange(len(held[peer])))
            quotas.close_session(peer, tokens)
        else:
            tokens = rng.randint(1, 40)
            refusal = quotas.open_session(peer, tokens, capacity_tokens=100)
            fits = len(held[peer]) < 3 and sum(held[peer]) + tokens <= 50
            assert (refusal is None) == fits
            if refusal is None:
                held[peer].append(tokens)
            else:
                assert refusal.code == "quota"
                assert ("open sessions" if len(held[peer]) >= 3 else "cache share") in refusal.message
        for p in "ab":
            assert quotas.held(p)[:2] == (len(held[p]), sum(held[p]))


def test_one_peer_never_holds_more_than_its_share():
    quotas = PeerQuotas(PeerLimits(max_sessions=1000, max_cache_share=0.5))
    too_large = quotas.open_session("a", 16384, 16384)  # no closing would make room: the request's fault
    assert too_large.code == "bad_request" and too_large.message.startswith("cache share limit")
    assert quotas.open_session("a", 8192, 16384) is None
    assert quotas.open_session("a", 1, 16384) is not None
    assert quotas.open_session("b", 8192, 16384) is None  # another peer has its own share


def test_a_session_larger_than_any_share_is_the_requests_fault_whatever_the_peer_holds():
    """No closing would make room for it, so it is named first (`bad_request`: a client waits for room only on
    refusals that closings clear), even from a peer at its open sessions limit; one that fits the share is
    refused for that limit then (`quota`)."""
    quotas = PeerQuotas(PeerLimits(max_sessions=1, max_cache_share=0.5))
    assert quotas.open_session("a", 10, 100) is None
    too_large = quotas.open_session("a", 51, 100)
    assert too_large.code == "bad_request" and "a session of 51 cache tokens" in too_large.message
    assert quotas.open_session("a", 40, 100).code == "quota"
    assert quotas.held("a")[:2] == (1, 10)


def test_queued_compute_per_peer_and_in_total():
    quotas = PeerQuotas(PeerLimits(max_queued=2, max_queued_total=3))
    assert quotas.enqueue("a") is None and quotas.enqueue("a") is None
    refusal = quotas.enqueue("a")
    assert refusal.code == "quota" and "queued compute" in refusal.message
    assert quotas.enqueue("b") is None
    refusal = quotas.enqueue("c")  # c has nothing queued, but the server has 3 calls waiting
    assert refusal.code == "busy" and "busy" in refusal.message
    quotas.dequeue("a")
    assert quotas.enqueue("c") is None
    assert quotas.held("a")[2] == 1 and quotas.queued_total == 3


def test_rate_is_a_token_bucket():
    clock = Clock()
    limits = PeerLimits(rate_per_s=10.0, burst=5)
    quotas = PeerQuotas(limits, clock=clock)
    rng = random.Random(1)
    admitted: list[float] = []
    for _ in range(3000):
        clock.now += rng.expovariate(15.0)  # asks 1.5x faster than allowed on average
        refusal = quotas.request("a")
        # the oracle: simulate the bucket from the start over the requests admitted so far
        bucket, at = 5.0, 0.0
        for t in admitted:
            bucket = min(5.0, bucket + (t - at) * 10.0) - 1
            at = t
        allowed = min(5.0, bucket + (clock.now - at) * 10.0) >= 1
        assert (refusal is None) == allowed
        if refusal is None:
            admitted.append(clock.now)
        else:
            assert refusal.code == "quota" and "request rate" in refusal.message
        if len(admitted) > 200:
            break
    # over a long run, admissions approach the rate (plus the burst)
    assert len(admitted) <= 10.0 * clock.now + 5 + 1e-9
    assert quotas.request("b") is None  # other peers have their own bucket


def test_idle_peers_are_forgotten_but_not_their_debts():
    clock = Clock()
    quotas = PeerQuotas(PeerLimits(rate_per_s=1.0, burst=2), clock=clock, _max_kept_idle=4)
    quotas.open_session("holder", 1, 100)
    for peer in "wxyz":
        quotas.request(peer)
    clock.now += 10.0  # every bucket is full again
    quotas.request("new")
    assert quotas.held("holder") == (1, 1, 0)  # a peer holding a session is kept
    assert len(quotas._peers) == 2


def test_bad_limits_are_refused():
    with pytest.raises(ValueError):
        PeerLimits(max_cache_share=0.0)
    with pytest.raises(ValueError):
        PeerLimits(max_sessions=0)
    with pytest.raises(ValueError):
        PeerLimits(rate_per_s=0)
