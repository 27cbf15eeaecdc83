"""The room this client's sessions wait for on servers, and what they give up so that no wait is for ever.

A session replacing a failed hop may find the new server without room for it (this peer's cache share or open
sessions, a full cache: `swarm.wants_room`); it waits, since other sessions end and free it. Most often that room
is held by this client's own sessions, so the client knows when it frees: closing a hop wakes the sessions waiting
for its server at once, where otherwise they ask again on a timer.

Two waiting sessions can hold what the other waits for (each kept its other hops): neither would ever get its
room. The rule that breaks such cycles is wound-wait's: a waiting session gives up its hops on a server that an
older waiting session waits for (closing them frees the room, and it rebuilds them from their kept inputs when it
goes on, as after a failure). Only the younger gives way, so the oldest waiting session is never blocked by
another waiting one; sessions that are not waiting give up nothing, as their steps go on and they end.

Sessions of other clients can close such a cycle too, and no client sees the others' waits: a session that has
waited for room for `SwarmClient.room_hold_s` (10 s) lets all its other servers go as well, so the room it held
serves whoever waits for it, and the first of a cycle's sessions to wait that long breaks it.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Set
from typing import Protocol


class Waiting(Protocol):
    """A session that may wait for room: its age (lower is older) and what it holds."""

    age: int

    def holding(self) -> set[str]:
        """The servers of its open hops."""

    async def give_up(self, peer_id: str) -> None:
        """Close its hops on `peer_id`, to rebuild them when it next steps."""


_ages = itertools.count()


def next_age() -> int:
    """A new session's age: sessions opened later are younger."""
    return next(_ages)


def give_ups(waiting: Mapping[int, str], holding: Mapping[int, Set[str]]) -> dict[int, set[str]]:
    """For waiting sessions (age -> the server each waits for) and the servers each holds: the servers each gives
    up, those that an older waiting session waits for."""
    out: dict[int, set[str]] = {}
    for age, held in holding.items():
        wanted = {peer for older, peer in waiting.items() if older < age}
        if age in waiting and (lost := wanted & set(held)):
            out[age] = lost
    return out


class RoomBoard:
    """This client's sessions waiting for room (on its event loop): wakes them when it closes a session on their
    server, and has younger waiting sessions give up what older ones wait for."""

    def __init__(self) -> None:
        self._waiting: dict[int, tuple[Waiting, str]] = {}  # age -> the session, the server it waits for
        self._closings: dict[str, int] = {}  # peer id -> sessions this client closed there
        self._closed: dict[str, asyncio.Future[None]] = {}  # peer id -> the next closing there

    async def wants(self, session: Waiting, peer_id: str) -> None:
        """`session` waits for room on `peer_id` (until `done`): the waiting sessions give up what older ones
        wait for."""
        self._waiting[session.age] = (session, peer_id)
        waiting = {age: peer for age, (_, peer) in self._waiting.items()}
        holding = {age: s.holding() for age, (s, _) in self._waiting.items()}
        for age, peers in give_ups(waiting, holding).items():
            for peer in sorted(peers):
                await self._waiting[age][0].give_up(peer)

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
