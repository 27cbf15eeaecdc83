"""A quick measurement of what a server's span can do, announced so clients can route and balance by it.

Both figures are per block: `inference_rps` is single-token decode steps per second through one block (batch 1),
`forward_rps` is batch-forward tokens per second through one block; a span of n blocks takes n times as long.
Measurements are cached on disk per model shape, device, dtype and thread count, so a restart does not pay for
them again (and a busy machine does not re-measure itself as slower than it is).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import torch

from swarmllm.models import BlockSpan, KVCache
from swarmllm.server.tp import TensorParallelSpan


@torch.inference_mode()
def measure_throughput(
    span: BlockSpan | TensorParallelSpan, *, decode_steps: int = 8, forward_tokens: int = 128
) -> tuple[float, float]:
    """(inference_rps, forward_rps) per block: decode steps/s and batch-forward tokens/s of one block (of a
    tensor-parallel span: over all its ranks, measured from rank 0)."""
    parallel = isinstance(span, TensorParallelSpan)
    param = next((span.span if parallel else span).parameters())
    num_blocks = span.end - span.start
    hidden_size = span.config.hidden_size
    if parallel:
        cache = span.open_cache(1, decode_steps + 1)
    else:
        cache = KVCache(num_blocks, 1, decode_steps + 1, span.config, param.dtype, param.device)
    token = torch.randn(1, 1, hidden_size, dtype=param.dtype, device=param.device)
    _run(span, token, pos=0, cache=cache)  # warm-up: first calls pay for kernel selection and allocation
    _synchronize(param.device)
    began = time.perf_counter()
    for pos in range(1, decode_steps + 1):
        _run(span, token, pos=pos, cache=cache)
    _synchronize(param.device)
    inference_rps = num_blocks * decode_steps / (time.perf_counter() - began)

    prompt = torch.randn(1, forward_tokens, hidden_size, dtype=param.dtype, device=param.device)
    _run(span, prompt[:, :8])
    _synchronize(param.device)
    began = time.perf_counter()
    _run(span, prompt)
    _synchronize(param.device)
    forward_rps = num_blocks * forward_tokens / (time.perf_counter() - began)
    if parallel:
        span.close_cache(cache)
    return inference_rps, forward_rps


def _run(span: BlockSpan | TensorParallelSpan, hidden: torch.Tensor, **kwargs) -> None:
    """The span over `hidden` (and `hidden` as its p too, where its first edge lies inside a ladder region)."""
    pending = hidden if span.config.carries_pending(span.start) else None
    span.forward_pair(hidden, pending, **kwargs)


def _synchronize(device: torch.device) -> None:
    """CUDA kernels run asynchronously: wait for them, or the timings measure only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


CACHE_PATH = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "swarmllm" / "throughput.json"


def cached_throughput(
    span: BlockSpan | TensorParallelSpan, device: str, dtype: str, threads: int, *, path: Path = CACHE_PATH
) -> tuple[float, float]:
    """`measure_throughput(span)`, from the cache when this block shape was measured on this device, dtype and
    thread count before."""
    shape = hashlib.sha256(repr(span.config).encode()).hexdigest()[:16]
    key = f"{shape}/{device}/{dtype}/{threads}"
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), list) and len(cache[key]) == 2:
        return float(cache[key][0]), float(cache[key][1])
    measured = measure_throughput(span)
    cache[key] = list(measured)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1))
        tmp.replace(path)  # atomic: servers starting together never read half a file
    except OSError:
        pass  # a read-only home: measure again next time
    return measured
