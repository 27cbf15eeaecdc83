"""How many blocks a server can hold: pure arithmetic over bytes, so the server, the simulator and tests agree."""

from __future__ import annotations

HEADROOM_FRACTION = 0.1  # of the memory budget, kept free for activations, allocator slack and the runtime
MIN_HEADROOM_BYTES = 256 * 2**20


def blocks_that_fit(
    memory_bytes: int, block_bytes: int, cache_bytes_per_block: int, total_blocks: int
) -> int:
    """Blocks whose weights and KV-cache budget fit in `memory_bytes` after the headroom (at least 1, at most
    the model's blocks). `cache_bytes_per_block`: the whole KV-cache budget (all sessions) for one block."""
    headroom = max(MIN_HEADROOM_BYTES, int(memory_bytes * HEADROOM_FRACTION))
    per_block = block_bytes + cache_bytes_per_block
    fit = (memory_bytes - headroom) // max(per_block, 1)
    return max(1, min(total_blocks, int(fit)))
