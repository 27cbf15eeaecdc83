"""The LM head of concurrent generates, merged: threads that generate at once (an API's requests) each need the
logits of their new token at about the same time, since the servers answer the steps they merged together. One
matmul over all their rows reads the head's weights once (32,000 x 1,024 floats: 131 MB for a Llama-2-sized
vocabulary) instead of once per thread, which on a CPU is most of a client's time per token.

The policy is the servers' (`balancing.merging.MergeTiming`), for threads: a merged call runs at once when every
thread that called within `active_s` has a call waiting (a lone generate never waits), else once `max_wait_s` has
passed, and never later than the last merged call took; a thread whose next call is not expected by then is not
waited for (8 API requests through 2 servers settle into two groups that reach the head in turn, and each group's
call waited out the budget for the other). The first waiting thread runs it; the others wait for their rows.
Only calls without gradients merge (generates run under `torch.no_grad`): a merged graph would tie the threads'
backward passes together. A greedy step's call asks for `argmax_only` logits (`models.screen`: -inf where a
row's largest cannot be); a merged call gives them only where all its calls asked for them.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from swarmllm.balancing.merging import MergeTiming


@dataclass
class _Call:
    rows: Tensor  # [n, hidden]
    thread: int
    argmax_only: bool
    out: Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class MergedHead:
    """`head(hidden [..., hidden_size]) -> logits [..., vocab]`, row-wise, merged over concurrent threads;
    `argmax_head(hidden)`: logits whose argmax is `head`'s, for calls that take nothing else."""

    def __init__(
        self,
        head: Callable[[Tensor], Tensor],
        argmax_head: Callable[[Tensor], Tensor] | None = None,
        *,
        max_wait_s: float = 0.005,
        active_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.head = head
        self.argmax_head = argmax_head or head
        self._clock = clock  # what calls are timed by (tests drive it; a wait itself runs on the real clock)
        self.timing: MergeTiming[int] = MergeTiming(max_wait_s, active_s)  # by thread id
        self._lock = threading.Condition()
        self._waiting: list[_Call] = []
        self._waiting_threads: set[int] = set()
        self.calls = 0  # merged calls run
        self.merged = 0  # thread calls run in them

    def __call__(self, hidden: Tensor, argmax_only: bool = False) -> Tensor:
        if torch.is_grad_enabled():  # training, or a forward outside generate: alone
            return self.head(hidden)
        me = threading.get_ident()
        call = _Call(hidden.reshape(-1, hidden.shape[-1]), me, argmax_only)
        with self._lock:
            now = self._clock()
            self.timing.arrive(me, now)
            alone = not self._waiting and self._due(now, now + self.timing.wait_s(), me)
            if alone:  # no merge, no wait
                batch = [call]
            else:
                self._waiting.append(call)
                self._waiting_threads.add(me)
                self._lock.notify_all()  # the leader may be waiting for this one
                try:
                    batch = self._wait(call)
                except BaseException:  # Ctrl-C while waiting: withdrawn, so that no thread waits behind it
                    self._withdraw(call)
                    raise
        if batch:
            self._run(batch)
        if call.error is not None:
            raise call.error
        return call.out.reshape(*hidden.shape[:-1], -1)

    def forget(self) -> None:
        """The calling thread's generate ended: no merged call waits for it any more."""
        with self._lock:
            self.timing.forget(threading.get_ident())
            self._lock.notify_all()

    def _wait(self, call: _Call) -> list[_Call]:
        """Under the lock: the batch this thread runs (it leads: its call is the first waiting), or [] once
        another thread ran its call."""
        wait_s = self.timing.wait_s()
        ends = self._clock() + wait_s  # when the wait ends, by the clock that calls are timed by
        deadline = time.monotonic() + wait_s  # ... and by the real one, which the wait runs on
        while not call.done:
            if self._waiting and self._waiting[0] is call:
                left = deadline - time.monotonic()
                if left <= 0 or self._due(self._clock(), ends):
                    batch, self._waiting = self._waiting, []
                    self._waiting_threads.clear()
                    return batch
                self._lock.wait(left)
            else:
                self._lock.wait()
        return []

    def _withdraw(self, call: _Call) -> None:
        """Under the lock: `call`'s thread stopped waiting; a call it led passes the lead to the next one."""
        if any(c is call for c in self._waiting):
            self._waiting = [c for c in self._waiting if c is not call]
            self._waiting_threads.discard(call.thread)
            self._lock.notify_all()

    def _hand_back(self, calls: list[_Call]) -> None:
        """Put calls whose merged call did not run back first in line, for one of their threads to lead."""
        with self._lock:
            self._waiting[:0] = calls
            self._waiting_threads.update(c.thread for c in calls)
            self._lock.notify_all()

    def _due(self, now: float, ends: float, arriving: int | None = None) -> bool:
        """Under the lock: whether the waiting calls (with `arriving`'s) should run at `now`, a wait ending at
        `ends`."""
        waiting = self._waiting_threads | ({arriving} if arriving is not None else set())
        return self.timing.due(waiting, now, ends)

    def _run(self, batch: list[_Call]) -> None:
        began = self._clock()
        head = self.argmax_head if all(c.argmax_only for c in batch) else self.head
        try:
            out = head(torch.cat([c.rows for c in batch]) if len(batch) > 1 else batch[0].rows)
            for c, rows in zip(batch, out.split([c.rows.shape[0] for c in batch]), strict=True):
                c.out = rows
        except Exception as e:  # noqa: BLE001 - each thread of the merged call raises it
            for c in batch:
                c.error = e
        except BaseException:  # Ctrl-C in this thread is its own: the others' calls wait for a new leader
            self._hand_back([c for c in batch if c.thread != threading.get_ident()])
            raise
        with self._lock:
            self.calls += 1
            self.merged += len(batch)
            for c in batch:
                c.done = True
            self.timing.ran([c.thread for c in batch], began, self._clock())
            self._lock.notify_all()
