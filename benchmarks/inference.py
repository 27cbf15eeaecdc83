"""Single-session decode steps/s and batch-forward tokens/s through a local swarm of 2 servers, beside the same
checkpoint run locally with transformers (the no-network limit), as ratios measured in one run.

    python benchmarks/inference.py [--models tiny medium] [--new-tokens 64] [--forward-tokens 512] [--compile]

The servers run with default flags (so the tiny model's decode step compiled, the medium one's eager on packed
weights); --compile makes every server compile.
"""

from __future__ import annotations

import argparse

from common import append_results, markdown_table, measure_swarm
from transformers.utils import logging as hf_logging


def bench_model(name: str, new_tokens: int, forward_tokens: int, repeats: int, compile: bool) -> list[object]:
    r = measure_swarm(
        name,
        new_tokens=new_tokens,
        forward_tokens=forward_tokens,
        repeats=repeats,
        server_args=["--compile"] if compile else [],
    )
    return [
        name,
        f"{r.swarm_steps:.1f}",
        f"{r.local_steps:.1f}",
        f"{r.swarm_steps / r.local_steps:.2f}",
        f"{r.swarm_fwd_tps:,.0f}",
        f"{r.local_fwd_tps:,.0f}",
        f"{r.swarm_fwd_tps / r.local_fwd_tps:.2f}",
        r.tokens_equal,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 64 tiny, 32 medium")
    parser.add_argument("--forward-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="servers torch.compile their decode step")
    parser.add_argument("--no-record", action="store_true", help="print only, don't append to RESULTS.md")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    rows = []
    for name in args.models:
        new_tokens = args.new_tokens or (64 if name == "tiny" else 32)
        rows.append(bench_model(name, new_tokens, args.forward_tokens, args.repeats, args.compile))
    header = [
        "model",
        "swarm steps/s",
        "local steps/s",
        "ratio",
        f"swarm fwd tok/s (1x{args.forward_tokens})",
        "local fwd tok/s",
        "ratio",
        "tokens equal",
    ]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        append_results(
            "Inference through a local swarm (2 servers with default flags: they split the cores"
            + (", --compile" if args.compile else "")
            + ") vs local transformers",
            table,
            f"Median of {args.repeats}; single session, batch 1, 6-token prompt, greedy; local transformers uses the "
            "default torch threads.",
        )


if __name__ == "__main__":
    main()
