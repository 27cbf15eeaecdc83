"""The LM head of concurrent generates, merged: threads that generate at once (an API's requests) each need the
logits of their new token at about the same time, since the servers answer the steps they merged together. One
matmul over all their rows reads the head's weights once (32,000 x 1,024 floats: 131 MB for a Llama-2-sized
vocabulary) instead of once per thread, which on a CPU is most of a client's time per token.

The policy is the servers' (`server/batching.py`), for threads: a merged call runs at once when every thread
that called within `active_s` has a call waiting (a lone generate never waits), else once `max_wait_s` has passed,
and never later than the last merged call took. The first waiting thread runs it; the others wait for their rows.
Only calls without gradients merge (generates run under `torch.no_grad`): a merged graph would tie the threads'
backward passes together.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class _Call:
    rows: Tensor  # [n, hidden]
    thread: int
    out: Tensor | None = None
    error: BaseException | None = None
    done: bool = False


class MergedHead:
    """`head(hidden [..., hidden_size]) -> logits [..., vocab]`, row-wise, merged over concurrent threads."""

    def __init__(self, head: Callable[[Tensor], Tensor], *, max_wait_s: float = 0.005, active_s: float = 1.0):
        self.head = head
        self.max_wait_s, self.active_s = max_wait_s, active_s
        self._lock = threading.Condition()
        self._waiting: list[_Call] = []
        self._callers: dict[int, float] = {}  # thread id -> when its last call ran
        self._waiting_threads: set[int] = set()
        self._last_s = 0.0  # how long the last merged call took
        self.calls = 0  # merged calls run
        self.merged = 0  # thread calls run in them

    def __call__(self, hidden: Tensor) -> Tensor:
        if torch.is_grad_enabled():  # training, or a forward outside generate: alone
            return self.head(hidden)
        me = threading.get_ident()
        call = _Call(hidden.reshape(-1, hidden.shape[-1]), me)
        with self._lock:
            if not self._waiting and self._due(me):  # alone: no merge, no wait
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
            if self._callers.pop(threading.get_ident(), None) is not None:
                self._lock.notify_all()

    def _wait(self, call: _Call) -> list[_Call]:
        """Under the lock: the batch this thread runs (it leads: its call is the first waiting), or [] once
        another thread ran its call."""
        deadline = time.monotonic() + min(self.max_wait_s, self._last_s)
        while not call.done:
            if self._waiting and self._waiting[0] is call:
                left = deadline - time.monotonic()
                if left <= 0 or self._due():
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

    def _due(self, arriving: int | None = None) -> bool:
        """Under the lock: whether every thread that called lately has a call waiting (with `arriving`'s)."""
        now = time.monotonic()
        for thread, last in list(self._callers.items()):
            if now - last > self.active_s:
                del self._callers[thread]  # it stopped generating (or waits on a prefill)
        waiting = self._waiting_threads | ({arriving} if arriving is not None else set())
        return all(thread in waiting for thread in self._callers)

    def _run(self, batch: list[_Call]) -> None:
        began = time.monotonic()
        try:
            out = self.head(torch.cat([c.rows for c in batch]) if len(batch) > 1 else batch[0].rows)
            for c, rows in zip(batch, out.split([c.rows.shape[0] for c in batch]), strict=True):
                c.out = rows
        except Exception as e:  # noqa: BLE001 - each thread of the merged call raises it
            for c in batch:
                c.error = e
        except BaseException:  # Ctrl-C in this thread is its own: the others' calls wait for a new leader
            self._hand_back([c for c in batch if c.thread != threading.get_ident()])
            raise
        with self._lock:
            now = time.monotonic()
            self._last_s = now - began
            self.calls += 1
            self.merged += len(batch)
            for c in batch:
                c.done = True
                self._callers[c.thread] = now
            self._lock.notify_all()
