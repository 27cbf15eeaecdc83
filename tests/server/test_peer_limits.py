"""Per-peer quotas and fair compute over a real direct connection: each refusal with its code and the limit it
names, a refused peer's other sessions untouched, the cache share cap, the reply deadline that frees the cache
of a client that stopped reading, an honest peer's work not stuck behind another peer's pile, and the `room` query
that a client refused room waits on."""

import asyncio
import threading
from contextlib import asynccontextmanager

import pytest
import torch

from swarmllm.models import load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.wire import DirectServer, Identity, Message, RemoteError, connect_direct
from swarmllm.wire.messages import RoomQuery, RoomReply

HIDDEN = 64


@pytest.fixture(scope="module")
def span(llama_checkpoint):
    return load_span(str(llama_checkpoint), 0, 4)


@asynccontextmanager
async def serving(span, cache_tokens=64, **limits):
    """A handler over a fresh backend on a real DirectServer; yields (backend, handler, connect)."""
    backend = Backend(span, cache_tokens=cache_tokens)
    handler = RequestHandler(backend, dict, ServerLimits(**limits))
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    conns = []

    async def connect(identity=None):
        conns.append(
            await connect_direct(*server.address, identity or Identity.generate(), expected_peer_id=None)
        )
        return conns[-1]

    try:
        yield backend, handler, connect
    finally:
        for conn in conns:
            await conn.close()
        await server.stop()
        backend.shutdown()


def expected(span, hidden):
    with torch.inference_mode():
        return span(hidden)


async def open_session(conn, batch_size=1, max_length=8):
    opening = {"start": 0, "end": 4, "batch_size": batch_size, "max_length": max_length}
    return await conn.open_stream("inference", Message(opening))


async def check_steps(stream, span, positions=3):
    """The session still computes right: a prefill from position 0, then single decode steps."""
    hidden = torch.randn(1, positions, HIDDEN)
    await stream.send(Message({"position": 0}, [hidden[:, :1]]))
    outs = [(await stream.recv()).tensors[0]]
    for p in range(1, positions):
        await stream.send(Message({"position": p}, [hidden[:, p : p + 1]]))
        outs.append((await stream.recv()).tensors[0])
    torch.testing.assert_close(torch.cat(outs, 1), expected(span, hidden), rtol=1e-5, atol=1e-5)


async def refused(stream) -> RemoteError:
    with pytest.raises(RemoteError) as info:
        await stream.recv()
    return info.value


async def _until(condition, timeout_s: float = 20.0) -> None:
    """Wait for a server-side effect of a client action (the server runs in this event loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_sessions_per_peer_are_capped_and_a_refusal_touches_nothing(span):
    async with serving(span, max_sessions_per_peer=2) as (backend, _, connect):
        conn = await connect()
        first, second = await open_session(conn), await open_session(conn)
        await check_steps(first, span)
        error = await refused(await open_session(conn))
        assert error.code == "quota" and "open sessions limit" in str(error)
        await check_steps(first, span)  # the peer's sessions go on as if nothing happened
        await check_steps(second, span)
        await check_steps(await open_session(await connect()), span)  # another peer is not limited by it
        await first.close()
        await _until(lambda: len(backend.sessions) == 2)
        await check_steps(await open_session(conn), span)  # a closed session frees its place


async def test_one_peer_gets_at_most_its_share_of_the_cache(span):
    async with serving(span, cache_tokens=64) as (backend, _, connect):  # default share: 50%
        greedy = await connect()
        error = await refused(await open_session(greedy, batch_size=2, max_length=32))  # more than any share
        assert error.code == "bad_request" and "cache share limit" in str(error) and "50% of 64" in str(error)
        mine = await open_session(greedy, batch_size=1, max_length=32)
        await check_steps(mine, span)
        error = await refused(await open_session(greedy, batch_size=1, max_length=1))
        assert error.code == "quota" and "holds 32" in str(error)
        await check_steps(await open_session(await connect(), batch_size=1, max_length=32), span)
        assert backend.budget.free_tokens == 0
        error = await refused(await open_session(await connect(), batch_size=1, max_length=1))
        assert error.code == "cache_full"  # the server's budget, not a peer's share
        await check_steps(mine, span)


async def test_a_session_on_blocks_the_server_left_no_longer_counts_against_the_share(span):
    """A server that moves serves new sessions on its new blocks at once, and hands the old ones back later
    (after announcing where it went). A client failing over to the new blocks must not be refused for the
    session on the old ones that it is about to lose: that made a generation through a moving server raise
    SessionRefused ("holds 32 and asked for 32 more") when the hand-back came late."""
    async with serving(span, cache_tokens=64) as (old, handler, connect):  # default share: 50%
        conn = await connect()
        before = await open_session(conn, batch_size=1, max_length=32)  # the whole share
        await check_steps(before, span)
        new = Backend(span, cache_tokens=64)  # the blocks the server moved to (the same span will do)
        try:
            handler.use_backend(new)
            after = await open_session(conn, batch_size=1, max_length=32)
            await check_steps(after, span)  # admitted, on the new backend
            assert len(new.sessions) == 1 and len(old.sessions) == 1
            error = await refused(await open_session(conn, batch_size=1, max_length=1))
            assert error.code == "quota" and "holds 32" in str(error)  # the new session counts
            handler.hand_back(old)  # (once the move is announced) the old session ends, told why
            assert (await refused(before)).code == "server_leaving"
            await _until(lambda: not old.sessions)
            # its share was counted out once: the peer still holds exactly the new session's 32
            error = await refused(await open_session(conn, batch_size=1, max_length=1))
            assert error.code == "quota" and "holds 32" in str(error)
            await after.close()
            await _until(lambda: not new.sessions)
            await check_steps(await open_session(conn, batch_size=1, max_length=32), span)
        finally:
            new.shutdown()


async def test_request_rate_is_limited_per_peer_and_sessions_keep_stepping(span):
    async with serving(span, peer_rate_per_s=0.001, peer_burst=3) as (_, _, connect):
        conn = await connect()
        session = await open_session(conn)  # 1 of the burst
        hidden = torch.randn(1, 2, HIDDEN)
        forward = Message({"start": 0, "end": 4}, [hidden])
        for _ in range(2):
            await conn.call("forward", forward)
        with pytest.raises(RemoteError) as info:
            await conn.call("forward", forward)
        assert info.value.code == "quota" and "request rate limit" in str(info.value)
        await check_steps(session, span, positions=5)  # steps in an open session are not calls
        reply = await (await connect()).call("forward", forward)
        torch.testing.assert_close(reply.tensors[0], expected(span, hidden), rtol=0, atol=0)


async def test_queued_compute_is_capped_per_peer_then_the_server_is_busy(span):
    limits = dict(max_queued_per_peer=2, max_queued_total=3, max_forward_tokens=256)
    async with serving(span, **limits) as (backend, handler, connect):
        gate = threading.Event()
        blocker = backend.compute.submit("test", gate.wait)  # holds the compute thread until we open the gate
        a_id, b_id = Identity.generate(), Identity.generate()
        a, b, c = await connect(a_id), await connect(b_id), await connect()
        hidden = torch.randn(1, 64, HIDDEN)  # above inline_tokens: these go to the compute thread
        forward = Message({"start": 0, "end": 4}, [hidden])
        queued = [asyncio.ensure_future(a.call("forward", forward)) for _ in range(2)]
        await _until(lambda: handler.quotas.held(a_id.peer_id)[2] == 2)
        with pytest.raises(RemoteError) as info:
            await a.call("forward", forward)
        assert info.value.code == "quota" and "queued compute limit" in str(info.value)
        queued.append(asyncio.ensure_future(b.call("forward", forward)))
        await _until(lambda: handler.quotas.queued_total == 3)
        with pytest.raises(RemoteError) as info:
            await c.call("forward", forward)
        assert info.value.code == "busy"
        small = Message({"start": 0, "end": 4}, [hidden[:, :2]])  # inline work never queues
        await c.call("forward", small)
        gate.set()
        for reply in await asyncio.gather(*queued):
            torch.testing.assert_close(reply.tensors[0], expected(span, hidden), rtol=0, atol=0)
        assert blocker.result() is True and handler.quotas.queued_total == 0


async def test_an_honest_peer_is_not_stuck_behind_another_peers_pile(span):
    async with serving(span, max_queued_per_peer=64, max_forward_tokens=256) as (backend, _, connect):
        gate = threading.Event()
        backend.compute.submit("test", gate.wait)
        abuser_id, honest_id = Identity.generate(), Identity.generate()
        abuser, honest = await connect(abuser_id), await connect(honest_id)
        started: list = []  # owners in the order the compute thread starts their jobs (replies may arrive reordered)
        submit = backend.compute.submit

        def recording_submit(owner, fn, *args):
            def run(*args):
                started.append(owner)
                return fn(*args)

            return submit(owner, run, *args)

        backend.compute.submit = recording_submit
        hidden = torch.randn(1, 64, HIDDEN)
        forward = Message({"start": 0, "end": 4}, [hidden])
        pile = [asyncio.ensure_future(abuser.call("forward", forward)) for _ in range(12)]
        await _until(lambda: backend.compute.waiting(abuser_id.peer_id) == 12)
        mine = asyncio.ensure_future(honest.call("forward", forward))
        # while the compute thread is busy and 12 forwards wait, the honest peer's decode steps run inline
        session = await open_session(honest)
        await check_steps(session, span)
        assert not started and not any(task.done() for task in [mine, *pile]) and not gate.is_set()
        gate.set()
        await asyncio.gather(mine, *pile)
        forwards = [owner for owner in started if owner in (abuser_id.peer_id, honest_id.peer_id)]
        assert len(forwards) == 13
        assert forwards.index(honest_id.peer_id) <= 1, forwards  # FIFO would have made it last (12)


async def test_a_client_that_stops_reading_loses_its_session_and_its_cache(span):
    limits = dict(reply_timeout_s=0.5, max_batch_size=4, max_session_length=512, max_cache_share_per_peer=1.0)
    async with serving(span, cache_tokens=4 * 512, **limits) as (backend, _, connect):
        conn = await connect()
        stream = await open_session(conn, batch_size=4, max_length=512)
        conn._writer.transport.pause_reading()  # the client stops reading its replies
        hidden = torch.randn(4, 512, HIDDEN)  # each reply is 512 KiB: some fill the socket buffers
        for _ in range(40):
            await stream.send(Message({"position": 0}, [hidden]))
        await _until(lambda: backend.budget.free_tokens == 4 * 512 and not backend.sessions)
        honest = await open_session(await connect(), batch_size=1, max_length=8)
        await check_steps(honest, span)


def room(batch_size=1, max_length=32, wait_s=30.0, start=0, end=4) -> Message:
    return RoomQuery(start, end, batch_size, max_length, wait_s).to_message()


def room_waits(handler) -> int:
    return len(handler._room)


async def test_a_room_query_is_answered_once_a_closed_sessions_cache_is_back(span):
    """A client refused room asks `room` and opens again once it is answered: no sooner than the closed
    session's cache really is free (its release waits behind the compute thread's work), and then at once."""
    async with serving(span, cache_tokens=128) as (backend, handler, connect):
        holder, other, asker = await connect(), await connect(), await connect()
        held = await open_session(holder, max_length=64)
        hidden = torch.randn(1, 40, HIDDEN)  # above inline_tokens: computed on the compute thread
        await held.send(Message({"position": 0}, [hidden]))
        torch.testing.assert_close(
            (await held.recv()).tensors[0], expected(span, hidden), rtol=1e-5, atol=1e-5
        )
        await check_steps(await open_session(other, max_length=64), span)  # the cache is full now
        assert (await refused(await open_session(asker, max_length=64))).code == "cache_full"
        reply = RoomReply.parse(
            await asker.call("room", room(max_length=64, wait_s=0.1))
        )  # the wait runs out
        assert not reply.room and reply.why == "the cache has 0 of 128 tokens free"
        gate = threading.Event()
        backend.compute.submit(
            "test", gate.wait
        )  # the compute thread is busy: a closed cache comes back later
        asked = asyncio.ensure_future(asker.call("room", room(max_length=64)))
        await _until(lambda: room_waits(handler) == 1)
        await held.close()
        await _until(lambda: len(backend.sessions) == 1)  # closed, its release queued behind the gate
        assert not asked.done() and backend.budget.free_tokens == 0
        gate.set()
        async with asyncio.timeout(
            5
        ):  # far less than the query's 30 s: it is answered as the cache comes back
            assert RoomReply.parse(await asked) == RoomReply(True)
        await check_steps(await open_session(asker, max_length=64), span)  # the room it was told of is there
        assert room_waits(handler) == 0


async def test_a_room_query_waits_for_the_peers_own_sessions_and_is_bounded(span):
    limits = dict(max_sessions_per_peer=1, max_room_waits_per_peer=1, max_room_wait_s=30.0)
    async with serving(span, **limits) as (backend, handler, connect):
        me, them = await connect(), await connect()
        mine = await open_session(me)
        await check_steps(mine, span)
        assert (await refused(await open_session(me))).code == "quota"
        waiting = asyncio.ensure_future(me.call("room", room(max_length=8)))
        await _until(lambda: room_waits(handler) == 1)
        # past its waiting queries, a peer is answered at once (the server holds at most that many for it)
        async with asyncio.timeout(5):
            reply = RoomReply.parse(await me.call("room", room(max_length=8)))
        assert not reply.room and "open sessions limit: 1 of 1" in reply.why
        # another peer has room: answered at once, its wait unused
        async with asyncio.timeout(5):
            assert RoomReply.parse(await them.call("room", room(max_length=8))).room
        await mine.close()
        async with asyncio.timeout(5):
            assert RoomReply.parse(await waiting).room
        # the server caps a query's wait at its max_room_wait_s
        async with serving(span, max_sessions_per_peer=1, max_room_wait_s=0.2) as (_, _, connect_short):
            conn = await connect_short()
            await check_steps(await open_session(conn), span)
            async with asyncio.timeout(5):
                assert not RoomReply.parse(await conn.call("room", room(max_length=8, wait_s=3600))).room


async def test_room_queries_that_no_closing_answers_come_back_at_once_and_bad_ones_are_refused(span):
    async with serving(span, cache_tokens=64, max_room_wait_s=30.0) as (_, handler, connect):
        conn = await connect()
        async with asyncio.timeout(5):
            # more than a peer's share: no closing makes room for it
            reply = RoomReply.parse(await conn.call("room", room(batch_size=2, max_length=32)))
            assert not reply.room and "more than a peer may hold here" in reply.why
            handler.leaving = True
            reply = RoomReply.parse(await conn.call("room", room()))
            assert not reply.room and "leaving" in reply.why
            handler.leaving = False
        bad = [
            (room(end=5), "end"),
            (room(batch_size=0), "batch_size"),
            (room(max_length=10**9), "max_length"),
            (
                Message({"start": 0, "end": 4, "batch_size": 1, "max_length": 8, "wait_s": float("nan")}),
                "wait_s",
            ),
            (Message({"start": 0, "end": 4, "batch_size": 1}), "max_length"),
        ]
        for message, named in bad:
            with pytest.raises(RemoteError) as info:
                await conn.call("room", message)
            assert info.value.code == "bad_request" and named in str(info.value), info.value
        await check_steps(await open_session(conn), span)  # the peer is served as before


async def test_room_queries_waiting_are_bounded_over_all_peers(span):
    async with serving(span, cache_tokens=64, max_room_waits_total=1, max_room_wait_s=30.0) as (
        _,
        handler,
        connect,
    ):
        held = []
        for _ in range(2):  # two peers' whole shares: the cache is full
            held.append(await open_session(await connect(), max_length=32))
            await check_steps(held[-1], span)
        first, second = await connect(), await connect()
        waiting = asyncio.ensure_future(first.call("room", room()))
        await _until(lambda: room_waits(handler) == 1)
        async with asyncio.timeout(5):  # another peer's query finds every waiting place taken: answered now
            reply = RoomReply.parse(await second.call("room", room()))
        assert not reply.room and reply.why == "the cache has 0 of 64 tokens free"
        await held[0].close()
        async with asyncio.timeout(5):
            assert RoomReply.parse(await waiting).room


async def test_waiting_room_queries_are_told_in_the_order_they_came(span):
    """Three peers wait for room on a full cache. Each session that ends frees room for one: only the query that
    came first is told (not all three, which would race for it), and the next one only once the peer told opens
    its session, or its promise (`room_promise_s`) runs out unused."""
    async with serving(span, cache_tokens=128, max_room_wait_s=30.0) as (backend, handler, connect):
        held = []
        for _ in range(2):  # two peers' whole shares: the cache is full
            held.append(await open_session(await connect(), max_length=64))
            await check_steps(held[-1], span)
        askers = [await connect() for _ in range(3)]
        asked = []
        for i, asker in enumerate(askers):  # one after another: the order they came in
            asked.append(asyncio.ensure_future(asker.call("room", room(max_length=64))))
            await _until(lambda i=i: room_waits(handler) == i + 1)
        await held[0].close()
        async with asyncio.timeout(5):
            assert RoomReply.parse(await asked[0]).room
        assert not asked[1].done() and not asked[2].done() and room_waits(handler) == 2
        # the peer told opens there: the room is taken, and the others wait on
        await check_steps(await open_session(askers[0], max_length=64), span)
        await _until(lambda: not handler._room._promised)
        assert not asked[1].done() and not asked[2].done()
        await held[1].close()
        async with asyncio.timeout(5):
            assert RoomReply.parse(await asked[1]).room
        assert not asked[2].done()  # the second peer's promise holds the room for it...
        async with asyncio.timeout(5):  # ...until it runs out (1 s) unused: then the third is told
            assert RoomReply.parse(await asked[2]).room
        await check_steps(await open_session(askers[2], max_length=64), span)
        assert room_waits(handler) == 0


async def test_room_promised_to_a_waiting_peer_is_held_from_other_peers_openings(span):
    """Room told to a peer that waited for it is its: another peer's opening that would leave it too little is
    refused (`cache_full`, and that peer can wait in turn), one that fits beside it is opened. A query whose wait
    ended keeps its place for the peer's next query, ahead of those that came since."""
    limits = dict(max_room_wait_s=30.0, room_promise_s=30.0)  # (no place or promise lapses in this test)
    async with serving(span, cache_tokens=128, **limits) as (backend, handler, connect):
        held = []
        for _ in range(2):  # two peers' whole shares: the cache is full
            held.append(await open_session(await connect(), max_length=64))
            await check_steps(held[-1], span)
        waiter, later, other = await connect(), await connect(), await connect()
        reply = RoomReply.parse(await waiter.call("room", room(max_length=32, wait_s=0.05)))
        assert not reply.room  # its wait ended; its place is kept for its next query
        asked_later = asyncio.ensure_future(later.call("room", room(max_length=32)))
        await _until(lambda: room_waits(handler) == 1)
        asked = asyncio.ensure_future(waiter.call("room", room(max_length=32)))
        await _until(lambda: room_waits(handler) == 2)
        await held[0].close()
        async with asyncio.timeout(5):
            assert RoomReply.parse(await asked).room  # the waiter's, before the query that came since
        assert not asked_later.done()
        async with asyncio.timeout(5):  # it would take the waiter's room
            error = await refused(await open_session(other, max_length=64))
        assert error.code == "cache_full" and "promised to a session that waited" in str(error)
        beside = await open_session(other, max_length=32)  # room for both: opened
        await check_steps(beside, span)
        await check_steps(await open_session(waiter, max_length=32), span)
        assert not asked_later.done()  # the cache is full again
        await beside.close()
        async with asyncio.timeout(5):
            assert RoomReply.parse(await asked_later).room
