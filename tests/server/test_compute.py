"""The fair compute queue: one job per owner in turn, against an oracle that replays the rule by hand."""

import random
import threading

import pytest

from swarmllm.server.compute import ComputeThread, RoundRobin


def test_round_robin_matches_an_oracle():
    rng = random.Random(0)
    queue: RoundRobin[tuple[str, int]] = RoundRobin()
    pending: dict[str, list[int]] = {}  # the oracle: items per owner, and the owners' turn order
    turn: list[str] = []
    for i in range(5000):
        if rng.random() < 0.55 or not turn:
            owner = rng.choice("abcde")
            queue.push(owner, (owner, i))
            if owner not in turn:
                turn.append(owner)
            pending.setdefault(owner, []).append(i)
        else:
            owner = turn.pop(0)
            want = (owner, pending[owner].pop(0))
            if pending[owner]:
                turn.append(owner)
            assert queue.pop() == want
        assert len(queue) == len(turn)
        for owner in "abcde":
            assert queue.waiting(owner) == len(pending.get(owner, []))


def test_a_pile_of_one_owner_waits_its_turn():
    queue: RoundRobin[str] = RoundRobin()
    for i in range(60):
        queue.push("abuser", f"a{i}")
    queue.push("honest", "h")
    assert [queue.pop(), queue.pop()] == ["a0", "h"]


def test_compute_thread_runs_jobs_in_turn():
    thread = ComputeThread()
    gate = threading.Event()
    order: list[str] = []
    try:
        blocker = thread.submit("x", gate.wait)
        futures = [thread.submit("abuser", order.append, f"a{i}") for i in range(5)]
        futures.append(thread.submit("honest", order.append, "h"))
        failing = thread.submit("honest", lambda: 1 / 0)
        gate.set()
        for future in futures:
            future.result(timeout=10)
        assert blocker.result(timeout=10) is True
        assert order == ["a0", "h", "a1", "a2", "a3", "a4"]
        assert isinstance(failing.exception(timeout=10), ZeroDivisionError)
    finally:
        thread.shutdown()
    late = ComputeThread()
    late.shutdown()
    with pytest.raises(RuntimeError):
        late.submit("x", print)
