"""Paired A/B of single-session decode speed: two local swarms side by side, generate calls alternating
between them, so the noise of a shared machine hits both alike. A and B differ in source tree (a git
commit, checked out to a temporary folder) and/or in server flags. Each swarm chains `--servers` servers (the
model's blocks split evenly); besides steps/s, the CPU time of all its processes (servers and client) per token,
from /proc, which a shared machine disturbs less than the wall clock.

    python benchmarks/ab.py --a-commit 7cc298e                   # that commit vs the working tree
    python benchmarks/ab.py --b-args="--compile"                 # eager vs compiled servers, same tree
    python benchmarks/ab.py --model medium --rounds 15 --new-tokens 24
    python benchmarks/ab.py --model ~/.cache/swarmllm/smollm2-135m-instruct --b-args="--no-compile"
    python benchmarks/ab.py --a-commit 77c1ab9 --servers 6 --rounds 12   # a hop's cost, old vs new
    python benchmarks/ab.py --a-commit HEAD --workload samples --rows 4 --prompt-tokens 300 --new-tokens 16

One pair of swarms is not enough: a swarm keeps a speed of its own for its life, and null runs (A and B the same
tree) of one pair each gave B/A anywhere from 0.87 (B faster in 7 of 30 pairs) to 1.17 (11 of 12). So `--swarms`
pairs are started afresh, one after the other (`common.paired_swarms`), the rounds split between them; the verdict
is the median over all pairs of generates, with each swarm pair's own median beside it: a change is one where the
pairs agree. Results in RESULTS.md up to session 52 came from one pair of swarms.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import (
    PROMPT,
    append_results,
    checkpoint,
    commit_src,
    cpu_s,
    markdown_table,
    paired_swarms,
    start_worker,
)

ROOT = Path(__file__).resolve().parents[1]


def workload(name: str, rows: int) -> dict:
    """generate's arguments for a workload: one greedy sequence, `rows` beams, or `rows` samples of a prompt."""
    if name == "beams":
        return {"num_beams": rows, "do_sample": False}
    if name == "samples":
        return {"num_return_sequences": rows, "do_sample": True, "top_k": 0}
    return {"do_sample": False}


def worker(args: argparse.Namespace) -> None:
    """One swarm of `servers` servers and a client; on each stdin line, one timed generate, printed as steps/s,
    whether its tokens equal the first generate's, and the CPU ms per token of all the swarm's processes.
    (Samples are drawn with the same seed each time.)"""
    from transformers import AutoConfig

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.local import LocalSwarm

    model, new_tokens, servers = args.model, args.new_tokens, args.servers
    path = checkpoint(model) if model in ("tiny", "medium") else Path(model)
    num_blocks = AutoConfig.from_pretrained(path).num_hidden_layers
    cuts = [round(i * num_blocks / servers) for i in range(servers + 1)]
    prompt = torch.tensor(PROMPT)
    if args.prompt_tokens:  # (the prompt repeated to that length)
        prompt = prompt.repeat(1, -(-args.prompt_tokens // prompt.shape[1]))[:, : args.prompt_tokens]
    kwargs = {
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        **workload(args.workload, args.rows),
    }

    def generate() -> torch.Tensor:
        torch.manual_seed(0)
        return remote.generate(prompt, **kwargs)

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(path), span) for span in zip(cuts, cuts[1:])], extra=args.server_args.split())
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        pids = [server.proc.pid for server in swarm.servers] + [os.getpid()]
        with torch.no_grad():
            first = generate()
            print("ready", flush=True)
            for _ in sys.stdin:
                cpu = sum(cpu_s(pid) for pid in pids)
                began = time.perf_counter()
                out = generate()
                elapsed = time.perf_counter() - began
                cpu_ms = (sum(cpu_s(pid) for pid in pids) - cpu) / new_tokens * 1e3
                print(f"{new_tokens / elapsed:.3f} {out.tolist() == first.tolist()} {cpu_ms:.3f}", flush=True)
        remote.shutdown()


def start(src: Path, server_args: str, args: argparse.Namespace) -> subprocess.Popen:
    # (its client imports torch before swarmllm, so it would keep libgomp's default spin, which swarmllm's own
    # client commands switch off, and spin into the other swarm's turn)
    env = {**os.environ, "PYTHONPATH": str(src), "GOMP_SPINCOUNT": "0"}
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--model",
        args.model,
        "--new-tokens",
        str(args.new_tokens),
        "--servers",
        str(args.servers),
        "--workload",
        args.workload,
        "--rows",
        str(args.rows),
        "--prompt-tokens",
        str(args.prompt_tokens),
    ]
    proc, _ = start_worker([*command, f"--server-args={server_args}"], env)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a-commit", help="A runs this commit (default: the working tree, like B)")
    parser.add_argument("--a-args", default="", help="server flags for A")
    parser.add_argument("--b-args", default="", help="server flags for B")
    parser.add_argument("--model", default="tiny", help="tiny, medium or a checkpoint folder")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--servers", type=int, default=2, help="servers in each chain")
    parser.add_argument("--rounds", type=int, default=40, help="generates of each swarm, in all")
    parser.add_argument(
        "--swarms", type=int, default=4, help="pairs of swarms started afresh, one after another"
    )
    parser.add_argument("--workload", choices=["greedy", "beams", "samples"], default="greedy")
    parser.add_argument("--rows", type=int, default=4, help="beams or samples of the prompt")
    parser.add_argument("--prompt-tokens", type=int, default=0, help="the prompt repeated to this length")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--server-args", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not 1 <= args.swarms <= args.rounds:
        parser.error("--swarms must be between 1 and --rounds")

    speeds: tuple[list[float], list[float]] = ([], [])
    cpus: tuple[list[float], list[float]] = ([], [])
    by_pair: dict[int, list[float]] = {}
    same = True
    with tempfile.TemporaryDirectory() as tmp:
        sides = [
            (commit_src(args.a_commit, tmp) if args.a_commit else ROOT / "src", args.a_args),
            (ROOT / "src", args.b_args),
        ]
        for pair, turns in paired_swarms(lambda side: start(*sides[side], args), args.swarms, args.rounds):
            for side, proc in turns:
                proc.stdin.write("go\n")
                proc.stdin.flush()
                steps, equal, cpu_ms = proc.stdout.readline().split()
                speeds[side].append(float(steps))
                cpus[side].append(float(cpu_ms))
                same = same and equal == "True"
            by_pair.setdefault(pair, []).append(speeds[1][-1] / speeds[0][-1])
            print(f"swarm pair {pair + 1}: B/A {by_pair[pair][-1]:.3f}", file=sys.stderr)
    pair_medians = [statistics.median(ratios) for ratios in by_pair.values()]
    ratios = [b / a for a, b in zip(*speeds)]
    cpu_ratios = [b / a for a, b in zip(*cpus)]
    a_name = f"{args.a_commit or 'working tree'} {args.a_args}".strip()
    b_name = f"working tree {args.b_args}".strip()
    table = markdown_table(
        [
            "model",
            "servers",
            "A",
            "B",
            "A steps/s",
            "B steps/s",
            "B/A (median of pairs)",
            "B faster in",
            "B/A of each swarm pair",
            "A CPU ms/token",
            "B CPU ms/token",
            "B/A CPU (median of pairs)",
            "tokens stable",
        ],
        [
            [
                args.model,
                args.servers,
                a_name,
                b_name,
                f"{statistics.median(speeds[0]):.1f}",
                f"{statistics.median(speeds[1]):.1f}",
                f"{statistics.median(ratios):.3f}",
                f"{sum(r > 1 for r in ratios)}/{len(ratios)}",
                ", ".join(f"{m:.3f}" for m in pair_medians),
                f"{statistics.median(cpus[0]):.2f}",
                f"{statistics.median(cpus[1]):.2f}",
                f"{statistics.median(cpu_ratios):.3f}",
                same,
            ]
        ],
    )
    print(table)
    what = "greedy" if args.workload == "greedy" else f"{args.rows} {args.workload}"
    what += f", a {args.prompt_tokens or len(PROMPT[0])}-token prompt"
    if not args.no_record:
        append_results(
            f"Paired A/B, one client's generates through {args.servers} server{'s' * (args.servers > 1)}",
            table,
            f"{args.rounds} rounds of a {args.new_tokens}-token generate ({what}), alternating A and B, over "
            f"{args.swarms} pairs of swarms started afresh; "
            "CPU: user + system time of the swarm's servers and client per generated token (/proc); "
            "'tokens stable': every generate gave its swarm's first output.",
        )


if __name__ == "__main__":
    main()
