"""A server's dial-back checks (`server.reachability`) against real listeners on 127.0.0.1: only the asking peer
listening at the address gets a yes, a failure reads the same whatever went wrong, and the checks are bounded."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import pytest_asyncio
from ports import free_port

from swarmllm.server.reachability import (
    DialBacks,
    ask_address,
    ask_reachable,
    best_address,
    dial_address,
    verdict,
)
from swarmllm.wire import DirectServer, Handlers, Identity, Message, RequestError, SwarmKey, connect_direct
from swarmllm.wire.messages import ReachQuery, ReachReply

ANSWER_S = 1.5  # a failure answers only then: room for a loaded machine's TLS handshake to come before it

on_module_loop = pytest.mark.asyncio(loop_scope="module")  # (the listener fixture's loop)


@pytest.fixture(scope="module")
def listener_identity() -> Identity:
    return Identity.generate()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def listener(listener_identity):
    server = DirectServer(Handlers(), listener_identity, handshake_timeout=2.0)
    await server.start()
    yield "{}:{}".format(*server.address)
    await server.stop()


async def timed(check) -> tuple[bool, float]:
    began = time.monotonic()
    answer = await check
    return answer, time.monotonic() - began


@on_module_loop
async def test_the_peer_listening_there_is_reached(listener, listener_identity):
    checks = DialBacks(Identity.generate(), answer_s=ANSWER_S)
    reached, took = await timed(checks.check(listener_identity.peer_id, listener))
    assert reached and took < ANSWER_S


@on_module_loop
async def test_another_peer_listening_there_is_not(listener):
    """Someone else's address: the listener proves another id, so the asking peer gets no."""
    checks = DialBacks(Identity.generate(), answer_s=ANSWER_S)
    reached, took = await timed(checks.check(Identity.generate().peer_id, listener))
    assert not reached and took >= ANSWER_S


@on_module_loop
async def test_a_refused_address_answers_no_sooner_than_any_failure():
    """Nothing listens there: the connection is refused at once, yet the answer comes at the check's whole time,
    so it tells a refused port from a silent one no better than a yes/no."""
    checks = DialBacks(Identity.generate(), answer_s=ANSWER_S)
    reached, took = await timed(checks.check(Identity.generate().peer_id, f"127.0.0.1:{free_port()}"))
    assert not reached and took >= ANSWER_S


@on_module_loop
async def test_checks_are_bounded_per_peer_and_in_all():
    checks = DialBacks(Identity.generate(), answer_s=ANSWER_S, max_checks=2)
    assert checks.refusal(None)[0] == "bad_request"  # no proven id: nobody to dial back
    peers = [Identity.generate().peer_id for _ in range(3)]
    addr = f"127.0.0.1:{free_port()}"
    running = [asyncio.ensure_future(checks.check(peer, addr)) for peer in peers[:2]]
    await asyncio.sleep(0)  # (both checks start: they hold their places until answered)
    with pytest.raises(RequestError) as same_peer:
        await checks.check(peers[0], addr)
    with pytest.raises(RequestError) as third:
        await checks.check(peers[2], addr)
    assert (same_peer.value.code, third.value.code) == ("quota", "busy")
    assert await asyncio.gather(*running) == [False, False]
    assert checks.refusal(peers[2]) is None  # places are given back


async def checker(dial_backs: DialBacks) -> DirectServer:
    """A peer that answers `reach` with `dial_backs` (as a server's handler does)."""

    async def reach(request: Message, context) -> Message:
        addr = dial_address(ReachQuery.parse(request), context.remote_host)
        return ReachReply(await dial_backs.check(context.peer_id, addr), addr).to_message()

    handlers = Handlers()
    handlers.add_unary("reach", reach, max_payload_bytes=0)
    server = DirectServer(handlers, dial_backs.identity, handshake_timeout=2.0)
    await server.start()
    return server


@on_module_loop
async def test_the_first_peer_that_reaches_us_settles_it(listener, listener_identity):
    """Asked at once, a peer that reaches us answers at once, and we do not wait for one that cannot (it dials
    as a member of another private swarm, which our listener refuses), whose no comes at its whole time."""
    reaching = await checker(DialBacks(Identity.generate(), answer_s=ANSWER_S))
    failing = await checker(DialBacks(Identity.generate(), SwarmKey(os.urandom(32)), answer_s=ANSWER_S))
    gone = await checker(DialBacks(Identity.generate(), answer_s=ANSWER_S))
    await gone.stop()
    peers = {s.identity.peer_id: s.address for s in (reaching, failing, gone)}

    async def connect(peer_id: str):  # as the listener's peer, whose address is asked about
        return await connect_direct(*peers[peer_id], listener_identity, expected_peer_id=peer_id, timeout=2.0)

    try:
        ids = list(peers)
        answer, took = await timed(ask_reachable(connect, ids[:2], listener))
        assert answer is True and took < ANSWER_S
        answer, took = await timed(ask_reachable(connect, ids[1:], listener))
        assert answer is False and took >= ANSWER_S  # the failing one's no; the gone one no answer
        assert await ask_reachable(connect, ids[2:], listener) is None
        # by port: at the address our connection comes from, as the checker sees it (the listener's own here)
        port = int(listener.rpartition(":")[2])
        assert await ask_address(connect, ids[:1], port) == (True, listener)
        assert await ask_address(connect, ids[1:2], port) == (False, None)
    finally:
        await reaching.stop()
        await failing.stop()


def test_the_best_address_is_the_one_most_peers_can_dial():
    public, private, loopback = "93.184.216.34:31330", "192.168.1.5:31330", "127.0.0.1:31330"
    assert best_address([loopback, private, public]) == public
    assert best_address([loopback, private]) == private
    assert best_address([loopback]) == loopback and best_address([]) is None


def test_a_query_by_port_is_dialled_where_the_asker_comes_from():
    assert dial_address(ReachQuery(port=31330), "198.51.100.4") == "198.51.100.4:31330"
    assert dial_address(ReachQuery(addr="peer.example:1"), None) == "peer.example:1"
    with pytest.raises(RequestError, match="not through a relay"):  # the asker's address unknown
        dial_address(ReachQuery(port=31330), None)


def test_verdict_against_every_mix_of_answers():
    """One yes settles it; only noes is unreachable; no answer at all is unknown."""
    options = (True, False, None)
    for a in options:
        for b in options:
            for c in options:
                answers = [a, b, c]
                want = True if True in answers else (False if False in answers else None)
                assert verdict(answers) is want
    assert verdict([]) is None


@pytest.mark.parametrize(
    "addr", ["", "host", ":80", "h:0", "h:65536", "h:8x", "h:" + "9" * 5000, "x" * 254 + ":1"]
)
def test_a_query_needs_host_and_port(addr):
    with pytest.raises(RequestError):
        ReachQuery.parse(Message({"addr": addr}))
    for meta in ({"addr": 8080}, {}, {"addr": "h:1", "port": 1}, {"port": 0}, {"port": True}, {"port": "1"}):
        with pytest.raises(RequestError):
            ReachQuery.parse(Message(meta))
    assert ReachQuery.parse(ReachQuery(port=31330).to_message()).port == 31330
    assert ReachQuery.parse(ReachQuery("peer.example:31338").to_message()).addr == "peer.example:31338"
