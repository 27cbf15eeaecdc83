"""A whole model in one process: embeddings, every block, final norm and LM head, standard or ladder.

The local reference a swarm's output is compared with, and what conversion and retraining (`swarmllm ladder`)
compute perplexity and gradients with. It reuses ClientHead and BlockSpan, so it runs exactly the math servers
run; it has no sessions, no network and no sampling beyond greedy.
"""

from __future__ import annotations

import math
from os import PathLike

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from swarmllm.models.checkpoint import load_client_head, load_span
from swarmllm.models.llama import BlockSpan, ClientHead, KVCache


class CausalLM(nn.Module):
    def __init__(self, head: ClientHead, span: BlockSpan):
        super().__init__()
        if (span.start, span.end) != (0, span.config.num_layers):
            raise ValueError(
                f"a whole model needs blocks [0, {span.config.num_layers}), got {span.start}:{span.end}"
            )
        self.head, self.span, self.config = head, span, span.config

    def forward(
        self, input_ids: Tensor, *, key_mask: Tensor | None = None, cache: KVCache | None = None, pos: int = 0
    ) -> Tensor:
        """Logits [B, T, vocab] of input_ids [B, T] at cache slots [pos, pos+T); key_mask as in BlockSpan.forward."""
        hidden = self.span(self.head.embed(input_ids), pos=pos, key_mask=key_mask, cache=cache)
        return self.head.logits(hidden)

    @torch.no_grad()
    def generate_greedy(self, input_ids: Tensor, max_new_tokens: int) -> Tensor:
        """input_ids [B, T] followed by `max_new_tokens` greedy tokens: a prefill, then one-token steps through
        the lean decode path (`BlockSpan.decode`), as a server runs them."""
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {max_new_tokens}")
        if max_new_tokens == 0:
            return input_ids.clone()
        batch, length = input_ids.shape
        dtype = self.head.embed_tokens.weight.dtype
        device = input_ids.device
        cache = KVCache(self.config.num_layers, batch, length + max_new_tokens, self.config, dtype, device)
        token = self(input_ids, cache=cache)[:, -1].argmax(-1)
        out = [input_ids, token[:, None]]
        for slot in range(length, length + max_new_tokens - 1):
            hidden = self.span.decode(
                self.head.embed(token),
                torch.full((batch,), slot, device=device),
                torch.tensor([slot], device=device),
                cache.keys[:, :, :, : slot + 1],
                cache.values[:, :, :, : slot + 1],
            )
            token = self.head.logits(hidden).argmax(-1)
            out.append(token[:, None])
        return torch.cat(out, dim=1)


def load_causal_lm(
    path: str | PathLike, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
) -> CausalLM:
    _, head = load_client_head(path, dtype=dtype, device=device)
    span = load_span(path, 0, head.config.num_layers, dtype=dtype, device=device)
    return CausalLM(head, span)


def loss_per_token(model: CausalLM, sequences: Tensor) -> Tensor:
    """Mean next-token cross-entropy over sequences [N, T] (every position predicts the next)."""
    logits = model(sequences[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), sequences[:, 1:].flatten())


@torch.no_grad()
def perplexity(model: CausalLM, sequences: Tensor, batch_size: int = 16) -> float:
    """exp of the mean next-token cross-entropy over sequences [N, T], in batches."""
    total, count = 0.0, 0
    for i in range(0, len(sequences), batch_size):
        chunk = sequences[i : i + batch_size]
        predicted = chunk[:, 1:].numel()
        total += loss_per_token(model, chunk).item() * predicted
        count += predicted
    return math.exp(total / count)
