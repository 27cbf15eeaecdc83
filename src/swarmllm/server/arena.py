"""A server's shared KV-cache arena: one preallocated cache whose rows the sessions borrow (on CUDA, by default).

Why: a CUDA graph replays fixed addresses. With a cache tensor per session, a graph is valid for that session
(or one cohort of sessions) alone, and every new session is captured anew. With the sessions' caches as rows of
one arena, a graph per bucket of (rows, attended slots) serves every step of any mix of sessions, single or
merged, for the server's whole life (`DecodeRunner`'s row graphs): CUDA graphs per batch-size bucket.

Layout: keys/values [n, rows, kv, 1 + length, hd] and key_mask [rows, 1 + length]. Slot 0 of every row is a
scratch slot that no session owns and every mask leaves out: in a step over rows [0, N), a row without a step
of its own writes its (discarded) keys and values there, so it never touches the cache of a session that is
not in the step. A session's cache is the view of its rows over slots [1, 1 + max_length): every other path
(prefill, eager decode, rewinds) uses it as it would a cache of its own.

Memory: the arena's tokens are reserved in the server's `CacheBudget` once, when it is made; a session that
fits in it (max_length <= length, rows free) takes rows instead of a reservation of its own, one that does not
gets a cache of its own as before.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch

from swarmllm.models import BlockConfig, KVCache

ARENA_LENGTH = 1024  # the slots of an arena row on CUDA: the longest session it takes
ARENA_SHARE = 2  # the arena takes at most 1/ARENA_SHARE of the server's cache tokens
MAX_ARENA_ROWS = 64


def arena_rows(cache_tokens: int, length: int) -> int:
    """How many rows of `length` slots an arena gets from a budget of `cache_tokens` (their scratch slots come
    on top: still within the budget)."""
    if length <= 0:
        return 0
    return min(MAX_ARENA_ROWS, cache_tokens // ARENA_SHARE // length)


def first_fit(taken: Sequence[bool], count: int) -> int | None:
    """The lowest row that starts `count` consecutive free rows, None if there is no such run. Lowest first keeps
    the rows in use packed at the bottom, so that steps run the smallest row bucket."""
    run = 0
    for row, busy in enumerate(taken):
        run = 0 if busy else run + 1
        if run == count:
            return row - count + 1
    return None


class CacheArena:
    """Rows of one preallocated KV cache over a span of `num_blocks` blocks (see the module doc)."""

    def __init__(
        self,
        num_blocks: int,
        rows: int,
        length: int,
        config: BlockConfig,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_blocks, rows, config.num_kv_heads, 1 + length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_mask = torch.ones(rows, 1 + length, dtype=torch.bool, device=device)
        self.key_mask[:, 0] = False  # the scratch slot: never attended
        self.length = length
        self._taken = [False] * rows
        self._lock = threading.Lock()  # rows are taken on the event loop, given back on the compute thread

    @property
    def rows(self) -> int:
        return len(self._taken)

    @property
    def tokens(self) -> int:
        """The cache tokens the arena holds, its scratch slots included."""
        return self.rows * (1 + self.length)

    @property
    def free_rows(self) -> int:
        with self._lock:
            return self._taken.count(False)

    def taken(self) -> list[bool]:
        """Which rows are taken now (a copy)."""
        with self._lock:
            return list(self._taken)

    def fits(self, batch_size: int, max_length: int) -> bool:
        """Whether `take` would find rows for such a session now."""
        if max_length > self.length:
            return False
        with self._lock:
            return first_fit(self._taken, batch_size) is not None

    def take(self, batch_size: int, max_length: int) -> tuple[int, KVCache, torch.Tensor] | None:
        """Rows for a session of `batch_size` sequences of up to `max_length` tokens: (its first row, its cache,
        its key mask [batch_size, max_length], all True), views into the arena; None when it does not fit."""
        if max_length > self.length:
            return None
        with self._lock:
            row = first_fit(self._taken, batch_size)
            if row is None:
                return None
            self._taken[row : row + batch_size] = [True] * batch_size
        rows, slots = slice(row, row + batch_size), slice(1, 1 + max_length)
        key_mask = self.key_mask[rows, slots]
        key_mask.fill_(True)
        return row, KVCache.over(self.keys[:, rows, :, slots], self.values[:, rows, :, slots]), key_mask

    def give(self, row: int, batch_size: int) -> None:
        """A session's rows are free again (what they hold is never attended before it is overwritten)."""
        with self._lock:
            self._taken[row : row + batch_size] = [False] * batch_size
