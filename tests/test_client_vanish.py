"""A client process that dies mid-session (SIGKILL of its whole process group: no goodbye, no stream close)
must not leave its KV caches reserved on the servers: each server notices the lost connection and hands the
session's cache tokens back to its budget."""

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.local import LocalSwarm
from swarmllm.wire import Message

BUDGET = 4096  # --max-cache-tokens of every server
SESSION_LENGTH = 100  # max_length of each client's session (batch 1): the cache tokens it holds per server
SPANS = [(0, 3), (3, 6)]  # one server per span, so every client session holds cache on both

# The doomed client: opens a session, generates a few tokens in it, reports its chain, then blocks for good.
CLIENT = """
import json, sys, threading
import torch
from swarmllm import AutoDistributedModelForCausalLM

path, max_length, peers = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers)
with model.inference_session(max_length=max_length) as session:
    model.generate(torch.tensor([[1, 17, 42, 5]]), max_new_tokens=4, do_sample=False)
    hops = [hop.peer_id for hop in session.session.hops]
    print("READY " + json.dumps(hops), flush=True)
    threading.Event().wait()
"""


@pytest.fixture(scope="module")
def swarm(checkpoints):
    path = checkpoints("llama", num_layers=6)
    with LocalSwarm() as local:
        local.start_bootstrap()
        records = local.add_servers(
            [(str(path), span) for span in SPANS], extra=["--max-cache-tokens", str(BUDGET)]
        )
        yield local, path, [r["peer_id"] for r in records]


def start_client(path, peers) -> tuple[subprocess.Popen, list[str]]:
    """Start a client process and wait (deadline, not a sleep) until its session holds cache on the servers."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CLIENT, str(path), str(SESSION_LENGTH), *peers],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,  # its own process group: killpg reaches its p2pd daemon too
    )
    lines: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    output = []
    deadline = time.monotonic() + 120
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        output.append(line)
        if line.startswith("READY "):
            return proc, json.loads(line.split(" ", 1)[1])
    kill_group(proc)
    raise AssertionError("the client process did not get ready:\n" + "".join(output[-40:]))


def kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(30)


def free_tokens(observer, peer_ids) -> dict[str, int]:
    free = {}
    for peer_id in peer_ids:
        conn = run_sync(observer.swarm.connection(peer_id))
        reply = run_sync(conn.call("info", Message(), timeout=5))
        free[peer_id] = int(reply.meta["cache_tokens_left"])
    return free


def wait_for_free(observer, peer_ids, want: int, timeout_s: float = 30.0) -> dict[str, int]:
    """Poll the servers' free cache until every one shows `want` tokens (or the deadline passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        free = free_tokens(observer, peer_ids)
        if all(v == want for v in free.values()) or time.monotonic() > deadline:
            return free
        time.sleep(0.2)  # polling interval of a condition with a deadline, not a synchronisation


def test_killed_clients_release_their_caches(swarm):
    local, path, peer_ids = swarm
    observer = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=local.initial_peers)
    clients = []
    try:
        run_sync(observer.swarm.servers(refresh=True))  # the servers' direct addresses, for the info calls
        assert free_tokens(observer, peer_ids) == {p: BUDGET for p in peer_ids}

        for _ in range(2):
            proc, hops = start_client(path, local.initial_peers)
            clients.append(proc)
            assert sorted(hops) == sorted(peer_ids)
        held = BUDGET - 2 * SESSION_LENGTH
        assert free_tokens(observer, peer_ids) == {p: held for p in peer_ids}

        # the first client dies: exactly its session's tokens come back, the other client's stay reserved
        began = time.monotonic()
        kill_group(clients[0])
        free = wait_for_free(observer, peer_ids, BUDGET - SESSION_LENGTH)
        assert free == {p: BUDGET - SESSION_LENGTH for p in peer_ids}, free
        first_s = time.monotonic() - began

        began = time.monotonic()
        kill_group(clients[1])
        free = wait_for_free(observer, peer_ids, BUDGET)
        assert free == {p: BUDGET for p in peer_ids}, free
        print(f"caches released {first_s:.2f} s and {time.monotonic() - began:.2f} s after the SIGKILLs")

        for server in local.servers:  # the servers survived their clients' deaths
            assert server.proc.poll() is None
    finally:
        for proc in clients:
            kill_group(proc)
        observer.shutdown()
