"""The default number of blocks: what a block costs, what fits, and a real server sized by --max-memory."""

import pytest
import torch

from swarmllm.balancing.memory import MIN_HEADROOM_BYTES, blocks_that_fit
from swarmllm.local import LocalSwarm
from swarmllm.models import LlamaBlock, load_config
from swarmllm.server.memory import block_bytes, cache_bytes_per_block, memory_share, parse_size


def test_blocks_that_fit_leave_headroom_and_stay_in_range():
    mib = 2**20
    assert blocks_that_fit(1000 * mib, 100 * mib, 0, 32) == 7  # 256 MiB headroom, 744 MiB left: 7 blocks
    assert blocks_that_fit(10_000 * mib, 100 * mib, 100 * mib, 64) == 45  # 10% headroom: 9000 MiB / 200 MiB
    assert blocks_that_fit(10_000 * mib, 100 * mib, 0, 32) == 32  # never more than the model
    assert blocks_that_fit(100 * mib, 100 * mib, 0, 32) == 1  # never fewer than one


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_bytes_equal_a_real_block(llama_checkpoint, dtype):
    _, config = load_config(str(llama_checkpoint))
    real = LlamaBlock(config).to(dtype)
    want = sum(t.numel() * t.element_size() for t in [*real.parameters(), *real.buffers()])
    assert block_bytes(config, dtype) == want


def test_sizes_parse():
    assert parse_size("4GiB") == 4 * 2**30 and parse_size("512MB") == 512 * 2**20 and parse_size("100") == 100
    with pytest.raises(ValueError):
        parse_size("lots")


def test_a_server_without_a_span_holds_what_fits_its_memory(llama_checkpoint):
    _, config = load_config(str(llama_checkpoint))
    per_block = block_bytes(config, torch.float32) + cache_bytes_per_block(config, torch.float32, 64)
    memory = MIN_HEADROOM_BYTES + int(2.5 * per_block)
    assert blocks_that_fit(memory, per_block, 0, 4) == 2
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        info = swarm.add_server(
            str(llama_checkpoint), None, extra=["--max-memory", str(memory), "--max-cache-tokens", "64"]
        )
        assert info["end"] - info["start"] == 2
        assert any("blocks" in line and "KV cache: 2 blocks" in line for line in swarm.servers[0].log)


def test_servers_sharing_a_device_split_its_memory():
    gib = 2**30
    assert memory_share(free=80 * gib, total=80 * gib, servers=1) == int(64 * gib)  # 80% of it
    assert memory_share(free=80 * gib, total=80 * gib, servers=2) == int(32 * gib)  # started together
    # a second server starting after the first took 30 GiB: its share, capped by what is free
    assert memory_share(free=50 * gib, total=80 * gib, servers=2) == int(32 * gib)
    assert memory_share(free=20 * gib, total=80 * gib, servers=2) == int(16 * gib)
