"""How long torch's OpenMP workers spin after a parallel region (`GOMP_SPINCOUNT`), against what it costs:
a server's CPU while it answers a flood of small forward calls (the abuser of `abuse.py`, 1-token calls at 10x
the rate limit), and local transformers' speed on the tiny model (2 threads), each in a fresh process.

    python benchmarks/omp_spin.py [--spincounts default 30000 3000] [--seconds 5]

`swarmllm serve` sets GOMP_SPINCOUNT=30000 unless the operator set it (cli.SERVER_OMP_SPINCOUNT).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import append_results, checkpoint, cpu_s, markdown_table

LOCAL = """
import statistics, sys, time, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
x = torch.randint(0, 100, (1, 128), generator=torch.Generator().manual_seed(0))
with torch.no_grad():
    for _ in range(3):
        model(x)
    times = []
    for _ in range(15):
        began = time.perf_counter(); model(x); times.append(time.perf_counter() - began)
    model.generate(x[:, :4], max_new_tokens=2, do_sample=False)
    began = time.perf_counter()
    model.generate(x[:, :4], max_new_tokens=32, min_new_tokens=32, do_sample=False)
    steps = 32 / (time.perf_counter() - began)
print(128 / statistics.median(times), steps)
"""


def env_with(spincount: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if spincount != "default":
        env["GOMP_SPINCOUNT"] = spincount
    return env


def server_cpu_under_flood(path: str, spincount: str, seconds: float) -> tuple[float, float]:
    """(server CPU cores, abuser calls/s) while one server answers 1-token forward calls at 10x its rate limit.
    The server is started by `swarmllm serve`, which keeps a GOMP_SPINCOUNT it is given ("default": libgomp's)."""
    from swarmllm.local import LocalSwarm

    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env_with(spincount))
    if spincount == "default":
        os.environ["GOMP_SPINCOUNT"] = "300000"  # libgomp's own default, stated so serve keeps it
    try:
        with LocalSwarm() as swarm:
            swarm.start_bootstrap()
            record = swarm.add_server(path, (0, 6))
            pid = swarm.servers[0].proc.pid
            abuser = subprocess.Popen(
                [sys.executable, "abuse.py", "--abuser", record["direct"], "1", "500", "1", "64"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=os.path.dirname(os.path.abspath(__file__)),
            )
            try:
                if abuser.stdout.readline().strip() != "ready":
                    raise RuntimeError("the abuser did not start")
                abuser.stdin.write("on\n")
                abuser.stdin.flush()
                began, cpu_began = time.perf_counter(), cpu_s(pid)
                time.sleep(seconds)  # the measurement window, not a synchronisation
                cores = (cpu_s(pid) - cpu_began) / (time.perf_counter() - began)
                abuser.stdin.write("off\n")
                abuser.stdin.flush()
                abuser.stdout.readline()
            finally:
                abuser.stdin.close()
                report = json.loads(abuser.stdout.readline() or "{}")
                abuser.wait()
            return cores, report.get("sent_per_s", 0.0)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--spincounts", nargs="+", default=["default", "30000", "3000"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=3, help="local transformers runs per spin count")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    path = str(checkpoint("tiny"))
    rows = []
    for spincount in args.spincounts:
        runs = [
            [
                float(v)
                for v in subprocess.run(
                    [sys.executable, "-c", LOCAL, path],
                    env=env_with(spincount),
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout.split()
            ]
            for _ in range(args.repeats)
        ]
        cores, calls = server_cpu_under_flood(path, spincount, args.seconds)
        rows.append(
            [
                "libgomp default (300,000)" if spincount == "default" else f"{int(spincount):,}",
                f"{cores:.2f}",
                f"{calls:.0f}",
                f"{statistics.median(r[0] for r in runs):,.0f}",
                f"{statistics.median(r[1] for r in runs):.0f}",
            ]
        )
    table = markdown_table(
        [
            "GOMP_SPINCOUNT",
            "server CPU cores under a flood of small calls",
            "calls/s sent",
            "local tiny fwd tok/s (1x128, 2 threads)",
            "local tiny decode steps/s",
        ],
        rows,
    )
    print(table)
    if not args.no_record:
        append_results(
            "OpenMP spin-wait of torch's workers: server CPU under a flood vs local speed",
            table,
            f"One server (tiny model, all 6 blocks, default flags: both cores) answering 1-token forward calls "
            f"at 10x its rate limit for {args.seconds:g} s (most refused); local transformers: median of "
            f"{args.repeats} fresh processes.",
        )


if __name__ == "__main__":
    main()
