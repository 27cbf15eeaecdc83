"""The direct transport: one persistent TLS 1.3 connection per peer, opened with a mutual identity handshake.

TLS (`tls.py`) encrypts and authenticates every byte and proves the server's identity: its certificate's key is its
identity key. Inside the encrypted channel, the handshake runs once per connection, as frames of the ordinary
wire format on call id 0:

    client -> server   hello  {key, nonce}
    server -> client   hello  {key, nonce, tag?}     key must be the TLS certificate's key
    client -> server   proof  {sig, tag?}            sig = client signs transcript("client")
    server -> client   accept {}                    (or an ERROR frame, then close)

The transcript binds a fixed context string, the role, both public keys and both fresh nonces, so the client's
signature cannot be replayed on another connection or relayed to another server (it names the server's key,
which TLS proved). In a private swarm each side also sends ``tag``, an HMAC of the transcript under the swarm key
(`swarm_key.py`); a side that sees no valid tag refuses with code ``not_a_member`` before any call is served.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import ssl

from swarmllm.wire.connection import (
    Connection,
    ConnectionSlots,
    Handlers,
    TooManyConnections,
    refuse_connection,
    serve_connection,
)
from swarmllm.wire.framing import (
    DEFAULT_LIMITS,
    ConnectionLost,
    Frame,
    FrameError,
    Kind,
    Message,
    WireError,
    WireLimits,
    encode_frame,
    read_frame,
)
from swarmllm.wire.identity import Identity, peer_id_from_public_key, public_key_from_bytes, verify
from swarmllm.wire.peer_log import PeerFaultLog
from swarmllm.wire.swarm_key import SwarmKey
from swarmllm.wire.tls import CertificateError, client_context, peer_id_of, server_context

logger = logging.getLogger(__name__)
peer_faults = PeerFaultLog(logger)

TRANSPORT = "direct"
NOT_A_MEMBER = "not_a_member"
_CONTEXT = b"swarmllm/wire/2 direct handshake\0"
_NONCE_BYTES = 32
_HANDSHAKE_LIMITS = WireLimits(max_meta_bytes=16 * 1024, max_payload_bytes=0, max_tensors=0, max_dims=0)
# A larger stream buffer than asyncio's 64 KiB default means fewer wake-ups per large tensor.
_READ_BUFFER_BYTES = 1 << 20


class HandshakeError(WireError):
    """The identity handshake failed: malformed messages, a bad signature, or the peer refused us."""


class IdentityMismatch(HandshakeError):
    """The peer proved an identity other than the one we meant to reach."""


class NotAMember(HandshakeError):
    """One side of the handshake did not prove the private swarm's key."""


def _transcript(
    role: bytes, client_key: bytes, server_key: bytes, client_nonce: bytes, server_nonce: bytes
) -> bytes:
    client_key_hash, server_key_hash = (
        hashlib.sha256(client_key).digest(),
        hashlib.sha256(server_key).digest(),
    )
    return b"".join((_CONTEXT, role, client_key_hash, server_key_hash, client_nonce, server_nonce))


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def write_handshake_message(writer: asyncio.StreamWriter, meta: dict) -> None:
    writer.writelines(encode_frame(Frame(Kind.MESSAGE, 0, Message(meta)), _HANDSHAKE_LIMITS))


def _with_tag(meta: dict, swarm_key: SwarmKey | None, transcript: bytes) -> dict:
    return meta if swarm_key is None else {**meta, "tag": swarm_key.tag(transcript)}


async def read_handshake_message(
    reader: asyncio.StreamReader, expected: tuple[tuple[str, type, int | None], ...]
) -> dict:
    """The next handshake message, checked to hold the expected fields (name, type, exact length if given)."""
    try:
        frame = await read_frame(reader, _HANDSHAKE_LIMITS)
    except FrameError as e:
        raise HandshakeError(f"the peer does not speak the wire protocol: {e}") from None
    meta = frame.message.meta
    if frame.kind is Kind.ERROR:
        error = NotAMember if meta.get("code") == NOT_A_MEMBER else HandshakeError
        raise error(f"the peer refused the handshake: {meta.get('code')}: {meta.get('message')}")
    if frame.kind is not Kind.MESSAGE or frame.call_id != 0:
        raise HandshakeError(f"expected a handshake message, got {frame.kind.name} for call {frame.call_id}")
    for name, kind, length in expected:
        value = meta.get(name)
        if not isinstance(value, kind) or (length is not None and len(value) != length):
            raise HandshakeError(f"handshake field {name!r} is missing or malformed")
    return meta


async def _client_handshake(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: Identity,
    expected_peer_id: str | None,
    swarm_key: SwarmKey | None,
) -> str:
    try:
        certified_peer_id = peer_id_of(writer.get_extra_info("ssl_object"))
    except CertificateError as e:
        raise HandshakeError(str(e)) from None
    if expected_peer_id is not None and certified_peer_id != expected_peer_id:
        raise IdentityMismatch(
            f"expected peer {expected_peer_id}, but the server's certificate is {certified_peer_id}"
        )
    client_nonce = os.urandom(_NONCE_BYTES)
    write_handshake_message(writer, {"key": identity.public_key_bytes, "nonce": client_nonce})
    hello = await read_handshake_message(reader, (("key", bytes, None), ("nonce", bytes, _NONCE_BYTES)))
    server_key, server_nonce = hello["key"], hello["nonce"]
    try:
        server_peer_id = peer_id_from_public_key(public_key_from_bytes(server_key))
    except ValueError as e:
        raise HandshakeError(f"the server sent a bad public key: {e}") from None
    if server_peer_id != certified_peer_id:
        raise HandshakeError(
            f"the server claimed {server_peer_id} but its TLS certificate is {certified_peer_id}"
        )
    transcript = (identity.public_key_bytes, server_key, client_nonce, server_nonce)
    if swarm_key is not None and not swarm_key.check(
        _transcript(b"server member", *transcript), hello.get("tag")
    ):
        raise NotAMember(f"server {server_peer_id} did not prove the private swarm's key")
    proof = {"sig": identity.sign(_transcript(b"client", *transcript))}
    write_handshake_message(writer, _with_tag(proof, swarm_key, _transcript(b"client member", *transcript)))
    await read_handshake_message(reader, ())
    return server_peer_id


async def _server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, identity: Identity, swarm_key: SwarmKey | None
) -> str:
    hello = await read_handshake_message(reader, (("key", bytes, None), ("nonce", bytes, _NONCE_BYTES)))
    client_key, client_nonce = hello["key"], hello["nonce"]
    try:
        client_peer_id = peer_id_from_public_key(public_key_from_bytes(client_key))
    except ValueError as e:
        raise HandshakeError(f"the client sent a bad public key: {e}") from None
    server_nonce = os.urandom(_NONCE_BYTES)
    transcript = (client_key, identity.public_key_bytes, client_nonce, server_nonce)
    reply = {"key": identity.public_key_bytes, "nonce": server_nonce}
    write_handshake_message(writer, _with_tag(reply, swarm_key, _transcript(b"server member", *transcript)))
    proof = await read_handshake_message(reader, (("sig", bytes, None),))
    if not verify(client_key, _transcript(b"client", *transcript), proof["sig"]):
        raise HandshakeError(f"the client's signature does not match its key (claimed {client_peer_id})")
    if swarm_key is not None and not swarm_key.check(
        _transcript(b"client member", *transcript), proof.get("tag")
    ):
        raise NotAMember(
            f"this server belongs to a private swarm and {client_peer_id} did not prove its key "
            "(join with --swarm-key FILE, or swarm_key=FILE in from_pretrained)"
        )
    write_handshake_message(writer, {})
    return client_peer_id


class DirectServer:
    """Accepts TLS connections, proves our identity, learns the caller's (and checks it is a member of a private
    swarm when ``swarm_key`` is set), then serves calls.

    A connection that has not completed the handshake within ``handshake_timeout`` is dropped; one past the caps
    of ``slots`` (in total on arrival, per peer once its id is proven) is refused with ``too_many_connections``.
    """

    def __init__(
        self,
        handlers: Handlers,
        identity: Identity,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        limits: WireLimits = DEFAULT_LIMITS,
        handshake_timeout: float = 10.0,
        slots: ConnectionSlots | None = None,
        swarm_key: SwarmKey | None = None,
    ):
        self.handlers = handlers
        self.identity = identity
        self.swarm_key = swarm_key
        self._tls = server_context(identity)
        self.limits = limits
        self.handshake_timeout = handshake_timeout
        self.slots = slots or ConnectionSlots(limits)
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}
        self.address: tuple[str, int] | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._on_connection,
            self._host,
            self._port,
            limit=_READ_BUFFER_BYTES,
            ssl=self._tls,
            ssl_handshake_timeout=self.handshake_timeout,
        )
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = (host, port)

    async def stop(self) -> None:
        """Stop accepting, drop every open connection and wait until their handlers are done."""
        server, self._server = self._server, None  # from now on, a connection whose TLS completes is dropped
        if server is None:
            return
        server.close()
        for writer in self._connections.values():
            writer.transport.abort()
        if self._connections:
            await asyncio.wait(list(self._connections))
        await server.wait_closed()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_address = writer.get_extra_info("peername")
        # accepted before stop() began (Python 3.11's Server.wait_closed does not wait for it) and served after it
        if self._server is None:
            writer.transport.abort()
            return
        try:
            self.slots.open()
        except TooManyConnections as e:
            peer_faults.log(logging.INFO, "refused", f"Refusing a direct connection from {peer_address}: {e}")
            refuse_connection(writer, "too_many_connections", str(e))
            return
        task = asyncio.current_task()
        self._connections[task] = writer
        peer_id = None
        try:
            _set_nodelay(writer)
            try:
                peer_id = await asyncio.wait_for(
                    _server_handshake(reader, writer, self.identity, self.swarm_key), self.handshake_timeout
                )
            except (TimeoutError, WireError, OSError) as e:
                peer_faults.log(
                    logging.INFO, "handshake", f"Direct handshake with {peer_address} failed: {e!r}"
                )
                if not isinstance(e, (ConnectionLost, OSError)):
                    refuse_connection(
                        writer, NOT_A_MEMBER if isinstance(e, NotAMember) else "bad_handshake", str(e)
                    )
                return
            try:
                self.slots.identify(peer_id)
            except TooManyConnections as e:
                peer_id = None
                peer_faults.log(
                    logging.INFO, "refused", f"Refusing a direct connection from {peer_address}: {e}"
                )
                refuse_connection(writer, "too_many_connections", str(e))
                return
            await serve_connection(
                reader,
                writer,
                self.handlers,
                limits=self.limits,
                peer_id=peer_id,
                transport=TRANSPORT,
                remote_host=_peer_host(writer),
            )
        except asyncio.CancelledError:
            pass  # Python 3.11 logs a spurious error when a connection callback task ends cancelled
        except Exception:
            logger.warning(f"Direct connection from {peer_address} failed", exc_info=True)
        finally:
            self.slots.close(peer_id)
            del self._connections[task]
            writer.close()


def _peer_host(writer: asyncio.StreamWriter) -> str | None:
    peer = writer.get_extra_info("peername")
    return peer[0] if isinstance(peer, tuple) else None


async def connect_direct(
    host: str,
    port: int,
    identity: Identity,
    *,
    expected_peer_id: str | None,
    limits: WireLimits = DEFAULT_LIMITS,
    timeout: float = 5.0,
    swarm_key: SwarmKey | None = None,
) -> Connection:
    """Open a TLS connection, prove both identities and, with ``swarm_key``, both sides' membership.

    ``expected_peer_id=None`` accepts whoever answers (its proven id is still in ``remote_peer_id``).
    Raises ConnectionLost if the address is unreachable or TLS fails, HandshakeError / IdentityMismatch /
    NotAMember if the peer is not who it should be or one side is not a member of the private swarm,
    asyncio.TimeoutError if connecting and the handshake take longer than ``timeout``.
    """

    async def open_and_prove() -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
        try:
            reader, writer = await asyncio.open_connection(
                host, port, limit=_READ_BUFFER_BYTES, ssl=client_context(), server_hostname=""
            )
        except ssl.SSLError as e:
            raise HandshakeError(f"TLS with {host}:{port} failed (not a swarmllm server?): {e!r}") from e
        except OSError as e:
            raise ConnectionLost(f"cannot connect to {host}:{port}: {e!r}") from e
        try:
            _set_nodelay(writer)
            peer_id = await _client_handshake(reader, writer, identity, expected_peer_id, swarm_key)
        except BaseException:
            writer.close()
            raise
        return reader, writer, peer_id

    reader, writer, peer_id = await asyncio.wait_for(open_and_prove(), timeout)
    return Connection(reader, writer, transport=TRANSPORT, remote_peer_id=peer_id, limits=limits)


async def proves_at(
    addr: str,
    identity: Identity,
    peer_id: str,
    *,
    timeout: float,
    swarm_key: SwarmKey | None = None,
    limits: WireLimits = DEFAULT_LIMITS,
) -> bool:
    """Whether `peer_id` answers at `addr` (host:port) and proves its id there (the connection is closed again):
    a server's check that its identity is not in use elsewhere, and a peer's dial-back (`server.reachability`)."""
    host, _, port = addr.rpartition(":")
    try:
        conn = await connect_direct(
            host,
            int(port),
            identity,
            expected_peer_id=peer_id,
            limits=limits,
            timeout=timeout,
            swarm_key=swarm_key,
        )
    except (TimeoutError, OSError, WireError, ValueError):
        return False
    await conn.close()
    return True
