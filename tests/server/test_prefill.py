"""Chunked prefill (`Backend.step`, `prefill_chunks`): where a long step is cut, that its chunks compute what one
piece does (padding, a rewind, deep prompts longer than a chunk, the Ladder Residual pair, a sliding window), and
that another peer's prefill runs between the chunks instead of after the whole."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest
import torch

from swarmllm.models import load_span
from swarmllm.models.convert import convert_to_ladder
from swarmllm.models.tiny import make_tiny_checkpoint
from swarmllm.server.backend import Backend, prefill_chunks

BOUND = 10  # seconds; only to fail a test instead of hanging


def test_prefill_chunks_cut_a_long_step_into_even_chunks():
    for length, batch, chunk_tokens, at_least in itertools.product(
        range(1, 30), (1, 2, 3), (0, 1, 4, 7, 16), (0, 1, 5, 11)
    ):
        if at_least > length:
            continue
        chunks = prefill_chunks(length, batch, chunk_tokens, at_least)
        bounds = [a for a, _ in chunks] + [chunks[-1][1]]
        assert bounds[0] == 0 and bounds[-1] == length and all(a < b for a, b in chunks)
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(chunks))
        if chunk_tokens == 0 or length * batch <= chunk_tokens:
            assert chunks == [(0, length)]
            continue
        per = max(1, chunk_tokens // batch)  # positions a chunk may hold
        assert chunks[0][1] >= at_least  # the deep prompts' positions are in the first chunk
        even = chunks[1:] if at_least > 0 else chunks  # a first chunk held open for prompts stands apart
        sizes = [b - a for a, b in even]
        assert all(size <= per for size in sizes) and max(sizes, default=0) - min(sizes, default=0) <= 1
        rest = length - (chunks[0][1] if at_least > 0 else 0)
        assert len(even) == -(-rest // per)  # no more chunks than needed


@pytest.fixture(scope="module")
def mistral_span(tmp_path_factory):
    """Mistral (a sliding window of 4, shorter than the steps below) with 4 layers, all on one span."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("mistral"), "mistral", num_layers=4)
    return load_span(str(path), 0, 4)


def _record(backend, calls: list) -> None:
    """Append (owner, position, positions) of every job `backend._step` runs to `calls`."""
    step = backend._step

    def recorded(session, hidden, position, *args):
        calls.append((session.owner, position, hidden.shape[1]))
        return step(session, hidden, position, *args)

    backend._step = recorded


def _steps(backend, session, steps, prompts=None):
    """Each (hidden, position, new_mask) of `steps` through `backend.step`; the outputs."""

    async def main():
        outs = []
        for i, (hidden, position, mask) in enumerate(steps):
            outs.append(await backend.step(session, hidden, position, mask, prompts if i == 0 else None))
        return outs

    return asyncio.run(main())


def test_a_chunked_prefill_equals_the_plain_forward(mistral_span):
    """A left-padded batch's 21-position prefill in chunks of 4 positions (with deep prompts over its first 6,
    so a first chunk of 6), then a rewind to position 9 with 11 positions, then a decode step: each output
    equals the span's plain forward over the whole sequence so far (no cache), and so does the one-piece run."""
    span, config = mistral_span, mistral_span.config
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 21, config.hidden_size, generator=generator)
    redo = torch.randn(2, 11, config.hidden_size, generator=generator)
    last = torch.randn(2, 1, config.hidden_size, generator=generator)
    mask = torch.ones(2, 21, dtype=torch.bool)
    mask[1, :3] = False  # the second sequence is left-padded
    prompts = torch.randn(4, 1, 6, config.hidden_size, generator=generator) * 0.1
    steps = [(hidden, 0, mask), (redo, 9, None), (last, 20, None)]
    sequence = torch.cat([hidden[:, :9], redo, last], 1)
    full_mask = torch.cat([mask[:, :9], torch.ones(2, 12, dtype=torch.bool)], 1)
    with torch.inference_mode():
        first = span.forward(hidden, key_mask=mask, prompts=prompts)
        second = span.forward(
            torch.cat([hidden[:, :9], redo], 1), key_mask=full_mask[:, :20], prompts=prompts
        )
        third = span.forward(sequence, key_mask=full_mask, prompts=prompts)
    want = [first, second[:, 9:], third[:, 20:]]
    for chunk_tokens in (8, 0):  # chunks of 4 positions over 2 rows (the first of 6), then in one piece
        backend = Backend(span, cache_tokens=100, prefill_chunk_tokens=chunk_tokens, inline_tokens=0)
        try:
            calls = []
            _record(backend, calls)
            session = backend.open_session(0, 4, 2, 30)
            outs = _steps(backend, session, steps, prompts)
            for (out, p), expected in zip(outs, want, strict=True):
                assert p is None
                torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
            sizes = [size for _, _, size in calls]
            assert sizes == ([6, 3, 4, 4, 4, 3, 4, 4, 1] if chunk_tokens else [21, 11, 1])
        finally:
            backend.shutdown()


def test_a_chunked_prefill_carries_the_ladder_pair(tmp_path):
    """Where the span's first edge lies inside a ladder region, the chunks take and return (r, p): chunked and in
    one piece give the same pair."""
    source = make_tiny_checkpoint(tmp_path / "llama", "llama", num_layers=6)
    span = load_span(str(convert_to_ladder(source, tmp_path / "ladder", 1, 5)), 2, 5)  # boundary 2: (r, p)
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(1, 13, span.config.hidden_size, generator=generator)
    pending = torch.randn(1, 13, span.config.hidden_size, generator=generator)
    outs = []
    for chunk_tokens in (5, 0):
        backend = Backend(span, cache_tokens=100, prefill_chunk_tokens=chunk_tokens)
        try:
            session = backend.open_session(2, 5, 1, 16)
            assert session.pair
            outs.append(asyncio.run(backend.step(session, hidden, 0, None, None, pending)))
        finally:
            backend.shutdown()
    (r, p), (r_whole, p_whole) = outs
    torch.testing.assert_close(r, r_whole, atol=1e-5, rtol=1e-4)
    if p_whole is None:
        assert p is None
    else:
        torch.testing.assert_close(p, p_whole, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("chunk_tokens", [40, 0])
def test_another_peers_prefill_runs_between_the_chunks(mistral_span, chunk_tokens):
    """Peer a's 120-position prefill is cut into chunks of 40 (each above the inline limit: all on the compute
    thread); peer b's 40-position prefill, queued while a's first chunk waits, runs right after that chunk, not
    after the whole. In one piece (chunk_tokens 0), b waits for all of a's."""
    span, config = mistral_span, mistral_span.config
    backend = Backend(span, cache_tokens=400, prefill_chunk_tokens=chunk_tokens)
    ran = []
    _record(backend, ran)

    async def until(condition):
        async with asyncio.timeout(BOUND):
            while not condition():
                await asyncio.sleep(0.001)

    async def main():
        a = backend.open_session(0, 4, 1, 120, owner="peer-a")
        b = backend.open_session(0, 4, 1, 40, owner="peer-b")
        gate = threading.Event()
        held = backend.compute.submit(
            "gate", gate.wait, BOUND
        )  # holds the compute thread until the gate opens
        long = asyncio.ensure_future(backend.step(a, torch.randn(1, 120, config.hidden_size), 0, None))
        await until(lambda: backend.compute.waiting("peer-a") == 1)  # a's first job is queued
        short = asyncio.ensure_future(backend.step(b, torch.randn(1, 40, config.hidden_size), 0, None))
        await until(lambda: backend.compute.waiting("peer-b") == 1)
        gate.set()
        await asyncio.wrap_future(held)
        await asyncio.gather(long, short)

    try:
        asyncio.run(main())
    finally:
        backend.shutdown()
    if chunk_tokens:
        assert ran == [("peer-a", 0, 40), ("peer-b", 0, 40), ("peer-a", 40, 40), ("peer-a", 80, 40)]
    else:
        assert ran == [("peer-a", 0, 120), ("peer-b", 0, 40)]
