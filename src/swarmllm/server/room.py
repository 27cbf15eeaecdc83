"""The `room` queries waiting on a server, answered first come, first served.

A client refused room (`quota` for its peer's sessions or share, `cache_full`) asks `room` and opens again when it
is told room came free. Telling every waiting query at once when one session ends would make them all open at
once: one gets the room, the others are refused again and pause, and whoever asks last may get it first. So the
queries wait in the order they came: when room comes free, the earliest query that it fits is told, and it holds
that room for `promise_s` (or until its peer opens a session here): the queries after it are considered only then.
A query that no closing can answer (more than a peer's share, the server leaving) is answered at once, and one
that waited its whole wait is answered with what is true then. Waiting queries are bounded, per peer and in all:
past the bounds, a query is answered at once.

Openings do not look at the queue: a peer that did not wait may take the room first (then the peer told is refused
and asks again), as a server of an older version would let it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

# why a session like a query's could not be opened now ("" if it could), and whether no closing changes that
LacksRoom = Callable[[str, int, int], tuple[str, bool]]


@dataclass(eq=False)
class _Query:
    peer: str
    batch_size: int
    max_length: int
    answer: asyncio.Future[str] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class RoomQueue:
    """The waiting `room` queries of one server (on its event loop), in the order they came."""

    def __init__(
        self, lacks_room: LacksRoom, promise_s: float = 1.0, max_per_peer: int = 4, max_total: int = 256
    ):
        self.lacks_room = lacks_room
        self.promise_s = promise_s
        self.max_per_peer, self.max_total = max_per_peer, max_total
        self._queries: list[_Query] = []
        self._promised: str | None = None  # the peer told room: it holds it until it opens or the timer ends
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._queries)

    async def ask(self, peer: str, batch_size: int, max_length: int, wait_s: float) -> str:
        """Why `peer` could not open a session of `batch_size` x `max_length` ("" once it can), told when room
        comes free for it in its turn, or after `wait_s` (then: what is true at that moment); at once past the
        bounds on waiting queries."""
        if len(self._queries) >= self.max_total or (
            sum(q.peer == peer for q in self._queries) >= self.max_per_peer
        ):
            wait_s = 0.0
        query = _Query(peer, batch_size, max_length)
        self._queries.append(query)
        try:
            self._serve()
            if not query.answer.done() and wait_s > 0:
                try:
                    await asyncio.wait_for(asyncio.shield(query.answer), wait_s)
                except TimeoutError:
                    pass
            if query.answer.done():
                return query.answer.result()
            return self.lacks_room(peer, batch_size, max_length)[0]
        finally:
            if query in self._queries:
                self._queries.remove(query)

    def changed(self) -> None:
        """Room came free here (a session ended, its cache is back) or the server began to leave."""
        self._serve()

    def opened(self, peer: str) -> None:
        """`peer` opened a session here: room promised to it is taken."""
        if self._promised == peer:
            self._expire()
        else:
            self._serve()

    def _serve(self) -> None:
        """In order: answer the queries that no closing can help, and, unless room is promised to a peer, tell the
        earliest query that has room and promise that room to its peer."""
        for query in list(self._queries):
            why, final = self.lacks_room(query.peer, query.batch_size, query.max_length)
            if final:
                self._answer(query, why)
            elif not why and self._promised is None:
                self._answer(query, "")
                self._promise(query.peer)

    def _answer(self, query: _Query, why: str) -> None:
        self._queries.remove(query)
        if not query.answer.done():
            query.answer.set_result(why)

    def _promise(self, peer: str) -> None:
        """Hold the room told to `peer` for `promise_s`: the next query is considered when it opens, or then."""
        self._promised = peer
        self._timer = asyncio.get_running_loop().call_later(self.promise_s, self._expire)

    def _expire(self) -> None:
        """The promise is kept or over: the queries after it are considered."""
        if self._timer is not None:
            self._timer.cancel()
        self._promised = self._timer = None
        self._serve()
