"""New sessions past a server's room: do they queue, and what does the queue cost?

A local swarm of a tiny 6-layer Llama: one server holds every block, with cache room for `--room` sessions at a
time (`--max-cache-tokens`). `--sessions` clients (one model each, so none can see or close another's session)
each start a greedy generate of `--tokens` tokens at once. A session refused room (`cache_full`) waits for it
(`SwarmClient.room_wait_s`), asking the server to say when a session ends (`room`); an older tree refuses it at
once (SessionRefused). Reported: how many finished and how many were refused, whether the finished ones' tokens
equal transformers' greedy ones, the seconds from the start to the last end (median over repeats, a fresh swarm
each), and that against the ideal queue: ceil(sessions / room) rounds of `room` sessions at once (a round measured
first, in the same swarm, with room for all of it), so the ratio is what waiting for room costs on top of the
work. With `--arrive-every S`, session i starts i x S seconds after the first, and two more figures tell whether
the queue serves them in turn when waits outlast a server's bounded `room` wait (2 s): the pairs served out of turn
(a session that came later ended more than a quarter of a round before one that came earlier) and the longest time
from a session's start to its end (every client is warmed first, its route found and its connection open, so that
its first opening reaches the server in the order it started). Run it against another tree with
`PYTHONPATH=that/src` to compare.

    python benchmarks/room_queue.py [--sessions 6] [--room 2] [--tokens 48] [--arrive-every 0] [--repeats 3]
        [--no-record]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from common import append_results, markdown_table
from room_wait import prompts, room_parser, tiny_and_greedy

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.swarm import SessionRefused
from swarmllm.local import LocalSwarm

PROMPT_TOKENS = 6  # of each of `prompts`


@dataclass
class Repeat:
    round_s: float  # `room` sessions at once, with room for all
    last_s: float  # from the start to the last end of all
    finished: int
    refused: int
    equal: bool  # the finished ones' tokens equal transformers'
    out_of_turn: int  # pairs where the later start ended over a quarter round before the earlier one
    longest_s: float  # the longest from a session's start to its end


def run(path: Path, args: argparse.Namespace, want: list[list[int]]) -> Repeat:
    """One repeat in a fresh swarm."""
    max_length = PROMPT_TOKENS + args.tokens
    flags = ["--no-compile", "--num-threads", "1", "--max-cache-tokens", str(args.room * max_length)]
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_server(str(path), (0, 6), extra=flags)
        models = [
            AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
            for _ in range(args.sessions)
        ]

        def session(
            model, prompt: torch.Tensor, start: threading.Barrier, delay_s: float
        ) -> tuple[list[int] | None, float, float]:
            """Its tokens (None: refused), when it started and when it ended."""
            start.wait()
            time.sleep(delay_s)  # (its arrival: the point of the staggered runs, not a synchronisation)
            began = time.perf_counter()
            try:
                with torch.no_grad():
                    out = model.generate(prompt, max_new_tokens=args.tokens, do_sample=False)[0].tolist()
            except SessionRefused as e:
                print(f"refused: {e}")
                out = None
            return out, began, time.perf_counter()

        def together(count: int, every_s: float = 0.0) -> list[tuple[list[int] | None, float, float]]:
            """`count` sessions, session i started i x `every_s` after the first."""
            start = threading.Barrier(count, timeout=120)
            with ThreadPoolExecutor(count) as pool:
                runs = [
                    pool.submit(session, m, p, start, i * every_s)
                    for i, (m, p) in enumerate(zip(models, prompts(count), strict=False))
                ]
                return [r.result(timeout=600) for r in runs]

        try:
            if args.arrive_every:  # (every client warmed: its first opening reaches the server in its turn)
                with torch.no_grad():
                    for model, prompt in zip(models, prompts(args.sessions), strict=True):
                        model.generate(prompt, max_new_tokens=2, do_sample=False)
            together(args.room)  # (warming the server and the clients, not counted)
            results = together(args.room)
            round_s = max(ended for *_, ended in results) - min(began for _, began, _ in results)
            results = together(args.sessions, args.arrive_every)
            last = max(ended for *_, ended in results) - results[0][1]
            finished = [(out, want[i]) for i, (out, *_) in enumerate(results) if out is not None]
            ends = [ended for *_, ended in results]
            out_of_turn = sum(
                ends[j] < ends[i] - round_s / 4 for i in range(len(ends)) for j in range(i + 1, len(ends))
            )
            return Repeat(
                round_s,
                last,
                len(finished),
                args.sessions - len(finished),
                all(out == w for out, w in finished),
                out_of_turn,
                max(ended - began for _, began, ended in results),
            )
        finally:
            for model in models:
                model.shutdown()


def main() -> None:
    parser = room_parser(
        __doc__, "sessions the server holds at a time (>= 2)", 48, "tokens each session generates"
    )
    parser.add_argument(
        "--arrive-every",
        type=float,
        default=0.0,
        help="seconds between the sessions' starts (0: all at once)",
    )
    args = parser.parse_args()
    if args.room < 2:
        parser.error("--room must be >= 2 (a session is at most a peer's share, half of the cache)")
    with tempfile.TemporaryDirectory() as tmp:
        path, want = tiny_and_greedy(Path(tmp), args.sessions, args.tokens)
        results = [run(path, args, want) for _ in range(args.repeats)]
    rounds = math.ceil(args.sessions / args.room)
    last = [r.last_s for r in results]
    ideal = [rounds * r.round_s for r in results]
    headers = [
        "sessions (one client each)",
        "server's room (sessions)",
        "tokens each",
        "finished / refused",
        "start to last end, s (each)",
        "median s",
        "ideal queue s (rounds x a round alone, median)",
        "last end / ideal (median)",
        "finished tokens equal to transformers",
    ]
    row = [
        args.sessions,
        args.room,
        args.tokens,
        ", ".join(f"{r.finished} / {r.refused}" for r in results),
        ", ".join(f"{s:.2f}" for s in last),
        f"{statistics.median(last):.2f}",
        f"{statistics.median(ideal):.2f} ({rounds} x {statistics.median(r.round_s for r in results):.2f})",
        f"{statistics.median(s / i for s, i in zip(last, ideal, strict=True)):.2f}",
        all(r.equal for r in results),
    ]
    if args.arrive_every:
        headers[4:4] = ["starts every s", "pairs served out of turn (each)", "longest start to end, s (each)"]
        row[4:4] = [
            args.arrive_every,
            ", ".join(str(r.out_of_turn) for r in results),
            ", ".join(f"{r.longest_s:.2f}" for r in results),
        ]
    table = markdown_table(headers, [row])
    print(table)
    if not args.no_record:
        append_results("New sessions past a server's room: queued, not refused", table)


if __name__ == "__main__":
    main()
