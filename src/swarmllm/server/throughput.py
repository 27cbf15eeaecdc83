"""A quick measurement of what a server's span can do, announced so clients can route and balance by it."""

from __future__ import annotations

import time

import torch

from swarmllm.models import BlockSpan, KVCache


@torch.inference_mode()
def measure_throughput(
    span: BlockSpan, *, decode_steps: int = 8, forward_tokens: int = 128
) -> tuple[float, float]:
    """(inference_rps, forward_rps) per block: decode steps/s and batch-forward tokens/s of one block."""
    param = next(span.parameters())
    num_blocks = span.end - span.start
    hidden_size = span.config.hidden_size
    cache = KVCache(num_blocks, 1, decode_steps + 1, span.config, param.dtype, param.device)
    token = torch.randn(1, 1, hidden_size, dtype=param.dtype, device=param.device)
    span(token, pos=0, cache=cache)  # warm-up: first calls pay for kernel selection and allocation
    _synchronize(param.device)
    began = time.perf_counter()
    for pos in range(1, decode_steps + 1):
        span(token, pos=pos, cache=cache)
    _synchronize(param.device)
    inference_rps = num_blocks * decode_steps / (time.perf_counter() - began)

    prompt = torch.randn(1, forward_tokens, hidden_size, dtype=param.dtype, device=param.device)
    span(prompt[:, :8])
    _synchronize(param.device)
    began = time.perf_counter()
    span(prompt)
    _synchronize(param.device)
    forward_rps = num_blocks * forward_tokens / (time.perf_counter() - began)
    return inference_rps, forward_rps


def _synchronize(device: torch.device) -> None:
    """CUDA kernels run asynchronously: wait for them, or the timings measure only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
