"""A tensor-parallel rank that is frozen (SIGSTOP: a hung device driver, a process swapped out for good) rather
than dead: the server must notice within a bounded time (`tp.STEP_TIMEOUT_S` over what the step may take), end
its sessions with `compute_failed`, announce itself offline and exit with status 1, as it does for a dead rank;
a client whose session was on it fails over to another server. And ranks with nothing to do (an idle server) must
not time out waiting for the next command."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
import torch
from test_broken_compute import _ranks
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.dht import ServerState
from swarmllm.models import load_span
from swarmllm.server.tp import STEP_TIMEOUT_S, TensorParallelSpan
from swarmllm.wire import Message, RemoteError
from swarmllm.wire.messages import OpenSession

ATOL = 1e-4
TOKENS = torch.tensor([[1, 30, 40, 50, 7, 9]])


def test_a_tp_server_with_a_frozen_rank_fails_its_sessions_in_bounded_time_and_exits(local, llama_checkpoint):
    local.add_server(str(llama_checkpoint), (0, 4), extra=["--dht-prefix", "tp-frozen", "--tp", "2"])
    server = local.servers[-1]
    (rank,) = _ranks(server.proc.pid)
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=local.initial_peers, dht_prefix="tp-frozen"
    )
    frozen = False
    try:
        (info,) = run_sync(remote.swarm.servers(refresh=True))
        conn = run_sync(remote.swarm.connection(info.peer_id))
        stream = run_sync(conn.open_stream("inference", OpenSession(0, 4, 1, 16).to_message()))
        hidden = torch.randn(1, 3, remote.config.hidden_size, generator=torch.Generator().manual_seed(0))
        run_sync(stream.send(Message({"position": 0}, [hidden[:, :2]])))
        run_sync(stream.recv(timeout=60))
        reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
        with torch.no_grad():
            want = reference(TOKENS).logits
        # the client's session starts on the only server there is
        with remote.inference_session(max_length=16):
            with torch.no_grad():
                first = remote(TOKENS[:, :4]).logits
            local.add_server(str(llama_checkpoint), (0, 4), extra=["--dht-prefix", "tp-frozen"])

            os.kill(rank.pid, signal.SIGSTOP)
            frozen = True
            began = time.monotonic()
            # a step in flight on the frozen ranks
            run_sync(stream.send(Message({"position": 2}, [hidden[:, 2:]])))
            # its last 2 tokens: the client moves to the other server, not waits 300 s
            with torch.no_grad():
                rest = remote(TOKENS).logits
            assert time.monotonic() - began < STEP_TIMEOUT_S
        torch.testing.assert_close(torch.cat([first, rest], 1), want, atol=ATOL, rtol=0)

        # the step in flight ends with `compute_failed` once it is over its bound, not at gloo's 300 s timeout
        with pytest.raises(RemoteError) as ended:
            run_sync(stream.recv(timeout=STEP_TIMEOUT_S + 30))
        assert ended.value.code == "compute_failed", ended.value
        assert time.monotonic() - began < STEP_TIMEOUT_S + 30
        status = server.wait_or_kill(60)
        assert status == 1, "".join(server.log[-40:])
        why = [line for line in server.log if "compute failed" in line]
        assert len(why) == 1 and "did not finish" in why[0], "".join(server.log[-40:])
        gone = {s.peer_id: s for s in run_sync(remote.swarm.servers(refresh=True))}[info.peer_id]
        assert gone.state == ServerState.OFFLINE
        assert not rank.is_running() or rank.status() == psutil.STATUS_ZOMBIE  # no frozen rank left behind
    finally:
        if frozen and rank.is_running():
            os.kill(rank.pid, signal.SIGCONT)
        remote.shutdown()


def test_idle_ranks_do_not_time_out_waiting_for_the_next_command(checkpoints):
    """Ranks 1..N-1 wait for rank 0's next command; an idle server sends none for as long as it has no client.
    That wait must not be a collective with a timeout: it was, and every idle `serve --tp` server lost its ranks
    (and exited) after 300 s without a step. Here with a 20 s collective timeout (it bounds joining the group
    too, while the ranks start) and a pause longer than that."""
    path = str(checkpoints("llama"))
    reference = load_span(path, 0, 4)
    hidden = torch.randn(1, 3, reference.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        want = reference(hidden)
    with TensorParallelSpan(path, 0, 4, world=2, threads=1, collective_timeout_s=20) as span:
        torch.testing.assert_close(span.forward(hidden), want, atol=ATOL, rtol=0)
        time.sleep(21)  # the idleness under test, not a synchronisation
        assert span.failure() is None
        torch.testing.assert_close(span.forward(hidden), want, atol=ATOL, rtol=0)
        assert span.failure() is None


def test_a_call_on_a_frozen_rank_fails_once_over_its_bound_and_the_span_says_why(checkpoints):
    """The span alone (no server): with a 2 s step timeout, a forward on a stopped rank raises after about that,
    not after gloo's timeout; `failure` names the stopped rank, and close() returns, leaving no rank behind."""
    path = str(checkpoints("llama"))
    reference = load_span(path, 0, 4)
    hidden = torch.randn(1, 3, reference.config.hidden_size, generator=torch.Generator().manual_seed(2))
    span = TensorParallelSpan(path, 0, 4, world=2, threads=1, step_timeout_s=2)
    (worker,) = span._workers
    try:
        with torch.inference_mode():
            want = reference(hidden)
        first = time.monotonic()
        torch.testing.assert_close(span.forward(hidden), want, atol=ATOL, rtol=0)
        first = time.monotonic() - first
        os.kill(worker.pid, signal.SIGSTOP)
        began = time.monotonic()
        with pytest.raises(RuntimeError):
            span.forward(hidden)
        took = time.monotonic() - began
        assert 2 <= took < 2 + 10 * first + 5, took  # its bound (2 s + 10x what this work took before)
        why = span.failure()
        assert why is not None and f"rank 1 (pid {worker.pid}) stopped" in why, why
        with pytest.raises(RuntimeError, match="gone"):
            span.forward(hidden)  # no later call waits on the broken ranks either
    finally:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGCONT)
        span.close()
    assert not worker.is_alive()
