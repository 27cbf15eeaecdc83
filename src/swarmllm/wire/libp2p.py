"""The libp2p transport: the same frames over a hivemind P2P binary stream, for peers we cannot dial directly.

libp2p proves and encrypts the peer's identity itself, so there is no handshake here. One libp2p stream is one
Connection; calls are multiplexed inside it exactly as on the direct transport.

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

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError

from swarmllm.wire.connection import (
    Connection,
    ConnectionSlots,
    Handlers,
    TooManyConnections,
    refuse_connection,
    serve_connection,
)
from swarmllm.wire.framing import DEFAULT_LIMITS, ConnectionLost, WireLimits

logger = logging.getLogger(__name__)

PROTOCOL = "swarmllm/wire/1"
TRANSPORT = "libp2p"


async def serve_libp2p(
    p2p: P2P,
    handlers: Handlers,
    *,
    limits: WireLimits = DEFAULT_LIMITS,
    slots: ConnectionSlots | None = None,
) -> None:
    """Answer wire connections that peers open to us through ``p2p``; returns once the handler is registered.

    A stream past the caps of ``slots`` (share the direct server's to cap both transports together) is refused
    with ``too_many_connections``.
    """
    slots = slots or ConnectionSlots(limits)

    async def on_stream(info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer_id = info.peer_id.to_base58()
        try:
            slots.open()
        except TooManyConnections as e:
            logger.info(f"Refusing a libp2p connection from {peer_id}: {e}")
            refuse_connection(writer, "too_many_connections", str(e))
            return
        try:
            slots.identify(peer_id)
        except TooManyConnections as e:
            slots.close(None)
            logger.info(f"Refusing a libp2p connection from {peer_id}: {e}")
            refuse_connection(writer, "too_many_connections", str(e))
            return
        try:
            await serve_connection(
                reader, writer, handlers, limits=limits, peer_id=peer_id, transport=TRANSPORT
            )
        except asyncio.CancelledError:
            pass  # Python 3.11 logs a spurious error when a connection callback task ends cancelled
        except Exception:
            logger.warning(f"libp2p connection from {info.peer_id} failed", exc_info=True)
        finally:
            slots.close(peer_id)
            writer.close()

    await p2p.add_binary_stream_handler(PROTOCOL, on_stream)


async def connect_libp2p(
    p2p: P2P, peer_id: str, *, limits: WireLimits = DEFAULT_LIMITS, timeout: float = 10.0
) -> Connection:
    """Open a wire connection to ``peer_id`` through libp2p (direct, hole-punched or relayed, as libp2p finds).

    Raises ConnectionLost if the daemon cannot reach the peer or the peer does not serve the wire protocol,
    asyncio.TimeoutError after ``timeout``.
    """
    try:
        _, reader, writer = await asyncio.wait_for(
            p2p.call_binary_stream_handler(PeerID.from_base58(peer_id), PROTOCOL), timeout
        )
    except P2PDaemonError as e:
        raise ConnectionLost(f"cannot open a libp2p stream to {peer_id}: {e}") from e
    return Connection(reader, writer, transport=TRANSPORT, remote_peer_id=peer_id, limits=limits)
