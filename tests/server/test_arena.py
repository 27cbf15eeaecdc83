"""The shared cache arena and its row graphs (`server.arena`, `DecodeRunner`'s row steps): row allocation against
a brute-force oracle, the budget's accounting, what a row graph runs against the eager merged step over caches
of their own, and sessions on a backend whose steps replay row graphs, against their solo runs.

CUDA graphs need a GPU; on the CPU, `Replayed` stands in for one: capturing runs the step (as the warm-up before
a real capture does) and a replay runs it again into the same output tensor, reading the same static inputs."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading

import pytest
import torch
from test_batching import MODULES, random_adapter

from swarmllm.models import KVCache, load_span
from swarmllm.models.convert import convert_to_ladder
from swarmllm.models.lora import LoraSettings, span_lora
from swarmllm.models.tiny import make_tiny_checkpoint
from swarmllm.server.adapters import Adapter
from swarmllm.server.arena import CacheArena, arena_rows, first_fit
from swarmllm.server.backend import Backend
from swarmllm.server.cache import CacheFullError
from swarmllm.server.decode import CAPTURE_AFTER, DecodeRunner, Member, row_bucket

BOUND = 10  # seconds; only to fail a test instead of hanging


@pytest.fixture(scope="module")
def span(llama_checkpoint):
    return load_span(llama_checkpoint, 0, 4)


class Replayed:
    """A CUDA graph's stand-in on the CPU (see the module doc)."""

    def __init__(self, run):
        self.run, self.out = run, run()

    def replay(self):
        self.out.copy_(self.run())


def replayed(run):
    graph = Replayed(run)
    return graph, graph.out


def test_first_fit_takes_the_lowest_run_of_free_rows():
    for taken in itertools.product((False, True), repeat=6):
        for count in range(1, 5):
            runs = [row for row in range(7 - count) if not any(taken[row : row + count])]
            assert first_fit(list(taken), count) == (runs[0] if runs else None)


def test_row_buckets():
    assert [row_bucket(top, 6) for top in range(1, 7)] == [1, 2, 4, 4, 6, 6]
    assert row_bucket(9, 64) == 16
    assert arena_rows(16384, 1024) == 8 and arena_rows(100, 1024) == 0 and arena_rows(10**9, 0) == 0


def test_sessions_take_arena_rows_where_they_fit_and_the_budget_counts_them(span):
    """Rows where a session fits, a cache of its own where it does not; a closed session's rows come back only
    once the compute thread has finished the work it was doing for it (a prefill writing them)."""
    backend = Backend(span, cache_tokens=300, arena_length=32)  # 300 // 2 // 32: 4 rows of 32 slots

    def compute_done(owner=""):  # the compute thread has run what the owner queued so far
        backend.compute.submit(owner, lambda: None).result()

    try:
        arena = backend.arena
        assert arena.rows == 4 and backend.budget.free_tokens == 300 - 4 * 33
        assert backend.free_tokens == 300 - 4 * 33 + 4 * 32
        a = backend.open_session(0, 4, 1, 32, owner="peer-a")
        b = backend.open_session(1, 3, 2, 20)  # a sub-range of the span: its view covers those blocks
        long = backend.open_session(0, 4, 1, 40)  # longer than a row: a cache of its own
        assert (a.row, b.row, long.row) == (0, 1, None)
        assert b.cache.keys.shape == (2, 2, span.config.num_kv_heads, 20, span.config.head_dim)
        assert long.cache.keys.shape[3] == 40 and backend.budget.free_tokens == 300 - 4 * 33 - 40
        b.cache.keys.fill_(1.0)  # the view writes into the arena: rows 1-2, blocks 1-2, slots 1-20
        assert arena.keys[1:3, 1:3, :, 1:21].eq(1).all() and arena.keys.eq(1).sum() == b.cache.keys.numel()
        b.key_mask[1, :3] = False
        assert not arena.key_mask[2, 1:4].any()
        with pytest.raises(CacheFullError):  # too long for a row, and more than the budget has left
            backend.open_session(0, 4, 2, 70)
        backend.close_session(b)
        backend.close_session(b)  # twice: harmless
        compute_done()
        c = backend.open_session(0, 4, 2, 32)  # b's rows again (lowest first), its mask reset
        d = backend.open_session(0, 4, 1, 8)
        assert (c.row, d.row) == (1, 3) and c.key_mask.all()
        backend.close_session(b)  # a stale close of b must not free c's rows
        compute_done()
        assert arena.free_rows == 0 and backend.free_tokens == backend.budget.free_tokens
        # a's prefill still runs on the compute thread when a closes: its row stays taken until it is done
        prefilling, finish = threading.Event(), threading.Event()
        running = backend.compute.submit("peer-a", lambda: (prefilling.set(), finish.wait(BOUND)))
        assert prefilling.wait(BOUND)
        backend.close_session(a)
        assert arena.free_rows == 0
        finish.set()
        running.result()
        compute_done("peer-a")
        assert arena.free_rows == 1
        for session in (c, d, long):
            backend.close_session(session)
        compute_done()
        assert arena.free_rows == 4 and backend.budget.free_tokens == 300 - 4 * 33
    finally:
        backend.shutdown()


def test_a_row_step_equals_the_eager_merged_step(span):
    """What a row graph runs (rows [0, N) of the arena, each member at its own slot, stale keys everywhere, a
    padded sequence, a sub-range of the span) equals the eager merged step over caches of their own, writes the
    same keys and values, and leaves the rows of sessions without a step as they were."""
    config, blocks = span.config, slice(1, 4)
    generator = torch.Generator().manual_seed(3)
    arena = CacheArena(4, 6, 100, config, torch.float32, "cpu")
    arena.keys.normal_(generator=generator)
    arena.values.normal_(generator=generator)
    runner = DecodeRunner(span, torch.device("cpu"), arena=arena)
    # (slot, batch, max_length) of each session; None: it holds rows but has no step in this one
    plans = [(5, 1, 100), None, (70, 2, 90), None, (3, 1, 10)]
    graphed, eager, idle = [], [], []
    for plan in plans:
        slot, batch, max_length = plan or (0, 1, 100)
        row, cache, key_mask = arena.take(batch, max_length)
        cache = KVCache.over(cache.keys[blocks], cache.values[blocks])
        if plan is None:
            idle.append((cache.keys.clone(), cache))
            continue
        key_mask[1:, :4] = False  # a second sequence is left-padded
        hidden = torch.randn(batch, config.hidden_size, generator=generator)
        graphed.append(Member(hidden, slot, key_mask, batch > 1, cache, None, row))
        own = KVCache.over(cache.keys.clone(), cache.values.clone())
        eager.append(Member(hidden, slot, key_mask.clone(), batch > 1, own, None))
    assert [m.row for m in graphed] == [0, 2, 5]
    with torch.inference_mode():
        want, _ = runner.step_many(eager, None, blocks)
        rows, size, index = runner._fill_rows(graphed)
        assert (rows, size) == (6, 100)
        got = runner._rows_step(rows, size, blocks).index_select(0, index)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager, graphed, strict=True):
        torch.testing.assert_close(b.cache.keys, a.cache.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(b.cache.values, a.cache.values, rtol=1e-5, atol=1e-5)
    for before, cache in idle:
        assert torch.equal(cache.keys, before)


def test_the_row_graphs_are_captured_at_start_and_serve_the_steps_after(span):
    """`capture_rows` captures every bucket of rows and slots over the whole span, once; a step of arena
    sessions then replays one of them (no capture in a client's step) and equals the eager merged step."""
    config = span.config
    arena = CacheArena(4, 6, 200, config, torch.float32, "cpu")
    runner = DecodeRunner(span, torch.device("cpu"), arena=arena)
    captures = []

    def counted(run):
        captures.append(run)
        return replayed(run)

    runner.cuda_graphs, runner._captured = True, counted
    with torch.inference_mode():
        assert runner.capture_rows() == 4 * 2  # rows 1, 2, 4, 6 by slots 64 and 200 (the whole row)
        assert runner.capture_rows() == 0
        generator = torch.Generator().manual_seed(8)
        graphed, eager = [], []
        for slot in (30, 70, 4):
            row, cache, key_mask = arena.take(1, 120)
            hidden = torch.randn(1, config.hidden_size, generator=generator)
            graphed.append(Member(hidden, slot, key_mask, False, cache, None, row))
            own = KVCache.over(cache.keys.clone(), cache.values.clone())
            eager.append(Member(hidden, slot, key_mask.clone(), False, own, None))
        want = runner._merged(eager, None, slice(0, 4))[0]
        got, _ = runner.step_many(graphed, None, slice(0, 4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert len(captures) == 8


def test_no_row_graphs_are_captured_for_a_span_whose_edge_carries_the_ladder_pair(tmp_path):
    """Such a span's whole-span steps take the pair (r, p), eagerly: `capture_rows` leaves it, graphs stay on."""
    source = make_tiny_checkpoint(tmp_path / "source", "llama", num_layers=6)
    ladder = load_span(str(convert_to_ladder(source, tmp_path / "ladder", 1, 5)), 2, 5)  # boundary 2: (r, p)
    arena = CacheArena(3, 2, 64, ladder.config, torch.float32, "cpu")
    runner = DecodeRunner(ladder, torch.device("cpu"), arena=arena)
    runner.cuda_graphs, runner._captured = True, replayed
    assert runner.capture_rows() == 0 and runner.cuda_graphs


def test_a_mixed_merged_step_replays_the_row_graph_and_the_others_graphs(span):
    """A merged step of arena sessions and others (a cache of its own, an arena session with an adapter) runs
    the arena sessions from their row graph and the others from their cohort's graph (eagerly until it is
    captured), and equals the eager merged step of them all, rows in the members' order."""
    config = span.config
    settings = LoraSettings(rank=4, alpha=8, modules=MODULES)
    lora = span_lora(config, settings, random_adapter(config, settings, 7), range(4))
    generator = torch.Generator().manual_seed(4)
    arena = CacheArena(4, 4, 64, config, torch.float32, "cpu")
    runner = DecodeRunner(span, torch.device("cpu"), arena=arena)
    runner.cuda_graphs, runner._captured = True, replayed
    graphed, eager = [], []
    for slot, max_length, adapter in [(5, 64, None), (70, 80, None), (9, 64, lora), (3, 32, None)]:
        placed = arena.take(1, max_length)
        row, cache, key_mask = (None, KVCache(4, 1, max_length, config, torch.float32, "cpu"), None)
        if placed is not None:
            row, cache, key_mask = placed
        else:
            key_mask = torch.ones(1, max_length, dtype=torch.bool)
        cache.keys.normal_(generator=generator)
        cache.values.normal_(generator=generator)
        hidden = torch.randn(1, config.hidden_size, generator=generator)
        graphed.append(Member(hidden, slot, key_mask, False, cache, adapter, row))
        own = KVCache.over(cache.keys.clone(), cache.values.clone())
        eager.append(Member(hidden, slot, key_mask.clone(), False, own, adapter))
    assert [m.row for m in graphed] == [0, None, 1, 2]
    with torch.inference_mode():
        want = runner._merged(eager, None, None)[0]
        for _ in range(CAPTURE_AFTER):  # the others' cohort is captured on its third step
            got, _ = runner.step_many(graphed, None, None)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(eager, graphed, strict=True):
        torch.testing.assert_close(b.cache.keys, a.cache.keys, rtol=1e-5, atol=1e-5)
    assert set(runner._row_graphs) == {(None, 4, 64)}  # rows 0 and 2: a bucket of 4 rows, 64 slots
    (cohort,) = runner._cohorts.values()
    assert cohort.graph is not None


def test_arena_sessions_through_row_graphs_match_their_solo_runs(span):
    """Sessions that join and leave at different times on a backend whose steps replay graphs (`Replayed` on
    the CPU): those in the arena share row graphs, lone and merged; one too long for a row and one with an
    adapter take the other graphs. Every output equals the span's plain forward of the session's inputs."""
    config = span.config
    settings = LoraSettings(rank=4, alpha=8, modules=MODULES)
    adapter = Adapter(settings, random_adapter(config, settings, 3), 0, config.num_layers)
    plans = [  # (prompt length, decode steps, max_length, adapter, loop turns before joining)
        (6, 10, 32, None, 0),
        (3, 12, 32, None, 0),
        (8, 3, 40, None, 1),  # longer than a row: a cache of its own
        (4, 3, 32, adapter, 2),
        (5, 8, 32, None, 4),
    ]
    generator = torch.Generator().manual_seed(5)
    inputs = [torch.randn(1, p[0] + p[1], config.hidden_size, generator=generator) for p in plans]

    async def run_session(backend, plan, x):
        prompt, steps, max_length, adapter, delay = plan
        for _ in range(delay):
            await asyncio.sleep(0)
        session = backend.open_session(0, 4, 1, max_length, adapter=adapter)
        try:
            outs = [(await backend.step(session, x[:, :prompt], 0, None))[0]]
            for t in range(prompt, prompt + steps):
                await asyncio.sleep(0)  # the round trip to the client: other sessions' steps come meanwhile
                outs.append((await backend.step(session, x[:, t : t + 1], t, None))[0])
            return torch.cat(outs, dim=1), session.row
        finally:
            backend.close_session(session)

    async def main():
        backend = Backend(span, cache_tokens=4096, batch_wait_s=0.05, arena_length=32)
        backend.decoder.cuda_graphs, backend.decoder._captured = True, replayed
        try:
            results = await asyncio.gather(
                *(run_session(backend, p, x) for p, x in zip(plans, inputs, strict=True))
            )
            return results, backend.batcher, set(backend.decoder._row_graphs)
        finally:
            backend.shutdown()

    results, batcher, row_graphs = asyncio.run(main())
    assert [row for _, row in results] == [0, 1, None, 2, 3]
    assert batcher.merged > batcher.steps  # steps were merged
    assert {rows for _, rows, _ in row_graphs} >= {4}  # ... through row graphs of several sessions
    with torch.inference_mode():
        for (_, _, _, adapter, _), x, (out, _) in zip(plans, inputs, results, strict=True):
            lora = None if adapter is None else span_lora(config, settings, adapter.tensors, range(4))
            torch.testing.assert_close(out, span(x, lora=lora), rtol=1e-5, atol=1e-5)


def test_has_room_for_sessions_opened_one_after_another_agrees_with_opening_them(span):
    """`Backend.has_room` (what a promise of room to a waiting session checks another's opening against)
    against the oracle: opening the sessions in turn, some already open, rows and the budget both in play."""
    backend = Backend(span, cache_tokens=300, arena_length=32)  # 4 rows of 32 slots, 168 budget tokens
    rng = torch.Generator().manual_seed(0)

    def shape():
        return int(torch.randint(1, 4, (), generator=rng)), int(torch.randint(4, 70, (), generator=rng))

    try:
        agreed = {True: 0, False: 0}
        for _ in range(200):
            held = []
            for _ in range(int(torch.randint(0, 3, (), generator=rng))):
                with contextlib.suppress(CacheFullError):
                    held.append(backend.open_session(0, 4, *shape()))
            wanted = [shape() for _ in range(int(torch.randint(1, 4, (), generator=rng)))]
            asked = [(b, n, backend.session_tokens(b, n)) for b, n in wanted]
            says = backend.has_room(*asked)
            opened = []
            try:
                for b, n, tokens in asked:
                    opened.append(backend.open_session(0, 4, b, n, tokens=tokens))
                fits = True
            except CacheFullError:
                fits = False
            assert says == fits, (held, asked)
            agreed[fits] += 1
            for session in held + opened:
                backend.close_session(session)
            backend.compute.submit("", lambda: None).result()
        assert min(agreed.values()) > 20  # both answers were exercised
    finally:
        backend.shutdown()
