"""The `room` queries waiting on a server, answered first come, first served.

A client refused room (`quota` for its peer's sessions or share, `cache_full`) asks `room` and opens again when it
is told room came free. Telling every waiting query at once when one session ends would make them all open at
once: one gets the room, the others are refused again and pause, and whoever asks last may get it first. So the
queries wait in the order they came: when room comes free, the earliest query that it fits is told, and it holds
that room for `promise_s` (or until its peer opens a session here): the queries after it are considered only then,
and another peer's opening that would leave too little of it is refused (`held`). Only a query that waited is
promised room: one that finds room when it comes is told so and holds nothing, so that asking is no way to hold
room from others.
A query that no closing can answer (more than a peer's share, the server leaving) is answered at once, and one
that waited its whole wait is answered with what is true then. Waiting queries are bounded, per peer and in all:
past the bounds, a query is answered at once.

A wait is bounded (`max_room_wait_s`, 2 s), and a client waits longer by asking again. So that asking again does
not put it behind everyone who came since, a query whose wait ended keeps its place for `promise_s`: the peer's
next query of the same size takes it. Room that comes free for a kept place is promised to its peer, whose next
query is told at once (or whose opening takes it).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass

# why a session like a query's could not be opened now ("" if it could), and whether no closing changes that
LacksRoom = Callable[[str, int, int], tuple[str, bool]]


@dataclass(eq=False)
class _Query:
    peer: str
    batch_size: int
    max_length: int
    answer: asyncio.Future[str] | None  # None: nobody waits on it, its place is kept until `kept_until`
    kept_until: float = math.inf  # (the loop's time)

    def same(self, peer: str, batch_size: int, max_length: int) -> bool:
        return (self.peer, self.batch_size, self.max_length) == (peer, batch_size, max_length)


class RoomQueue:
    """The waiting `room` queries of one server (on its event loop), in the order they came."""

    def __init__(
        self, lacks_room: LacksRoom, promise_s: float = 1.0, max_per_peer: int = 4, max_total: int = 256
    ):
        self.lacks_room = lacks_room
        self.promise_s = promise_s
        self.max_per_peer, self.max_total = max_per_peer, max_total
        self._queries: list[_Query] = []  # waiting, and kept places, in the order they came
        self._promised: _Query | None = None  # told room: its peer holds it until it opens or the timer ends
        self._untold = False  # the promise went to a kept place: the peer's next query is told at once
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        """The queries waiting (not the places kept)."""
        return sum(q.answer is not None for q in self._queries)

    def held(self, peer: str) -> tuple[int, int] | None:
        """The batch size and length of the session that room here is promised to, if to another peer than
        `peer`: an opening of `peer` that would leave too little for it waits its turn."""
        promised = self._promised
        if promised is None or promised.peer == peer:
            return None
        return promised.batch_size, promised.max_length

    async def ask(self, peer: str, batch_size: int, max_length: int, wait_s: float) -> str:
        """Why `peer` could not open a session of `batch_size` x `max_length` ("" once it can), told when room
        comes free for it in its turn, or after `wait_s` (then: what is true at that moment); at once past the
        bounds on waiting queries."""
        loop = asyncio.get_running_loop()
        self._serve()  # (what is owed to the queries before it first)
        promised = self._promised
        if self._untold and promised is not None and promised.same(peer, batch_size, max_length):
            self._untold = False  # room came for its kept place: it is this query's
            if not (why := self.lacks_room(peer, batch_size, max_length)[0]):
                return why
        why, final = self.lacks_room(peer, batch_size, max_length)
        if final or (not why and promised is None):
            # no closing helps, or room now that nobody waiting is owed: told at once, and held for nobody (it
            # did not wait for it)
            return why
        query = self._kept(peer, batch_size, max_length)
        if query is None:
            if len(self._queries) >= self.max_total or (
                sum(q.peer == peer for q in self._queries) >= self.max_per_peer
            ):
                return why  # past the bounds on waiting queries
            query = _Query(peer, batch_size, max_length, None)
            self._queries.append(query)
        answer: asyncio.Future[str] = loop.create_future()
        query.answer, query.kept_until = answer, math.inf
        why = ""
        try:
            if wait_s > 0:
                try:
                    await asyncio.wait_for(asyncio.shield(answer), wait_s)
                except TimeoutError:
                    pass
            if answer.done():
                return answer.result()
            why = self.lacks_room(peer, batch_size, max_length)[0]
            return why
        finally:
            if query in self._queries:
                if why and wait_s > 0:  # it waited its whole wait: its place is kept for its next query
                    query.answer, query.kept_until = None, loop.time() + self.promise_s
                else:
                    self._queries.remove(query)

    def changed(self) -> None:
        """Room came free here (a session ended, its cache is back) or the server began to leave."""
        self._serve()

    def opened(self, peer: str, batch_size: int, max_length: int) -> None:
        """`peer` opened such a session here: room promised to it is taken, and a place it kept is not needed."""
        if (kept := self._kept(peer, batch_size, max_length)) is not None:
            self._queries.remove(kept)
        if self._promised is not None and self._promised.peer == peer:
            self._expire()
        else:
            self._serve()

    def _serve(self) -> None:
        """In order: answer the queries that no closing can help, and, unless room is promised to a peer, tell the
        earliest query that has room (or, for a kept place, its peer's next query) and promise that room to it."""
        self._forget_lapsed(asyncio.get_running_loop().time())
        for query in list(self._queries):
            why, final = self.lacks_room(query.peer, query.batch_size, query.max_length)
            if final:
                self._answer(query, why)
            elif not why and self._promised is None:
                self._answer(query, "")
                self._promise(query)

    def _kept(self, peer: str, batch_size: int, max_length: int) -> _Query | None:
        """The earliest place kept for a query like this one."""
        return next(
            (q for q in self._queries if q.answer is None and q.same(peer, batch_size, max_length)), None
        )

    def _forget_lapsed(self, now: float) -> None:
        self._queries = [q for q in self._queries if q.kept_until > now]

    def _answer(self, query: _Query, why: str) -> None:
        self._queries.remove(query)
        if query.answer is not None and not query.answer.done():
            query.answer.set_result(why)

    def _promise(self, query: _Query) -> None:
        """Hold the room told to `query`'s peer for `promise_s`: the next query is considered when it opens, or
        then."""
        self._promised, self._untold = query, query.answer is None
        self._timer = asyncio.get_running_loop().call_later(self.promise_s, self._expire)

    def _expire(self) -> None:
        """The promise is kept or over: the queries after it are considered."""
        if self._timer is not None:
            self._timer.cancel()
        self._promised = self._timer = None
        self._untold = False
        self._serve()
