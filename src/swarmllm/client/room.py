"""The room this client's sessions wait for on servers, and what they give up so that no wait is for ever.

A session, new or replacing a failed hop, may find its server without room for it (this peer's cache share or
open sessions, a full cache: `swarm.wants_room`); it waits, since other sessions end and free it. Most often that room
is held by this client's own sessions, so the client knows when it frees: closing a hop wakes the sessions waiting
for its server at once, where otherwise they ask again on a timer.

Two waiting sessions can hold what the other waits for (each kept its other hops): neither would ever get its
room. The rule that breaks such cycles is wound-wait's: a waiting session gives up its hops on a server that an
older waiting session waits for (closing them frees the room, and it rebuilds them from their kept inputs when it
goes on, as after a failure). Only the younger gives way, so the oldest waiting session is never blocked by
another waiting one. Idle sessions (kept open between uses, as a conversation for its next turn:
`DistributedModel.open_session` outside `use_session`; or not stepped for `SwarmClient.room_hold_s`, as one waiting
for its user inside a `with` block) give up what any waiting session waits for, as they may never step again;
running sessions give up nothing, as their steps go on and they end.

Sessions of other clients can close such a cycle too, and no client sees the others' waits: a session that has
waited for room for `SwarmClient.room_hold_s` (10 s) lets all its other servers go as well, so the room it held
serves whoever waits for it, and the first of a cycle's sessions to wait that long breaks it.

A server admits a bounded number of sessions from one peer (it announces how many; its share of the cache for a
peer is learned from its refusal): where this client holds that many, its next session waits here for one of them
to close (`SessionPlaces`), in turn, instead of being refused.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import weakref
from collections.abc import Callable, Mapping, Sequence, Set
from typing import Protocol


class Waiting(Protocol):
    """A session that may wait for room: its age (lower is older), whether it is idle, and what it holds."""

    age: int
    batch_size: int | None

    @property
    def idle(self) -> bool:
        """Open, and kept between uses or unused for a while."""

    def holding(self) -> set[str]:
        """The servers of its open hops."""

    def loads(self) -> set[str]:
        """The servers its steps load (open hops, and a chain being opened)."""

    async def give_up(self, peer_id: str) -> None:
        """Close its hops on `peer_id`, to rebuild them when it next steps."""


_ages = itertools.count()
LEARNED_S = 60.0  # how long a limit learned from a server's refusal holds (`SessionPlaces.refused`)


def next_age() -> int:
    """A new session's age: sessions opened later are younger."""
    return next(_ages)


def give_ups(
    waiting: Mapping[int, str], holding: Mapping[int, Set[str]], idle: Set[int] = frozenset()
) -> dict[int, set[str]]:
    """For waiting sessions (age -> the server each waits for), the servers each session holds (by age) and the
    idle ones: the servers each gives up. A waiting session gives up those an older waiting one waits for, an idle
    one those any waiting one waits for."""
    out: dict[int, set[str]] = {}
    for age, held in holding.items():
        if age in waiting:
            wanted = {peer for older, peer in waiting.items() if older < age}
        elif age in idle:
            wanted = set(waiting.values())
        else:
            continue
        if lost := wanted & set(held):
            out[age] = lost
    return out


class RoomBoard:
    """This client's sessions and their waits for room (on its event loop): wakes them when it closes a session on
    their server, and has the sessions that should give way (`give_ups`) give up what they wait for."""

    def __init__(self) -> None:
        self._sessions: weakref.WeakValueDictionary[int, Waiting] = weakref.WeakValueDictionary()  # by age
        self._waiting: dict[int, tuple[Waiting, str]] = {}  # age -> the session, the server it waits for
        self._closings: dict[str, int] = {}  # peer id -> sessions this client closed there
        self._closed: dict[str, asyncio.Future[None]] = {}  # peer id -> the next closing there

    def track(self, session: Waiting) -> None:
        """A session of this client (forgotten once nothing else refers to it)."""
        self._sessions[session.age] = session

    def rows(self) -> dict[str, int]:
        """Peer id -> rows of this client's sessions there (open, or being opened): what of a server's announced
        load is this client's own (`SwarmClient.load`)."""
        rows: dict[str, int] = {}
        for session in list(self._sessions.values()):
            for peer in session.loads():
                rows[peer] = rows.get(peer, 0) + (session.batch_size or 0)
        return rows

    async def wants(self, session: Waiting, peer_id: str) -> None:
        """`session` waits for room on `peer_id` (until `done`): the sessions that should give way give up what
        the waiting ones wait for."""
        self.track(session)
        self._waiting[session.age] = (session, peer_id)
        sessions = dict(self._sessions)
        waiting = {age: peer for age, (_, peer) in self._waiting.items()}
        idle = {age for age, s in sessions.items() if age not in waiting and s.idle}
        holding = {age: s.holding() for age, s in sessions.items() if age in waiting or age in idle}
        for age, peers in give_ups(waiting, holding, idle).items():
            if age in idle and not sessions[age].idle:
                continue  # used again while others gave up theirs
            for peer in sorted(peers):
                await sessions[age].give_up(peer)

    def done(self, session: Waiting) -> None:
        """`session` waits no more (it got its room, or gave up)."""
        self._waiting.pop(session.age, None)

    def closings(self, peer_id: str) -> int:
        """How many sessions this client has closed on `peer_id` so far."""
        return self._closings.get(peer_id, 0)

    def closed(self, peer_id: str) -> None:
        """This client closed a session on `peer_id`: whoever waits for room there asks again now."""
        self._closings[peer_id] = self.closings(peer_id) + 1
        if (closed := self._closed.pop(peer_id, None)) is not None and not closed.done():
            closed.set_result(None)

    async def wait(self, peer_id: str, seen: int, timeout_s: float) -> bool:
        """Wait up to `timeout_s` until this client has closed more than `seen` sessions on `peer_id`; whether
        it has."""
        if self.closings(peer_id) > seen:
            return True
        closed = self._closed.get(peer_id)
        if closed is None or closed.done():
            closed = self._closed[peer_id] = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(closed), max(timeout_s, 0.0))
        except TimeoutError:
            return False
        return True


class SessionPlaces:
    """This client's sessions on each server (on its event loop), against how many a server lets one peer hold:
    what it announces (`ServerInfo.max_sessions_per_peer`), or what it held when the server refused it one more
    for its per-peer limits (`refused`: its open sessions or its share of the cache, which only this client's
    own sessions there use up), for LEARNED_S after. A session takes a place on every server of its chain before
    it opens there, and gives it back when its hop closes. Where this client already holds all it may, the
    session waits here for one of its own to close, rather than be refused, ask for room and open again
    (`swarm.LoadShed`): a client running more sessions than a server admits from one peer (an API serving many
    users) made a storm of such tries at every closing, one of which won, and used up its request rate.

    Waiting sessions go oldest first (`next_age`; a session that replaces a hop is older than one that is new): a
    younger one never takes a place on a server of an older waiting one's chain; on other servers it may go ahead.
    Sessions of other clients are not seen here: the servers' own refusals still cover them."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._held: dict[str, int] = {}  # peer id -> places this client's sessions hold there
        # by age: the servers of a waiting session's chain, their announced limits, its answer
        self._waiting: dict[int, tuple[tuple[str, ...], dict[str, int | None], asyncio.Future[None]]] = {}
        self._learned: dict[str, tuple[int, float]] = {}  # peer id -> (sessions it admits us, until when)

    def held(self, peer_id: str) -> int:
        return self._held.get(peer_id, 0)

    def refused(self, peer_id: str, own: int = 0) -> None:
        """`peer_id` refused this client a session for its per-peer limits: for LEARNED_S it is opened no more
        sessions than this client holds there now (less `own`: places of the refused session's hops there)."""
        if (held := self.held(peer_id) - own) > 0:
            self._learned[peer_id] = (held, self.clock() + LEARNED_S)

    def limit(self, peer_id: str, announced: int | None) -> int | None:
        """The sessions `peer_id` admits this client: the lower of what it announced and what it taught."""
        if (learned := self._learned.get(peer_id)) is not None:
            if learned[1] > self.clock():
                return learned[0] if announced is None else min(learned[0], announced)
            del self._learned[peer_id]
        return announced

    def full(self, peers: Sequence[str], limits: Mapping[str, int | None]) -> list[str]:
        """Those of `peers` where one more session of this client is past the server's limit (`limits`: what they
        announce; a server twice in `peers` counts twice)."""
        want: dict[str, int] = {}
        for peer in peers:
            want[peer] = want.get(peer, 0) + 1
        return [
            p
            for p, n in want.items()
            if (limit := self.limit(p, limits.get(p))) is not None and self.held(p) + n > limit
        ]

    def take_now(self, peers: Sequence[str]) -> None:
        """Take places on `peers` whatever the limits (a session that waited its whole wait: the servers decide)."""
        for peer in peers:
            self._held[peer] = self.held(peer) + 1

    def give(self, peer_id: str) -> None:
        """A hop of this client on `peer_id` closed: its place goes to the oldest session waiting for it."""
        if (held := self.held(peer_id) - 1) > 0:
            self._held[peer_id] = held
        else:
            self._held.pop(peer_id, None)
        self._serve()

    async def take(
        self, age: int, peers: Sequence[str], limits: Mapping[str, int | None], timeout_s: float
    ) -> bool:
        """Take a place on each of `peers` for the session of `age`, in its turn; whether it got them within
        `timeout_s` (if not, it holds none and is no longer waiting)."""
        known = {p: limits.get(p) for p in peers}
        answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[age] = (tuple(peers), known, answer)
        self._serve()
        try:
            await asyncio.wait([answer], timeout=max(timeout_s, 0.0))
        except BaseException:  # cancelled: places given meanwhile go back
            self._leave(age, answer, peers)
            raise
        got = answer.done()
        if not got:
            self._leave(age, answer, peers)
        return got

    def _leave(self, age: int, answer: asyncio.Future[None], peers: Sequence[str]) -> None:
        if self._waiting.get(age, (None, None, None))[2] is answer:
            del self._waiting[age]
        if answer.done():  # (granted after all: handed back)
            for peer in peers:
                self.give(peer)
        answer.cancel()

    def _serve(self) -> None:
        """Give places to waiting sessions, oldest first; the servers of one that must wait are kept from younger
        ones (all of its servers: a place it has must not go to a younger one while it waits for the others, or
        with places coming free on each at other times it could wait for ever)."""
        kept: set[str] = set()
        for age in sorted(self._waiting):
            peers, limits, answer = self._waiting[age]
            if self.full(peers, limits) or kept & set(peers):
                kept.update(peers)
                continue
            del self._waiting[age]
            self.take_now(peers)
            answer.set_result(None)
