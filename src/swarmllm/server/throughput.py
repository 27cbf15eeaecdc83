"""A quick measurement of what a server's span can do, announced so clients can route and balance by it.

Both figures are per block: `inference_rps` is single-token decode steps per second through one block (batch 1),
`forward_rps` is batch-forward tokens per second through one block; a span of n blocks takes n times as long.
Measurements are cached on disk per model shape, device, dtype and thread count, so a restart does not pay for
them again (and a busy machine does not re-measure itself as slower than it is). The last one of a model, device
and dtype is kept besides (`last_measured`): a server starting again announces it while it loads, before it knows
its kernels and threads, rather than the swarm's typical figures.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch

from swarmllm.models import BlockConfig, BlockSpan, KVCache
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


# a server uses its share of the cores only if that makes its decode steps or its batch work this much faster
THREADS_GAIN = {"decode": 1.1, "forward": 1.5}


@torch.inference_mode()
def threads_that_pay(span: BlockSpan, threads: int, *, rounds: int = 7) -> int:
    """1 or `threads`: the CPU threads a server should use, timed on its span's first block with each count (32
    decode steps, and a forward of 128 tokens; medians of `rounds`, the counts alternating): all of them if either
    kind of work runs `THREADS_GAIN` times faster so. A small model's ops are tiny: its decode steps gain nothing
    from more threads (each parallel op waits for OpenMP workers to wake, which costs more on a busy host), and
    one thread leaves the other cores to other work (an honest session's decode steps beside another peer's batch
    work, other processes)."""
    if threads < 2:
        return 1
    param = next(span.parameters())
    token = torch.randn(1, 1, span.config.hidden_size, dtype=param.dtype, device=param.device)
    prompt = torch.randn(1, 128, span.config.hidden_size, dtype=param.dtype, device=param.device)
    first = range(0, 1)

    def decode() -> None:
        cache = KVCache(1, 1, 33, span.config, param.dtype, param.device)
        for pos in range(32):
            _run(span, token, pos=pos, cache=cache, blocks=first)

    def forward() -> None:
        _run(span, prompt, blocks=first)

    times: dict[tuple[str, int], list[float]] = {}
    before = torch.get_num_threads()
    try:
        for _ in range(rounds + 1):  # the first round warms up
            for count in (1, threads):
                torch.set_num_threads(count)
                for name, work in (("decode", decode), ("forward", forward)):
                    began = time.perf_counter()
                    work()
                    times.setdefault((name, count), []).append(time.perf_counter() - began)
    finally:
        torch.set_num_threads(before)
    for name in ("decode", "forward"):
        one, many = (sorted(times[name, n][1:])[rounds // 2] for n in (1, threads))
        if one > many * THREADS_GAIN[name]:
            return threads
    return 1


def _run(span: BlockSpan | TensorParallelSpan, hidden: torch.Tensor, **kwargs) -> None:
    """The span over `hidden` (and `hidden` as its p too, where its first edge lies inside a ladder region)."""
    pending = hidden if span.config.carries_pending(span.start) else None
    span.forward_pair(hidden, pending, **kwargs)


def _synchronize(device: torch.device) -> None:
    """CUDA kernels run asynchronously: wait for them, or the timings measure only the launches."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cache_home() -> Path:
    """$XDG_CACHE_HOME, or ~/.cache where it is unset, empty or relative (the XDG spec: such a value is ignored,
    not read as a folder under wherever the server was started)."""
    given = os.environ.get("XDG_CACHE_HOME", "")
    return Path(given) if os.path.isabs(given) else Path.home() / ".cache"


CACHE_PATH = _cache_home() / "swarmllm" / "throughput.json"


def cached_throughput(
    span: BlockSpan | TensorParallelSpan, device: str, dtype: str, threads: int, *, path: Path = CACHE_PATH
) -> tuple[float, float]:
    """`measure_throughput(span)`, from the cache when this block shape was measured on this device, dtype and
    thread count before."""
    kept = _cached(_key(span, device, dtype, threads), path, _are_rates)
    figures = (float(kept[0]), float(kept[1])) if kept is not None else measure_throughput(span)
    entries = {} if kept is not None else {_key(span, device, dtype, threads): list(figures)}
    if last_measured(span.config, device, dtype, path=path) != figures:
        entries[_last_key(span.config, device, dtype)] = list(figures)
    if entries:
        _store(entries, path)  # (one locked read and write for both)
    return figures


def last_measured(
    config: BlockConfig, device: str, dtype: str, *, path: Path = CACHE_PATH
) -> tuple[float, float] | None:
    """What a server of this model's blocks measured last on this machine's `device` in `dtype` (`cached_throughput`,
    at any thread count), None if none did: what a restarting server is likely to measure again."""
    kept = _cached(_last_key(config, device, dtype), path, _are_rates)
    return None if kept is None else (float(kept[0]), float(kept[1]))


def _are_rates(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_is_rate(x) for x in value)


def cached_threads(span: BlockSpan, device: str, dtype: str, threads: int, *, path: Path = CACHE_PATH) -> int:
    """`threads_that_pay(span, threads)`, cached like `cached_throughput`."""
    key = _key(span, device, dtype, threads) + "/threads"
    kept = _cached(key, path, lambda v: type(v) is int and v in (1, threads))  # (JSON's 1.0 and true == 1)
    if kept is not None:
        return kept
    chosen = threads_that_pay(span, threads)
    _store({key: chosen}, path)
    return chosen


def _is_rate(value) -> bool:
    """A measured rate: a positive finite number (what `ServerInfo` announces), not a bool or a string."""
    return type(value) in (int, float) and 0 < value < math.inf


def _key(span: BlockSpan | TensorParallelSpan, device: str, dtype: str, threads: int) -> str:
    # the block shape and the modules that compute it: a span whose kernels changed (packed weights, another int8
    # kernel after an upgrade) is measured again, not announced at its old speed (tensor parallel: rank 0's shard)
    modules = span.modules() if isinstance(span, torch.nn.Module) else span.span.modules()
    kinds = sorted({type(module).__qualname__ for module in modules})
    shape = hashlib.sha256(repr((span.config, kinds)).encode()).hexdigest()[:16]
    return f"{shape}/{device}/{dtype}/{threads}"


def _last_key(config: BlockConfig, device: str, dtype: str) -> str:
    return f"last/{hashlib.sha256(repr(config).encode()).hexdigest()[:16]}/{device}/{dtype}"


def _load(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _cached(key: str, path: Path, valid):
    """The value cached under `key`, or None when there is none or it is not one of ours (`valid`)."""
    value = _load(path).get(key)
    return value if value is not None and valid(value) else None


def _store(entries: dict, path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # read, update and replace under a lock: servers storing at once each keep what the others stored
        with open(path.with_name(path.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes, or when its holder dies)
            cache = _load(path)  # read after measuring: a server starting beside us may have added its own
            cache.update(entries)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(cache, indent=1))
            tmp.replace(path)  # atomic: servers starting together never read half a file
    except OSError:
        pass  # a read-only home: measure again next time
