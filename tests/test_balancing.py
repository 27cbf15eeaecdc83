"""Servers started without a span spread over the model by themselves, and move to cover blocks whose servers
died, while a generation running across the event gives the fault-free tokens. Real processes on 127.0.0.1."""

import time

import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.balancing.memory import MIN_HEADROOM_BYTES
from swarmllm.client.loop import run_sync
from swarmllm.dht import ServerState, find_servers
from swarmllm.local import LocalSwarm
from swarmllm.models import load_config
from swarmllm.server.memory import block_bytes, cache_bytes_per_block

NUM_LAYERS = 6
CACHE_TOKENS = 256
UPDATE_PERIOD_S = 2.0  # announce and check balance every 2 s (records expire after 6 s)
COVER_TIMEOUT_S = 20.0  # from a kill to every block served again (measured: see the test's output)


def coverage(model) -> list[int]:
    """Online servers per block, as the DHT says."""
    servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, NUM_LAYERS))
    counts = [0] * NUM_LAYERS
    for s in servers:
        if s.state == ServerState.ONLINE:
            for b in range(s.start_block, s.end_block):
                counts[b] += 1
    return counts


def wait_until(condition, timeout_s: float) -> float:
    """Seconds until `condition()` held (polling the swarm's state), or fail after `timeout_s`."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout_s, "not reached in time"
        time.sleep(0.2)
    return time.monotonic() - began


class KillAt(BaseStreamer):
    def __init__(self, step, action):
        self.step, self.action, self.count = step, action, -1

    def put(self, value):
        self.count += 1
        if self.count == self.step:
            self.action()

    def end(self):
        pass


def test_servers_spread_over_the_model_and_move_to_cover_blocks_whose_server_died(checkpoints):
    path = checkpoints("llama", num_layers=NUM_LAYERS)
    _, config = load_config(str(path))
    per_block = block_bytes(config, torch.float32) + cache_bytes_per_block(
        config, torch.float32, CACHE_TOKENS
    )
    memory = MIN_HEADROOM_BYTES + int(2.5 * per_block)  # room for 2 blocks each
    extra = [
        "--max-memory", str(memory), "--max-cache-tokens", str(CACHE_TOKENS),
        "--update-period", str(UPDATE_PERIOD_S), "--balance-period", str(UPDATE_PERIOD_S),
    ]  # fmt: skip
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        infos = swarm.add_servers([(str(path), None)] * 4, extra=extra)  # at once: they may collide at first
        assert all(i["end"] - i["start"] == 2 for i in infos)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        try:
            spread_s = wait_until(lambda: min(coverage(model)) >= 1, timeout_s=60)
            print(f"\n4 servers started together cover all {NUM_LAYERS} blocks after {spread_s:.1f} s")

            # a generation across the death of the only server of some blocks: others move to cover them
            prompt = torch.tensor([[1, 30, 40, 50, 7]])
            want = reference.generate(prompt, max_new_tokens=20, do_sample=False).tolist()
            killed = []

            def kill_a_sole_holder():
                servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, NUM_LAYERS))
                counts = coverage(model)
                # 4 servers of 2 blocks over 6 blocks: at least one holds a block nobody else does
                victim = next(
                    s for s in servers if min(counts[b] for b in range(s.start_block, s.end_block)) == 1
                )
                index = next(i for i, info in enumerate(infos) if info["peer_id"] == victim.peer_id)
                swarm.servers[index].kill()
                killed.append((victim.start_block, victim.end_block, time.monotonic()))

            began = time.monotonic()
            got = model.generate(
                prompt, max_new_tokens=20, do_sample=False, streamer=KillAt(6, kill_a_sole_holder)
            )
            took = time.monotonic() - began
            assert got.tolist() == want
            assert model.swarm.failovers, "the generation should have lost a server"
            wait_until(lambda: min(coverage(model)) >= 1, timeout_s=COVER_TIMEOUT_S)
            covered_s = time.monotonic() - killed[0][2]
            assert covered_s < COVER_TIMEOUT_S
            moved = [line.strip() for s in swarm.servers for line in s.log if "moved to blocks" in line]
            print(
                f"blocks {killed[0][:2]} lost their only server; covered again {covered_s:.1f} s later; a "
                f"generation across it took {took:.1f} s: {moved}"
            )
        finally:
            model.shutdown()
