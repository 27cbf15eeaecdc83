"""What each hop of a chain costs: single-session ms/token of the tiny model through chains of 1, 2, 3 and 6
servers on loopback (the model's 6 blocks split evenly), and the cost per added hop (a least-squares slope).

    python benchmarks/chain.py [--servers 1 2 3 6] [--new-tokens 64] [--repeats 9] [--swarms 3] [--rtt-ms 0]
        [--no-record] [--client-spin COUNT ...] [--server-args FLAG ...]   (last: the rest goes to every server)

The tiny model computes next to nothing, so the slope is the hop's overhead: the wire, the push to the next
server, the event loops' wake-ups and the per-step Python on both ends. With --rtt-ms (and --mbit), every server
sits behind the network emulator (netem.py) instead.

Each hop's time is split in two, from the servers' own account of each decode step (`compute_s` in every reply,
summed over the chain's hops): the servers' compute (from the step's arrival at the backend to its output: the
batcher, the decode runner and its compiled step) and the rest (the wire, TLS, the handlers' Python on both ends,
the processes' wake-ups; in a chain's row, the client's own work too, the same at every length). Each gets its own
slope. Beside them, `--warm-step` times the same one-block decode step (built ahead of time, as the servers build
it unless they run with --no-aot-step) in a loop in one process, its caches warm: what a hop's compute costs when
nothing else runs between two steps.

Every chain runs at once, each with its own swarm and client process, and the generates go round them in turn
(the first chain of each round rotating), the way `ab.py` pairs two trees: on a shared machine, whose speed drifts
by tens of percent over a minute, a chain measured after another would carry that drift into the slope. A swarm
also keeps a speed of its own for its life (`ab.py`'s null runs: up to 15% between two swarms of one tree), so
`--swarms` sets of chains are started afresh, one after another, the rounds split between them. Besides the slope
of the medians, each round's own slope is taken, and their median reported.

Each client process spins its OpenMP workers as `swarmllm`'s client commands do (`swarmllm.spin.CLIENT`, unless
GOMP_SPINCOUNT is set); `--client-spin` gives other counts to compare ("default": libgomp's own), each with its own
set of chains in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import ExitStack

import torch
from common import PROMPT, append_results, checkpoint, markdown_table, rounds_of, start_worker
from netem import Emulator
from transformers.utils import logging as hf_logging

from swarmllm import spin

ARGS_ENV = "SWARMLLM_CHAIN_ARGS"  # the parent's arguments, for a worker (server flags may start with "--")


def worker(servers: int, args: argparse.Namespace) -> None:
    """One chain of `servers` servers and its client: says `ready` and whether its tokens equal local
    transformers', then, on each stdin line, times one generate and prints its seconds."""
    from transformers import AutoModelForCausalLM

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.client import session as session_module
    from swarmllm.local import LocalSwarm

    path = checkpoint("tiny")
    os.environ.pop("GOMP_SPINCOUNT", None)  # the client's, read as torch loaded: the servers take their own
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
            print(f"ready {got.tolist() == want.tolist()}", flush=True)
            computes: list[float] = []  # each decode step's compute, summed over the chain's servers
            original_step = session_module.InferenceSession.step

            async def step(self, hidden, *rest, **kwargs):
                out = await original_step(self, hidden, *rest, **kwargs)
                if hidden.shape[1] == 1:
                    computes.append(sum(t.compute_s for t in self.last_timings))
                return out

            session_module.InferenceSession.step = step
            for _ in sys.stdin:
                computes.clear()
                began = time.perf_counter()
                remote.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
                print(f"{time.perf_counter() - began:.6f} {statistics.median(computes):.9f}", flush=True)


def warm_step(blocks: int, aot: bool, steps: int = 300) -> float:
    """ms of the tiny model's decode step over `blocks` blocks, compiled as a server compiles it (`aot`: ahead of
    time too), one thread, run back to back in this process (its caches warm): the median over cache slots 50 to
    `steps`."""
    from swarmllm.models import KVCache, load_span
    from swarmllm.server.decode import DecodeRunner

    torch.set_num_threads(1)  # as each server of a chain on this host
    span = load_span(str(checkpoint("tiny")), 0, blocks)
    runner = DecodeRunner(span, torch.device("cpu"), compile=True, aot=aot)
    runner.warm_up()
    cache = KVCache(blocks, 1, steps, span.config, torch.float32, "cpu")
    key_mask = torch.ones(1, steps, dtype=torch.bool)
    hidden = torch.randn(1, span.config.hidden_size, generator=torch.Generator().manual_seed(0))
    times = []
    with torch.inference_mode():
        for slot in range(steps):
            began = time.perf_counter()
            runner.step(hidden, slot, key_mask, False, cache, None)
            times.append(time.perf_counter() - began)
    return statistics.median(times[50:]) * 1e3


def start(servers: int, spincount: str, args: argparse.Namespace) -> tuple[subprocess.Popen, bool]:
    """A worker process for one chain, its client's OpenMP spin count `spincount` (its servers keep theirs), once
    it is ready; and whether its tokens equal transformers'."""
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    env[ARGS_ENV] = json.dumps(vars(args))
    if spincount != "default":
        env["GOMP_SPINCOUNT"] = spincount
    proc, ready = start_worker([sys.executable, __file__, "--worker", str(servers)], env)
    return proc, ready.split()[1] == "True"


def slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--servers", nargs="+", type=int, default=[1, 2, 3, 6])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=9, help="rounds of one generate through every chain")
    parser.add_argument(
        "--swarms",
        type=int,
        default=3,
        help="sets of chains started afresh, one after another, the rounds split",
    )
    parser.add_argument(
        "--server-args", nargs=argparse.REMAINDER, default=[], help="the rest: `swarmllm serve` flags"
    )
    parser.add_argument("--rtt-ms", type=float, default=0.0)
    parser.add_argument("--mbit", type=float, default=None)
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument(
        "--client-spin",
        nargs="+",
        default=[os.environ.get("GOMP_SPINCOUNT", spin.CLIENT)],
        help="the clients' GOMP_SPINCOUNT ('default': libgomp's); several: a set of chains for each",
    )
    parser.add_argument(
        "--warm-step", action="store_true", help="also time the one-block decode step warm, alone (see above)"
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    if not args.worker and len(set(args.servers)) < 2:
        parser.error("--servers needs at least two chain lengths (the cost per hop is a slope)")
    if args.worker:
        worker(args.worker, argparse.Namespace(**json.loads(os.environ[ARGS_ENV])))
        return
    if not 1 <= args.swarms <= args.repeats:
        parser.error("--swarms must be between 1 and --repeats")
    keys = [(c, n) for c in args.client_spin for n in args.servers]
    results: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
    computes: dict[tuple[str, int], list[float]] = {key: [] for key in keys}  # ms a token, all servers
    equal = True
    set_of_round: list[int] = []  # the set of chains each round ran on
    for swarm_set in range(args.swarms):
        chains: dict[tuple[str, int], subprocess.Popen] = {}
        try:
            for c, n in keys:
                print(
                    f"starting a chain of {n} servers (client spin {c}; set {swarm_set + 1} of {args.swarms}) ...",
                    file=sys.stderr,
                )
                chains[c, n], same = start(n, c, args)
                equal &= same
            for _ in range(rounds_of(swarm_set, args.swarms, args.repeats)):
                k = len(set_of_round) % len(keys)
                for key in keys[k:] + keys[:k]:
                    chains[key].stdin.write("go\n")
                    chains[key].stdin.flush()
                    seconds, compute_s = map(float, chains[key].stdout.readline().split())
                    results[key].append(seconds / args.new_tokens * 1e3)
                    computes[key].append(compute_s * 1e3)
                set_of_round.append(swarm_set)
        finally:
            for proc in chains.values():
                proc.stdin.close()
            for proc in chains.values():
                proc.wait(timeout=120)
    xs = list(map(float, args.servers))
    medians = {key: statistics.median(v) for key, v in results.items()}
    compute = {key: statistics.median(v) for key, v in computes.items()}
    rows, summaries = [], []
    for c in args.client_spin:
        per_hop = slope(xs, [medians[c, n] for n in args.servers])
        per_round = statistics.median(
            slope(xs, [results[c, n][r] for n in args.servers]) for r in range(args.repeats)
        )
        compute_per_hop = slope(xs, [compute[c, n] for n in args.servers])
        per_set = [
            slope(
                xs,
                [
                    statistics.median(v for v, k in zip(results[c, n], set_of_round, strict=True) if k == one)
                    for n in args.servers
                ],
            )
            for one in sorted(set(set_of_round))
        ]
        rows += [
            [
                c,
                n,
                f"{medians[c, n]:.2f}",
                f"{min(results[c, n]):.2f}",
                f"{compute[c, n]:.2f}",
                f"{medians[c, n] - compute[c, n]:.2f}",
            ]
            for n in args.servers
        ]
        summaries.append(
            f"client spin {c}: {per_hop:.2f} ms/token per added hop (least-squares slope of the medians; median "
            f"of the rounds' own slopes {per_round:.2f}; each set of chains: "
            f"{', '.join(f'{v:.2f}' for v in per_set)}), of which the servers' compute {compute_per_hop:.2f} "
            f"and the rest {per_hop - compute_per_hop:.2f}"
        )
    headers = [
        "client GOMP_SPINCOUNT",
        "servers in the chain",
        "ms/token (median)",
        "fastest",
        "servers' compute ms/token (median)",
        "the rest",
    ]
    table = markdown_table(headers, rows)
    summary = f"Cost per added hop: {'; '.join(summaries)}; tokens equal to transformers: {equal}."
    if args.warm_step:
        step_ms = warm_step(1, aot="--no-aot-step" not in args.server_args)
        summary += f" The one-block decode step alone, warm, back to back: {step_ms:.3f} ms."
    print(table)
    print(summary)
    if not args.no_record:
        network = f"emulated {args.rtt_ms:g} ms round trip" if args.rtt_ms else "loopback"
        append_results(
            f"Chain length: tiny model, single session, {network}",
            table,
            f"{summary} Greedy, 6-token prompt, {args.new_tokens} new tokens; every chain up at once, each with "
            f"its own swarm and client process, {args.repeats} rounds of one generate per chain in turn, over "
            f"{args.swarms} sets of chains started afresh; server "
            f"flags: {' '.join(args.server_args) or 'defaults'}.",
        )


if __name__ == "__main__":
    main()
