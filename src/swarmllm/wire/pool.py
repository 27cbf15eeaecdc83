"""One persistent connection per peer, chosen per peer: the direct TCP path when one of the peer's announced
addresses answers and proves the expected peer id, libp2p otherwise (NAT, relays). Clients use a pool to reach
servers; servers use one to push activations to the next server of a chain."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from hivemind.p2p import P2P

from swarmllm.wire.connection import Connection
from swarmllm.wire.direct import NotAMember, connect_direct
from swarmllm.wire.framing import WireError
from swarmllm.wire.identity import Identity
from swarmllm.wire.libp2p import connect_libp2p
from swarmllm.wire.swarm_key import SwarmKey

logger = logging.getLogger(__name__)


class ConnectionPool:
    def __init__(
        self,
        identity: Identity,
        p2p: P2P | None,
        *,
        connect_timeout_s: float = 5.0,
        prefer_direct: bool = True,
        swarm_key: SwarmKey | None = None,
    ):
        self.identity = identity
        self.swarm_key = swarm_key
        self.p2p = p2p
        self.connect_timeout_s = connect_timeout_s
        self.prefer_direct = prefer_direct
        self._connections: dict[str, Connection] = {}
        self._connecting: dict[str, asyncio.Future[Connection]] = {}

    async def get(self, peer_id: str, direct_addrs: Sequence[str] = ()) -> Connection:
        """The open connection to `peer_id`, made on first use (concurrent callers share one attempt)."""
        conn = self._connections.get(peer_id)
        if conn is not None and not conn.is_closed:
            return conn
        pending = self._connecting.get(peer_id)
        if pending is None:
            pending = asyncio.ensure_future(self._connect(peer_id, tuple(direct_addrs)))
            self._connecting[peer_id] = pending
            pending.add_done_callback(lambda done: self._connected(peer_id, done))
        return await asyncio.shield(pending)

    def _connected(self, peer_id: str, pending: asyncio.Future[Connection]) -> None:
        """The attempt's connection joins the pool whether or not a caller still waits for it (the callers may
        all have given up), so it is reused and closed with the pool instead of being left open."""
        if self._connecting.get(peer_id) is pending:
            del self._connecting[peer_id]
        if not pending.cancelled() and pending.exception() is None:
            self._connections[peer_id] = pending.result()

    def is_broken(self, peer_id: str) -> bool:
        """Whether our last connection to `peer_id` has closed (the peer may be gone)."""
        conn = self._connections.get(peer_id)
        return conn is not None and conn.is_closed

    def drop_broken(self) -> list[str]:
        """Forget the connections that have closed since the last call; returns their peers (who may be gone:
        a server checks the swarm soon after one of its peers' connections breaks)."""
        broken = [peer_id for peer_id, conn in self._connections.items() if conn.is_closed]
        for peer_id in broken:
            del self._connections[peer_id]
        return broken

    async def _connect(self, peer_id: str, direct_addrs: tuple[str, ...]) -> Connection:
        for addr in direct_addrs if self.prefer_direct else ():
            host, _, port = addr.rpartition(":")
            try:
                return await connect_direct(
                    host,
                    int(port),
                    self.identity,
                    expected_peer_id=peer_id,
                    timeout=self.connect_timeout_s,
                    swarm_key=self.swarm_key,
                )
            except NotAMember:
                raise  # the peer answered: libp2p would get the same refusal
            except (TimeoutError, OSError, WireError, ValueError) as e:
                logger.info("direct path to %s at %s failed (%r); trying the next way", peer_id, addr, str(e))
        if self.p2p is None:
            raise WireError(f"no direct address of {peer_id} answered and this pool has no libp2p peer")
        return await connect_libp2p(
            self.p2p, peer_id, timeout=self.connect_timeout_s, swarm_key=self.swarm_key
        )

    async def close(self) -> None:
        """Close every connection, the ones being made included."""
        pending = list(self._connecting.values())
        for attempt in pending:
            attempt.cancel()
        # an attempt that finished before it could be cancelled has put its connection in the pool by now
        await asyncio.gather(*pending, return_exceptions=True)
        connections, self._connections = list(self._connections.values()), {}
        for conn in connections:
            await conn.close()
