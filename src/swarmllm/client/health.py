"""What the client knows about servers that failed it, and how long it waits for a healthy one: pure functions
and plain data, tested without a network.

A failed server is banned for `base_s`, doubling with every further failure up to `max_s`; routing avoids banned
peers. A step's deadline is what the hop should take by its announced speed, times a slack, plus a floor, plus
its bytes (there and back) at the slowest rate the wire accepts a frame at, so a hung server is noticed in seconds
while a slow but honest one, or one far away behind a narrow link, is left alone.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

from swarmllm.wire.framing import WireLimits

DEADLINE_SLACK = 4.0  # a hop may take this many times its announced compute time before it counts as hung
# a hop's bytes may travel this slowly (bytes/s): the rate below which a server drops a frame as stalled, so a
# server far away is never given less time than its own wire gives its peers
MIN_TRANSFER_RATE = WireLimits.min_frame_rate


@dataclass
class Bans:
    """Peers to avoid until a time (seconds on a monotonic clock), with exponential backoff per peer."""

    base_s: float = 15.0
    max_s: float = 300.0
    _until: dict[str, float] = field(default_factory=dict)
    _strikes: dict[str, int] = field(default_factory=dict)
    _unreachable: set[str] = field(default_factory=set)

    def ban(self, peer_id: str, now: float, *, unreachable: bool = False, longest: bool = False) -> float:
        """Ban `peer_id` from `now`; returns the ban's length (longer for each repeated failure). `unreachable`:
        it failed by not answering (a broken connection, a timeout), so answering again may end the ban early;
        a peer that answered wrongly stays banned. `longest`: for `max_s` at once (its outputs were wrong)."""
        strikes = self._strikes.get(peer_id, 0) + 1
        self._strikes[peer_id] = strikes
        duration = self.max_s if longest else min(self.max_s, self.base_s * 2 ** (strikes - 1))
        self._until[peer_id] = now + duration
        if unreachable:
            self._unreachable.add(peer_id)
        else:
            self._unreachable.discard(peer_id)
        return duration

    def lift(self, peer_id: str) -> None:
        """End a ban early (the peer proved alive); its strikes stay, so a flapping peer is banned longer."""
        self._until.pop(peer_id, None)
        self._unreachable.discard(peer_id)

    def banned(self, now: float) -> set[str]:
        return {peer for peer, until in self._until.items() if until > now}

    def unreachable(self, now: float) -> set[str]:
        """Banned peers whose ban may end as soon as they answer again."""
        return self.banned(now) & self._unreachable


def step_deadline_s(
    tokens: int,
    blocks: int,
    blocks_per_s: float,
    *,
    floor_s: float,
    slack: float = DEADLINE_SLACK,
    transfer_bytes: int = 0,
    min_rate: float = MIN_TRANSFER_RATE,
) -> float:
    """How long a hop may take for `tokens` tokens through `blocks` blocks, at an announced `blocks_per_s`
    (block-tokens per second), sending and receiving `transfer_bytes` in all, before the client gives up on it."""
    return floor_s + slack * tokens * blocks / max(blocks_per_s, 1e-9) + transfer_bytes / min_rate


@dataclass
class Speeds:
    """What the client measured of each server's speed: the median of its last `window` samples, per kind of
    work ("inference": decode steps/s through one block; "forward": tokens/s through one block). Routing uses
    the smaller of this and what the server announces, so announcing more than it delivers wins it nothing."""

    window: int = 16
    _samples: dict[tuple[str, str], deque[float]] = field(default_factory=dict)

    def observe(self, peer_id: str, kind: str, rate: float) -> None:
        if rate > 0 and rate != float("inf"):
            self._samples.setdefault((peer_id, kind), deque(maxlen=self.window)).append(rate)

    def measured(self, kind: str) -> dict[str, float]:
        """Each measured peer's median rate for `kind`."""
        return {peer: statistics.median(s) for (peer, k), s in self._samples.items() if k == kind}

    def capped(self, peer_id: str, kind: str, announced: float) -> float:
        """`announced` capped by the peer's median measured rate for `kind`, if any: what `cap_throughput`
        does for one measured server, cheap enough for every hop of every step (a hop's deadline; an unmeasured
        server's is by its announced speed, which routing discounts)."""
        samples = self._samples.get((peer_id, kind))
        return min(announced, statistics.median(samples)) if samples else announced
