"""A client's view of one model's swarm: who serves what, how far they are, and a connection to each.

Look-ups hit the DHT only when the cached server list is older than `refresh_s` (never per step). Each server
gets one persistent connection, direct TCP when it announces a direct address that answers and proves the
expected peer id, otherwise libp2p, which reaches peers behind NAT and relays.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence

import hivemind
import torch

from swarmllm.client.routing import Hop, route_forward, route_inference
from swarmllm.dht import ServerInfo, find_servers, start_dht
from swarmllm.wire import (
    Connection,
    Identity,
    Message,
    RemoteError,
    Stream,
    WireError,
)
from swarmllm.wire.pool import ConnectionPool
from swarmllm.wire.validation import all_finite

logger = logging.getLogger(__name__)


class BadReplyError(RuntimeError):
    """A server answered with something that is not the hidden states it was asked for."""

    def __init__(self, peer_id: str, problem: str):
        self.peer_id = peer_id
        super().__init__(f"server {peer_id} sent a bad reply: {problem}")


class SessionError(RuntimeError):
    """A server refused a step of a session (answered in-band); the session is still usable."""

    def __init__(self, peer_id: str, code: str, message: str):
        self.peer_id, self.code = peer_id, code
        super().__init__(f"server {peer_id} refused the step ({code}): {message}")


def raise_refusal(reply: Message, peer_id: str) -> None:
    """Raise SessionError if a session's reply is a refusal rather than hidden states."""
    if "error" in reply.meta:
        error = reply.meta["error"]
        raise SessionError(peer_id, str(error.get("code")), str(error.get("message")))


def hidden_from(reply: Message, peer_id: str, sent: torch.Tensor) -> torch.Tensor:
    """The hidden states in a server's reply, checked like anything else that comes from a peer: one floating
    tensor of the shape that was sent, all finite."""
    if not reply.tensors:
        raise BadReplyError(peer_id, "no tensor")
    hidden = reply.tensors[0]
    if not hidden.is_floating_point() or hidden.shape != sent.shape:
        raise BadReplyError(peer_id, f"{hidden.dtype} {tuple(hidden.shape)}, expected {tuple(sent.shape)}")
    if not all_finite(hidden):
        raise BadReplyError(peer_id, "NaN or infinity")
    return hidden


class SwarmClient:
    def __init__(
        self,
        initial_peers: Sequence[str],
        dht_prefix: str,
        num_blocks: int,
        *,
        identity: Identity | None = None,
        refresh_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 600.0,
        prefer_direct: bool = True,
        push: bool = True,
        forward_chunk_tokens: int = 128,
        min_chunk_s: float = 0.02,
    ):
        self.initial_peers = list(initial_peers)
        self.dht_prefix = dht_prefix
        self.num_blocks = num_blocks
        self.identity = identity or Identity.generate()
        self.refresh_s = refresh_s
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self.forward_chunk_tokens = forward_chunk_tokens
        self.min_chunk_s = min_chunk_s
        self.push = push  # servers hand activations to the next server themselves (see client.session)
        self.rng = random.Random()
        self.dht: hivemind.DHT | None = None
        self._servers: dict[str, ServerInfo] = {}
        self._servers_at = -float("inf")
        self.pool = ConnectionPool(
            self.identity, None, connect_timeout_s=connect_timeout_s, prefer_direct=prefer_direct
        )
        self.rtt_s: dict[str, float] = {}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.dht, _ = await loop.run_in_executor(
            None, lambda: start_dht(self.identity, initial_peers=self.initial_peers, client_mode=True)
        )
        self.pool.p2p = await self.dht.replicate_p2p()

    async def shutdown(self) -> None:
        await self.pool.close()
        if self.pool.p2p is not None:
            await self.pool.p2p.shutdown()
            self.pool.p2p = None
        if self.dht is not None:
            self.dht.shutdown()
            self.dht = None

    async def servers(self, *, refresh: bool = False) -> list[ServerInfo]:
        """The model's servers from the DHT, looked up again only when the list is older than `refresh_s`."""
        if self.dht is not None and (refresh or time.monotonic() - self._servers_at > self.refresh_s):
            found = await find_servers(self.dht, self.dht_prefix, self.num_blocks)
            self._servers = {s.peer_id: s for s in found}
            self._servers_at = time.monotonic()
        return list(self._servers.values())

    def use_servers(self, servers: Sequence[ServerInfo]) -> None:
        """Route over exactly these servers from now on, without DHT look-ups (a fixed set of servers)."""
        self._servers = {s.peer_id: s for s in servers}
        self._servers_at = float("inf")

    async def connection(self, peer_id: str) -> Connection:
        """The persistent connection to a server (direct when its announced address answers, else libp2p)."""
        info = self._servers.get(peer_id)
        return await self.pool.get(peer_id, info.direct_addrs if info is not None else ())

    async def ping(self, peer_id: str) -> float:
        """Round trip of an `info` call in seconds (also opens the connection)."""
        conn = await self.connection(peer_id)
        began = time.perf_counter()
        await conn.call("info", Message(), timeout=self.connect_timeout_s)
        self.rtt_s[peer_id] = rtt = time.perf_counter() - began
        return rtt

    async def _ping_unmeasured(self, servers: Sequence[ServerInfo]) -> None:
        todo = [s.peer_id for s in servers if s.peer_id not in self.rtt_s]
        results = await asyncio.gather(*(self.ping(p) for p in todo), return_exceptions=True)
        for peer_id, result in zip(todo, results):
            if isinstance(result, BaseException):
                logger.info("ping to %s failed: %s", peer_id, result)

    async def route_inference(self, *, min_cache_tokens: int = 0, refresh: bool = False) -> list[Hop]:
        servers = await self.servers(refresh=refresh)
        await self._ping_unmeasured(servers)
        return route_inference(servers, self.num_blocks, self.rtt_s, min_cache_tokens=min_cache_tokens)

    async def forward(self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states through every block, spread over servers by throughput.

        A long input is cut into chunks of positions and pipelined along the chain: while a server computes
        chunk k, the next one already works on chunk k-1 (chunk size: see `_chunk_tokens`). The chunks go through temporary sessions (their KV
        cache carries attention across chunks); an input of one chunk, or one that finds no cache room, goes
        through plain `forward` calls instead.
        """
        servers = await self.servers()
        hops = route_forward(servers, self.num_blocks, self.rng)
        batch, length = hidden.shape[:2]
        chunk = max(1, self._chunk_tokens(hops, servers) // batch)
        if length > chunk:
            chunk = -(-length // -(-length // chunk))  # as many chunks as needed, all of about the same size
            try:
                return await self._pipelined_forward(hops, hidden, key_mask, chunk)
            except RemoteError as e:
                if e.code != "cache_full":
                    raise
        extra = [key_mask] if key_mask is not None else []
        for hop in hops:
            conn = await self.connection(hop.peer_id)
            reply = await conn.call(
                "forward",
                Message({"start": hop.start, "end": hop.end}, [hidden, *extra]),
                timeout=self.request_timeout_s,
            )
            hidden = hidden_from(reply, hop.peer_id, hidden)
        return hidden

    def _chunk_tokens(self, hops: list[Hop], servers: list[ServerInfo]) -> int:
        """Tokens per pipelined chunk: at least `forward_chunk_tokens`, and enough that the slowest hop computes
        for `min_chunk_s` per chunk (by its announced speed), so per-chunk overheads stay small."""
        speed = {s.peer_id: max(s.forward_rps, 1e-9) for s in servers}
        slowest_s_per_token = max((h.end - h.start) / speed[h.peer_id] for h in hops)
        return max(self.forward_chunk_tokens, int(self.min_chunk_s / slowest_s_per_token))

    async def _pipelined_forward(
        self, hops: list[Hop], hidden: torch.Tensor, key_mask: torch.Tensor | None, chunk: int
    ) -> torch.Tensor:
        batch, length = hidden.shape[:2]
        bounds = list(range(0, length, chunk))
        streams: list[Stream] = []
        try:
            for hop in hops:
                conn = await self.connection(hop.peer_id)
                opening = {"start": hop.start, "end": hop.end, "batch_size": batch, "max_length": length}
                streams.append(await conn.open_stream("inference", Message(opening)))
            # stage i reads chunks from queues[i], sends each to its server, passes the outputs to queues[i + 1]
            queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(len(hops) + 1)]
            for lo in bounds:
                mask = [key_mask[:, lo : lo + chunk]] if key_mask is not None else []
                queues[0].put_nowait((lo, [hidden[:, lo : lo + chunk], *mask]))

            async def stage(i: int, stream: Stream) -> None:
                async def send_all() -> None:
                    for _ in bounds:
                        lo, tensors = await queues[i].get()
                        await stream.send(Message({"position": lo}, tensors))

                sender = asyncio.ensure_future(send_all())
                try:
                    for lo in bounds:
                        reply = await stream.recv(timeout=self.request_timeout_s)
                        raise_refusal(reply, hops[i].peer_id)
                        mask = [key_mask[:, lo : lo + chunk]] if key_mask is not None else []
                        out = hidden_from(reply, hops[i].peer_id, hidden[:, lo : lo + chunk])
                        queues[i + 1].put_nowait((lo, [out, *mask]))
                    await sender
                finally:
                    sender.cancel()

            await asyncio.gather(*(stage(i, stream) for i, stream in enumerate(streams)))
            outputs = [queues[-1].get_nowait()[1][0] for _ in bounds]
            return torch.cat(outputs, dim=1)
        finally:
            for stream in streams:
                with contextlib.suppress(WireError):
                    await stream.close()
