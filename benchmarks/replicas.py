"""Users of one API over two replicas: two SmolLM2 servers that each hold every block, each pinned to a core of its
own (`taskset`), and two `swarmllm api` clients on them, one of another commit (A) and one of the working tree (B),
that keep no sessions (each request routes anew). Rounds alternate between the APIs; each sends `--users` requests
at once of `--tokens` tokens and reports their aggregate tokens/s, and the share of the round's decode steps that
each replica ran (its metrics' inference steps). An API that routes every session to
the nearer replica leaves the other's core idle; one that spreads sessions by load uses both.

    python benchmarks/replicas.py --a-commit HEAD~1 [--users 4] [--tokens 32] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, commit_src, markdown_table  # noqa: E402


def session_steps(url: str) -> float:
    """A server's decode steps run for sessions so far (its metrics' counter)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("swarmllm_server_inference_steps_total")
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a-commit", required=True, help="A's API runs this commit; B's the working tree")
    parser.add_argument("--model", default=str(Path.home() / ".cache/swarmllm/smollm2-135m-instruct"))
    parser.add_argument("--users", type=int, default=4, help="requests sent at once")
    parser.add_argument("--tokens", type=int, default=32, help="tokens each request asks")
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=6, help="rounds through each API")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import openai

    from swarmllm.local import LocalSwarm

    rng = random.Random(0)
    rates: tuple[list[float], list[float]] = ([], [])
    shares: tuple[list[float], list[float]] = ([], [])
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalSwarm(fork=False) as swarm,
        LocalSwarm(fork=False) as other,
    ):
        old = commit_src(args.a_commit, tmp)
        swarm.start_bootstrap()
        flags = ["--num-threads", "1", "--metrics-port", "0"]
        infos = swarm.add_servers([(args.model, (0, 30), flags), (args.model, (0, 30), flags)])
        for core, server in enumerate(swarm.servers):
            subprocess.run(
                ["taskset", "-a", "-cp", str(core), str(server.proc.pid)], check=True, capture_output=True
            )
        metrics = [info["metrics"] for info in infos]
        other.initial_peers = swarm.initial_peers
        apis = []
        for local, src in ((other, old), (swarm, None)):
            if src is not None:
                os.environ["PYTHONPATH"] = str(src)
            apis.append(local.start_api(args.model, extra=["--name", "m", "--keep-sessions", "0"]))
            os.environ.pop("PYTHONPATH", None)
        clients = [openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300) for url in apis]

        def ask(side: int, prompt: list[int]) -> int:
            reply = clients[side].completions.create(
                model="m",
                prompt=prompt,
                max_tokens=args.tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            return reply.usage.completion_tokens

        with ThreadPoolExecutor(args.users) as pool:
            for round_ in range(args.rounds + 1):  # (the first round of each warms it, not counted)
                for side in (0, 1) if round_ % 2 == 0 else (1, 0):
                    prompts = [
                        [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)]
                        for _ in range(args.users)
                    ]
                    before = [session_steps(url) for url in metrics]
                    began = time.perf_counter()
                    tokens = sum(pool.map(lambda p, s=side: ask(s, p), prompts))
                    seconds = time.perf_counter() - began
                    steps = [session_steps(url) - b for url, b in zip(metrics, before, strict=True)]
                    if round_:
                        rates[side].append(tokens / seconds)
                        shares[side].append(min(steps) / max(sum(steps), 1.0))
    rows = []
    for name, tree, side in (("A", args.a_commit, 0), ("B", "working tree", 1)):
        rows.append(
            [
                f"{name}: {tree}",
                f"{statistics.median(rates[side]):.1f}",
                f"{statistics.median(shares[side]):.2f}",
            ]
        )
    ratios = [b / a for a, b in zip(*rates, strict=True)]
    rows.append(["B / A (median of the rounds' ratios)", f"{statistics.median(ratios):.2f}x", ""])
    table = markdown_table(["API's tree", "tokens/s, all users", "the idler replica's share of steps"], rows)
    print(table)
    if not args.no_record:
        append_results(
            f"{args.users} users of one API over two replicas: A/B",
            table,
            f"{Path(args.model).name}, 2 servers of all 30 blocks on loopback, each pinned to one core "
            f"(`taskset`, --num-threads 1); two `swarmllm api --keep-sessions 0` (A's of the commit's tree), "
            f"{args.users} completions at once of {args.prompt_tokens} random prompt tokens and {args.tokens} "
            f"tokens each (ignore_eos); {args.rounds} rounds per API after one to warm it, alternating; medians "
            "over rounds.",
        )


if __name__ == "__main__":
    main()
