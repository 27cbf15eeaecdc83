"""How fast spot checks catch a lying server, and how often they wrongly accuse an honest one.

1. Detection, seeded runs: the client's own draws (`verify.should_check`, one per step) against a server that
   corrupts every output, or 1 output in 20 (at random, and every 20th), counted as caught when a checked step was
   corrupted; and whether such a corruption is caught by the comparison: real outputs of the model's blocks,
   corrupted as `--corrupt-every` does (`server.corrupt.corrupted`), through `verify.mismatch` against
   `verify.tolerance`.
2. False bans: honest comparisons on real outputs, exactly the computations a check compares: a server's
   inference session step by step (the decode path, KV cache) against another server's plain forward over the
   whole prefix (`server.Backend`, the code servers run), the two in float32 or bfloat16 and with different
   thread counts. A comparison beyond the tolerance would ban an honest server.

Usage: python benchmarks/spot_checks.py [--runs 5000] [--comparisons 10000] [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import torch
from common import append_results, checkpoint, markdown_table

from swarmllm.client.verify import detection_odds, mismatch, steps_to_catch, tolerance
from swarmllm.models import load_client_head
from swarmllm.models.checkpoint import load_span
from swarmllm.server.backend import Backend
from swarmllm.server.corrupt import corrupted

FRACTION = 0.05
SCENARIOS = [  # name, corrupt rate, fixed pattern (None: at random), steps allowed
    ("corrupts every output", 1.0, [True], 100),
    ("corrupts 1 output in 20, at random", 0.05, None, 2000),
    ("corrupts every 20th output", 0.05, [False] * 19 + [True], 2000),
]


def detection(runs: int) -> list[list[object]]:
    rows = []
    for name, rate, pattern, steps in SCENARIOS:
        caught = [steps_to_catch(random.Random(seed), FRACTION, pattern, rate, steps) for seed in range(runs)]
        hits = [c for c in caught if c is not None]
        rows.append(
            [
                name,
                steps,
                runs,
                f"{len(hits) / runs:.2%}",
                f"{detection_odds(FRACTION, 1.0, steps * sum(pattern) // len(pattern)):.2%}"
                if pattern
                else f"{detection_odds(FRACTION, rate, steps):.2%}",
                statistics.median(hits) if hits else "-",
            ]
        )
    return rows


def backend(path: str, dtype: torch.dtype, threads: int, num_blocks: int) -> Backend:
    torch.set_num_threads(threads)
    b = Backend(load_span(path, 0, num_blocks, dtype=dtype), cache_tokens=1 << 16)
    b.set_threads(threads)
    return b


async def honest(path: str, comparisons: int, length: int) -> tuple[list[list[object]], list[float]]:
    """Sessions on one backend, each step compared with a forward over its prefix on another."""
    config, head = load_client_head(path)
    blocks = config.num_hidden_layers
    servers = {
        ("float32", 1): backend(path, torch.float32, 1, blocks),
        ("float32", 2): backend(path, torch.float32, 2, blocks),
        ("bfloat16", 1): backend(path, torch.bfloat16, 1, blocks),
    }
    pairs = [  # (checked session's server, checker's server)
        (("float32", 1), ("float32", 2)),
        (("float32", 2), ("bfloat16", 1)),
        (("bfloat16", 1), ("float32", 1)),
        (("bfloat16", 1), ("bfloat16", 1)),
    ]
    per_pair = comparisons // len(pairs)
    rows, corrupt_mismatch, generator = [], [], torch.Generator().manual_seed(0)
    for checked, checker in pairs:
        tol = tolerance([checked[0], checker[0]])
        mismatches, seq = [], 0
        while len(mismatches) < per_pair:
            ids = torch.randint(3, config.vocab_size, (1, length), generator=generator)
            hidden = head.embed(ids).float()
            session = servers[checked].open_session(0, blocks, 1, length)
            prompt = 1 + seq % 8  # a prompt of 1-8 tokens, then one token per step
            outs = [(await servers[checked].step(session, hidden[:, :prompt], 0, None))[0]]
            for pos in range(prompt, length):
                outs.append((await servers[checked].step(session, hidden[:, pos : pos + 1], pos, None))[0])
            servers[checked].close_session(session)
            whole, _ = await servers[checker].forward(hidden, None, 0, blocks)
            at = 0
            for out in outs:
                n = out.shape[1]
                mismatches.append(mismatch(out, whole[:, at : at + n]))
                if len(corrupt_mismatch) < 2000:
                    corrupt_mismatch.append(mismatch(corrupted(out, generator), whole[:, at : at + n]))
                at += n
            seq += 1
        mismatches = mismatches[:per_pair]
        rows.append(
            [
                f"{checked[0]} ({checked[1]} thr) session vs {checker[0]} ({checker[1]} thr) forward",
                len(mismatches),
                f"{statistics.median(mismatches):.2e}",
                f"{max(mismatches):.2e}",
                f"{tol:.0e}",
                sum(m > tol for m in mismatches),
            ]
        )
    return rows, corrupt_mismatch


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5000, help="seeded runs per detection scenario")
    parser.add_argument("--comparisons", type=int, default=10000, help="honest comparisons in all")
    parser.add_argument("--length", type=int, default=128, help="tokens per honest session")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--no-record", action="store_true", help="print only, don't append to RESULTS.md")
    args = parser.parse_args()
    began = time.perf_counter()
    detect = detection(args.runs)
    table1 = markdown_table(
        ["server", "steps allowed", "seeded runs", "caught in time", "odds", "median step caught"],
        detect,
    )
    print(table1)
    rows, corrupt = asyncio.run(honest(str(checkpoint(args.model)), args.comparisons, args.length))
    table2 = markdown_table(
        ["honest comparison", "comparisons", "median mismatch", "max mismatch", "tolerance", "false bans"],
        rows,
    )
    print(table2)
    least = min(corrupt)
    tol = max(tolerance(["bfloat16"]), tolerance(["float32"]))
    note = (
        f"Spot-check fraction {FRACTION:.0%} (p). Odds: 1-(1-p*f)^n for a server corrupting each output with "
        f"probability f, over n steps; 1-(1-p)^k for one corrupting k given outputs. Detection: the client's own seeded draws; a corrupted output counts "
        f"as caught because the comparison catches every one: {len(corrupt)} real outputs corrupted as "
        f"`--corrupt-every` does (noise of 0.5x the norm) had mismatch >= {least:.3f} against the honest "
        f"recomputation, above every tolerance (<= {tol:g}). Honest comparisons: `{args.model}` model, all its "
        f"blocks, sessions of {args.length} tokens (prompts of 1-8 tokens, then one token per step) on one "
        f"backend against a plain forward over the same prefix on another, as a spot check does. "
        f"{time.perf_counter() - began:.0f} s in all."
    )
    print(note)
    if not args.no_record:
        append_results("Spot checks: detection and false bans", table1 + "\n\n" + table2, note)


if __name__ == "__main__":
    main()
