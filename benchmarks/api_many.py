"""Many concurrent requests to one `swarmllm api` through servers with their default limits, paired: the whole
swarm (servers and API) of another commit (A) against the working tree (B). The API is one peer to the servers,
which admit 16 sessions of a peer (`--max-sessions-per-peer`); past that, its requests must wait their turn.
Reported per side and request count: aggregate tokens/s, the API process's CPU per generated token, the
servers' `quota` refusals per request, and whether every request's tokens equal its solo run. Sides alternate
(`--rounds`), medians over rounds and repeats.

    python benchmarks/api_many.py --a-commit HEAD [--requests 8 16 32 64] [--repeats 3] [--rounds 2]
        [--server-args=--max-cache-tokens=4096]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, checkpoint, commit_src, cpu_s, markdown_table  # noqa: E402

MODEL = "tiny"


def quota_refusals(urls: list[str]) -> float:
    """The servers' `quota` refusals so far (their `/metrics` pages)."""
    total = 0.0
    for url in urls:
        with urllib.request.urlopen(url, timeout=30) as page:
            text = page.read().decode()
        total += sum(
            float(m.group(1))
            for m in re.finditer(r'^swarmllm_server_refusals_total\{reason="quota"\} (\S+)$', text, re.M)
        )
    return total


def side(src: Path | None, args: argparse.Namespace) -> dict[int, list[tuple[float, float, float, bool]]]:
    """One swarm of `src` (None: the working tree): per request count, each repeat's (tokens/s, API CPU
    ms/token, quota refusals per request, tokens equal to the solo runs)."""
    from multiclient import ApiClients, aggregate_tps

    from swarmllm.local import LocalSwarm

    if src is not None:
        os.environ["PYTHONPATH"] = str(src)
    try:
        path = checkpoint(MODEL)
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(path)
        half = config.num_hidden_layers // 2
        out: dict[int, list[tuple[float, float, float, bool]]] = {}
        with LocalSwarm(fork=False) as swarm, tempfile.TemporaryDirectory() as folder:
            swarm.start_bootstrap()
            records = [
                swarm.add_server(str(path), span, extra=["--metrics-port", "0", *args.server_args])
                for span in [(0, half), (half, config.num_hidden_layers)]
            ]
            urls = [r["metrics"] for r in records]
            clients = ApiClients(swarm, path, Path(folder), config.vocab_size, "cpu", "float32")
            pid = swarm.api.proc.pid
            try:
                most = max(args.requests)
                solo = {seed: clients.run([seed], args.tokens)[0]["tokens"] for seed in range(most)}
                for count in args.requests:
                    print(f"{'A' if src else 'B'}: {count} requests ...", file=sys.stderr)
                    seeds = list(range(count))
                    clients.run(seeds, args.tokens)  # (untimed: the servers lay out merged steps)
                    for _ in range(args.repeats):
                        cpu0, refused0 = cpu_s(pid), quota_refusals(urls)
                        results = clients.run(seeds, args.tokens)
                        cpu1, refused1 = cpu_s(pid), quota_refusals(urls)
                        tokens = count * args.tokens
                        equal = all(r["tokens"] == solo[s] for s, r in zip(seeds, results, strict=True))
                        out.setdefault(count, []).append(
                            (
                                aggregate_tps(results, args.tokens),
                                1000 * (cpu1 - cpu0) / tokens,
                                (refused1 - refused0) / count,
                                equal,
                            )
                        )
            finally:
                clients.close()
        return out
    finally:
        os.environ.pop("PYTHONPATH", None)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a-commit", required=True, help="A's swarm runs this commit; B's the working tree")
    parser.add_argument("--requests", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="swarms per side, started in alternation")
    parser.add_argument(
        "--server-args",
        action="extend",
        nargs="+",
        default=[],
        help="more `swarmllm serve` flags, e.g. --server-args=--max-cache-tokens=4096 (one peer's cache share "
        "then holds 16 of the API's sessions, the tiny model's 128-token context each)",
    )
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    runs: dict[str, dict[int, list]] = {"A": {}, "B": {}}
    with tempfile.TemporaryDirectory() as tmp:
        src_a = commit_src(args.a_commit, tmp)
        for round_ in range(args.rounds):
            for name in "AB" if round_ % 2 == 0 else "BA":
                for count, rows in side(src_a if name == "A" else None, args).items():
                    runs[name].setdefault(count, []).extend(rows)

    table_rows = []
    for count in args.requests:
        cells = {}
        for name in "AB":
            rows = runs[name][count]
            cells[name] = [statistics.median(r[i] for r in rows) for i in range(3)] + [
                all(r[3] for r in rows)
            ]
        a, b = cells["A"], cells["B"]
        table_rows.append(
            [count, f"{a[0]:.0f}", f"{b[0]:.0f}", f"{b[0] / a[0]:.2f}", f"{a[1]:.2f}", f"{b[1]:.2f}"]
            + [f"{a[2]:.1f}", f"{b[2]:.1f}", a[3] and b[3]]
        )
    header = ["requests", "A tok/s", "B tok/s", "B/A", "A API CPU ms/tok", "B API CPU ms/tok"]
    header += ["A quota refusals/request", "B quota refusals/request", "tokens = solo"]
    table = markdown_table(header, table_rows)
    print(table)
    if not args.no_record:
        notes = (
            f"The {MODEL} model on a bootstrap and 2 local servers (default limits: 16 sessions a peer; "
            f"server flags: {' '.join(args.server_args) or 'none'}), one "
            f"`swarmllm api --max-concurrent 64`, greedy completions of {args.tokens} tokens (`ignore_eos`); "
            f"A: commit {args.a_commit}, B: the working tree; {args.rounds} swarms a side, {args.repeats} timed "
            "runs of each request count in each, medians. API CPU: the API process's user + system time over the "
            "tokens generated."
        )
        append_results("Many requests to one API through servers' per-peer limits: A/B", table, notes)


if __name__ == "__main__":
    main()
