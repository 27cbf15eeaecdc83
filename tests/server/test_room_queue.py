"""The server's queue of `room` queries (`server.room`), alone: told in the order they came, one at a time while
the room told is promised, the others at once when no closing can help them or when their wait ends."""

import asyncio

import pytest

from swarmllm.server.room import RoomQueue


class Room:
    """A server's room as `lacks_room` sees it: whole sessions free, peers at their own limit, and peers whose
    request could never fit."""

    def __init__(self, free: int = 0):
        self.free = free
        self.at_limit: set[str] = set()
        self.never: set[str] = set()

    def lacks(self, peer: str, batch_size: int, max_length: int) -> tuple[str, bool]:
        if peer in self.never:
            return "more than a share", True
        if peer in self.at_limit:
            return "its limit", False
        return ("" if self.free >= batch_size else "full"), False


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_one_query_is_told_per_room_in_the_order_they_came():
    room = Room()
    queue = RoomQueue(room.lacks, promise_s=30.0)
    asks = {p: asyncio.ensure_future(queue.ask(p, 1, 8, 30.0)) for p in "abc"}
    await settle()
    assert len(queue) == 3 and not any(a.done() for a in asks.values())
    room.free = 1
    queue.changed()
    await settle()
    assert asks["a"].result() == "" and not asks["b"].done() and not asks["c"].done()
    room.free += 1  # more room, but the room told to a is promised to it until it opens
    queue.changed()
    await settle()
    assert not asks["b"].done()
    room.free -= 1
    queue.opened("a", 1, 8)  # a took its room; b's turn, for the room still free
    await settle()
    assert asks["b"].result() == "" and not asks["c"].done()
    room.free -= 1
    queue.opened("b", 1, 8)
    await settle()
    assert not asks["c"].done() and len(queue) == 1
    asks["c"].cancel()
    await settle()
    assert len(queue) == 0


async def test_a_promise_unused_runs_out_and_the_next_query_is_told():
    room = Room()
    queue = RoomQueue(room.lacks, promise_s=0.05)
    first = asyncio.ensure_future(queue.ask("a", 1, 8, 30.0))
    second = asyncio.ensure_future(queue.ask("b", 1, 8, 30.0))
    await settle()
    room.free = 1
    queue.changed()
    assert queue.held("b") == (1, 8)  # a is told, the room promised to it (read before the loop runs again)
    assert await first == ""
    async with asyncio.timeout(5):  # a never opens: once its promise ends, b is told of the same room
        assert await second == ""


async def test_a_query_held_back_by_its_own_peers_limit_does_not_hold_up_the_next():
    room = Room(free=1)
    room.at_limit.add("a")
    queue = RoomQueue(room.lacks)
    first = asyncio.ensure_future(queue.ask("a", 1, 8, 30.0))
    async with asyncio.timeout(5):
        assert await queue.ask("b", 1, 8, 30.0) == ""  # the room fits b: told at once, past a
    assert not first.done()
    first.cancel()


async def test_what_no_closing_helps_is_told_at_once_even_under_a_promise():
    room = Room()
    queue = RoomQueue(room.lacks, promise_s=30.0)
    first = asyncio.ensure_future(queue.ask("a", 1, 8, 30.0))
    await settle()
    room.free = 1
    queue.changed()
    assert await first == "" and queue.held("b") == (1, 8)  # a waited: the room is promised to it
    room.never.add("b")
    async with asyncio.timeout(5):
        assert await queue.ask("b", 1, 8, 30.0) == "more than a share"


@pytest.mark.parametrize("wait_s", [0.0, 0.05])
async def test_a_query_whose_wait_ends_is_told_what_is_true_then(wait_s):
    room = Room()
    queue = RoomQueue(room.lacks, promise_s=30.0)
    assert await queue.ask("a", 1, 8, wait_s) == "full"
    assert len(queue) == 0
    room.free = 1
    assert await queue.ask("b", 1, 8, wait_s) == ""  # room: told at once


async def test_a_query_that_finds_room_is_told_at_once_and_holds_nothing():
    """Only waiting earns a promise: otherwise a peer could hold room from others' openings just by asking."""
    room = Room(free=1)
    queue = RoomQueue(room.lacks, promise_s=30.0)
    async with asyncio.timeout(5):
        assert await queue.ask("a", 1, 8, 30.0) == ""
        assert queue.held("b") is None and len(queue) == 0
        assert await queue.ask("b", 1, 8, 30.0) == ""  # the same room, for the one that opens first


async def test_a_query_whose_wait_ended_keeps_its_place_for_its_next_query():
    """A client waits longer than a server's bounded wait by asking again: it must not go behind everyone who
    came since."""
    room = Room()
    queue = RoomQueue(room.lacks, promise_s=0.5)
    assert await queue.ask("a", 1, 8, 0.01) == "full"
    later = asyncio.ensure_future(queue.ask("b", 1, 8, 30.0))
    await settle()
    again = asyncio.ensure_future(queue.ask("a", 1, 8, 30.0))  # a asks again: in its old place, before b
    await asyncio.sleep(0.6)  # past the time its place was kept for: taken again, it waits on
    assert len(queue) == 2
    room.free = 1
    queue.changed()
    assert queue.held("b") == (1, 8)  # a is told first (read before the loop runs again)
    assert await again == ""
    later.cancel()


async def test_room_for_a_kept_place_is_promised_to_its_peer_and_told_to_its_next_query():
    room = Room()
    queue = RoomQueue(room.lacks, promise_s=30.0)
    assert await queue.ask("a", 1, 8, 0.01) == "full"  # a's place is kept, nobody waiting on it
    later = asyncio.ensure_future(queue.ask("b", 1, 8, 30.0))
    await settle()
    assert len(queue) == 1
    room.free = 1
    queue.changed()
    await settle()
    assert not later.done()  # the room is a's: promised, held from other peers' openings
    assert queue.held("b") == (1, 8) and queue.held("a") is None
    async with asyncio.timeout(5):
        assert await queue.ask("a", 1, 8, 30.0) == ""  # a's next query is told at once
    assert not later.done()
    room.free = 0
    queue.opened("a", 1, 8)
    assert queue.held("b") is None and not later.done()
    later.cancel()


async def test_a_kept_place_lapses_and_an_opening_gives_it_up():
    room = Room()
    queue = RoomQueue(room.lacks, promise_s=0.05)
    assert await queue.ask("a", 1, 8, 0.01) == "full"
    later = asyncio.ensure_future(queue.ask("b", 1, 8, 30.0))
    await asyncio.sleep(0.1)  # past the 50 ms that a's place is kept
    room.free = 1
    queue.changed()
    assert queue.held("a") == (1, 8)  # b is told (read before the loop runs again)
    assert await later == ""
    queue.opened("b", 1, 8)
    room.free = 0
    # a's place kept, then a opens such a session without asking again: its place is given up
    assert await queue.ask("a", 1, 8, 0.01) == "full"
    queue.opened("a", 1, 8)
    third = asyncio.ensure_future(queue.ask("c", 1, 8, 30.0))
    await settle()
    room.free = 1
    queue.changed()
    await settle()
    assert third.result() == ""
