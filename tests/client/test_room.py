"""The room board (`client.room`): closing a session wakes this client's waits for room on its server, and a
waiting session gives up what an older waiting session waits for, so waits never form a cycle; and a server's word
that it has room (`LoadShed`) never makes a spin."""

import asyncio
import itertools
import random

from swarmllm.client.room import RoomBoard, give_ups
from swarmllm.client.routing import Hop
from swarmllm.client.swarm import LoadShed
from swarmllm.wire import RemoteError


def _cycle(edges: dict[int, set[int]]) -> bool:
    """Whether the directed graph `edges` (node -> nodes it points to) has a cycle (brute force: a walk of more
    steps than nodes from any node)."""
    nodes = set(edges) | {b for bs in edges.values() for b in bs}
    frontier = {(n, n) for n in nodes}  # (start, where the walk is)
    for _ in range(len(nodes)):
        frontier = {(s, b) for s, a in frontier for b in edges.get(a, ())}
    return bool(frontier)


def _waits_for(waiting: dict[int, str], holding: dict[int, set[str]]) -> dict[int, set[int]]:
    """Which sessions each waiting one waits for: those holding the server it wants."""
    return {w: {o for o in holding if o != w and peer in holding[o]} for w, peer in waiting.items()}


def test_give_ups_leave_no_cycle_of_waits_and_take_only_what_should_be_given():
    """Random boards of up to 6 sessions over 4 servers, some waiting, some idle (kept between uses), the rest
    running, many with cycles of waits: after the give-ups, a waiting session waits only for older waiting ones
    and running ones (so no cycle among waits, and the oldest waiting session waits for no waiting or idle one);
    running sessions give up nothing, a waiting one only what an older waiting one wants, an idle one only what
    any waiting one wants, and each such server is given up by every holder that should give it."""
    rng = random.Random(0)
    servers = ["a", "b", "c", "d"]
    cycles_broken = 0
    for _ in range(3000):
        n = rng.randint(1, 6)
        holding = {age: set(rng.sample(servers, rng.randint(0, 3))) for age in range(n)}
        waiting = {age: rng.choice(servers) for age in range(n) if rng.random() < 0.5}
        idle = {age for age in range(n) if age not in waiting and rng.random() < 0.5}
        before = _waits_for(waiting, {a: h for a, h in holding.items() if a in waiting})
        out = give_ups(waiting, holding, idle)
        after_holding = {age: held - out.get(age, set()) for age, held in holding.items()}
        after = _waits_for(waiting, after_holding)
        on_waits = {w: {o for o in os if o in waiting} for w, os in after.items()}
        assert not _cycle(on_waits)
        cycles_broken += _cycle(before)
        running = set(holding) - waiting.keys() - idle
        assert all((o in waiting and o < w) or o in running for w, os in after.items() for o in os)
        if waiting:
            assert not after[min(waiting)] & (waiting.keys() | idle)
        for age, lost in out.items():
            assert (age in waiting or age in idle) and lost <= holding[age]
            wanted = {waiting[o] for o in waiting if o < age or age in idle}
            assert lost <= wanted
        # and nothing less: each holder that should give a wanted server up does
        for w, o in itertools.permutations(range(n), 2):
            if w in waiting and waiting[w] in holding[o] and (o in idle or (o in waiting and w < o)):
                assert waiting[w] in out[o]
    assert cycles_broken > 100  # the boards held cycles to break


class _Session:
    def __init__(self, age: int, holding: set[str], idle: bool = False, batch_size: int = 1):
        self.age, self.held, self.idle, self.given_up = age, holding, idle, []
        self.batch_size, self.opening = batch_size, set()

    def holding(self) -> set[str]:
        return set(self.held)

    def loads(self) -> set[str]:
        return self.holding() | self.opening

    async def give_up(self, peer_id: str) -> None:
        self.given_up.append(peer_id)
        self.held.discard(peer_id)


def test_a_younger_waiting_session_and_idle_ones_give_up_what_is_waited_for_and_running_ones_keep_theirs():
    async def main() -> None:
        board = RoomBoard()
        older, younger, busy = _Session(1, {"x"}), _Session(2, {"y", "z"}), _Session(3, {"y"})
        kept, oldest_kept = _Session(4, {"y", "x"}, idle=True), _Session(0, {"z"}, idle=True)
        for session in (older, younger, busy, kept, oldest_kept):
            board.track(session)
        await board.wants(older, "y")  # the younger one does not wait yet: only the idle one gives y up
        assert (younger.given_up, busy.given_up, kept.given_up) == ([], [], ["y"])
        await board.wants(younger, "x")  # now both wait: the younger gives way, the older keeps x
        assert (younger.given_up, older.given_up, busy.given_up) == (["y"], [], [])
        assert kept.given_up == ["y", "x"] and oldest_kept.given_up == []  # z: nobody waits for it
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


def test_a_server_that_says_it_has_room_yet_refuses_it_is_asked_after_pauses_not_in_a_spin():
    """A replacement refused room asks the server (`room`) and opens again as soon as it says there is room. One
    whose word is followed by another refusal (others took the room first, or its answer and its openings
    disagree) must not make the client ask and open in a tight loop: its later answers are followed by the
    pauses (50 ms, doubling), so in 1.2 s it is asked about 5 times, not thousands."""

    async def go() -> tuple[int, int, float]:
        asked = 0

        async def says_room(hop: Hop, wait_s: float) -> bool:
            nonlocal asked
            asked += 1
            return True

        shed = LoadShed(60.0, RoomBoard(), says_room)
        hop, refusal = Hop("B", 0, 4), RemoteError("cache_full", "the cache has 0 of 64 tokens free")
        loop = asyncio.get_running_loop()
        began, tries = loop.time(), 0
        assert shed.defer_for_room("B", refusal)
        await shed.wait([hop])  # its first word is taken: no pause
        first = loop.time() - began
        while loop.time() - began < 1.2:
            assert shed.defer_for_room("B", refusal)  # the opening was refused again
            await shed.wait([hop])
            tries += 1
        return asked, tries, first

    asked, tries, first = asyncio.run(go())
    assert first < 0.05 and 3 <= tries <= 8 and asked == tries + 1, (asked, tries, first)


def test_the_rows_of_its_sessions_count_on_their_servers_from_their_routing():
    board = RoomBoard()
    sessions = [
        _Session(0, {"x", "y"}),
        _Session(1, {"x"}, batch_size=4),
        _Session(
            2, {"y"}, idle=True, batch_size=8
        ),  # kept for a conversation's next turn: its server announces
        _Session(3, set()),  # not routed yet (or its hops given up)
    ]
    list(map(board.track, sessions))  # (no name left holding the last one)
    assert board.rows() == {"x": 5, "y": 9}
    sessions[3].opening = {"z"}  # routed to z, its opening not answered yet: z counts it already
    assert board.rows() == {"x": 5, "y": 9, "z": 1}
    del sessions[1:]  # ended and dropped: the board forgets them
    assert board.rows() == {"x": 1, "y": 1}
