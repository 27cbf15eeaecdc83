"""Which servers likely hold a session's beginning: this client's memory of the beginnings it sent where.

A server keeps what its sessions computed in its prefix cache (`server.prefix`), and a session whose inputs begin
as an earlier one's did copies them there instead of computing them again, if it goes to the same server for the
same blocks. Routing cannot ask every server what it holds, and need not: this client remembers which spans it sent
which beginnings to (keys of its sessions' inputs, block by block: `wire.prefix`), and routing counts them as
likely held (`routing.Demand`), so that a conversation's next turn, or the next user of a system prompt, goes back
where its beginning is rather than to an idler copy of the same blocks. It is a guess: the server may have let them
go for room, and what other clients sent there is not known; a wrong guess costs a prefill, as no guess would.

Only beginnings that servers keep are remembered: a session's rows alike (one row, or a prompt repeated for beams),
unpadded, without deep prompts.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

import torch

from swarmllm.wire.prefix import BLOCK_TOKENS, block_keys

ROOT = b"swarmllm-client-beginning"  # the parent of a session's first block's key (this client's own names)
CAPACITY = 1 << 16  # blocks remembered (least recently noted forgotten first): ~1M positions, a few MiB

Span = tuple[str, int, int]  # (peer id, start, end): a server's blocks that a session went through


def entry_keys(hidden: torch.Tensor, key_mask: torch.Tensor | None = None) -> list[bytes]:
    """Keys of the whole blocks of a session's inputs [batch, T, H] from position 0; [] where servers would not
    keep them (rows that differ, padding)."""
    if key_mask is not None and not bool(key_mask.all()):
        return []
    if hidden.shape[0] > 1 and not bool((hidden == hidden[:1]).all()):
        return []
    return block_keys(ROOT, hidden[0].detach().cpu())


class PrefixMemory:
    """The spans this client sent each beginning to, by its blocks' keys."""

    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self._spans: OrderedDict[bytes, set[Span]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._spans)

    def note(self, spans: Iterable[Span], keys: Sequence[bytes]) -> None:
        """A session whose inputs' blocks have these keys went through `spans`."""
        spans = set(spans)
        for key in keys:
            self._spans[key] = self._spans.pop(key, set()) | spans
        while len(self._spans) > self.capacity:
            self._spans.popitem(last=False)

    def held(self, keys: Sequence[bytes]) -> dict[Span, int]:
        """Span -> how many positions of the beginning these keys name its server likely holds: its blocks noted
        there, from the first, without a gap."""
        held: dict[Span, int] = {}
        alive: set[Span] | None = None
        for j, key in enumerate(keys):
            spans = self._spans.get(key)
            alive = set(spans or ()) if alive is None else alive & (spans or set())
            if not alive:
                break
            for span in alive:
                held[span] = (j + 1) * BLOCK_TOKENS
        return held
