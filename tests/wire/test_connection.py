"""Calls over real loopback sockets: multiplexing, streams, errors, timeouts and connections that break."""

import asyncio
import contextlib
from collections import defaultdict

import pytest
import pytest_asyncio
import torch
import uvloop

from swarmllm.wire import (
    CallContext,
    Connection,
    ConnectionLost,
    DirectServer,
    Frame,
    FrameError,
    Handlers,
    Identity,
    Kind,
    Message,
    RemoteError,
    RequestError,
    StreamClosed,
    WireLimits,
    connect_direct,
    encode_frame,
    read_frame,
    serve_connection,
)
from swarmllm.wire.tls import client_context

BOUND = 10  # seconds; only to fail a test instead of hanging, never to wait for something to happen


class Probe:
    """Lets tests wait for handler events (started, finished) instead of sleeping."""

    def __init__(self) -> None:
        self.events: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
        self.gates: defaultdict[int, asyncio.Event] = defaultdict(asyncio.Event)
        self.started = 0
        self.all_started = asyncio.Event()
        self.expected = 0
        self.notes: list[tuple[dict, str | None]] = []  # what the `note` notice was given, and by whom

    async def wait(self, name: str) -> None:
        await asyncio.wait_for(self.events[name].wait(), BOUND)


def make_handlers(probe: Probe) -> Handlers:
    handlers = Handlers()

    async def echo(request: Message, context: CallContext) -> Message:
        return Message(
            {**request.meta, "peer_id": context.peer_id, "transport": context.transport}, request.tensors
        )

    async def gated(request: Message, context: CallContext) -> Message:
        probe.started += 1
        if probe.started == probe.expected:
            probe.all_started.set()
        await probe.gates[request.meta["gate"]].wait()
        return Message({"gate": request.meta["gate"]})

    async def hang(request: Message, context: CallContext) -> Message:
        try:
            probe.events["hang started"].set()
            await asyncio.Future()
        finally:
            probe.events["hang finished"].set()

    async def fail_request(request: Message, context: CallContext) -> Message:
        raise RequestError("bad_input", "position must be >= 0")

    async def crash(request: Message, context: CallContext) -> Message:
        raise ValueError("boom")

    async def wrong_type(request: Message, context: CallContext) -> Message:
        return {"not": "a Message"}

    async def accumulate(opening: Message, incoming, context: CallContext):
        """Yields the running sum of every tensor it gets; fails on request; reports when it is cleaned up."""
        total = opening.tensors[0].clone()
        try:
            probe.events["accumulate started"].set()
            async for message in incoming:
                if message.meta.get("fail"):
                    raise RequestError("bad_step", "asked to fail")
                total += message.tensors[0]
                yield Message({"step": message.meta["step"]}, [total])
        finally:
            probe.events["accumulate finished"].set()

    async def ignore_input(opening: Message, incoming, context: CallContext):
        await probe.gates[opening.meta["gate"]].wait()
        yield Message({"done": True})

    async def open_gate(request: Message, context: CallContext) -> Message:
        probe.gates[request.meta["gate"]].set()
        return Message()

    async def countdown(opening: Message, incoming, context: CallContext):
        for i in reversed(range(opening.meta["n"])):
            yield Message({"left": i})

    handlers.add_unary("echo", echo)
    handlers.add_unary("gated", gated)
    handlers.add_unary("hang", hang)
    handlers.add_unary("fail_request", fail_request)
    handlers.add_unary("crash", crash)
    handlers.add_unary("wrong_type", wrong_type)
    handlers.add_stream("accumulate", accumulate)
    handlers.add_stream("countdown", countdown)
    handlers.add_stream("ignore_input", ignore_input)
    handlers.add_unary("open_gate", open_gate)

    def note(request: Message, context: CallContext) -> None:
        if request.meta.get("fail"):
            raise RequestError("bad_input", "asked to fail")
        if request.meta.get("crash"):
            raise ValueError("notice boom")
        probe.notes.append((request.meta, context.peer_id))

    async def inject(opening: Message, incoming, context: CallContext):
        """Messages its own code puts into `incoming` are handled in order with the caller's."""
        incoming.put_nowait(Message({"injected": 0}))
        async for message in incoming:
            yield Message({"got": message.meta})
            if message.meta.get("inject"):
                incoming.put_nowait(Message({"injected": message.meta["inject"]}))

    async def mailbox(opening: Message, incoming, context: CallContext):
        """Answers every message put into it, by the caller or by the notice `post`."""
        probe.mailbox = incoming
        probe.events["mailbox open"].set()
        async for message in incoming:
            yield Message({"answered": message.meta})

    def post(request: Message, context: CallContext) -> None:
        probe.mailbox.put_nowait(Message(request.meta))

    handlers.add_notice("note", note)
    handlers.add_stream("inject", inject)
    handlers.add_stream("mailbox", mailbox)
    handlers.add_notice("post", post)
    return handlers


@pytest.fixture(scope="module")
def server_identity() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def client_identity() -> Identity:
    return Identity.generate()


@pytest.fixture
def probe() -> Probe:
    return Probe()


@pytest_asyncio.fixture(loop_scope="function")
async def server(probe, server_identity):
    server = DirectServer(make_handlers(probe), server_identity)
    await server.start()
    yield server
    await server.stop()


@pytest_asyncio.fixture(loop_scope="function")
async def connection(server, server_identity, client_identity):
    connection = await connect_direct(
        *server.address, client_identity, expected_peer_id=server_identity.peer_id
    )
    yield connection
    await connection.close()


async def test_unary_call_round_trips_meta_and_tensors(connection, client_identity):
    hidden = torch.randn(1, 1, 4096)
    reply = await connection.call("echo", Message({"position": 3}, [hidden]), timeout=BOUND)
    assert reply.meta == {"position": 3, "peer_id": client_identity.peer_id, "transport": "direct"}
    assert torch.equal(reply.tensors[0], hidden)


async def test_concurrent_unary_calls_complete_out_of_order(connection, probe):
    n = 8
    probe.expected = n
    calls = [asyncio.create_task(connection.call("gated", Message({"gate": i}))) for i in range(n)]
    await asyncio.wait_for(probe.all_started.wait(), BOUND)  # all n calls are open on one connection at once
    for i in reversed(range(n)):
        probe.gates[i].set()
        reply = await asyncio.wait_for(calls[i], BOUND)
        assert reply.meta == {"gate": i}
        assert not any(call.done() for call in calls[:i])


async def test_many_concurrent_echo_calls(connection):
    tensors = [torch.randn(3, 5) for _ in range(200)]
    replies = await asyncio.gather(
        *(connection.call("echo", Message({"i": i}, [t])) for i, t in enumerate(tensors))
    )
    for i, (reply, tensor) in enumerate(zip(replies, tensors, strict=True)):
        assert reply.meta["i"] == i and torch.equal(reply.tensors[0], tensor)


async def test_stream_many_steps(connection, probe):
    stream = await connection.open_stream("accumulate", Message(tensors=[torch.zeros(4)]))
    expected = torch.zeros(4)
    for step in range(300):
        delta = torch.randn(4)
        expected += delta
        await stream.send(Message({"step": step}, [delta]))
        reply = await stream.recv(timeout=BOUND)
        assert reply.meta == {"step": step}
        torch.testing.assert_close(reply.tensors[0], expected)
    await stream.close()
    await stream.close()  # idempotent
    await probe.wait("accumulate finished")  # our END ended the handler's incoming iterator
    with pytest.raises(StreamClosed):
        await stream.send(Message())


async def test_stream_ended_by_server(connection):
    async with await connection.open_stream("countdown", Message({"n": 3})) as stream:
        assert [(await stream.recv(timeout=BOUND)).meta["left"] for _ in range(3)] == [2, 1, 0]
        for _ in range(2):  # stays ended
            with pytest.raises(StreamClosed):
                await stream.recv(timeout=BOUND)


async def test_closing_an_unread_stream_unblocks_the_connection(connection):
    stream = await connection.open_stream("countdown", Message({"n": 1000}))  # far more than its inbox holds
    first = await stream.recv(timeout=BOUND)
    assert first.meta == {"left": 999}
    await stream.close()
    assert (await connection.call("echo", Message({"ok": 1}), timeout=BOUND)).meta["ok"] == 1


async def test_server_handler_that_ignores_input_does_not_block_the_connection(
    connection, server, client_identity
):
    stream = await connection.open_stream("ignore_input", Message({"gate": 7}))
    for step in range(
        1000
    ):  # far more than the handler's inbox holds: the server stops reading this connection
        await stream.send(Message({"step": step}))
    echo = asyncio.create_task(connection.call("echo", Message({"ok": 1})))
    other = await connect_direct(*server.address, client_identity, expected_peer_id=None)
    await other.call(
        "open_gate", Message({"gate": 7}), timeout=BOUND
    )  # the handler returns, never having read
    await other.close()
    assert (await stream.recv(timeout=BOUND)).meta == {"done": True}
    assert (await asyncio.wait_for(echo, BOUND)).meta["ok"] == 1
    await stream.close()


async def test_request_error_and_crash_become_remote_errors(connection):
    with pytest.raises(RemoteError) as info:
        await connection.call("fail_request", Message(), timeout=BOUND)
    assert (info.value.code, info.value.message) == ("bad_input", "position must be >= 0")
    with pytest.raises(RemoteError) as info:
        await connection.call("crash", Message(), timeout=BOUND)
    assert info.value.code == "internal" and info.value.message == "ValueError: boom"
    with pytest.raises(RemoteError, match="TypeError"):
        await connection.call("wrong_type", Message(), timeout=BOUND)
    assert (await connection.call("echo", Message({"still": "up"}), timeout=BOUND)).meta["still"] == "up"


async def test_a_notice_is_answered_only_when_it_fails(probe, connection, client_identity):
    """A notice runs in the read loop, in order with the connection's other frames (so by the time a later
    call is answered it has run); success sends nothing back, a failure reaches the caller's on_error."""
    errors: list = []
    probe.notes.clear()
    await connection.notify("note", Message({"x": 1}, [torch.randn(2, 3)]), errors.append)
    await connection.call("echo", Message(), timeout=BOUND)
    assert probe.notes == [({"x": 1}, client_identity.peer_id)] and errors == []

    failed = asyncio.get_running_loop().create_future()
    await connection.notify("note", Message({"fail": True}), failed.set_result)
    error = await asyncio.wait_for(failed, BOUND)
    assert isinstance(error, RemoteError) and (error.code, error.message) == ("bad_input", "asked to fail")
    crashed = asyncio.get_running_loop().create_future()
    await connection.notify("note", Message({"crash": True}), crashed.set_result)
    error = await asyncio.wait_for(crashed, BOUND)
    assert error.code == "internal" and error.message == "ValueError: notice boom"
    await connection.notify("note", Message({"still": "up"}), errors.append)
    await connection.call("echo", Message(), timeout=BOUND)
    assert probe.notes[-1][0] == {"still": "up"} and errors == []


async def test_a_notice_learns_that_its_connection_ended(probe, server_identity, client_identity):
    """Whether a notice ran is unknown once its connection is gone, so the last ones sent hear of the loss."""
    server = DirectServer(make_handlers(probe), server_identity)
    await server.start()
    connection = await connect_direct(*server.address, client_identity, expected_peer_id=None)
    lost = asyncio.get_running_loop().create_future()
    await connection.notify("note", Message({"n": 1}), lost.set_result)
    await connection.call("echo", Message(), timeout=BOUND)  # the notice ran: no answer came for it
    assert not lost.done()
    await server.stop()
    assert isinstance(await asyncio.wait_for(lost, BOUND), ConnectionLost)
    with pytest.raises(ConnectionLost):
        await connection.notify("note", Message(), lost.set_result)
    await connection.close()


async def test_a_watcher_sees_what_a_stream_receives_while_it_is_received_as_usual(connection):
    """`Stream.watch`: what already waits, then each arrival and the stream's end, as it comes; recv still gets
    all of it, and `watch(None)` stops the showing."""
    stream = await connection.open_stream("countdown", Message({"n": 3}))
    first = await stream.recv(timeout=BOUND)
    await connection.call("echo", Message(), timeout=BOUND)  # the rest has arrived by now (frames in order)
    seen: list = []
    stream.watch(seen.append)
    assert [m.meta for m in seen[:2]] == [{"left": 1}, {"left": 0}] and isinstance(seen[2], StreamClosed)
    assert [first.meta, (await stream.recv()).meta, (await stream.recv()).meta] == [
        {"left": 2},
        {"left": 1},
        {"left": 0},
    ]
    with pytest.raises(StreamClosed):
        await stream.recv()

    async with await connection.open_stream("accumulate", Message(tensors=[torch.zeros(1)])) as live:
        seen.clear()
        live.watch(seen.append)
        await live.send(Message({"step": 0}, [torch.ones(1)]))
        assert (await live.recv(timeout=BOUND)).meta == {"step": 0}
        assert [m.meta for m in seen] == [{"step": 0}]
        live.watch(None)
        await live.send(Message({"step": 1}, [torch.ones(1)]))
        assert (await live.recv(timeout=BOUND)).meta == {"step": 1} and len(seen) == 1


async def test_stream_handler_can_queue_its_own_messages_in_order(connection):
    async with await connection.open_stream("inject", Message()) as stream:
        assert (await stream.recv(timeout=BOUND)).meta == {"got": {"injected": 0}}
        await stream.send(Message({"inject": 5}))
        assert (await stream.recv(timeout=BOUND)).meta == {"got": {"inject": 5}}
        assert (await stream.recv(timeout=BOUND)).meta == {"got": {"injected": 5}}
        await stream.send(Message({"step": 1}))
        assert (await stream.recv(timeout=BOUND)).meta == {"got": {"step": 1}}


async def test_stream_handler_error(connection, probe):
    stream = await connection.open_stream("accumulate", Message(tensors=[torch.zeros(1)]))
    await stream.send(Message({"step": 0}, [torch.ones(1)]))
    assert (await stream.recv(timeout=BOUND)).meta == {"step": 0}
    await stream.send(Message({"fail": True}))
    with pytest.raises(RemoteError) as info:
        await stream.recv(timeout=BOUND)
    assert info.value.code == "bad_step"
    await probe.wait("accumulate finished")
    await stream.close()
    assert (await connection.call("echo", Message({"ok": 1}), timeout=BOUND)).meta["ok"] == 1


async def test_unknown_method(connection):
    with pytest.raises(RemoteError) as info:
        await connection.call("no_such_method", Message(), timeout=BOUND)
    assert info.value.code == "unknown_method"
    stream = await connection.open_stream("no_such_stream", Message())
    with pytest.raises(RemoteError):
        await stream.recv(timeout=BOUND)


async def test_timeout_cancels_the_server_handler(connection, probe):
    with pytest.raises(asyncio.TimeoutError):
        await connection.call("hang", Message(), timeout=0.2)
    await probe.wait("hang finished")  # the END we sent on giving up cancelled the handler
    assert not connection.is_closed
    assert (await connection.call("echo", Message({"after": "timeout"}), timeout=BOUND)).meta[
        "after"
    ] == "timeout"


async def test_server_closing_mid_call_raises_connection_lost(connection, server, probe):
    stream = await connection.open_stream("accumulate", Message(tensors=[torch.zeros(1)]))
    pending_call = asyncio.create_task(connection.call("hang", Message()))
    pending_recv = asyncio.create_task(stream.recv())
    await probe.wait("hang started")
    await probe.wait("accumulate started")
    await server.stop()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(pending_call, BOUND)
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(pending_recv, BOUND)
    assert connection.is_closed
    assert probe.events["hang finished"].is_set() and probe.events["accumulate finished"].is_set()
    with pytest.raises(ConnectionLost):
        await connection.call("echo", Message())
    with pytest.raises(ConnectionLost):
        await stream.recv()


async def test_client_disconnect_cancels_stream_handlers(connection, probe):
    stream = await connection.open_stream("accumulate", Message(tensors=[torch.zeros(1)]))
    await probe.wait("accumulate started")
    await connection.close()
    await probe.wait("accumulate finished")
    with pytest.raises(ConnectionLost):
        await stream.recv()


async def test_large_tensor(connection):
    big = torch.randn(4, 1024, 1024)  # 16 MiB
    reply = await connection.call("echo", Message(tensors=[big]), timeout=60)
    assert torch.equal(reply.tensors[0], big)


async def test_oversized_message_fails_only_its_call(server, server_identity, client_identity):
    small = WireLimits(max_payload_bytes=1024)
    connection = await connect_direct(*server.address, client_identity, expected_peer_id=None, limits=small)
    try:
        with pytest.raises(FrameError):
            await connection.call("echo", Message(tensors=[torch.zeros(1024)]))
        assert (await connection.call("echo", Message({"ok": 1}), timeout=BOUND)).meta["ok"] == 1
    finally:
        await connection.close()


async def test_open_calls_per_connection_are_limited(probe, server_identity, client_identity):
    server = DirectServer(make_handlers(probe), server_identity, limits=WireLimits(max_open_calls=2))
    await server.start()
    connection = await connect_direct(*server.address, client_identity, expected_peer_id=None)
    try:
        probe.expected = 2
        calls = [asyncio.create_task(connection.call("gated", Message({"gate": i}))) for i in range(2)]
        await asyncio.wait_for(probe.all_started.wait(), BOUND)
        with pytest.raises(RemoteError) as info:
            await connection.call("echo", Message(), timeout=BOUND)
        assert info.value.code == "too_many_calls"
        probe.gates[0].set()
        probe.gates[1].set()
        await asyncio.wait_for(asyncio.gather(*calls), BOUND)
        assert (await connection.call("echo", Message({"ok": 1}), timeout=BOUND)).meta["ok"] == 1
    finally:
        await connection.close()
        await server.stop()


async def test_a_call_refused_at_its_header_never_reaches_its_handler(
    probe, server_identity, client_identity
):
    """`Handlers.admit` refuses calls before their payload is read: the caller gets the refusal's code, the
    handler never runs, notices are not asked about, and the connection goes on with the next call."""
    handlers = make_handlers(probe)
    asked: list[str | None] = []
    refuse = [True, False, True]

    def admit(peer_id: str | None) -> RequestError | None:
        asked.append(peer_id)
        return RequestError("quota", "over the rate") if refuse[len(asked) - 1] else None

    handlers.admit = admit
    server = DirectServer(handlers, server_identity)
    await server.start()
    connection = await connect_direct(*server.address, client_identity, expected_peer_id=None)
    try:
        with pytest.raises(RemoteError) as info:
            await connection.call("gated", Message({"gate": 0}, [torch.zeros(1 << 16)]), timeout=BOUND)
        assert (info.value.code, info.value.message) == ("quota", "over the rate")
        assert probe.started == 0  # the handler never ran
        errors: list = []
        await connection.notify("note", Message({"n": 1}), errors.append)  # not asked about
        assert (await connection.call("echo", Message({"ok": 1}), timeout=BOUND)).meta["ok"] == 1
        stream = await connection.open_stream("accumulate", Message({}))
        with pytest.raises(RemoteError) as info:
            await stream.recv()
        assert info.value.code == "quota"
        assert asked == [client_identity.peer_id] * 3
        assert probe.notes[-1][0] == {"n": 1} and errors == []
    finally:
        await connection.close()
        await server.stop()


async def test_garbage_to_direct_server_closes_only_that_connection(connection, server, server_identity):
    garbage = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" + bytes(range(256)) * 4
    for tls in (None, client_context()):  # instead of TLS, and inside TLS instead of the identity handshake
        reader, writer = await asyncio.open_connection(
            *server.address, ssl=tls, server_hostname="" if tls else None
        )
        writer.write(garbage)
        rest = await asyncio.wait_for(reader.read(), BOUND)  # read() returns at EOF: the server closed it
        writer.close()
        assert tls is None or b"bad_handshake" in rest
    assert (await connection.call("echo", Message({"ok": 1}), timeout=BOUND)).meta["ok"] == 1
    fresh = await connect_direct(
        *server.address, Identity.generate(), expected_peer_id=server_identity.peer_id
    )
    try:
        assert (await fresh.call("echo", Message({"ok": 2}), timeout=BOUND)).meta["ok"] == 2
    finally:
        await fresh.close()


@contextlib.asynccontextmanager
async def _raw_connection(probe: Probe, limits: WireLimits):
    """A plain TCP connection to `serve_connection` with the test handlers: the test writes and reads frames."""

    async def serve(reader, writer):
        await serve_connection(
            reader, writer, make_handlers(probe), limits=limits, peer_id=None, transport="direct"
        )

    tcp_server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection(*tcp_server.sockets[0].getsockname()[:2])
        yield reader, writer
        writer.close()
    finally:
        tcp_server.close()


async def test_bad_frame_mid_connection_gets_error_frame_then_close(probe):
    limits = WireLimits()
    async with _raw_connection(probe, limits) as (reader, writer):
        writer.writelines(encode_frame(Frame(Kind.REQUEST, 1, Message({"a": 1}), "echo")))
        reply = await asyncio.wait_for(read_frame(reader, limits), BOUND)
        assert reply.kind is Kind.REPLY and reply.call_id == 1 and reply.message.meta["a"] == 1
        writer.write(b"\x00" * 64)
        error = await asyncio.wait_for(read_frame(reader, limits), BOUND)
        assert error.kind is Kind.ERROR and error.call_id == 0 and error.message.meta["code"] == "bad_frame"
        with pytest.raises(ConnectionLost):
            await asyncio.wait_for(read_frame(reader, limits), BOUND)


async def test_a_notice_that_succeeds_puts_no_frame_on_the_wire(probe):
    """What a notice hands to a stream (a push into a session) is answered there, and the notice itself never
    is: the next frame on the wire answers the call after it."""
    limits = WireLimits()
    async with _raw_connection(probe, limits) as (reader, writer):
        writer.writelines(encode_frame(Frame(Kind.REQUEST, 1, Message(), "mailbox")))
        await probe.wait("mailbox open")
        writer.writelines(encode_frame(Frame(Kind.REQUEST, 2, Message({"n": 1}), "post")))
        writer.writelines(encode_frame(Frame(Kind.REQUEST, 3, Message({"after": 1}), "echo")))
        frames = [await asyncio.wait_for(read_frame(reader, limits), BOUND) for _ in range(2)]
        assert sorted((f.kind.name, f.call_id) for f in frames) == [("MESSAGE", 1), ("REPLY", 3)]
        assert next(f for f in frames if f.call_id == 1).message.meta == {"answered": {"n": 1}}


@pytest.mark.parametrize("scenario", ["calls", "stream", "large", "server_stops"])
def test_under_uvloop(scenario, server_identity, client_identity):
    """The same paths on uvloop, whose transports keep references to sent buffers instead of copying them."""

    async def run() -> None:
        probe = Probe()
        server = DirectServer(make_handlers(probe), server_identity)
        await server.start()
        connection: Connection = await connect_direct(
            *server.address, client_identity, expected_peer_id=server_identity.peer_id
        )
        try:
            if scenario == "calls":
                tensors = [torch.randn(1, 1, 4096) for _ in range(100)]
                replies = await asyncio.gather(
                    *(connection.call("echo", Message(tensors=[t])) for t in tensors)
                )
                assert all(torch.equal(r.tensors[0], t) for r, t in zip(replies, tensors, strict=True))
            elif scenario == "stream":
                async with await connection.open_stream(
                    "accumulate", Message(tensors=[torch.zeros(8)])
                ) as stream:
                    for step in range(100):
                        await stream.send(Message({"step": step}, [torch.ones(8)]))
                        reply = await stream.recv(timeout=BOUND)
                        assert torch.equal(reply.tensors[0], torch.full((8,), step + 1.0))
            elif scenario == "large":
                big = torch.randn(4, 1024, 1024)
                assert torch.equal(
                    (await connection.call("echo", Message(tensors=[big]), timeout=60)).tensors[0], big
                )
            else:
                pending = asyncio.create_task(connection.call("hang", Message()))
                await probe.wait("hang started")
                await server.stop()
                with pytest.raises(ConnectionLost):
                    await asyncio.wait_for(pending, BOUND)
        finally:
            await connection.close()
            await server.stop()

    uvloop.run(run())
