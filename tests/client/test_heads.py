"""`MergedHead`: concurrent threads' LM-head calls merged into one matmul give each thread exactly its own rows'
logits; a lone thread's calls run alone; an error reaches every thread of the merged call; calls that track
gradients never merge."""

from __future__ import annotations

import queue
import threading

import pytest
import torch
from clocks import Clock

from swarmllm.client.heads import MergedHead, _Call

HIDDEN, VOCAB = 256, 8192


@pytest.fixture
def weight():
    return torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))


def run_threads(count: int, work) -> list:
    """`work(i)` in `count` threads at once; their results (or what they raised), in order."""
    results: list = [None] * count

    def run(i: int) -> None:
        try:
            results[i] = work(i)
        except Exception as e:  # noqa: BLE001 - handed to the test
            results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return results


def test_concurrent_threads_get_their_own_rows_from_merged_calls(weight):
    sizes = []

    def head(rows):
        sizes.append(rows.shape[0])
        return rows @ weight.T

    merged = MergedHead(head, max_wait_s=1.0)
    threads, rounds = 4, 20
    start = threading.Barrier(threads)
    inputs = torch.randn(threads, rounds, 1, 1, HIDDEN, generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def work(i: int) -> list[torch.Tensor]:
        out = []
        for r in range(rounds):
            start.wait(timeout=60)  # the threads call together, as generates answered by one merged step
            out.append(merged(inputs[i, r]))
        return out

    results = run_threads(threads, work)
    for i, outs in enumerate(results):
        assert not isinstance(outs, Exception), outs
        for r, out in enumerate(outs):
            assert out.shape == (1, 1, VOCAB)
            torch.testing.assert_close(out, inputs[i, r] @ weight.T, rtol=1e-5, atol=1e-4)
    assert merged.merged == threads * rounds == sum(sizes)
    assert merged.calls < merged.merged and max(sizes) > 1  # some calls were merged


def test_a_lone_thread_runs_alone_and_errors_reach_every_thread(weight):
    merged = MergedHead(lambda rows: rows @ weight.T, max_wait_s=1.0)
    with torch.no_grad():
        for _ in range(5):
            merged(torch.randn(1, 3, HIDDEN))  # several rows of one call (a prefill) stay together
    assert merged.calls == merged.merged == 5

    def failing(rows):
        raise RuntimeError("the head failed")

    broken = MergedHead(failing, max_wait_s=1.0)

    @torch.no_grad()
    def work(i: int):
        return broken(torch.randn(1, 1, HIDDEN))

    assert all(isinstance(e, RuntimeError) and "the head failed" in str(e) for e in run_threads(3, work))


def test_calls_that_track_gradients_run_alone(weight):
    calls = []
    merged = MergedHead(lambda rows: calls.append(rows.shape) or rows @ weight.T)
    hidden = torch.randn(2, 1, HIDDEN, requires_grad=True)
    merged(hidden).sum().backward()
    assert hidden.grad is not None and merged.calls == 0 and calls == [(2, 1, HIDDEN)]


class Caller:
    """A thread of its own (as an API request's generate) that calls the head whenever asked to."""

    def __init__(self, merged: MergedHead):
        self.jobs: queue.Queue = queue.Queue()
        self.results: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._serve, args=(merged,), daemon=True)
        self.thread.start()

    def _serve(self, merged: MergedHead) -> None:
        while (hidden := self.jobs.get()) is not None:
            with torch.no_grad():
                self.results.put(merged(hidden))

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=60)


def test_groups_calling_in_turn_do_not_wait_for_each_other(weight):
    """Two groups of generates that reach the head in turn (8 API requests through 2 servers settle so): a group's
    call waits for its own late member, but not for the other group, which comes half a period later; before,
    every call waited out its budget for the other group and ran without it."""
    clock = Clock()
    step_s, period = 50.0, 1000.0

    def head(rows):
        clock.now += step_s  # a merged call takes step_s of the head's clock
        return rows @ weight.T

    merged = MergedHead(head, max_wait_s=0.001, active_s=1e6, clock=clock)
    groups = {"A": [Caller(merged), Caller(merged)], "B": [Caller(merged)]}
    offsets = {"A": 0.0, "B": period / 2}
    hidden = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(2))

    def call(group: str, k: int, timeout_s: float) -> None:
        clock.now = k * period + offsets[group]
        for caller in groups[group]:
            caller.jobs.put(hidden)
        for caller in groups[group]:
            try:
                out = caller.results.get(timeout=timeout_s)
            except queue.Empty:
                raise AssertionError(f"group {group} of round {k} waited for the other group") from None
            torch.testing.assert_close(out, hidden @ weight.T, rtol=1e-5, atol=1e-4)

    try:
        for k in range(3):  # the groups take turns; a budget of 1 ms of the head's clock while they settle
            for group in groups:
                call(group, k, timeout_s=60)
        # a budget of a whole call (50 s: a wait runs for real) from now on; the groups answer well within it
        merged.timing.max_wait_s = 100.0
        for k in range(3, 6):
            for group in groups:
                before = merged.calls
                call(group, k, timeout_s=10)
                assert merged.calls == before + 1  # the group's threads in one merged call
    finally:
        for callers in groups.values():
            for caller in callers:
                caller.stop()


def test_a_merged_call_screens_only_when_every_call_takes_just_the_argmax(weight):
    """Greedy steps ask for `argmax_only` logits (`models.screen`); a merged call runs the argmax head only when
    all its calls asked for it, else the full one for all (which serves an argmax as well)."""
    heads = []

    def head(kind: str):
        return lambda rows: heads.append((kind, rows.shape[0])) or rows @ weight.T

    merged = MergedHead(head("full"), head("argmax"), max_wait_s=0.001)
    hidden = torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # a lone thread's calls
        merged(hidden, argmax_only=True)
        merged(hidden)
    assert heads == [("argmax", 1), ("full", 1)]
    for flags, want in (
        ([True, True, True], "argmax"),
        ([True, False, True], "full"),
        ([False, False], "full"),
    ):
        heads.clear()
        calls = [_Call(hidden[0], thread, flag) for thread, flag in enumerate(flags)]
        merged._run(calls)  # (a merged call as its leader runs it)
        assert heads == [(want, len(flags))]
        for call in calls:
            torch.testing.assert_close(call.out, hidden[0] @ weight.T, rtol=1e-5, atol=1e-4)
