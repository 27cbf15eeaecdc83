"""How a swarm of real processes on 127.0.0.1 lives through trouble with its DHT: a bootstrap peer that dies and
comes back, initial peers that do not answer."""

import asyncio
import subprocess
import time

import psutil
import torch
from ports import free_port
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.directory import Directory
from swarmllm.client.loop import run_sync
from swarmllm.local import LocalSwarm

BOUND_S = 20  # seconds; only to fail a test instead of hanging


async def servers_seen_through(
    initial_peers: list[str], dht_prefix: str, peer_id: str, bound_s: float
) -> float:
    """Seconds until a client joined through `initial_peers` reads `peer_id`'s online record (TimeoutError after
    `bound_s`). The client is one DHT peer, asking again as soon as each look-up returns."""
    directory = Directory(initial_peers)
    began = time.monotonic()
    await directory.start()
    try:
        async with asyncio.timeout(bound_s):
            while True:
                found = await directory.servers(dht_prefix, 4)
                if any(s.peer_id == peer_id and s.state.value == "online" for s in found):
                    return time.monotonic() - began
                await asyncio.sleep(0.2)  # (a look-up among 2 peers takes milliseconds: don't spin)
    finally:
        await directory.shutdown()


def test_servers_rejoin_a_bootstrap_peer_restarted_with_its_identity(llama_checkpoint, tmp_path):
    """`swarmllm dht --identity KEY --port P` keeps its multiaddr across restarts, so that a swarm has a stable
    address to join through. After it is SIGKILLed and started again, the servers that knew it announce through it
    again within a few update periods: a client joining through it finds them (before, never: the servers had
    dropped it from their routing tables and nothing made them meet it again)."""
    key, port = str(tmp_path / "bootstrap.key"), free_port()
    bootstrap_flags = ["--identity", key, "--port", str(port)]
    with LocalSwarm() as local:
        first_peers = local.start_bootstrap(extra=bootstrap_flags)
        record = local.add_server(str(llama_checkpoint), (0, 4), extra=["--update-period", "1"])
        prefix = llama_checkpoint.name
        run_sync(servers_seen_through(local.initial_peers, prefix, record["peer_id"], BOUND_S))
        local.bootstrap.kill()
        assert local.start_bootstrap(extra=bootstrap_flags) == first_peers  # the same address to join through
        seconds = run_sync(servers_seen_through(local.initial_peers, prefix, record["peer_id"], BOUND_S))
        assert seconds < BOUND_S


def dht_process(server_pid: int) -> psutil.Process:
    """A server's DHT process: its child that runs the libp2p daemon."""
    children = psutil.Process(server_pid).children()
    return next(p for p in children if any(c.name() == "p2pd" for c in p.children()))


def test_a_server_whose_dht_process_froze_still_serves_and_leaves_on_sigterm(llama_checkpoint):
    """A server's DHT process that stops answering (SIGSTOPped here; a wedged event loop or daemon alike): the
    sessions of connected clients go on, and SIGTERM still makes the server leave and exit, in a bounded time.
    Before, its serving loop waited for the frozen DHT's answer to an announcement for ever, and so did the
    leave: SIGTERM did nothing, and neither did a broken compute's check (which runs in that loop)."""
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_server(str(llama_checkpoint), (0, 4), extra=["--update-period", "1"])
        server = local.servers[0]
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(llama_checkpoint), initial_peers=local.initial_peers
        )
        try:
            inputs = torch.tensor([[1, 2, 3]])
            expected = model.generate(inputs, max_new_tokens=32, do_sample=False)
            reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
            assert torch.equal(expected, reference.generate(inputs, max_new_tokens=32, do_sample=False))
            dht_process(server.proc.pid).suspend()
            # clients go on generating through 3 update periods (a generation of 32 tokens at a time, which keeps
            # session openings under the server's rate limit): the serving loop is by then inside an announcement
            # that the DHT never answers
            frozen_at = time.monotonic()
            while time.monotonic() - frozen_at < 3:
                assert torch.equal(model.generate(inputs, max_new_tokens=32, do_sample=False), expected)
            began = time.monotonic()
            server.terminate()
            try:
                status = server.proc.wait(BOUND_S)
            except subprocess.TimeoutExpired:
                status = None
            assert status == 0, "".join(server.log[-20:])
            assert time.monotonic() - began < BOUND_S
        finally:
            model.shutdown()
