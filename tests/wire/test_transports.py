"""Both transports end to end: the direct handshake and identities, and the wire over real hivemind P2P daemons."""

import asyncio
import logging
import os

import pytest
import pytest_asyncio
import torch
from hivemind.p2p import P2P, PeerID

from swarmllm.wire import (
    CallContext,
    ConnectionLost,
    DirectServer,
    Frame,
    Handlers,
    HandshakeError,
    Identity,
    IdentityMismatch,
    Kind,
    Message,
    RemoteError,
    WireLimits,
    connect_direct,
    connect_libp2p,
    encode_frame,
    read_frame,
    serve_libp2p,
)
from swarmllm.wire.libp2p import EMPTY_ROUTING_TABLE
from swarmllm.wire.tls import client_context, peer_id_of

pytestmark = pytest.mark.asyncio(loop_scope="module")

BOUND = 10  # seconds; only to fail a test instead of hanging


def make_handlers(finished: dict[str, asyncio.Event]) -> Handlers:
    handlers = Handlers()

    async def whoami(request: Message, context: CallContext) -> Message:
        return Message({"peer_id": context.peer_id, "transport": context.transport}, request.tensors)

    async def hang(request: Message, context: CallContext) -> Message:
        finished["hang started"].set()
        await asyncio.Future()

    async def double(opening: Message, incoming, context: CallContext):
        try:
            finished["double started"].set()
            async for message in incoming:
                yield Message(message.meta, [tensor * 2 for tensor in message.tensors])
        finally:
            finished["double"].set()

    handlers.add_unary("whoami", whoami)
    handlers.add_unary("hang", hang)
    handlers.add_stream("double", double)
    return handlers


def new_events() -> dict[str, asyncio.Event]:
    return {name: asyncio.Event() for name in ("hang started", "double started", "double")}


@pytest.fixture(scope="module")
def server_identity() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def client_identity() -> Identity:
    return Identity.generate()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def direct_server(server_identity):
    server = DirectServer(make_handlers(new_events()), server_identity, handshake_timeout=0.5)
    await server.start()
    yield server
    await server.stop()


async def test_handshake_proves_both_identities(direct_server, server_identity, client_identity):
    connection = await connect_direct(
        *direct_server.address, client_identity, expected_peer_id=server_identity.peer_id
    )
    try:
        assert connection.remote_peer_id == server_identity.peer_id and connection.transport == "direct"
        reply = await connection.call("whoami", Message(), timeout=BOUND)
        assert reply.meta == {"peer_id": client_identity.peer_id, "transport": "direct"}
    finally:
        await connection.close()


async def test_wrong_expected_peer_id(direct_server, server_identity, client_identity):
    with pytest.raises(IdentityMismatch):
        await connect_direct(
            *direct_server.address, client_identity, expected_peer_id=client_identity.peer_id
        )
    connection = await connect_direct(*direct_server.address, client_identity, expected_peer_id=None)
    try:
        assert connection.remote_peer_id == server_identity.peer_id  # still proven, just not checked
    finally:
        await connection.close()


async def test_impersonation_is_refused(direct_server, server_identity):
    """A client claiming someone else's public key cannot sign for it; the server refuses and stays up."""
    victim, attacker = Identity.generate(), Identity.generate()
    reader, writer = await asyncio.open_connection(
        *direct_server.address, ssl=client_context(), server_hostname=""
    )
    handshake_limits = WireLimits(max_payload_bytes=0)
    writer.writelines(
        encode_frame(
            Frame(Kind.MESSAGE, 0, Message({"key": victim.public_key_bytes, "nonce": os.urandom(32)}))
        )
    )
    hello = await asyncio.wait_for(read_frame(reader, handshake_limits), BOUND)
    assert hello.message.meta["key"] == server_identity.public_key_bytes
    writer.writelines(encode_frame(Frame(Kind.MESSAGE, 0, Message({"sig": attacker.sign(b"anything")}))))
    refusal = await asyncio.wait_for(read_frame(reader, handshake_limits), BOUND)
    assert refusal.kind is Kind.ERROR and refusal.message.meta["code"] == "bad_handshake"
    assert await asyncio.wait_for(reader.read(), BOUND) == b""  # and closes the connection
    writer.close()
    connection = await connect_direct(
        *direct_server.address, victim, expected_peer_id=server_identity.peer_id
    )
    await connection.close()


async def test_the_server_certificate_carries_its_identity_key(direct_server, server_identity):
    _, writer = await asyncio.open_connection(
        *direct_server.address, ssl=client_context(), server_hostname=""
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.3"
        assert peer_id_of(ssl_object) == server_identity.peer_id
    finally:
        writer.close()


async def test_silent_client_is_dropped_after_handshake_timeout(direct_server):
    """Silent before TLS, and silent after TLS but before the identity handshake."""
    reader, writer = await asyncio.open_connection(*direct_server.address)
    assert await asyncio.wait_for(reader.read(), BOUND) == b""
    writer.close()
    reader, writer = await asyncio.open_connection(
        *direct_server.address, ssl=client_context(), server_hostname=""
    )
    assert await asyncio.wait_for(reader.read(), BOUND) == b""
    writer.close()


async def test_connecting_to_something_else(client_identity):
    with pytest.raises(ConnectionLost):
        await connect_direct(
            "127.0.0.1", 1, client_identity, expected_peer_id=None
        )  # nothing listens on port 1

    async def http_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(http_server, "127.0.0.1", 0)
    try:
        with pytest.raises(HandshakeError):
            await connect_direct(*server.sockets[0].getsockname()[:2], client_identity, expected_peer_id=None)
    finally:
        server.close()


async def test_identity_files_are_interchangeable_with_hivemind(tmp_path):
    path = tmp_path / "identity.key"
    identity = Identity.load_or_create(path)
    assert Identity.load_or_create(path).peer_id == identity.peer_id
    assert PeerID.from_identity(path.read_bytes()).to_base58() == identity.peer_id
    assert path.stat().st_mode & 0o777 == 0o600
    hivemind_path = tmp_path / "hivemind.key"
    P2P.generate_identity(str(hivemind_path))
    assert (
        Identity.load(hivemind_path).peer_id == PeerID.from_identity(hivemind_path.read_bytes()).to_base58()
    )
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], identity_path=str(path))
    try:
        assert p2p.peer_id.to_base58() == identity.peer_id
    finally:
        await p2p.shutdown()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def p2p_pair():
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs()
    )
    events = new_events()
    await serve_libp2p(server, make_handlers(events))
    yield server, client, events
    await client.shutdown()
    await server.shutdown()


async def test_libp2p_unary_and_stream(p2p_pair):
    server, client, events = p2p_pair
    connection = await connect_libp2p(client, server.peer_id.to_base58())
    try:
        assert connection.transport == "libp2p" and connection.remote_peer_id == server.peer_id.to_base58()
        hidden = torch.randn(1, 1, 4096)
        reply = await connection.call("whoami", Message(tensors=[hidden]), timeout=BOUND)
        assert reply.meta == {"peer_id": client.peer_id.to_base58(), "transport": "libp2p"}
        assert torch.equal(reply.tensors[0], hidden)
        async with await connection.open_stream("double", Message()) as stream:
            for step in range(50):
                x = torch.randn(2, 3)
                await stream.send(Message({"step": step}, [x]))
                reply = await stream.recv(timeout=BOUND)
                assert reply.meta == {"step": step} and torch.equal(reply.tensors[0], x * 2)
        await asyncio.wait_for(events["double"].wait(), BOUND)
        with pytest.raises(RemoteError):
            await connection.call("nope", Message(), timeout=BOUND)
    finally:
        await connection.close()


async def test_libp2p_large_tensor(p2p_pair):
    server, client, _ = p2p_pair
    connection = await connect_libp2p(client, server.peer_id.to_base58())
    try:
        big = torch.randn(4, 1024, 1024)  # 16 MiB, far above hivemind's 4 MiB unary limit
        reply = await connection.call("whoami", Message(tensors=[big, torch.arange(5)]), timeout=60)
        assert torch.equal(reply.tensors[0], big) and torch.equal(reply.tensors[1], torch.arange(5))
    finally:
        await connection.close()


async def test_libp2p_client_close_reaches_the_server(p2p_pair):
    server, client, events = p2p_pair
    events["double started"].clear()
    events["double"].clear()
    connection = await connect_libp2p(client, server.peer_id.to_base58())
    await connection.open_stream("double", Message())
    await asyncio.wait_for(events["double started"].wait(), BOUND)
    await connection.close()
    await asyncio.wait_for(events["double"].wait(), BOUND)  # EOF through both daemons cancelled the handler


async def test_libp2p_peer_without_the_protocol(p2p_pair):
    server, client, _ = p2p_pair
    with pytest.raises(ConnectionLost):
        await connect_libp2p(server, client.peer_id.to_base58())


async def test_libp2p_a_daemon_that_has_met_no_peer_yet_is_asked_again(p2p_pair, caplog):
    """A daemon's routing table fills as it meets its initial peers, a moment after it starts, so an empty one
    is asked again for a while (`_open_stream`): a connection opened before the daemon meets the server gets
    through once it has; one that never meets a peer ends in ConnectionLost, within the connection's timeout."""
    server, _, _ = p2p_pair
    caplog.set_level(logging.DEBUG, logger="swarmllm.wire.libp2p")
    lonely = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    try:
        with pytest.raises(ConnectionLost, match=EMPTY_ROUTING_TABLE):
            await connect_libp2p(lonely, server.peer_id.to_base58(), timeout=1.0)
        caplog.clear()
        opening = asyncio.create_task(connect_libp2p(lonely, server.peer_id.to_base58(), timeout=BOUND))
        async with asyncio.timeout(BOUND):
            while not any("met no peer yet" in r.getMessage() for r in caplog.records):
                await asyncio.sleep(0.01)  # (until the first attempt has failed)
        suffix = f"/p2p/{server.peer_id.to_base58()}"
        maddrs = [maddr.decapsulate(suffix) for maddr in await server.get_visible_maddrs()]
        await lonely._client.connect(server.peer_id, maddrs)  # now it meets the server
        connection = await opening
        assert connection.remote_peer_id == server.peer_id.to_base58()
        await connection.close()
    finally:
        await lonely.shutdown()


async def test_libp2p_server_shutdown_fails_pending_calls(p2p_pair):
    _, client, _ = p2p_pair
    doomed = await P2P.create(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await client.get_visible_maddrs()
    )
    events = new_events()
    await serve_libp2p(doomed, make_handlers(events))
    connection = await connect_libp2p(client, doomed.peer_id.to_base58())
    pending = asyncio.create_task(connection.call("hang", Message()))
    await asyncio.wait_for(events["hang started"].wait(), BOUND)
    await doomed.shutdown()
    with pytest.raises(ConnectionLost):
        await asyncio.wait_for(pending, BOUND)
    assert connection.is_closed
    await connection.close()
