"""Inference sessions kept between API requests, so that a prompt that extends an earlier one (a conversation's
next turn: the history, the answer, the new message) sends the servers only what they do not hold yet, as
vLLM's prefix caching and Ollama's kept context do.

A request takes the kept session whose tokens share the longest prefix with its prompt (and that has room for
its answer); the session's own prefix reuse (`RemoteSession.reusable_prefix`) then rewinds it to that prefix and
sends the rest. Without one, a new session opens, with `headroom` positions more than the request needs so that
a next turn fits. A finished request gives its session back; beyond `size` sessions, or after `idle_s` unused,
the least recently used is closed, since a kept session holds cache memory on its servers.

`best_match` is the choice, a plain function; `SessionPool` owns the sessions (a lock, as requests run in worker
threads).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from swarmllm.client.model import RemoteSession

logger = logging.getLogger(__name__)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the common case (a sequence grown from the other), compared at C speed
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def best_match(kept: Sequence[tuple[Sequence[int], int]], prompt: Sequence[int], need: int) -> int | None:
    """Which of the kept sessions ((tokens held, max length) each) shares the longest prefix with `prompt`
    among those with room for `need` positions (the first such on a tie), or None when none shares a token."""
    best, best_length = None, 0
    for i, (tokens, max_length) in enumerate(kept):
        length = common_prefix(tokens, prompt)
        if max_length >= need and length > best_length:
            best, best_length = i, length
    return best


@dataclass
class _Kept:
    remote: RemoteSession  # idle
    tokens: list[int]  # what its servers hold, from position 0
    given: float  # when it was given back (time.monotonic)


class SessionPool:
    """Up to `size` idle inference sessions of `model` (a DistributedModelForCausalLM); 0 keeps none."""

    def __init__(
        self, model, *, size: int = 4, idle_s: float = 120.0, headroom: int = 512, context_length: int
    ):
        self.model, self.size, self.idle_s, self.headroom = model, size, idle_s, headroom
        self.context_length = context_length
        self._kept: list[_Kept] = []  # least recently given back first
        self._lock = threading.Lock()

    def take(self, prompt: list[int], need: int) -> tuple[RemoteSession, int]:
        """A session for a request of `prompt` that needs `need` positions (prompt and answer), and how many of
        the prompt's tokens its servers hold already (at most all but the last, which the request sends)."""
        self._close(self._expired())
        with self._lock:
            i = best_match([(k.tokens, k.remote.max_length) for k in self._kept], prompt, need)
            kept = None if i is None else self._kept.pop(i)
        if kept is not None:
            return kept.remote, min(common_prefix(kept.tokens, prompt), len(prompt) - 1)
        headroom = self.headroom if self.size else 0  # (keeping none, no next turn reuses it)
        length = max(need, min(self.context_length, need + headroom))
        return self.model.open_session(length), 0

    @contextlib.contextmanager
    def use(self, prompt: list[int], need: int) -> Iterator[tuple[RemoteSession, int]]:
        """A session for a request (see `take`), the calling thread's inside the block (`use_session`): given
        back after it, closed if it raised. Yields it and how many of the prompt's tokens its servers hold."""
        remote, cached = self.take(prompt, need)
        try:
            with self.model.use_session(remote):
                yield remote, cached
        except BaseException:
            self.drop(remote)
            raise
        self.give(remote)

    def give(self, remote: RemoteSession) -> None:
        """A request is done with `remote`: keep it for the next (closing the least recently used beyond
        `size`)."""
        held = remote.input_ids
        tokens = [] if held is None or held.shape[0] != 1 else held[0, : remote.position].tolist()
        with self._lock:
            self._kept.append(_Kept(remote, tokens, time.monotonic()))
            excess = max(0, len(self._kept) - self.size)
            over, self._kept = self._kept[:excess], self._kept[excess:]
        self._close([k.remote for k in over])

    def drop(self, remote: RemoteSession) -> None:
        """A request failed with `remote`: close it (what its servers hold is not known)."""
        self._close([remote])

    def close_all(self) -> int:
        """Close every kept session (their cache on the servers is freed as each server sees it); how many."""
        with self._lock:
            kept, self._kept = self._kept, []
        self._close([k.remote for k in kept])
        return len(kept)

    def _expired(self) -> list[RemoteSession]:
        """Kept sessions unused past `idle_s`, or closed meanwhile (a requester that left closes its session: one
        given back just then must not serve another)."""
        now = time.monotonic()
        with self._lock:
            old = [k for k in self._kept if now - k.given > self.idle_s or k.remote.closed]
            self._kept = [k for k in self._kept if k not in old]
        return [k.remote for k in old]

    def _close(self, remotes: list[RemoteSession]) -> None:
        for remote in remotes:
            try:
                self.model.close_session(remote)
            except Exception as e:  # noqa: BLE001 - a server gone meanwhile: nothing left to close there
                logger.debug("closing a kept session failed: %r", e)
