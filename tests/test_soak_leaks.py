"""Soak checks: servers and clients that run for days must not grow. Each test runs a few hundred cycles of one kind
of work (sessions, generates, models made and dropped) and compares what is held after N cycles with what is held
after 2N: a quantity that grows with the number of cycles, or does not come back once the work is done, is a leak.

The push chain runs in this process (two `RequestHandler`s behind `DirectServer`s on 127.0.0.1, pushing to each
other), so that what the servers hold is counted with the garbage collector; models made and dropped join a swarm of
real server processes."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psutil
import pytest
import torch
from server_infos import online_server

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.swarm import SwarmClient
from swarmllm.local import LocalSwarm
from swarmllm.models import load_client_head, load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.wire import DirectServer, Identity
from swarmllm.wire.messages import Step
from swarmllm.wire.pool import ConnectionPool

PROMPT = 120  # tokens of each cycle's prompt: its hidden states are what a leak of session inputs holds


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# servers that never refuse this client for its request rate: a fast machine's generates (~6 ms each, 2-3 requests)
# pass the default 50 a second, and the hops refused and replaced then are `test_refused_hops_...`'s subject
UNLIMITED = ServerLimits(peer_rate_per_s=100_000.0, peer_burst=100_000)


@contextmanager
def push_chain(
    path: str, limits: ServerLimits = UNLIMITED
) -> Iterator[tuple[DistributedModelForCausalLM, list[RequestHandler]]]:
    """The model of checkpoint `path` over two in-process servers of half its blocks each, the first pushing its
    outputs straight to the second (as `Server` wires them: a connection pool to its peers)."""
    config, head = load_client_head(path)
    blocks = config.num_hidden_layers
    spans = [(0, blocks // 2), (blocks // 2, blocks)]
    identities = [Identity.generate() for _ in spans]
    addresses: dict[str, tuple[str, int]] = {}

    async def start() -> list[tuple[RequestHandler, DirectServer, ConnectionPool]]:
        started = []
        for identity, (start, end) in zip(identities, spans, strict=True):
            pool = ConnectionPool(identity, None)

            async def connect(peer_id: str, pool: ConnectionPool = pool):
                host, port = addresses[peer_id]
                return await pool.get(peer_id, [f"{host}:{port}"])

            backend = Backend(load_span(path, start, end), cache_tokens=4096)
            handler = RequestHandler(backend, dict, limits=limits, connect=connect, peer_id=identity.peer_id)
            server = DirectServer(handler.handlers(), identity)
            await server.start()
            addresses[identity.peer_id] = server.address
            started.append((handler, server, pool))
        return started

    async def stop(started) -> None:
        for handler, server, pool in started:
            await pool.close()
            await server.stop()
            handler.backend.shutdown()

    started = run_sync(start())
    swarm = SwarmClient([], "soak", blocks, missing_blocks_timeout_s=0, spot_check_fraction=0)
    swarm.use_servers(
        [
            online_server(identity.peer_id, start, end, address=addresses[identity.peer_id])
            for identity, (start, end) in zip(identities, spans, strict=True)
        ]
    )
    try:
        yield DistributedModelForCausalLM(config, head, swarm).eval(), [h for h, _, _ in started]
    finally:
        run_sync(swarm.shutdown())
        run_sync(stop(started))


def live_steps() -> int:
    """Session inputs (`Step`s, with their hidden states) alive in this process."""
    gc.collect()
    return sum(type(o) is Step for o in gc.get_objects())


def step_holders() -> dict[str, int]:
    """Type name -> how many objects of it refer to the live `Step`s: what a failed count points at."""
    gc.collect()
    holders: dict[str, int] = {}
    steps = [o for o in gc.get_objects() if type(o) is Step]
    for step in steps:
        for referrer in gc.get_referrers(step):
            if referrer is steps:
                continue
            name = getattr(referrer, "__qualname__", None) or type(referrer).__qualname__
            holders[name] = holders.get(name, 0) + 1
    return holders


def settled(count, timeout_s: float = 5.0) -> int:
    """`count()` once it is 0, or its value at the deadline (what is left once work in flight has ended)."""
    deadline = time.monotonic() + timeout_s
    while (value := count()) > 0 and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval of a condition with a deadline, not a synchronisation
    return value


def test_pushed_sessions_hold_nothing_once_closed(llama_checkpoint):
    """A server that pushes its outputs on keeps a callback per push, to tell the client if the push fails: once
    the sessions closed, nothing of their steps may stay alive through those callbacks. (It kept each step's input,
    hidden states and all, for its last 4096 pushes per next server: 2N sessions held twice what N did.)"""
    prompt = torch.randint(3, 100, (1, PROMPT))
    with push_chain(str(llama_checkpoint)) as (model, handlers):
        for _ in range(5):
            model.generate(prompt, max_new_tokens=2)
        assert handlers[0]._push_connections, "the first server did not push"
        baseline = live_steps()
        held = []
        for _ in range(2):
            for _ in range(100):
                model.generate(prompt, max_new_tokens=2)
            # (the last generate's push may still be finishing on the servers' loop: a leak is what stays)
            held.append(settled(lambda: live_steps() - baseline))
        assert all(not h.backend.sessions for h in handlers)
        # (a push still in flight when the baseline was counted makes it one too many: -1 then, not a leak)
        assert max(held) <= 0, (
            f"Steps alive after 100 and 200 more sessions: {held}, held by {step_holders()}"
        )


def test_refused_hops_leave_nothing_alive_in_kept_log_records(llama_checkpoint, caplog):
    """Servers that refuse this client past a request rate make it replace hops, which it logs: a handler that
    keeps log records (pytest's does, as a memory handler would) must not keep the hops' steps alive through them.
    (A record's arguments held the replaced hop, and the re-pointing's error with its traceback's frames: the
    soak above, held to the default 50 requests a second on a fast machine, counted 8 steps alive.)"""
    caplog.set_level(logging.INFO, logger="swarmllm")
    prompt = torch.randint(3, 100, (1, PROMPT))
    with push_chain(str(llama_checkpoint), ServerLimits(peer_rate_per_s=10.0, peer_burst=2)) as (model, _):
        model.generate(prompt, max_new_tokens=2)
        baseline = live_steps()
        for _ in range(12):
            model.generate(prompt, max_new_tokens=2)
        assert any("replacing it" in r.getMessage() for r in caplog.records), (
            "no hop was refused and replaced"
        )
        held = settled(lambda: live_steps() - baseline)
        assert held <= 0, f"Steps alive after 12 sessions with refused hops: {held}, held by {step_holders()}"


@pytest.fixture(scope="module")
def one_server(llama_checkpoint):
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_server(str(llama_checkpoint))
        yield local


def client_holdings() -> dict[str, int]:
    """What this client process holds: open files, child processes (a DHT peer and its p2pd daemon per swarm
    joined), and tasks on the client's event loop."""

    async def tasks() -> int:
        return len(asyncio.all_tasks())

    me = psutil.Process()
    return {"fds": me.num_fds(), "children": len(me.children(recursive=True)), "tasks": run_sync(tasks())}


def wait_for(condition, timeout_s: float):
    """Poll `condition()` until it returns something true, or return its last value at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not (value := condition()) and time.monotonic() < deadline:
        time.sleep(0.1)  # polling interval of a condition with a deadline, not a synchronisation
    return value


def test_dropped_models_leave_nothing_behind(llama_checkpoint, one_server):
    """A model made with `from_pretrained` joins the swarm (a DHT peer process with its p2pd daemon, connections,
    tasks on the client's loop); dropped without `shutdown` (as transformers' models are), it must take them with
    it. (Each dropped model left 2 processes, 6 open files and 3 tasks behind for the life of the process.)"""
    prompt = torch.tensor([[1, 17, 42, 5]])

    def use_and_drop(n: int) -> None:
        for _ in range(n):
            model = AutoDistributedModelForCausalLM.from_pretrained(
                str(llama_checkpoint), initial_peers=one_server.initial_peers
            )
            model.generate(prompt, max_new_tokens=2)
            del model
        gc.collect()

    warm = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=one_server.initial_peers
    )
    warm.generate(prompt, max_new_tokens=2)
    warm.shutdown()  # what a model leaves for the next (imports, the client loop) is in the baseline
    baseline = client_holdings()
    grown = []
    for n in (1, 2):
        use_and_drop(n)
        back = wait_for(lambda: (h := client_holdings()) and all(h[k] <= baseline[k] for k in h) and h, 20)
        settled = back or client_holdings()
        grown.append({k: max(0, settled[k] - baseline[k]) for k in baseline})
    assert grown == [dict.fromkeys(baseline, 0)] * 2, (
        f"held more than before after 1 and 3 dropped models: {grown}"
    )
