"""A burst of new users: N clients send their prompts at the same moment to an idle swarm of 2 servers, and
each waits for its first token. Paired A/B: two swarms side by side (source trees: a git commit, checked out to
a temporary folder, and the working tree), bursts alternating between them, over `--swarms` pairs of swarms
started afresh (`common.paired_swarms`), as `ab.py` pairs single sessions.

    python benchmarks/burst.py --a-commit 04c3821 [--model medium] [--clients 8] [--rounds 12] [--swarms 4]
        [--no-record]

Each client (`multiclient.py`'s) sends a 6-token prompt and generates 1 token. Each burst reports the time
from its start to each client's first token; a round's figures are the median and the last of the N. Servers merge prefills that arrive together into one step (`server/batching.py`: their
rows share the step's read of the weights), where an older tree ran them one after another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import append_results, checkpoint, commit_src, markdown_table, paired_swarms

ROOT = Path(__file__).resolve().parents[1]


def driver(model: str, clients: int) -> None:
    """One swarm of 2 servers and `clients` client processes (`multiclient.py`'s); on each stdin line `SEED`,
    one burst, printed as each client's seconds from the burst's start to its first token."""
    import multiclient

    from swarmllm.local import LocalSwarm

    path = checkpoint(model)
    blocks = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(path), (0, blocks // 2)), (str(path), (blocks // 2, blocks))])
        group = multiclient.Clients(clients, path, swarm.initial_peers, "cpu", "float32")
        try:
            group.run(list(range(clients)), 2)  # every client's sessions warm
            print("ready", flush=True)
            for line in sys.stdin:
                seed = int(line)
                results = group.run([seed * clients + i for i in range(clients)], 1)
                start = min(r["began"] for r in results)
                print(json.dumps([r["ended"] - start for r in results]), flush=True)
        finally:
            group.close()


def start(src: Path, args: argparse.Namespace) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{Path(__file__).parent}", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, __file__, "--driver", "--model", args.model]
    command += ["--clients", str(args.clients)]
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    line = proc.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"a swarm did not start: {line!r}")
    return proc


def burst(proc: subprocess.Popen, seed: int) -> list[float]:
    proc.stdin.write(f"{seed}\n")
    proc.stdin.flush()
    return json.loads(proc.stdout.readline())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a-commit", help="the tree compared with the working tree (required)")
    parser.add_argument("--model", default="medium", choices=["tiny", "medium"])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=12, help="bursts of each swarm, in all")
    parser.add_argument(
        "--swarms", type=int, default=4, help="pairs of swarms started afresh, one after another"
    )
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        driver(args.model, args.clients)
        return
    if not args.a_commit:
        parser.error("--a-commit is required")
    if not 1 <= args.swarms <= args.rounds:
        parser.error("--swarms must be between 1 and --rounds")
    checkpoint(args.model)  # built once, before the two swarms read it
    times: dict[str, list[list[float]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory() as tmp:
        trees = [commit_src(args.a_commit, tmp), ROOT / "src"]
        by_pair: dict[int, list[float]] = {}  # A / B of each round's last first token, by swarm pair
        for n, (pair, turns) in enumerate(
            paired_swarms(lambda side: start(trees[side], args), args.swarms, args.rounds)
        ):
            for side, proc in turns:
                times["AB"[side]].append(sorted(burst(proc, n)))
            a, b = times["A"][-1], times["B"][-1]
            by_pair.setdefault(pair, []).append(a[-1] / b[-1])
            print(
                f"round {n + 1} (swarm pair {pair + 1}): last first token A {a[-1]:.3f} s, B {b[-1]:.3f} s",
                file=sys.stderr,
            )
    rows = []
    for name, tree in (("A", args.a_commit), ("B", "working tree")):
        medians = [statistics.median(t) for t in times[name]]
        lasts = [t[-1] for t in times[name]]
        rows.append(
            [f"{name}: {tree}", f"{statistics.median(medians):.3f}", f"{statistics.median(lasts):.3f}"]
        )
    pairs = [ratio for ratios in by_pair.values() for ratio in ratios]
    rows.append(
        ["A / B (median of the rounds' ratios, last first token)", "", f"{statistics.median(pairs):.2f}x"]
    )
    each = ", ".join(f"{statistics.median(ratios):.2f}x" for ratios in by_pair.values())
    rows.append(["A / B of each swarm pair", "", each])
    header = ["tree", "median first token s", "last first token s"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        notes = (
            f"{args.model}, 2 servers on loopback, {args.clients} clients each sending a 6-token prompt"
            f" at once (1 new token), {args.rounds} rounds alternating A and B over {args.swarms} pairs of swarms"
            " started afresh; medians over rounds."
        )
        append_results(f"A burst of {args.clients} new users: A/B", table, notes)


if __name__ == "__main__":
    main()
