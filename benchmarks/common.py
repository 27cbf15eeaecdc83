"""Shared by the benchmarks: the checkpoints (the same shapes as the Petals peer recipe in shared/petals-peer),
timing with medians, and appending a result table to benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
PROMPT = [[1, 17, 42, 99, 5, 23]]

SHAPES = {
    # hidden 64, 6 layers, vocab 160 (Petals peer "tiny")
    "tiny": dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
    ),
    # 246M params: hidden 1024, 16 layers, GQA 16/4, vocab 32000 (Petals peer "medium")
    "medium": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
}


def checkpoint(name: str, root: Path | None = None) -> Path:
    """A random Llama checkpoint of a named shape, built once (seed 7, no EOS so generation never stops early)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = (
        root or Path(os.environ.get("SWARMLLM_BENCH_DIR", Path.home() / ".cache" / "swarmllm" / "bench"))
    ) / name
    if not (path / "config.json").exists():
        torch.manual_seed(7)
        config = LlamaConfig(**SHAPES[name], eos_token_id=None)
        LlamaForCausalLM(config).save_pretrained(path)
    return path


def paired_median_times(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of two workloads timed alternately (noise on a shared machine hits both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), times):
            began = time.perf_counter()
            fn()
            out.append(time.perf_counter() - began)
    return statistics.median(times[0]), statistics.median(times[1])


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{os.cpu_count()} cores ({cpu}){gpu}, torch {torch.__version__}, Python {platform.python_version()}"
    )


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(title: str, table: str, notes: str = "") -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = " ".join(["python", *sys.argv])
    block = (
        f"\n## {title} ({stamp}, commit {commit})\nMachine: {machine()}. Command: `{command}`\n\n{table}\n"
    )
    if notes:
        block += f"\n{notes}\n"
    with RESULTS.open("a") as f:
        f.write(block)
