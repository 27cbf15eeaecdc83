"""One distributed model used from several threads at once, from inside a running asyncio loop, interrupted
(an exception from a streamer or a stopping criterion, Ctrl-C in the calling thread) and reused, and shut down
while other threads generate. Real server processes on 127.0.0.1 (two, each half of the blocks); every token is
compared with transformers' greedy run of the same checkpoint, every wait is bounded, and the servers' caches
must come back whole (their `info` call's `cache_tokens_left`)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import sys
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.heads import MergedHead
from swarmllm.client.loop import run_sync
from swarmllm.local import LocalSwarm
from swarmllm.wire import Message

BOUND = 30.0  # seconds; only to fail a test instead of hanging, never to wait for something to happen
CACHE_TOKENS = 4096  # --max-cache-tokens of each server
PROMPTS = [[1, 17, 42, 5], [1, 30, 40, 50, 7, 9], [1, 3], [1, 8, 9, 10, 11]]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def swarm(llama_checkpoint):
    with LocalSwarm() as local:
        local.start_bootstrap()
        records = local.add_servers(
            [(str(llama_checkpoint), (0, 2)), (str(llama_checkpoint), (2, 4))],
            extra=["--max-cache-tokens", str(CACHE_TOKENS)],
        )
        yield local, [r["peer_id"] for r in records]


@pytest.fixture(scope="module")
def reference(llama_checkpoint):
    return AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model(swarm, llama_checkpoint):
    local, _ = swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=local.initial_peers
    )
    yield model
    model.shutdown()


def solo(reference, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[list[int]]:
    return reference.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False).tolist()


def free_tokens(observer, peer_ids) -> dict[str, int]:
    free = {}
    for peer_id in peer_ids:
        conn = run_sync(observer.swarm.connection(peer_id), timeout=BOUND)
        reply = run_sync(conn.call("info", Message(), timeout=5), timeout=BOUND)
        free[peer_id] = int(reply.meta["cache_tokens_left"])
    return free


def assert_caches_free(observer, peer_ids) -> None:
    """Every server's whole cache is free again (polled: a server frees a session once its stream's end arrives)."""
    deadline = time.monotonic() + BOUND
    while (free := free_tokens(observer, peer_ids)) != {p: CACHE_TOKENS for p in peer_ids}:
        assert time.monotonic() < deadline, f"server sessions left open: {free}"
        time.sleep(0.1)  # the poll interval of a condition with a deadline


class Boom(Exception):
    pass


class RaisingStreamer(BaseStreamer):
    """Raises once it has been given `after` pieces (the prompt is the first)."""

    def __init__(self, after: int):
        self.after, self.seen = after, 0

    def put(self, value):
        self.seen += 1
        if self.seen > self.after:
            raise Boom("the streamer's consumer went away")

    def end(self):
        pass


class RaisingCriterion(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        if input_ids.shape[1] >= self.length:
            raise Boom("the stopping criterion failed")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool)


def test_threads_generating_forwarding_and_holding_sessions_at_once_get_their_solo_results(
    model, reference, swarm
):
    """Greedy generates, beam searches, forwards and two-turn inference sessions from 8 threads at once on one
    model: each gives what it gives alone (transformers), and no server session is left open."""
    _, peer_ids = swarm
    want = [solo(reference, p) for p in PROMPTS]
    want_beams = [
        reference.generate(torch.tensor([p]), max_new_tokens=6, num_beams=3, do_sample=False).tolist()
        for p in PROMPTS
    ]

    def generate(i: int) -> bool:
        prompt = torch.tensor([PROMPTS[i % 4]])
        return model.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == want[i % 4]

    def beams(i: int) -> bool:
        prompt = torch.tensor([PROMPTS[i % 4]])
        out = model.generate(prompt, max_new_tokens=6, num_beams=3, do_sample=False)
        return out.tolist() == want_beams[i % 4]

    def forward(i: int) -> bool:
        prompt = torch.tensor([PROMPTS[i % 4]])
        with torch.no_grad():
            return torch.allclose(model(prompt).logits, reference(prompt).logits, rtol=1e-4, atol=1e-4)

    def two_turns(i: int) -> bool:
        prompt = torch.tensor([PROMPTS[i % 4]])
        with model.inference_session(max_length=64):
            first = model.generate(prompt, max_new_tokens=NEW_TOKENS // 2, do_sample=False)
            second = model.generate(first, max_new_tokens=NEW_TOKENS - NEW_TOKENS // 2, do_sample=False)
        return second.tolist() == want[i % 4]

    jobs = [(f, i) for i in range(4) for f in (generate, beams, forward, two_turns)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {pool.submit(f, i): (f.__name__, i) for f, i in jobs}
        results = {futures[f]: f.result(timeout=BOUND) for f in futures}
    assert all(results.values()), [k for k, ok in results.items() if not ok]
    assert_caches_free(model, peer_ids)


def test_generate_from_inside_a_running_event_loop(model, reference):
    """An async caller (a notebook's loop, an async web app) may call generate in its loop's thread, or hand it to
    a worker thread, both while the loop runs."""
    want = [solo(reference, p) for p in PROMPTS[:2]]

    async def caller() -> tuple[list, list]:
        here = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=NEW_TOKENS, do_sample=False)
        elsewhere = await asyncio.wait_for(
            asyncio.to_thread(
                model.generate, torch.tensor([PROMPTS[1]]), max_new_tokens=NEW_TOKENS, do_sample=False
            ),
            BOUND,
        )
        return here.tolist(), elsewhere.tolist()

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert pool.submit(asyncio.run, caller()).result(timeout=BOUND) == (want[0], want[1])


@pytest.mark.parametrize("how", ["streamer", "stopping_criterion"])
def test_a_generate_ended_by_a_callers_exception_leaves_nothing_and_the_model_reusable(
    model, reference, swarm, how
):
    """A streamer or stopping criterion that raises ends the generate with its exception, on its own and inside
    a session; the next generates (the same session too) give the solo tokens, and no server session stays."""
    _, peer_ids = swarm
    prompt = PROMPTS[1]
    want = solo(reference, prompt)

    def failing(**kwargs):
        options = {"max_new_tokens": NEW_TOKENS, "do_sample": False, **kwargs}
        if how == "streamer":
            options["streamer"] = RaisingStreamer(after=4)
        else:
            options["stopping_criteria"] = [RaisingCriterion(len(prompt) + 4)]
        with pytest.raises(Boom):
            model.generate(torch.tensor([prompt]), **options)

    failing()
    assert model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False).tolist() == want
    with model.inference_session(max_length=64):
        failing()
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False)
        assert out.tolist() == want
    assert_caches_free(model, peer_ids)


def test_a_with_block_left_by_an_exception_closes_its_session(model, reference, swarm):
    """`with model.inference_session(...)` left by an exception (in this thread, while other threads generate in
    their own sessions) closes its server sessions, and the others' tokens are their solo ones."""
    _, peer_ids = swarm
    want = [solo(reference, p) for p in PROMPTS]
    first_turn = threading.Barrier(4, timeout=BOUND)

    def other(i: int) -> list:
        with model.inference_session(max_length=64):
            first = model.generate(
                torch.tensor([PROMPTS[i]]), max_new_tokens=NEW_TOKENS // 2, do_sample=False
            )
            first_turn.wait()
            out = model.generate(first, max_new_tokens=NEW_TOKENS - NEW_TOKENS // 2, do_sample=False)
        return out.tolist()

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        others = [pool.submit(other, i) for i in (1, 2, 3)]
        with pytest.raises(Boom):
            with model.inference_session(max_length=64):
                model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=NEW_TOKENS // 2, do_sample=False)
                first_turn.wait()
                raise Boom("the caller's own error")
        assert [f.result(timeout=BOUND) for f in others] == want[1:]
    assert_caches_free(model, peer_ids)


def test_shutdown_while_threads_generate_ends_them_with_a_clear_error(swarm, llama_checkpoint, model):
    """`shutdown()` while other threads are in the middle of a generate: each of them fails at its next step with
    an error that says the model was shut down (not a failover onto new connections that nothing closes, banning
    the healthy servers on the way), within the bound; their server sessions are closed; and generate and
    forward after the shutdown refuse at once."""
    local, peer_ids = swarm
    doomed = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=local.initial_peers
    )
    generating = threading.Barrier(5, timeout=BOUND)
    shut = threading.Event()

    class HoldAfterTwo(BaseStreamer):
        def __init__(self):
            self.seen = 0

        def put(self, value):
            self.seen += 1
            if self.seen == 2:  # the prompt and a first token: the sessions are open on both servers
                generating.wait()
                assert shut.wait(BOUND)

        def end(self):
            pass

    def generate(i: int) -> BaseException | None:
        try:
            doomed.generate(
                torch.tensor([PROMPTS[i]]), max_new_tokens=100, do_sample=False, streamer=HoldAfterTwo()
            )
        except Exception as e:  # noqa: BLE001 - what each thread got is checked below
            return e
        return None

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(generate, i) for i in range(4)]
        generating.wait()
        doomed.shutdown()
        shut.set()
        errors = [f.result(timeout=BOUND) for f in futures]
    assert all(isinstance(e, RuntimeError) and "shut down" in str(e) for e in errors), errors
    assert doomed.swarm.bans.banned(time.monotonic()) == set()
    for call in (
        lambda: doomed.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=4, do_sample=False),
        lambda: doomed(torch.tensor([PROMPTS[0]])),
    ):
        began = time.monotonic()
        with pytest.raises(RuntimeError, match="shut down"), torch.no_grad():
            call()
        assert time.monotonic() - began < 5.0
    assert_caches_free(model, peer_ids)


def test_an_interrupt_while_the_merged_head_waits_leaves_the_other_threads_going():
    """Ctrl-C (KeyboardInterrupt in the main thread) while its generate's LM head waits to merge with another
    thread's: the other threads' next head calls still run (they must not wait behind the abandoned call)."""
    weight = torch.randn(16, 8)
    calls = []

    def head(hidden: torch.Tensor) -> torch.Tensor:
        calls.append(hidden.shape[0])
        if len(calls) == 1:  # a slow head (a large vocabulary): the next leader waits as long for the others
            threading.Event().wait(2.0)
        return hidden @ weight.T

    merged = MergedHead(head, max_wait_s=BOUND, active_s=BOUND)
    rows = torch.randn(1, 8)
    main = threading.main_thread().ident

    def interrupt_when_waiting() -> None:
        deadline = time.monotonic() + BOUND
        while not (merged._waiting and merged._waiting[0].thread == main):
            assert time.monotonic() < deadline
            time.sleep(0.01)  # the poll interval of a condition with a deadline
        signal.pthread_kill(main, signal.SIGINT)

    def in_other_thread() -> torch.Tensor | None:
        """The other thread's head call (a daemon: a call that never returns must fail the test, not hang it)."""
        out = []
        thread = threading.Thread(target=lambda: out.append(torch.no_grad()(merged)(rows)), daemon=True)
        thread.start()
        thread.join(BOUND)
        return out[0] if out else None

    assert in_other_thread() is not None  # the other thread generates too
    interrupter = threading.Thread(target=interrupt_when_waiting, daemon=True)
    interrupter.start()
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        merged(rows)  # leads: waits for the other thread, which is active but has no call waiting
    interrupter.join(BOUND)
    out = in_other_thread()
    assert out is not None, "the other thread's head call waits behind the interrupted one"
    torch.testing.assert_close(out, rows @ weight.T)


def test_an_interrupt_while_leading_a_merged_head_call_is_the_interrupted_threads_alone():
    """Ctrl-C while the main thread computes a merged LM head call that holds another thread's rows too: the main
    thread's generate ends with KeyboardInterrupt, the other thread gets its logits (not the interrupt)."""
    weight = torch.randn(16, 8)
    entered, calls = threading.Event(), []

    def head(hidden: torch.Tensor) -> torch.Tensor:
        calls.append(hidden.shape[0])
        if len(calls) == 1:  # a slow head: the next leader waits as long for the others
            threading.Event().wait(2.0)
        if hidden.shape[0] == 2 and threading.current_thread() is threading.main_thread():
            entered.set()
            deadline = time.monotonic() + BOUND
            while (
                time.monotonic() < deadline
            ):  # computing (in Python, where Ctrl-C lands at once) until interrupted
                pass
        return hidden @ weight.T

    merged = MergedHead(head, max_wait_s=BOUND, active_s=BOUND)
    mine, theirs = torch.randn(1, 8), torch.randn(1, 8)
    main = threading.main_thread().ident
    out: list = []

    def other_thread() -> None:
        deadline = time.monotonic() + BOUND
        while not (merged._waiting and merged._waiting[0].thread == main):  # joins the main thread's call
            assert time.monotonic() < deadline
            time.sleep(0.01)  # the poll interval of a condition with a deadline
        try:
            out.append(torch.no_grad()(merged)(theirs))
        except BaseException as e:  # noqa: BLE001 - checked below
            out.append(e)

    first = threading.Thread(target=lambda: torch.no_grad()(merged)(theirs), daemon=True)
    first.start()
    first.join(BOUND)  # the other thread generates too
    other = threading.Thread(target=other_thread, daemon=True)
    other.start()
    interrupter = threading.Thread(
        target=lambda: entered.wait(BOUND) and signal.pthread_kill(main, signal.SIGINT), daemon=True
    )
    interrupter.start()
    with pytest.raises(KeyboardInterrupt), torch.no_grad():
        merged(mine)
    other.join(BOUND)
    assert 2 in calls  # the main thread's call merged the other's rows
    assert out and isinstance(out[0], torch.Tensor), out
    torch.testing.assert_close(out[0], theirs @ weight.T)


def test_a_generate_interrupted_while_its_step_waits_leaves_the_session_usable(model, reference, swarm):
    """Ctrl-C (KeyboardInterrupt in the main thread) while a step of a kept session waits for a server (here
    stopped for a moment): the next generate in that session, once the server runs again, gives the solo
    tokens, and closing it leaves no server session open."""
    local, peer_ids = swarm
    prompt = PROMPTS[0]
    full = solo(reference, prompt, 20)[0]
    main = threading.main_thread().ident
    remote = model.open_session(max_length=64)
    interrupted = threading.Event()  # the generate raised KeyboardInterrupt: no more Ctrl-C

    def main_waits_on_the_step() -> bool:
        """Whether the main thread is blocked on a step's future (in `run_sync`, not cancelling the step)."""
        frame, names = sys._current_frames().get(main), set()
        while frame is not None:
            names.add(frame.f_code.co_name)
            frame = frame.f_back
        return {"run_sync", "wait"} <= names and "_cancel" not in names

    def interrupt_next_step(steps: int) -> None:
        deadline = time.monotonic() + BOUND
        while remote.session._steps == steps:  # the next step is sent, to the stopped server
            assert time.monotonic() < deadline
            time.sleep(0.005)  # the poll interval of a condition with a deadline
        # A signal that lands just before the main thread blocks is handled only once its wait ends (CPython),
        # here after the step's 5 s timeout (a failover then, seen once in CI): Ctrl-C while it waits on the
        # step, and again while it still does, as a user would.
        while not interrupted.is_set():
            assert time.monotonic() < deadline
            if main_waits_on_the_step():
                signal.pthread_kill(main, signal.SIGINT)
                interrupted.wait(0.5)
            else:
                time.sleep(0.005)  # the poll interval of a condition with a deadline

    class StopServerAfterThree(BaseStreamer):
        seen = 0

        def put(self, value):
            self.seen += 1
            if self.seen == 4:  # the prompt and 3 tokens
                local.servers[0].pause()
                threading.Thread(
                    target=interrupt_next_step, args=(remote.session._steps,), daemon=True
                ).start()

        def end(self):
            pass

    try:
        with pytest.raises(KeyboardInterrupt), model.use_session(remote):
            model.generate(
                torch.tensor([prompt]), max_new_tokens=16, do_sample=False, streamer=StopServerAfterThree()
            )
    finally:
        interrupted.set()
        local.servers[0].resume()
    try:
        with model.use_session(remote):
            cont = torch.tensor([full[: len(prompt) + 6]])
            out = model.generate(cont, max_new_tokens=10, do_sample=False).tolist()
        assert out[0] == full[: len(prompt) + 16]
        assert not remote.session.failovers
    finally:
        model.close_session(remote)
    assert_caches_free(model, peer_ids)


def test_a_session_closed_by_another_thread_ends_its_generate_and_the_model_goes_on(model, reference, swarm):
    """A kept session closed by another thread while a thread generates in it: that generate ends with an error
    saying so (at once, no failover, no server banned); the model's next generates give the solo tokens, and no
    server session stays open."""
    _, peer_ids = swarm
    prompt = PROMPTS[3]
    remote = model.open_session(max_length=64)
    closed = threading.Event()

    class CloseAfterTwo(BaseStreamer):
        seen = 0

        def put(self, value):
            self.seen += 1
            if self.seen == 3:
                closer = threading.Thread(target=lambda: (model.close_session(remote), closed.set()))
                closer.start()
                closer.join(BOUND)

        def end(self):
            pass

    with pytest.raises(RuntimeError, match="closed"), model.use_session(remote):
        model.generate(
            torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, streamer=CloseAfterTwo()
        )
    assert closed.is_set() and not remote.session.failovers
    assert model.swarm.bans.banned(time.monotonic()) == set()
    assert model.generate(
        torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False
    ).tolist() == solo(reference, prompt)
    assert_caches_free(model, peer_ids)
