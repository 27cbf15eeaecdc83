"""When a merged pass over concurrent callers' steps is due: the one policy of a server's decode steps over its
sessions (`server/batching.py`) and of a client's LM head over its concurrent generates (`client/heads.py`).

A pass runs at once when every caller that is stepping (took part in a pass within `active_s`) has a step
waiting: a lone caller is never slowed, and callers in lockstep are merged without a wait. Else the first waiting
step waits for the missing ones at most `max_wait_s`, and never longer than the last pass took: waiting longer
than a pass costs more than running the late caller in the next one. A missing caller whose next step is not
expected before that wait would end (its last arrival plus most of the interval between its last two) is not
waited for at all: callers that settle into groups stepping in turn (8 clients through 2 servers: one group at
each server, and at the client's head) would otherwise spend every pass waiting the whole budget for the other
group, to run without it.

Pure: it keeps the times it is given and neither waits nor runs anything; callers hold the steps and the clock.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# A caller's next step is expected from its last arrival plus this much less than its last interval: the
# arrivals of clients sharing a host's cores jitter (without the slack, 8 clients through 2 CPU servers were
# merged 2.1 sessions a step instead of 3.2 in one run). Groups in turn come half an interval apart, beyond it.
ARRIVAL_SLACK = 0.25


class MergeTiming(Generic[K]):
    """The callers' recent arrivals and passes, and whether a pass over the waiting steps is due."""

    def __init__(self, max_wait_s: float, active_s: float):
        self.max_wait_s = max_wait_s
        self.active_s = active_s
        self.last_pass_s = 0.0  # how long the last pass took
        self._stepping: dict[K, float] = {}  # caller -> when its last pass ran
        self._arrived: dict[K, float] = {}  # caller -> when its last step arrived
        self._period: dict[K, float] = {}  # caller -> the interval between its last two arrivals

    def wait_s(self) -> float:
        """The longest a step waits for missing callers: the budget, never more than the last pass took."""
        return min(self.max_wait_s, self.last_pass_s)

    def arrive(self, caller: K, now: float) -> None:
        last = self._stepping.get(caller)
        if last is not None and now - last <= self.active_s and caller in self._arrived:
            self._period[caller] = now - self._arrived[caller]
        else:  # its first step, or its first after a pause, which is no interval between steps
            self._period.pop(caller, None)
        self._arrived[caller] = now

    def due(self, waiting: Collection[K], now: float, ends: float) -> bool:
        """Whether a pass over the `waiting` callers' steps should run at `now`, when a wait would end at `ends`."""
        for caller, last in list(self._stepping.items()):
            if now - last > self.active_s:
                del self._stepping[caller]  # it stopped stepping (prefilling, thinking, or gone)
        return all(c in waiting or not self._expected_by(c, ends) for c in self._stepping)

    def ran(self, callers: Iterable[K], began: float, now: float) -> None:
        """A pass over `callers`' steps, begun at `began`, ended at `now`."""
        self.last_pass_s = now - began
        for caller in callers:
            self._stepping[caller] = now

    def forget(self, caller: K) -> None:
        """`caller` is gone: no pass waits for it any more."""
        self._stepping.pop(caller, None)
        self._arrived.pop(caller, None)
        self._period.pop(caller, None)

    def _expected_by(self, caller: K, ends: float) -> bool:
        """Whether `caller`'s next step may arrive by `ends`: its last arrival plus its last interval, less the
        slack (an overdue one may come any moment; one with a single arrival so far is waited for, as it may be
        in step)."""
        period, arrived = self._period.get(caller), self._arrived.get(caller)
        return period is None or arrived is None or arrived + (1 - ARRIVAL_SLACK) * period <= ends
