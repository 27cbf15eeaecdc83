"""What a server's blocks cost in memory, and how much memory it may use: the numbers behind the default
number of blocks (`balancing.memory.blocks_that_fit`)."""

from __future__ import annotations

import math

import psutil
import torch
from accelerate import init_empty_weights
from accelerate.utils import compute_module_sizes

from swarmllm.models import BlockConfig, KVCache, LlamaBlock
from swarmllm.models.llama import Projection
from swarmllm.models.packed import packed_weight_bytes
from swarmllm.models.quant import check_quant, quantized_weight_bytes

DEFAULT_MEMORY_FRACTION = 0.8  # of the device's memory, split between its servers, unless --max-memory says


def block_bytes(
    config: BlockConfig,
    dtype: torch.dtype,
    quant: str = "none",
    device: torch.device | str = "cpu",
    pack: bool = False,
) -> int:
    """One block's weights at `dtype` on `device`, as a span loaded with that `quant` ("none", "int8", "nf4") and
    `pack` (`models.checkpoint.load_span`) stores them: quantized or packed projections in their own layout (panels
    padded to whole panels of 16 outputs). Computed on an empty (meta) block: no memory is allocated."""
    with init_empty_weights():
        block = LlamaBlock(config)
    total = compute_module_sizes(block, dtype=dtype)[""]
    quantized = check_quant(quant) != "none"
    if quantized or pack:
        for module in block.modules():
            if isinstance(module, Projection):
                out_features, in_features = module.weight.shape
                if quantized:
                    total += quantized_weight_bytes(out_features, in_features, quant, device)
                else:
                    total += packed_weight_bytes(out_features, in_features, dtype, device)
                total -= module.weight.numel() * dtype.itemsize
    return total


def cache_bytes_per_block(config: BlockConfig, dtype: torch.dtype, cache_tokens: int) -> int:
    return cache_tokens * KVCache.bytes_per_token(1, config, dtype)


def device_memory(device: str) -> tuple[int, int]:
    """(free, total) bytes of `device` now (CPU: what the OS can still give, and the machine's RAM)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.mem_get_info(dev)
    memory = psutil.virtual_memory()
    return memory.available, memory.total


def memory_share(free: int, total: int, servers: int, fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
    """The bytes one of `servers` servers sharing a device may use: its share of `fraction` of the device, and
    never more than is free now. Servers starting together each take their share; one starting beside servers
    that already loaded finds the rest of the memory taken and gets what is free."""
    return int(min(free * fraction, total * fraction / max(1, servers)))


def parse_size(text: str) -> int:
    """'4GiB', '512MB', '2.5G', '1024' (bytes) -> bytes."""
    units = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    cleaned = text.strip().lower().removesuffix("ib").removesuffix("b")
    number = cleaned.rstrip("kmgt")
    unit = cleaned[len(number) :]
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"expected a size like 4GiB or 512MB, got {text!r}") from None
    size = value * units.get(unit, 0)
    if not math.isfinite(size) or size < 1:  # (0 bytes would read as no --max-memory at all)
        raise ValueError(f"expected a size like 4GiB or 512MB, got {text!r}")
    return int(size)
