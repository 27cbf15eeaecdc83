"""The server's RPCs: `info`, `forward` over a span, the `inference` stream that owns a KV-cache session, and
`push`, by which the previous server of a chain hands its output straight to this one.

Everything a peer sends is validated here before it reaches the backend. A bad opening request or a full cache
ends the call with an error frame; a bad step inside a session is answered in-band (`{"error": ...}`) and the
session stays usable, so a client's mistake never costs it the cache it built.

Push: a client opens its session with a secret `session_id` and names the one peer allowed to push into it
(`accept_push_from`, the previous server). A step may carry `push`, the remaining hops as
[{"peer_id", "session_id"}, ...]: after computing, this server sends its output to the first of them and tells
the client whether that worked (`pushed`), so a failed push costs one client round trip, never a hang. The
pushed input enters the receiver's session queue as if the client had sent it, and the reply goes to the
client's stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch

from swarmllm.server.backend import Backend, Session
from swarmllm.server.cache import CacheFullError
from swarmllm.wire import CallContext, Connection, Handlers, Incoming, Message, RequestError, WireError
from swarmllm.wire.validation import FLOAT_DTYPES, check_count, check_tensor, get_int

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of this server."""

    max_batch_size: int = 64
    max_forward_tokens: int = 16384
    max_session_length: int = 8192
    session_idle_timeout_s: float = 300.0
    push_timeout_s: float = 10.0


@dataclass
class _PushTarget:
    inbox: Incoming  # the session's stream: pushes join the client's steps there
    accept_from: str | None


class _Pushed(Message):
    """A session input that came from the previous server rather than from the client."""


# what the server needs to push: a connection to a peer, given its id
Connector = Callable[[str], Awaitable[Connection]]


class RequestHandler:
    """Binds the backend to RPC names; `handlers()` is what both transports serve."""

    def __init__(
        self,
        backend: Backend,
        info: Callable[[], dict[str, Any]],
        limits: ServerLimits = ServerLimits(),
        connect: Connector | None = None,
    ):
        self.backend = backend
        self.info = info
        self.limits = limits
        self.connect = connect
        self._push_targets: dict[str, _PushTarget] = {}

    def handlers(self) -> Handlers:
        handlers = Handlers()
        handlers.add_unary("info", self.rpc_info)
        handlers.add_unary("forward", self.rpc_forward)
        handlers.add_stream("inference", self.rpc_inference)
        handlers.add_inline("push", self.rpc_push)
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
        self, request: Message, incoming: Incoming, context: CallContext
    ) -> AsyncIterator[Message]:
        start, end = self._span(request.meta)
        batch_size = get_int(request.meta, "batch_size", low=1, high=self.limits.max_batch_size)
        max_length = get_int(request.meta, "max_length", low=1, high=self.limits.max_session_length)
        token = _session_token(request.meta)
        accept_from = request.meta.get("accept_push_from")
        if accept_from is not None and not isinstance(accept_from, str):
            raise RequestError("bad_request", "accept_push_from must be a peer id string")
        if token is not None and token in self._push_targets:
            raise RequestError("bad_request", "session_id is already in use")
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
        # pushes from the previous server join the client's steps in the stream's queue, so all are in order
        if token is not None:
            self._push_targets[token] = _PushTarget(incoming, accept_from)
        last_step = -1
        try:
            while True:
                try:
                    async with asyncio.timeout(self.limits.session_idle_timeout_s):
                        step = await incoming.get()
                except TimeoutError:
                    logger.info(
                        "session %s idle for %.0f s, closing",
                        session.session_id,
                        self.limits.session_idle_timeout_s,
                    )
                    break
                if step is None:
                    break
                number = step.meta.get("step")
                if isinstance(step, _Pushed) and isinstance(number, int) and number <= last_step:
                    continue  # a push that arrived after the client had already sent this step itself
                if isinstance(number, int):
                    last_step = max(last_step, number)
                try:
                    yield await self._step(session, step)
                except RequestError as e:
                    yield Message({"error": {"code": e.code, "message": e.message}})
        finally:
            if token is not None:
                self._push_targets.pop(token, None)
            self.backend.close_session(session)
            logger.debug("session %s closed", session.session_id)

    def rpc_push(self, request: Message, context: CallContext) -> Message:
        """An input for one of our sessions, computed by the previous server of the client's chain (answered in
        the read loop: a push is on every step's critical path)."""
        token = _session_token(request.meta)
        target = self._push_targets.get(token) if token is not None else None
        if target is None:
            raise RequestError("unknown_session", "no open session with this session_id")
        if target.accept_from is None or target.accept_from != context.peer_id:
            raise RequestError("forbidden", f"this session does not accept pushes from {context.peer_id}")
        try:
            target.inbox.put_nowait(_Pushed(request.meta, request.tensors))
        except asyncio.QueueFull:
            raise RequestError("busy", "the session's queue is full") from None
        return Message()

    async def _step(self, session: Session, step: Message) -> Message:
        position = get_int(step.meta, "position", low=0, high=session.length)
        check_count(step.tensors, 1, 2, "an inference step")
        hidden = self._hidden(step.tensors[0], batch=session.batch_size)
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
        meta = {"position": position, "step": step.meta.get("step"), "compute_s": time.perf_counter() - began}
        if step.meta.get("push"):
            meta["pushed"] = await self._push(step.meta, [out, *step.tensors[1:]])
        return Message(meta, [out])

    async def _push(self, step_meta: dict[str, Any], tensors: list[torch.Tensor]) -> bool:
        """Send our output to the next server of the chain; False (and the client sends it) if that fails."""
        hops = step_meta["push"]
        if self.connect is None or not isinstance(hops, list) or not all(isinstance(h, dict) for h in hops):
            return False
        peer_id, token = hops[0].get("peer_id"), hops[0].get("session_id")
        if not isinstance(peer_id, str) or not isinstance(token, str):
            return False
        try:
            conn = await self.connect(peer_id)
            meta = {"session_id": token, "position": step_meta["position"], "step": step_meta.get("step")}
            message = Message({**meta, "push": hops[1:]}, tensors)
            await conn.call("push", message, timeout=self.limits.push_timeout_s)
            return True
        except (TimeoutError, WireError, OSError) as e:
            logger.info("push to %s failed (%s); the client will send it", peer_id, e)
            return False

    def _span(self, meta: dict[str, Any]) -> tuple[int, int]:
        start = get_int(meta, "start", low=self.backend.start, high=self.backend.end - 1)
        end = get_int(meta, "end", low=start + 1, high=self.backend.end)
        return start, end

    def _hidden(self, tensor: torch.Tensor, batch: int | None = None) -> torch.Tensor:
        shape = {2: self.backend.hidden_size} if batch is None else {0: batch, 2: self.backend.hidden_size}
        return check_tensor(tensor, "hidden", ndim=3, dtypes=FLOAT_DTYPES, shape=shape, finite=True)

    @staticmethod
    def _mask(tensors: list[torch.Tensor], batch: int, length: int) -> torch.Tensor | None:
        if len(tensors) < 2:
            return None
        return check_tensor(tensors[1], "key_mask", ndim=2, dtypes=(torch.bool,), shape={0: batch, 1: length})


def _session_token(meta: dict[str, Any]) -> str | None:
    """The client-chosen secret id of a session (it is what lets the previous server push into it)."""
    token = meta.get("session_id")
    if token is None:
        return None
    if not isinstance(token, str) or not 16 <= len(token) <= 128:
        raise RequestError("bad_request", "session_id must be a string of 16 to 128 characters")
    return token
