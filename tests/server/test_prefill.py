"""Chunked prefill (`Backend.step`, `prefill_chunks`): where a long step is cut, that its chunks compute what one
piece does (padding, a rewind, deep prompts longer than a chunk, the Ladder Residual pair, a sliding window), and
that another peer's prefill runs between the chunks instead of after the whole."""

from __future__ import annotations

import asyncio
import itertools
import threading

import pytest
import torch
from test_handler import _until

from swarmllm.models import load_span
from swarmllm.models.convert import convert_to_ladder
from swarmllm.models.tiny import make_tiny_checkpoint
from swarmllm.server.backend import Backend, prefill_chunks
from swarmllm.server.handler import RequestHandler
from swarmllm.wire import DirectServer, Identity, Message, connect_direct
from swarmllm.wire.messages import PushTarget, Step

BOUND = 10  # seconds; only to fail a test instead of hanging
HIDDEN = 64  # the tiny llama's


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

    async def main():
        a = backend.open_session(0, 4, 1, 120, owner="peer-a")
        b = backend.open_session(0, 4, 1, 40, owner="peer-b")
        gate = threading.Event()
        held = backend.compute.submit(
            "gate", gate.wait, BOUND
        )  # holds the compute thread until the gate opens
        long = asyncio.ensure_future(backend.step(a, torch.randn(1, 120, config.hidden_size), 0, None))
        await _until(lambda: backend.compute.waiting("peer-a") == 1)  # a's first job is queued
        short = asyncio.ensure_future(backend.step(b, torch.randn(1, 40, config.hidden_size), 0, None))
        await _until(lambda: backend.compute.waiting("peer-b") == 1)
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


async def test_a_prefill_goes_on_in_parts_and_the_next_server_answers_once(llama_checkpoint):
    """Two servers of one chain, over real connections: the first prefills a 12-position step in chunks of 4
    and pushes each chunk's output on at once, so the second computes part k while the first computes k + 1
    (the first's second chunk waits until the second server has computed part 0: without the parts it would
    wait in vain). The second answers the client once, with the whole step, equal to the span's forward, and
    its cache is right for the next step. A part that does not start its step is dropped (the client sends the
    step itself), and a step pushed again from its start (a replacement of the previous server) is answered
    once."""
    span = load_span(str(llama_checkpoint), 0, 4)
    first_id, second_id, client_id = (Identity.generate() for _ in range(3))
    second_backend = Backend(load_span(str(llama_checkpoint), 2, 4), cache_tokens=64, inline_tokens=0)
    parts, part_done = [], threading.Event()
    _record(second_backend, parts)
    step2 = second_backend._step
    second_backend._step = lambda *args: (step2(*args), part_done.set())[0]
    second = DirectServer(RequestHandler(second_backend, dict).handlers(), second_id)
    await second.start()

    async def connect(peer_id: str):
        return await connect_direct(*second.address, first_id, expected_peer_id=peer_id)

    first_backend = Backend(
        load_span(str(llama_checkpoint), 0, 2), cache_tokens=64, inline_tokens=0, prefill_chunk_tokens=4
    )
    step1 = first_backend._step

    def gated(session, hidden, position, *args):  # the first's later chunks wait for the second's part 0
        assert position == 0 or part_done.wait(BOUND), (
            "the second server got no part while the first prefilled"
        )
        return step1(session, hidden, position, *args)

    first_backend._step = gated
    first = DirectServer(RequestHandler(first_backend, dict, connect=connect).handlers(), first_id)
    await first.start()
    try:
        to_first = await connect_direct(*first.address, client_id, expected_peer_id=first_id.peer_id)
        to_second = await connect_direct(*second.address, client_id, expected_peer_id=second_id.peer_id)
        opening = {"batch_size": 1, "max_length": 32}
        s1 = await to_first.open_stream("inference", Message({**opening, "start": 0, "end": 2}))
        s2 = await to_second.open_stream(
            "inference",
            Message(
                {
                    **opening,
                    "start": 2,
                    "end": 4,
                    "session_id": "b" * 24,
                    "accept_push_from": first_id.peer_id,
                }
            ),
        )
        hidden = torch.randn(1, 12, HIDDEN)
        chain = [PushTarget(second_id.peer_id, "b" * 24)]
        await s1.send(Step(0, hidden, step=1, push=chain).to_message())
        r1 = await s1.recv(timeout=BOUND)
        assert r1.meta["pushed"] is True
        r2 = await s2.recv(timeout=BOUND)
        assert r2.meta["step"] == 1 and r2.meta["position"] == 0
        torch.testing.assert_close(r2.tensors[0], span(hidden), rtol=1e-5, atol=1e-5)
        assert [(position, size) for _, position, size in parts] == [(0, 4), (4, 4), (8, 4)]

        inputs = [r1.tensors[0]]  # the second server's inputs so far

        def want(new):  # the second server's output for `new`, after all its inputs so far
            inputs.append(new)
            with torch.inference_mode():
                return span(torch.cat(inputs, 1), blocks=slice(2, 4))[:, -new.shape[1] :]

        # its cache holds the 12 positions: a decode step after them is right
        token = torch.randn(1, 1, HIDDEN)
        await s2.send(Step(12, token, step=2).to_message())
        reply = await s2.recv(timeout=BOUND)
        torch.testing.assert_close(reply.tensors[0], want(token), rtol=1e-5, atol=1e-5)

        as_first = await connect_direct(*second.address, first_id, expected_peer_id=None)
        errors = []

        async def push(position, new, step, whole):
            message = Step(position, new, step=step, session_id="b" * 24, whole=whole).to_message()
            await as_first.notify("push", message, errors.append)

        # a part that does not start its step is dropped; the client's own step is answered
        three = torch.randn(1, 6, HIDDEN)
        await push(16, three[:, 3:], 3, (13, 19))
        await s2.send(Step(13, three, step=3).to_message())
        reply = await s2.recv(timeout=BOUND)
        assert reply.meta["step"] == 3
        torch.testing.assert_close(reply.tensors[0], want(three), rtol=1e-5, atol=1e-5)

        # a step pushed again from its start: computed again, answered once, with the second push's outputs
        four = torch.randn(1, 6, HIDDEN)
        await push(19, torch.randn(1, 3, HIDDEN), 4, (19, 25))
        await push(19, four[:, :3], 4, (19, 25))
        await push(22, four[:, 3:], 4, (19, 25))
        reply = await s2.recv(timeout=BOUND)
        assert reply.meta["step"] == 4 and reply.meta["position"] == 19
        torch.testing.assert_close(reply.tensors[0], want(four), rtol=1e-5, atol=1e-5)
        five = torch.randn(1, 1, HIDDEN)
        await s2.send(Step(25, five, step=5).to_message())
        reply = await s2.recv(timeout=BOUND)
        assert reply.meta["step"] == 5  # no second answer to step 4 came before it
        torch.testing.assert_close(reply.tensors[0], want(five), rtol=1e-5, atol=1e-5)
        assert errors == []

        # a client may not send part of a step
        await s2.send(Step(26, five, step=6, whole=(26, 28)).to_message())
        reply = await s2.recv(timeout=BOUND)
        assert reply.meta["error"]["code"] == "bad_request", reply.meta
        assert "only the previous server" in reply.meta["error"]["message"]
        for conn in (to_first, to_second, as_first):
            await conn.close()
    finally:
        await first.stop()
        await second.stop()
