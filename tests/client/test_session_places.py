"""A client's places on servers (`client.room.SessionPlaces`): it opens at most as many sessions on a server as
the server admits from one peer, its sessions waiting their turn locally, oldest first."""

import asyncio
import random

import pytest
from clocks import Clock

from swarmllm.client.room import LEARNED_S, SessionPlaces


def _run(coro):
    return asyncio.run(coro)


def test_places_go_at_once_below_the_limit_and_a_server_without_one_is_never_full():
    async def main():
        places = SessionPlaces()
        limits = {"a": 2, "b": None}
        assert await places.take(0, ["a", "b"], limits, 0.0)
        assert await places.take(1, ["a", "b"], limits, 0.0)
        assert places.full(["a", "b"], limits) == ["a"]
        assert places.held("a") == 2 and places.held("b") == 2
        assert places.full(["b"], limits) == [] and places.full(["a", "a"], {"a": 3}) == ["a"]

    _run(main())


def test_a_session_past_the_limit_waits_for_a_place_and_gets_it_when_one_closes():
    async def main():
        places = SessionPlaces()
        assert await places.take(0, ["a"], {"a": 1}, 0.0)
        waiting = asyncio.ensure_future(places.take(1, ["a"], {"a": 1}, 30.0))
        await asyncio.sleep(0)  # (a scheduling yield: it starts and waits)
        assert not waiting.done()
        places.give("a")
        assert await waiting and places.held("a") == 1

    _run(main())


def test_a_wait_that_times_out_holds_nothing_and_waits_no_more():
    async def main():
        places = SessionPlaces()
        assert await places.take(0, ["a"], {"a": 1}, 0.0)
        assert not await places.take(1, ["a", "b"], {"a": 1, "b": 1}, 0.05)
        assert places.held("b") == 0
        places.give("a")  # nobody waits: the place stays free
        assert places.held("a") == 0
        assert await places.take(2, ["a"], {"a": 1}, 0.0)

    _run(main())


def test_the_oldest_waiting_session_goes_first_and_younger_ones_go_ahead_only_elsewhere():
    """Sessions 5 and 3 wait for server a (5 asked first): a's place goes to 3, the older. Session 6 wants only b,
    which no waiting session's chain has: it goes at once."""

    async def main():
        places = SessionPlaces()
        limits = {"a": 1, "b": 2}
        assert await places.take(0, ["a"], limits, 0.0)
        young = asyncio.ensure_future(places.take(5, ["a"], limits, 30.0))
        await asyncio.sleep(0)  # (a scheduling yield: it starts and waits)
        old = asyncio.ensure_future(places.take(3, ["a"], limits, 30.0))
        await asyncio.sleep(0)
        assert await places.take(6, ["b"], limits, 0.0)
        places.give("a")
        assert await old and not young.done()
        places.give("a")
        assert await young

    _run(main())


def test_a_younger_session_does_not_take_a_place_an_older_one_waits_for_while_it_waits_elsewhere():
    """Session 1 waits for a and b (b full); a place on a comes free: session 2, younger, wanting only a, does not
    take it (it is kept for 1, else 1 could wait for ever behind younger sessions); once b frees, 1 goes, then 2
    once a frees again."""

    async def main():
        places = SessionPlaces()
        limits = {"a": 1, "b": 1}
        assert await places.take(0, ["a"], limits, 0.0)
        assert await places.take(0, ["b"], limits, 0.0)
        first = asyncio.ensure_future(places.take(1, ["a", "b"], limits, 30.0))
        await asyncio.sleep(0)
        places.give("a")
        second = asyncio.ensure_future(places.take(2, ["a"], limits, 30.0))
        await asyncio.sleep(0.05)
        assert not second.done() and places.held("a") == 0
        places.give("b")
        assert await first and places.held("a") == 1 and places.held("b") == 1
        places.give("a")
        assert await second

    _run(main())


def test_a_cancelled_wait_gives_back_what_it_was_given():
    async def main():
        places = SessionPlaces()
        assert await places.take(0, ["a"], {"a": 1}, 0.0)
        waiting = asyncio.ensure_future(places.take(1, ["a"], {"a": 1}, 30.0))
        await asyncio.sleep(0)
        places.give("a")  # granted, but its task has not run yet
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert places.held("a") == 0

    _run(main())


def test_places_never_pass_the_limits_and_every_waiting_session_waits_for_a_reason():
    """Random takes, gives and timeouts over three servers: after every operation, no server holds more than its
    limit, and each waiting session lacks a place or waits behind an older waiting session of the same server
    (brute force over the waiting sessions, oldest first)."""

    async def main(seed: int):
        rng = random.Random(seed)
        places, limits = SessionPlaces(), {"a": 1, "b": 2, "c": None}
        granted: list[list[str]] = []
        tasks: dict[int, tuple[asyncio.Future, list[str]]] = {}
        for age in range(60):
            if rng.random() < 0.55 or not granted:
                peers = rng.sample(["a", "b", "c"], rng.randint(1, 2))
                tasks[age] = (asyncio.ensure_future(places.take(age, peers, limits, 30.0)), peers)
            else:
                for peer in granted.pop(rng.randrange(len(granted))):
                    places.give(peer)
            for _ in range(5):  # (scheduling yields: granted sessions' tasks resume)
                await asyncio.sleep(0)
            done = {key: tasks.pop(key) for key in [k for k, (task, _) in tasks.items() if task.done()]}
            for key, (task, peers) in done.items():
                assert task.result()
                granted.append(peers)
                # no older session still waits on its servers (it waited when this one went)
                assert not any(older < key and set(p) & set(peers) for older, (_, p) in tasks.items())
            for peer in ("a", "b"):
                assert places.held(peer) <= limits[peer]
            kept: set[str] = set()
            for key in sorted(tasks):
                peers = set(tasks[key][1])
                assert places.full(tasks[key][1], limits) or kept & peers, f"session {key} waits for nothing"
                kept |= peers
        for task, _ in tasks.values():
            task.cancel()

    for seed in range(20):
        _run(main(seed))


def test_a_refusal_teaches_a_limit_for_a_while():
    """Refused with 3 places held (1 of them the refused session's own): 2 sessions for LEARNED_S, the lower of
    that and an announced limit; afterwards the announced one again. With nothing else held, nothing is learned
    (a session refused alone says nothing of how many fit)."""

    async def main():
        clock = Clock(100.0)
        places = SessionPlaces(clock)
        places.take_now(["a", "a", "a"])
        places.refused("a", own=1)
        assert places.limit("a", None) == 2 and places.limit("a", 1) == 1 and places.limit("a", 5) == 2
        assert places.full(["a"], {}) == ["a"]
        clock.now += LEARNED_S
        assert places.limit("a", None) is None and places.limit("a", 5) == 5
        places.take_now(["b"])
        places.refused("b", own=1)
        assert places.limit("b", None) is None

    _run(main())


def test_a_session_waiting_for_a_learned_limit_goes_when_one_of_its_clients_sessions_closes():
    async def main():
        places = SessionPlaces()
        assert await places.take(0, ["a"], {}, 0.0) and await places.take(1, ["a"], {}, 0.0)
        places.refused("a")  # (a third was refused)
        waiting = asyncio.ensure_future(places.take(2, ["a"], {}, 30.0))
        await asyncio.sleep(0)
        assert not waiting.done()
        places.give("a")
        assert await waiting and places.held("a") == 2

    _run(main())
