"""Sessions moving onto a server short of room: how long after a failure they all finish.

A local swarm of a tiny 6-layer Llama: server A holds every block with ample cache; N sessions (one thread each)
generate their first tokens there. Then server B starts, holding every block too but with cache room for only
`--room` of them at a time, and A is killed (SIGKILL). Every session moves to B: the first `--room` at once, the
others wait for room that the earlier ones free when they end. With `--clients one` the sessions are one client's
(B's `--max-cache-tokens` is twice the room, a peer's share being half), which wakes its own waits as it closes
(`client/room.py`); with `--clients each` every session is its own client (B's cache is the room, `--room` >= 2),
which only B's answer to its `room` query wakes. Reported: the seconds from the kill until the last session
finished (median over repeats, a fresh swarm each), and whether every session's tokens equal transformers' greedy
ones. Run it against another tree with `PYTHONPATH=that/src` to compare.

    python benchmarks/room_wait.py [--sessions 6] [--room 2] [--tokens 24] [--clients one|each] [--repeats 3]
        [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from common import append_results, markdown_table
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.local import LocalSwarm
from swarmllm.models.tiny import make_tiny_checkpoint

FIRST_TOKENS = 3  # generated on A before the kill


def prompts(n: int) -> list[torch.Tensor]:
    return [torch.tensor([[1 + i, 17, 42, 99, 5 + i, 23]]) for i in range(n)]


def run(path: Path, args: argparse.Namespace, want: list[list[int]]) -> tuple[float, bool, int]:
    """One repeat in a fresh swarm: seconds from the kill to the last session's end, tokens equal, failovers."""
    max_length = 6 + FIRST_TOKENS + args.tokens
    flags = ["--no-compile", "--num-threads", "1"]
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_server(str(path), (0, 6), extra=flags)
        clients = 1 if args.clients == "one" else args.sessions
        models = [
            AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
            for _ in range(clients)
        ]
        on_a = threading.Barrier(args.sessions + 1, timeout=120)
        killed = threading.Event()
        ended: list[float] = []

        def session(model, prompt: torch.Tensor) -> list[int]:
            with model.inference_session(max_length=max_length), torch.no_grad():
                first = model.generate(prompt, max_new_tokens=FIRST_TOKENS, do_sample=False)
                on_a.wait()
                assert killed.wait(120)
                out = model.generate(first, max_new_tokens=args.tokens, do_sample=False)
            ended.append(time.perf_counter())
            return out[0].tolist()

        try:
            with ThreadPoolExecutor(args.sessions) as pool:
                runs = [
                    pool.submit(session, models[i % clients], p) for i, p in enumerate(prompts(args.sessions))
                ]
                on_a.wait()
                room = str((2 if clients == 1 else 1) * args.room * max_length)
                swarm.add_server(str(path), (0, 6), extra=[*flags, "--max-cache-tokens", room])
                began = time.perf_counter()
                swarm.servers[0].kill()
                killed.set()
                outs = [r.result(timeout=600) for r in runs]
            return max(ended) - began, outs == want, sum(len(m.swarm.failovers) for m in models)
        finally:
            killed.set()
            for model in models:
                model.shutdown()


def tiny_and_greedy(folder: Path, sessions: int, tokens: int) -> tuple[Path, list[list[int]]]:
    """The tiny 6-layer Llama saved in `folder`, and transformers' greedy `tokens` after each of `prompts`."""
    hf_logging.set_verbosity_error()
    path = make_tiny_checkpoint(folder / "llama", "llama", num_layers=6, eos_token_id=None)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return path, [
            local.generate(p, max_new_tokens=tokens, do_sample=False)[0].tolist() for p in prompts(sessions)
        ]


def room_parser(description: str, room_help: str, tokens: int, tokens_help: str) -> argparse.ArgumentParser:
    """The options of a benchmark of sessions short of room (this one, `room_queue.py`)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--room", type=int, default=2, help=room_help)
    parser.add_argument("--tokens", type=int, default=tokens, help=tokens_help)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true", help="print only, don't append to RESULTS.md")
    return parser


def main() -> None:
    parser = room_parser(
        __doc__,
        "sessions of the client that B takes at a time",
        24,
        "tokens each session generates after the kill",
    )
    parser.add_argument(
        "--clients", choices=["one", "each"], default="one", help="the sessions' clients: one, or one each"
    )
    args = parser.parse_args()
    if args.clients == "each" and args.room < 2:
        parser.error(
            "--clients each needs --room >= 2 (a session is at most a peer's share, half of B's cache)"
        )
    with tempfile.TemporaryDirectory() as tmp:
        path, want = tiny_and_greedy(Path(tmp), args.sessions, FIRST_TOKENS + args.tokens)
        results = [run(path, args, want) for _ in range(args.repeats)]
    seconds = [r[0] for r in results]
    table = markdown_table(
        [
            "sessions",
            "clients",
            "B's room (sessions)",
            "tokens after the kill",
            "kill to last end, s (each)",
            "median s",
            "tokens equal to transformers",
            "failovers",
        ],
        [
            [
                args.sessions,
                1 if args.clients == "one" else args.sessions,
                args.room,
                args.tokens,
                ", ".join(f"{s:.2f}" for s in seconds),
                f"{statistics.median(seconds):.2f}",
                all(r[1] for r in results),
                ", ".join(str(r[2]) for r in results),
            ]
        ],
    )
    print(table)
    if not args.no_record:
        append_results("Sessions moving onto a server short of room", table)


if __name__ == "__main__":
    main()
