"""The server's RPCs: `info`, `ping` (peers time it to measure their link), `forward` over a span, the
`inference` stream that owns a KV-cache session, `room` (whether such a session would find room), `push`, by
which the previous server of a chain hands its output straight to this one, and for fine-tuning `backward` over a
span and the `adapters` stream on which a client uploads its LoRA adapters (`server.adapters`; they live as long
as that stream, or until unused).

Everything a peer sends is validated here before it reaches the backend (message types: `wire.messages`). A
bad opening request or a full cache ends the call with an error frame; a bad step inside a session is answered
in-band (`StepError`) and the session stays usable, so a client's mistake never costs it the cache it built.

Push: a client opens its session with a secret `session_id` and names the one peer allowed to push into it
(`accept_push_from`, the previous server); a `Repoint` message changes that peer when the client replaced the
previous hop. A step may carry `push`, the remaining hops: after computing, this server sends its output to the
first of them and replies to the client at once (`pushed`). A push is a notice (`Connection.notify`): one frame,
which the next server answers only to refuse it, so a hop costs no ack. If the push fails (it cannot be sent within
the step's `push_timeout_s`, the next server refuses it, or the connection to it breaks before the session's next
step), a `PushFailed` follows on the session's stream and the client sends that input itself, so a failed push
costs one client round trip, never a hang. A push for a session not open yet (it outran the client's opening)
waits for it, briefly and within bounds. The pushed input enters the receiver's session queue as if the client
had sent it, and the reply goes to the client's stream.

Ladder Residual: where the first edge of a request's blocks lies inside a ladder region of the checkpoint
(`BlockConfig.carries_pending`), its input is the pair (r, p) and `pending` must come with `hidden`, of the same
shape; anywhere else it must not. Replies and pushes carry p where the last edge lies inside one. A request that
gets this wrong is refused (`bad_request`, naming the boundary) and the session stays usable.

Quotas (`server.quota`): each peer may hold a bounded number of sessions and share of the cache budget, have a
bounded number of calls waiting for compute, and call at a bounded rate. A request beyond a peer's limit is
refused with `quota`, one beyond the server's capacity with `busy` (and a cache too full for a session with
`cache_full`); the message names the limit, and the refusal touches nothing else the peer holds. A session whose
replies the client does not take within `reply_timeout_s` (it stopped reading) is closed and its cache freed.
A client refused room (`quota` for its sessions or share, `cache_full`) asks `room` before it opens again: the
query is answered as soon as a session here ends and frees room for it, the waiting queries in the order they came
(`server.room`), or after `max_room_wait_s`. Room told to a peer is held from other peers' openings until it opens
or `room_promise_s` ends.

Leaving: `leave()` makes every session finish the steps already queued, then end with `server_leaving`, and
refuses new sessions, so clients move to other servers before this one goes. Moving: `use_backend()` serves new
requests from a backend over the server's new blocks, and `hand_back()` hands the old backend's sessions back the
same way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import torch

from swarmllm.server.adapters import Adapter, AdapterStore
from swarmllm.server.backend import Backend, Session, joined
from swarmllm.server.cache import CacheFullError
from swarmllm.server.metrics import ServerMetrics
from swarmllm.server.network import PING_MAX_BYTES
from swarmllm.server.quota import PeerLimits, PeerQuotas, Refusal
from swarmllm.server.reachability import DialBacks, dial_address
from swarmllm.server.room import RoomQueue
from swarmllm.wire import CallContext, Connection, Handlers, Incoming, Message, RequestError, WireError
from swarmllm.wire.messages import (
    AdapterAck,
    AdapterRef,
    AdapterUpload,
    BackwardReply,
    BackwardRequest,
    ForwardReply,
    ForwardRequest,
    OpenSession,
    PushFailed,
    ReachQuery,
    ReachReply,
    Repoint,
    RoomQuery,
    RoomReply,
    Step,
    StepError,
    StepReply,
    parse_session_input,
)
from swarmllm.wire.validation import FLOAT_DTYPES, check_count, check_range, check_tensor

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of this server."""

    max_batch_size: int = 64
    max_forward_tokens: int = 16384
    max_session_length: int = 8192
    session_idle_timeout_s: float = 300.0
    push_timeout_s: float = 10.0  # the most a step's push may take (a client may ask for less)
    reply_timeout_s: float = 30.0  # a session whose reply the client does not take this long is closed
    max_room_wait_s: float = 2.0  # the most a `room` query waits for room to come free
    # room told to a waiting peer is its this long, or until it opens; a query whose wait ended keeps its place
    # this long for the peer's next one (`room`)
    room_promise_s: float = 1.0
    # per peer (a peer = an authenticated peer id), see `server.quota`
    max_sessions_per_peer: int = 16
    max_cache_share_per_peer: float = 0.5  # of the KV-cache budget
    max_queued_per_peer: int = 8  # forward calls waiting for (or on) the compute thread
    max_room_waits_per_peer: int = 4  # `room` queries of a peer waiting at once (past them: answered at once)
    max_room_waits_total: int = 256  # the same over all peers
    max_queued_total: int = 64  # the same over all peers; beyond it: `busy`
    peer_rate_per_s: float = 50.0  # calls and session openings per second (token bucket)
    peer_burst: int = 100
    # fine-tuning
    max_prompt_tokens: int = 4096  # deep prompts per block of one request: batch x prompt positions
    max_adapters_per_peer: int = 4  # LoRA adapters one peer may have uploaded at once
    max_adapter_bytes_per_peer: int = 256 << 20
    adapter_idle_timeout_s: float = 600.0  # an uploaded adapter unused this long is dropped

    def peer_limits(self) -> PeerLimits:
        return PeerLimits(
            max_sessions=self.max_sessions_per_peer,
            max_cache_share=self.max_cache_share_per_peer,
            max_queued=self.max_queued_per_peer,
            max_queued_total=self.max_queued_total,
            rate_per_s=self.peer_rate_per_s,
            burst=self.peer_burst,
        )


@dataclass
class _Parts:
    """A step arriving in parts, pushed by a previous server that prefilled it in chunks: our outputs so far."""

    step: int
    whole: tuple[int, int]  # the step's positions [start, end)
    next: int  # where the next part starts
    outs: list[tuple[torch.Tensor, torch.Tensor | None]]
    compute_s: float = 0.0
    pushed: bool = True  # every part's output went on to the next server
    copied: int = 0  # positions copied from the prefix cache


@dataclass
class _SessionInbox:
    inbox: Incoming  # the session's stream: pushes join the client's steps there
    accept_from: str | None
    pushed_step: int = -1  # the last step whose output this session pushed on (only its failure matters)
    parts: _Parts | None = None  # a step arriving in parts, until its last part is done

    def takes_part(self, step: Step) -> bool:
        """Whether a pushed part of the step being assembled continues it, or starts it again (a replacement of
        the previous server pushes it anew)."""
        parts = self.parts
        if parts is None or step.whole != parts.whole or step.step != parts.step:
            return False
        return step.position in (parts.next, parts.whole[0])


@dataclass
class _Pushed(Message):
    """A session input that came from the previous server rather than from the client (parsed on arrival, to
    find its session)."""

    step: Step | None = None


class _PushFailed(Message):
    """A `PushFailed` notice for the client, queued behind the session's inputs by a push that failed."""


# (eq=False: found and removed by identity; comparing two pushes' fields would compare their tensors)
@dataclass(eq=False)
class _EarlyPush:
    """A push for a session that is not open yet, waiting for it (`RequestHandler._park`)."""

    message: Message
    step: Step
    sender: str | None
    nbytes: int
    delivered: asyncio.Future


# A push may arrive before the session it is for: a client opens each hop's session and sends the first step at
# once, and the previous server, nearer to us than the client or just quicker, can push the first chunk of a prompt
# before the opening gets here. Such a push waits for its session up to this long (or its step's push timeout),
# within these bounds for all peers together and for each peer; past them it is refused at once and the client
# sends it itself (a peer that fills its own share with pushes for sessions that never open leaves the rest to
# the others).
EARLY_PUSH_WAIT_S = 2.0
MAX_EARLY_PUSHES = 64
MAX_EARLY_PUSH_BYTES = 64 << 20
MAX_EARLY_PUSHES_PER_PEER = 16
MAX_EARLY_PUSH_BYTES_PER_PEER = 16 << 20

_LEAVING = Message({"kind": "leaving"})  # put into every session's queue when the server leaves
_ANONYMOUS = "anonymous"  # the quota key of callers whose transport proved no peer id


def _peer(context: CallContext) -> str:
    return context.peer_id or _ANONYMOUS


def _check_compute(backend: Backend) -> None:
    """`compute_failed` where the backend can no longer compute (the server announces offline and exits)."""
    if (why := backend.failure()) is not None:
        raise RequestError("compute_failed", f"this server's compute failed ({why}); it is leaving the swarm")


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
        peer_id: str | None = None,
        adapters: AdapterStore | None = None,
        metrics: ServerMetrics | None = None,
        dial_backs: DialBacks | None = None,
    ):
        self.backend = backend
        self.dial_backs = dial_backs  # checks of whether peers can be dialled where they announce (`reach`)
        self.metrics = metrics or ServerMetrics()
        self.adapters = adapters or AdapterStore(
            backend.span.config,
            backend.dtype,
            backend.device,
            max_adapters_per_peer=limits.max_adapters_per_peer,
            max_bytes_per_peer=limits.max_adapter_bytes_per_peer,
            idle_timeout_s=limits.adapter_idle_timeout_s,
        )
        self.info = info
        self.limits = limits
        self.connect = connect
        self.peer_id = peer_id  # ours: a push to ourselves (two hops of a chain here) skips the network
        self.leaving = False
        self.quotas = PeerQuotas(limits.peer_limits())
        self._by_token: dict[str, _SessionInbox] = {}  # sessions that may receive pushes, by secret id
        self._open: dict[Incoming, Backend] = {}  # every open session's queue, and the backend it runs on
        # what each open session counts against its peer's quotas (peer, cache tokens), until it closes or its
        # blocks are left (`use_backend`)
        self._counted: dict[Incoming, tuple[str, int]] = {}
        self._session_closed = asyncio.Event()  # set whenever a session closes
        # `room` queries waiting, in turn
        self._room = RoomQueue(
            self._lacks_room,
            limits.room_promise_s,
            limits.max_room_waits_per_peer,
            limits.max_room_waits_total,
        )
        self._pushes: set[asyncio.Task] = set()  # pushes waiting for a connection (a reply does not wait)
        self._push_connections: dict[str, Connection] = {}  # the next servers pushed to, by peer id
        # pushes that came before their session, by its secret id
        self._early: dict[str, list[_EarlyPush]] = {}

    def handlers(self) -> Handlers:
        """The RPCs, each capped at the largest payload it can validly carry, so a peer's declared size costs
        memory only up to what the method may take."""
        limits = self.limits
        prompt_bytes = self._prompt_bytes()
        step_bytes = self._activation_bytes(limits.max_batch_size * limits.max_session_length) + prompt_bytes
        forward_bytes = self._activation_bytes(limits.max_forward_tokens) + prompt_bytes
        handlers = Handlers()
        handlers.admit = self._admit
        handlers.refused = self.metrics.refused  # (a frame over its method's cap, refused by the wire)
        handlers.add_unary("info", self.rpc_info, max_payload_bytes=0)
        handlers.add_unary("ping", self.rpc_ping, max_payload_bytes=PING_MAX_BYTES)
        handlers.add_unary("room", self.rpc_room, max_payload_bytes=0)
        if self.dial_backs is not None:
            handlers.add_unary("reach", self.rpc_reach, max_payload_bytes=0)
        handlers.add_unary("forward", self.rpc_forward, max_payload_bytes=forward_bytes)
        handlers.add_unary("backward", self.rpc_backward, max_payload_bytes=2 * forward_bytes)
        handlers.add_stream("inference", self.rpc_inference, max_payload_bytes=step_bytes)
        handlers.add_notice("push", self.rpc_push, max_payload_bytes=step_bytes)
        handlers.add_stream(
            "adapters", self.rpc_adapters, max_payload_bytes=limits.max_adapter_bytes_per_peer
        )
        return handlers

    def _admit(self, peer_id: str | None) -> RequestError | None:
        """Every call (a session opening too) takes a token of its peer's request rate, checked before the
        call's payload is read (`Handlers.admit`); the calls of an open session's stream and pushes do not."""
        if (refusal := self.quotas.request(peer_id or _ANONYMOUS)) is None:
            return None
        return self._refusal(refusal.code, refusal.message, refusal.retry_after_s)

    def _prompt_bytes(self) -> int:
        """The largest deep prompts a request may carry: max_prompt_tokens per block of the span."""
        widest = max(dtype.itemsize for dtype in FLOAT_DTYPES)
        blocks = self.backend.end - self.backend.start
        return blocks * self.limits.max_prompt_tokens * self.backend.hidden_size * widest

    def _activation_bytes(self, tokens: int) -> int:
        """The payload of `tokens` hidden states in the widest accepted dtype (twice that for a ladder checkpoint,
        whose requests may carry p beside r), with a key mask (and padding)."""
        widest = max(dtype.itemsize for dtype in FLOAT_DTYPES)
        states = 2 if self.backend.span.config.ladder_layers else 1
        return tokens * (states * self.backend.hidden_size * widest + 1) + 16

    def _refuse(self, refusal: Refusal | None) -> None:
        if refusal is not None:
            raise self._refusal(refusal.code, refusal.message, refusal.retry_after_s)

    def _refusal(self, code: str, message: str, retry_after_s: float | None = None) -> RequestError:
        """A refusal (the server cannot or will not take the request now), counted by code in the metrics;
        `retry_after_s`: when asking again will do (a request rate's next token)."""
        self.metrics.refused(code)
        return RequestError(code, message, retry_after_s)

    def use_backend(self, backend: Backend) -> None:
        """Serve new requests from `backend` (the server moved to other blocks); sessions already open stay on
        their backend until `hand_back` (or one more step). They stop counting against their peers'
        quotas now (their cache is the old backend's, already reserved): a client failing over to our new blocks
        is not refused for the session on our old ones that it is about to lose."""
        self.backend = backend
        for inbox in [i for i, b in self._open.items() if b is not backend]:
            self._uncount(inbox)

    def _uncount(self, inbox: Incoming) -> None:
        if (counted := self._counted.pop(inbox, None)) is not None:
            self.quotas.close_session(*counted)
            self._room.changed()

    def _cache_freed(self, freed: Future | None) -> None:
        """Wake the `room` queries once a closed session's cache is back (at once, or after the compute thread's
        work that still used it)."""
        if freed is None:
            self._room.changed()
            return
        loop = asyncio.get_running_loop()

        def done(_: Future) -> None:
            with suppress(RuntimeError):  # the loop closed: the server is gone, and nobody waits
                loop.call_soon_threadsafe(self._room.changed)

        freed.add_done_callback(done)

    def hand_back(self, backend: Backend) -> None:
        """Hand the sessions on `backend` back to their clients after the steps they already received, as when
        the server leaves (the server moved, and announced where, so their failover finds the blocks)."""
        self._wake([inbox for inbox, b in self._open.items() if b is backend])

    async def sessions_closed(self, backend: Backend | None, timeout_s: float) -> None:
        """Wait up to `timeout_s` until no session runs on `backend` (None: on any backend)."""
        try:
            async with asyncio.timeout(timeout_s):
                while any(backend is None or b is backend for b in self._open.values()):
                    self._session_closed.clear()
                    await self._session_closed.wait()
        except TimeoutError:
            logger.warning("%d sessions still open after %.0f s; going on", len(self._open), timeout_s)

    def _wake(self, inboxes: list[Incoming]) -> None:
        for inbox in inboxes:
            try:
                inbox.put_nowait(_LEAVING)
            except asyncio.QueueFull:
                pass  # the session sees it is handed back after its next step

    async def leave(self, timeout_s: float) -> None:
        """Hand back every session (after the steps it already received) and wait up to `timeout_s` for them
        to close."""
        self.leaving = True
        self._room.changed()  # (its waiting queries are told at once)
        self._wake(list(self._open))
        await self.sessions_closed(None, timeout_s)

    async def rpc_info(self, request: Message, context: CallContext) -> Message:
        return Message(self.info())

    async def rpc_room(self, request: Message, context: CallContext) -> Message:
        """Whether a session like the query's would be opened for this peer now, answered as soon as room comes
        free for it in its turn (`server.room`) within the query's wait: a client refused room asks this before
        it opens again, rather than pausing. Waiting queries are bounded, per peer and in all; past them, one is
        answered at once."""
        peer, limits = _peer(context), self.limits
        query = RoomQuery.parse(request)
        self._span(query.start, query.end)
        check_range("batch_size", query.batch_size, 1, limits.max_batch_size)
        check_range("max_length", query.max_length, 1, limits.max_session_length)
        wait_s = min(max(query.wait_s, 0.0), limits.max_room_wait_s)
        self.metrics.room_waits.inc()
        try:
            why = await self._room.ask(peer, query.batch_size, query.max_length, wait_s)
        finally:
            self.metrics.room_waits.dec()
        return RoomReply(not why, why).to_message()

    def _lacks_room(self, peer: str, batch_size: int, max_length: int) -> tuple[str, bool]:
        """Why `peer` could not open such a session now ("" if it could), and whether no closing changes that."""
        if self.leaving:
            return "this server is leaving the swarm", True
        backend = self.backend
        tokens = backend.session_tokens(batch_size, max_length)
        if (refusal := self.quotas.admits(peer, tokens, backend.budget.capacity_tokens)) is not None:
            return refusal.message, refusal.code == "bad_request"
        if not backend.has_room((batch_size, max_length, tokens)):
            free, capacity = backend.free_tokens, backend.budget.capacity_tokens
            return f"the cache has {free} of {capacity} tokens free", False
        return "", False

    async def rpc_ping(self, request: Message, context: CallContext) -> Message:
        """Echo the payload's size: peers time it to measure their link to us (`server.network`); the payload
        is capped at PING_MAX_BYTES where the method is registered."""
        check_count(request.tensors, 0, 1, "ping")
        return Message({"bytes": sum(t.numel() * t.element_size() for t in request.tensors)})

    async def rpc_reach(self, request: Message, context: CallContext) -> Message:
        """Dial the asking peer back at the address it asks about, or at a port of the address its connection
        comes from (`server.reachability`): whether it answers there and proves its id; a failure is answered only
        after the check's whole time."""
        addr = dial_address(ReachQuery.parse(request), context.remote_host)
        if (refusal := self.dial_backs.refusal(context.peer_id)) is not None:
            raise self._refusal(*refusal)
        return ReachReply(await self.dial_backs.check(context.peer_id, addr), addr).to_message()

    async def rpc_forward(self, request: Message, context: CallContext) -> Message:
        peer = _peer(context)
        req = ForwardRequest.parse(request)
        start, end = self._span(req.start, req.end)
        hidden = self._hidden(req.hidden)
        batch, length = hidden.shape[:2]
        if batch * length > self.limits.max_forward_tokens:
            raise self._refusal(
                "too_large", f"{batch}x{length} tokens exceed the limit of {self.limits.max_forward_tokens}"
            )
        key_mask = self._mask(req.key_mask, batch, length)
        prompts = self._prompts(req.prompts, end - start, batch, length)
        adapter = self._adapter(peer, req.adapter, start, end)
        pending = self._pending(req.pending, hidden, start)
        args = (hidden, key_mask, start, end, peer, prompts, adapter, req.dropout_seed, pending)
        if self.backend.inline(batch * length):
            self.metrics.forward(batch * length)
            return ForwardReply(*await self.backend.forward(*args), req.compression).to_message()
        self._refuse(self.quotas.enqueue(peer))
        self.metrics.forward(batch * length)  # (a call refused above is counted as a refusal, not served)
        try:
            return ForwardReply(*await self.backend.forward(*args), req.compression).to_message()
        finally:
            self.quotas.dequeue(peer)

    async def rpc_backward(self, request: Message, context: CallContext) -> Message:
        """Gradients of a span's inputs (and of the request's prompts and adapter) from its inputs and the
        gradient of its outputs; the forward is recomputed with autograd (see `Backend.backward`)."""
        peer = _peer(context)
        self._check_tunable("backward")
        req = BackwardRequest.parse(request)
        start, end = self._span(req.start, req.end)
        hidden = self._hidden(req.hidden)
        batch, length = hidden.shape[:2]
        if batch * length > self.limits.max_forward_tokens:
            raise self._refusal(
                "too_large", f"{batch}x{length} tokens exceed the limit of {self.limits.max_forward_tokens}"
            )
        shape = dict(enumerate(hidden.shape))
        grad = check_tensor(req.grad, "grad", ndim=3, dtypes=FLOAT_DTYPES, shape=shape, finite=True)
        key_mask = self._mask(req.key_mask, batch, length)
        prompts = self._prompts(req.prompts, end - start, batch, length)
        adapter = self._adapter(peer, req.adapter, start, end)
        if req.lora_grads and (adapter is None or adapter.version is None):
            raise RequestError("bad_request", "lora_grads needs an adapter the client uploaded")
        pending = self._pending(req.pending, hidden, start)
        grad_pending = self._pending(req.grad_pending, hidden, end, "grad_pending")
        self._refuse(self.quotas.enqueue(peer))
        try:
            grads = await self.backend.backward(
                hidden,
                grad,
                key_mask,
                start,
                end,
                peer,
                prompts,
                adapter,
                req.dropout_seed,
                req.lora_grads,
                pending,
                grad_pending,
            )
        finally:
            self.quotas.dequeue(peer)
        return BackwardReply(
            grads.hidden, grads.prompts, grads.lora, grads.pending, req.compression
        ).to_message()

    async def rpc_adapters(
        self, request: Message, incoming: Incoming, context: CallContext
    ) -> AsyncIterator[Message]:
        """A client's adapter uploads, each answered by an `AdapterAck` (or an in-band error); what it uploaded
        is dropped when the stream ends, or when none of it was used for `adapter_idle_timeout_s`."""
        peer = _peer(context)
        self._check_tunable("adapters")
        held: dict[str, Adapter] = {}
        try:
            while True:
                try:
                    async with asyncio.timeout(self.adapters.idle_timeout_s):
                        message = await incoming.get()
                except TimeoutError:
                    if self.adapters.idle(held):
                        logger.info(
                            "adapters of %s unused for %.0f s, dropping", peer, self.adapters.idle_timeout_s
                        )
                        break
                    continue
                if message is None:
                    break
                try:
                    upload = AdapterUpload.parse(message)
                    held[upload.name] = self.adapters.upload(
                        peer, upload, (self.backend.start, self.backend.end)
                    )
                    reply = AdapterAck(upload.name, upload.version).to_message()
                except RequestError as e:
                    reply = StepError.from_request_error(e).to_message()
                yield reply
        finally:
            self.adapters.drop(peer, held)

    async def rpc_inference(
        self, request: Message, incoming: Incoming, context: CallContext
    ) -> AsyncIterator[Message]:
        peer = _peer(context)
        opening = OpenSession.parse(request)
        start, end = self._span(opening.start, opening.end)
        check_range("batch_size", opening.batch_size, 1, self.limits.max_batch_size)
        check_range("max_length", opening.max_length, 1, self.limits.max_session_length)
        token = opening.session_id
        if token is not None and token in self._by_token:
            raise RequestError("bad_request", "session_id is already in use")
        if self.leaving:
            raise self._refusal("server_leaving", "this server is leaving the swarm")
        backend = self.backend  # a session stays on the blocks it opened on, even if the server moves
        adapter = self._adapter(peer, opening.adapter, start, end)
        cache_tokens = backend.session_tokens(opening.batch_size, opening.max_length)  # (arena rows: whole)
        if (held := self._room.held(peer)) is not None and not backend.has_room(
            (opening.batch_size, opening.max_length, cache_tokens), (*held, backend.session_tokens(*held))
        ):
            raise self._refusal(
                "cache_full", "the free cache here is promised to a session that waited for it"
            )
        self._refuse(self.quotas.open_session(peer, cache_tokens, backend.budget.capacity_tokens))
        try:
            session = backend.open_session(
                start, end, opening.batch_size, opening.max_length, peer, adapter, cache_tokens
            )
        except BaseException as e:
            self.quotas.close_session(peer, cache_tokens)
            if isinstance(e, CacheFullError):
                raise self._refusal("cache_full", str(e)) from None
            raise
        logger.debug(
            "session %s opened by %s: blocks [%d, %d) batch %d max_length %d",
            session.session_id,
            context.peer_id,
            start,
            end,
            opening.batch_size,
            opening.max_length,
        )
        # pushes from the previous server join the client's steps in the stream's queue, so all are in order
        target = _SessionInbox(incoming, opening.accept_push_from)
        if token is not None:
            self._by_token[token] = target
            for early in self._early.pop(token, []):
                self._hand_over(early)
        self._open[incoming] = backend
        self._counted[incoming] = (peer, cache_tokens)
        self._room.opened(peer, opening.batch_size, opening.max_length)  # (the next waiting query's turn)
        self.metrics.sessions_opened.inc()
        self.metrics.sessions_open.inc()
        if opening.replay:
            self.metrics.replays.inc()
        last_step = last_pushed = -1
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        try:
            while True:
                _check_compute(backend)
                if self.leaving or backend is not self.backend:
                    raise self._refusal("server_leaving", "this server is leaving these blocks")
                try:
                    async with asyncio.timeout(self.limits.session_idle_timeout_s):
                        message = await incoming.get()
                except TimeoutError:
                    logger.info(
                        "session %s idle for %.0f s, closing",
                        session.session_id,
                        self.limits.session_idle_timeout_s,
                    )
                    break
                if message is None:
                    break
                if message is _LEAVING:
                    continue  # `leaving` is checked at the top
                if isinstance(message, _PushFailed):
                    reply = message  # a push of ours failed: the client sends that input itself
                else:
                    try:
                        item = message.step if isinstance(message, _Pushed) else parse_session_input(message)
                        if isinstance(item, Repoint):
                            target.accept_from = item.accept_push_from
                            continue
                        pushed = isinstance(message, _Pushed)
                        if not pushed and item.whole is not None:
                            raise RequestError(
                                "bad_request", "only the previous server pushes part of a step"
                            )
                        if pushed and item.whole is not None:
                            if not (item.step > last_step and item.position == item.whole[0]) and not (
                                target.takes_part(item)
                            ):
                                continue  # a part out of order, or of a step done: the client sends it itself
                        elif pushed and item.step <= last_step:
                            continue  # a push that arrived after the client had already sent this step itself
                        if not pushed and item.step == last_pushed:
                            # the client sent a step whose push had landed (it took the push as failed)
                            continue
                        if pushed and (
                            item.whole is None or item.position + item.hidden.shape[1] == item.whole[1]
                        ):
                            last_pushed = item.step  # (a step pushed in parts has landed with its last)
                        if opening.replay and item.step == 0 and not isinstance(message, _Pushed):
                            self.metrics.replayed_tokens.inc(item.hidden.shape[0] * item.hidden.shape[1])
                        last_step = max(last_step, item.step)
                        reply = await self._step(backend, session, item, opening.compression, target)
                        if reply is None:
                            continue  # a part of a step: the client gets one reply, after the last
                    except RequestError as e:
                        target.parts = None
                        reply = StepError.from_request_error(e).to_message()
                    except Exception:  # a step that failed because the compute is gone ends the session
                        _check_compute(backend)
                        raise
                # the stream's task sends the reply while we wait here: a client that stops reading makes that
                # send wait for ever, so a deadline ends the whole call (and this session, in `finally`)
                deadline = loop.call_later(self.limits.reply_timeout_s, self._reply_late, task, session)
                try:
                    yield reply
                finally:
                    deadline.cancel()
        finally:
            self._uncount(incoming)
            if token is not None:
                self._by_token.pop(token, None)
            self._open.pop(incoming, None)
            self.metrics.sessions_open.dec()
            self._session_closed.set()
            self._cache_freed(backend.close_session(session))
            logger.debug("session %s closed", session.session_id)

    def _reply_late(self, task: asyncio.Task, session: Session) -> None:
        logger.info(
            "session %s: the client took no reply for %.0f s, closing",
            session.session_id,
            self.limits.reply_timeout_s,
        )
        task.cancel()

    def rpc_push(self, request: Message, context: CallContext) -> Awaitable[None] | None:
        """An input for one of our sessions, computed by the previous server of the client's chain (a notice,
        handled in the read loop: a push is on every step's critical path). One for a session not open yet waits
        for it (`EARLY_PUSH_WAIT_S`)."""
        step = self._push_step(request)
        if step.session_id is not None and step.session_id not in self._by_token:
            return self._park(request, step, context.peer_id)
        self._deliver_push(request, context.peer_id)
        return None

    @staticmethod
    def _push_step(message: Message) -> Step:
        step = parse_session_input(message)
        if not isinstance(step, Step):
            raise RequestError("bad_request", "a push carries a step, nothing else")
        return step

    async def _park(self, message: Message, step: Step, sender: str | None) -> None:
        """Hold a push until its session opens, in order with the pushes after it; refused (`unknown_session`)
        if it does not open in time, or at once when the pushes held already reach their bounds."""
        if step.session_id in self._by_token:
            # it opened since the push was read (its stream's task ran first, and found nothing held yet)
            self._deliver_push(message, sender, step)
            return
        # held as it came and, where parsing decoded it (blockwise8 codes to float32), as parsed too
        wire = message.tensors
        decoded = [t for t in (step.hidden, step.pending) if t is not None and all(t is not w for w in wire)]
        nbytes = sum(t.numel() * t.element_size() for t in [*wire, *decoded])
        held = [early for waiting in self._early.values() for early in waiting]
        own = [early for early in held if early.sender == sender]
        if (
            len(held) >= MAX_EARLY_PUSHES
            or sum(e.nbytes for e in held) + nbytes > MAX_EARLY_PUSH_BYTES
            or len(own) >= MAX_EARLY_PUSHES_PER_PEER
            or sum(e.nbytes for e in own) + nbytes > MAX_EARLY_PUSH_BYTES_PER_PEER
        ):
            raise RequestError("unknown_session", "no open session with this session_id")
        early = _EarlyPush(message, step, sender, nbytes, asyncio.get_running_loop().create_future())
        waiting = self._early.setdefault(step.session_id, [])
        waiting.append(early)
        wait = min(EARLY_PUSH_WAIT_S, step.push_timeout_s or EARLY_PUSH_WAIT_S)
        try:
            async with asyncio.timeout(wait):
                await early.delivered
        except TimeoutError:
            raise RequestError(
                "unknown_session", f"no open session with this session_id (waited {wait:.1f} s for it)"
            ) from None
        finally:
            if early in waiting:
                waiting.remove(early)
                if not waiting and self._early.get(step.session_id) is waiting:
                    del self._early[step.session_id]

    def _hand_over(self, early: _EarlyPush) -> None:
        if early.delivered.done():
            return  # it gave up waiting
        try:
            self._deliver_push(early.message, early.sender, early.step)
            early.delivered.set_result(None)
        except RequestError as e:
            early.delivered.set_exception(e)

    def _deliver_push(self, message: Message, sender: str | None, step: Step | None = None) -> None:
        step = step or self._push_step(message)
        target = self._by_token.get(step.session_id) if step.session_id is not None else None
        if target is None:
            raise RequestError("unknown_session", "no open session with this session_id")
        if target.accept_from is None or target.accept_from != sender:
            raise RequestError("forbidden", f"this session does not accept pushes from {sender}")
        try:
            target.inbox.put_nowait(_Pushed(message.meta, message.tensors, step))
        except asyncio.QueueFull:
            raise self._refusal("busy", "the session's queue is full") from None

    async def _step(
        self, backend: Backend, session: Session, step: Step, compression: str, target: _SessionInbox
    ) -> Message | None:
        """One step of a session; its output goes on (push) and back (reply) in the session's `compression`. A
        step computed in chunks (`Backend.step_chunks`) is pushed chunk by chunk, as parts, so that the next
        server works on one while this one computes the next; a part received is computed and pushed on at once,
        and only the part that ends its step gets a reply (None before that)."""
        check_range("position", step.position, 0, session.length)
        hidden = check_tensor(
            step.hidden,
            "hidden",
            ndim=3,
            dtypes=FLOAT_DTYPES,
            shape={0: session.batch_size, 2: backend.hidden_size},
            finite=True,
        )
        length = hidden.shape[1]
        if step.position + length > session.max_length:
            raise RequestError(
                "too_long",
                f"positions [{step.position}, {step.position + length}) exceed max_length {session.max_length}",
            )
        new_mask = self._mask(step.key_mask, session.batch_size, length)
        prompts = self._prompts(step.prompts, session.end - session.start, session.batch_size, length)
        if prompts is not None and step.push:
            raise RequestError("bad_request", "a step with deep prompts cannot be pushed (they are per hop)")
        pending = None  # (a session whose edges carry r alone, given no p, skips the check: the hot path)
        if step.pending is not None or session.pair:
            pending = self._pending(step.pending, hidden, session.start)
        if step.reorder is not None:  # (one row number per row: `Step.parse` checked it against the batch)
            backend.reorder(session, step.reorder, min(step.position, session.length))
        whole = step.whole or (step.position, step.position + length)
        outs, pushed, compute_s = [], bool(step.push), 0.0
        began = time.perf_counter()
        async for a, b, out, out_pending in backend.step_chunks(
            session, hidden, step.position, new_mask, prompts, pending
        ):
            # the compute time lets clients and benchmarks split a hop into network and server work
            compute_s += time.perf_counter() - began
            outs.append((out, out_pending))
            if pushed:
                part = (step.position + a, step.position + b)
                pushed = await self._start_push(step, part, whole, out, out_pending, compression, target)
            began = time.perf_counter()
        # (after the push: off the chain's path)
        if step.whole is not None:
            self.metrics.part(hidden.shape[0] * length, step.whole[1] - step.whole[0])
            return self._assemble(step, target, outs, compute_s, pushed, compression, session.copied)
        self.metrics.step(hidden.shape[0] * length, length, compute_s)
        target.parts = None
        out, out_pending = joined(outs)
        reply = StepReply(
            step.position, step.step, out, compute_s, pushed, compression, out_pending, session.copied
        )
        return reply.to_message()

    def _assemble(
        self,
        step: Step,
        target: _SessionInbox,
        outs: list[tuple[torch.Tensor, torch.Tensor | None]],
        compute_s: float,
        pushed: bool,
        compression: str,
        copied: int,
    ) -> Message | None:
        """Add a part's outputs to its step's; the reply to the client once the part that ends the step is in."""
        if step.position == step.whole[0]:
            target.parts = _Parts(step.step, step.whole, step.whole[0], [])
        parts = target.parts
        parts.outs += outs
        parts.next = step.position + step.hidden.shape[1]
        parts.compute_s += compute_s
        parts.pushed = parts.pushed and pushed
        parts.copied += copied
        if parts.next < parts.whole[1]:
            return None
        target.parts = None
        self.metrics.step(0, parts.whole[1] - parts.whole[0], parts.compute_s)  # (its tokens counted by part)
        out, out_pending = joined(parts.outs)
        reply = StepReply(
            parts.whole[0],
            step.step,
            out,
            parts.compute_s,
            parts.pushed,
            compression,
            out_pending,
            parts.copied,
        )
        return reply.to_message()

    async def _start_push(
        self,
        step: Step,
        part: tuple[int, int],
        whole: tuple[int, int],
        out: torch.Tensor,
        out_pending: torch.Tensor | None,
        compression: str,
        session: _SessionInbox,
    ) -> bool:
        """Send our output for the step's positions `part` to the next server of the chain before the reply to
        the client (the push is on the chain's critical path), and return once it is sent: over an open
        connection that is at once; a first push of a whole step to a server connects in a task, so the reply
        does not wait for that either (a part waits for it: the parts must go out in order). If the push then
        fails, a `PushFailed` joins this session's queue and reaches the client after the reply, which sends the
        input itself. False (nothing was pushed, the client sends it): no way to push at all."""
        target, *rest = step.push
        mask = step.key_mask
        if mask is not None and part != (step.position, step.position + mask.shape[1]):
            mask = mask[:, part[0] - step.position : part[1] - step.position]
        pushed = Step(
            part[0],
            out,
            mask,
            step.step,
            rest,
            step.push_timeout_s,
            target.session_id,
            compression=compression,
            pending=out_pending,
            whole=None if part == whole else whole,
            reorder=step.reorder,
        ).to_message()
        if target.peer_id == self.peer_id:
            try:
                self._deliver_push(pushed, self.peer_id)
                return True
            except RequestError as e:
                logger.info("push to our own session failed (%s); the client will send it", str(e))
                return False
        if self.connect is None:
            return False
        session.pushed_step = step.step
        conn = self._push_connections.get(target.peer_id)
        if conn is not None and not conn.is_closed:
            await self._notify(conn, target.peer_id, pushed, step, session)
            return True
        if part != whole:
            await self._connect_and_push(target.peer_id, pushed, step, session)
            return True
        task = asyncio.create_task(self._connect_and_push(target.peer_id, pushed, step, session))
        self._pushes.add(task)
        task.add_done_callback(self._pushes.discard)
        await asyncio.sleep(0)  # let the task write the push now if it can, before our reply
        return True

    def _push_timeout(self, step: Step) -> float:
        return min(step.push_timeout_s or self.limits.push_timeout_s, self.limits.push_timeout_s)

    async def _connect_and_push(
        self, peer_id: str, pushed: Message, step: Step, session: _SessionInbox
    ) -> None:
        try:
            async with asyncio.timeout(self._push_timeout(step)):
                conn = await self.connect(peer_id)
        except (TimeoutError, WireError, OSError, RequestError) as e:
            self._push_failed(session, step.step, peer_id, e)
            return
        self._push_connections[peer_id] = conn
        await self._notify(conn, peer_id, pushed, step, session)

    async def _notify(
        self, conn: Connection, peer_id: str, pushed: Message, step: Step, session: _SessionInbox
    ) -> None:
        """Push over `conn`; a failure of this push is reported to the client while it is the session's last."""
        # the connection keeps `failed` for its last pushes: it must not keep the step (its tensors) alive
        number = step.step

        def failed(error: WireError) -> None:
            if session.pushed_step == number:
                self._push_failed(session, number, peer_id, error)

        try:
            await conn.notify("push", pushed, failed, timeout=self._push_timeout(step))
        except (TimeoutError, WireError, OSError) as e:
            self._push_failed(session, step.step, peer_id, e)

    def _push_failed(self, session: _SessionInbox, step: int, peer_id: str, error: BaseException) -> None:
        """Tell the client, after the step's reply, that it must send this step's input to the next hop itself
        (while its session is open: a connection closed after the sessions whose last pushes it carried, as a
        leaving server's are, leaves no one to tell)."""
        if session.inbox not in self._open:
            return
        logger.info("push to %s failed (%s); telling the client to send it", peer_id, repr(error))
        try:
            session.inbox.put_nowait(_PushFailed(PushFailed(step, repr(error)).to_message().meta))
        except asyncio.QueueFull:
            pass  # only a client flooding its own session fills it; its wait for the next hop times out

    def _span(self, start: int, end: int) -> tuple[int, int]:
        check_range("start", start, self.backend.start, self.backend.end - 1)
        check_range("end", end, start + 1, self.backend.end)
        return start, end

    def _hidden(self, tensor: torch.Tensor) -> torch.Tensor:
        shape = {2: self.backend.hidden_size}
        return check_tensor(tensor, "hidden", ndim=3, dtypes=FLOAT_DTYPES, shape=shape, finite=True)

    def _pending(
        self, pending: torch.Tensor | None, hidden: torch.Tensor, boundary: int, name: str = "pending"
    ) -> torch.Tensor | None:
        """`name` (p, or its gradient) of a request at layer boundary `boundary`: required exactly where that
        boundary lies inside a ladder region of our checkpoint, of the shape of `hidden`, finite."""
        if not self.backend.span.config.carries_pending(boundary):
            if pending is not None:
                raise RequestError(
                    "bad_request",
                    f"layer boundary {boundary} carries r alone in this checkpoint (it is not inside a ladder "
                    f"region): {name} must be absent",
                )
            return None
        if pending is None:
            raise RequestError(
                "bad_request",
                f"layer boundary {boundary} lies inside a ladder region of this checkpoint (ladder layers "
                f"{boundary - 1} and {boundary}): the state there is the pair (r, p), and {name} is missing",
            )
        shape = dict(enumerate(hidden.shape))
        return check_tensor(pending, name, ndim=3, dtypes=FLOAT_DTYPES, shape=shape, finite=True)

    def _prompts(
        self, prompts: torch.Tensor | None, blocks: int, batch: int, length: int
    ) -> torch.Tensor | None:
        """Deep prompts [blocks, batch or 1, P <= length, hidden], finite."""
        if prompts is None:
            return None
        self._check_tunable("deep prompts")
        shape = {0: blocks, 3: self.backend.hidden_size}
        check_tensor(prompts, "prompts", ndim=4, dtypes=FLOAT_DTYPES, shape=shape, finite=True)
        if prompts.shape[1] not in (1, batch) or prompts.shape[2] > length:
            raise RequestError(
                "bad_request",
                f"prompts of shape {tuple(prompts.shape)} do not fit {batch} sequences of {length} positions",
            )
        if prompts.shape[1] * prompts.shape[2] > self.limits.max_prompt_tokens:
            raise self._refusal(
                "too_large", f"prompts exceed {self.limits.max_prompt_tokens} tokens per block"
            )
        return prompts

    def _adapter(self, peer: str, ref: AdapterRef | None, start: int, end: int) -> Adapter | None:
        if ref is None:
            return None
        self._check_tunable("adapters")
        return self.adapters.find(peer, ref, start, end)

    def _check_tunable(self, what: str) -> None:
        if not self.backend.tunable:
            raise RequestError(
                "bad_request",
                f"{what}: not supported by this server (it runs its blocks tensor-parallel, --tp, which has no "
                "deep prompts, adapters or backward yet)",
            )

    @staticmethod
    def _mask(mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
        if mask is None:
            return None
        return check_tensor(mask, "key_mask", ndim=2, dtypes=(torch.bool,), shape={0: batch, 1: length})
