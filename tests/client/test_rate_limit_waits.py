"""A server's request-rate refusal (`quota`, past its token bucket) says when a token is available again
(`retry_after_s`), and the client waits that out and asks the same server again, like an HTTP client taking a 429
with Retry-After, when no other server can take the request; refusals that only a closed session clears (the
peer's open sessions, its cache share) still name their reason at once. A ping refused for load is no ban."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from in_process import model_over_one_server, refusals
from transformers import AutoModelForCausalLM

from swarmllm.client.loop import run_sync
from swarmllm.client.swarm import SessionRefused
from swarmllm.server.handler import ServerLimits
from swarmllm.server.metrics import ServerMetrics
from swarmllm.server.quota import PeerLimits, PeerQuotas
from swarmllm.wire import Message, RemoteError


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_rate_refusal_says_when_a_token_is_available():
    """After a burst of 3 at 4/s, a request 1/8 s later (half a token back) is refused with the time the rest of
    its token takes (1/8 s); half of that later it is refused with the time left (1/16 s), and once that passed
    it is admitted. (Times in binary fractions, so the sums are exact.)"""
    clock = Clock()
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


def _expected(path: str, ids: torch.Tensor) -> torch.Tensor:
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return local.generate(ids, max_new_tokens=4, do_sample=False)


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


def test_a_peer_at_its_open_sessions_limit_is_told_so_at_once(llama_checkpoint):
    """A limit that only a closed session clears is not waited for: with its one allowed session open, a
    generate outside it fails at once with SessionRefused naming the limit, and the server is not banned."""
    ids = torch.tensor([[1, 5, 9, 3]])
    limits = ServerLimits(max_sessions_per_peer=1)
    with model_over_one_server(
        llama_checkpoint, "rate-sessions", limits=limits, request_timeout_s=30
    ) as model:
        with model.inference_session(max_length=16), torch.no_grad():
            model.generate(ids, max_new_tokens=1, do_sample=False)  # opens it
            began = time.monotonic()
            with ThreadPoolExecutor(1) as other_thread:  # (a session belongs to its thread)
                outside = other_thread.submit(model.generate, ids, max_new_tokens=1, do_sample=False)
                with pytest.raises(SessionRefused) as refused:
                    outside.result()
            assert time.monotonic() - began < 5
        assert refused.value.codes == {"quota"} and "open sessions limit" in str(refused.value)
        assert model.swarm.bans._strikes == {}
