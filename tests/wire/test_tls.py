"""What a third party on the wire can do to the direct path, and private swarms' membership on both transports.

A relay on 127.0.0.1 sits between client and server (as an on-path attacker would), records every byte, and can
flip or inject bytes. It must see none of a step's tensor bytes, and what it alters must break the connection,
never reach a handler as a forged frame.
"""

import asyncio

import pytest
import pytest_asyncio
import torch
from hivemind.p2p import P2P

from swarmllm.wire import (
    CallContext,
    ConnectionLost,
    DirectServer,
    Frame,
    Handlers,
    Identity,
    Kind,
    Message,
    NotAMember,
    SwarmKey,
    connect_direct,
    connect_libp2p,
    encode_frame,
    serve_libp2p,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

BOUND = 10  # seconds; only to fail a test instead of hanging


class Relay:
    """A TCP relay that records both directions and, when told, corrupts what the client sends next."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.to_server = bytearray()
        self.to_client = bytearray()
        self.flip_next = False  # flip one bit in the next chunk from the client
        self.inject: bytes | None = (
            None  # send these bytes to the server before the next chunk from the client
        )
        self.tampered = asyncio.Event()
        self._server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, "127.0.0.1", 0)
        self.address = self._server.sockets[0].getsockname()[:2]

    async def stop(self) -> None:
        self._server.close()

    async def _on_connection(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(
            self._pipe(client_reader, server_writer, self.to_server, tamper=True),
            self._pipe(server_reader, client_writer, self.to_client, tamper=False),
        )

    async def _pipe(self, reader, writer, record: bytearray, *, tamper: bool) -> None:
        try:
            while chunk := await reader.read(1 << 16):
                if tamper and self.inject is not None:
                    writer.write(self.inject)
                    self.inject = None
                    self.tampered.set()
                if tamper and self.flip_next:
                    chunk = bytearray(chunk)
                    chunk[len(chunk) // 2] ^= 0x01
                    self.flip_next = False
                    self.tampered.set()
                record += chunk
                writer.write(chunk)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


def echo_handlers(received: list) -> Handlers:
    handlers = Handlers()

    async def echo(request: Message, context: CallContext) -> Message:
        received.append(request)
        return Message({"peer_id": context.peer_id}, request.tensors)

    handlers.add_unary("echo", echo)
    return handlers


@pytest_asyncio.fixture(loop_scope="module")
async def relayed():
    """A server, a relay in front of it, and what the server's handler received."""
    received: list[Message] = []
    identity = Identity.generate()
    server = DirectServer(echo_handlers(received), identity)
    await server.start()
    relay = Relay(server.address)
    await relay.start()
    yield relay, identity, received
    await relay.stop()
    await server.stop()


def distinctive_tensor() -> torch.Tensor:
    """1x1x4096 fp32 whose bytes (and every 16-byte window of them) are unlikely anywhere else."""
    return torch.arange(4096, dtype=torch.float32).reshape(1, 1, 4096) * 1.000123 + 7.25


async def test_an_observer_reads_no_tensor_bytes(relayed):
    relay, server_identity, received = relayed
    client = Identity.generate()
    x = distinctive_tensor()
    connection = await connect_direct(*relay.address, client, expected_peer_id=server_identity.peer_id)
    try:
        reply = await connection.call("echo", Message({"position": 1}, [x]), timeout=BOUND)
    finally:
        await connection.close()
    assert torch.equal(reply.tensors[0], x) and reply.meta["peer_id"] == client.peer_id
    assert len(relay.to_server) > x.numel() * 4 and len(relay.to_client) > x.numel() * 4  # it all went past
    raw = x.numpy().tobytes()
    windows = {raw[i : i + 16] for i in range(0, len(raw) - 16, 16)}
    for captured in (bytes(relay.to_server), bytes(relay.to_client)):
        assert not any(window in captured for window in windows)
        assert b"echo" not in captured and b"position" not in captured  # nor the method or metadata


async def test_a_flipped_bit_breaks_the_connection(relayed):
    relay, server_identity, received = relayed
    connection = await connect_direct(
        *relay.address, Identity.generate(), expected_peer_id=server_identity.peer_id
    )
    try:
        await connection.call("echo", Message({"n": 0}, [distinctive_tensor()]), timeout=BOUND)
        relay.flip_next = True
        with pytest.raises(ConnectionLost):
            await connection.call("echo", Message({"n": 1}, [distinctive_tensor()]), timeout=BOUND)
    finally:
        await connection.close()
    assert relay.tampered.is_set()
    assert [m.meta["n"] for m in received] == [0]  # the altered frame reached no handler


async def test_an_injected_frame_is_not_delivered(relayed):
    relay, server_identity, received = relayed
    connection = await connect_direct(
        *relay.address, Identity.generate(), expected_peer_id=server_identity.peer_id
    )
    try:
        await connection.call("echo", Message({"n": 0}), timeout=BOUND)
        forged = Frame(Kind.REQUEST, 99, Message({"n": "forged"}), "echo")
        relay.inject = b"".join(encode_frame(forged))
        with pytest.raises(ConnectionLost):
            await connection.call("echo", Message({"n": 1}), timeout=BOUND)
    finally:
        await connection.close()
    assert relay.tampered.is_set()
    assert [m.meta["n"] for m in received] == [0]


async def test_a_relay_with_its_own_key_cannot_pose_as_the_server(relayed):
    """An attacker terminating TLS itself has only its own certificate, which names another peer."""
    relay, server_identity, _ = relayed
    impostor = DirectServer(echo_handlers([]), Identity.generate())
    await impostor.start()
    try:
        with pytest.raises(Exception, match="expected peer"):
            await connect_direct(
                *impostor.address, Identity.generate(), expected_peer_id=server_identity.peer_id
            )
    finally:
        await impostor.stop()


@pytest.fixture(scope="module")
def swarm_key() -> SwarmKey:
    return SwarmKey(b"0123456789abcdef0123456789abcdef")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def private_server(swarm_key):
    received: list[Message] = []
    identity = Identity.generate()
    server = DirectServer(echo_handlers(received), identity, swarm_key=swarm_key)
    await server.start()
    yield server, identity, received
    await server.stop()


async def test_members_call_each_other(private_server, swarm_key):
    server, identity, _ = private_server
    client = Identity.generate()
    connection = await connect_direct(
        *server.address, client, expected_peer_id=identity.peer_id, swarm_key=swarm_key
    )
    try:
        reply = await connection.call("echo", Message({"n": "member"}), timeout=BOUND)
        assert reply.meta == {"peer_id": client.peer_id}
    finally:
        await connection.close()


@pytest.mark.parametrize("outsider_key", [None, SwarmKey(b"another swarm's secret bytes....")])
async def test_an_outsider_is_refused_on_the_direct_path(private_server, outsider_key):
    server, identity, received = private_server
    before = len(received)
    with pytest.raises(NotAMember, match="did not prove"):
        await connect_direct(
            *server.address, Identity.generate(), expected_peer_id=identity.peer_id, swarm_key=outsider_key
        )
    assert len(received) == before


async def test_a_member_refuses_a_server_outside_its_swarm(swarm_key):
    public = DirectServer(echo_handlers([]), Identity.generate())
    await public.start()
    try:
        with pytest.raises(NotAMember, match="did not prove the private swarm's key"):
            await connect_direct(
                *public.address, Identity.generate(), expected_peer_id=None, swarm_key=swarm_key
            )
    finally:
        await public.stop()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def private_p2p(swarm_key):
    received: list[Message] = []
    server = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    client = await P2P.create(
        host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=await server.get_visible_maddrs()
    )
    await serve_libp2p(server, echo_handlers(received), swarm_key=swarm_key)
    yield server, client, received
    await client.shutdown()
    await server.shutdown()


async def test_libp2p_members_and_outsiders(private_p2p, swarm_key):
    server, client, received = private_p2p
    server_id = server.peer_id.to_base58()
    connection = await connect_libp2p(client, server_id, swarm_key=swarm_key)
    try:
        reply = await connection.call("echo", Message({"n": "member"}), timeout=BOUND)
        assert reply.meta == {"peer_id": client.peer_id.to_base58()}
    finally:
        await connection.close()
    assert len(received) == 1

    with pytest.raises(NotAMember, match="did not prove"):
        await connect_libp2p(client, server_id, swarm_key=SwarmKey(b"another swarm's secret bytes...."))
    outsider = await connect_libp2p(client, server_id)  # no key: the stream opens, the first call is refused
    try:
        with pytest.raises(ConnectionLost, match="not_a_member"):
            await outsider.call("echo", Message({"n": "outsider"}), timeout=BOUND)
    finally:
        await outsider.close()
    assert len(received) == 1
