"""A client's door to a swarm: one DHT peer in client mode, the look-ups of which models and servers it holds,
and one connection per server (direct or libp2p) with a timed `info` call to measure the round trip.

`SwarmClient` (one model, routing, sessions) and the monitor (every model, nothing routed) both read the swarm
through this, so there is one DHT reader. It caches nothing and decides nothing: callers keep their own lists.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Sequence

import hivemind

from swarmllm.client.loop import forget_at_exit, shut_down_at_exit
from swarmllm.dht import ModelInfo, ServerInfo, find_servers, list_models, rejoin, start_dht
from swarmllm.wire import Connection, Identity, Message, SwarmKey, load_swarm_key
from swarmllm.wire.pool import ConnectionPool

logger = logging.getLogger(__name__)
REJOIN_TIMEOUT_S = 30.0  # the most a ping of the initial peers may take (a frozen DHT process never answers)


class Directory:
    def __init__(
        self,
        initial_peers: Sequence[str],
        *,
        identity: Identity | None = None,
        swarm_key: str | os.PathLike | SwarmKey | None = None,
        connect_timeout_s: float = 5.0,
        prefer_direct: bool = True,
    ):
        self.initial_peers = list(initial_peers)
        self.identity = identity or Identity.generate()
        # a private swarm's key (a file, or a loaded key): the DHT and every server check that we hold it
        self.swarm_key = swarm_key if isinstance(swarm_key, SwarmKey | None) else load_swarm_key(swarm_key)
        self.connect_timeout_s = connect_timeout_s
        self.dht: hivemind.DHT | None = None
        self._rejoining: asyncio.Task | None = None
        self.pool = ConnectionPool(
            self.identity,
            None,
            connect_timeout_s=connect_timeout_s,
            prefer_direct=prefer_direct,
            swarm_key=self.swarm_key,
        )

    async def start(self) -> None:
        """Join the DHT (as a client: we store nothing for others) and the libp2p transport."""
        loop = asyncio.get_running_loop()
        self.dht, _ = await loop.run_in_executor(
            None,
            lambda: start_dht(
                self.identity, initial_peers=self.initial_peers, client_mode=True, swarm_key=self.swarm_key
            ),
        )
        self.pool.p2p = await self.dht.replicate_p2p()
        shut_down_at_exit(self)

    async def shutdown(self) -> None:
        forget_at_exit(self)
        if self._rejoining is not None:
            self._rejoining.cancel()
            with contextlib.suppress(BaseException):
                await self._rejoining
        await self.pool.close()
        if self.pool.p2p is not None:
            await self.pool.p2p.shutdown()
            self.pool.p2p = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    async def models(self) -> list[ModelInfo]:
        """The models announced in the swarm's registry."""
        self._rejoin_soon()
        return await list_models(self.dht)

    async def servers(self, dht_prefix: str, num_blocks: int) -> list[ServerInfo]:
        """Every server that announces blocks of a model, one record per peer (its online one if it has)."""
        self._rejoin_soon()
        return await find_servers(self.dht, dht_prefix, num_blocks)

    def _rejoin_soon(self) -> None:
        """Ping the initial peers missing from our DHT routing table (`dht.rejoin`), in the background, as a
        server does every announce period: the DHT drops peers that stopped answering, and a client that lives
        long (one model object kept for hours) would otherwise never meet its bootstrap peer again once it
        restarts, and find no server for ever. In the background, since a peer that does not answer may take
        the DHT's whole wait; the look-ups that follow find what the answer brings."""
        if self.dht is None or not self.initial_peers:
            return
        if self._rejoining is None or self._rejoining.done():
            self._rejoining = asyncio.ensure_future(self._rejoin())

    async def _rejoin(self) -> None:
        try:
            async with asyncio.timeout(REJOIN_TIMEOUT_S):
                await rejoin(self.dht, self.initial_peers)
        except Exception as e:  # noqa: BLE001 - a failed ping leaves things as they were; the look-up says more
            logger.debug("pinging the initial peers failed: %s", e)

    async def connection(self, peer_id: str, direct_addrs: Sequence[str] = ()) -> Connection:
        """The persistent connection to a server (direct when its announced address answers, else libp2p)."""
        return await self.pool.get(peer_id, direct_addrs)

    async def ping(self, peer_id: str, direct_addrs: Sequence[str] = ()) -> float:
        """Round trip of an `info` call in seconds (also opens the connection)."""
        async with asyncio.timeout(self.connect_timeout_s * 2):
            conn = await self.connection(peer_id, direct_addrs)
            began = time.perf_counter()
            await conn.call("info", Message(), timeout=self.connect_timeout_s)
        return time.perf_counter() - began
