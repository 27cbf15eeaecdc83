"""A server's prefix cache: the keys, values and outputs of positions that sessions computed, found again by the
next session whose inputs begin the same (vLLM's automatic prefix caching, over hidden states).

Why: many clients send the same beginning (a chat's system prompt, a few-shot preamble, a conversation resent whole
each turn), and its prefill is the same work each time: a server that kept it copies it instead.

Keys: a server sees hidden states, not tokens, and takes no client's word for what they are: it hashes the inputs
it received. Positions go in blocks of `BLOCK_TOKENS`; block j's key hashes block j-1's key with the bytes of
block j's inputs, and the first block's parent (`root_key`) names the span's blocks [start, end). A span's keys,
values and outputs at a position are a function of its inputs up to that position (causal attention), so a key
found means the values a prefill would compute (up to the rounding of a different chunking). The root also names
the session's LoRA adapter by its contents. Only sessions whose steps the inputs (and the adapter) alone decide take
part: one row, no deep prompts, no padding, r alone on the edges.

Memory: entries hold cache tokens of the server's budget (owner `OWNER`) and count as free: a session that needs
them takes them, least recently used first. Their outputs wait in host memory, as replies do.

In flight: blocks that a session computes now are claimed (`claim`) until its step ends (`settle`); a session
that would compute them too waits for them instead (sessions that send one beginning at once, a burst of users
with one system prompt), as a server's compute thread would have run the two prefills one after the other anyway.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Collection
from dataclasses import dataclass, field

import torch

from swarmllm.server.cache import CacheBudget
from swarmllm.wire.prefix import BLOCK_TOKENS

OWNER = "prefix"


def root_key(start: int, end: int, adapter: bytes = b"") -> bytes:
    """The parent of a chain's first block: the span's blocks it runs through, and the fingerprint of the adapter
    its session applies (`Adapter.fingerprint`; none: empty)."""
    return hashlib.blake2b(f"swarmllm-prefix:{start}:{end}:".encode() + adapter, digest_size=16).digest()


@dataclass(frozen=True)
class Entry:
    """One block of positions over a span: keys and values [blocks, kv heads, BLOCK_TOKENS, head dim] on the
    server's device, and the span's outputs [BLOCK_TOKENS, H] in host memory."""

    keys: torch.Tensor
    values: torch.Tensor
    out: torch.Tensor


@dataclass
class Chain:
    """Where a session stands in the prefix cache: `key` covers its whole blocks [0, done); `tail` holds the
    inputs and outputs ([t, H] each) of the positions after them, short of a block. Alive only while it has
    followed every step of the session: `end` is then the session's length."""

    key: bytes
    done: int = 0
    tail: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def tail_length(self) -> int:
        return sum(inputs.shape[0] for inputs, _ in self.tail)

    @property
    def end(self) -> int:
        return self.done + self.tail_length


class PrefixCache:
    """Entries by key, least recently used first, within `capacity_tokens` of the server's cache budget."""

    def __init__(self, budget: CacheBudget, capacity_tokens: int, block: int = BLOCK_TOKENS):
        self.budget, self.capacity_tokens, self.block = budget, capacity_tokens, block
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()
        self._computing: dict[bytes, asyncio.Event] = {}  # blocks a session computes now: set when it is done
        self.hit_tokens = 0  # positions copied instead of computed, since the server started

    @property
    def tokens(self) -> int:
        return len(self._entries) * self.block

    def held(self, keys: list[bytes]) -> int:
        """How many of `keys`, from the first, are held (not marked used)."""
        run = 0
        while run < len(keys) and keys[run] in self._entries:
            run += 1
        return run

    def find(self, keys: list[bytes]) -> list[Entry]:
        """The entries of the longest run of `keys` from the first, marked used (the run's first last, so that its
        later blocks, which need the earlier ones to be found, go first)."""
        found = [self._entries[key] for key in keys[: self.held(keys)]]
        for key in reversed(keys[: len(found)]):
            self._entries.move_to_end(key)
        self.hit_tokens += len(found) * self.block
        return found

    def computing(self, key: bytes) -> asyncio.Event | None:
        """Set when the session computing this block now is done with it (None: none is)."""
        return self._computing.get(key)

    def claim(self, keys: list[bytes]) -> list[bytes]:
        """Mark the blocks a session is about to compute (those neither held nor claimed by another); returns the
        ones claimed, for `settle`. Each has its own event: they are settled chunk by chunk of the prefill."""
        claimed = [key for key in keys if key not in self._entries and key not in self._computing]
        for key in claimed:
            self._computing[key] = asyncio.Event()
        return claimed

    def settle(self, claimed: list[bytes]) -> None:
        """The claiming session is done with these blocks (kept, or not): whoever waits for them goes on."""
        for key in claimed:
            if (event := self._computing.pop(key, None)) is not None:
                event.set()

    def add(self, items: list[tuple[bytes, Entry]], before: Collection[bytes] = ()) -> bool:
        """Keep these blocks (a chain's, in order), older entries making room within the capacity but those of
        `before` (the chain's blocks before these: without them these are unreachable); False where some found
        no room (the chain's later ones, unreachable without the earlier)."""
        new = [key for key, _ in items if key not in self._entries]
        while self.tokens + len(new) * self.block > self.capacity_tokens and self._drop_oldest(before):
            pass
        room = max(0, min(self.capacity_tokens - self.tokens, self.budget.free_tokens)) // self.block
        keep = set(new[:room])
        for key, entry in reversed(items):  # the chain's first ends up most recently used
            if key in keep:
                self._entries[key] = entry
            if key in self._entries:
                self._entries.move_to_end(key)
        self._hold()
        return len(keep) == len(new)

    def evict(self, tokens: int) -> None:
        """Free at least `tokens` of the budget's tokens held here (all if there are fewer), oldest first."""
        freed = 0
        while freed < tokens and self._entries:
            self._drop_oldest()
            freed += self.block

    def _drop_oldest(self, spare: Collection[bytes] = ()) -> bool:
        """Drop the least recently used entry not in `spare`; False where there is none."""
        for key in self._entries:
            if key not in spare:
                del self._entries[key]
                self._hold()
                return True
        return False

    def _hold(self) -> None:
        self.budget.release(OWNER)
        if self._entries:
            self.budget.reserve(OWNER, self.tokens)
