"""Beam search on a server (`Step.reorder`, `Backend.reorder`): before a one-token step, the session's rows move
(row i becomes what row reorder[i] held, some beams twice), and every later output equals the span's plain
forward over the reordered sequences: with left padding, a rewind, a cache arena, the compute thread, and a
decode step merged with another session's."""

from __future__ import annotations

import asyncio

import pytest
import torch

from swarmllm.models import load_span
from swarmllm.models.tiny import make_tiny_checkpoint
from swarmllm.server.backend import Backend

# (position, reorder) of each one-token step after a 5-position prefill; position 6 rewinds
STEPS = [(5, None), (6, (2, 0, 0)), (7, (1, 1, 2)), (8, (0, 2, 1)), (6, (2, 1, 0)), (7, None), (8, (1, 1, 1))]


@pytest.fixture(scope="module")
def span(tmp_path_factory):
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("llama"), "llama")
    return load_span(str(path), 0, 4)


class _Reference:
    """Each row's sequence of inputs, reordered like the session's rows; the plain forward over it."""

    def __init__(self, span, hidden: torch.Tensor, mask: torch.Tensor):
        self.span, self.hidden, self.mask = span, hidden, mask

    def step(self, x: torch.Tensor, position: int, reorder) -> torch.Tensor:
        if reorder is not None:
            rows = torch.tensor(reorder)
            self.hidden, self.mask = self.hidden[rows], self.mask[rows]
        self.hidden = torch.cat([self.hidden[:, :position], x], 1)
        self.mask = torch.cat([self.mask[:, :position], torch.ones(x.shape[0], 1, dtype=torch.bool)], 1)
        with torch.inference_mode():
            return self.span.forward(self.hidden, key_mask=self.mask)[:, -1:]


def _inputs(span, batch: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randn(batch, 5, span.config.hidden_size, generator=generator)
    mask = torch.ones(batch, 5, dtype=torch.bool)
    mask[-1, :2] = False  # the last row is left-padded
    tokens = torch.randn(batch, len(STEPS), 1, span.config.hidden_size, generator=generator)
    return prompt, mask, tokens


def _expected(span, batch: int, seed: int, reorders: bool) -> list[torch.Tensor]:
    prompt, mask, tokens = _inputs(span, batch, seed)
    reference = _Reference(span, prompt, mask)
    with torch.inference_mode():
        want = [span.forward(prompt, key_mask=mask)]
    for i, (position, reorder) in enumerate(STEPS):
        want.append(reference.step(tokens[:, i], position, reorder if reorders else None))
    return want


async def _session_steps(backend, session, span, batch, seed, reorders=True) -> list[torch.Tensor]:
    """Prefill and STEPS through `backend` (reorders only if `reorders`): the outputs."""
    prompt, mask, tokens = _inputs(span, batch, seed)
    outs = [(await backend.step(session, prompt, 0, mask))[0]]
    for i, (position, reorder) in enumerate(STEPS):
        if reorder is not None and reorders:
            backend.reorder(session, reorder, min(position, session.length))
        outs.append((await backend.step(session, tokens[:, i], position, None))[0])
        await asyncio.sleep(0)  # a turn of the loop, as between two steps read from the network
    return outs


def _check(outs: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for out, expected in zip(outs, want, strict=True):
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "options", [{}, {"arena_length": 16}, {"inline_tokens": 0}], ids=["own", "arena", "thread"]
)
def test_reordered_rows_continue_the_sequences_they_were_given(span, options):
    backend = Backend(span, cache_tokens=200, **options)
    try:
        session = backend.open_session(0, 4, 3, 16)
        assert (session.row is not None) == ("arena_length" in options)
        _check(asyncio.run(_session_steps(backend, session, span, 3, seed=0)), _expected(span, 3, 0, True))
    finally:
        backend.shutdown()


def test_a_reordered_session_merged_with_another_keeps_both_right(span):
    """Two sessions decoding at once share merged steps (continuous batching); one reorders, one does not."""
    backend = Backend(span, cache_tokens=200)
    try:
        beams, plain = backend.open_session(0, 4, 3, 16), backend.open_session(0, 4, 2, 16)

        async def both():
            return await asyncio.gather(
                _session_steps(backend, beams, span, 3, seed=1),
                _session_steps(backend, plain, span, 2, seed=2, reorders=False),
            )

        outs_beams, outs_plain = asyncio.run(both())
        _check(outs_beams, _expected(span, 3, 1, True))
        _check(outs_plain, _expected(span, 2, 2, False))
        assert backend.batcher.merged > backend.batcher.steps  # some steps ran both sessions' rows at once
    finally:
        backend.shutdown()
