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
"""

from __future__ import annotations

import asyncio
import itertools
import weakref
from collections.abc import Mapping, Set
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
