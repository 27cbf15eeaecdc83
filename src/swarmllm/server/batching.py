"""Continuous batching of decode steps: the one-token steps of a server's concurrent inference sessions are
merged into one forward pass, so the span's weights are read once per step for all of them rather than once per
session (on a CPU or a GPU, a decode step's time is mostly that read).

`DecodeBatcher` decides when a merged step runs; what it runs is the backend's (`Backend._decode_many`). Sessions
join and leave between steps: a step runs over whichever sessions have a step waiting. It runs at once when every
session that is decoding (took part in a step within `active_s`) has one waiting: a lone session is never slowed,
and sessions in lockstep (the steps a previous server pushes, one after another) are merged without a wait. Else
it waits for the missing ones at most `max_wait_s`, and never longer than the last merged step took: waiting
longer than a step costs more than running the late session in the next one.

The batcher holds no tensors of its own and never touches a cache: each request carries its session, and the
sessions' own steps arrive one at a time, so a session has at most one request waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

R = TypeVar("R")


@dataclass
class Waiting(Generic[R]):
    """One session's decode step waiting to be merged."""

    session: Hashable
    request: R
    future: asyncio.Future = field(repr=False)


class DecodeBatcher(Generic[R]):
    """Runs `run(requests) -> outputs` (one output per request, in order) over the decode steps waiting when a
    merged step is due (see the module doc)."""

    def __init__(
        self,
        run: Callable[[Sequence[R]], Sequence[object]],
        *,
        max_wait_s: float = 0.01,
        max_sessions: int = 64,
        active_s: float = 1.0,
    ):
        self._run = run
        self.max_wait_s = max_wait_s
        self.max_sessions = max_sessions
        self.active_s = active_s
        self._waiting: list[Waiting[R]] = []
        self._decoding: dict[Hashable, float] = {}  # session -> when its last step ran
        self._closed: set[Hashable] = set()  # forgotten sessions whose step is still waiting
        self._timer: asyncio.TimerHandle | None = None
        self._last_step_s = 0.0  # how long the last merged step took
        self.steps = 0  # merged steps run
        self.merged = 0  # session steps run in them

    async def step(self, session: Hashable, request: R) -> object:
        """This session's output of the merged step that takes `request`."""
        if not self._waiting and self._due(session):
            # due on arrival with no other step waiting (a lone session, as on a chain): run it, without the
            # future and queue entry a merge needs
            began = time.monotonic()
            try:
                return self._run([request])[0]
            finally:
                self._ran([session], began)
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(Waiting(session, request, future))
        if self._due():
            self._flush()
        elif self._timer is None:
            wait_s = min(self.max_wait_s, self._last_step_s)
            self._timer = asyncio.get_running_loop().call_later(wait_s, self._flush)
        return await future  # done already when this call ran the step: no loop turn

    def forget(self, session: Hashable) -> None:
        """The session closed: no step waits for it any more. A waiting step whose caller is gone (cancelled) is
        dropped: run later, it would write a cache that may be another session's by then (arena rows given back)."""
        self._decoding.pop(session, None)
        self._waiting = [w for w in self._waiting if not (w.session == session and w.future.done())]
        if any(w.session == session for w in self._waiting):
            self._closed.add(session)
        if self._waiting and self._due():
            self._flush()

    def _due(self, arriving: Hashable | None = None) -> bool:
        """Whether a merged step of the waiting steps (and `arriving`'s, not queued yet) should run now."""
        if len(self._waiting) + (arriving is not None) >= self.max_sessions:
            return True
        now = time.monotonic()
        for session, last in list(self._decoding.items()):
            if now - last > self.active_s:
                del self._decoding[session]  # it stopped decoding (prefilling, thinking, or gone)
        waiting = {w.session for w in self._waiting}
        if arriving is not None:
            waiting.add(arriving)
        return all(session in waiting for session in self._decoding)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._waiting = self._waiting[: self.max_sessions], self._waiting[self.max_sessions :]
        if not batch:
            return
        began = time.monotonic()
        try:
            outputs = self._run([w.request for w in batch])
        except Exception as e:  # noqa: BLE001 - every session of the merged step gets the error
            for w in batch:
                if not w.future.done():
                    w.future.set_exception(e)
        else:
            for w, out in zip(batch, outputs, strict=True):
                if not w.future.done():  # (its session's task may have been cancelled meanwhile)
                    w.future.set_result(out)
        self._ran([w.session for w in batch], began)
        if self._waiting:  # more than max_sessions were waiting: the rest go next, without a wait
            asyncio.get_running_loop().call_soon(self._flush)

    def _ran(self, sessions: list[Hashable], began: float) -> None:
        """A merged step of `sessions`, begun at `began`, is done (whether it succeeded or not)."""
        now = time.monotonic()
        self._last_step_s = now - began
        self.steps += 1
        self.merged += len(sessions)
        for session in sessions:
            if session in self._closed:  # it closed while its step waited: no later step waits for it
                self._closed.discard(session)
            else:
                self._decoding[session] = now
