"""Session handling and resource accounting at the edges: sessions closed mid-step, bad input, and caches that
must stay each session's own."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from swarmllm.models import load_span
from swarmllm.server.backend import Backend

HIDDEN = 64
BOUND = 10  # seconds; only to fail a test instead of hanging


class PausedOffTheLoop:
    """A CUDA graph's stand-in on the CPU (as in test_arena.py: capturing runs the step, a replay runs it again
    into the same output tensor, reading the same static inputs), whose replays on any thread but the event
    loop's wait until the test lets them go: between filling the static inputs and replaying them, the
    interleaving that the GIL (and, on a GPU, two CUDA streams) allow."""

    def __init__(self, run, loop_thread: threading.Thread, reached: threading.Event, go: threading.Event):
        self.run, self.out = run, run()
        self.loop_thread, self.reached, self.go = loop_thread, reached, go

    def replay(self):
        if threading.current_thread() is not self.loop_thread:
            self.reached.set()
            assert self.go.wait(BOUND)
        self.out.copy_(self.run())


@pytest.fixture(scope="module")
def span(llama_checkpoint):
    return load_span(str(llama_checkpoint), 0, 4)


async def test_a_decode_step_cancelled_while_it_waits_never_writes_the_rows_a_new_session_took(span):
    """A client that vanishes while its decode step waits to be merged: its session closes and its arena rows go
    back; the step it left behind must not run later over the rows a new session has taken by then."""
    backend = Backend(span, cache_tokens=4096, batch_wait_s=60.0, arena_length=16)
    generator = torch.Generator().manual_seed(0)

    def hidden(tokens: int) -> torch.Tensor:
        return torch.randn(1, tokens, HIDDEN, generator=generator)

    try:
        a = backend.open_session(0, 4, 1, 16, owner="peer-a")
        b = backend.open_session(0, 4, 1, 16, owner="peer-b")
        assert (a.row, b.row) == (0, 1)
        for session in (a, b):
            await backend.step(session, hidden(2), 0, None)
        # both decode, merged: both are decoding sessions from now on, so a lone step waits for the other's
        await asyncio.gather(backend.step(a, hidden(1), 2, None), backend.step(b, hidden(1), 2, None))
        waiting = asyncio.ensure_future(backend.step(a, hidden(1), 3, None))
        await asyncio.sleep(0)  # one loop turn: a's step now waits for b's
        assert not waiting.done()
        waiting.cancel()  # the client went away: the handler's task is cancelled and the session closed
        backend.close_session(a)
        backend.compute.submit("peer-a", lambda: None).result()  # a's rows are given back
        c = backend.open_session(0, 4, 1, 16, owner="peer-c")
        assert c.row == 0  # a's rows
        await backend.step(c, hidden(6), 0, None)
        before = c.cache.keys.clone(), c.cache.values.clone()
        await backend.step(b, hidden(1), 3, None)  # b's step comes: a merged step is due
        assert torch.equal(c.cache.keys, before[0]) and torch.equal(c.cache.values, before[1])
        with pytest.raises(asyncio.CancelledError):
            await waiting
    finally:
        backend.shutdown()


async def test_a_decode_step_on_the_compute_thread_keeps_its_rows_when_the_loop_steps_another_session(span):
    """A session of more rows than run inline decodes on the compute thread while another session's decode step
    runs on the event loop: both in the arena, through CUDA graphs. Each step's output is its own session's."""
    backend = Backend(span, cache_tokens=128, batch_wait_s=0.0, arena_length=16, inline_tokens=1)
    reached, go, loop_thread = threading.Event(), threading.Event(), threading.current_thread()

    def paused(run):
        graph = PausedOffTheLoop(run, loop_thread, reached, go)
        return graph, graph.out

    backend.decoder.cuda_graphs, backend.decoder._captured = True, paused
    generator = torch.Generator().manual_seed(1)
    xa = torch.randn(1, 4, HIDDEN, generator=generator)
    xb = torch.randn(2, 4, HIDDEN, generator=generator)
    try:
        with torch.inference_mode():
            assert backend.decoder.capture_rows() > 0  # at start, as a server does: steps only replay
        # b: two rows, more than run inline, so its decode steps run on the compute thread; a: one row, above
        # b's, so a's row graph covers b's rows too; its steps run inline on the loop
        b = backend.open_session(0, 4, 2, 16, owner="peer-b")
        a = backend.open_session(0, 4, 1, 16, owner="peer-a")
        assert (b.row, a.row) == (0, 2)
        await backend.step(a, xa[:, :3], 0, None)
        await backend.step(b, xb[:, :3], 0, None)
        b_step = asyncio.ensure_future(backend.step(b, xb[:, 3:], 3, None))
        assert await asyncio.to_thread(reached.wait, BOUND)  # b's inputs are in, its replay waits
        out_a, _ = await backend.step(a, xa[:, 3:], 3, None)
        go.set()
        out_b, _ = await asyncio.wait_for(b_step, BOUND)
    finally:
        go.set()
        backend.shutdown()
    with torch.inference_mode():
        torch.testing.assert_close(out_a, span(xa)[:, 3:], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_b, span(xb)[:, 3:], rtol=1e-5, atol=1e-5)
