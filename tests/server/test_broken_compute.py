"""A server whose own compute breaks: it must notice, announce itself offline (clients route around it at once),
end its sessions with a clear error code and exit with a non-zero status and one log line saying why, so that a
supervisor restarts it, rather than stay online in the DHT failing every step. The same for a dead DHT process;
a move whose load fails keeps the old blocks and their sessions; and the refusals the wire and the push queue
answer by themselves are counted like the others."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import threading

import psutil
import pytest
import torch
from in_process import refusals

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.dht import ServerState
from swarmllm.models import load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.server.tp import TensorParallelSpan
from swarmllm.server.tp_backend import TensorParallelBackend
from swarmllm.wire import DirectServer, Identity, Message, RemoteError, connect_direct
from swarmllm.wire.connection import STREAM_QUEUE_SIZE
from swarmllm.wire.messages import OpenSession

ATOL = 1e-4


def _client(path, local, prefix):
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=local.initial_peers, dht_prefix=prefix
    )


def _ranks(pid: int) -> list[psutil.Process]:
    """The tensor-parallel ranks a server process spawned (multiprocessing's spawn children)."""
    return [
        child
        for child in psutil.Process(pid).children(recursive=True)
        if any("spawn_main" in part for part in child.cmdline())
    ]


def test_a_tp_server_whose_rank_dies_goes_offline_ends_its_sessions_and_exits(local, llama_checkpoint):
    local.add_server(str(llama_checkpoint), (0, 4), extra=["--dht-prefix", "tp-dies", "--tp", "2"])
    server = local.servers[-1]
    remote = _client(llama_checkpoint, local, "tp-dies")
    try:
        (info,) = run_sync(remote.swarm.servers(refresh=True))
        assert info.state == ServerState.ONLINE
        conn = run_sync(remote.swarm.connection(info.peer_id))
        stream = run_sync(conn.open_stream("inference", OpenSession(0, 4, 1, 16).to_message()))
        hidden = torch.randn(1, 3, remote.config.hidden_size, generator=torch.Generator().manual_seed(0))
        run_sync(stream.send(Message({"position": 0}, [hidden])))
        got = run_sync(stream.recv(timeout=60)).tensors[0]
        with torch.inference_mode():
            want = load_span(str(llama_checkpoint), 0, 4)(hidden)
        torch.testing.assert_close(got, want, atol=ATOL, rtol=0)  # the span served right before the fault

        (rank,) = _ranks(server.proc.pid)
        os.kill(rank.pid, signal.SIGKILL)

        # the open session ends with a code that says what happened, without the client sending anything
        with pytest.raises(RemoteError) as ended:
            run_sync(stream.recv(timeout=60))
        assert ended.value.code == "compute_failed", ended.value
        # the server exits by itself, with a status a supervisor reads as a failure, and one line saying why
        status = server.wait_or_kill(60)
        assert status == 1, "".join(server.log[-40:])
        why = [line for line in server.log if "compute failed" in line]
        assert len(why) == 1 and "rank 1" in why[0], "".join(server.log[-40:])
        # and it said so in the DHT before it went: clients route around it at once, not after its record expires
        (gone,) = run_sync(remote.swarm.servers(refresh=True))
        assert gone.peer_id == info.peer_id and gone.state == ServerState.OFFLINE
    finally:
        remote.shutdown()


async def test_a_step_that_fails_because_a_rank_died_ends_its_session_with_compute_failed(checkpoints):
    """The step in flight when the compute breaks: its session ends with `compute_failed` (not an `internal`
    error, which reads as a bug in the request), and any later session too, while the backend says why."""
    path = checkpoints("llama")
    backend = TensorParallelBackend(TensorParallelSpan(path, 0, 4, world=2, threads=1), cache_tokens=64)
    handler = RequestHandler(backend, dict)
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    conn = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
    try:
        stream = await conn.open_stream("inference", OpenSession(0, 4, 1, 16).to_message())
        hidden = torch.randn(1, 3, backend.hidden_size, generator=torch.Generator().manual_seed(1))
        await stream.send(Message({"position": 0}, [hidden[:, :2]]))
        await stream.recv(timeout=60)
        assert backend.failure() is None
        (worker,) = backend.parallel._workers
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        await stream.send(Message({"position": 2}, [hidden[:, 2:]]))
        with pytest.raises(RemoteError) as ended:
            await stream.recv(timeout=60)
        assert ended.value.code == "compute_failed" and "rank 1" in str(ended.value), ended.value
        later = await conn.open_stream("inference", OpenSession(0, 4, 1, 16).to_message())
        await later.send(Message({"position": 0}, [hidden]))
        with pytest.raises(RemoteError) as refused:
            await later.recv(timeout=60)
        assert refused.value.code == "compute_failed"
    finally:
        await conn.close()
        await server.stop()
        backend.shutdown()


async def test_refusals_the_wire_and_the_push_queue_answer_are_counted(checkpoints):
    """README: `swarmllm_server_refusals_total{reason=...busy...too_large}` counts refused requests. A forward
    whose payload is over the method's cap is refused by the wire before it reaches the handler (`too_large`), and
    a push into a session whose queue is full with `busy`: both are refusals the server makes, so both count."""
    span = load_span(str(checkpoints("llama")), 0, 4)
    backend = Backend(span, cache_tokens=128)
    handler = RequestHandler(backend, dict, ServerLimits(max_forward_tokens=4, max_prompt_tokens=1))
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    pusher = Identity.generate()
    conn_identity = Identity.generate()
    conn = await connect_direct(*server.address, conn_identity, expected_peer_id=None)
    previous = await connect_direct(*server.address, pusher, expected_peer_id=None)
    gate = threading.Event()
    try:
        hidden = torch.randn(
            1, 64, backend.hidden_size
        )  # 16 KiB: over the ~1 KiB a forward of 4 tokens carries
        with pytest.raises(RemoteError) as info:
            await conn.call("forward", Message({"start": 0, "end": 4}, [hidden]))
        assert info.value.code == "too_large"
        assert refusals(handler.metrics, "too_large") == 1

        opening = {"start": 0, "end": 4, "batch_size": 1, "max_length": 64, "session_id": "a" * 24}
        stream = await conn.open_stream("inference", Message({**opening, "accept_push_from": pusher.peer_id}))
        await stream.send(Message({"position": 0, "step": 0}, [hidden[:, :1]]))
        assert (await stream.recv(timeout=30)).meta["step"] == 0  # the session is open
        blocker = backend.compute.submit("test", gate.wait)  # the session's prefill waits behind it
        await stream.send(Message({"position": 1, "step": 1}, [hidden[:, 1:41]]))
        # the session has taken step 1 from its queue once its prefill waits behind the blocker: else step 1
        # holds a place in the queue too, and two pushes are refused
        async with asyncio.timeout(30):
            while not backend.compute.waiting(conn_identity.peer_id):
                await asyncio.sleep(0.01)
        push = Message({"session_id": "a" * 24, "position": 41, "step": 2}, [hidden[:, 41:42]])
        refused = asyncio.get_running_loop().create_future()
        for _ in range(STREAM_QUEUE_SIZE + 1):  # more than the session's queue holds while its step waits
            await previous.notify("push", push, lambda e: refused.done() or refused.set_result(e))
        assert (await asyncio.wait_for(refused, 10)).code == "busy"
        assert refusals(handler.metrics, "busy") == 1
        gate.set()
        blocker.result(timeout=10)
        assert (await stream.recv(timeout=30)).meta["step"] == 1  # the session itself goes on
    finally:
        gate.set()
        await previous.close()
        await conn.close()
        await server.stop()
        backend.shutdown()


def test_a_move_whose_load_fails_keeps_the_server_on_its_blocks_with_its_sessions(
    local, checkpoints, tmp_path
):
    """A movable server decides to move (the only server of blocks [0, 2) died) but cannot load the new blocks
    (their weights are gone from its disk): it must go on serving the blocks it has, sessions included, not
    leave the swarm and exit over a move that was only an improvement."""
    path = shutil.copytree(checkpoints("llama"), tmp_path / "llama")
    fast = ["--dht-prefix", "move-fails", "--update-period", "2", "--balance-period", "2"]
    local.add_server(str(path), (0, 2), extra=fast)
    first = local.servers[-1]
    mover = local.add_server(str(path), None, extra=[*fast, "--num-blocks", "2"])
    assert (mover["start"], mover["end"]) == (2, 4)  # the blocks nobody served
    server = local.servers[-1]
    local.add_server(str(path), (2, 4), extra=fast)  # now [2, 4) has two servers, [0, 2) one
    remote = _client(path, local, "move-fails")
    try:
        conn = run_sync(remote.swarm.connection(mover["peer_id"]))
        stream = run_sync(conn.open_stream("inference", OpenSession(2, 4, 1, 16).to_message()))
        hidden = torch.randn(1, 4, remote.config.hidden_size, generator=torch.Generator().manual_seed(2))
        with torch.inference_mode():
            want = load_span(str(path), 2, 4)(hidden)
        run_sync(stream.send(Message({"position": 0}, [hidden[:, :2]])))
        torch.testing.assert_close(
            run_sync(stream.recv(timeout=60)).tensors[0], want[:, :2], atol=ATOL, rtol=0
        )

        (path / "model.safetensors").unlink()  # the weights of [0, 2) can no longer be loaded here
        first.kill()  # [0, 2) lost its only server: the mover's move is due
        server.wait_for(lambda s: "moving from blocks [2, 4) to [0, 2)" in s, 60)
        server.wait_for(lambda s: "move" in s and "failed" in s and "no move for 2 s" in s, 60)
        # it tries again no sooner, and then waits twice as long (a move failing out of memory is not retried
        # every few seconds); meanwhile it serves its blocks
        server.wait_for(lambda s: "move" in s and "failed" in s and "no move for 4 s" in s, 60)
        run_sync(stream.send(Message({"position": 2}, [hidden[:, 2:]])))
        torch.testing.assert_close(
            run_sync(stream.recv(timeout=60)).tensors[0], want[:, 2:], atol=ATOL, rtol=0
        )
        assert server.proc.poll() is None
        found = {s.peer_id: s for s in run_sync(remote.swarm.servers(refresh=True))}
        mine = found[mover["peer_id"]]
        assert (mine.state, mine.start_block, mine.end_block) == (ServerState.ONLINE, 2, 4)
    finally:
        remote.shutdown()


def test_a_server_whose_dht_process_dies_leaves_and_exits_instead_of_hanging(local, llama_checkpoint):
    """The server's DHT runs in a child process; if that dies, every announcement and look-up waits for a reply
    that never comes: the server used to hang there for good (deaf even to SIGTERM), its record expiring while
    it held its clients' sessions. It must notice, hand its sessions back and exit with status 1 and one line."""
    local.add_server(
        str(llama_checkpoint), (0, 4), extra=["--dht-prefix", "dht-dies", "--update-period", "2"]
    )
    server = local.servers[-1]
    remote = _client(llama_checkpoint, local, "dht-dies")
    try:
        (info,) = run_sync(remote.swarm.servers(refresh=True))
        conn = run_sync(remote.swarm.connection(info.peer_id))
        stream = run_sync(conn.open_stream("inference", OpenSession(0, 4, 1, 16).to_message()))
        hidden = torch.randn(1, 2, remote.config.hidden_size, generator=torch.Generator().manual_seed(3))
        run_sync(stream.send(Message({"position": 0}, [hidden])))
        run_sync(stream.recv(timeout=60))

        (dht,) = [c for c in psutil.Process(server.proc.pid).children() if c.name().startswith("python")]
        os.kill(dht.pid, signal.SIGKILL)
        with pytest.raises(RemoteError) as ended:
            run_sync(stream.recv(timeout=60))
        assert ended.value.code == "server_leaving", ended.value
        status = server.wait_or_kill(60)
        assert status == 1, "".join(server.log[-40:])
        why = [line for line in server.log if "DHT process" in line]
        assert len(why) == 1 and "leaving" in why[0], "".join(server.log[-40:])
    finally:
        remote.shutdown()
