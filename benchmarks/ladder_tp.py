"""Ladder Residual against standard blocks under tensor parallelism: 2 processes (gloo on 127.0.0.1, 1 CPU thread
each), one span of random blocks sharded Megatron-style (models/tp.py), a forward of a few tokens timed on rank 0.

Three variants run the same sharded weights: standard (each sub-layer's all-reduce waited for at once), ladder
(every layer a ladder layer: the all-reduce is launched asynchronously and waited for one sub-layer later) and
no communication (the all-reduces skipped: the upper bound, wrong outputs). A link latency is injected in user
space: an all-reduce's wait returns no earlier than its issue time + latency (the real all-reduce included).
Variants and latencies alternate within each repeat, so machine noise hits them alike; medians and the
interquartile range over repeats.

    python benchmarks/ladder_tp.py [--latencies-ms 0 2 5 10] [--repeats 15] [--decode] [--no-record]
    python benchmarks/ladder_tp.py --device cuda   # NCCL, 2 GPUs (no injected latency)
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import time
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from common import append_results, markdown_table

from swarmllm.models import BlockConfig, BlockSpan, KVCache
from swarmllm.models.ladder import Comm
from swarmllm.models.tp import TensorParallelComm, check_shardable, local_config, shard_span

VARIANTS = ("standard", "ladder", "no-comm")


class DelayedComm(TensorParallelComm):
    """A slower link: each all-reduce's wait returns no earlier than issue time + latency_s."""

    def __init__(self, latency_s: float):
        super().__init__()
        self.latency_s = latency_s

    def start(self, x):
        return x, dist.all_reduce(x, async_op=True), time.perf_counter() + self.latency_s

    def wait(self, handle):
        x, work, ready_at = handle if len(handle) == 3 else (*handle, 0.0)
        if work is not None:
            work.wait()
        delay = ready_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        return x

    def all_reduce(self, x):
        return self.wait(self.start(x))


class NoComm(Comm):
    """Skips the sums: what the span would cost if communication were free (its outputs are wrong)."""


def config(args) -> BlockConfig:
    return BlockConfig(
        family="llama",
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=max(2, args.hidden // 256),
        head_dim=64,
        intermediate_size=args.hidden * 11 // 4,
        rms_norm_eps=1e-5,
        vocab_size=32000,
    )


def device_for(args, rank: int) -> torch.device:
    return torch.device(f"cuda:{rank}") if args.device == "cuda" else torch.device("cpu")


def build(args, rank: int, world: int, ladder: bool) -> BlockSpan:
    base = config(args)
    cfg = replace(base, ladder_layers=tuple(range(base.num_layers)) if ladder else ())
    torch.manual_seed(0)  # every rank builds the same whole span, then keeps its shard
    span = BlockSpan(cfg, 0, cfg.num_layers).to(device_for(args, rank))
    return shard_span(span, rank, world, TensorParallelComm()).eval()


def forward(args, device: torch.device):
    """A forward of batch 1 x args.tokens tokens, no cache."""
    hidden = torch.randn(1, args.tokens, args.hidden, generator=torch.Generator().manual_seed(1)).to(device)
    return lambda span: span(hidden)


def decode_step(args, device: torch.device):
    """One decode step of batch 1 after args.context cached tokens (random keys and values): the serving hot path."""
    generator = torch.Generator().manual_seed(1)
    cache = KVCache(args.layers, 1, args.context + 1, local_config(config(args), 2), torch.float32, "cpu")
    cache.keys.normal_(generator=generator)
    cache.values.normal_(generator=generator)
    keys, values = cache.keys.to(device), cache.values.to(device)
    hidden = torch.randn(1, args.hidden, generator=generator).to(device)
    position = torch.tensor([args.context], device=device)
    return lambda span: span.decode(hidden, position, position, keys, values)


def worker(rank: int, args, port: int, results) -> None:
    torch.set_num_threads(1)
    device = device_for(args, rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=2,
        timeout=timedelta(seconds=300),
    )
    times: dict[tuple[str, float], list[float]] = {}
    with torch.inference_mode():
        # one sharded span per architecture; each variant is a span and the comm it sums through
        standard, ladder = build(args, rank, 2, False), build(args, rank, 2, True)
        run = decode_step(args, device) if args.decode else forward(args, device)
        variants = {("no-comm", 0.0): (standard, NoComm())}
        for latency_ms in args.latencies_ms:
            delayed = DelayedComm(latency_ms / 1000)
            variants["standard", latency_ms] = (standard, delayed)
            variants["ladder", latency_ms] = (ladder, delayed)
        for _ in range(args.warmup):
            for span, comm in variants.values():
                span.comm = comm
                run(span)
        for _ in range(args.repeats):
            for key, (span, comm) in variants.items():
                span.comm = comm
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                began = time.perf_counter()
                for _ in range(args.calls):
                    run(span)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.setdefault(key, []).append((time.perf_counter() - began) / args.calls)
    if rank == 0:
        results.update(times)
    dist.barrier()
    dist.destroy_process_group()


def quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:  # --repeats 1: no spread to show
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4)
    return q1, statistics.median(values), q3


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--latencies-ms", type=float, nargs="+", default=[0.0, 2.0, 5.0, 10.0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=4, help="tokens per forward (batch 1)")
    parser.add_argument(
        "--decode",
        action="store_true",
        help="time one-token decode steps after --context cached tokens instead",
    )
    parser.add_argument("--context", type=int, default=128, help="cached tokens before a decode step")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=3, help="forwards per timed sample")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (NCCL, rank i on cuda:i)")
    parser.add_argument("--no-record", action="store_true", help="print only, do not append to RESULTS.md")
    args = parser.parse_args()
    try:
        check_shardable(config(args), 2)
    except ValueError as e:
        parser.error(f"--hidden {args.hidden}: {e} (heads are --hidden / 64)")
    if args.device == "cuda":
        args.latencies_ms = [0.0]  # a host-side sleep says nothing about a GPU stream's link
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    load_before = os.getloadavg()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(worker, args=(args, port, results), nprocs=2, join=True)
        times = dict(results)
    load_after = os.getloadavg()

    _, bound, _ = quartiles(times["no-comm", 0.0])
    rows = []
    for latency_ms in args.latencies_ms:
        std, lad = quartiles(times["standard", latency_ms]), quartiles(times["ladder", latency_ms])
        ideal = std[1] / bound
        rows.append(
            [
                f"{latency_ms:g}",
                f"{std[1] * 1e3:.2f} ({std[0] * 1e3:.2f}-{std[2] * 1e3:.2f})",
                f"{lad[1] * 1e3:.2f} ({lad[0] * 1e3:.2f}-{lad[2] * 1e3:.2f})",
                f"{bound * 1e3:.2f}",
                f"{std[1] / lad[1]:.2f}x",
                f"{ideal:.2f}x",
                f"{(std[1] - lad[1]) / (std[1] - bound):.0%}" if std[1] > bound else "-",
            ]
        )
    header = [
        "injected latency ms",
        "standard ms (IQR)",
        "ladder ms (IQR)",
        "no-comm ms",
        "ladder speed-up",
        "upper bound",
        "comm hidden",
    ]
    table = markdown_table(header, rows)
    cfg = config(args)
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    workload = (
        f"one decode step of batch 1 after {args.context} cached tokens"
        if args.decode
        else f"forward of batch 1 x {args.tokens} tokens"
    )
    notes = (
        f"TP=2 ({args.device}, {'NCCL' if args.device == 'cuda' else 'gloo on 127.0.0.1, 1 thread per rank'}); "
        f"span of {cfg.num_layers} random layers, hidden {cfg.hidden_size}, heads {cfg.num_heads}/"
        f"{cfg.num_kv_heads} kv, MLP {cfg.intermediate_size}; {workload}; "
        f"per sample the mean of {args.calls} calls, median and interquartile range over {args.repeats} "
        f"samples, variants alternating. Speed-up = standard / ladder; upper bound = standard / no-comm; comm "
        f"hidden = the share of standard's communication time the ladder model saves. Load average before/after: "
        f"{load_before[0]:.2f}/{load_after[0]:.2f} (`uptime` after: {uptime})."
    )
    print(table)
    print(notes)
    if not args.no_record:
        kind = "decode steps" if args.decode else "forwards"
        append_results(
            f"Ladder Residual vs standard blocks, tensor parallel over 2 processes ({kind})", table, notes
        )


if __name__ == "__main__":
    main()
