"""The room board (`client.room`): closing a session wakes this client's waits for room on its server, and a
waiting session gives up what an older waiting session waits for, so waits never form a cycle."""

import asyncio
import itertools
import random

from swarmllm.client.room import RoomBoard, give_ups


def _cycle(edges: dict[int, set[int]]) -> bool:
    """Whether the directed graph `edges` (node -> nodes it points to) has a cycle (brute force: a walk of more
    steps than nodes from any node)."""
    nodes = set(edges) | {b for bs in edges.values() for b in bs}
    frontier = {(n, n) for n in nodes}  # (start, where the walk is)
    for _ in range(len(nodes)):
        frontier = {(s, b) for s, a in frontier for b in edges.get(a, ())}
    return bool(frontier)


def _waits_for(waiting: dict[int, str], holding: dict[int, set[str]]) -> dict[int, set[int]]:
    """Which waiting sessions each waiting one waits for: those holding the server it wants."""
    return {w: {o for o in waiting if o != w and peer in holding[o]} for w, peer in waiting.items()}


def test_give_ups_leave_no_cycle_and_take_only_what_an_older_waiter_wants():
    """Random boards of up to 6 sessions over 4 servers, many with cycles of waits: after the give-ups, a waiting
    session waits only for older waiting ones (so there is no cycle, and the oldest waits for none), only waiting
    sessions give anything up, and only servers an older waiting session wants, each by every younger holder."""
    rng = random.Random(0)
    servers = ["a", "b", "c", "d"]
    cycles_broken = 0
    for _ in range(3000):
        n = rng.randint(1, 6)
        holding = {age: set(rng.sample(servers, rng.randint(0, 3))) for age in range(n)}
        waiting = {age: rng.choice(servers) for age in range(n) if rng.random() < 0.6}
        before = _waits_for(waiting, holding)
        out = give_ups(waiting, holding)
        after_holding = {age: held - out.get(age, set()) for age, held in holding.items()}
        after = _waits_for(waiting, after_holding)
        assert not _cycle(after)
        cycles_broken += _cycle(before)
        assert all(o < w for w, os in after.items() for o in os)  # only on older ones
        if waiting:
            assert not after[min(waiting)]
        for age, lost in out.items():
            assert age in waiting and lost <= holding[age]
            assert all(any(o < age and waiting[o] == peer for o in waiting) for peer in lost)
        # and nothing more than that: a server an older waiter wants is given up by every younger waiter
        for w, o in itertools.permutations(waiting, 2):
            if w < o and waiting[w] in holding[o]:
                assert waiting[w] in out[o]
    assert cycles_broken > 100  # the boards held cycles to break


class _Session:
    def __init__(self, age: int, holding: set[str]):
        self.age, self.held, self.given_up = age, holding, []

    def holding(self) -> set[str]:
        return set(self.held)

    async def give_up(self, peer_id: str) -> None:
        self.given_up.append(peer_id)
        self.held.discard(peer_id)


def test_a_younger_waiting_session_gives_up_what_an_older_one_waits_for_and_others_keep_theirs():
    async def main() -> None:
        board = RoomBoard()
        older, younger, busy = _Session(1, {"x"}), _Session(2, {"y", "z"}), _Session(3, {"y"})
        await board.wants(older, "y")  # the younger one does not wait yet: nothing is given up
        assert younger.given_up == [] and busy.given_up == []
        await board.wants(younger, "x")  # now both wait: the younger gives way, the older keeps x
        assert younger.given_up == ["y"] and older.given_up == [] and busy.given_up == []
        board.done(older)
        board.done(younger)
        await board.wants(younger, "x")  # the older one got its room: nobody gives anything up
        assert younger.given_up == ["y"]

    asyncio.run(main())


def test_a_closing_wakes_the_waits_for_its_server_only_and_one_that_came_first_is_not_missed():
    async def main() -> None:
        board = RoomBoard()
        seen = board.closings("p")
        wait_p = asyncio.ensure_future(board.wait("p", seen, 30))
        wait_q = asyncio.ensure_future(board.wait("q", board.closings("q"), 0.2))
        await asyncio.sleep(0)
        board.closed("p")
        assert await asyncio.wait_for(wait_p, 5) is True
        assert await wait_q is False  # (its own timeout)
        assert await asyncio.wait_for(board.wait("p", seen, 30), 5) is True  # closed since `seen`: at once

    asyncio.run(main())
