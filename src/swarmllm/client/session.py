"""An inference session: KV caches kept on a chain of servers, stepped one chunk of tokens at a time, surviving
servers that crash, hang or leave.

The chain is chosen on the first step (when the batch size is known); each hop is a `HopSession` with one stream
over the persistent connection to its server, and a step involves no DHT look-up. With push (the default), the
client sends a step to the first server only, and each server hands its output straight to the next one (the
client names the chain and each server's session secret); every server still replies to the client, which keeps
each hop's input and sends it on itself whenever a server reports that its push failed.

Failover: when a hop fails (broken connection, error, no reply by its deadline, the server leaving), the client
bans that server (unless it handed the session back in order: it leaves or moved, and announced so), looks the
swarm up again, routes a replacement for exactly the hop's blocks (one server or several), replays the hop's
kept inputs to rebuild their caches, re-points the next hop's push permission to the new server and carries on
with the same step. Nothing else of the session changes, so the tokens are those of a fault-free run.

Ladder Residual: where a hop boundary lies inside a ladder region of the model (`SwarmClient.carries_pending`), the
state crossing it is the pair (r, p): the hop before returns p beside r (checked), the hop after gets both (sent,
pushed, kept and replayed together), and spot checks compare both. The chain's own ends always carry r alone.

Beam search: a one-token step may first reorder the rows (`Step.reorder`: row i continues the held row
reorder[i]). Every hop takes it once: the servers move their cache rows, a hop notes the move in its kept inputs
(`History.reorder`, applied when they are read), and a hop rebuilt from inputs that had taken the step's move
(after a spot check) is sent the step without it. A step that fails half-way leaves the session at position 0.

Spot checks: a random fraction of each hop's steps is computed again by other servers from the hop's kept
inputs (one plain `forward` over all of them, compared on this step's positions: no session, no cache held on
the checker, and rewinds need nothing special), while the next hops go on; the step returns only when its checks
agree. A server found wrong is banned, and since its earlier outputs (unchecked) fed every later hop, the chain is
rebuilt from it to the end: its kept inputs are replayed through new servers, and the step goes on from there.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from swarmllm.client.affinity import Span, entry_keys
from swarmllm.client.hop import History, HopSession, KeptInput
from swarmllm.client.replies import CorruptOutputError, push_failure
from swarmllm.client.room import next_age
from swarmllm.client.routing import Demand, Hop
from swarmllm.client.swarm import (
    HOP_FAILURES,
    MAX_ROUTE_RETRY_S,
    LoadShed,
    SpotCheck,
    State,
    SwarmClient,
    check_input,
    corrupt_output_error,
    describe,
    wants_room,
)
from swarmllm.client.tuning import NO_TUNING, Tuning
from swarmllm.client.verify import COMPRESSION_TOLERANCE, should_check
from swarmllm.wire import Message, RemoteError, WireError
from swarmllm.wire.compression import check_codec
from swarmllm.wire.messages import PushTarget, Step

logger = logging.getLogger(__name__)

# the decode steps a session's prefill is weighed against in routing (`routing.Demand`): its room says little of
# its answer (an API request's max_tokens is often the whole context), so no more than a long chat answer's
ANSWER_STEPS = 256

# a step of this many tokens is pushed on even into sessions that have not answered yet (a prompt's prefill: the
# first step), so that servers that prefill in chunks pipeline it along the chain; a push that outruns the
# opening waits for it on the next server (`server.handler.EARLY_PUSH_WAIT_S`)
PUSH_UNANSWERED_TOKENS = 256


class RoomGivenUp(Exception):
    """Why a hop was closed: its session waited for room elsewhere (`client.room`)."""


class ReplayBudgetError(RuntimeError):
    """The inputs a session keeps for failover would exceed the client's `max_replay_bytes`."""


@dataclass(frozen=True)
class HopTiming:
    """One hop of a step as the client saw it: the time from the previous hop's reply (or the step's start) to
    this hop's reply, the server's compute within it, and the positions it copied from its prefix cache."""

    elapsed_s: float
    compute_s: float
    copied: int = 0


@dataclass(frozen=True)
class Failover:
    """One replaced hop: who failed and why, who took over, and what it cost."""

    peer_id: str
    start: int
    end: int
    reason: str
    replacement: tuple[Hop, ...]
    route_s: float  # finding the replacement (including waiting for blocks to get a server again)
    replay_s: float  # opening the new sessions and replaying the kept inputs
    replayed_tokens: int


class InferenceSession:
    def __init__(
        self,
        swarm: SwarmClient,
        max_length: int,
        tuning: Tuning = NO_TUNING,
        compression: str | None = None,
        blocks: tuple[int, int] | None = None,
    ):
        if max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        self.swarm = swarm
        self.start, self.end = swarm.block_range(blocks)  # its steps go through these blocks, all by default
        # how this session's hidden states travel (wire.compression); default: the client's
        self.compression = check_codec(compression or swarm.compression)
        self.tuning = tuning.for_inference()  # an adapter for every hop, deep prompts for positions 0..N-1
        self.max_length = max_length
        self.position = 0
        self.batch_size: int | None = None
        self.hidden_size = swarm.hidden_size  # the model's, or else that of the first step taken
        self._hops: list[HopSession] = []
        self._joining: list[HopSession] = []  # hops a failover opens and replays to: `close` closes them too
        self._routed: list[Hop] = []  # the chain being opened: it loads its servers already (`loads`)
        self._steps = 0
        self.reorders = 0  # steps that reordered the rows (beam search)
        self.pushed_hops = 0  # hop inputs that a server pushed to the next one (the client did not send them)
        self.last_timings: list[HopTiming] = []
        # positions of its steps that every hop's server copied from its prefix cache (`server.prefix`), by the
        # servers' word (what the API reports as cached prompt tokens)
        self.copied = 0
        self._keys: list[bytes] = []  # its first step's blocks' keys (`client.affinity`): [] for none
        self.failovers: list[Failover] = []
        # servers that refused to open this session for what it asks (batch size, length, cache): routed around,
        # unbanned
        self._refused: dict[str, RemoteError] = {}
        # servers that dropped this session's adapter (unused, or giving way to newer ones): it went again once
        self._uploaded_again: set[str] = set()
        # servers past this client's request rate, waited for (`_waits_out`): for up to request_timeout_s a step
        self._shed = self._new_shed()
        self._room_since: float | None = None  # when a server first refused this step room (`_wants_room`)
        self.age = next_age()  # which of this client's sessions waiting for room gives way (`client.room`)
        self.closed = False
        # kept open between uses (`DistributedModel.open_session`, outside `use_session`): it steps no more until
        # used again, so it gives way to a session of its client waiting for room (`client.room`)
        self.parked = False
        self._stepping = False
        self._stepped_at = time.monotonic()  # when its last step ended (or it was made)
        swarm.rooms.track(self)

    @property
    def hops(self) -> list[Hop]:
        return [h.hop for h in self._hops]

    @property
    def idle(self) -> bool:
        """Open, between steps, and parked or unused for `room_hold_s` (a conversation waiting for its user inside
        a `with` block): it gives up what a waiting session of its client waits for (`client.room`)."""
        if self.closed or self._stepping:
            return False
        return self.parked or time.monotonic() - self._stepped_at >= self.swarm.room_hold_s

    async def step(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        *,
        position: int | None = None,
        reorder: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Hidden states of tokens [position, position + T) through its blocks; position defaults to the end
        of what the session holds, and an earlier position rewinds (later tokens are forgotten). `reorder`
        (beam search, a one-token step): first, row i of what the session holds becomes what row reorder[i]
        held, on every server and in the inputs kept for failover (a step that fails then leaves the session at
        position 0, since its servers' rows may disagree). A step that fails otherwise leaves the session at
        `position`, all that every server still holds."""
        self._stepping = True
        try:
            return await self._step(hidden, key_mask, position, reorder)
        finally:
            self._stepping = False
            self._stepped_at = time.monotonic()

    async def _step(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None,
        position: int | None,
        reorder: Sequence[int] | None,
    ) -> torch.Tensor:
        if self.closed:
            raise RuntimeError("the inference session is closed")
        self.swarm.check_running()
        check_input(hidden, key_mask, self.hidden_size)
        position = self.position if position is None else position
        if not 0 <= position <= self.position:
            raise ValueError(f"position {position} is outside [0, {self.position}]")
        rows = None
        if reorder is not None:
            reorder = tuple(int(r) for r in reorder)
            rows = torch.tensor(reorder, dtype=torch.long)
            batch = self.batch_size if self._hops else None
            if hidden.shape[1] != 1 or rows.shape != (hidden.shape[0],) or batch != hidden.shape[0]:
                raise ValueError("reorder comes with a one-token step of an open session, a row number a row")
            if not bool(((rows >= 0) & (rows < batch)).all()):
                raise ValueError(f"reorder's row numbers must lie in [0, {batch})")
        end = position + hidden.shape[1]
        if end > self.max_length:
            raise ValueError(f"the session's max_length {self.max_length} is too small for {end} tokens")
        self._shed, self._room_since = self._new_shed(), None
        if not self._hops:  # the first step, or the first one after an opening that failed
            self.batch_size = hidden.shape[0]
            await self._open(hidden, key_mask)
        elif hidden.shape[0] != self.batch_size:
            raise ValueError(
                f"the session was opened for batch size {self.batch_size}, got {hidden.shape[0]}"
            )
        states = len(self._hops)
        if self.swarm.ladder_layers:  # a hop whose input is a ladder pair keeps two states
            states += sum(self.swarm.carries_pending(h.start) for h in self._hops)
        kept = states * hidden.shape[0] * end * hidden.shape[2] * hidden.element_size()
        if kept > self.swarm.max_replay_bytes:
            raise ReplayBudgetError(
                f"this session would keep {kept / 2**20:.0f} MiB of inputs for failover ({states} hop inputs "
                f"x batch {hidden.shape[0]} x {end} tokens x hidden {hidden.shape[2]}), over the client's "
                f"max_replay_bytes of {self.swarm.max_replay_bytes / 2**20:.0f} MiB; raise it or use shorter sessions"
            )
        self._steps += 1
        self.reorders += rows is not None
        timings, pushed, began, i = [], False, time.perf_counter(), 0
        # p beside `hidden` where the hop's first boundary carries the pair
        pending: torch.Tensor | None = None
        inputs: list[State] = []  # each hop's input of this step
        checks: list[tuple[HopSession, asyncio.Future[SpotCheck]]] = []
        try:
            # hops whose replacement failed at a step before get it first
            for hop in [h for h in self._hops if h.failure is not None]:
                await self._replace(self._hops.index(hop), hop.failure, again=True)
            while True:
                while i < len(self._hops):
                    hop = self._hops[i]
                    if hop.failure is not None:  # given up while this step waited for room (`give_up`)
                        await self._replace(i, hop.failure, again=True)
                        pushed = False
                        continue
                    del inputs[i:]
                    inputs.append((hidden, pending))
                    # a server pushes only into sessions that have answered once (or for a long step): a push
                    # that outruns the opening of the next session (another connection) would find no session
                    # and cost a fallback round trip; and not steps with deep prompts (each hop has its own)
                    prompts = hop.prompts(position, hidden.shape[1])
                    # (a hop rebuilt from kept inputs that had taken this step's reorder must not take it again)
                    taken = rows is None or hop.history.reordered_at == self._steps
                    tokens = hidden.shape[0] * hidden.shape[1]
                    long = tokens >= PUSH_UNANSWERED_TOKENS
                    pushing = (
                        self.swarm.push
                        and i + 1 < len(self._hops)
                        and (long or self._hops[i + 1].answered)
                        and self.tuning.hop_prompts(self.start, self.end, position, hidden.shape[1]) is None
                    )
                    deadline = self.swarm.deadline_s(hop.hop, tokens, decode=hidden.shape[1] == 1)
                    later = self._hops[i + 1 :]
                    chain = (
                        [
                            PushTarget(h.peer_id, h.session_id)
                            for h in (later if long else itertools.takewhile(lambda h: h.answered, later))
                        ]
                        if pushing
                        else []
                    )
                    step = Step(
                        position,
                        hidden,
                        key_mask,
                        self._steps,
                        chain,
                        self.swarm.push_timeout_s,
                        prompts=prompts,
                        pending=pending,
                        reorder=None if taken else reorder,
                    )
                    # the previous server pushed this input and replied at once; should its push fail, it says
                    # so on its stream within push_timeout_s, and then the client sends the input itself
                    fallback = previous = None
                    if pushed:
                        fallback, previous = _Fallback(self, hop, step, deadline), self._hops[i - 1]
                        previous.watch(fallback.see)
                    try:
                        if not pushed:
                            await hop.send(step, deadline)
                        timeout = deadline + (fallback is not None) * self.swarm.push_timeout_s
                        first = not hop.answered
                        reply = await hop.recv(self._steps, hidden, timeout, position)
                        # its server took the session (an opening is known taken by its first answer)
                        if first:
                            self._shed.done(hop.hop)
                    except HOP_FAILURES as e:
                        # (a hop given up meanwhile, `give_up`, is no fault of its server)
                        await self._replace(i, hop.failure or e, again=hop.failure is not None)
                        pushed = False
                        continue
                    finally:
                        if fallback is not None:
                            previous.watch(None)
                            fallback.cancel()
                    if step.reorder is not None:
                        hop.history.reorder(rows, self._steps)
                    hop.history.add(KeptInput(position, hidden, key_mask, pending))
                    if check := self._maybe_check(hop, reply.hidden, reply.pending):
                        checks.append((hop, check))
                    hidden, pending, pushed = reply.hidden, reply.pending, reply.pushed
                    self.pushed_hops += pushed
                    now = time.perf_counter()
                    timings.append(HopTiming(now - began, reply.compute_s, reply.copied))
                    if reply.hidden.shape[1] == 1:
                        self.swarm.observe_step(hop.hop, now - began, reply.compute_s)
                    began, i = now, i + 1
                wrong = await self._first_wrong(checks)
                if wrong is None:
                    break
                i, error = wrong
                hop = self._hops[i]
                hop.history.truncate(position)  # this step is sent again, to the new servers
                await self._replace(i, error, to_end=True)
                (hidden, pending), pushed = inputs[i], False
                del timings[i:]
        except BaseException:
            # the hops before the failed one took the step and the others did not: all of them hold what came
            # before it (a rewind's tail is gone on some), and after a reorder their rows may disagree: start again
            self.position = 0 if rows is not None else min(self.position, position)
            raise
        finally:
            for _, check in checks:
                check.cancel()
        self.last_timings = timings
        self.copied += min(t.copied for t in timings)
        self.position = end
        self.hidden_size = hidden.shape[2]
        return hidden

    def _maybe_check(
        self, hop: HopSession, output: torch.Tensor, output_pending: torch.Tensor | None
    ) -> asyncio.Future[SpotCheck] | None:
        """Start a spot check of this step of `hop` (whose kept inputs end with this step's) with probability
        `spot_check_fraction`: one forward over all of the hop's inputs on other servers."""
        swarm = self.swarm
        if not should_check(swarm.spot_rng, swarm.spot_check_fraction):
            return None
        hidden, key_mask, pending = _concat(hop.history)
        # the output came in this session's codec, the checkers' forwards travel in the client's: the coarser
        # one's error widens the tolerance
        codec = max(
            self.compression, swarm.compression, key=lambda c: COMPRESSION_TOLERANCE.get(c, float("inf"))
        )
        return asyncio.ensure_future(
            swarm.spot_check(hop.hop, hidden, key_mask, output, self.tuning, codec, pending, output_pending)
        )

    async def _first_wrong(
        self, checks: list[tuple[HopSession, asyncio.Future[SpotCheck]]]
    ) -> tuple[int, CorruptOutputError] | None:
        """Wait for this step's checks; the first hop of the chain found wrong (banned by then), or None. Checks
        done are removed from `checks`."""
        first: tuple[int, CorruptOutputError] | None = None
        while checks:
            hop, check = checks.pop(0)
            record = await check
            if hop.peer_id in record.wrong and hop in self._hops:  # (a hop replaced meanwhile is gone anyway)
                i = self._hops.index(hop)
                if first is None or i < first[0]:
                    first = i, corrupt_output_error(record)
        return first

    async def _open(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> None:
        """Route and open the hops for the first step, `hidden`: to servers likely holding its beginning where
        that pays (`client.affinity`, `client.routing`), and remember where it went."""
        self._keys = keys = self._beginning(hidden, key_mask)
        steps = min(self.max_length - hidden.shape[1], ANSWER_STEPS)
        demand = Demand(hidden.shape[1], steps, self.swarm.affinity.held(keys))
        self._hops, _, _ = await self._chain(self.start, self.end, None, [], demand=demand)
        self.swarm.affinity.note(self._spans(), keys)
        logger.debug("session over %s", ", ".join(map(str, self._hops)))

    def _beginning(self, hidden: torch.Tensor, key_mask: torch.Tensor | None) -> list[bytes]:
        """The keys of the whole blocks of inputs from position 0 (`affinity.entry_keys`), where servers keep
        them in their prefix caches (no deep prompts, nor a ladder pair as the first hop's input) and a route has
        a choice to make by them (replicas of its blocks known: a single chain hashes nothing)."""
        if self.tuning.prompts is not None or self.swarm.carries_pending(self.start):
            return []
        if not self.swarm.has_replicas(self.start, self.end):
            return []
        return entry_keys(hidden, key_mask)

    def _spans(self) -> list[Span]:
        return [(h.peer_id, h.start, h.end) for h in self._hops]

    async def _chain(
        self,
        start: int,
        end: int,
        accept_from: str | None,
        inputs: list[KeptInput],
        failure: BaseException | None = None,
        reordered_at: int = -1,
        demand: Demand | None = None,
    ) -> tuple[list[HopSession], float, float]:
        """New hop sessions covering blocks [start, end), brought to the state that `inputs` (kept inputs of
        block `start`, their rows as the step `reordered_at` reordered them last) produce; a server that fails
        meanwhile is banned and routed around. Returns the hops and the seconds spent routing and opening +
        replaying. A server past this client's request rate is routed around too, or, where no other holds its
        blocks, asked again once its refusal's `retry_after_s` passed (for up to the client's `request_timeout_s`).
        A server that refuses room that ending sessions free (its peer's share, a full cache) is asked again once
        it says room came free (`LoadShed`), for up to the client's `room_wait_s`, where no other server holds its
        blocks (`_wants_room`)."""
        route_s = replay_s = 0.0
        shed = self._shed
        try:
            while True:
                began = time.perf_counter()
                hops = await self.swarm.route_inference(
                    start=start,
                    end=end,
                    min_cache_tokens=self.batch_size * self.max_length,
                    failure=failure,
                    refused=self._refused,
                    shed=shed,
                    tuned=self.tuning.needs_tunable,
                    demand=demand,
                )
                await self._take_places(hops, shed)
                routed = time.perf_counter()
                route_s += routed - began
                new: list[HopSession] = []
                self._joining, self._routed = new, hops
                try:
                    x = inputs
                    for hop in hops:
                        previous = new[-1].peer_id if new else accept_from
                        new.append(
                            HopSession(
                                hop,
                                self.batch_size,
                                self.max_length,
                                previous if self.swarm.push else None,
                                self.tuning,
                                self.compression,
                                self.swarm.carries_pending(hop.end),
                                functools.partial(self.swarm.places.give, hop.peer_id),
                            )
                        )
                        if self.tuning.weights is not None:
                            await self.swarm.uploads.ensure(hop.peer_id, self.tuning.weights)
                        await shed.wait([hop])
                        await new[-1].open(
                            await self.swarm.connection(hop.peer_id),
                            self.swarm.connect_timeout_s,
                            replay=bool(x),
                        )
                        if x:
                            tokens = sum(e.hidden.shape[0] * e.hidden.shape[1] for e in x)
                            floor_s = self.swarm.replay_timeout_s
                            x = await new[-1].replay(
                                x,
                                self.swarm.deadline_s(hop, tokens, decode=False, floor_s=floor_s),
                                reordered_at,
                            )
                            # (only an answer says the server took the session: an opening is sent
                            # optimistically, and its refusal comes as the first reply)
                            shed.done(hop)
                    if self.closed:  # meanwhile, by another thread: nobody would close these
                        await self._close_hops(new)
                        raise RuntimeError("the inference session was closed during this step")
                    return new, route_s, replay_s + time.perf_counter() - routed
                except HOP_FAILURES as e:
                    replay_s += time.perf_counter() - routed
                    if self.closed:  # by another thread, which closed these hops: no fault of their servers
                        await self._close_hops(new)
                        raise RuntimeError("the inference session was closed during this step") from e
                    logger.info(
                        "%s failed while joining the session (%s); trying another", str(new[-1]), describe(e)
                    )
                    await self._close_hops(new)
                    if self._adapter_dropped(new[-1].peer_id, e):
                        continue
                    if _waits_out(e) and shed.defer(new[-1].peer_id, e):
                        continue  # a refusal that clears by itself (a request rate): asked again once it has
                    self._learn_limit(new[-1].peer_id, e)
                    if shed.defer_for_room(new[-1].peer_id, e):
                        # it waits for room (as sessions end) rather than fail, or lose the session's tokens
                        await self._wants_room(new[-1].peer_id)
                        continue
                    if _refused_opening(e):
                        self._refused[new[-1].peer_id] = e
                    else:
                        self.swarm.ban(new[-1].peer_id, e)
                    failure = e
                except BaseException:  # cancelled (a caller's timeout): nobody else would close these
                    await self._close_hops(new)
                    raise
                finally:
                    self._joining, self._routed = [], []
                    for hop in hops[len(new) :]:  # (places taken for hops never made)
                        self.swarm.places.give(hop.peer_id)
        finally:
            self.swarm.rooms.done(self)  # (it waited for room, or not at all)

    def _learn_limit(self, peer_id: str, error: BaseException, own: int = 0) -> None:
        """Where a server refused this session for its per-peer limits (`quota` without a wait: its sessions or
        cache share), this client's sessions there wait their turn in the client for a while
        (`SessionPlaces.refused`; `own`: places there of the refused hop, not yet closed)."""
        if wants_room(error) and error.code == "quota":
            self.swarm.places.refused(peer_id, own)

    async def _take_places(self, hops: Sequence[Hop], shed: LoadShed) -> None:
        """Take this client's place for a session on each server of `hops` (`client.room.SessionPlaces`): where
        it already holds as many sessions as the server lets one peer hold, this one waits for one of them to
        close, as for room (`_wants_room`: younger waiting and idle sessions of this client give up theirs there),
        for up to the room wait; then the servers decide."""
        places, peers = self.swarm.places, [h.peer_id for h in hops]
        limits = self.swarm.session_limits(peers)
        while (left_s := shed.room_until - time.monotonic()) > 0:
            if full := places.full(peers, limits):
                await self._wants_room(full[0])
            if await places.take(self.age, peers, limits, min(left_s, MAX_ROUTE_RETRY_S)):
                return
        places.take_now(peers)

    async def _replace(
        self, i: int, error: BaseException, *, to_end: bool = False, again: bool = False
    ) -> None:
        """Replace hop i, which failed with `error`, by servers that hold its blocks, brought to its state;
        `to_end`: every hop after it too (its outputs were wrong, so theirs may be). `again`: a replacement of
        it failed before (its server was dealt with then). If this one fails, hop i stays, closed, covering
        every replaced hop's blocks with its own kept inputs, for the next step to replace."""
        failed = self._hops[i]
        if self.closed:  # by another thread while this step ran: its hops were closed, not failed
            raise RuntimeError("the inference session was closed during this step") from error
        self.swarm.check_running()  # (the shutdown closed the connections: no fault of their servers)
        if wants_room(error):  # (a refusal to open it: no failure, and a waiting session meets it every ~2 s)
            logger.debug("%s refused room (%s)", str(failed), describe(error))
        else:
            logger.info("%s failed (%s); replacing it", str(failed), describe(error))
        # its opening was refused for now only (a request rate): it is opened again, after the wait, which is no
        # failover of a working hop
        deferred = False
        # a server that had no room for this session before may have some now (a replacement waits for it)
        self._refused = {peer: e for peer, e in self._refused.items() if not wants_room(e)}
        if not again:
            # one that moved or leaves in order is healthy and not banned, unless it hands sessions back again
            # and again (a server could otherwise keep every client re-routing forever)
            leaving = isinstance(error, RemoteError) and error.code == "server_leaving"
            if leaving and self.swarm.handed_back_again(failed.peer_id):
                leaving = False
            self._learn_limit(failed.peer_id, error, own=1)
            if _waits_out(error) and self._shed.defer(failed.peer_id, error):
                deferred = True
            elif self._adapter_dropped(failed.peer_id, error):
                deferred = True
            elif self._shed.defer_for_room(failed.peer_id, error):
                # refused room at its opening (a new session's refusal is its first reply): it waits for the room
                # as a replacement does, rather than fail
                deferred = True
                await self._wants_room(failed.peer_id)
            elif _refused_opening(error):  # what the session asks, not the server, is at fault: not banned
                self._refused[failed.peer_id] = error
            elif not leaving and not isinstance(error, CorruptOutputError):  # a spot check banned it already
                self.swarm.ban(failed.peer_id, error)
        replaced = self._hops[i:] if to_end else [failed]
        await self._close_hops(replaced)
        accept_from = self._hops[i - 1].peer_id if i > 0 else None
        end = self.end if to_end else failed.end
        try:
            held = failed.history.length
            new, route_s, replay_s = await self._chain(
                failed.start,
                end,
                accept_from,
                failed.history.steps,
                None if deferred else error,
                failed.history.reordered_at,
                # a replay is a prefill, of which servers may hold the beginning (as this client noted at opening)
                Demand(held, min(self.max_length - held, ANSWER_STEPS), self.swarm.affinity.held(self._keys)),
            )
        except BaseException as e:  # (cancelled too: the next step must not take the closing for a fault)
            # the step fails, and the next one replaces hop i first (`failure`): it stays, closed, for the blocks
            # of every replaced hop, since after a wrong hop only its own kept inputs are right (the later
            # hops' are its outputs), and the client's closing of its stream is no new fault of its server
            failed.hop = Hop(failed.peer_id, failed.start, end)
            failed.returns_pending = self.swarm.carries_pending(end)
            failed.failure = error
            self._hops[i : i + len(replaced)] = [failed]
            e.add_note(f"while replacing {failed}, which failed with {describe(error)}")
            raise
        self._hops[i : i + len(replaced)] = new
        after = i + len(new)
        if self.swarm.push and after < len(self._hops):
            try:
                await self._hops[after].repoint(new[-1].peer_id, self.swarm.connect_timeout_s)
            except HOP_FAILURES as e:
                logger.info(
                    "re-pointing %s failed (%s); it is replaced when used",
                    str(self._hops[after]),
                    describe(e),
                )
        if deferred:
            return
        record = Failover(
            failed.peer_id,
            failed.start,
            end,
            describe(error),
            tuple(h.hop for h in new),
            route_s,
            replay_s,
            failed.history.length,
        )
        self.failovers.append(record)
        self.swarm.failovers.append(record)
        logger.warning(
            "blocks [%d, %d) moved from %s (%s) to %s: %.2f s routing, %.2f s replaying %d tokens",
            failed.start,
            end,
            failed.peer_id,
            record.reason,
            [h.peer_id for h in new],
            route_s,
            replay_s,
            record.replayed_tokens,
        )

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._remember()
        await self._close_hops([*self._hops, *self._joining])  # a step waiting on any of them ends at once

    def _remember(self) -> None:
        """Note all that a one-row session's servers kept of it (its answer too: a conversation's next turn
        sends it back) as held where it went (`client.affinity`)."""
        if self.batch_size != 1 or not self._hops or not self._hops[0].history.length:
            return
        if not self.swarm.has_replicas(self.start, self.end):  # (before the copy `_concat` makes)
            return
        hidden, key_mask, _ = _concat(self._hops[0].history)
        if keys := self._beginning(hidden, key_mask):
            self.swarm.affinity.note(self._spans(), keys)

    def _new_shed(self) -> LoadShed:
        """A step's record of the servers that refused it for load (`LoadShed`), which asks one that refused room
        for this session's size when it has room again."""

        async def ask_room(hop: Hop, wait_s: float) -> bool:
            return await self.swarm.ask_room(hop, self.batch_size, self.max_length, wait_s)

        return LoadShed(self.swarm.request_timeout_s, self.swarm.rooms, ask_room, self.swarm.room_wait_s)

    def _adapter_dropped(self, peer_id: str, error: BaseException) -> bool:
        """Whether `peer_id` refused the session because it no longer holds the adapter this client uploaded (it
        went unused for a while, or gave way to the client's newer ones): the hop opens there again, once, after
        a new upload. It was taken for a failure: the server banned, or waited on as for room."""
        dropped = isinstance(error, RemoteError) and error.code == "unknown_adapter"
        if not dropped or self.tuning.weights is None or peer_id in self._uploaded_again:
            return False
        self._uploaded_again.add(peer_id)
        self.swarm.uploads.forget(peer_id)
        return True

    async def _wants_room(self, peer_id: str) -> None:
        """This session waits for room on `peer_id` (since a server first refused it room this step): this
        client's younger waiting sessions give up what it waits for, and its owner of idle sessions is told
        (`room_wanted`); past `room_hold_s` this session lets its own other servers go (`client.room`)."""
        await self.swarm.rooms.wants(self, peer_id)
        now = time.monotonic()
        since = self._room_since = now if self._room_since is None else self._room_since
        if now - since >= self.swarm.room_hold_s and (held := self.holding()):
            logger.info(
                "waited %.0f s for room on %s: letting this session's other servers go (%s)",
                now - since,
                peer_id,
                ", ".join(sorted(held)),
            )
            for peer in sorted(held):
                await self.give_up(peer, "after a long wait for room elsewhere")
        if self.swarm.room_wanted is not None:
            self.swarm.room_wanted()

    async def _close_hops(self, hops: Sequence[HopSession]) -> None:
        """Close these hops; this client's sessions waiting for room on their servers ask again."""
        for hop in hops:
            if await hop.close():
                self.swarm.rooms.closed(hop.peer_id)

    def holding(self) -> set[str]:
        """The servers of this session's open hops (`client.room`)."""
        return {hop.peer_id for hop in self._hops if hop.is_open}

    def loads(self) -> set[str]:
        """The servers its steps load: its open hops', and those of a chain it opens, counted from the moment it is
        routed (sessions routed at once must not all see the same idle server: `RoomBoard.rows`)."""
        return self.holding() | {hop.peer_id for hop in self._routed}

    async def give_up(
        self, peer_id: str, why: str = "for a session of this client waiting for room there"
    ) -> None:
        """Close this session's hops on `peer_id`, while it is idle or waits for room elsewhere (`client.room`):
        its next step, or this one when it reaches them, rebuilds them from their kept inputs, as after a
        failure (the server is not at fault)."""
        given = [hop for hop in self._hops if hop.peer_id == peer_id and hop.is_open]
        for hop in given:  # (all marked before any await: a step that starts meanwhile replaces them first)
            logger.info("%s given up %s", str(hop), why)
            hop.failure = RoomGivenUp(f"given up {why}")
            hop.answered = False
        await self._close_hops(given)


class _Fallback:
    """Sends a pushed step's input to its hop itself if the previous hop reports that its push failed, or its
    stream ends (or carries anything but a push notice) first: a watcher of the previous hop's stream
    (`HopSession.watch`), so a step spends no task per hop on a failure that rarely comes."""

    def __init__(self, session: InferenceSession, hop: HopSession, step: Step, deadline: float):
        self.session, self.hop, self.step, self.deadline = session, hop, step, deadline
        self.task: asyncio.Future | None = None

    def see(self, item: Message | WireError) -> None:
        if self.task is not None:
            return
        if isinstance(item, Message) and push_failure(item) not in (None, self.step.step):
            return  # a notice about an earlier step, whose next hop replied after all
        self.session.pushed_hops -= 1
        self.task = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        try:
            await self.hop.send(self.step, self.deadline)
        except HOP_FAILURES:
            pass  # this hop's stream is broken: its recv fails too, and the hop is replaced

    def cancel(self) -> None:
        if self.task is not None:
            self.task.cancel()


# a server's refusals to open a session for what it asks: a batch size or length beyond its limits, more cache
# than its peer's share or than is free. A healthy server's answer about this session, so no ban: a ban would keep
# the client's every other session (a later one that fits) off that server too
_OPENING_REFUSALS = ("bad_request", "quota", "cache_full")


def _waits_out(error: BaseException) -> bool:
    """Whether a server refused to open the session for now only (past this client's request rate): its refusal
    says when asking again will do (`retry_after_s`), where a full share of sessions or cache clears only when
    this client closes some."""
    return isinstance(error, RemoteError) and error.retry_after_s is not None


def _refused_opening(error: BaseException) -> bool:
    """Whether a server refused to open the session for what it asks (its size, see `_OPENING_REFUSALS`): that
    ends the stream with an error, where a refused step is answered in-band (SessionError)."""
    return isinstance(error, RemoteError) and error.code in _OPENING_REFUSALS


def _concat(history: History) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A hop's kept inputs as one input from position 0: hidden states, key mask (if any step had one), and p (if
    the hop's input is a ladder pair: then every step's is)."""
    entries = history.entries
    dtypes = {e.hidden.dtype for e in entries}
    dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
    hidden = torch.cat([e.hidden.to(dtype) for e in entries], dim=1)
    pending = None
    if entries[0].pending is not None:
        pending = torch.cat([e.pending.to(dtype) for e in entries], dim=1)
    if all(e.key_mask is None for e in entries):
        return hidden, None, pending
    masks = [
        torch.ones(e.hidden.shape[:2], dtype=torch.bool) if e.key_mask is None else e.key_mask.bool()
        for e in entries
    ]
    return hidden, torch.cat(masks, dim=1), pending
