"""A backend whose span runs tensor-parallel over N processes (`swarmllm serve --tp N`; the runner is `server.tp`).

Every call on the sharded span is a sequence of collectives that all ranks must meet in the same order, so all of
this backend's work, decode steps included, runs on its one compute thread, one call after another: no step runs
inline on the event loop, and decode steps are not merged across sessions (each is its own call). A session's KV
cache lives on the ranks, each holding its kv heads, named by the id `TensorParallelSpan.open_cache` gives (the
ranks allocate it with the session's first step); closing the session frees it there, on the same thread. Ladder
pairs (r, p) work as in `Backend`, and the ladder layers' all-reduces overlap the next sub-layer on the ranks.

Not here yet (`tunable` is False, so the handler refuses them): deep prompts, LoRA adapters and backward; the
sharded span has no prompt, adapter or autograd path.
"""

from __future__ import annotations

from concurrent.futures import Future

import torch

from swarmllm.models.llama import position_ids
from swarmllm.server.adapters import Adapter
from swarmllm.server.backend import Backend, Session
from swarmllm.server.tp import TensorParallelSpan


class TensorParallelBackend(Backend):
    """`Backend` over a `TensorParallelSpan`; `span` is rank 0's shard (the config, blocks and dtype it serves),
    `parallel` runs the calls over every rank."""

    tunable = False

    def __init__(
        self, parallel: TensorParallelSpan, *, cache_tokens: int, prefill_chunk_tokens: int | None = None
    ):
        super().__init__(
            parallel.span,
            cache_tokens=cache_tokens,
            device=parallel.device,
            inline_tokens=0,
            cuda_graphs=False,
            prefill_chunk_tokens=prefill_chunk_tokens,
        )
        self.parallel = parallel

    def _new_cache(self, blocks: int, batch_size: int, max_length: int) -> int:
        return self.parallel.open_cache(batch_size, max_length, blocks)

    def close_session(self, session: Session) -> Future | None:
        freed = super().close_session(session)
        self.compute.submit(session.owner, self.parallel.close_cache, session.cache)
        return freed

    def _reorder_cache(self, session: Session, index: torch.Tensor, length: int) -> None:
        """On the ranks' caches: a job of the compute thread, queued before the session's next step in its
        owner's turn."""
        self.compute.submit(session.owner, self.parallel.reorder_cache, session.cache, index.tolist(), length)

    def _forward(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None,
        blocks: slice,
        prompts: torch.Tensor | None = None,
        adapter: Adapter | None = None,
        dropout_seed: int | None = None,
        pending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden, pending = hidden.to(self.device, self.dtype), self._on_device(pending)
        return self._on_host(*self.parallel.forward_pair(hidden, pending, key_mask=key_mask, blocks=blocks))

    def _step(
        self,
        session: Session,
        hidden: torch.Tensor,
        position: int,
        new_mask: torch.Tensor | None,
        prompts: torch.Tensor | None = None,
        pending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length = hidden.shape[:2]
        end = position + length
        hidden, pending = hidden.to(self.device, self.dtype), self._on_device(pending)
        self._note_mask(session, position, end, new_mask)
        key_mask = session.key_mask[:, :end] if session.padded else None
        blocks = self._blocks(session.start, session.end)
        if length == 1:  # the lean one-token path, attending to exactly the slots so far
            positions = position_ids(key_mask, batch, 1, position, self.device)[:, 0]
            p = None if pending is None else pending[:, 0]
            r, p = self.parallel.decode_pair(
                hidden[:, 0], p, positions, position, session.cache, end, key_mask, blocks
            )
            out = r[:, None], None if p is None else p[:, None]
        else:
            out = self.parallel.forward_pair(
                hidden, pending, pos=position, key_mask=key_mask, cache=session.cache, blocks=blocks
            )
        session.length = end
        return self._on_host(*out)  # (on a GPU, copied on the compute thread's stream: `Backend._host`)

    def failure(self) -> str | None:
        return self.parallel.failure()

    def shutdown(self) -> None:
        """Close the sessions, then stop the other ranks (after the calls already queued for them)."""
        for session in list(self.sessions.values()):
            self.close_session(session)
        self.compute.submit("", self.parallel.close).result()
        super().shutdown()
