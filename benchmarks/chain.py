"""What each hop of a chain costs: single-session ms/token of the tiny model through chains of 1, 2, 3 and 6
servers on loopback (the model's 6 blocks split evenly), and the cost per added hop (a least-squares slope).

    python benchmarks/chain.py [--servers 1 2 3 6] [--new-tokens 64] [--repeats 5] [--server-args ...]
        [--rtt-ms 0] [--no-record]

The tiny model computes next to nothing, so the slope is the hop's overhead: the wire, the push to the next
server, the event loops' wake-ups and the per-step Python on both ends. With --rtt-ms (and --mbit), every server
sits behind the network emulator (netem.py) instead.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import ExitStack

import torch
from common import PROMPT, append_results, checkpoint, markdown_table
from netem import Emulator
from transformers.utils import logging as hf_logging


def ms_per_token(servers: int, args: argparse.Namespace) -> tuple[float, bool]:
    from transformers import AutoModelForCausalLM

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.local import LocalSwarm

    path = checkpoint("tiny")
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    blocks = local.config.num_hidden_layers
    cuts = [round(i * blocks / servers) for i in range(servers + 1)]
    prompt = torch.tensor(PROMPT)
    with ExitStack() as stack:
        own: list[list[str]] = [[] for _ in range(servers)]
        if args.rtt_ms:
            emulator = stack.enter_context(Emulator(args.rtt_ms, args.mbit))
            emulator.start(servers)
            own = [emulator.server_args(i) for i in range(servers)]
        swarm = stack.enter_context(LocalSwarm())
        swarm.start_bootstrap()
        for i, span in enumerate(zip(cuts, cuts[1:])):
            swarm.add_server(str(path), span, extra=[*args.server_args, *own[i]])
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        stack.callback(remote.shutdown)
        with torch.no_grad():
            want = local.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
            got = remote.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
            times = []
            for _ in range(args.repeats):
                began = time.perf_counter()
                remote.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
                times.append(time.perf_counter() - began)
    return statistics.median(times) / args.new_tokens * 1e3, got.tolist() == want.tolist()


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", nargs="+", type=int, default=[1, 2, 3, 6])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=1, help="measure every chain length this many times")
    parser.add_argument("--server-args", nargs="*", default=[])
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--mbit", type=float, default=None)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    results: dict[int, list[float]] = {n: [] for n in args.servers}
    equal = True
    for _ in range(args.rounds):
        for n in args.servers:
            print(f"chain of {n} servers ...", file=sys.stderr)
            ms, same = ms_per_token(n, args)
            results[n].append(ms)
            equal &= same
    medians = {n: statistics.median(v) for n, v in results.items()}
    per_hop = slope(list(map(float, medians)), list(medians.values()))
    rows = [[n, f"{medians[n]:.2f}", " ".join(f"{v:.2f}" for v in results[n])] for n in args.servers]
    table = markdown_table(["servers in the chain", "ms/token (median)", "each round"], rows)
    summary = f"Cost per added hop (least-squares slope): {per_hop:.2f} ms/token; tokens equal to transformers: {equal}."
    print(table)
    print(summary)
    if not args.no_record:
        network = f"emulated {args.rtt_ms:g} ms round trip" if args.rtt_ms else "loopback"
        append_results(
            f"Chain length: tiny model, single session, {network}",
            table,
            f"{summary} Greedy, 6-token prompt, {args.new_tokens} new tokens, median of {args.repeats} "
            f"generates per chain (a fresh swarm per chain length, {args.rounds} round(s)); server flags: "
            f"{' '.join(args.server_args) or 'defaults'}.",
        )


if __name__ == "__main__":
    main()
