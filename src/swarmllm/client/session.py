"""An inference session: KV caches kept on a chain of servers, stepped one chunk of tokens at a time.

The chain is chosen on the first step (when the batch size is known) and each hop gets one stream over the
persistent connection to its server; a step is one message down each hop, with no DHT look-up on the way.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from swarmllm.client.routing import Hop
from swarmllm.client.swarm import SwarmClient
from swarmllm.wire import Message, Stream, WireError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HopTiming:
    """Where one hop's time went: the whole round trip as the client saw it, and the server's compute in it."""

    round_trip_s: float
    compute_s: float


class SessionError(RuntimeError):
    """A server refused a step; the session is still usable."""

    def __init__(self, peer_id: str, code: str, message: str):
        self.peer_id, self.code = peer_id, code
        super().__init__(f"server {peer_id} refused the step ({code}): {message}")


class InferenceSession:
    def __init__(self, swarm: SwarmClient, max_length: int):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.swarm = swarm
        self.max_length = max_length
        self.position = 0
        self.batch_size: int | None = None
        self.hops: list[Hop] = []
        self._streams: list[Stream] = []
        self.last_timings: list[HopTiming] = []
        self.closed = False

    async def _open(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.hops = await self.swarm.route_inference(min_cache_tokens=batch_size * self.max_length)
        for hop in self.hops:
            conn = await self.swarm.connection(hop.peer_id)
            opening = {
                "start": hop.start,
                "end": hop.end,
                "batch_size": batch_size,
                "max_length": self.max_length,
            }
            self._streams.append(await conn.open_stream("inference", Message(opening)))
        logger.debug("session over %s", [(h.peer_id[-6:], h.start, h.end) for h in self.hops])

    async def step(
        self, hidden: torch.Tensor, key_mask: torch.Tensor | None = None, *, position: int | None = None
    ) -> torch.Tensor:
        """Hidden states of tokens [position, position + T) through every block; position defaults to the end
        of what the session holds, and an earlier position rewinds (later tokens are forgotten)."""
        if self.closed:
            raise RuntimeError("the inference session is closed")
        position = self.position if position is None else position
        if not 0 <= position <= self.position:
            raise ValueError(f"position {position} is outside [0, {self.position}]")
        if position + hidden.shape[1] > self.max_length:
            raise ValueError(
                f"the session's max_length {self.max_length} is too small for {position + hidden.shape[1]} tokens"
            )
        if self.batch_size is None:
            await self._open(hidden.shape[0])
        elif hidden.shape[0] != self.batch_size:
            raise ValueError(
                f"the session was opened for batch size {self.batch_size}, got {hidden.shape[0]}"
            )
        extra = [key_mask] if key_mask is not None else []
        timings = []
        for hop, stream in zip(self.hops, self._streams):
            began = time.perf_counter()
            await stream.send(Message({"position": position}, [hidden, *extra]))
            reply = await stream.recv(timeout=self.swarm.request_timeout_s)
            if "error" in reply.meta:
                error = reply.meta["error"]
                raise SessionError(hop.peer_id, str(error.get("code")), str(error.get("message")))
            hidden = reply.tensors[0]
            timings.append(HopTiming(time.perf_counter() - began, float(reply.meta.get("compute_s", 0.0))))
        self.last_timings = timings
        self.position = position + hidden.shape[1]
        return hidden

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for stream in self._streams:
            try:
                await stream.close()
            except WireError as e:
                logger.debug("closing a session stream: %s", e)
        self._streams.clear()
