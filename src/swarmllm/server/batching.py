"""Continuous batching of decode steps: the one-token steps of a server's concurrent inference sessions are
merged into one forward pass, so the span's weights are read once per step for all of them rather than once per
session (on a CPU or a GPU, a decode step's time is mostly that read).

`DecodeBatcher` holds the waiting steps and runs a merged step when `balancing.merging.MergeTiming` says it is
due (at once when every decoding session has a step waiting; else after a wait bounded by `max_wait_s` and the
last step's time, for the sessions expected within it: groups of sessions that step in turn at this server do
not wait for each other, which on a GPU saved 3.2 ms of idle device a step for the Llama-2-7B shape). What it
runs is the backend's (`Backend._decode_many`). Sessions join and leave between steps: a step runs over
whichever sessions have a step waiting.

Short prefills go through it too (`gather`, `Backend.merges`), as chunks of rows of the merged step: a new
session's prompt then shares the step's read of the weights. The timing does not count them as decode steps, and
prefills that arrive in one loop turn run as one step.

The batcher holds no tensors of its own and never touches a cache: each request carries its session, and the
sessions' own steps arrive one at a time, so a session has at most one request waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from swarmllm.balancing.merging import MergeTiming

R = TypeVar("R")


@dataclass
class Waiting(Generic[R]):
    """One session's decode step waiting to be merged."""

    session: Hashable
    request: R
    future: asyncio.Future = field(repr=False)
    gather: bool = False


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
        self.timing: MergeTiming[Hashable] = MergeTiming(max_wait_s, active_s)
        self.max_sessions = max_sessions
        self._clock = clock  # what arrivals are timed by (tests drive it; the wait itself runs on the loop)
        self._waiting: list[Waiting[R]] = []
        self._closed: set[Hashable] = set()  # forgotten sessions whose step is still waiting
        self._timer: asyncio.Handle | None = None
        self._deadline = 0.0  # when the pending timer runs the waiting steps (by `clock`)
        self._soon = False  # the pending timer runs them at the loop's next turn (`gather`)
        self.steps = 0  # merged steps run that carried decode steps
        self.merged = 0  # decode steps run in them

    async def step(self, session: Hashable, request: R, gather: bool = False) -> object:
        """This session's output of the merged step that takes `request`. gather: a prefill, which `timing` does
        not count as a decode step (the time from it to the session's first decode step is no step interval);
        due on arrival, it still runs at the loop's next turn, with whatever steps arrive meanwhile (new
        sessions tend to come together)."""
        now = self._clock()
        if not gather:
            self.timing.arrive(session, now)
        if not self._waiting and not gather and self._due(session):
            # due on arrival with no other step waiting (a lone session, as on a chain): run it, without the
            # future and queue entry a merge needs
            began = self._clock()
            try:
                return self._run([request])[0]
            finally:
                self._ran([session], began)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._waiting.append(Waiting(session, request, future, gather))
        if self._soon:
            pass  # runs at the loop's next turn with the others
        elif self._due():
            if gather:
                self._cancel_timer()
                self._soon, self._deadline, self._timer = True, now, loop.call_soon(self._flush)
            else:
                self._flush()
        elif self._timer is None:
            wait_s = self.timing.wait_s()
            self._deadline = now + wait_s
            self._timer = loop.call_later(wait_s, self._flush)
        return await future  # done already when this call ran the step: no loop turn

    def forget(self, session: Hashable) -> None:
        """The session closed: no step waits for it any more. A waiting step whose caller is gone (cancelled) is
        dropped: run later, it would write a cache that may be another session's by then (arena rows given back)."""
        self.timing.forget(session)
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
        waiting = {w.session for w in self._waiting}
        if arriving is not None:
            waiting.add(arriving)
        # the wait would end at the pending timer's deadline, or (none pending yet) one budget from now
        ends = self._deadline if self._timer is not None else now + self.timing.wait_s()
        return self.timing.due(waiting, now, ends)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._soon = False

    def _flush(self) -> None:
        self._cancel_timer()
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
        self._ran([w.session for w in batch], began, {w.session for w in batch if w.gather})
        if self._waiting:  # more than max_sessions were waiting: the rest go next, without a wait
            asyncio.get_running_loop().call_soon(self._flush)

    def _ran(self, sessions: list[Hashable], began: float, prefills: Collection[Hashable] = ()) -> None:
        """A merged step of `sessions` (`prefills` of them with a prefill), begun at `began`, is done (whether it
        succeeded or not)."""
        self.steps += int(len(sessions) > len(prefills))
        self.merged += len(sessions) - len(prefills)
        # one that closed while its step waited: no later step waits for it
        stepping = [s for s in sessions if s not in self._closed and s not in prefills]
        self._closed.difference_update(sessions)
        self.timing.ran(stepping, began, self._clock())
