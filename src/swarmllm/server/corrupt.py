"""FOR TESTS ONLY: a server that lies. `--corrupt-every N` (hidden from `swarmllm serve --help`) makes every Nth
output of this server's backend (inference steps, forwards and backwards alike, pushed or not; each chunk of a
prefill counts as one; a backward's output is the gradient of its input) wrong by noise of about half
the output's norm, so that the client's spot checks (`client.verify`) can be tested against a real process.
Never set it on a server that serves anyone."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import AsyncIterator

import torch

from swarmllm.server.backend import Backend, Gradients

NOISE = 0.5  # the noise's norm per token, relative to the output's


def corrupted(out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """`out` plus Gaussian noise of NOISE x its norm per token (the same noise whatever the output's dtype)."""
    noise = torch.randn(out.shape, generator=generator, dtype=torch.float32)
    noise *= (
        NOISE * out.float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    )
    return (out.float() + noise.to(out.device)).to(out.dtype)


def corrupt_outputs(backend: Backend, every: int) -> None:
    """Make every `every`-th output of `backend` wrong (0: leave it honest)."""
    if every <= 0:
        return
    count, generator = itertools.count(1), torch.Generator().manual_seed(every)
    step_chunks, forward, backward = backend.step_chunks, backend.forward, backend.backward

    def maybe(out: tuple[torch.Tensor, torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The output r is corrupted (a ladder pair's p is left as it is)."""
        hidden, pending = out
        return (corrupted(hidden, generator) if next(count) % every == 0 else hidden), pending

    async def corrupt_steps(*args, **kwargs) -> AsyncIterator[tuple]:
        async for a, b, *out in step_chunks(*args, **kwargs):
            yield a, b, *maybe(out)

    async def corrupt_forward(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        return maybe(await forward(*args, **kwargs))

    async def corrupt_backward(*args, **kwargs) -> Gradients:
        grads = await backward(*args, **kwargs)
        hidden, _ = maybe((grads.hidden, None))
        return dataclasses.replace(grads, hidden=hidden)

    # steps reach the handler chunk by chunk (`Backend.step_chunks`, which `Backend.step` runs too)
    backend.step_chunks, backend.forward, backend.backward = corrupt_steps, corrupt_forward, corrupt_backward
