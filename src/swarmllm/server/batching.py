"""Continuous batching of decode steps: the one-token steps of a server's concurrent inference sessions are
merged into one forward pass, so the span's weights are read once per step for all of them rather than once per
session (on a CPU or a GPU, a decode step's time is mostly that read).

`DecodeBatcher` decides when a merged step runs; what it runs is the backend's (`Backend._decode_many`). Sessions
join and leave between steps: a step runs over whichever sessions have a step waiting. It runs at once when every
session that is decoding (took part in a step within `active_s`) has one waiting: a lone session is never slowed,
and sessions in lockstep (the steps a previous server pushes, one after another) are merged without a wait. Else
it waits for the missing ones at most `max_wait_s`, and never longer than the last merged step took: waiting
longer than a step costs more than running the late session in the next one. A missing session whose next step
is not expected before that wait would end (its last step's arrival plus most of the interval between its last
two) is not waited for at all: sessions that settle into groups stepping in turn (8 clients through 2 servers:
one group at each server) would otherwise spend every step waiting the whole budget for the other group, to run
without it (on a GPU, 3.2 ms of idle device a step for the Llama-2-7B shape).

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

# A session's next step is expected from its last arrival plus this much less than its last interval: the
# arrivals of clients sharing a host's cores jitter (without the slack, 8 clients through 2 CPU servers were
# merged 2.1 sessions a step instead of 3.2 in one run). Groups in turn come half an interval apart, beyond it.
ARRIVAL_SLACK = 0.25


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
        clock: Callable[[], float] = time.monotonic,
    ):
        self._run = run
        self.max_wait_s = max_wait_s
        self.max_sessions = max_sessions
        self.active_s = active_s
        self._clock = clock  # what arrivals are timed by (tests drive it; the wait itself runs on the loop)
        self._waiting: list[Waiting[R]] = []
        self._decoding: dict[Hashable, float] = {}  # session -> when its last step ran
        self._arrived: dict[Hashable, float] = {}  # session -> when its last step arrived
        self._period: dict[Hashable, float] = {}  # session -> the interval between its last two arrivals
        self._closed: set[Hashable] = set()  # forgotten sessions whose step is still waiting
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # when the pending timer runs the waiting steps (by `clock`)
        self._last_step_s = 0.0  # how long the last merged step took
        self.steps = 0  # merged steps run
        self.merged = 0  # session steps run in them

    async def step(self, session: Hashable, request: R) -> object:
        """This session's output of the merged step that takes `request`."""
        now = self._clock()
        if session in self._arrived:
            self._period[session] = now - self._arrived[session]
        self._arrived[session] = now
        if not self._waiting and self._due(session):
            # due on arrival with no other step waiting (a lone session, as on a chain): run it, without the
            # future and queue entry a merge needs
            began = self._clock()
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
            self._deadline = now + wait_s
            self._timer = asyncio.get_running_loop().call_later(wait_s, self._flush)
        return await future  # done already when this call ran the step: no loop turn

    def forget(self, session: Hashable) -> None:
        """The session closed: no step waits for it any more. A waiting step whose caller is gone (cancelled) is
        dropped: run later, it would write a cache that may be another session's by then (arena rows given back)."""
        self._decoding.pop(session, None)
        self._arrived.pop(session, None)
        self._period.pop(session, None)
        self._waiting = [w for w in self._waiting if not (w.session == session and w.future.done())]
        if any(w.session == session for w in self._waiting):
            self._closed.add(session)
        if self._waiting and self._due():
            self._flush()

    def _due(self, arriving: Hashable | None = None) -> bool:
        """Whether a merged step of the waiting steps (and `arriving`'s, not queued yet) should run now."""
        if len(self._waiting) + (arriving is not None) >= self.max_sessions:
            return True
        now = self._clock()
        for session, last in list(self._decoding.items()):
            if now - last > self.active_s:
                del self._decoding[session]  # it stopped decoding (prefilling, thinking, or gone)
                self._period.pop(session, None)  # the pause is no interval between steps
        waiting = {w.session for w in self._waiting}
        if arriving is not None:
            waiting.add(arriving)
        # the wait would end at the pending timer's deadline, or (none pending yet) one budget from now
        ends = self._deadline if self._timer is not None else now + min(self.max_wait_s, self._last_step_s)
        return all(session in waiting or not self._expected_by(session, ends) for session in self._decoding)

    def _expected_by(self, session: Hashable, ends: float) -> bool:
        """Whether `session`'s next step may arrive by `ends`: its last arrival plus its last interval, less the
        slack (an overdue one may come any moment; one with a single arrival so far is waited for, as it may be
        in step)."""
        period, arrived = self._period.get(session), self._arrived.get(session)
        return period is None or arrived is None or arrived + (1 - ARRIVAL_SLACK) * period <= ends

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._waiting = self._waiting[: self.max_sessions], self._waiting[self.max_sessions :]
        if not batch:
            return
        began = self._clock()
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
        now = self._clock()
        self._last_step_s = now - began
        self.steps += 1
        self.merged += len(sessions)
        for session in sessions:
            if session in self._closed:  # it closed while its step waited: no later step waits for it
                self._closed.discard(session)
            else:
                self._decoding[session] = now
