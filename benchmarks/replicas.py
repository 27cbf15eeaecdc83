"""Users over two replicas: two SmolLM2 servers that each hold every block, each held to `--server-cpu` of a core
(a CPU cgroup's quota: a machine of its own, as replicas are, rather than the clients' cores), announcing every 2 s.
Clients of another commit (A) and of the working tree (B) take turns; the idler replica's share of the work (the
servers' inference steps) says how they spread. Two workloads:

- `--workload api`: one `swarmllm api` of each tree, keeping no sessions (each request routes anew); a round sends
  `--users` requests at once of `--tokens` tokens; tokens/s of all users together.
- `--workload clients`: a round starts `--users` clients of their own (a process each, as users of `swarmllm chat`
  or scripts are), one every `--stagger` s, each generating `--tokens` tokens; the median user's tokens/s. A
  client routes by what the servers announce of the others' sessions (B) or by round trips alone (A).
- `--workload turns`: one conversation a round through each side's API (keeping no sessions): `--turns` requests,
  each the whole history (a first message of `--prompt-tokens`, then each answer and `--message-tokens` more)
  asking `--tokens` tokens; turns/s, and the share of prompt tokens the servers copied (usage's cached tokens).

Needs cgroup v1's cpu controller (/sys/fs/cgroup/cpu, as root).

    python benchmarks/replicas.py --a-commit HEAD~1 [--workload api|clients] [--users 4] [--tokens 32] [--rounds 6]
"""

from __future__ import annotations

import argparse
import contextlib
import json
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

CGROUPS = Path("/sys/fs/cgroup/cpu")


def inference_steps(url: str) -> float:
    """A server's inference steps so far, of every kind (its metrics)."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    prefix = "swarmllm_server_inference_steps_total"
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a-commit", required=True, help="A's clients run this commit; B's the working tree")
    parser.add_argument("--workload", choices=["api", "clients", "turns"], default="api")
    parser.add_argument("--model", default=str(Path.home() / ".cache/swarmllm/smollm2-135m-instruct"))
    parser.add_argument("--users", type=int, default=4, help="requests sent at once, or clients started")
    parser.add_argument("--tokens", type=int, default=32, help="tokens each request or client asks")
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--stagger", type=float, default=4.0, help="seconds between two clients' starts")
    parser.add_argument("--turns", type=int, default=6, help="requests of a conversation")
    parser.add_argument("--message-tokens", type=int, default=24, help="tokens a turn adds after the answer")
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each side")
    parser.add_argument("--server-cpu", type=float, default=0.5, help="cores each server may use")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--worker", nargs=3, metavar=("PEERS", "START_AT", "SEED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    groups: list[Path] = []
    try:
        rates, shares, cached = run(args, groups)
    finally:
        for group in groups:  # (empty once its server has exited)
            with contextlib.suppress(OSError):
                group.rmdir()
    rows = []
    for name, tree, side in (("A", args.a_commit, 0), ("B", "working tree", 1)):
        rate, share = statistics.median(rates[side]), statistics.median(shares[side])
        rows.append(
            [f"{name}: {tree}", f"{rate:.2f}", f"{share:.2f}", f"{statistics.median(cached[side]):.2f}"]
        )
    ratios = [b / a for a, b in zip(*rates, strict=True)]
    rows.append(["B / A (median of the rounds' ratios)", f"{statistics.median(ratios):.2f}x", "", ""])
    rate_name = {"api": "tokens/s, all users", "clients": "tokens/s, the median user", "turns": "turns/s"}
    header = [
        "clients' tree",
        rate_name[args.workload],
        "the idler replica's share of steps",
        "prompt copied",
    ]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        users = {
            "api": f"two `swarmllm api --keep-sessions 0` (A's of the commit's tree); {args.users} completions at "
            f"once of {args.prompt_tokens} random prompt tokens and {args.tokens} tokens each (ignore_eos)",
            "clients": f"{args.users} clients of their own a round (a process each, A's of the commit's tree), one "
            f"every {args.stagger} s, each generating {args.tokens} tokens after {args.prompt_tokens} random ones",
            "turns": f"two `swarmllm api --keep-sessions 0` (A's of the commit's tree); a conversation a round of "
            f"{args.turns} completions, each the whole history ({args.prompt_tokens} random tokens, then each "
            f"answer and {args.message_tokens} more) asking {args.tokens} tokens (ignore_eos)",
        }[args.workload]
        title = {
            "api": f"{args.users} users of one API",
            "clients": f"{args.users} clients",
            "turns": "A conversation",
        }
        append_results(
            f"{title[args.workload]} over two replicas: A/B",
            table,
            f"{Path(args.model).name}, 2 servers of all 30 blocks on loopback, each held to {args.server_cpu} of a "
            f"core (a cgroup's CPU quota; --num-threads 1, --update-period 2); {users}; {args.rounds} rounds per "
            "side after one to warm it, alternating; medians over rounds.",
        )


def run(args: argparse.Namespace, groups: list[Path]):
    """The rounds: (A's, B's) rates, the idler replica's share of each round's steps, and the share of prompt
    tokens copied (0 where the workload does not count them)."""
    from swarmllm.local import LocalSwarm

    rng = random.Random(0)
    rates: tuple[list[float], list[float]] = ([], [])
    shares: tuple[list[float], list[float]] = ([], [])
    cached: tuple[list[float], list[float]] = ([], [])
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalSwarm(fork=False) as swarm,
        LocalSwarm(fork=False) as other,
    ):
        old = commit_src(args.a_commit, tmp)
        swarm.start_bootstrap()
        flags = ["--num-threads", "1", "--metrics-port", "0", "--update-period", "2"]
        infos = swarm.add_servers([(args.model, (0, 30), flags), (args.model, (0, 30), flags)])
        for i, server in enumerate(swarm.servers):
            group = CGROUPS / f"swarmllm-replica-{os.getpid()}-{i}"
            group.mkdir()
            groups.append(group)
            # (in 10 ms periods: the default 100 ms would stall a step past its share for up to 100 ms)
            (group / "cpu.cfs_period_us").write_text("10000")
            (group / "cpu.cfs_quota_us").write_text(str(int(args.server_cpu * 10_000)))
            (group / "cgroup.procs").write_text(str(server.proc.pid))
        metrics = [info["metrics"] for info in infos]
        trees = (old, None)
        if args.workload in ("api", "turns"):
            other.initial_peers = swarm.initial_peers  # (a second API on the same swarm)
            apis = []
            for local, src in zip((other, swarm), trees, strict=True):
                if src is not None:
                    os.environ["PYTHONPATH"] = str(src)
                apis.append(local.start_api(args.model, extra=["--name", "m", "--keep-sessions", "0"]))
                os.environ.pop("PYTHONPATH", None)
            round_of = (api_rounds if args.workload == "api" else turn_rounds)(args, apis, rng)
        else:
            round_of = client_rounds(args, swarm.initial_peers, trees, rng)
        for round_ in range(args.rounds + 1):  # (the first round of each warms it, not counted)
            for side in (0, 1) if round_ % 2 == 0 else (1, 0):
                before = [inference_steps(url) for url in metrics]
                rate, copied = round_of(side)
                steps = [inference_steps(url) - b for url, b in zip(metrics, before, strict=True)]
                if round_:
                    rates[side].append(rate)
                    shares[side].append(min(steps) / max(sum(steps), 1.0))
                    cached[side].append(copied)
    return rates, shares, cached


def api_rounds(args: argparse.Namespace, apis: list[str], rng: random.Random):
    """A round through side's API: `users` requests at once; their tokens/s together."""
    import openai

    clients = [openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300) for url in apis]
    pool = ThreadPoolExecutor(args.users)

    def ask(side: int, prompt: list[int]) -> int:
        reply = clients[side].completions.create(
            model="m", prompt=prompt, max_tokens=args.tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        return reply.usage.completion_tokens

    def round_of(side: int) -> float:
        prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_tokens)] for _ in range(args.users)]
        began = time.perf_counter()
        tokens = sum(pool.map(lambda p: ask(side, p), prompts))
        return tokens / (time.perf_counter() - began), 0.0

    return round_of


def turn_rounds(args: argparse.Namespace, apis: list[str], rng: random.Random):
    """A round through side's API: one conversation of `turns` requests; turns/s and the share of prompt tokens
    copied."""
    import openai
    from transformers import AutoTokenizer

    clients = [openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300) for url in apis]
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def round_of(side: int) -> tuple[float, float]:
        history = [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)]
        prompt_tokens = copied = 0
        began = time.perf_counter()
        for _ in range(args.turns):
            reply = clients[side].completions.create(
                model="m",
                prompt=history,
                max_tokens=args.tokens,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            prompt_tokens += reply.usage.prompt_tokens
            copied += reply.usage.prompt_tokens_details.cached_tokens
            answer = tokenizer(reply.choices[0].text, add_special_tokens=False)[
                "input_ids"
            ]  # (as a client resends)
            history = history + answer + [rng.randrange(100, 40000) for _ in range(args.message_tokens)]
        return args.turns / (time.perf_counter() - began), copied / prompt_tokens

    return round_of


def client_rounds(args: argparse.Namespace, peers: list[str], trees, rng: random.Random):
    """A round of side's clients: `users` processes, each loading its client and then starting its generate at
    its turn (`stagger` s apart); the median user's tokens/s."""

    def round_of(side: int) -> float:
        env = dict(os.environ)
        if trees[side] is not None:
            env["PYTHONPATH"] = str(trees[side])
        start = time.time() + 15  # (every client loaded by then)
        command = [sys.executable, __file__, "--a-commit", "-", "--model", args.model]
        command += ["--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens), "--worker"]
        workers = [
            subprocess.Popen(
                [*command, ",".join(peers), str(start + i * args.stagger), str(rng.randrange(1 << 30))],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
            for i in range(args.users)
        ]
        results = [json.loads(w.communicate(timeout=600)[0].strip().splitlines()[-1]) for w in workers]
        return statistics.median(r["tokens_per_s"] for r in results), 0.0

    return round_of


def worker(args: argparse.Namespace) -> None:
    """One user: its own client, a generate of `tokens` tokens begun at START_AT (epoch seconds); prints its
    tokens/s."""
    import torch

    from swarmllm import AutoDistributedModelForCausalLM

    peers, start_at, seed = args.worker
    model = AutoDistributedModelForCausalLM.from_pretrained(args.model, initial_peers=peers.split(","))
    prompt = torch.randint(
        100, 40000, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(int(seed))
    )
    time.sleep(max(float(start_at) - time.time(), 0.0))  # (arrivals staggered on purpose)
    began = time.perf_counter()
    model.generate(prompt, max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    seconds = time.perf_counter() - began
    model.shutdown()
    print(json.dumps({"tokens_per_s": args.tokens / seconds}), flush=True)


if __name__ == "__main__":
    main()
