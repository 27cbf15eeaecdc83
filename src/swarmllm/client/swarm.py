"""A client's view of one model's swarm: who serves what, who failed us, how far they are, and a connection to each.

Look-ups hit the DHT only when the cached server list is older than `refresh_s` (never per step), or when routing
finds blocks without a usable server. Each server gets one persistent connection, direct TCP when it announces a
direct address that answers and proves the expected peer id, otherwise libp2p, which reaches peers behind NAT and
relays. Servers that fail a request are banned for a while (`health.Bans`) and routed around; when some blocks
have no usable server, routing waits for one up to `missing_blocks_timeout_s`. Routing uses each server's
announced speed capped by the speed this client measured (`health.Speeds`).

Fine-tuning (`train_forward` / `train_backward`, driven by `client.remote`'s autograd function): a batch is cut
into micro-batches of rows that go through the chain concurrently (server 2 works on one while server 1 computes
the next); each keeps every hop's input, and the backward walks the same hops in reverse, asking each server for
the gradients of its span. A failed hop is retried on another server of its blocks (in the backward, the new
servers' inputs are recomputed from the kept input first). Requests carry the client's `Tuning` (deep prompts, an
adapter, dropout seed); a client adapter is uploaded to each server once per version (`client.tuning`). With
`active_adapter` (a name servers host), routing uses only servers that announce it.

Model identity: a client routes only over servers that announce its config's `model_fingerprint`
(`ServerInfo.fingerprint`; `dht.info.same_checkpoint`), so servers of another model whose folder or repository has
the same last name (one DHT prefix) are set aside (`other_checkpoints`), never chained.

Ladder Residual: a client of a ladder checkpoint (`ladder_layers` from its config) routes only over servers that
announce the same ladder layers (`ServerInfo.ladder`), and a standard model's client only over servers that announce
none: two checkpoints under one model name are never chained. Where a hop boundary lies inside a ladder region
(`carries_pending`), the state handed on there is the pair (r, p): forwards send and check p beside r, training
passes their gradients, spot checks compare both.

Spot checks (`spot_check`): a random `spot_check_fraction` of hop computations (a session's steps, a batch
forward's hops) is computed again by other servers holding the same blocks, from the same inputs, and compared
(`client.verify`); on a disagreement a third opinion decides, the server(s) in the minority are banned for
`Bans.max_s` and reported (`reports`, and a warning in the log). Every check is recorded in `spot_checks`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import hivemind
import torch

from swarmllm.client.affinity import PrefixMemory
from swarmllm.client.directory import Directory
from swarmllm.client.health import Bans, Speeds, step_deadline_s
from swarmllm.client.replies import (
    BadReplyError,
    CorruptOutputError,
    SessionError,
    checked_forward,
    checked_gradients,
    step_reply,
)
from swarmllm.client.room import RoomBoard, SessionPlaces
from swarmllm.client.routing import (
    Demand,
    Hop,
    MissingBlocksError,
    cap_throughput,
    has_replicas,
    route_forward,
    route_inference,
)
from swarmllm.client.tuning import NO_TUNING, AdapterUploads, Tuning
from swarmllm.client.verify import Gradients, judge, mismatch, should_check, tolerance
from swarmllm.dht import ServerInfo, ServerState
from swarmllm.dht.info import same_checkpoint
from swarmllm.models.ladder import carries_pending, layer_ranges
from swarmllm.wire import (
    Connection,
    ConnectionLost,
    Identity,
    Message,
    RemoteError,
    RequestError,
    Stream,
    SwarmKey,
    WireError,
)
from swarmllm.wire.compression import check_codec
from swarmllm.wire.messages import (
    NAME_RULE,
    BackwardReply,
    BackwardRequest,
    ForwardRequest,
    OpenSession,
    RoomQuery,
    RoomReply,
    Step,
    valid_name,
)
from swarmllm.wire.validation import FLOAT_DTYPES, check_tensor

if TYPE_CHECKING:
    from swarmllm.client.session import Failover

logger = logging.getLogger(__name__)

# what a failed server can do to a request: break the connection, refuse, time out, answer garbage
HOP_FAILURES = (WireError, TimeoutError, OSError, BadReplyError, SessionError)
# a hop's input or output: hidden states r, and the pending output p where its boundary carries the ladder pair
State = tuple[torch.Tensor, torch.Tensor | None]
MAX_ROUTE_RETRY_S = 2.0  # the longest wait between two look-ups while blocks have no usable server
# how long a failover's route waits for its fresh look-up before it routes over the servers it knows: a DHT peer
# that hangs with its server costs a look-up hivemind's 3 s wait for it (the look-up goes on, and is kept)
FAILOVER_LOOKUP_S = 0.5
SPOT_CHECKS_KEPT = 10_000  # records of the latest spot checks a client keeps
FAILOVERS_KEPT = 10_000  # records of the latest hop replacements, and of the latest reports, a client keeps
# forwards of fewer tokens are not taken as measures of a server's forward speed (`_forward_hop`)
MEASURED_FORWARD_TOKENS = 64


@dataclass(frozen=True)
class SpotCheck:
    """One spot check: a server's output for blocks [start, end) (its last `tokens` positions) against other
    servers' recomputation of it. `outcome`: "agreed", "disagreed" (then `wrong` names the banned servers) or
    "skipped: why" (no other server holds the blocks, or a checker failed)."""

    peer_id: str
    start: int
    end: int
    tokens: int
    checkers: tuple[
        tuple[str, ...], ...
    ]  # each opinion after the checked server's: the servers that computed it
    mismatch: float  # the checked output's distance to the first checker's (see verify.mismatch)
    tolerance: float
    outcome: str
    wrong: tuple[str, ...] = ()
    kind: str = "forward"  # what was checked: a forward (a session's step, a forward's hop) or a "backward"


R = TypeVar("R")


def _covers(plan: Callable[[list[ServerInfo]], object], servers: list[ServerInfo]) -> bool:
    try:
        plan(servers)
    except MissingBlocksError:
        return False
    return True


class SessionRefused(ValueError):
    """Every server of some blocks refused to open an inference session for what it asks; `codes` are their
    refusals' (`bad_request`: its batch or length; `quota`, `cache_full`: cache room)."""

    def __init__(self, message: str, codes: frozenset[str]):
        super().__init__(message)
        self.codes = codes


# refusals that only ending sessions clear: a peer's open sessions or cache share (`quota` with no `retry_after_s`)
# and the server's whole cache (`cache_full`). A session refused them where no other server holds its blocks, new or
# replacing a hop, waits for the room (`SwarmClient.room_wait_s`, ROOM_WAIT_S by default), as Petals' servers wait
# for memory and vLLM queues a request; past the wait it is refused (SessionRefused)
ROOM_REFUSALS = frozenset({"quota", "cache_full"})
ROOM_WAIT_S = 60.0


def wants_room(error: BaseException) -> bool:
    return isinstance(error, RemoteError) and error.code in ROOM_REFUSALS and error.retry_after_s is None


# a server's refusals for its load: its queue (`busy`), or this client's share of its request rate or queue
# (`quota`). The server is healthy, so it is not banned: the request is routed around it, or waits for it (for as
# long as the refusal's `retry_after_s` says, past a request rate)
LOAD_REFUSALS = ("quota", "busy")


def sheds_load(error: BaseException) -> bool:
    return isinstance(error, RemoteError) and error.code in LOAD_REFUSALS


# asks a hop's server whether it has room for this session, waiting up to the seconds given (`SwarmClient.ask_room`)
AskRoom = Callable[[Hop, float], Awaitable[bool]]


class LoadShed:
    """The servers that refused one request's hops for their load (`LOAD_REFUSALS`): routing leaves them out
    while other servers hold the blocks; where none does, the request asks them again once the refusal's
    `retry_after_s` passed (past a request rate: when its next token comes), or else after a pause (50 ms,
    doubling up to MAX_ROUTE_RETRY_S), for up to `limit_s` before the refusal goes to the caller. A server that
    refused room is asked (`ask_room`) to answer as soon as room comes free there, rather than after the pause."""

    def __init__(
        self,
        limit_s: float,
        rooms: RoomBoard | None = None,
        ask_room: AskRoom | None = None,
        room_wait_s: float = ROOM_WAIT_S,
    ):
        self.refused: dict[str, float] = {}  # peer id -> when asking it again will do (time.monotonic)
        # of those, the ones that refused room (`defer_for_room`) -> the client's closings there by then (`rooms`)
        self.lacking_room: dict[str, int] = {}
        self.rooms = rooms
        self.ask_room = ask_room
        self.unasked: set[str] = set()  # servers that could not answer `ask_room` (older ones): pauses there
        self.told_room: set[str] = set()  # servers that said they had room, and refused it again since
        self.pause_s = 0.05
        self.give_up_at = time.monotonic() + limit_s
        self.room_until = time.monotonic() + min(limit_s, room_wait_s)

    def plan(self, route: Callable[[list[ServerInfo]], R]) -> Callable[[list[ServerInfo]], R]:
        def plan(servers: list[ServerInfo]) -> R:
            willing = [s for s in servers if s.peer_id not in self.refused]
            try:
                return route(willing)
            except MissingBlocksError:
                if len(willing) == len(servers):
                    raise
                return route(servers)  # only servers that shed load hold the blocks: ask one again

        return plan

    def note(self, failure: HopFailed) -> bool:
        """Whether `failure` is a refusal for load (noted: no ban); past `limit_s`, it is raised."""
        if not sheds_load(failure.cause):
            return False
        if not self.defer(failure.hop.peer_id, failure.cause):
            raise failure
        return True

    def defer(self, peer_id: str, error: BaseException) -> bool:
        """Whether `error`, from `peer_id`, is a refusal for load to wait out (noted); False past `limit_s`."""
        now = time.monotonic()
        if not sheds_load(error) or now >= self.give_up_at:
            return False
        pause_s = error.retry_after_s if error.retry_after_s is not None else self._pause()
        self.refused[peer_id] = now + pause_s
        return True

    def defer_for_room(self, peer_id: str, error: BaseException) -> bool:
        """Whether `error`, from `peer_id`, refused room that ending sessions free (`wants_room`), to ask for
        again after a pause (noted); False past the room wait. What a session does rather than fail: the room it
        lacks is often its own client's other sessions', which end, and else other clients', which end too."""
        now = time.monotonic()
        if not wants_room(error) or now >= self.room_until:
            return False
        self.refused[peer_id] = now + self._pause()
        self.lacking_room[peer_id] = self.rooms.closings(peer_id) if self.rooms is not None else 0
        return True

    def _pause(self) -> float:
        """The next pause before asking again (50 ms, doubling up to MAX_ROUTE_RETRY_S)."""
        pause_s, self.pause_s = self.pause_s, min(2 * self.pause_s, MAX_ROUTE_RETRY_S)
        return pause_s

    def done(self, hop: Hop) -> None:
        """`hop`'s server took a call: it is asked without a pause again."""
        self.refused.pop(hop.peer_id, None)
        self.lacking_room.pop(hop.peer_id, None)
        self.told_room.discard(hop.peer_id)

    async def wait(self, hops: Sequence[Hop]) -> None:
        """Wait (up to `limit_s` in all) until the servers of `hops` that refused for load may be asked again;
        for one server that lacked room, only until it says room came free, or this client closes a session
        there (`rooms`), if sooner."""
        until = min(max((self.refused.get(h.peer_id, 0.0) for h in hops), default=0.0), self.give_up_at)
        if (pause_s := until - time.monotonic()) <= 0:
            return
        if self.rooms is not None and len(hops) == 1 and hops[0].peer_id in self.lacking_room:
            if await self._room(hops[0], until):
                self.pause_s = 0.05  # (if the server has not freed it yet, the next try comes soon)
            return
        await asyncio.sleep(pause_s)

    async def _room(self, hop: Hop, until: float) -> bool:
        """Wait for room on `hop`'s server: its answer, which comes as soon as a session there ends (for up to
        MAX_ROUTE_RETRY_S), then at least until `until` (a server that answered at once) or this client's next
        closing there; whether room came. A server that said it had room and then refused it again (others took
        it first) is not taken at its word again until it opens: the pause runs too, so no answer makes a spin."""
        if self.ask_room is not None and hop.peer_id not in self.unasked:
            try:
                if await self.ask_room(hop, min(MAX_ROUTE_RETRY_S, self.give_up_at - time.monotonic())):
                    if hop.peer_id not in self.told_room:
                        self.told_room.add(hop.peer_id)
                        return True
            except (*HOP_FAILURES, RequestError) as e:  # (the opening that follows finds out a dead server)
                logger.debug("server %s cannot say when it has room (%s): pausing", hop.peer_id, describe(e))
                self.unasked.add(hop.peer_id)
        assert self.rooms is not None
        return await self.rooms.wait(hop.peer_id, self.lacking_room[hop.peer_id], until - time.monotonic())


class ShutDownError(RuntimeError):
    """The swarm client was shut down (`model.shutdown()`): it makes no connection and routes nothing any more."""


class HopFailed(Exception):
    """A request to one server of a route failed (wraps the cause, names the server and its blocks)."""

    def __init__(self, hop: Hop, cause: BaseException):
        self.hop, self.cause = hop, cause
        super().__init__(f"server {hop.peer_id} (blocks [{hop.start}, {hop.end})) failed: {describe(cause)}")


def corrupt_output_error(record: SpotCheck) -> CorruptOutputError:
    return CorruptOutputError(
        record.peer_id,
        f"its output for blocks [{record.start}, {record.end}) disagrees with other servers' "
        f"(spot check: mismatch {record.mismatch:.3g}, tolerance {record.tolerance:.3g}; judged wrong: "
        f"{', '.join(record.wrong)})",
    )


def describe(error: BaseException) -> str:
    """The error for logs and messages, one line: a server's error text is the peer's, and its newlines or terminal
    escapes would forge lines in our log (they are written escaped, as repr would)."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(error))
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def describe_ladder(ranges: Sequence[tuple[int, int]]) -> str:
    """A checkpoint's ladder layers as announced, for people: "ladder layers 1:5" or "standard"."""
    if not ranges:
        return "standard (no ladder layers)"
    return "ladder layers " + ", ".join(f"{start}:{end}" for start, end in ranges)


def joined(hidden: torch.Tensor, pending: torch.Tensor | None) -> torch.Tensor:
    """A state as one tensor to compare (spot checks): r, or r and p side by side where it is a ladder pair."""
    return hidden if pending is None else torch.cat([hidden, pending.to(hidden.dtype)], dim=-1)


def check_input(
    hidden: torch.Tensor, key_mask: torch.Tensor | None, hidden_size: int | None, name: str = "hidden states"
) -> None:
    """Refuse the caller's input with a ValueError where every server would refuse it: the checks the server's
    handler makes (`check_tensor`: a non-empty [batch, tokens, hidden] float tensor, finite; a bool key mask
    [batch, tokens]). A server's refusal counts as its failure, so sending it would ban healthy servers for the
    caller's error."""
    try:
        size = {} if hidden_size is None else {2: hidden_size}
        check_tensor(hidden, name, ndim=3, dtypes=FLOAT_DTYPES, shape=size, finite=True)
        if key_mask is not None:
            batch, tokens = hidden.shape[:2]
            check_tensor(key_mask, "key_mask", ndim=2, dtypes=(torch.bool,), shape={0: batch, 1: tokens})
    except RequestError as e:
        raise ValueError(e.message) from None


class SwarmClient:
    def __init__(
        self,
        initial_peers: Sequence[str],
        dht_prefix: str,
        num_blocks: int,
        *,
        identity: Identity | None = None,
        swarm_key: str | os.PathLike | SwarmKey | None = None,
        refresh_s: float = 30.0,
        connect_timeout_s: float = 5.0,
        request_timeout_s: float = 600.0,
        step_timeout_s: float = 5.0,
        replay_timeout_s: float = 30.0,
        push_timeout_s: float = 1.0,
        ban_s: float = 15.0,
        missing_blocks_timeout_s: float = 60.0,
        room_hold_s: float = 10.0,
        room_wait_s: float = ROOM_WAIT_S,
        max_replay_bytes: int = 1 << 30,
        prefer_direct: bool = True,
        push: bool = True,
        forward_chunk_tokens: int = 128,
        min_chunk_s: float = 0.02,
        spot_check_fraction: float = 0.05,
        spot_check_seed: int | None = None,
        active_adapter: str | None = None,
        max_micro_batches: int = 4,
        compression: str = "none",
        ladder_layers: Sequence[int] = (),
        hidden_size: int | None = None,
        fingerprint: str | None = None,
        commit: str | None = None,
    ):
        self.initial_peers = list(initial_peers)
        # the model's hidden size, when known: inputs of another size are refused here (see `check_input`)
        self.hidden_size = hidden_size
        # the model's Ladder Residual layers (its config's): which boundaries carry (r, p), and which servers fit
        self.ladder_layers = tuple(ladder_layers)
        self.ladder = layer_ranges(self.ladder_layers)
        # the model's dht.info.model_fingerprint: only servers announcing it (or none) are used; None: any
        self.fingerprint = fingerprint
        # the hub commit of its checkpoint (None: a local folder): servers announcing another are not used either
        self.commit = commit
        # how hidden states (and their gradients) travel: in forwards, backwards, and inference sessions unless
        # a session says otherwise (wire.compression)
        self.compression = check_codec(compression)
        self.dht_prefix = dht_prefix
        self.num_blocks = num_blocks
        # the DHT look-ups and the connections (a private swarm's key, if any, is checked by both)
        self.directory = Directory(
            initial_peers,
            identity=identity,
            swarm_key=swarm_key,
            connect_timeout_s=connect_timeout_s,
            prefer_direct=prefer_direct,
        )
        self.identity, self.swarm_key, self.pool = (
            self.directory.identity,
            self.directory.swarm_key,
            self.directory.pool,
        )
        self.refresh_s = refresh_s
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s  # the most any one request may take, whatever its size
        self.step_timeout_s = step_timeout_s  # a step's deadline: this floor + slack x announced compute time
        self.replay_timeout_s = replay_timeout_s  # the floor of a replay's deadline, likewise
        self.push_timeout_s = push_timeout_s  # how long a server may try to push before it replies
        self.missing_blocks_timeout_s = missing_blocks_timeout_s
        self.max_replay_bytes = max_replay_bytes  # the kept inputs of one inference session
        self.forward_chunk_tokens = forward_chunk_tokens
        self.min_chunk_s = min_chunk_s
        self.push = push  # servers hand activations to the next server themselves (see client.session)
        # called on the client's event loop while a session (new, or replacing a hop) waits for room that ending
        # sessions free (`wants_room`): an owner of idle sessions (the API's kept ones) gives them back
        self.room_wanted: Callable[[], None] | None = None
        self.rooms = RoomBoard()  # this client's sessions, and their waits for room on servers
        # its sessions on each server, against the sessions a server admits from one peer
        self.places = SessionPlaces()
        self.affinity = PrefixMemory()  # the beginnings of its sessions, and the servers it sent them to
        # a session that has waited this long for room lets its other servers go (`client.room`)
        self.room_hold_s = room_hold_s
        # the most a session waits for room that ending sessions free (`wants_room`) where no other server holds
        # its blocks; 0: refused at once (SessionRefused)
        if not 0 <= room_wait_s < math.inf:
            raise ValueError(f"room_wait_s must be a finite number >= 0, got {room_wait_s}")
        self.room_wait_s = room_wait_s
        self.rng = random.Random()
        self.bans = Bans(base_s=ban_s)
        self._handed_back: dict[str, float] = {}  # peer -> when it last handed a session back
        # the latest hop replacements of every session, oldest first (bounded: a client may run for months)
        self.failovers: deque[Failover] = deque(maxlen=FAILOVERS_KEPT)
        if not 0 <= spot_check_fraction <= 1:
            raise ValueError(f"spot_check_fraction must be in [0, 1], got {spot_check_fraction}")
        self.spot_check_fraction = (
            spot_check_fraction  # of hop computations, recomputed elsewhere and compared
        )
        self.spot_rng = random.Random(spot_check_seed)  # which steps are checked, and by whom
        self.spot_checks: deque[SpotCheck] = deque(maxlen=SPOT_CHECKS_KEPT)  # the latest checks, oldest first
        # the latest checks that found wrong outputs
        self.reports: deque[SpotCheck] = deque(maxlen=FAILOVERS_KEPT)
        self.speeds = Speeds()  # measured speed of each server, which caps its announced one in routing
        self._servers: dict[str, ServerInfo] = {}
        # servers under this model name that serve another checkpoint (other ladder layers or another model's
        # config): never used
        self.other_checkpoints: dict[str, ServerInfo] = {}
        self._servers_at = -float("inf")
        self._lookup: asyncio.Future[None] | None = None  # the DHT look-up of the servers in flight
        self._fixed = False
        self.rtt_s: dict[str, float] = {}
        if active_adapter is not None and not valid_name(active_adapter):  # no server hosts such a name
            raise ValueError(f"active_adapter {active_adapter!r}: an adapter's name is {NAME_RULE}")
        self.active_adapter = active_adapter  # a hosted adapter: only servers announcing it are used
        self.uploads = AdapterUploads(self)
        self.max_micro_batches = max_micro_batches  # in flight at once in a training forward/backward
        self.shut_down = False  # then every request refuses (`check_running`), instead of connecting anew

    @property
    def dht(self) -> hivemind.DHT | None:
        return self.directory.dht

    async def start(self) -> None:
        await self.directory.start()

    async def shutdown(self) -> None:
        self.shut_down = True
        if self._lookup is not None:
            self._lookup.cancel()
        await self.uploads.close()
        await self.directory.shutdown()

    async def servers(self, *, refresh: bool = False, patience_s: float | None = None) -> list[ServerInfo]:
        """The model's servers from the DHT, looked up again when `refresh` or the list is older than
        `refresh_s` (callers meanwhile share one look-up). `patience_s`: with a list at hand, wait at most that
        long for the look-up, and return the list as it was if it is not back (its answer is kept when it is)."""
        stale = time.monotonic() - self._servers_at > self.refresh_s
        if self.dht is not None and not self._fixed and (refresh or stale):
            if self._lookup is None or self._lookup.done():
                self._lookup = asyncio.ensure_future(self._look_up())
                # (read by its waiters)
                self._lookup.add_done_callback(lambda f: f.cancelled() or f.exception())
            if patience_s is not None and self._servers:
                await asyncio.wait([self._lookup], timeout=patience_s)
                if not self._lookup.done():
                    return list(self._servers.values())
            await asyncio.shield(self._lookup)
        return list(self._servers.values())

    async def _look_up(self) -> None:
        async with asyncio.timeout(self.request_timeout_s):
            found = await self.directory.servers(self.dht_prefix, self.num_blocks)
        if not self._fixed:  # (`use_servers` was called meanwhile: those stay)
            self._keep(found)
            self._servers_at = time.monotonic()

    def check_running(self) -> None:
        """Raise ShutDownError once `shutdown` has begun: requests in flight end with it, and new ones start
        nothing (the pool would otherwise open connections again that nothing closes)."""
        if self.shut_down:
            raise ShutDownError("this model's swarm client was shut down (model.shutdown())")

    def use_servers(self, servers: Sequence[ServerInfo]) -> None:
        """Route over exactly these servers from now on, without DHT look-ups (a fixed set of servers; those of
        another checkpoint are left out all the same)."""
        self._keep(servers)
        self._fixed = True

    def _keep(self, servers: Sequence[ServerInfo]) -> None:
        """Use the servers of this client's checkpoint; set those of another one aside (and say so, once)."""
        mine = [same_checkpoint(s, self.ladder, self.fingerprint, self.commit) for s in servers]
        self._servers = {s.peer_id: s for s, ok in zip(servers, mine) if ok}
        others = {s.peer_id: s for s, ok in zip(servers, mine) if not ok}
        for peer_id in others.keys() - self.other_checkpoints.keys():
            logger.warning(
                "server %s serves %s under %r; this client's checkpoint is %s: not using it",
                peer_id,
                self._describe_other(others[peer_id]),
                self.dht_prefix,
                self._describe_own(),
            )
        self.other_checkpoints = others

    def _describe_own(self) -> str:
        own = describe_ladder(self.ladder)
        own = own if self.fingerprint is None else f"model fingerprint {self.fingerprint}, {own}"
        return own if self.commit is None else f"{own}, hub commit {self.commit}"

    def _describe_other(self, server: ServerInfo) -> str:
        """How another checkpoint's server differs from this client's, for people."""
        if server.ladder != self.ladder:
            return describe_ladder(server.ladder)
        if server.fingerprint == self.fingerprint:
            return f"another model: hub commit {server.commit} (another revision)"
        return f"another model: fingerprint {server.fingerprint} (the config differs)"

    def block_range(self, blocks: tuple[int, int] | None) -> tuple[int, int]:
        """[start, end) of a request through some of the blocks (all by default). Its input and output are the
        hidden states alone: a range whose ends carry the ladder pair is refused."""
        start, end = (0, self.num_blocks) if blocks is None else blocks
        if not 0 <= start < end <= self.num_blocks:
            raise ValueError(
                f"blocks [{start}, {end}) are not a range of the model's {self.num_blocks} blocks"
            )
        if self.carries_pending(start) or self.carries_pending(end):
            raise ValueError(
                f"blocks [{start}, {end}): this Ladder Residual model's state between two of its ladder layers "
                f"is two tensors (the residual stream and a sub-layer's pending output), not hidden states: start "
                f"and end the range elsewhere ({describe_ladder(self.ladder)})"
            )
        return start, end

    def carries_pending(self, boundary: int) -> bool:
        """Whether the state crossing layer boundary `boundary` is the ladder pair (r, p) (`models.ladder`)."""
        return carries_pending(self.ladder_layers, boundary)

    def use_dht(self) -> None:
        """Undo `use_servers`: look servers up in the DHT again."""
        self._fixed = False
        self._servers_at = -float("inf")

    def info(self, peer_id: str) -> ServerInfo | None:
        return self._servers.get(peer_id)

    async def connection(self, peer_id: str) -> Connection:
        """The persistent connection to a server (direct when its announced address answers, else libp2p)."""
        self.check_running()
        info = self._servers.get(peer_id)
        return await self.directory.connection(peer_id, info.direct_addrs if info is not None else ())

    async def ask_room(self, hop: Hop, batch_size: int, max_length: int, wait_s: float) -> bool:
        """Whether `hop`'s server has room for a session of this size now, or within `wait_s` (it answers as
        soon as room comes free: `RoomQuery`)."""
        conn = await self.connection(hop.peer_id)
        query = RoomQuery(hop.start, hop.end, batch_size, max_length, wait_s).to_message()
        return RoomReply.parse(await conn.call("room", query, timeout=wait_s + self.connect_timeout_s)).room

    async def ping(self, peer_id: str) -> float:
        """Round trip of an `info` call in seconds (also opens the connection). A refusal for load (e.g. past this
        client's request rate) is an answer too: the server is alive (its round trip then counts the connection's
        opening, if any)."""
        self.check_running()
        info = self._servers.get(peer_id)
        began = time.perf_counter()
        try:
            rtt = await self.directory.ping(peer_id, info.direct_addrs if info is not None else ())
        except RemoteError as e:
            if not sheds_load(e):
                raise
            rtt = time.perf_counter() - began
        self.rtt_s[peer_id] = rtt
        return rtt

    def _capped(self, servers: Sequence[ServerInfo]) -> list[ServerInfo]:
        return cap_throughput(servers, self.speeds.measured("inference"), self.speeds.measured("forward"))

    def handed_back_again(self, peer_id: str) -> bool:
        """Whether `peer_id` handed a session back (`server_leaving`) within the last ban period before this
        time (which is recorded)."""
        now = time.monotonic()
        last, self._handed_back[peer_id] = self._handed_back.get(peer_id), now
        return last is not None and now - last < self.bans.base_s

    def ban(self, peer_id: str, error: BaseException) -> None:
        """Avoid a server that failed a request, for a while that grows with each failure (the longest ban at
        once for a server whose output was wrong)."""
        unreachable = isinstance(error, ConnectionLost | TimeoutError | OSError)
        wrong = isinstance(error, CorruptOutputError)
        duration = self.bans.ban(peer_id, time.monotonic(), unreachable=unreachable, longest=wrong)
        self.rtt_s.pop(peer_id, None)  # measured again if it comes back
        logger.info("banning %s for %.0f s: %s", peer_id, duration, describe(error))

    async def _ping_unknown(self, servers: Sequence[ServerInfo]) -> None:
        """Ping the servers not measured yet and those whose connection broke; ban those that don't answer."""
        todo = [s.peer_id for s in servers if s.peer_id not in self.rtt_s or self.pool.is_broken(s.peer_id)]
        results = await asyncio.gather(*(self.ping(p) for p in todo), return_exceptions=True)
        for peer_id, result in zip(todo, results):
            if isinstance(result, Exception):
                self.ban(peer_id, result)

    async def route(
        self,
        plan: Callable[[list[ServerInfo]], R],
        *,
        failure: BaseException | None = None,
        tuned: bool = False,
    ) -> R:
        """`plan(usable servers)`, a routing function that raises MissingBlocksError when they don't cover its
        blocks. Banned servers are left out; while blocks lack a usable server, the server list is looked up
        again (with backoff) and banned servers that answer a ping are taken back, for up to
        `missing_blocks_timeout_s`, after which the MissingBlocksError goes to the caller (caused by `failure`,
        the error that sent us looking, if any). `tuned`: the request needs servers that announce `tunable`;
        where only the others hold some blocks, the MissingBlocksError comes at once and says so."""
        give_up_at = time.monotonic() + self.missing_blocks_timeout_s
        delay, attempt = 0.25, 0
        while True:
            self.check_running()
            # after a failure, the swarm as it is now (a server that moved or left has announced it), but not
            # at the cost of a look-up slowed by the failed server's own DHT peer: then the servers known (the
            # failed one banned) first, and, where they do not do, the look-up's answer
            patience_s = FAILOVER_LOOKUP_S if attempt == 0 and failure is not None else None
            servers = await self.servers(refresh=attempt > 0 or failure is not None, patience_s=patience_s)
            banned = self.bans.banned(time.monotonic())
            await self._ping_unknown(
                [s for s in servers if s.state == ServerState.ONLINE and s.peer_id not in banned]
            )
            banned = self.bans.banned(time.monotonic())
            usable = self._capped([s for s in servers if s.peer_id not in banned and self._serves_adapter(s)])
            untunable = {s.peer_id for s in usable if tuned and not s.tunable}
            try:
                return plan([s for s in usable if s.peer_id not in untunable])
            except MissingBlocksError as e:
                if untunable and _covers(plan, usable):
                    raise MissingBlocksError(
                        e.missing,
                        self.num_blocks,
                        " that takes deep prompts, a client's adapter and backward (those that hold them run "
                        "tensor-parallel, --tp, which does not yet)",
                    ) from failure
                if attempt > 0 and await self._take_back(servers, e.missing):
                    continue
                if attempt > 0 and time.monotonic() + delay > give_up_at:
                    held = [s for s in servers if s.peer_id in banned and s.state == ServerState.ONLINE]
                    held = [s for s in held if any(s.start_block <= b < s.end_block for b in e.missing)]
                    detail = f" that works ({len(held)} failed this client and are banned)" if held else ""
                    if self.active_adapter is not None:
                        detail += f" and announces adapter {self.active_adapter!r}"
                    other = [
                        s
                        for s in self.other_checkpoints.values()
                        if any(s.start_block <= b < s.end_block for b in e.missing)
                    ]
                    if other:
                        kinds = sorted({self._describe_other(s) for s in other})
                        detail += (
                            f" and serves this client's checkpoint, {self._describe_own()}; "
                            f"{len(other)} server(s) of {self.dht_prefix!r} hold them for another checkpoint "
                            f"({'; '.join(kinds)}), which is never chained with it"
                        )
                    # none at all: e.g. a private swarm's records, which only its members can read
                    if not servers and not self.other_checkpoints:
                        detail = (
                            " (no server of this model was found at all: check initial_peers, the model's name, "
                            "and, for a private swarm, swarm_key)"
                        )
                    raise MissingBlocksError(e.missing, self.num_blocks, detail) from failure
                if attempt > 0:
                    logger.info("%s; looking again in %.1f s", str(e), delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, MAX_ROUTE_RETRY_S)
                attempt += 1

    def _serves_adapter(self, server: ServerInfo) -> bool:
        return self.active_adapter is None or self.active_adapter in server.adapters

    async def _take_back(self, servers: list[ServerInfo], missing: list[int]) -> bool:
        """Ping the servers banned for not answering that hold missing blocks; lift the bans of those that
        answer now."""
        unreachable = self.bans.unreachable(time.monotonic())
        candidates = [
            s.peer_id
            for s in servers
            if s.peer_id in unreachable and any(s.start_block <= b < s.end_block for b in missing)
        ]
        results = await asyncio.gather(*(self.ping(p) for p in candidates), return_exceptions=True)
        alive = [p for p, r in zip(candidates, results) if not isinstance(r, BaseException)]
        for peer_id in alive:
            logger.info("%s answers again; lifting its ban", peer_id)
            self.bans.lift(peer_id)
        return bool(alive)

    async def route_inference(
        self,
        *,
        start: int = 0,
        end: int | None = None,
        min_cache_tokens: int = 0,
        failure: BaseException | None = None,
        refused: Mapping[str, RemoteError] | None = None,
        shed: LoadShed | None = None,
        tuned: bool = False,
        demand: Demand | None = None,
    ) -> list[Hop]:
        """The fastest chain over [start, end) among usable servers (see `route`), but for those that `refused`
        to open the session (its batch size or length: the request's fault, not theirs, so they are not
        banned); SessionRefused with their reasons at once when the blocks have no other server. Servers that
        `shed` load (past this client's request rate), and those where this client holds all the sessions they
        admit from one peer (`places`), are left out too, but where only they and refusing servers hold some
        blocks they are chained again (the caller waits for them: `shed.wait`, `InferenceSession._take_places`).
        Servers of the same blocks are told apart by their load and what they likely hold of the session's
        prompt (`demand`; see `client.routing`)."""
        refused = refused or {}
        waiting = shed.refused if shed is not None else {}

        def plan(servers: list[ServerInfo]) -> list[Hop]:
            def chain(over: list[ServerInfo]) -> list[Hop]:
                return route_inference(
                    over,
                    self.num_blocks,
                    self.rtt_s,
                    start=start,
                    end=end,
                    min_cache_tokens=min_cache_tokens,
                    load=self.load(over),
                    demand=demand,
                )

            # servers where this client holds all the sessions it may are left out too where others will do
            peers = [s.peer_id for s in servers]
            full = set(self.places.full(peers, self.session_limits(peers)))
            avoided = waiting.keys() | full
            willing = [s for s in servers if s.peer_id not in refused and s.peer_id not in avoided]
            try:
                return chain(willing)
            except MissingBlocksError:
                if len(willing) == len(servers):
                    raise
                if waiting or full:
                    with contextlib.suppress(MissingBlocksError):
                        return chain([s for s in servers if s.peer_id not in refused])
                chain(servers)  # (a MissingBlocksError still when the refusing servers would not cover them)
                reasons = sorted({e.message for e in refused.values()})
                raise SessionRefused(
                    f"the servers of blocks [{start}, {self.num_blocks if end is None else end}) refuse this "
                    "session: " + "; ".join(reasons),
                    frozenset(e.code for e in refused.values()),
                ) from None

        return await self.route(plan, failure=failure, tuned=tuned)

    def session_limits(self, peers: Sequence[str]) -> dict[str, int | None]:
        """Peer id -> the inference sessions its server lets one peer hold open (None: not announced)."""
        return {p: info.max_sessions_per_peer if (info := self._servers.get(p)) else None for p in peers}

    def has_replicas(self, start: int, end: int) -> bool:
        """Whether the servers known hold some block of [start, end) twice (`routing.has_replicas`)."""
        return has_replicas(list(self._servers.values()), start, end)

    def load(self, servers: Sequence[ServerInfo]) -> dict[str, float]:
        """Peer id -> the rows of other clients' sessions that its merged decode steps carry: what it announced
        (as of its last announcement) less this client's sessions there. This client's own are not spread over
        replicas: they share the server's merged steps and this client's merged LM head (spreading one API's
        sessions measured 0.81-0.85x here, `benchmarks/replicas.py`); a server they slow is measured slower."""
        own = self.rooms.rows()
        return {s.peer_id: float(max(s.busy_rows - own.get(s.peer_id, 0), 0)) for s in servers}

    def deadline_s(self, hop: Hop, tokens: int, *, decode: bool, floor_s: float | None = None) -> float:
        """How long `hop` may take for `tokens` (batch x length) tokens, by its announced speed (capped by the
        measured one) and the bytes it sends and receives."""
        info = self._servers.get(hop.peer_id)
        rate = 1.0
        if info is not None:
            kind, announced = ("inference", info.inference_rps) if decode else ("forward", info.forward_rps)
            rate = self.speeds.capped(hop.peer_id, kind, announced)
        floor_s = self.step_timeout_s if floor_s is None else floor_s
        # its states there and back, float32 at most (and the ladder pair's p beside r where an edge carries it)
        states = 2 + self.carries_pending(hop.start) + self.carries_pending(hop.end)
        transfer = states * tokens * (self.hidden_size or 0) * 4
        deadline = step_deadline_s(
            tokens, hop.end - hop.start, rate, floor_s=floor_s, transfer_bytes=transfer
        )
        return min(deadline, self.request_timeout_s)

    async def forward(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None = None,
        tuning: Tuning = NO_TUNING,
        blocks: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Hidden states through every block (or blocks [start, end) of `blocks`), spread over servers by
        throughput; a server that fails is banned and its part computed again elsewhere.

        A long input is cut into chunks of positions and pipelined along the chain: while a server computes
        chunk k, the next one already works on chunk k-1 (chunk size: see `_chunk_tokens`). The chunks go
        through temporary sessions (their KV cache carries attention across chunks), and a failure restarts the
        pipeline on a new route. An input of one chunk, or one that finds no cache room, goes hop by hop
        through plain `forward` calls, and a failed hop is retried on another server from its own input.
        A spot check that finds a hop's output wrong makes the forward start again from that hop's input.
        `tuning`: deep prompts and an adapter for this request.
        """
        check_input(hidden, key_mask, self.hidden_size)
        first, last = self.block_range(blocks)
        batch, length = hidden.shape[:2]
        failure: BaseException | None = None
        while True:
            hops = await self.route(
                self._forward_plan(first, last),
                failure=failure,
                tuned=tuning.needs_tunable,
            )
            chunk = max(1, self._chunk_tokens(hops) // batch)
            if length <= chunk:
                break
            chunk = -(-length // -(-length // chunk))  # as many chunks as needed, all of about the same size
            try:
                outputs = await self._pipelined_forward(hops, hidden, key_mask, chunk, tuning)
            except HopFailed as e:
                # no room for the temporary sessions (the whole cache, or this client's share of it), or sessions
                # of more rows or positions than a server takes (`bad_request`, the input's fault, not the
                # server's): go hop by hop through plain forwards, which hold no cache
                codes = ("cache_full", "quota", "busy", "bad_request")
                if isinstance(e.cause, RemoteError) and e.cause.code in codes:
                    break
                logger.warning("%s; computing the batch again on another route", str(e))
                self.ban(e.hop.peer_id, e.cause)
                failure = e.cause
                continue
            inputs = [(hidden, None), *outputs[:-1]]
            checks = [self._maybe_check(h, x, key_mask, y, tuning) for h, x, y in zip(hops, inputs, outputs)]
            if (wrong := await self._first_wrong(checks)) is None:
                return outputs[-1][0]
            failure = wrong[1]
        boundary, checks, inputs = first, [], {first: (hidden, None)}
        shed = LoadShed(self.request_timeout_s)
        while boundary < last:
            plan = shed.plan(self._forward_plan(boundary, last))
            hop = (await self.route(plan, failure=failure, tuned=tuning.needs_tunable))[0]
            await shed.wait([hop])
            try:
                out = await self._forward_hop(hop, *inputs[boundary], key_mask, tuning)
            except HopFailed as e:
                if shed.note(e):
                    continue
                logger.warning("%s; computing its blocks on another server", str(e))
                self.ban(hop.peer_id, e.cause)
                failure = e.cause
                continue
            shed.done(hop)
            checks.append(self._maybe_check(hop, inputs[boundary], key_mask, out, tuning))
            boundary, inputs[hop.end] = hop.end, out
            if boundary == last and (wrong := await self._first_wrong(checks)) is not None:
                (boundary, failure), checks = (
                    (wrong[0].start, wrong[1]),
                    [],
                )  # again from the wrong hop's input
        return inputs[last][0]  # the range's last boundary carries r alone (`block_range`)

    def _maybe_check(
        self, hop: Hop, state: State, key_mask: torch.Tensor | None, output: State, tuning: Tuning = NO_TUNING
    ) -> tuple[Hop, asyncio.Task[SpotCheck] | None]:
        """Start a spot check of `hop` (output `output` for the last positions of its input `state`) with
        probability `spot_check_fraction`; it runs while the caller goes on."""
        if not should_check(self.spot_rng, self.spot_check_fraction):
            return hop, None
        (hidden, pending), (out, out_pending) = state, output
        check = self.spot_check(
            hop, hidden, key_mask, out, tuning, self.compression, pending=pending, output_pending=out_pending
        )
        return hop, asyncio.ensure_future(check)

    async def _first_wrong(
        self, checks: Sequence[tuple[Hop, asyncio.Task[SpotCheck] | None]]
    ) -> tuple[Hop, CorruptOutputError] | None:
        """Wait for spot checks in route order; the first hop found wrong (its server is banned by then) and
        why, or None. Checks of later hops are dropped then: their inputs were wrong."""
        for i, (hop, task) in enumerate(checks):
            if task is None:
                continue
            record = await task
            if hop.peer_id in record.wrong:
                for _, later in checks[i + 1 :]:
                    if later is not None:
                        later.cancel()
                return hop, corrupt_output_error(record)
        return None

    async def spot_check(
        self,
        hop: Hop,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None,
        output: torch.Tensor,
        tuning: Tuning = NO_TUNING,
        compression: str = "none",
        pending: torch.Tensor | None = None,
        output_pending: torch.Tensor | None = None,
    ) -> SpotCheck:
        """Compute `hop`'s blocks on `hidden` (all of the hop's inputs, from position 0) on other servers and
        compare with `output`, the hop's output for the last `output.shape[1]` positions. On a disagreement a
        third opinion is asked for; the opinions that agree with no other are wrong, and their servers banned
        and reported. Never raises for a peer's fault: a checker that fails is banned and the check skipped.
        `compression`: the codec `output` travelled in (its error widens the tolerance). Where the hop's edges
        carry the ladder pair, `pending` is its input p and `output_pending` its output p, compared beside r."""
        tokens = output.shape[1]

        async def recompute(checker: list[Hop]) -> torch.Tensor:
            out = hidden, pending
            for h in checker:
                out = await self._forward_hop(h, *out, key_mask, tuning)
            return joined(*out)[:, -tokens:]

        first = joined(output, output_pending)
        return await self._vote(hop, tokens, first, recompute, mismatch, compression, "forward")

    async def spot_check_backward(
        self,
        hop: Hop,
        state: State,
        grad: State,
        key_mask: torch.Tensor | None,
        tuning: Tuning,
        reply: BackwardReply,
    ) -> SpotCheck:
        """`spot_check` for a backward: other servers of `hop`'s blocks compute the gradients of its input
        `state` for the gradient `grad` of its output (their inputs by forwards first, where several split the
        blocks), and the input's, the deep prompts' and the adapter's gradients are compared with `reply`'s."""

        async def recompute(checker: list[Hop]) -> Gradients:
            inputs = [state]
            for h in checker[:-1]:
                inputs.append(await self._forward_hop(h, *inputs[-1], key_mask, tuning))
            g, prompts, lora = grad, [], {}
            for h, x in zip(reversed(checker), reversed(inputs), strict=True):
                answer = await self._backward_hop(h, x, g, key_mask, tuning)
                g = answer.grad_hidden, answer.grad_pending
                prompts.insert(0, answer.grad_prompts)
                lora.update(answer.grad_lora)
            deep = None if prompts[0] is None else torch.cat(prompts)  # [blocks, ...] in the hop's order
            return Gradients(joined(*g), deep, lora)

        first = Gradients(joined(reply.grad_hidden, reply.grad_pending), reply.grad_prompts, reply.grad_lora)
        tokens = state[0].shape[1]
        return await self._vote(
            hop, tokens, first, recompute, Gradients.distance, self.compression, "backward"
        )

    async def _vote(
        self,
        hop: Hop,
        tokens: int,
        first: R,
        recompute: Callable[[list[Hop]], Awaitable[R]],
        distance_of: Callable[[R, R], float],
        compression: str,
        kind: str,
    ) -> SpotCheck:
        """The checked server's opinion `first` against other servers' (`recompute` over a checker route), up to
        three opinions; see `spot_check`."""
        opinions, parties = [first], [(hop.peer_id,)]
        distance, tol = float("nan"), tolerance([], compression)

        def record(checkers: tuple, outcome: str, wrong: tuple[str, ...] = ()) -> SpotCheck:
            check = SpotCheck(
                hop.peer_id, hop.start, hop.end, tokens, checkers, distance, tol, outcome, wrong, kind
            )
            self.spot_checks.append(check)
            return check

        while len(opinions) < 3:
            checker = self._checker_route(hop, {p for party in parties for p in party})
            if checker is None:
                break
            try:
                opinions.append(await recompute(checker))
            except HopFailed as e:
                if not isinstance(e.cause, RemoteError):  # a refusal (too large, busy) is no fault
                    self.ban(e.hop.peer_id, e.cause)
                return record(tuple(parties[1:]), f"skipped: {e}")
            parties.append(tuple(h.peer_id for h in checker))
            tol = tolerance([self._dtype(p) for party in parties for p in party], compression)
            if len(opinions) == 2:
                distance = distance_of(opinions[0], opinions[1])
            if not judge(opinions, tol, distance_of):
                return record(tuple(parties[1:]), "agreed")
        if len(opinions) == 1:
            return record((), "skipped: no other server holds these blocks")
        wrong = tuple(p for i in judge(opinions, tol, distance_of) for p in parties[i])
        found = record(tuple(parties[1:]), "disagreed", wrong)
        self.reports.append(found)
        logger.warning(
            "spot check of blocks [%d, %d) (%s): %s disagree with the other opinions (%s vs checkers %s, mismatch "
            "%.3g > tolerance %.3g); banning them",
            hop.start,
            hop.end,
            kind,
            list(wrong),
            hop.peer_id,
            [list(p) for p in parties[1:]],
            distance,
            tol,
        )
        error = corrupt_output_error(found)
        for peer_id in wrong:
            self.ban(peer_id, error)
        return found

    def _dtype(self, peer_id: str) -> str:
        """What sets the precision of a server's outputs: its quantization if any, else its dtype."""
        info = self._servers.get(peer_id)
        if info is None:
            return "unknown"
        return info.dtype if info.quantization == "none" else info.quantization

    def _checker_route(self, hop: Hop, exclude: set[str]) -> list[Hop] | None:
        """Other servers to compute `hop`'s blocks (one, or several that together cover them), or None."""
        banned = self.bans.banned(time.monotonic()) | exclude
        usable = [s for s in self._servers.values() if s.peer_id not in banned and self._serves_adapter(s)]
        try:
            return route_forward(
                self._capped(usable), self.num_blocks, self.spot_rng, start=hop.start, end=hop.end
            )
        except MissingBlocksError:
            return None

    async def _forward_hop(
        self,
        hop: Hop,
        hidden: torch.Tensor,
        pending: torch.Tensor | None,
        key_mask: torch.Tensor | None,
        tuning: Tuning = NO_TUNING,
    ) -> State:
        """`hop`'s blocks over the state (hidden, pending) -> its output state, checked."""
        request = ForwardRequest(
            hop.start,
            hop.end,
            hidden,
            key_mask,
            tuning.hop_prompts(hop.start, hop.end),
            tuning.adapter,
            tuning.dropout_seed,
            pending,
            self.compression,
        ).to_message()
        tokens = hidden.shape[0] * hidden.shape[1]
        began = time.perf_counter()
        reply = await self._call(hop, "forward", request, tokens, tuning)
        try:
            out = checked_forward(reply, hop.peer_id, hidden, self.carries_pending(hop.end))
        except BadReplyError as e:
            raise HopFailed(hop, e) from e
        # what it took, less a round trip, is at most its compute: a lower bound on its speed, where compute is
        # most of it (a spot check of a decode step's token measures the call's overheads, and routing would
        # price a session's prefill by them)
        if tokens >= MEASURED_FORWARD_TOKENS:
            compute_s = time.perf_counter() - began - self.rtt_s.get(hop.peer_id, 0.0)
            self.speeds.observe(hop.peer_id, "forward", tokens * (hop.end - hop.start) / max(compute_s, 1e-6))
        return out.hidden, out.pending

    async def _call(self, hop: Hop, method: str, request: Message, tokens: int, tuning: Tuning) -> Message:
        """One unary call to `hop`'s server, with the client's adapter uploaded there first (and again, once,
        if the server says it does not hold it: it restarted, moved, or dropped it unused). Failures raise
        HopFailed."""
        timeout = self.deadline_s(hop, tokens, decode=False)
        for attempt in range(2):
            try:
                conn = await self.connection(hop.peer_id)
                if tuning.weights is not None:
                    await self.uploads.ensure(hop.peer_id, tuning.weights)
                return await conn.call(method, request, timeout=timeout)
            except RemoteError as e:
                if e.code == "unknown_adapter" and tuning.weights is not None and attempt == 0:
                    self.uploads.forget(hop.peer_id)
                    continue
                raise HopFailed(hop, e) from e
            except HOP_FAILURES as e:
                raise HopFailed(hop, e) from e
        raise AssertionError("unreachable")

    async def _backward_hop(
        self, hop: Hop, state: State, grad: State, key_mask: torch.Tensor | None, tuning: Tuning
    ) -> BackwardReply:
        """The gradients of `hop`'s span at input `state` for the gradient `grad` of its output state (each p
        where the edge carries the ladder pair), checked."""
        (hidden, pending), (grad_hidden, grad_pending) = state, grad
        prompts = tuning.hop_prompts(hop.start, hop.end)
        lora = tuning.weights.layers(hop.start, hop.end) if tuning.lora_grads and tuning.weights else None
        request = BackwardRequest(
            hop.start,
            hop.end,
            hidden,
            grad_hidden,
            key_mask,
            prompts,
            tuning.adapter,
            tuning.dropout_seed,
            lora is not None,
            pending,
            grad_pending,
            self.compression,
        ).to_message()
        # a backward recomputes the forward and differentiates it: about three forwards' work
        reply = await self._call(hop, "backward", request, 3 * hidden.shape[0] * hidden.shape[1], tuning)
        shapes = None if lora is None else {name: tuple(t.shape) for name, t in lora.items()}
        try:
            return checked_gradients(reply, hop.peer_id, hidden, prompts, shapes, pending)
        except BadReplyError as e:
            raise HopFailed(hop, e) from e

    def _micro_batches(self, hidden: torch.Tensor) -> list[slice]:
        """A training batch's rows cut into micro-batches of at least `_chunk_tokens` tokens each (by the
        servers' announced speeds), at most `max_micro_batches` of them."""
        batch, length = hidden.shape[:2]
        hops = [Hop(s.peer_id, s.start_block, s.end_block) for s in self._servers.values()]
        target = self._chunk_tokens(hops) if hops else self.forward_chunk_tokens
        count = max(1, min(batch, self.max_micro_batches, batch * length // target))
        size = -(-batch // count)
        return [slice(lo, min(lo + size, batch)) for lo in range(0, batch, size)]

    def _forward_plan(self, start: int, end: int | None = None) -> Callable[[list[ServerInfo]], list[Hop]]:
        return lambda servers: route_forward(servers, self.num_blocks, self.rng, start=start, end=end)

    async def train_forward(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None,
        tuning: Tuning,
        blocks: tuple[int, int] | None = None,
    ) -> tuple[torch.Tensor, list[tuple[slice, list[tuple[Hop, State]]]]]:
        """A forward to be differentiated (through `blocks`, as `forward`'s): the output, and per micro-batch
        (its rows) every hop with its input state, for `train_backward`. Hop by hop, a failed hop retried on
        another server of its blocks; the micro-batches concurrently, so that they pipeline along the chain.
        Spot checked as plain forwards are when the adapter has no dropout (with dropout, the masks drawn differ
        when other servers split the blocks differently): a hop found wrong is computed again, from its input, on
        other servers."""
        check_input(hidden, key_mask, self.hidden_size)
        first, last = self.block_range(blocks)
        checked = tuning.dropout_seed is None

        async def micro_batch(rows: slice) -> tuple[torch.Tensor, list[tuple[Hop, State]]]:
            x: State = hidden[rows], None
            own = tuning.for_rows(rows)
            mask = None if key_mask is None else key_mask[rows]
            kept: list[tuple[Hop, State]] = []
            checks: list[tuple[Hop, asyncio.Task[SpotCheck] | None]] = []
            failure: BaseException | None = None
            shed = LoadShed(self.request_timeout_s)
            while not kept or kept[-1][0].end < last:
                start = kept[-1][0].end if kept else first
                # (any server can compute it, but only a tunable one can take its backward)
                plan = shed.plan(self._forward_plan(start, last))
                hop = (await self.route(plan, failure=failure, tuned=True))[0]
                await shed.wait([hop])
                try:
                    out = await self._forward_hop(hop, *x, mask, own)
                except HopFailed as e:
                    if shed.note(e):
                        continue
                    logger.warning("%s; computing its blocks on another server", str(e))
                    self.ban(hop.peer_id, e.cause)
                    failure = e.cause
                    continue
                shed.done(hop)
                if checked:
                    checks.append(self._maybe_check(hop, x, mask, out, own))
                kept.append((hop, x))
                x = out
                if hop.end == last and (wrong := await self._first_wrong(checks)):
                    # again from the wrong hop's input (its server is banned)
                    index = next(i for i, (h, _) in enumerate(kept) if h is wrong[0])
                    x, failure, kept, checks = kept[index][1], wrong[1], kept[:index], []
            return x[0], kept

        parts = self._micro_batches(hidden)
        results = await asyncio.gather(*(micro_batch(rows) for rows in parts))
        output = torch.cat([out for out, _ in results])
        return output, [(rows, kept) for rows, (_, kept) in zip(parts, results, strict=True)]

    async def train_backward(
        self,
        kept: list[tuple[slice, list[tuple[Hop, State]]]],
        grad: torch.Tensor,
        key_mask: torch.Tensor | None,
        tuning: Tuning,
    ) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, torch.Tensor]]:
        """Gradients of the inputs, of the deep prompts (all blocks) and of the adapter's tensors, walking each
        micro-batch's hops of `train_forward` in reverse (with the gradient of p beside r's where a boundary
        carries the ladder pair). A hop that fails is replaced by other servers of its blocks: their inputs are
        computed from the hop's kept input, then their backwards run in reverse. Without adapter dropout, a
        random `spot_check_fraction` of the hops' backwards is computed again on other servers before its
        gradients are used (`spot_check_backward`); a hop found wrong is replaced as a failed one is."""
        check_input(grad, None, self.hidden_size, "gradients of the output")
        checked = tuning.dropout_seed is None

        async def micro_batch(rows: slice, hops: list[tuple[Hop, State]]):
            g: State = grad[rows], None
            own = tuning.for_rows(rows)
            mask = None if key_mask is None else key_mask[rows]
            prompts = None if tuning.prompts is None else torch.zeros_like(tuning.prompts)
            lora: dict[str, torch.Tensor] = {}
            todo = list(hops)
            shed = LoadShed(self.request_timeout_s)
            while todo:
                hop, x = todo.pop()
                await shed.wait([hop])
                try:
                    reply = await self._backward_hop(hop, x, g, mask, own)
                    if checked and should_check(self.spot_rng, self.spot_check_fraction):
                        record = await self.spot_check_backward(hop, x, g, mask, own, reply)
                        if hop.peer_id in record.wrong:
                            raise HopFailed(hop, corrupt_output_error(record))
                except HopFailed as e:
                    if shed.note(e):  # the same server again, after a pause (its kept input is here)
                        todo.append((hop, x))
                        continue
                    logger.warning("%s; computing its backward on other servers", str(e))
                    self.ban(hop.peer_id, e.cause)
                    try:
                        todo += await self._reroute(hop, x, mask, own, e.cause)
                    except HopFailed as again:  # a new server failed the recomputation: route again
                        if not shed.note(again):
                            self.ban(again.hop.peer_id, again.cause)
                        todo.append((hop, x))
                    continue
                shed.done(hop)
                g = reply.grad_hidden.to(grad.dtype), reply.grad_pending
                if prompts is not None:
                    prompts[hop.start : hop.end, :, : reply.grad_prompts.shape[2]] += reply.grad_prompts
                for name, t in reply.grad_lora.items():
                    lora[name] = t.float() if name not in lora else lora[name] + t.float()
            return g[0], prompts, lora

        results = await asyncio.gather(*(micro_batch(rows, hops) for rows, hops in kept))
        grad_hidden = torch.cat([g for g, _, _ in results])
        grad_prompts = None if tuning.prompts is None else sum(p for _, p, _ in results)
        grad_lora: dict[str, torch.Tensor] = {}
        for _, _, lora in results:
            for name, t in lora.items():
                grad_lora[name] = t if name not in grad_lora else grad_lora[name] + t
        return grad_hidden, grad_prompts, grad_lora

    async def _reroute(
        self,
        hop: Hop,
        state: State,
        key_mask: torch.Tensor | None,
        tuning: Tuning,
        failure: BaseException,
    ) -> list[tuple[Hop, State]]:
        """Other servers for `hop`'s blocks, each with its input (computed from `state`, the hop's input), for a
        backward."""
        hops = await self.route(self._forward_plan(hop.start, hop.end), failure=failure, tuned=True)
        inputs = [state]
        for h in hops[:-1]:
            inputs.append(await self._forward_hop(h, *inputs[-1], key_mask, tuning))
        return list(zip(hops, inputs, strict=True))

    def observe_step(self, hop: Hop, elapsed_s: float, compute_s: float) -> None:
        """A decode step of `hop` took `elapsed_s` as the client saw it (from the previous hop's reply) and
        `compute_s` by the server's word: its speed is taken from the larger of the word and the elapsed time
        less a round trip, so a server cannot claim to be faster than it was."""
        seconds = max(compute_s, elapsed_s - self.rtt_s.get(hop.peer_id, 0.0), 1e-6)
        self.speeds.observe(hop.peer_id, "inference", (hop.end - hop.start) / seconds)

    def _chunk_tokens(self, hops: list[Hop]) -> int:
        """Tokens per pipelined chunk: at least `forward_chunk_tokens`, and enough that the slowest hop computes
        for `min_chunk_s` per chunk (by its announced speed), so per-chunk overheads stay small."""

        def seconds_per_token(hop: Hop) -> float:
            info = self._servers.get(hop.peer_id)
            return (hop.end - hop.start) / max(info.forward_rps if info else 1.0, 1e-9)

        slowest_s_per_token = max(seconds_per_token(h) for h in hops)
        return max(self.forward_chunk_tokens, int(self.min_chunk_s / slowest_s_per_token))

    async def _pipelined_forward(
        self,
        hops: list[Hop],
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None,
        chunk: int,
        tuning: Tuning = NO_TUNING,
    ) -> list[State]:
        """Each hop's output state (the last one's is the result); chunks carry p beside r across boundaries
        inside a ladder region."""
        batch, length = hidden.shape[:2]
        bounds = list(range(0, length, chunk))
        streams: list[Stream] = []

        def mask(lo: int) -> torch.Tensor | None:
            return None if key_mask is None else key_mask[:, lo : lo + chunk]

        try:
            for hop in hops:
                try:
                    conn = await self.connection(hop.peer_id)
                    if tuning.weights is not None:
                        await self.uploads.ensure(hop.peer_id, tuning.weights)
                    opening = OpenSession(
                        hop.start,
                        hop.end,
                        batch,
                        length,
                        adapter=tuning.adapter,
                        compression=self.compression,
                    ).to_message()
                    streams.append(
                        await conn.open_stream("inference", opening, timeout=self.connect_timeout_s)
                    )
                except HOP_FAILURES as e:
                    raise HopFailed(hop, e) from e
            # stage i reads chunks from queues[i], sends each to its server, passes the outputs to queues[i + 1]
            queues: list[asyncio.Queue] = [asyncio.Queue() for _ in range(len(hops) + 1)]
            outputs: list[list[State]] = [[] for _ in hops]  # each hop's output chunks, in order
            for lo in bounds:
                queues[0].put_nowait((lo, hidden[:, lo : lo + chunk], None))

            async def stage(i: int, stream: Stream) -> None:
                hop = hops[i]
                timeout = self.deadline_s(hop, batch * chunk, decode=False)
                sent: asyncio.Queue = asyncio.Queue()  # chunks sent, or the error that stopped the sending

                async def send_all() -> None:
                    try:
                        for _ in bounds:
                            # as late as the stages before take (they have deadlines)
                            lo, x, p = await queues[i].get()
                            prompts = tuning.hop_prompts(hop.start, hop.end, lo, chunk)
                            step = Step(
                                lo, x, mask(lo), prompts=prompts, compression=self.compression, pending=p
                            )
                            await stream.send(step.to_message(), timeout=timeout)
                            sent.put_nowait(lo)
                    except Exception as e:  # noqa: BLE001 - handed to the receiving loop, which raises it
                        sent.put_nowait(e)

                sender = asyncio.ensure_future(send_all())
                try:
                    for _ in bounds:
                        lo = await sent.get()
                        if isinstance(lo, Exception):
                            raise lo
                        # the server computes chunks in order: this one's deadline starts once it is sent and
                        # the previous one came back
                        reply = await stream.recv(timeout=timeout)
                        pending = self.carries_pending(hop.end)
                        out = step_reply(reply, hop.peer_id, hidden[:, lo : lo + chunk], lo, pending)
                        outputs[i].append((out.hidden, out.pending))
                        queues[i + 1].put_nowait((lo, out.hidden, out.pending))
                except HOP_FAILURES as e:
                    raise HopFailed(hop, e) from e
                finally:
                    sender.cancel()

            stages = [asyncio.ensure_future(stage(i, stream)) for i, stream in enumerate(streams)]
            try:
                await asyncio.gather(*stages)
            finally:
                for task in stages:  # a failed stage's successors would wait for its chunks for ever
                    task.cancel()
            return [_cat_states(chunks) for chunks in outputs]
        finally:
            for stream in streams:
                with contextlib.suppress(WireError):
                    await stream.close()


def _cat_states(chunks: list[State]) -> State:
    """Chunks of positions of one state, in order, as one state."""
    hidden = torch.cat([h for h, _ in chunks], dim=1)
    if chunks[0][1] is None:
        return hidden, None
    return hidden, torch.cat([p for _, p in chunks], dim=1)
