"""The server's RPCs over a real direct connection: correct results, and clear errors for bad input."""

import asyncio

import pytest
import torch

from swarmllm.models import load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.server.network import (
    PING_MAX_BYTES,
    measure_link,
    measure_network,
    network_rps,
    parse_bandwidth,
)
from swarmllm.wire import (
    ConnectionPool,
    DirectServer,
    Identity,
    Message,
    RemoteError,
    StreamClosed,
    connect_direct,
)
from swarmllm.wire.messages import OpenSession, PushTarget, Repoint, Step

HIDDEN = 64


@pytest.fixture(scope="module")
def span(llama_checkpoint):
    return load_span(str(llama_checkpoint), 0, 4)


@pytest.fixture
async def served(span):
    backend = Backend(span, cache_tokens=64)
    limits = ServerLimits(
        max_batch_size=4,
        max_forward_tokens=256,
        max_session_length=32,
        session_idle_timeout_s=5,
        max_cache_share_per_peer=1.0,  # one client may fill the cache here (per-peer limits: test_limits.py)
    )
    handler = RequestHandler(backend, lambda: {"start_block": 0, "end_block": 4}, limits)
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    conn = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
    yield backend, conn, server
    await conn.close()
    await server.stop()


async def refusal(conn, message: Message) -> RemoteError:
    """The error a push (a notice: one that lands is never answered) is refused with."""
    refused = asyncio.get_running_loop().create_future()
    await conn.notify("push", message, refused.set_result)
    return await asyncio.wait_for(refused, 10)


def expected(span, hidden, blocks=slice(0, 4)):
    with torch.inference_mode():
        return span(hidden, blocks=blocks)


async def test_forward_matches_the_span(served, span):
    _, conn, _ = served
    hidden = torch.randn(2, 5, HIDDEN)
    reply = await conn.call("forward", Message({"start": 1, "end": 3}, [hidden]))
    torch.testing.assert_close(reply.tensors[0], expected(span, hidden, slice(1, 3)), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("meta", "tensors", "match"),
    [
        ({"start": 0, "end": 4}, [torch.randn(1, 3, HIDDEN + 1)], "axis 2"),
        ({"start": 0, "end": 4}, [torch.randn(3, HIDDEN)], "3 dimensions"),
        ({"start": 0, "end": 4}, [torch.ones(1, 3, HIDDEN, dtype=torch.int64)], "dtype"),
        ({"start": 0, "end": 4}, [torch.full((1, 2, HIDDEN), float("nan"))], "NaN"),
        ({"start": 0, "end": 4}, [torch.randn(1, 300, HIDDEN)], "too_large"),  # refused by the payload cap
        ({"start": 0, "end": 4}, [torch.randn(1, 0, HIDDEN)], "empty"),
        ({"start": 0, "end": 4}, [], "tensors"),
        ({"start": 3, "end": 9}, [torch.randn(1, 2, HIDDEN)], "end=9"),
        ({"start": "0", "end": 4}, [torch.randn(1, 2, HIDDEN)], "integer"),
        ({"start": 0, "end": 4}, [torch.randn(1, 2, HIDDEN), torch.ones(1, 3, dtype=torch.bool)], "key_mask"),
    ],
)
async def test_bad_forward_requests_get_clear_errors(served, span, meta, tensors, match):
    _, conn, _ = served
    with pytest.raises(RemoteError, match=match) as info:
        await conn.call("forward", Message(meta, tensors))
    assert info.value.code in ("bad_request", "too_large")
    # the connection and the server are still fine
    hidden = torch.randn(1, 2, HIDDEN)
    reply = await conn.call("forward", Message({"start": 0, "end": 4}, [hidden]))
    torch.testing.assert_close(reply.tensors[0], expected(span, hidden), rtol=0, atol=0)


async def test_session_steps_match_a_full_forward(served, span):
    _, conn, _ = served
    hidden = torch.randn(1, 6, HIDDEN)
    stream = await conn.open_stream(
        "inference", Message({"start": 0, "end": 4, "batch_size": 1, "max_length": 8})
    )
    outs = []
    for lo, hi in [(0, 4), (4, 5), (5, 6)]:
        await stream.send(Message({"position": lo}, [hidden[:, lo:hi]]))
        outs.append((await stream.recv()).tensors[0])
    await stream.close()
    torch.testing.assert_close(torch.cat(outs, 1), expected(span, hidden), rtol=1e-5, atol=1e-5)


async def test_bad_steps_keep_the_session(served, span):
    backend, conn, _ = served
    hidden = torch.randn(1, 3, HIDDEN)
    stream = await conn.open_stream(
        "inference", Message({"start": 0, "end": 4, "batch_size": 1, "max_length": 4})
    )
    await stream.send(Message({"position": 0}, [hidden[:, :2]]))
    first = (await stream.recv()).tensors[0]
    for bad in [
        Message({"position": 5}, [hidden[:, 2:]]),  # beyond what the session holds
        Message({"position": 2}, [torch.randn(1, 3, HIDDEN)]),  # past max_length
        Message({"position": 2}, [torch.randn(2, 1, HIDDEN)]),  # wrong batch size
        Message({"position": 2}, [torch.full((1, 1, HIDDEN), float("inf"))]),
        Message({}, [hidden[:, 2:]]),
        Message({"position": 2, "step": -1}, [hidden[:, 2:]]),  # was dropped unanswered (fuzzing found it)
    ]:
        await stream.send(bad)
        reply = await stream.recv()
        assert reply.meta["error"]["code"] in ("bad_request", "too_long"), reply.meta
    await stream.send(Message({"position": 2}, [hidden[:, 2:]]))
    last = (await stream.recv()).tensors[0]
    torch.testing.assert_close(torch.cat([first, last], 1), expected(span, hidden), rtol=1e-5, atol=1e-5)
    await stream.close()


async def test_cache_budget_is_reserved_refused_and_returned(served):
    backend, conn, server = served
    opening = {"start": 0, "end": 4, "batch_size": 2, "max_length": 32}
    first = await conn.open_stream("inference", Message(opening))
    await first.send(Message({"position": 0}, [torch.randn(2, 1, HIDDEN)]))
    await first.recv()
    assert backend.budget.free_tokens == 0
    # another peer (the same one would hit its own share first: `quota`, test_limits.py)
    someone = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
    second = await someone.open_stream("inference", Message(opening))
    with pytest.raises(RemoteError) as info:
        await second.recv()
    assert info.value.code == "cache_full"
    await someone.close()
    await first.close()
    await _until(lambda: backend.budget.free_tokens == 64)
    # a client that vanishes without closing gives its cache back too
    other = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
    stream = await other.open_stream("inference", Message(opening))
    await stream.send(Message({"position": 0}, [torch.randn(2, 1, HIDDEN)]))
    await stream.recv()
    assert backend.budget.free_tokens == 0
    await other.close()
    await _until(lambda: backend.budget.free_tokens == 64 and not backend.sessions)


async def test_idle_sessions_time_out(served):
    backend, conn, _ = served
    backend_limits = ServerLimits(session_idle_timeout_s=0.3)
    handler = RequestHandler(backend, dict, backend_limits)
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    try:
        client = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
        stream = await client.open_stream(
            "inference", Message({"start": 0, "end": 4, "batch_size": 1, "max_length": 8})
        )
        with pytest.raises(StreamClosed):
            await stream.recv(timeout=10)
        assert not backend.sessions and backend.budget.free_tokens == 64
        await client.close()
    finally:
        await server.stop()


async def _until(condition, timeout_s: float = 10.0) -> None:
    """Wait for a server-side effect of a client action (the server runs in this event loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_bfloat16_server_computes_in_bfloat16(llama_checkpoint, span):
    backend = Backend(load_span(str(llama_checkpoint), 0, 4, dtype=torch.bfloat16), cache_tokens=64)
    server = DirectServer(RequestHandler(backend, dict).handlers(), Identity.generate())
    await server.start()
    try:
        conn = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
        hidden = torch.randn(1, 5, HIDDEN)
        out = (await conn.call("forward", Message({"start": 0, "end": 4}, [hidden]))).tensors[0]
        assert out.dtype == torch.bfloat16
        want = expected(span, hidden)
        assert float((out.float() - want).norm() / want.norm()) < 0.03
        await conn.close()
    finally:
        await server.stop()


async def test_push_hands_the_output_to_the_next_server(span, llama_checkpoint):
    """Two servers of one chain: the first pushes its output into the second's session; only the peer the
    client named may push, and a failed push is reported so the client can send the input itself."""
    first_id, second_id, client_id, stranger_id = (Identity.generate() for _ in range(4))
    second_backend = Backend(load_span(str(llama_checkpoint), 2, 4), cache_tokens=64)
    second = DirectServer(RequestHandler(second_backend, dict).handlers(), second_id)
    await second.start()

    async def connect(peer_id: str):
        assert peer_id == second_id.peer_id
        return await connect_direct(*second.address, first_id, expected_peer_id=peer_id)

    first_backend = Backend(load_span(str(llama_checkpoint), 0, 2), cache_tokens=64)
    first = DirectServer(RequestHandler(first_backend, dict, connect=connect).handlers(), first_id)
    await first.start()
    try:
        to_first = await connect_direct(*first.address, client_id, expected_peer_id=first_id.peer_id)
        to_second = await connect_direct(*second.address, client_id, expected_peer_id=second_id.peer_id)
        opening = {"batch_size": 1, "max_length": 8}
        s1 = await to_first.open_stream(
            "inference", Message({**opening, "start": 0, "end": 2, "session_id": "a" * 24})
        )
        s2 = await to_second.open_stream(
            "inference",
            Message(
                {
                    **opening,
                    "start": 2,
                    "end": 4,
                    "session_id": "b" * 24,
                    "accept_push_from": first_id.peer_id,
                }
            ),
        )
        hidden = torch.randn(1, 3, HIDDEN)
        chain = [{"peer_id": second_id.peer_id, "session_id": "b" * 24}]
        await s1.send(Message({"position": 0, "step": 1, "push": chain}, [hidden]))
        r1 = await s1.recv()
        assert r1.meta["pushed"] is True and r1.meta["step"] == 1
        r2 = await s2.recv()  # the client never sent this input: the first server did
        assert r2.meta["step"] == 1
        torch.testing.assert_close(r2.tensors[0], expected(span, hidden), rtol=1e-5, atol=1e-5)

        # a stranger can't push into the session, nor can anyone push into an unknown one
        stranger = await connect_direct(*second.address, stranger_id, expected_peer_id=None)
        forbidden = Message({"session_id": "b" * 24, "position": 3}, [hidden[:, :1]])
        assert (await refusal(stranger, forbidden)).code == "forbidden"
        unknown = Message({"session_id": "c" * 24, "position": 3}, [hidden[:, :1]])
        assert (await refusal(stranger, unknown)).code == "unknown_session"

        # a push that fails (no such session downstream): the reply does not wait for it, the failure follows
        # on the stream, and the session goes on
        bad_chain = [{"peer_id": second_id.peer_id, "session_id": "d" * 24}]
        await s1.send(Message({"position": 3, "step": 2, "push": bad_chain}, [hidden[:, :1]]))
        r1 = await s1.recv()
        assert r1.meta["pushed"] is True
        notice = await s1.recv(timeout=10)
        assert notice.meta["kind"] == "push_failed" and notice.meta["step"] == 2
        assert "unknown_session" in notice.meta["reason"]
        await s2.send(Message({"position": 3, "step": 2}, [r1.tensors[0]]))
        assert (await s2.recv()).meta["step"] == 2

        # a push that arrives after the client sent that step itself is dropped, not computed again
        # (on another connection, so it may be handled before or after the next step: dropped either way)
        as_first, errors = await connect_direct(*second.address, first_id, expected_peer_id=None), []
        late = Message({"session_id": "b" * 24, "position": 3, "step": 2}, [r1.tensors[0]])
        await as_first.notify("push", late, errors.append)
        await s2.send(Message({"position": 4, "step": 3}, [torch.randn(1, 1, HIDDEN)]))
        assert (await s2.recv()).meta["step"] == 3

        # and a step the client sends after its push had landed (it took the push as failed) is dropped too:
        # the session answers each step once
        await as_first.notify(
            "push",
            Message({"session_id": "b" * 24, "position": 5, "step": 4}, [hidden[:, :1]]),
            errors.append,
        )
        assert (await s2.recv()).meta["step"] == 4
        await s2.send(Message({"position": 5, "step": 4}, [hidden[:, :1]]))
        await s2.send(Message({"position": 6, "step": 5}, [hidden[:, :1]]))
        assert (await s2.recv()).meta["step"] == 5
        assert errors == []
        for conn in (to_first, to_second, stranger, as_first):
            await conn.close()
    finally:
        await first.stop()
        await second.stop()


async def test_a_push_whose_connection_ends_is_reported(span, llama_checkpoint):
    """A push is a notice, answered only when refused: when the connection it went over ends before the
    session's next step, the server cannot know whether it was taken and tells the client (who drops the notice
    if the next hop had answered); a later push finds the next server gone and is reported too."""
    first_id, second_id, client_id = (Identity.generate() for _ in range(3))
    second_backend = Backend(load_span(str(llama_checkpoint), 2, 4), cache_tokens=64)
    second = DirectServer(RequestHandler(second_backend, dict).handlers(), second_id)
    await second.start()
    address = second.address

    async def connect(peer_id: str):
        return await connect_direct(*address, first_id, expected_peer_id=peer_id)

    first = DirectServer(
        RequestHandler(Backend(span, cache_tokens=64), dict, connect=connect).handlers(), first_id
    )
    await first.start()
    try:
        to_first = await connect_direct(*first.address, client_id, expected_peer_id=None)
        to_second = await connect_direct(*address, client_id, expected_peer_id=None)
        s1 = await to_first.open_stream("inference", OpenSession(0, 2, 1, 8).to_message())
        s2 = await to_second.open_stream(
            "inference", OpenSession(2, 4, 1, 8, "b" * 24, accept_push_from=first_id.peer_id).to_message()
        )
        chain = [PushTarget(second_id.peer_id, "b" * 24)]
        hidden = torch.randn(1, 1, HIDDEN)
        await s1.send(Step(0, hidden, step=1, push=chain).to_message())
        assert (await s1.recv(timeout=10)).meta["pushed"] is True
        assert (await s2.recv(timeout=10)).meta["step"] == 1
        await to_second.close()
        await second.stop()
        notice = await s1.recv(timeout=10)
        assert notice.meta["kind"] == "push_failed" and notice.meta["step"] == 1
        assert "ConnectionLost" in notice.meta["reason"]
        await s1.send(Step(1, hidden, step=2, push=chain).to_message())
        assert (await s1.recv(timeout=10)).meta["pushed"] is True
        notice = await s1.recv(timeout=10)
        assert notice.meta["kind"] == "push_failed" and notice.meta["step"] == 2
        await to_first.close()
    finally:
        await first.stop()
        await second.stop()


async def test_a_push_of_a_session_that_has_ended_is_not_reported(span, llama_checkpoint, caplog):
    """A leaving server closes its connections after it has handed its sessions back: the last push of each
    session counts as unknown then, but no client waits for it any more (it logged "push to ... failed;
    telling the client to send it" once per kept session at every stop)."""
    first_id, second_id, client_id = (Identity.generate() for _ in range(3))
    second = DirectServer(
        RequestHandler(Backend(load_span(str(llama_checkpoint), 2, 4), cache_tokens=64), dict).handlers(),
        second_id,
    )
    await second.start()
    made = []

    async def connect(peer_id: str):
        made.append(await connect_direct(*second.address, first_id, expected_peer_id=peer_id))
        return made[-1]

    handler = RequestHandler(Backend(span, cache_tokens=64), dict, connect=connect)
    first = DirectServer(handler.handlers(), first_id)
    await first.start()
    try:
        to_first = await connect_direct(*first.address, client_id, expected_peer_id=None)
        to_second = await connect_direct(*second.address, client_id, expected_peer_id=None)
        s1 = await to_first.open_stream("inference", OpenSession(0, 2, 1, 8).to_message())
        s2 = await to_second.open_stream(
            "inference", OpenSession(2, 4, 1, 8, "c" * 24, accept_push_from=first_id.peer_id).to_message()
        )
        chain = [PushTarget(second_id.peer_id, "c" * 24)]
        await s1.send(Step(0, torch.randn(1, 1, HIDDEN), step=1, push=chain).to_message())
        assert (await s1.recv(timeout=10)).meta["pushed"] is True
        assert (await s2.recv(timeout=10)).meta["step"] == 1
        await s1.close()
        await handler.sessions_closed(None, 10)
        assert not handler._open
        with caplog.at_level("INFO", logger="swarmllm.server.handler"):
            (pushes,) = made
            await pushes.close()  # what the leaving server's pool does; the callbacks run before it returns
        assert "push to" not in caplog.text
        await to_first.close()
        await to_second.close()
    finally:
        await first.stop()
        await second.stop()


async def test_the_reply_does_not_wait_for_the_push(span):
    """Connecting to the next server is not on the chain's critical path: the reply leaves while the push is
    still under way, and the push's failure follows as a notice."""
    link_down = asyncio.Event()

    async def connect(peer_id: str):
        await link_down.wait()  # the push hangs until the test lets it fail
        raise OSError("injected: link down")

    handler = RequestHandler(Backend(span, cache_tokens=64), dict, connect=connect)
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    try:
        conn = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
        stream = await conn.open_stream("inference", OpenSession(0, 4, 1, 8).to_message())
        chain = [PushTarget(Identity.generate().peer_id, "n" * 24)]
        await stream.send(
            Step(0, torch.randn(1, 2, HIDDEN), step=1, push=chain, push_timeout_s=60).to_message()
        )
        reply = await stream.recv(timeout=10)
        assert reply.meta["step"] == 1 and reply.meta["pushed"] is True
        link_down.set()
        notice = await stream.recv(timeout=10)
        assert notice.meta == {"kind": "push_failed", "step": 1, "reason": "OSError('injected: link down')"}
        await conn.close()
    finally:
        await server.stop()


async def test_repoint_moves_the_push_permission(served):
    """After the client replaced the previous hop, only the replacement may push into the session."""
    _, conn, server = served
    old, new = Identity.generate(), Identity.generate()
    stream = await conn.open_stream(
        "inference", OpenSession(0, 4, 1, 8, "r" * 24, accept_push_from=old.peer_id).to_message()
    )
    hidden = torch.randn(1, 1, HIDDEN)
    from_old = await connect_direct(*server.address, old, expected_peer_id=None)
    from_new = await connect_direct(*server.address, new, expected_peer_id=None)
    errors = []
    await from_old.notify("push", Step(0, hidden, step=1, session_id="r" * 24).to_message(), errors.append)
    assert (await stream.recv()).meta["step"] == 1
    await stream.send(Repoint(new.peer_id).to_message())
    await stream.send(Step(1, hidden, step=2).to_message())  # the repoint is in effect once this is answered
    assert (await stream.recv()).meta["step"] == 2
    late = Step(2, hidden, step=3, session_id="r" * 24).to_message()
    assert (await refusal(from_old, late)).code == "forbidden"
    await from_new.notify("push", Step(2, hidden, step=3, session_id="r" * 24).to_message(), errors.append)
    assert (await stream.recv()).meta["step"] == 3
    assert errors == []
    for c in (from_old, from_new):
        await c.close()
    await stream.close()


async def test_leaving_finishes_queued_steps_then_hands_sessions_back(span):
    backend = Backend(span, cache_tokens=64)
    handler = RequestHandler(backend, dict)
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    try:
        conn = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
        stream = await conn.open_stream("inference", OpenSession(0, 4, 1, 8).to_message())
        hidden = torch.randn(1, 2, HIDDEN)
        await stream.send(Step(0, hidden[:, :1], step=1).to_message())
        assert (await stream.recv()).meta["step"] == 1
        await stream.send(Step(1, hidden[:, 1:], step=2).to_message())
        await _until(lambda: [s.length for s in backend.sessions.values()] == [2])
        await handler.leave(timeout_s=10)
        assert not backend.sessions and backend.budget.free_tokens == 64
        # the step the server had was answered, then the session ended with server_leaving
        assert (await stream.recv(timeout=5)).meta["step"] == 2
        with pytest.raises(RemoteError) as info:
            await stream.recv(timeout=5)
        assert info.value.code == "server_leaving"
        late = await conn.open_stream("inference", OpenSession(0, 4, 1, 8).to_message())
        with pytest.raises(RemoteError) as info:
            await late.recv(timeout=5)
        assert info.value.code == "server_leaving"
        await conn.close()
    finally:
        await server.stop()


async def test_a_push_to_our_own_session_skips_the_network(span):
    """After a failover a server may hold two consecutive hops of a chain: it pushes to itself directly."""
    identity = Identity.generate()
    handler = RequestHandler(Backend(span, cache_tokens=64), dict, peer_id=identity.peer_id)  # no connector
    server = DirectServer(handler.handlers(), identity)
    await server.start()
    try:
        conn = await connect_direct(*server.address, Identity.generate(), expected_peer_id=identity.peer_id)
        first = await conn.open_stream("inference", OpenSession(0, 2, 1, 8).to_message())
        second = await conn.open_stream(
            "inference", OpenSession(2, 4, 1, 8, "s" * 24, accept_push_from=identity.peer_id).to_message()
        )
        await _until(lambda: len(handler._open) == 2)  # both sessions are open on the server
        hidden = torch.randn(1, 3, HIDDEN)
        chain = [PushTarget(identity.peer_id, "s" * 24)]
        await first.send(Step(0, hidden, step=1, push=chain).to_message())
        assert (await first.recv()).meta["pushed"] is True
        reply = await second.recv()
        torch.testing.assert_close(reply.tensors[0], expected(span, hidden), rtol=1e-5, atol=1e-5)
        await conn.close()
    finally:
        await server.stop()


async def test_pings_measure_the_link_and_refuse_oversized_payloads(served):
    _, conn, server = served
    assert (await conn.call("ping", Message())).meta == {"bytes": 0}
    payload = torch.zeros(1000, dtype=torch.uint8)
    assert (await conn.call("ping", Message(tensors=[payload]))).meta == {"bytes": 1000}
    with pytest.raises(RemoteError, match="too_large"):  # refused before the payload is read
        await conn.call("ping", Message(tensors=[torch.zeros(PING_MAX_BYTES + 1, dtype=torch.uint8)]))
    speed = await measure_link(conn, probe_bytes=2**20)
    assert 0 < speed.rtt_s < 1 and speed.bandwidth > 10e6  # loopback: well over 10 MB/s

    async def connect(peer_id):
        if peer_id == "gone":
            raise OSError("connection refused")
        return conn

    assert (await measure_network(connect, ["gone"])) is None
    both = await measure_network(connect, ["gone", "here"])
    assert both is not None and both.bandwidth > 10e6
    # one token's activations of a 4096-wide float16 model are 8 KiB: 1 Gbit/s carries ~15k of them a second
    assert round(network_rps(parse_bandwidth(1000), 4096, 2)) == 15259


async def test_the_pool_reports_connections_that_broke_once(span):
    handler = RequestHandler(Backend(span, cache_tokens=64), dict)
    identity = Identity.generate()
    server = DirectServer(handler.handlers(), identity)
    await server.start()
    host, port = server.address
    pool = ConnectionPool(Identity.generate(), None)
    try:
        await pool.get(identity.peer_id, [f"{host}:{port}"])
        assert pool.drop_broken() == []
        await server.stop()  # the peer goes away
        await _until(lambda: pool.is_broken(identity.peer_id))
        assert pool.drop_broken() == [identity.peer_id]
        assert pool.drop_broken() == []  # reported once
    finally:
        await pool.close()
