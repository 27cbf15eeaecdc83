"""A server's request-rate refusal (`quota`, past its token bucket) says when a token is available again
(`retry_after_s`), and the client waits that out and asks the same server again, like an HTTP client taking a 429
with Retry-After, when no other server can take the request; refusals that only a closed session clears (the
peer's open sessions, its cache share, a full cache) are waited for too, for up to the client's `room_wait_s`: a
new session waits as a request does in vLLM's queue, and a session replacing a failed server rather than lose its
tokens (unless it could never fit). A ping refused for load is no ban."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from clocks import Clock
from in_process import model_over_one_server, refusals, start_server
from server_infos import online_server
from transformers import AutoModelForCausalLM

from swarmllm.client.loop import run_sync
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.swarm import SessionRefused, SwarmClient
from swarmllm.models import load_client_head
from swarmllm.server.handler import ServerLimits
from swarmllm.server.metrics import ServerMetrics
from swarmllm.server.quota import PeerLimits, PeerQuotas
from swarmllm.wire import Identity, Message, RemoteError, connect_direct
from swarmllm.wire.messages import RoomReply


def test_a_rate_refusal_says_when_a_token_is_available():
    """After a burst of 3 at 4/s, a request 1/8 s later (half a token back) is refused with the time the rest of
    its token takes (1/8 s); half of that later it is refused with the time left (1/16 s), and once that passed
    it is admitted. (Times in binary fractions, so the sums are exact.)"""
    clock = Clock(100.0)
    quotas = PeerQuotas(PeerLimits(rate_per_s=4.0, burst=3), clock=clock)
    assert all(quotas.request("p") is None for _ in range(3))
    clock.now += 0.125
    refusal = quotas.request("p")
    assert refusal is not None and refusal.code == "quota" and refusal.retry_after_s == 0.125
    clock.now += 0.0625
    assert quotas.request("p").retry_after_s == 0.0625
    clock.now += 0.0625
    assert quotas.request("p") is None


def test_open_sessions_and_cache_share_refusals_carry_no_wait():
    """Only closing a session clears these: there is no time to wait for."""
    quotas = PeerQuotas(PeerLimits(max_sessions=1, max_cache_share=0.5))
    assert quotas.open_session("p", 10, 100) is None
    assert quotas.open_session("p", 10, 100).retry_after_s is None
    assert quotas.open_session("q", 60, 100).retry_after_s is None


def _expected(path: str, ids: torch.Tensor, new_tokens: int = 4) -> torch.Tensor:
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return local.generate(ids, max_new_tokens=new_tokens, do_sample=False)


def _two_prompts(path: str) -> tuple[list[torch.Tensor], list[list[list[int]]]]:
    """Two prompts of two sessions, and transformers' tokens for each (8 new)."""
    prompts = [torch.tensor([[1, 5, 9, 3]]), torch.tensor([[2, 8, 4, 6, 7]])]
    return prompts, [_expected(path, p, 8).tolist() for p in prompts]


def test_a_tight_loop_of_generates_waits_out_the_request_rate(llama_checkpoint):
    """12 generates in a tight loop over the only server, at 20 session openings/s in bursts of 2: every one
    succeeds with transformers' tokens, the server refused some openings (`quota`), nothing was banned, and the
    loop took at least what the rate implies ((12 - 2) / 20 s): the client waited instead of raising."""
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = _expected(llama_checkpoint, ids)
    rate, burst, n = 20.0, 2, 12
    metrics = ServerMetrics()
    limits = ServerLimits(peer_rate_per_s=rate, peer_burst=burst)
    with model_over_one_server(llama_checkpoint, "rate-waits", limits=limits, metrics=metrics) as model:
        began = time.monotonic()
        for _ in range(n):
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=4, do_sample=False)
            assert torch.equal(out, expected)
        took = time.monotonic() - began
        assert refusals(metrics, "quota") > 0
        assert model.swarm.bans._strikes == {} and not model.swarm.failovers
    assert took >= (n - burst) / rate * 0.95


def test_forwards_ask_again_when_the_server_says(llama_checkpoint):
    """Batch forwards at 2 calls/s (bursts of 1): each forward's call waits the refusal's `retry_after_s` and
    is then admitted, so the server refuses about one call per forward (a 50 ms pause doubling would be refused
    three times per forward, asking at 50, 150 and 350 ms for a token 500 ms away)."""
    local = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    with torch.no_grad():
        expected = local(ids).logits
    metrics = ServerMetrics()
    limits = ServerLimits(peer_rate_per_s=2.0, peer_burst=1)
    with model_over_one_server(llama_checkpoint, "rate-forwards", limits=limits, metrics=metrics) as model:
        n = 4
        for _ in range(n):
            with torch.no_grad():
                logits = model(ids).logits
            torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert 0 < refusals(metrics, "quota") <= n
        assert model.swarm.bans._strikes == {}


def test_a_ping_refused_for_the_request_rate_is_no_ban(llama_checkpoint):
    """The client's first route pings the server; when this peer has spent its request rate just before (here
    by `info` calls of its own on the same connection), the ping is refused (`quota`): the server answered, so it
    is not banned, and the generate waits out the rate and gets transformers' tokens."""
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = _expected(llama_checkpoint, ids)
    metrics = ServerMetrics()
    limits = ServerLimits(peer_rate_per_s=10.0, peer_burst=2)
    with model_over_one_server(llama_checkpoint, "rate-ping", limits=limits, metrics=metrics) as model:
        (peer,) = [s.peer_id for s in run_sync(model.swarm.servers())]

        async def spend() -> None:
            conn = await model.swarm.connection(peer)
            for _ in range(limits.peer_burst):
                await conn.call("info", Message(), timeout=5)
            with pytest.raises(RemoteError) as refused:
                await conn.call("info", Message(), timeout=5)
            assert refused.value.code == "quota" and refused.value.retry_after_s > 0

        run_sync(spend())
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert torch.equal(out, expected)
        assert refusals(metrics, "quota") >= 2  # the `info` call above, and the ping
        assert model.swarm.bans._strikes == {}


def test_a_new_session_past_its_peers_open_sessions_limit_waits_for_one_to_close(llama_checkpoint):
    """A limit that only a closed session clears: with its one allowed session open, a generate outside it waits
    for room (as Petals' servers wait for memory and vLLM queues a request), rather than fail: refused once, in
    the client, which learned that the server admits this peer one session (`client.room.SessionPlaces`); once
    the session closes it gets transformers' tokens. No failover, no ban."""
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = _expected(llama_checkpoint, ids)
    limits, metrics = ServerLimits(max_sessions_per_peer=1), ServerMetrics()
    with model_over_one_server(
        llama_checkpoint, "room-new", limits=limits, metrics=metrics, request_timeout_s=60
    ) as model:
        with ThreadPoolExecutor(1) as other_thread:  # (a session belongs to its thread)
            with model.inference_session(max_length=16), torch.no_grad():
                model.generate(ids, max_new_tokens=1, do_sample=False)  # opens it
                outside = other_thread.submit(model.generate, ids, max_new_tokens=4, do_sample=False)
                _until_refused(metrics, outside)  # refused, it waits for this client's session to close
            out = outside.result(timeout=60)  # (the session above closed)
        assert torch.equal(out, expected)
        assert refusals(metrics, "quota") >= 1
        assert model.swarm.bans._strikes == {} and not model.swarm.failovers


@pytest.mark.parametrize("wait_s", [0.0, 1.5])
def test_a_new_session_refused_room_past_room_wait_s_is_told_why(llama_checkpoint, wait_s):
    """`room_wait_s` bounds the wait (0: none): with its one allowed session open, a generate outside it fails
    with SessionRefused naming the limit once the wait is over, not before, and the server is not banned."""
    ids = torch.tensor([[1, 5, 9, 3]])
    limits = ServerLimits(max_sessions_per_peer=1)
    with model_over_one_server(
        llama_checkpoint, "rate-sessions", limits=limits, request_timeout_s=30, room_wait_s=wait_s
    ) as model:
        with model.inference_session(max_length=16), torch.no_grad():
            model.generate(ids, max_new_tokens=1, do_sample=False)  # opens it
            began = time.monotonic()
            with ThreadPoolExecutor(1) as other_thread:
                outside = other_thread.submit(model.generate, ids, max_new_tokens=1, do_sample=False)
                with pytest.raises(SessionRefused) as refused:
                    outside.result()
            waited = time.monotonic() - began
        assert wait_s <= waited < wait_s + 5
        assert refused.value.codes == {"quota"} and "open sessions limit" in str(refused.value)
        assert model.swarm.bans._strikes == {}


def test_a_new_session_finding_the_cache_full_of_other_clients_sessions_waits_for_one_to_close(
    llama_checkpoint,
):
    """The server's cache is full of two other peers' sessions, which this client cannot see or close: a new
    session, refused (`cache_full`), waits on the server's `room` answer and opens when one of the others closes,
    then gets transformers' tokens."""
    ids = torch.tensor([[1, 5, 9, 3]])
    expected = _expected(llama_checkpoint, ids)
    metrics = ServerMetrics()
    with model_over_one_server(llama_checkpoint, "room-new-full", 128, metrics=metrics) as model:
        (server,) = model.swarm._servers
        others = run_sync(_others_fill(model, server))
        try:
            with ThreadPoolExecutor(1) as pool:
                run = pool.submit(model.generate, ids, max_new_tokens=4, do_sample=False)
                _until_a_room_query_waits(metrics, run)
                run_sync(others[0][1].close())
                out = run.result(timeout=60)
        finally:
            for conn, _ in others:
                run_sync(conn.close())
        assert torch.equal(out, expected)
        # (twice only if the box stalled past the query's 2 s)
        assert 1 <= refusals(metrics, "cache_full") <= 2
        assert model.swarm.bans._strikes == {} and not model.swarm.failovers


@contextmanager
def two_servers(
    path: str,
    prefix: str,
    fast: str,
    limits_b: ServerLimits,
    metrics_b: ServerMetrics,
    methods_b: dict | None = None,
    **client: float,
):
    """The model of `path` over two in-process servers of every block: A (ample cache) and B (128 cache tokens,
    so one peer's share, half of it, is one session of 64, its unary `methods_b` replaced, `in_process.start_server`);
    `fast` ("A" or "B") is the one routing prefers; `client`: SwarmClient options. Yields the model, a function that stops A
    (its connections dropped: a server gone) and B's peer id."""
    config, head = load_client_head(path)
    blocks = config.num_hidden_layers
    ids = {"A": Identity.generate(), "B": Identity.generate()}
    servers = {
        "A": start_server(path, blocks, ids["A"]),
        "B": start_server(path, blocks, ids["B"], 128, limits_b, metrics_b, methods=methods_b),
    }
    swarm = SwarmClient(
        [], prefix, blocks, **{"missing_blocks_timeout_s": 0, "request_timeout_s": 120, **client}
    )
    swarm.use_servers(
        [
            online_server(
                ids[n].peer_id, 0, blocks, address=s.address, inference_rps=100.0 if n == fast else 1.0
            )
            for n, s in servers.items()
        ]
    )
    try:
        model = DistributedModelForCausalLM(config, head, swarm).eval()
        yield model, lambda: run_sync(servers["A"].stop()), ids["B"].peer_id
    finally:
        run_sync(swarm.shutdown())
        for server in servers.values():
            run_sync(server.stop())


@pytest.mark.parametrize(
    "limit, b_is", [("cache share", "new"), ("open sessions", "new"), ("open sessions", "older")]
)
def test_replacements_that_find_no_room_wait_for_the_clients_other_session_to_end(
    llama_checkpoint, limit, b_is
):
    """Two sessions of one client run on A, which dies; B holds the same blocks but takes one session of this peer
    at a time (its cache share, or its open sessions limit). The first session moves to B; the second is refused
    room (`quota`, which only a closing clears) and, rather than lose its tokens, asks again once B says the first
    ended (`room`; an older B, which cannot say, once this client closed the first there): both get their solo
    tokens, and B is not banned."""
    prompts, want = _two_prompts(llama_checkpoint)
    limits = ServerLimits(max_sessions_per_peer=1) if limit == "open sessions" else ServerLimits()
    metrics = ServerMetrics()
    both_on_a, a_gone = threading.Barrier(3, timeout=60), threading.Event()

    def turns(model, prompt: torch.Tensor) -> list:
        with model.inference_session(max_length=64), torch.no_grad():
            first = model.generate(prompt, max_new_tokens=3, do_sample=False)
            both_on_a.wait()
            assert a_gone.wait(60)
            return model.generate(first, max_new_tokens=5, do_sample=False).tolist()

    methods = {"room": None} if b_is == "older" else None
    with two_servers(llama_checkpoint, f"room-{limit[:4]}", "A", limits, metrics, methods) as (
        model,
        stop_a,
        b,
    ):
        with ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(turns, model, p) for p in prompts]
            both_on_a.wait()
            stop_a()
            a_gone.set()
            outs = [r.result(timeout=120) for r in runs]
        assert outs == want
        # the second replacement was refused room, and waited: on B's answer, or (older B) pausing, not spinning
        assert 1 <= refusals(metrics, "quota") <= (2 if b_is == "new" else 30)
        assert [h.peer_id for f in model.swarm.failovers for h in f.replacement] == [b, b]  # both moved to B
        assert b not in model.swarm.bans._strikes


def test_a_server_that_had_no_room_when_a_session_opened_takes_its_replacement_later(llama_checkpoint):
    """B (preferred) has room for one session of this peer, so a second session opens on A. The first ends; then A
    dies, and the second session's replacement goes to B, whose earlier refusal is stale by now."""
    prompt = torch.tensor([[1, 5, 9, 3]])
    want = _expected(llama_checkpoint, prompt, 8).tolist()
    metrics = ServerMetrics()
    on_a, a_gone = threading.Event(), threading.Event()

    def second(model) -> list:
        with model.inference_session(max_length=64), torch.no_grad():
            first = model.generate(prompt, max_new_tokens=3, do_sample=False)  # refused by B: opens on A
            on_a.set()
            assert a_gone.wait(60)
            return model.generate(first, max_new_tokens=5, do_sample=False).tolist()

    with two_servers(llama_checkpoint, "room-stale", "B", ServerLimits(), metrics) as (model, stop_a, b):
        pool = ThreadPoolExecutor(1)
        try:
            with model.inference_session(max_length=64), torch.no_grad():
                model.generate(prompt, max_new_tokens=1, do_sample=False)  # takes this peer's share of B
                run = pool.submit(second, model)
                assert on_a.wait(60)
            assert refusals(metrics, "quota") == 1
            stop_a()
            a_gone.set()
            assert run.result(timeout=120) == want
        finally:
            a_gone.set()
            pool.shutdown()
        assert [h.peer_id for h in model.swarm.failovers[-1].replacement] == [b]  # (the first: B refused it)


def test_a_session_kept_between_uses_gives_way_to_a_replacement_waiting_for_its_room(llama_checkpoint):
    """One thread keeps a conversation open between turns (`open_session`) on B, which takes one session of this
    peer at a time, and runs another on A. A dies: the second session's replacement needs B, whose room the kept
    one holds and, unused, would hold for ever. The kept session gives its hop up; the second gets B and ends, and
    the kept one's next turn rebuilds its hop there. Both get their solo tokens, and B is not banned (before, the
    replacement waited 60 s and failed)."""
    prompts, want = _two_prompts(llama_checkpoint)
    limits = ServerLimits(max_sessions_per_peer=1)
    with two_servers(llama_checkpoint, "room-kept", "B", limits, ServerMetrics()) as (model, stop_a, b):
        kept = model.open_session(max_length=64)
        try:
            with model.use_session(kept), torch.no_grad():
                first_turn = model.generate(prompts[0], max_new_tokens=3, do_sample=False)  # on B
            with model.inference_session(max_length=64), torch.no_grad():
                first = model.generate(prompts[1], max_new_tokens=3, do_sample=False)  # B refuses it: on A
                stop_a()
                second = model.generate(first, max_new_tokens=5, do_sample=False).tolist()
            with model.use_session(kept), torch.no_grad():
                next_turn = model.generate(first_turn, max_new_tokens=5, do_sample=False).tolist()
        finally:
            model.close_session(kept)
        assert [next_turn, second] == want
        reasons = [(f.peer_id, f.reason) for f in model.swarm.failovers]
        assert any(peer == b and "given up" in reason for peer, reason in reasons)  # the kept session's hop
        assert b not in model.swarm.bans._strikes


def test_a_session_unused_inside_its_block_for_room_hold_s_gives_way_too(llama_checkpoint):
    """A thread holds a conversation on B inside `with model.inference_session()` and waits there for its user,
    while another thread's session runs on A, which dies. The replacement needs B: once the idle one has not
    stepped for `room_hold_s` (1 s here) it gives its hop up. The other ends; then the first conversation's next
    turn rebuilds its hop. Both get their solo tokens (before, the replacement waited 60 s and failed)."""
    prompts, want = _two_prompts(llama_checkpoint)
    limits = ServerLimits(max_sessions_per_peer=1)
    on_b, user_back = threading.Event(), threading.Event()

    def conversation(model) -> list:
        with model.inference_session(max_length=64), torch.no_grad():
            first = model.generate(prompts[0], max_new_tokens=3, do_sample=False)  # on B
            on_b.set()
            assert user_back.wait(120)
            return model.generate(first, max_new_tokens=5, do_sample=False).tolist()

    with two_servers(llama_checkpoint, "room-unused", "B", limits, ServerMetrics(), room_hold_s=1) as (
        model,
        stop_a,
        b,
    ):
        with ThreadPoolExecutor(1) as pool:
            try:
                waiting = pool.submit(conversation, model)
                assert on_b.wait(60)
                with model.inference_session(max_length=64), torch.no_grad():
                    first = model.generate(
                        prompts[1], max_new_tokens=3, do_sample=False
                    )  # B refuses it: on A
                    stop_a()
                    second = model.generate(first, max_new_tokens=5, do_sample=False).tolist()
            finally:
                user_back.set()
            assert [waiting.result(timeout=120), second] == want
        reasons = [(f.peer_id, f.reason) for f in model.swarm.failovers]
        assert any(peer == b and "given up" in reason for peer, reason in reasons)
        assert b not in model.swarm.bans._strikes


async def _others_fill(model, peer_id: str) -> list:
    """Two other peers (their own identities and connections) each open a session of 64 tokens on `peer_id`: a
    128-token cache is full. Returns their (connection, stream) pairs."""
    host, port = model.swarm.info(peer_id).direct_addrs[0].rsplit(":", 1)
    held = []
    for _ in range(2):
        conn = await connect_direct(host, int(port), Identity.generate(), expected_peer_id=peer_id)
        opening = {"start": 0, "end": model.config.num_hidden_layers, "batch_size": 1, "max_length": 64}
        stream = await conn.open_stream("inference", Message(opening))
        await stream.send(Message({"position": 0}, [torch.zeros(1, 1, model.config.hidden_size)]))
        await stream.recv()  # open, its room taken
        held.append((conn, stream))
    return held


def _until_refused(metrics: ServerMetrics, run) -> None:
    deadline = time.monotonic() + 60
    while refusals(metrics, "quota") < 1:
        assert time.monotonic() < deadline and not run.done(), "the server refused nothing"
        time.sleep(0.01)


def _until_a_room_query_waits(metrics: ServerMetrics, run) -> None:
    deadline = time.monotonic() + 60
    while metrics.room_waits._value.get() < 1:
        assert time.monotonic() < deadline and not run.done(), "no room query reached the server"
        time.sleep(0.01)


def _moves_onto_a_full_b(path: str, prefix: str, metrics: ServerMetrics, methods, meanwhile) -> tuple:
    """A session generates 3 tokens on A; B's cache is full of two other peers' sessions (`_others_fill`); A
    stops, and while the session's replacement waits for room on B, `meanwhile(run)` runs (`run`: the session's
    future); then one of the others closes. Returns the session's tokens after 5 more, the model's failovers and
    B's peer id."""
    prompt = torch.tensor([[1, 5, 9, 3]])
    with two_servers(path, prefix, "A", ServerLimits(), metrics, methods) as (model, stop_a, b):

        def session(on_a: threading.Event, a_gone: threading.Event) -> list:
            with model.inference_session(max_length=64), torch.no_grad():
                first = model.generate(prompt, max_new_tokens=3, do_sample=False)
                on_a.set()
                assert a_gone.wait(60)
                return model.generate(first, max_new_tokens=5, do_sample=False).tolist()

        others = run_sync(_others_fill(model, b))
        on_a, a_gone = threading.Event(), threading.Event()
        try:
            with ThreadPoolExecutor(1) as pool:  # (a session belongs to its thread)
                run = pool.submit(session, on_a, a_gone)
                assert on_a.wait(60)
                stop_a()
                a_gone.set()
                meanwhile(run)
                run_sync(others[0][1].close())
                out = run.result(timeout=60)
        finally:
            a_gone.set()
            for conn, _ in others:
                run_sync(conn.close())
        assert b not in model.swarm.bans._strikes
        return out, list(model.swarm.failovers), b


def test_a_replacement_waiting_for_room_that_other_clients_hold_asks_again_when_one_closes(llama_checkpoint):
    """A session runs on A, which dies; B's cache is full of two other peers' sessions, which this client cannot
    see or close. Its replacement, refused (`cache_full`), asks B to say when room comes free (`room`) rather than
    asking again after pauses: when one of the others closes, B answers at once and the replacement opens there;
    the session gets its solo tokens, and B is not banned."""
    metrics = ServerMetrics()
    out, failovers, b = _moves_onto_a_full_b(
        llama_checkpoint,
        "room-others",
        metrics,
        None,
        lambda run: _until_a_room_query_waits(metrics, run),  # the replacement waits on B's answer
    )
    assert out == _expected(llama_checkpoint, torch.tensor([[1, 5, 9, 3]]), 8).tolist()
    # then it waited for B's answer, not asking again (twice only if the box stalled past the query's 2 s)
    assert 1 <= refusals(metrics, "cache_full") <= 2
    assert [h.peer_id for h in failovers[-1].replacement] == [b]


def test_a_server_that_always_says_it_has_room_is_not_asked_in_a_spin(llama_checkpoint):
    """B's cache is full of two other peers' sessions, and B answers every `room` query "room" at once (a lying
    server, or others that always take the room first). The replacement moving off A keeps being refused: after
    B's first word it asks again only after pauses (50 ms, doubling), so in the ~1.5 s before one of the others
    closes it asks B a few times, not dozens (51 at once, before); then it gets transformers' tokens."""
    asked: list[float] = []

    async def says_room(request: Message, context) -> Message:
        asked.append(time.monotonic())
        return RoomReply(True).to_message()

    def for_a_while(run) -> None:  # the others hold B's room for 1.5 s after its first answer
        deadline = time.monotonic() + 60
        while not asked or time.monotonic() - asked[0] < 1.5:
            assert time.monotonic() < deadline and not run.done(), "B was never asked"
            time.sleep(0.01)

    out, _, _ = _moves_onto_a_full_b(
        llama_checkpoint, "room-liar", ServerMetrics(), {"room": says_room}, for_a_while
    )
    assert out == _expected(llama_checkpoint, torch.tensor([[1, 5, 9, 3]]), 8).tolist()
    assert 2 <= len(asked) <= 10, len(asked)  # (pauses of 50 ms doubling: ~5 in 1.5 s)


def test_a_session_larger_than_any_peers_share_is_refused_as_such_at_once(llama_checkpoint):
    """No closing would make room for it, so the replacement does not wait: a session of 80 tokens (B's share is
    64) moving off A fails at once with SessionRefused (`bad_request`) naming the share."""
    prompt = torch.tensor([[1, 5, 9, 3]])
    with two_servers(llama_checkpoint, "room-never", "A", ServerLimits(), ServerMetrics()) as (
        model,
        stop_a,
        _,
    ):
        with model.inference_session(max_length=80), torch.no_grad():
            first = model.generate(prompt, max_new_tokens=2, do_sample=False)
            stop_a()
            began = time.monotonic()
            with pytest.raises(SessionRefused) as refused:
                model.generate(first, max_new_tokens=2, do_sample=False)
            assert time.monotonic() - began < 10
    assert refused.value.codes == {"bad_request"}
    assert "a session of 80 cache tokens is more than a peer may hold here (64" in str(refused.value)


@contextmanager
def crossed_servers(path: str, cache_tokens: int, limits: ServerLimits):
    """In-process servers of `path` for a cycle of waits: X1 and X2 hold blocks [0, k), Y1 and Y2 blocks [k, n)
    (k = n // 2); X2 and Y2 have `cache_tokens` and `limits`, X1 and Y1 ample room. Yields the identities, servers
    and ServerInfos by name; every server is stopped at the end."""
    n = load_client_head(path)[0].num_hidden_layers
    k = n // 2
    spans = {"X1": (0, k, False), "X2": (0, k, True), "Y1": (k, n, False), "Y2": (k, n, True)}
    ids = {name: Identity.generate() for name in spans}
    servers = {}
    try:
        for name, (start, end, tight) in spans.items():
            room = (cache_tokens, limits) if tight else (4096, None)
            servers[name] = start_server(path, end, ids[name], *room, start_block=start)
        infos = {
            name: online_server(ids[name].peer_id, start, end, address=servers[name].address)
            for name, (start, end, _) in spans.items()
        }
        yield ids, servers, infos
    finally:
        for server in servers.values():
            run_sync(server.stop())


def _turns(model, prompt: torch.Tensor, opened: threading.Event, go: threading.Event) -> list:
    """A session: 3 tokens, then (once `go`) 5 more."""
    with model.inference_session(max_length=64), torch.no_grad():
        first = model.generate(prompt, max_new_tokens=3, do_sample=False)
        opened.set()
        assert go.wait(60)
        return model.generate(first, max_new_tokens=5, do_sample=False).tolist()


def test_two_sessions_waiting_for_room_that_the_other_holds_do_not_wait_for_ever(llama_checkpoint):
    """A cycle: session 1 runs on X2 (blocks [0, k), one session of this peer at a time) and Y1 ([k, n)), session 2
    on X1 and Y2 (one at a time too). X1 and Y1 die: session 1's replacement waits for Y2, which session 2 holds, and
    session 2's for X2, which session 1 holds. The younger, session 2, gives Y2 up (wound-wait); session 1 moves there
    and ends, then session 2 takes X2 and Y2 back. Both get their solo tokens, and no server is banned (before,
    both waited out the room wait and failed)."""
    prompts, want = _two_prompts(llama_checkpoint)
    config, head = load_client_head(llama_checkpoint)
    n, opened, go = config.num_hidden_layers, [threading.Event(), threading.Event()], threading.Event()
    one_at_a_time = ServerLimits(max_sessions_per_peer=1)
    with crossed_servers(llama_checkpoint, 4096, one_at_a_time) as (ids, servers, infos):
        # (the room wait would fail both after 60 s; the hold limit, which breaks cycles between clients, is off)
        swarm = SwarmClient(
            [], "room-cycle", n, missing_blocks_timeout_s=0, request_timeout_s=120, room_hold_s=120
        )
        try:
            model = DistributedModelForCausalLM(config, head, swarm).eval()
            with ThreadPoolExecutor(2) as pool:
                swarm.use_servers([infos["X2"], infos["Y1"]])
                runs = [pool.submit(_turns, model, prompts[0], opened[0], go)]
                assert opened[0].wait(60)
                swarm.use_servers([infos["X1"], infos["Y2"]])
                runs.append(pool.submit(_turns, model, prompts[1], opened[1], go))
                assert opened[1].wait(60)
                for name in ("X1", "Y1"):
                    run_sync(servers[name].stop())
                swarm.use_servers([infos["X2"], infos["Y2"]])
                go.set()
                outs = [r.result(timeout=180) for r in runs]
        finally:
            go.set()
            run_sync(swarm.shutdown())
        assert outs == want
        moved = [(f.peer_id, [h.peer_id for h in f.replacement]) for f in swarm.failovers]
        x2, y2 = ids["X2"].peer_id, ids["Y2"].peer_id
        assert (ids["Y1"].peer_id, [y2]) in moved and (ids["X1"].peer_id, [x2]) in moved
        assert (y2, [y2]) in moved  # session 2 gave Y2 up, and took it back
        assert swarm.bans._strikes.keys() <= {ids["X1"].peer_id, ids["Y1"].peer_id}


def test_sessions_of_two_clients_waiting_for_room_that_the_other_holds_do_not_wait_for_ever(llama_checkpoint):
    """The same cycle between two clients, each with one session, over X2 and Y2 that have cache for one session
    in all: neither client sees the other's wait. The session that has waited `room_hold_s` (1 s here) for room lets
    its other server go; the other session takes it and ends, and the first then gets both. Both get their solo
    tokens (before, both waited out the room wait and failed)."""
    prompts, want = _two_prompts(llama_checkpoint)
    config, head = load_client_head(llama_checkpoint)
    n, opened, go = config.num_hidden_layers, [threading.Event(), threading.Event()], threading.Event()
    whole_cache = ServerLimits(max_cache_share_per_peer=1.0)
    with crossed_servers(llama_checkpoint, 64, whole_cache) as (ids, servers, infos):
        swarms = [
            SwarmClient(
                [], f"room-clients-{i}", n, missing_blocks_timeout_s=0, request_timeout_s=120, room_hold_s=1
            )
            for i in range(2)
        ]
        try:
            models = [DistributedModelForCausalLM(config, head, swarm).eval() for swarm in swarms]
            swarms[0].use_servers([infos["X2"], infos["Y1"]])
            swarms[1].use_servers([infos["X1"], infos["Y2"]])
            with ThreadPoolExecutor(2) as pool:
                runs = [pool.submit(_turns, m, p, o, go) for m, p, o in zip(models, prompts, opened)]
                assert all(o.wait(60) for o in opened)
                for name in ("X1", "Y1"):
                    run_sync(servers[name].stop())
                for swarm in swarms:
                    swarm.use_servers([infos["X2"], infos["Y2"]])
                go.set()
                outs = [r.result(timeout=180) for r in runs]
        finally:
            go.set()
            for swarm in swarms:
                run_sync(swarm.shutdown())
        assert outs == want
        given_up = [f for swarm in swarms for f in swarm.failovers if "long wait for room" in f.reason]
        assert given_up  # one of them let its other server go
        for swarm in swarms:
            assert swarm.bans._strikes.keys() <= {ids["X1"].peer_id, ids["Y1"].peer_id}
