"""New sessions past a server's room: do they queue, and what does the queue cost?

A local swarm of a tiny 6-layer Llama: one server holds every block, with cache room for `--room` sessions at a
time (`--max-cache-tokens`). `--sessions` clients (one model each, so none can see or close another's session)
each start a greedy generate of `--tokens` tokens at once. A session refused room (`cache_full`) waits for it
(`SwarmClient.room_wait_s`), asking the server to say when a session ends (`room`); an older tree refuses it at
once (SessionRefused). Reported: how many finished and how many were refused, whether the finished ones' tokens
equal transformers' greedy ones, the seconds from the start to the last end (median over repeats, a fresh swarm
each), and that against the ideal queue: ceil(sessions / room) rounds of `room` sessions at once (a round measured
first, in the same swarm, with room for all of it), so the ratio is what waiting for room costs on top of the
work. Run it against another tree with
`PYTHONPATH=that/src` to compare.

    python benchmarks/room_queue.py [--sessions 6] [--room 2] [--tokens 48] [--repeats 3] [--no-record]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import append_results, markdown_table
from room_wait import prompts, room_parser, tiny_and_greedy

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.swarm import SessionRefused
from swarmllm.local import LocalSwarm

PROMPT_TOKENS = 6  # of each of `prompts`


def run(path: Path, args: argparse.Namespace, want: list[list[int]]) -> tuple[float, float, int, int, bool]:
    """One repeat in a fresh swarm: seconds of a round (`room` sessions at once), seconds from the start to the
    last end of all, sessions finished, sessions refused, finished tokens equal to transformers'."""
    max_length = PROMPT_TOKENS + args.tokens
    flags = ["--no-compile", "--num-threads", "1", "--max-cache-tokens", str(args.room * max_length)]
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_server(str(path), (0, 6), extra=flags)
        models = [
            AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
            for _ in range(args.sessions)
        ]

        def session(model, prompt: torch.Tensor, start: threading.Barrier) -> tuple[list[int] | None, float]:
            start.wait()
            try:
                with torch.no_grad():
                    out = model.generate(prompt, max_new_tokens=args.tokens, do_sample=False)[0].tolist()
            except SessionRefused as e:
                print(f"refused: {e}")
                out = None
            return out, time.perf_counter()

        def together(count: int) -> tuple[float, list[tuple[list[int] | None, float]]]:
            """`count` sessions started at once: when they started, and each one's tokens and end."""
            start = threading.Barrier(count, timeout=120)
            with ThreadPoolExecutor(count) as pool:
                began = time.perf_counter()
                runs = [
                    pool.submit(session, m, p, start) for m, p in zip(models, prompts(count), strict=False)
                ]
                return began, [r.result(timeout=600) for r in runs]

        try:
            together(args.room)  # (warming the server and the clients, not counted)
            began, results = together(args.room)
            round_s = max(ended for _, ended in results) - began
            began, results = together(args.sessions)
            last = max(ended for _, ended in results) - began
            finished = [(out, want[i]) for i, (out, _) in enumerate(results) if out is not None]
            equal = all(out == w for out, w in finished)
            return round_s, last, len(finished), args.sessions - len(finished), equal
        finally:
            for model in models:
                model.shutdown()


def main() -> None:
    parser = room_parser(
        __doc__, "sessions the server holds at a time (>= 2)", 48, "tokens each session generates"
    )
    args = parser.parse_args()
    if args.room < 2:
        parser.error("--room must be >= 2 (a session is at most a peer's share, half of the cache)")
    with tempfile.TemporaryDirectory() as tmp:
        path, want = tiny_and_greedy(Path(tmp), args.sessions, args.tokens)
        results = [run(path, args, want) for _ in range(args.repeats)]
    rounds = math.ceil(args.sessions / args.room)
    last = [r[1] for r in results]
    ideal = [rounds * r[0] for r in results]
    table = markdown_table(
        [
            "sessions (one client each)",
            "server's room (sessions)",
            "tokens each",
            "finished / refused",
            "start to last end, s (each)",
            "median s",
            "ideal queue s (rounds x a round alone, median)",
            "last end / ideal (median)",
            "finished tokens equal to transformers",
        ],
        [
            [
                args.sessions,
                args.room,
                args.tokens,
                ", ".join(f"{r[2]} / {r[3]}" for r in results),
                ", ".join(f"{s:.2f}" for s in last),
                f"{statistics.median(last):.2f}",
                f"{statistics.median(ideal):.2f} ({rounds} x {statistics.median(r[0] for r in results):.2f})",
                f"{statistics.median(s / i for s, i in zip(last, ideal, strict=True)):.2f}",
                all(r[4] for r in results),
            ]
        ],
    )
    print(table)
    if not args.no_record:
        append_results("New sessions past a server's room: queued, not refused", table)


if __name__ == "__main__":
    main()
