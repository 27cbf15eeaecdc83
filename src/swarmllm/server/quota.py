"""Per-peer accounting: what each peer holds (open sessions, cache tokens), what it has waiting for compute, and
how fast it may call (a token bucket per peer).

Pure bookkeeping over plain numbers and a clock passed in: no tensors, no network. The handler asks before it
admits work and says when the work ends; a refusal comes back as a value (`Refusal`) naming the limit, which the
handler turns into a `quota` error (this peer's limit) or a `busy` error (the server's); one past the request rate
says when the peer's next token comes (`retry_after_s`), for the client to wait that out. Every operation is O(1),
so the checks cost nothing next to a decode step. A refused request changes nothing: the peer's other sessions
and calls never notice it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction


@dataclass(frozen=True)
class PeerLimits:
    """What one peer may hold and ask at once (`max_queued_total` is the server's, over all peers)."""

    max_sessions: int = 16  # open inference sessions per peer
    max_cache_share: float = 0.5  # of the server's KV-cache budget, per peer
    max_queued: int = 8  # compute calls of a peer waiting for or running on the compute thread
    max_queued_total: int = 64  # the same over all peers: beyond it the server is `busy`
    rate_per_s: float = 50.0  # requests per second per peer, on average (token bucket refill)
    burst: int = 100  # requests a peer may make at once (token bucket size)

    def __post_init__(self) -> None:
        if not 0 < self.max_cache_share <= 1:
            raise ValueError(f"max_cache_share must be in (0, 1], got {self.max_cache_share}")
        if min(self.max_sessions, self.max_queued, self.max_queued_total, self.burst) < 1:
            raise ValueError("session, queue and burst limits must be at least 1")
        if not self.rate_per_s > 0:  # (nan too: every bucket would stay full)
            raise ValueError(f"rate_per_s must be positive, got {self.rate_per_s}")


@dataclass(frozen=True)
class Refusal:
    code: str  # "quota": this peer's limit; "busy": the server's; "bad_request": more than any peer may hold
    message: str
    # when the refusal clears by itself: in this long the peer's request rate has a token for it again (None: it
    # clears only when the peer's other work ends, e.g. a session closes)
    retry_after_s: float | None = None


@dataclass
class _Peer:
    sessions: int = 0
    cache_tokens: int = 0
    queued: int = 0
    bucket: float = 0.0  # requests the peer may make now
    bucket_at: float = 0.0  # when `bucket` was last brought up to date

    @property
    def idle(self) -> bool:
        return self.sessions == 0 and self.cache_tokens == 0 and self.queued == 0


@dataclass
class PeerQuotas:
    limits: PeerLimits = field(default_factory=PeerLimits)
    clock: Callable[[], float] = time.monotonic
    queued_total: int = 0
    _peers: dict[str, _Peer] = field(default_factory=dict)
    # peers with nothing held, kept only for their token bucket: forgotten once the bucket would be full again
    _max_kept_idle: int = 4096

    def _peer(self, peer: str) -> _Peer:
        state = self._peers.get(peer)
        if state is None:
            if len(self._peers) >= self._max_kept_idle:
                self._forget_idle()
            state = self._peers[peer] = _Peer(bucket=self.limits.burst, bucket_at=self.clock())
        return state

    def _forget_idle(self) -> None:
        """Drop idle peers whose bucket has refilled (they would start full anyway): keeps memory bounded."""
        now, refill_s = self.clock(), self.limits.burst / self.limits.rate_per_s
        for peer in [p for p, s in self._peers.items() if s.idle and now - s.bucket_at >= refill_s]:
            del self._peers[peer]

    def request(self, peer: str) -> Refusal | None:
        """One request (a call or a session opening) from `peer`: takes a token from its bucket."""
        state, now = self._peer(peer), self.clock()
        state.bucket = min(self.limits.burst, state.bucket + (now - state.bucket_at) * self.limits.rate_per_s)
        state.bucket_at = now
        if state.bucket < 1:
            return Refusal(
                "quota",
                f"request rate limit: at most {self.limits.rate_per_s:g} requests/s per peer "
                f"(bursts of {self.limits.burst})",
                retry_after_s=(1 - state.bucket) / self.limits.rate_per_s,
            )
        state.bucket -= 1
        return None

    def open_session(self, peer: str, cache_tokens: int, capacity_tokens: int) -> Refusal | None:
        """Admit a session holding `cache_tokens` of a budget of `capacity_tokens`, or say which limit it breaks.
        On admission the session counts until `close_session`."""
        if (refusal := self.admits(peer, cache_tokens, capacity_tokens)) is not None:
            return refusal
        state = self._peer(peer)
        state.sessions += 1
        state.cache_tokens += cache_tokens
        return None

    def admits(self, peer: str, cache_tokens: int, capacity_tokens: int) -> Refusal | None:
        """What `open_session` would say now, counting nothing."""
        state, share_tokens = self._peers.get(peer) or _Peer(), self._share_tokens(capacity_tokens)
        if cache_tokens > share_tokens:  # no closing clears this: the request's size is at fault
            return Refusal(
                "bad_request",
                f"cache share limit: a session of {cache_tokens} cache tokens is more than a peer may hold here "
                f"({share_tokens}: {self.limits.max_cache_share:.0%} of {capacity_tokens})",
            )
        if state.sessions >= self.limits.max_sessions:
            return Refusal(
                "quota",
                f"open sessions limit: {state.sessions} of {self.limits.max_sessions} per peer are open",
            )
        if state.cache_tokens + cache_tokens > share_tokens:
            return Refusal(
                "quota",
                f"cache share limit: a peer may hold {share_tokens} cache tokens "
                f"({self.limits.max_cache_share:.0%} of {capacity_tokens}); this one holds "
                f"{state.cache_tokens} and asked for {cache_tokens} more",
            )
        return None

    def _share_tokens(self, capacity_tokens: int) -> int:
        """A peer's cache share in tokens, from the share as written (0.29 of 100 is 29; the float product
        0.29 * 100 is 28.999...)."""
        return math.floor(Fraction(str(self.limits.max_cache_share)) * capacity_tokens)

    def close_session(self, peer: str, cache_tokens: int) -> None:
        state = self._peers[peer]
        state.sessions -= 1
        state.cache_tokens -= cache_tokens

    def enqueue(self, peer: str) -> Refusal | None:
        """Admit one call for the compute thread, or say which limit it breaks; counts until `dequeue`."""
        state = self._peer(peer)
        if state.queued >= self.limits.max_queued:
            return Refusal(
                "quota",
                f"queued compute limit: {state.queued} of {self.limits.max_queued} calls per peer "
                "are already waiting for compute",
            )
        if self.queued_total >= self.limits.max_queued_total:
            return Refusal("busy", f"the server is busy: {self.queued_total} calls are waiting for compute")
        state.queued += 1
        self.queued_total += 1
        return None

    def dequeue(self, peer: str) -> None:
        self._peers[peer].queued -= 1
        self.queued_total -= 1

    def held(self, peer: str) -> tuple[int, int, int]:
        """(open sessions, cache tokens, queued calls) of a peer."""
        state = self._peers.get(peer, _Peer())
        return state.sessions, state.cache_tokens, state.queued
