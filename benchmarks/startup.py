"""How long a local swarm takes to start and to stop, its processes forked from warm interpreters (`LocalSwarm`'s
default, `swarmllm.forking`) against each started as a new interpreter (`LocalSwarm(fork=False)`).

Each run starts a bootstrap peer, then `--servers` servers of the tiny test Llama at once, checks that a client
generates through them, and stops everything. The two ways alternate run by run, after one warm-up run each
(which starts the forkers: a cost paid once per process that starts swarms); medians over `--repeats` runs.

    python benchmarks/startup.py [--servers 4] [--repeats 3] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import append_results, markdown_table

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.local import LocalSwarm
from swarmllm.models.tiny import make_tiny_checkpoint


def run(path: Path, servers: int, fork: bool) -> tuple[float, float, float]:
    """Seconds to start the bootstrap peer, to have every server online, and to stop them all."""
    began = time.perf_counter()
    swarm = LocalSwarm(fork=fork)
    try:
        swarm.start_bootstrap()
        bootstrap = time.perf_counter()
        spans = [(i * 4 // servers, (i + 1) * 4 // servers) for i in range(servers)]
        swarm.add_servers([(str(path), span) for span in spans])
        online = time.perf_counter()
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        try:
            model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2, do_sample=False)
        finally:
            model.shutdown()
    finally:
        stopping = time.perf_counter()
        swarm.close()
    return bootstrap - began, online - bootstrap, time.perf_counter() - stopping


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    path = make_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny-llama", "llama")
    times: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
    for fork in (False, True):
        run(path, args.servers, fork)  # warm-up: the forkers start, the throughput cache fills
    for _ in range(args.repeats):
        for fork in (False, True):
            times[fork].append(run(path, args.servers, fork))
    rows = []
    for fork in (False, True):
        medians = [statistics.median(t[i] for t in times[fork]) for i in range(3)]
        rows.append(["forked" if fork else "new interpreters", *(f"{m:.2f}" for m in medians)])
    plain, forked = (statistics.median(t[1] for t in times[f]) for f in (False, True))
    header = ["processes", "bootstrap up (s)", f"{args.servers} servers online (s)", "all stopped (s)"]
    table = markdown_table(header, rows)
    print(table)
    print(f"servers online {plain / forked:.1f}x sooner forked")
    if not args.no_record:
        notes = (
            f"A bootstrap peer and {args.servers} servers of the tiny test Llama (4 blocks) on 127.0.0.1, started "
            "at once with the default flags (so each compiles its decode step before it goes online, either way); "
            f"a client generates 2 tokens through them before all stop. Medians of {args.repeats} runs "
            "per way, the ways alternating, after a warm-up run of each (forked: the forkers were started by it). "
            f"Servers online {plain / forked:.1f}x sooner forked."
        )
        append_results("Local swarm start and stop: forked processes against new interpreters", table, notes)


if __name__ == "__main__":
    main()
