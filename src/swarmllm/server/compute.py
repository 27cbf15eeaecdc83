"""The compute thread, fair across peers: each peer's work waits in its own queue, and the thread takes one job
from each peer with work in turn (round robin), so one peer's pile of batch work delays another peer's job by at
most one job per peer with work, not by the whole pile.

`RoundRobin` is the pure queue (unit-tested on its own); `ComputeThread` runs its jobs on one thread. Small
work (a decode step) never comes here: the backend runs it inline on the event loop.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RoundRobin(Generic[T]):
    """Items queued per owner, taken one per owner in turn (owners in the order they last got work in)."""

    def __init__(self) -> None:
        self._queues: OrderedDict[Hashable, deque[T]] = OrderedDict()  # owners with items only

    def __len__(self) -> int:
        return len(self._queues)

    def push(self, owner: Hashable, item: T) -> None:
        queue = self._queues.get(owner)
        if queue is None:
            queue = self._queues[owner] = deque()
        queue.append(item)

    def pop(self) -> T:
        """The next owner's oldest item; that owner goes to the back of the line. IndexError when empty."""
        if not self._queues:
            raise IndexError("pop from an empty RoundRobin")
        owner, queue = next(iter(self._queues.items()))
        item = queue.popleft()
        if queue:
            self._queues.move_to_end(owner)
        else:
            del self._queues[owner]
        return item

    def waiting(self, owner: Hashable) -> int:
        queue = self._queues.get(owner)
        return len(queue) if queue else 0

    def drain(self) -> list[T]:
        items = [item for queue in self._queues.values() for item in queue]
        self._queues.clear()
        return items


_Job = tuple[Future, Callable[..., Any], tuple]


class ComputeThread:
    """One thread running submitted jobs, round robin by owner (a peer id)."""

    def __init__(self, name: str = "swarmllm-compute"):
        self._jobs: RoundRobin[_Job] = RoundRobin()
        self._wake = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, owner: Hashable, fn: Callable[..., Any], *args: Any) -> Future:
        future: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the compute thread was shut down")
            self._jobs.push(owner, (future, fn, args))
            self._wake.notify()
        return future

    def waiting(self, owner: Hashable) -> int:
        """Jobs of `owner` not yet started."""
        with self._wake:
            return self._jobs.waiting(owner)

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._jobs and not self._closed:
                    self._wake.wait()
                if self._closed:
                    return
                future, fn, args = self._jobs.pop()
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the caller through the future
                future.set_exception(e)
            else:
                future.set_result(result)

    def shutdown(self) -> None:
        """Stop after the running job; jobs not started are cancelled."""
        with self._wake:
            self._closed = True
            jobs = self._jobs.drain()
            self._wake.notify()
        for future, _, _ in jobs:
            future.cancel()
