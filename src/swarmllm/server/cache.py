"""KV-cache memory accounting: how many cache tokens a server has, who holds them.

Pure bookkeeping, no tensors: the backend asks `reserve` before it allocates a session's cache and calls
`release` when the session ends for any reason, so the announced `cache_tokens_left` is always true.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class CacheFullError(Exception):
    """A session asked for more cache tokens than are free."""


@dataclass
class CacheBudget:
    """Token-granular budget shared by all sessions of one server (a token = one position of one sequence)."""

    capacity_tokens: int
    _held: dict[str, int] = field(default_factory=dict)

    @property
    def used_tokens(self) -> int:
        return sum(self._held.values())

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self.used_tokens

    def reserve(self, owner: str, tokens: int) -> None:
        if tokens <= 0:
            raise ValueError(f"a reservation needs a positive number of tokens, got {tokens}")
        if owner in self._held:
            raise ValueError(f"{owner!r} already holds a reservation")
        if tokens > self.free_tokens:
            raise CacheFullError(
                f"session needs {tokens} cache tokens, {self.free_tokens} of {self.capacity_tokens} are free"
            )
        self._held[owner] = tokens

    def release(self, owner: str) -> int:
        """Free an owner's tokens; releasing twice is harmless (returns 0)."""
        return self._held.pop(owner, 0)
