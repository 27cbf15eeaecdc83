"""Log lines about peers' faults (a bad frame, a failed handshake, a refused connection), bounded: a hostile peer
opens connections for free, under as many identities as it likes, and one line per connection would let it fill
the operator's disk and drown every other line. Each kind of fault logs its first `burst` lines of a period; the
rest are counted and told in one line when the period ends."""

from __future__ import annotations

import asyncio
import logging
import time

BURST = 10  # lines of one kind of fault per period, before they are only counted
PERIOD_S = 60.0


class PeerFaultLog:
    def __init__(self, logger: logging.Logger, *, burst: int = BURST, period_s: float = PERIOD_S):
        self.logger = logger
        self.burst = burst
        self.period_s = period_s
        self._periods: dict[str, _Period] = {}  # by kind of fault

    def log(self, level: int, kind: str, message: str) -> None:
        """Log `message` (about one fault of `kind`, e.g. "bad frame") unless this period had `burst` already."""
        now = time.monotonic()
        period = self._periods.get(kind)
        if period is None or now >= period.ends_at:
            if period is not None:
                self._tell(kind, period)
            period = self._periods[kind] = _Period(now + self.period_s, level)
        if period.logged < self.burst:
            period.logged += 1
            self.logger.log(level, message)
            return
        period.unlogged += 1
        if period.unlogged == 1:  # told when the period ends, even if no fault of this kind follows
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # told by the next fault of this kind
            loop.call_later(max(0.0, period.ends_at - now), self._end, kind, period)

    def _end(self, kind: str, period: _Period) -> None:
        if self._periods.get(kind) is period:
            del self._periods[kind]
            self._tell(kind, period)

    def _tell(self, kind: str, period: _Period) -> None:
        if period.unlogged:
            self.logger.log(
                period.level, "%d more lines like these (%s) in %.0f s, not logged", period.unlogged, kind,
                self.period_s,
            )  # fmt: skip
            period.unlogged = 0


class _Period:
    __slots__ = ("ends_at", "level", "logged", "unlogged")

    def __init__(self, ends_at: float, level: int):
        self.ends_at = ends_at
        self.level = level
        self.logged = 0
        self.unlogged = 0
