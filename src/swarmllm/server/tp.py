"""Tensor parallelism inside one server: one span of blocks run across N processes (N devices on a GPU host).

This process is rank 0 and the caller's face; it spawns ranks 1..N-1. Every rank loads the span, keeps its
Megatron shard (models/tp.py) and holds its share of every session's KV cache (its kv heads). Each call on rank 0
sends a small header down a pipe to each rank (a rank waits there, for as long as the server is idle, not in a
collective, which would time out) and broadcasts the input tensors, then all ranks run the same span method; the
sub-layer outputs meet in all-reduces inside it (asynchronous ones in ladder layers) and rank 0 returns the result,
which every rank holds. torch.distributed with gloo on CPU, NCCL on CUDA (rank i on cuda:i).

A rank that is frozen (stopped, its device hung) does not die: the others would wait in a collective for gloo's
timeout, and again at the next call. So a watchdog bounds every call: `step_timeout_s` (default STEP_TIMEOUT_S)
plus SLOWDOWN_ALLOWED times what its tokens took at the slowest rate a call on this span has run at so far (until
one has run, as where the throughput came from the cache file: 0.9 of torch.distributed's timeout, since a first
long prefill may legitimately take minutes). A call over its bound means the ranks are broken: the watchdog ends
them (the call then fails at once) and `failure` says why, for the server to leave the swarm.

It knows nothing of sessions, the wire or the swarm: the backend decides what to run and names caches by the ids
`open_cache` returns. Every method is a sequence of collectives that all ranks must meet in the same order, so one
thread calls them, one at a time; `open_cache` alone sends nothing (the ranks allocate a cache with the first
command that uses it), so it may be called from anywhere. Each rank reads the whole of one block at a time and
keeps its shard. Not done here yet: CUDA
graphs or torch.compile of the sharded decode step (models/tp.py's FunctionalComm makes it traceable).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from multiprocessing.connection import Connection
from os import PathLike

import psutil
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from swarmllm.models import BlockSpan, KVCache, load_config, load_span
from swarmllm.models.tp import TensorParallelComm, check_shardable, local_config, shard_span

logger = logging.getLogger(__name__)

COLLECTIVE_TIMEOUT_S = 300.0  # torch.distributed's timeout of a collective or joining the group: a backstop
STEP_TIMEOUT_S = 30.0  # a call may take this long plus SLOWDOWN_ALLOWED times its expected time before the
SLOWDOWN_ALLOWED = 10  # watchdog deems the ranks broken (a frozen rank, a hung device)
WATCH_S = 1.0  # how often the watchdog looks


@dataclass(frozen=True)
class _Setup:
    """What every rank needs to join the group and build its shard (picklable, sent to spawned ranks)."""

    checkpoint: str
    start: int
    end: int
    world: int
    dtype: torch.dtype
    backend: str
    init_method: str
    threads: int | None
    timeout_s: float
    revision: str | None = None  # the hub's revision of `checkpoint` (None: its default branch)

    def device(self, rank: int) -> torch.device:
        return torch.device(f"cuda:{rank}") if self.backend == "nccl" else torch.device("cpu")


class TensorParallelSpan:
    """Blocks [start, end) of `checkpoint` sharded over `world` processes; this process is rank 0.

    The methods mirror BlockSpan's (the (r, p) pair included) with caches named by id; inputs may be on any
    device, outputs are on rank 0's. `threads` sets torch's CPU threads in every rank, this process included.
    A call over its bound (`step_timeout_s` plus SLOWDOWN_ALLOWED times the time its work is expected to take)
    ends the ranks and fails; `collective_timeout_s` is torch.distributed's own, a backstop.
    """

    def __init__(
        self,
        checkpoint: str | PathLike,
        start: int,
        end: int,
        *,
        world: int,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        threads: int | None = None,
        step_timeout_s: float = STEP_TIMEOUT_S,
        collective_timeout_s: float = COLLECTIVE_TIMEOUT_S,
        revision: str | None = None,
    ):
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl" and torch.cuda.device_count() < world:
            raise ValueError(f"--tp {world} needs {world} CUDA devices, found {torch.cuda.device_count()}")
        # before any rank starts, not in every rank after
        check_shardable(load_config(checkpoint, revision=revision)[1], world)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        self.setup = _Setup(
            str(checkpoint),
            start,
            end,
            world,
            dtype,
            backend,
            init_method,
            threads,
            collective_timeout_s,
            revision,
        )
        context = mp.get_context("spawn")
        pipes = [context.Pipe(duplex=False) for _ in range(1, world)]
        self._workers = [
            context.Process(target=_worker, args=(rank, self.setup, reader), daemon=True)
            for rank, (reader, _) in enumerate(pipes, 1)
        ]
        self._headers = [writer for _, writer in pipes]
        for worker in self._workers:
            worker.start()
        for reader, _ in pipes:
            reader.close()  # the rank's copy alone: it reads EOF when this process is gone
        self.step_timeout_s = step_timeout_s
        self._seconds_per_work = 0.0  # the slowest a call has run per token and block so far
        self._running: tuple[float, float] | None = None  # the call running: (monotonic deadline, bound_s)
        self._broken: str | None = None  # why the watchdog ended the ranks
        self._closed = threading.Event()
        self.device = self.setup.device(0)
        try:
            self.span = _join(0, self.setup)
        except BaseException:
            self._stop_workers(stopped=False)
            raise
        self.config, self.start, self.end = self.span.config, start, end
        self.local_config = local_config(self.config, world)
        self._caches: dict[int, KVCache] = {}
        self._next_cache = 0
        # caches opened, to be allocated with their first use
        self._unallocated: dict[int, dict[str, int]] = {}
        threading.Thread(target=self._watch, name="swarmllm-tp-watchdog", daemon=True).start()
        logger.info("span [%d, %d) sharded over %d ranks (%s)", start, end, world, backend)

    def open_cache(self, batch: int, max_length: int, blocks: int | None = None) -> int:
        """A session's KV cache over `blocks` blocks (default: the span's) on every rank (each its kv heads),
        allocated by the first command that uses it; returns its id."""
        cache_id = self._next_cache
        self._next_cache += 1
        blocks = self.end - self.start if blocks is None else blocks
        self._unallocated[cache_id] = {"batch": batch, "max_length": max_length, "blocks": blocks}
        return cache_id

    def close_cache(self, cache_id: int) -> None:
        if self._unallocated.pop(cache_id, None) is None:
            self._call({"op": "free", "cache_id": cache_id})

    def reorder_cache(self, cache_id: int, rows: list[int], length: int) -> None:
        """`KVCache.reorder` of cache `cache_id` on every rank (beam search); a cache not allocated yet holds
        nothing to reorder."""
        if cache_id not in self._unallocated:
            self._call({"op": "reorder", "cache_id": cache_id, "rows": rows, "length": length})

    def forward(self, hidden: Tensor, **kwargs) -> Tensor:
        r, _ = self.forward_pair(hidden, None, **kwargs)
        return r

    def forward_pair(
        self,
        r: Tensor,
        p: Tensor | None,
        *,
        pos: int = 0,
        key_mask: Tensor | None = None,
        cache: int | None = None,
        blocks: slice | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """BlockSpan.forward_pair over the ranks (or over the sub-range `blocks` of the span); `cache` is an id
        from open_cache (or None: no cache)."""
        tensors = {"r": r, "p": p, "key_mask": key_mask}
        header = {"op": "forward", "pos": pos, **self._cache(cache), **_blocks(blocks), **_shapes(tensors)}
        return self._call(header, tensors, r.shape[0] * r.shape[1] * self._count(blocks))

    def decode_pair(
        self,
        r: Tensor,
        p: Tensor | None,
        positions: Tensor,
        slot: int,
        cache: int,
        length: int,
        key_mask: Tensor | None = None,
        blocks: slice | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """BlockSpan.decode_pair over the ranks (or the sub-range `blocks`), attending to the first `length`
        slots of cache `cache`."""
        tensors = {"r": r, "p": p, "positions": positions, "key_mask": key_mask}
        fields = {**self._cache(cache), **_blocks(blocks), **_shapes(tensors)}
        header = {"op": "decode", "slot": slot, "length": length, **fields}
        return self._call(header, tensors, r.shape[0] * self._count(blocks))

    def close(self) -> None:
        """Stop the other ranks and leave the process group; where a rank died (no command reaches the others
        then), end the other ranks instead of raising."""
        self._closed.set()
        if not self._workers:
            return
        if self._broken is not None:
            self._stop_workers(stopped=False)
            return
        try:
            self._command({"op": "stop"})
        except RuntimeError:  # a rank died (its pipe is gone): the others cannot be told, so end them
            logger.warning("a tensor-parallel rank is gone; stopping the others", exc_info=True)
            self._stop_workers(stopped=False)
        else:
            self._stop_workers(stopped=True)

    def failure(self) -> str | None:
        """Why the span can no longer run (a rank's process is gone, or a call overran its bound and the
        watchdog ended the ranks: every later call would fail), or None."""
        if self._broken is not None:
            return self._broken
        for rank, worker in enumerate(self._workers, 1):
            if not worker.is_alive():
                return f"tensor-parallel rank {rank} (pid {worker.pid}) exited with status {worker.exitcode}"
        return None

    def _stop_workers(self, *, stopped: bool) -> None:
        """Wait for the other ranks to leave (`stopped`: they were told to), else end them; leave the group."""
        for worker in self._workers:
            if stopped:
                worker.join(timeout=30)
            if worker.is_alive():
                worker.kill()  # (SIGTERM would wait for a stopped rank to be continued)
                worker.join(timeout=30)
        for pipe in self._headers:
            pipe.close()
        self._workers, self._headers = [], []
        if dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> TensorParallelSpan:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _cache(self, cache_id: int | None) -> dict[str, object]:
        """The header fields naming a cache: its id, and what to allocate if this is its first use."""
        if cache_id is None:
            return {"cache_id": None}
        allocate = self._unallocated.pop(cache_id, None)
        return {"cache_id": cache_id} if allocate is None else {"cache_id": cache_id, "allocate": allocate}

    def _count(self, blocks: slice | None) -> int:
        return self.end - self.start if blocks is None else blocks.stop - blocks.start

    def _call(self, header: dict, tensors: dict[str, Tensor | None] | None = None, work: int = 0):
        """Run one command on every rank, under the watchdog: `work` (tokens x blocks) scales its bound."""
        if self._broken is not None:
            raise RuntimeError(f"the tensor-parallel ranks are gone: {self._broken}")
        began = time.monotonic()
        if work and not self._seconds_per_work:
            # no rate seen yet (throughput from the cache file): a first long prefill may legitimately take minutes,
            # so its bound is torch.distributed's own, a little shorter so that the watchdog sees it first
            bound_s = max(self.step_timeout_s, 0.9 * self.setup.timeout_s)
        else:
            bound_s = self.step_timeout_s + SLOWDOWN_ALLOWED * work * self._seconds_per_work
        self._running = (began + bound_s, bound_s)
        try:
            self._command(header)
            sent = None if tensors is None else self._send(tensors)
            result = _run(self.span, self._caches, self.setup, header, sent)
        finally:
            self._running = None
        if work:
            self._seconds_per_work = max(self._seconds_per_work, (time.monotonic() - began) / work)
        return result

    def _watch(self) -> None:
        """End the ranks when a call runs past its bound: the call then fails, and `failure` says why."""
        while not self._closed.wait(WATCH_S):
            running = self._running
            if running is None or time.monotonic() < running[0]:
                continue
            stopped = [f"rank {rank} (pid {w.pid})" for rank, w in enumerate(self._workers, 1) if _stopped(w)]
            self._broken = (
                f"a tensor-parallel call did not finish within its bound of {running[1]:.0f} s ("
                + (f"{', '.join(stopped)} stopped)" if stopped else "a rank is frozen or its device hung)")
            )
            logger.warning("%s; ending the ranks", self._broken)
            for worker in self._workers:
                worker.kill()
            return

    def _command(self, header: dict) -> None:
        """Tell every other rank what comes next (this rank runs it too); RuntimeError where a rank is gone."""
        for rank, pipe in enumerate(self._headers, 1):
            try:
                pipe.send(header)
            except OSError as e:  # (its end of the pipe closed with it)
                raise RuntimeError(f"tensor-parallel rank {rank} is gone") from e

    def _send(self, tensors: dict[str, Tensor | None]) -> dict[str, Tensor | None]:
        sent = {}
        for name, tensor in tensors.items():
            if tensor is not None:
                tensor = tensor.to(self.device).contiguous()
                dist.broadcast(tensor, src=0)
            sent[name] = tensor
        return sent


def _blocks(blocks: slice | None) -> dict[str, object]:
    """The header field of a sub-range of the span's blocks (indices from its start), None for all of them."""
    return {"blocks": None if blocks is None else (blocks.start, blocks.stop)}


def _shapes(tensors: dict[str, Tensor | None]) -> dict[str, object]:
    """The header fields a rank needs to receive the tensors: shape and dtype of each (None when absent)."""
    return {
        "tensors": {name: None if t is None else (tuple(t.shape), t.dtype) for name, t in tensors.items()}
    }


def _receive(header: dict, device: torch.device) -> dict[str, Tensor | None]:
    received = {}
    for name, spec in header.get("tensors", {}).items():
        if spec is not None:
            tensor = torch.empty(spec[0], dtype=spec[1], device=device)
            dist.broadcast(tensor, src=0)
            spec = tensor
        received[name] = spec
    return received


def _run(span, caches: dict[int, KVCache], setup: _Setup, header: dict, tensors: dict | None = None):
    """Execute one command on this rank: the same code on every rank, so the collectives inside line up."""
    op = header["op"]
    with torch.inference_mode():
        if op == "free":
            caches.pop(header["cache_id"], None)
            return None
        if op == "reorder":
            cache = caches[header["cache_id"]]
            cache.reorder(torch.tensor(header["rows"], device=cache.keys.device), header["length"])
            return None
        if "allocate" in header:
            size = header["allocate"]
            config = local_config(span.config, setup.world)
            caches[header["cache_id"]] = KVCache(
                size["blocks"], size["batch"], size["max_length"], config, setup.dtype, _device_of(span)
            )
        cache = caches[header["cache_id"]] if header.get("cache_id") is not None else None
        blocks = None if header.get("blocks") is None else slice(*header["blocks"])
        if op == "forward":
            return span.forward_pair(
                tensors["r"],
                tensors["p"],
                pos=header["pos"],
                key_mask=tensors["key_mask"],
                cache=cache,
                blocks=blocks,
            )
        if op == "decode":
            length = header["length"]
            return span.decode_pair(
                tensors["r"],
                tensors["p"],
                tensors["positions"],
                torch.tensor([header["slot"]], device=tensors["r"].device),
                cache.keys[:, :, :, :length],
                cache.values[:, :, :, :length],
                tensors["key_mask"],
                blocks,
            )
    raise ValueError(f"unknown tensor-parallel command {op!r}")


def _stopped(worker) -> bool:
    """Whether a rank's process is stopped (SIGSTOP, a debugger): a likely reason for a call to hang."""
    try:
        return psutil.Process(worker.pid).status() == psutil.STATUS_STOPPED
    except psutil.Error:
        return False


def _device_of(span) -> torch.device:
    return next(span.parameters()).device


def _join(rank: int, setup: _Setup):
    """Join the process group and build this rank's shard of the span."""
    if setup.threads:
        torch.set_num_threads(setup.threads)
    device = setup.device(rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        setup.backend,
        init_method=setup.init_method,
        rank=rank,
        world_size=setup.world,
        timeout=timedelta(seconds=setup.timeout_s),
    )
    return _load_shard(setup, rank, device)


def _load_shard(setup: _Setup, rank: int, device: torch.device) -> BlockSpan:
    """This rank's shard of the span, read one block at a time on the CPU and sharded before it moves to
    `device`: a rank never holds more than its shard plus one whole block."""
    comm = TensorParallelComm()
    _, config = load_config(setup.checkpoint, revision=setup.revision)
    with torch.device("meta"):
        span = BlockSpan(config, setup.start, setup.end)
    span.rotary.to(device)
    for i in range(setup.start, setup.end):
        whole = load_span(setup.checkpoint, i, i + 1, dtype=setup.dtype, revision=setup.revision)
        block = shard_span(whole, rank, setup.world, comm)
        span.blocks[i - setup.start] = block.blocks[0].to(device)
    span.comm = comm
    return span


def _worker(rank: int, setup: _Setup, headers: Connection) -> None:
    """Ranks 1..N-1: run rank 0's commands until it says stop (or is gone)."""
    span = _join(rank, setup)
    device = setup.device(rank)
    caches: dict[int, KVCache] = {}
    while True:
        try:
            header = headers.recv()  # no timeout: a server may be idle for hours
        except EOFError:  # rank 0 is gone
            return
        if header["op"] == "stop":
            break
        try:
            _run(span, caches, setup, header, _receive(header, device))
        except Exception:  # noqa: BLE001 - rank 0 meets the same error in the same place and reports it
            logger.debug("rank %d: command %s failed", rank, header["op"], exc_info=True)
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
