"""The server's RPCs: `info`, `forward` over a span, and the `inference` stream that owns a KV-cache session.

Everything a peer sends is validated here before it reaches the backend. A bad opening request or a full cache
ends the call with an error frame; a bad step inside a session is answered in-band (`{"error": ...}`) and the
session stays usable, so a client's mistake never costs it the cache it built.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import torch

from swarmllm.server.backend import Backend, Session
from swarmllm.server.cache import CacheFullError
from swarmllm.wire import CallContext, Handlers, Message, RequestError
from swarmllm.wire.validation import FLOAT_DTYPES, check_count, check_tensor, get_int

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of this server."""

    max_batch_size: int = 64
    max_forward_tokens: int = 16384
    max_session_length: int = 8192
    session_idle_timeout_s: float = 300.0


class RequestHandler:
    """Binds the backend to RPC names; `handlers()` is what both transports serve."""

    def __init__(
        self, backend: Backend, info: Callable[[], dict[str, Any]], limits: ServerLimits = ServerLimits()
    ):
        self.backend = backend
        self.info = info
        self.limits = limits

    def handlers(self) -> Handlers:
        handlers = Handlers()
        handlers.add_unary("info", self.rpc_info)
        handlers.add_unary("forward", self.rpc_forward)
        handlers.add_stream("inference", self.rpc_inference)
        return handlers

    async def rpc_info(self, request: Message, context: CallContext) -> Message:
        return Message(self.info())

    async def rpc_forward(self, request: Message, context: CallContext) -> Message:
        start, end = self._span(request.meta)
        check_count(request.tensors, 1, 2, "forward")
        hidden = self._hidden(request.tensors[0])
        batch, length = hidden.shape[:2]
        if batch * length > self.limits.max_forward_tokens:
            raise RequestError(
                "too_large", f"{batch}x{length} tokens exceed the limit of {self.limits.max_forward_tokens}"
            )
        key_mask = self._mask(request.tensors, batch, length)
        return Message({}, [await self.backend.forward(hidden, key_mask, start, end)])

    async def rpc_inference(
        self, request: Message, incoming: AsyncIterator[Message], context: CallContext
    ) -> AsyncIterator[Message]:
        start, end = self._span(request.meta)
        batch_size = get_int(request.meta, "batch_size", low=1, high=self.limits.max_batch_size)
        max_length = get_int(request.meta, "max_length", low=1, high=self.limits.max_session_length)
        try:
            session = self.backend.open_session(start, end, batch_size, max_length)
        except CacheFullError as e:
            raise RequestError("cache_full", str(e)) from None
        logger.debug(
            "session %s opened by %s: blocks [%d, %d) batch %d max_length %d",
            session.session_id,
            context.peer_id,
            start,
            end,
            batch_size,
            max_length,
        )
        try:
            while True:
                try:
                    step = await asyncio.wait_for(anext(incoming), self.limits.session_idle_timeout_s)
                except StopAsyncIteration:
                    break
                except asyncio.TimeoutError:
                    logger.info(
                        "session %s idle for %.0f s, closing",
                        session.session_id,
                        self.limits.session_idle_timeout_s,
                    )
                    break
                try:
                    yield await self._step(session, step)
                except RequestError as e:
                    yield Message({"error": {"code": e.code, "message": e.message}})
        finally:
            self.backend.close_session(session)
            logger.debug("session %s closed", session.session_id)

    async def _step(self, session: Session, step: Message) -> Message:
        position = get_int(step.meta, "position", low=0, high=session.length)
        check_count(step.tensors, 1, 2, "an inference step")
        hidden = self._hidden(step.tensors[0])
        check_tensor(hidden, "hidden", ndim=3, dtypes=FLOAT_DTYPES, shape={0: session.batch_size})
        length = hidden.shape[1]
        if position + length > session.max_length:
            raise RequestError(
                "too_long",
                f"positions [{position}, {position + length}) exceed max_length {session.max_length}",
            )
        new_mask = self._mask(step.tensors, session.batch_size, length)
        began = time.perf_counter()
        out = await self.backend.step(session, hidden, position, new_mask)
        # the compute time lets clients and benchmarks split a hop into network and server work
        return Message({"position": position, "compute_s": time.perf_counter() - began}, [out])

    def _span(self, meta: dict[str, Any]) -> tuple[int, int]:
        start = get_int(meta, "start", low=self.backend.start, high=self.backend.end - 1)
        end = get_int(meta, "end", low=start + 1, high=self.backend.end)
        return start, end

    def _hidden(self, tensor: torch.Tensor) -> torch.Tensor:
        return check_tensor(
            tensor, "hidden", ndim=3, dtypes=FLOAT_DTYPES, shape={2: self.backend.hidden_size}, finite=True
        )

    @staticmethod
    def _mask(tensors: list[torch.Tensor], batch: int, length: int) -> torch.Tensor | None:
        if len(tensors) < 2:
            return None
        return check_tensor(tensors[1], "key_mask", ndim=2, dtypes=(torch.bool,), shape={0: batch, 1: length})
