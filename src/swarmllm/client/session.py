"""An inference session: KV caches kept on a chain of servers, stepped one chunk of tokens at a time.

The chain is chosen on the first step (when the batch size is known) and each hop gets one stream over the
persistent connection to its server; a step involves no DHT look-up. With push (the default), the client sends a
step to the first server only, and each server hands its output straight to the next one (the client names the
chain and each server's session secret); every server still replies to the client, which keeps each hop's output
and sends it on itself whenever a server reports that its push failed.
"""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass

import torch

from swarmllm.client.routing import Hop
from swarmllm.client.swarm import SwarmClient, hidden_from, raise_refusal
from swarmllm.wire import Message, Stream, WireError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HopTiming:
    """One hop of a step as the client saw it: the time from the previous hop's reply (or the step's start) to
    this hop's reply, and the server's compute within it."""

    elapsed_s: float
    compute_s: float


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
        self._chain: list[dict[str, str]] = []  # per hop: peer id and the session's secret, for pushes
        self._steps = 0
        self.pushed_hops = 0  # hop inputs that a server pushed to the next one (the client did not send them)
        self.last_timings: list[HopTiming] = []
        self.closed = False

    async def _open(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.hops = await self.swarm.route_inference(min_cache_tokens=batch_size * self.max_length)
        for i, hop in enumerate(self.hops):
            conn = await self.swarm.connection(hop.peer_id)
            token = secrets.token_urlsafe(24)
            opening = {
                "start": hop.start,
                "end": hop.end,
                "batch_size": batch_size,
                "max_length": self.max_length,
                "session_id": token,
            }
            if i > 0 and self.swarm.push:
                opening["accept_push_from"] = self.hops[i - 1].peer_id
            self._chain.append({"peer_id": hop.peer_id, "session_id": token})
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
        self._steps += 1
        timings, pushed, began = [], False, time.perf_counter()
        for i, (hop, stream) in enumerate(zip(self.hops, self._streams)):
            if not pushed:
                meta = {"position": position, "step": self._steps}
                if self.swarm.push and i + 1 < len(self.hops):
                    meta["push"] = self._chain[i + 1 :]
                await stream.send(Message(meta, [hidden, *extra]))
            reply = await self._reply(hop, stream)
            hidden = hidden_from(reply, hop.peer_id, hidden)
            pushed = bool(reply.meta.get("pushed"))
            self.pushed_hops += pushed
            now = time.perf_counter()
            timings.append(HopTiming(now - began, float(reply.meta.get("compute_s", 0.0))))
            began = now
        self.last_timings = timings
        self.position = position + hidden.shape[1]
        return hidden

    async def _reply(self, hop: Hop, stream: Stream):
        """This step's reply from a hop; a reply to an earlier step (a push that timed out but still arrived
        after the client had sent the input itself) is dropped."""
        while True:
            reply = await stream.recv(timeout=self.swarm.request_timeout_s)
            raise_refusal(reply, hop.peer_id)
            if reply.meta.get("step") == self._steps:
                return reply
            logger.debug("dropping a stale reply from %s: %s", hop.peer_id, reply.meta)

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
