"""Continuous batching: when merged steps run (the batcher alone), and that a session's outputs through merged
steps equal its solo run, with its own cache length, padding and LoRA adapter (the span and the backend)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import torch
from clocks import Clock

from swarmllm.models import KVCache, load_span
from swarmllm.models.llama import DecodeSegment
from swarmllm.models.lora import LoraSettings, lora_shapes, span_lora
from swarmllm.server.adapters import Adapter
from swarmllm.server.backend import Backend
from swarmllm.server.batching import DecodeBatcher
from swarmllm.server.decode import MAX_COHORTS, DecodeRunner, Member, cohort_key

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(config, settings, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = lora_shapes(config, settings, range(config.num_layers))
    return {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def span(llama_checkpoint):
    return load_span(llama_checkpoint, 0, 4)


# ---- the batcher's decisions, with a trivial run function ----


class Recorder:
    def __init__(self):
        self.batches: list[list[str]] = []

    def __call__(self, requests):
        self.batches.append(list(requests))
        return [f"out-{r}" for r in requests]


def test_a_lone_session_runs_at_once_and_lockstep_sessions_merge():
    async def main():
        run = Recorder()
        batcher = DecodeBatcher(run, max_wait_s=10.0)
        assert await batcher.step("a", "a0") == "out-a0"  # nobody else decoding: no wait at all
        assert run.batches == [["a0"]]
        # b joins, a steps first: a does not wait for b, which it does not know as decoding yet; b's first
        # decode step waits (within its budget) for a, now decoding, and runs alone when a does not come
        assert await batcher.step("a", "a1") == "out-a1"
        assert await batcher.step("b", "b1") == "out-b1"
        assert run.batches == [["a0"], ["a1"], ["b1"]]
        # now both are decoding: a's step waits for b's, and the two run merged as soon as both wait
        first = asyncio.ensure_future(batcher.step("a", "a2"))
        await asyncio.sleep(0)
        assert len(run.batches) == 3
        assert await asyncio.gather(first, batcher.step("b", "b2")) == ["out-a2", "out-b2"]
        assert run.batches[-1] == ["a2", "b2"]
        # b leaves: a runs alone again without waiting for it
        batcher.forget("b")
        assert await batcher.step("a", "a3") == "out-a3"
        assert run.batches[-1] == ["a3"]

    asyncio.run(main())


def test_a_late_session_costs_at_most_the_wait_budget():
    async def main():
        run = Recorder()
        batcher = DecodeBatcher(run, max_wait_s=0.05)
        await asyncio.gather(batcher.step("a", "a0"), batcher.step("b", "b0"))
        batcher.timing.last_pass_s = 1.0  # a slow step: the budget is max_wait_s
        loop = asyncio.get_running_loop()
        began = loop.time()
        assert await batcher.step("a", "a1") == "out-a1"  # b never comes
        assert 0.04 <= loop.time() - began < 1.0
        assert run.batches[-1] == ["a1"]

    asyncio.run(main())


def test_groups_stepping_in_turn_do_not_wait_for_each_other():
    """Two groups of sessions that take turns at this server (as 8 clients through 2 servers settle): a group's
    step waits for its own late member, but not for the other group, which comes half a period later, after any
    wait would have ended; before, every step waited out its budget for the other group and ran without it."""

    async def main():
        clock = Clock()
        step_s, period = 5.0, 100.0

        def run(requests):
            clock.now += step_s  # a merged step takes step_s of the batcher's clock
            return [f"out-{r}" for r in requests]

        batcher = DecodeBatcher(run, max_wait_s=0.001, active_s=1e6, clock=clock)
        groups = {"A": ["a1", "a2"], "B": ["b"]}
        offsets = {"A": 0.0, "B": period / 2}

        def arrive(group, k):
            clock.now = k * period + offsets[group]
            return [asyncio.ensure_future(batcher.step(s, f"{s}.{k}")) for s in groups[group]]

        for k in range(3):  # the groups take turns; a 1 ms budget while they settle
            for group in groups:
                await asyncio.gather(*arrive(group, k))
        batcher.timing.max_wait_s = 10.0  # a budget of a whole step (5 s of the loop's clock) from now on
        for k in range(3, 6):
            for group in groups:
                before = batcher.steps
                tasks = arrive(group, k)
                for _ in range(3):  # a few loop turns, far less than the budget
                    await asyncio.sleep(0)
                assert all(t.done() for t in tasks), f"group {group} of round {k} waited"
                assert [t.result() for t in tasks] == [f"out-{s}.{k}" for s in groups[group]]
                assert batcher.steps == before + 1  # the group's sessions in one merged step
        # a missing session expected within the budget (a2, late this round) is still waited for
        clock.now = 6 * period
        first = asyncio.ensure_future(batcher.step("a1", "a1.6"))
        for _ in range(3):
            await asyncio.sleep(0)
        assert not first.done()
        clock.now += 1.0
        assert await batcher.step("a2", "a2.6") == "out-a2.6"
        assert await first == "out-a1.6" and batcher.steps == before + 2

    asyncio.run(main())


def test_a_session_that_closes_while_its_step_waits_is_not_waited_for_after_it():
    async def main():
        run = Recorder()
        batcher = DecodeBatcher(run, max_wait_s=10.0)
        await asyncio.gather(batcher.step("a", "a0"), batcher.step("b", "b0"))
        waiting = asyncio.ensure_future(batcher.step("b", "b1"))
        await asyncio.sleep(0)
        batcher.forget("b")  # b closes while its step waits for a
        assert await asyncio.gather(waiting, batcher.step("a", "a1")) == ["out-b1", "out-a1"]
        # the merged step that ran b's last step did not make b a decoding session again: a's next step is
        # due on arrival and runs within the call, without waiting for b
        step = batcher.step("a", "a2").__await__()
        with pytest.raises(StopIteration) as ran:
            next(step)
        assert ran.value.value == "out-a2"
        assert run.batches[-1] == ["a2"]

    asyncio.run(main())


def test_an_error_reaches_every_session_of_the_merged_step():
    def fail(requests):
        raise RuntimeError("boom")

    async def main():
        batcher = DecodeBatcher(fail)
        with pytest.raises(RuntimeError, match="boom"):
            await batcher.step("a", 0)

    asyncio.run(main())


# ---- the math: merged steps equal solo steps ----


def test_decode_batch_equals_each_sessions_solo_decode(span):
    """Sessions at different lengths, one padded, two with different adapters, one without: each row of the
    merged step equals that session's own `decode`, and its cache gets the same keys/values."""
    config = span.config
    settings = LoraSettings(rank=4, alpha=8, modules=MODULES)
    loras = [
        span_lora(config, settings, random_adapter(config, settings, seed), range(4)) for seed in (1, 2)
    ] + [None]
    lengths, batches = [5, 9, 2], [1, 2, 1]
    generator = torch.Generator().manual_seed(0)
    caches, masks = [], []
    for length, batch in zip(lengths, batches, strict=True):
        cache = KVCache(4, batch, 16, config, torch.float32, "cpu")
        cache.keys.normal_(generator=generator)
        cache.values.normal_(generator=generator)
        mask = torch.ones(batch, length + 1, dtype=torch.bool)
        caches.append(cache)
        masks.append(mask)
    masks[1][1, :3] = False  # the second sequence of session 1 is left-padded
    hidden = torch.randn(sum(batches), config.hidden_size, generator=generator)
    positions = torch.tensor([5, 9, 6, 2])  # session 1's padded row counts real tokens only
    solo_caches = [KVCache(4, b, 16, config, torch.float32, "cpu") for b in batches]
    for solo, cache in zip(solo_caches, caches, strict=True):
        solo.keys.copy_(cache.keys)
        solo.values.copy_(cache.values)
    with torch.inference_mode():
        want, row = [], 0
        for cache, mask, lora, length, batch in zip(solo_caches, masks, loras, lengths, batches, strict=True):
            slot = torch.tensor([length])
            key_mask = mask if not bool(mask.all()) else None
            keys, values = cache.keys[:, :, :, : length + 1], cache.values[:, :, :, : length + 1]
            want.append(
                span.decode(
                    hidden[row : row + batch],
                    positions[row : row + batch],
                    slot,
                    keys,
                    values,
                    key_mask,
                    lora=lora,
                )
            )
            row += batch
        segments, row = [], 0
        for cache, mask, lora, length, batch in zip(caches, masks, loras, lengths, batches, strict=True):
            key_mask = mask if not bool(mask.all()) else None
            segments.append(
                DecodeSegment(
                    slice(row, row + batch),
                    torch.tensor([length]),
                    cache.keys[:, :, :, : length + 1],
                    cache.values[:, :, :, : length + 1],
                    key_mask,
                    lora,
                )
            )
            row += batch
        got = span.decode_batch(hidden, positions, segments)
    torch.testing.assert_close(got, torch.cat(want), rtol=1e-5, atol=1e-5)
    for solo, cache in zip(solo_caches, caches, strict=True):
        torch.testing.assert_close(cache.keys, solo.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cache.values, solo.values, rtol=1e-5, atol=1e-5)


def test_a_cohorts_graph_step_equals_the_eager_merged_step(span):
    """What a cohort's CUDA graph runs (each member's whole bucket of cache slots, stale keys past its slot, the
    slot and positions read from static buffers) equals the eager merged step, for members at lengths in
    different buckets, one padded, two with adapters; and a closed session's cohorts are dropped."""
    config = span.config
    settings = LoraSettings(rank=4, alpha=8, modules=MODULES)
    loras = [span_lora(config, settings, random_adapter(config, settings, seed), range(4)) for seed in (5, 6)]
    # (slot, batch, max_length, lora) of each member
    plans = [(5, 1, 200, loras[0]), (70, 2, 300, None), (3, 1, 100, loras[1])]
    generator = torch.Generator().manual_seed(1)
    runner = DecodeRunner(span, torch.device("cpu"))

    eager = []
    for slot, batch, max_length, lora in plans:
        cache = KVCache(4, batch, max_length, config, torch.float32, "cpu")
        cache.keys.normal_(generator=generator)  # stale keys/values past the slot too
        cache.values.normal_(generator=generator)
        key_mask = torch.ones(batch, max_length, dtype=torch.bool)
        key_mask[1:, :4] = False  # a second sequence is left-padded
        hidden = torch.randn(batch, config.hidden_size, generator=generator)
        eager.append(Member(hidden, slot, key_mask, batch > 1, cache, lora))
    graphed = []
    for m in eager:
        cache = KVCache(4, m.hidden.shape[0], m.cache.max_length, config, torch.float32, "cpu")
        cache.keys.copy_(m.cache.keys)
        cache.values.copy_(m.cache.values)
        graphed.append(dataclasses.replace(m, cache=cache))
    assert [m.bucket() for m in graphed] == [64, 128, 100]  # the last: its whole cache
    with torch.inference_mode():
        want, _ = runner.step_many(eager, None, slice(0, 4))
        key = cohort_key(graphed, slice(0, 4))
        got = runner._cohort_step(runner._cohort(key, graphed), graphed, slice(0, 4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager, graphed, strict=True):  # the same keys/values written at the slot
        torch.testing.assert_close(b.cache.keys, a.cache.keys, rtol=1e-5, atol=1e-5)
    for n in range(MAX_COHORTS + 2):  # the least recently used cohorts go beyond MAX_COHORTS
        runner._cohort((n,), graphed)
    assert len(runner._cohorts) == MAX_COHORTS and (0,) not in runner._cohorts
    runner._cohort(key, graphed)
    runner.forget(graphed[1].cache)
    assert key not in runner._cohorts and (MAX_COHORTS + 1,) in runner._cohorts


def test_concurrent_sessions_on_a_backend_merge_and_match_their_solo_runs(span):
    """Sessions that join and leave at different times, with different prompts, lengths and adapters, stepping
    concurrently through one backend: their steps are merged, and every output equals the session's solo run."""
    config = span.config
    settings = LoraSettings(rank=4, alpha=8, modules=MODULES)
    adapters = [
        Adapter(settings, random_adapter(config, settings, seed), 0, config.num_layers) for seed in (3, 4)
    ]
    plans = [  # (prompt length, decode steps, adapter, steps to wait before joining)
        (6, 10, None, 0),
        (3, 12, adapters[0], 0),
        (8, 5, adapters[1], 2),
        (4, 7, None, 4),
    ]
    generator = torch.Generator().manual_seed(5)
    inputs = [
        torch.randn(1, prompt + steps, config.hidden_size, generator=generator)
        for prompt, steps, _, _ in plans
    ]

    async def run_session(backend, plan, x, started: asyncio.Event | None = None):
        prompt, steps, adapter, delay = plan
        for _ in range(delay):
            await asyncio.sleep(0)  # join a few loop turns late
        session = backend.open_session(0, 4, 1, 32, adapter=adapter)
        try:
            outs = [(await backend.step(session, x[:, :prompt], 0, None))[0]]
            for t in range(prompt, prompt + steps):
                await asyncio.sleep(0)  # the round trip to the client: other sessions' steps come meanwhile
                outs.append((await backend.step(session, x[:, t : t + 1], t, None))[0])
            return torch.cat(outs, dim=1)
        finally:
            backend.close_session(session)

    async def main():
        backend = Backend(span, cache_tokens=4096, batch_wait_s=0.05)
        try:
            solo = [await run_session(backend, plan, x) for plan, x in zip(plans, inputs, strict=True)]
            solo_steps = backend.batcher.steps
            together = await asyncio.gather(
                *(run_session(backend, plan, x) for plan, x in zip(plans, inputs, strict=True))
            )
            merged_steps = backend.batcher.steps - solo_steps
            decode_steps = sum(steps for _, steps, _, _ in plans)
        finally:
            backend.shutdown()
        return solo, together, merged_steps, decode_steps

    solo, together, merged_steps, decode_steps = asyncio.run(main())
    assert merged_steps < decode_steps * 0.6  # most steps ran merged with others
    for a, b in zip(solo, together, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    with torch.inference_mode():  # and the solo runs equal the span's plain forward (with each adapter)
        for (_, _, adapter, _), x, out in zip(plans, inputs, solo, strict=True):
            lora = None if adapter is None else span_lora(config, settings, adapter.tensors, range(4))
            torch.testing.assert_close(out, span(x, lora=lora), rtol=1e-5, atol=1e-5)


# ---- prefills merged into decode steps ----


def test_prefills_arriving_in_one_loop_turn_run_as_one_step_without_a_wait():
    """A prefill (`gather`) that is due on arrival runs at the loop's next turn, with the steps that arrive
    meanwhile: new sessions come together, and none of them is expected by the timing yet."""

    async def main():
        run = Recorder()
        batcher = DecodeBatcher(run, max_wait_s=10.0)
        outs = await asyncio.wait_for(
            asyncio.gather(*(batcher.step(s, f"{s}0", gather=True) for s in "abc")), timeout=5.0
        )
        assert outs == ["out-a0", "out-b0", "out-c0"]
        assert run.batches == [["a0", "b0", "c0"]]
        # a lone one is not held for the budget either (10 s: the timeout would fire first)
        lone = DecodeBatcher(run, max_wait_s=10.0)
        assert await asyncio.wait_for(lone.step("d", "d0", gather=True), timeout=5.0) == "out-d0"
        assert run.batches[-1] == ["d0"]

    asyncio.run(main())


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_prefill_chunks_in_a_merged_step_equal_the_forward_path(checkpoints, family):
    """A merged step carrying a decode step and two prefills' chunks (`Member.tokens` > 1): a new session's
    prompt, and a left-padded batch of 2 with an adapter continuing its cache. Each chunk's rows and cache equal
    `BlockSpan.forward`'s (mistral: a sliding window of 4 that the chunk reaches past), and the decode step's
    its own `decode`'s, within float tolerance: these small weights stay plain, whose matmuls round by the rows
    beside them (panels do not: `test_a_merged_chunk_has_the_bits_of_a_lone_prefill_through_panels`)."""
    span = load_span(checkpoints(family), 0, 4)
    config = span.config
    settings = LoraSettings(rank=4, alpha=8, modules=MODULES)
    lora = span_lora(config, settings, random_adapter(config, settings, 7), range(4))
    generator = torch.Generator().manual_seed(3)

    def cache(batch):
        made = KVCache(4, batch, 16, config, torch.float32, "cpu")
        made.keys.normal_(generator=generator)
        made.values.normal_(generator=generator)
        return made

    def copy(c):
        other = KVCache(4, c.keys.shape[1], 16, config, torch.float32, "cpu")
        other.keys.copy_(c.keys)
        other.values.copy_(c.values)
        return other

    hidden = config.hidden_size
    decode_x = torch.randn(1, hidden, generator=generator)
    new_x = torch.randn(1, 4, hidden, generator=generator)
    padded_x = torch.randn(2, 3, hidden, generator=generator)
    decode_cache, new_cache, padded_cache = cache(1), cache(1), cache(2)
    padded_mask = torch.ones(2, 16, dtype=torch.bool)
    padded_mask[1, :2] = False  # the second sequence's first two slots are pads
    all_true = torch.ones(1, 16, dtype=torch.bool)
    with torch.inference_mode():
        solo = [copy(c) for c in (decode_cache, new_cache, padded_cache)]
        want_decode = span.decode(
            decode_x,
            torch.tensor([5]),
            torch.tensor([5]),
            solo[0].keys[..., :6, :],
            solo[0].values[..., :6, :],
        )
        want_new = span(new_x, pos=0, cache=solo[1])
        want_padded = span(padded_x, pos=3, key_mask=padded_mask[:, :6], cache=solo[2], lora=lora)
        members = [
            Member(decode_x, 5, all_true, False, decode_cache, None),
            Member(new_x.flatten(0, 1), 0, all_true, False, new_cache, None, tokens=4),
            Member(padded_x.flatten(0, 1), 3, padded_mask, True, padded_cache, lora, tokens=3),
        ]
        got, _ = DecodeRunner(span, torch.device("cpu")).step_many(members, None, None)
    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[:1], want_decode, **close)
    torch.testing.assert_close(got[1:5].view(1, 4, hidden), want_new, **close)
    torch.testing.assert_close(got[5:].view(2, 3, hidden), want_padded, **close)
    for mine, theirs in zip((decode_cache, new_cache, padded_cache), solo, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, **close)
        torch.testing.assert_close(mine.values, theirs.values, **close)


def test_prefills_of_new_sessions_merge_on_a_backend_and_equal_the_forward_path(span):
    """Three sessions' prompts arriving together at a backend run as one step, with a decoding session's step
    that comes in the same turn; a prompt past `inline_tokens` does not go through the batcher (the compute
    thread's path). Every output equals the span's forward over the session's cache (the long prompt's, which
    took that very path, bit for bit)."""
    config = span.config
    generator = torch.Generator().manual_seed(11)
    prompts = [torch.randn(1, n, config.hidden_size, generator=generator) for n in (5, 2, 7)]
    decoding = torch.randn(1, 4, config.hidden_size, generator=generator)
    long = torch.randn(1, 40, config.hidden_size, generator=generator)

    def forward(x, pos=0, prefix=None):
        with torch.inference_mode():
            cache = KVCache(4, 1, 64, config, torch.float32, "cpu")
            if prefix is not None:
                span(prefix, cache=cache)
            return span(x, pos=pos, cache=cache)

    async def main():
        backend = Backend(span, cache_tokens=4096, batch_wait_s=0.05)
        try:
            old = backend.open_session(0, 4, 1, 64)
            await backend.step(old, decoding[:, :3], 0, None)
            sessions = [backend.open_session(0, 4, 1, 64) for _ in prompts]
            before = backend.batcher.steps
            outs = await asyncio.gather(
                *(backend.step(s, x, 0, None) for s, x in zip(sessions, prompts, strict=True)),
                backend.step(old, decoding[:, 3:], 3, None),
            )
            merged = backend.batcher.steps - before
            long_session = backend.open_session(0, 4, 1, 64)
            before = backend.batcher.steps
            long_out = await backend.step(long_session, long, 0, None)
            assert backend.batcher.steps == before  # (40 > inline_tokens: not through the batcher)
        finally:
            backend.shutdown()
        return outs, merged, long_out

    outs, merged, long_out = asyncio.run(main())
    assert merged == 1
    torch.testing.assert_close(outs[3][0], forward(decoding[:, 3:], 3, decoding[:, :3]), rtol=1e-5, atol=1e-5)
    for x, (out, pending) in zip(prompts, outs[:3], strict=True):
        assert pending is None
        torch.testing.assert_close(out, forward(x), rtol=1e-5, atol=1e-5)
    assert torch.equal(long_out[0], forward(long))


def test_a_backend_is_as_busy_as_the_rows_of_its_sessions_that_stepped_lately(span):
    """What a server announces as its load (`busy_rows`): rows of sessions that stepped within the window, not
    those kept open without steps (a conversation waiting for its next turn) nor those closed."""

    async def main():
        backend = Backend(span, cache_tokens=4096)
        try:
            x = torch.randn(2, 3, span.config.hidden_size, generator=torch.Generator().manual_seed(0))
            beams, kept = backend.open_session(0, 4, 2, 16), backend.open_session(0, 4, 1, 16)
            assert backend.busy_rows(30.0) == 0
            await backend.step(beams, x, 0, None)
            await backend.step(kept, x[:1], 0, None)
            assert backend.busy_rows(30.0) == 3
            kept.stepped_at -= 60.0  # its last step a minute ago
            assert backend.busy_rows(30.0) == 2
            backend.close_session(beams)
            assert backend.busy_rows(30.0) == 0 and backend.busy_rows(120.0) == 1
        finally:
            backend.shutdown()

    asyncio.run(main())
