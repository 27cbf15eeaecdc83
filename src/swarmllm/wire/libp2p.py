"""The libp2p transport: the same frames over a hivemind P2P binary stream, for peers we cannot dial directly.

libp2p proves the peer's identity and encrypts the stream itself, so a public swarm needs no handshake here. In a
private swarm (``swarm_key``) both sides first prove the swarm key on call id 0, before any call is served:

    caller -> callee   {nonce}
    callee -> caller   {nonce, tag}        tag = HMAC under the swarm key of the transcript (both peer ids, nonces)
    caller -> callee   {tag}
    callee -> caller   {}                  (or an ERROR frame ``not_a_member``, then close)

One libp2p stream is one Connection; calls are multiplexed inside it exactly as on the direct transport.

Daemon behaviour (hivemind 1.1.12 p2pd) this relies on, checked in tests/wire/test_transports.py and
benchmarks/wire_roundtrip.py:
- bytes pass through the daemons' unix sockets intact for large frames (16 MiB in the tests, 64 MiB benchmarked);
- closing either end's writer ends the other end's reader (EOF), and a daemon shutdown does too;
- there is no half-close: ``write_eof`` tears the whole stream down, so only full ``close`` is used;
- a failed stream open (peer unreachable, protocol not served) leaks one unix socket inside hivemind until GC.
"""

from __future__ import annotations

import asyncio
import logging
import os

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils.multiaddr import Multiaddr

from swarmllm.wire.connection import (
    Connection,
    ConnectionSlots,
    Handlers,
    TooManyConnections,
    refuse_connection,
    serve_connection,
)
from swarmllm.wire.direct import (
    NOT_A_MEMBER,
    HandshakeError,
    NotAMember,
    read_handshake_message,
    write_handshake_message,
)
from swarmllm.wire.framing import (
    DEFAULT_LIMITS,
    ConnectionLost,
    WireError,
    WireLimits,
)
from swarmllm.wire.peer_log import PeerFaultLog
from swarmllm.wire.swarm_key import SwarmKey

logger = logging.getLogger(__name__)
peer_faults = PeerFaultLog(logger)

PROTOCOL = "swarmllm/wire/1"
TRANSPORT = "libp2p"
_CONTEXT = b"swarmllm/wire/2 libp2p membership\0"
_NONCE_BYTES = 32


def _transcript(role: bytes, caller: str, callee: str, caller_nonce: bytes, callee_nonce: bytes) -> bytes:
    return b"\0".join((_CONTEXT, role, caller.encode(), callee.encode(), caller_nonce, callee_nonce))


async def _prove_membership_as_callee(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, swarm_key: SwarmKey, caller: str, callee: str
) -> None:
    refusal = (
        f"this server belongs to a private swarm and {caller} did not prove its key "
        "(join with --swarm-key FILE, or swarm_key=FILE in from_pretrained)"
    )
    try:
        hello = await read_handshake_message(reader, (("nonce", bytes, _NONCE_BYTES),))
    except HandshakeError:
        raise NotAMember(refusal) from None  # a caller of a public swarm starts with its first call
    callee_nonce = os.urandom(_NONCE_BYTES)
    nonces = (hello["nonce"], callee_nonce)
    tag = swarm_key.tag(_transcript(b"callee", caller, callee, *nonces))
    write_handshake_message(writer, {"nonce": callee_nonce, "tag": tag})
    proof = await read_handshake_message(reader, ())
    if not swarm_key.check(_transcript(b"caller", caller, callee, *nonces), proof.get("tag")):
        raise NotAMember(refusal)
    write_handshake_message(writer, {})


async def _prove_membership_as_caller(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, swarm_key: SwarmKey, caller: str, callee: str
) -> None:
    caller_nonce = os.urandom(_NONCE_BYTES)
    write_handshake_message(writer, {"nonce": caller_nonce})
    hello = await read_handshake_message(reader, (("nonce", bytes, _NONCE_BYTES),))
    nonces = (caller_nonce, hello["nonce"])
    if not swarm_key.check(_transcript(b"callee", caller, callee, *nonces), hello.get("tag")):
        raise NotAMember(f"server {callee} did not prove the private swarm's key")
    write_handshake_message(writer, {"tag": swarm_key.tag(_transcript(b"caller", caller, callee, *nonces))})
    await read_handshake_message(reader, ())


def host_of(addr: Multiaddr) -> str | None:
    """The IP address a libp2p connection comes from (its remote multiaddr's), None where it comes through a
    relay (the address would be the relay's)."""
    parts = str(addr).split("/")
    if "p2p-circuit" in parts:
        return None
    for protocol in ("ip4", "ip6"):
        if protocol in parts and parts.index(protocol) + 1 < len(parts):
            return parts[parts.index(protocol) + 1]
    return None


async def serve_libp2p(
    p2p: P2P,
    handlers: Handlers,
    *,
    limits: WireLimits = DEFAULT_LIMITS,
    slots: ConnectionSlots | None = None,
    swarm_key: SwarmKey | None = None,
    handshake_timeout: float = 10.0,
) -> None:
    """Answer wire connections that peers open to us through ``p2p``; returns once the handler is registered.

    A stream past the caps of ``slots`` (share the direct server's to cap both transports together) is refused
    with ``too_many_connections``. With ``swarm_key``, only callers that prove it are served.
    """
    slots = slots or ConnectionSlots(limits)
    me = p2p.peer_id.to_base58()

    async def on_stream(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_id = info.peer_id.to_base58()
        try:
            slots.open()
        except TooManyConnections as e:
            peer_faults.log(logging.INFO, "refused", f"Refusing a libp2p connection from {peer_id}: {e}")
            refuse_connection(writer, "too_many_connections", str(e))
            return
        try:
            slots.identify(peer_id)
        except TooManyConnections as e:
            slots.close(None)
            peer_faults.log(logging.INFO, "refused", f"Refusing a libp2p connection from {peer_id}: {e}")
            refuse_connection(writer, "too_many_connections", str(e))
            return
        try:
            if swarm_key is not None:
                try:
                    await asyncio.wait_for(
                        _prove_membership_as_callee(reader, writer, swarm_key, info.peer_id.to_base58(), me),
                        handshake_timeout,
                    )
                except (TimeoutError, WireError, OSError) as e:
                    peer_faults.log(
                        logging.INFO, "handshake", f"libp2p membership check of {info.peer_id} failed: {e!r}"
                    )
                    if not isinstance(e, (ConnectionLost, OSError)):
                        refuse_connection(
                            writer, NOT_A_MEMBER if isinstance(e, NotAMember) else "bad_handshake", str(e)
                        )
                    return
            await serve_connection(
                reader,
                writer,
                handlers,
                limits=limits,
                peer_id=peer_id,
                transport=TRANSPORT,
                remote_host=host_of(info.addr),
            )
        except asyncio.CancelledError:
            pass  # Python 3.11 logs a spurious error when a connection callback task ends cancelled
        except Exception:
            logger.warning(f"libp2p connection from {info.peer_id} failed", exc_info=True)
        finally:
            slots.close(peer_id)
            writer.close()

    await p2p.add_binary_stream_handler(PROTOCOL, on_stream)


EMPTY_ROUTING_TABLE = "failed to find any peer in table"  # the daemon's DHT has met no peer yet


async def _open_stream(
    p2p: P2P, peer_id: str, patience_s: float
) -> tuple[StreamInfo, asyncio.StreamReader, asyncio.StreamWriter]:
    """A libp2p stream to `peer_id`. A daemon that has just started looks peers up in a routing table that it
    fills as it meets its initial peers, a moment later: while the table is empty it is asked again, with a
    growing pause, for up to `patience_s`. Any other failure raises ConnectionLost at once."""
    deadline, pause = asyncio.get_running_loop().time() + patience_s, 0.05
    while True:
        try:
            return await p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), PROTOCOL)
        except P2PDaemonError as e:
            if EMPTY_ROUTING_TABLE not in str(e) or asyncio.get_running_loop().time() + pause > deadline:
                raise ConnectionLost(f"cannot open a libp2p stream to {peer_id}: {e}") from e
        logger.debug("the libp2p daemon has met no peer yet: asking again for %s in %.2f s", peer_id, pause)
        await asyncio.sleep(pause)
        pause = min(2 * pause, 1.0)


async def connect_libp2p(
    p2p: P2P,
    peer_id: str,
    *,
    limits: WireLimits = DEFAULT_LIMITS,
    timeout: float = 10.0,
    swarm_key: SwarmKey | None = None,
) -> Connection:
    """Open a wire connection to ``peer_id`` through libp2p (direct, hole-punched or relayed, as libp2p finds).

    Raises ConnectionLost if the daemon cannot reach the peer or the peer does not serve the wire protocol,
    NotAMember / HandshakeError if one side does not prove the private swarm's key (with ``swarm_key``),
    asyncio.TimeoutError after ``timeout``.
    """

    async def open_and_prove() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        _, reader, writer = await _open_stream(p2p, peer_id, timeout / 2)
        if swarm_key is not None:
            try:
                await _prove_membership_as_caller(reader, writer, swarm_key, p2p.peer_id.to_base58(), peer_id)
            except BaseException:
                writer.close()
                raise
        return reader, writer

    reader, writer = await asyncio.wait_for(open_and_prove(), timeout)
    return Connection(reader, writer, transport=TRANSPORT, remote_peer_id=peer_id, limits=limits)
