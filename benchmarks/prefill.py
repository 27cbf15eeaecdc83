"""A long prompt alone and beside other users: its time to first token, how long another user's shorter prompt
waits behind it, and whether the decode steps of a third user stall meanwhile, with servers that prefill in chunks
(`--prefill-chunk-tokens`, default 512; each chunk's output goes on to the next server at once, so the prefill is
pipelined along the chain) against servers that prefill in one piece (`--prefill-chunk-tokens 0`).

    python benchmarks/prefill.py [--model medium] [--long 1536] [--short 256] [--decode-tokens 96] [--rounds 3]
        [--no-record] [--server-args FLAG ...]      (last: the rest of the line goes to every `swarmllm serve`)

Two swarms of 2 servers run at once, one per way, each with three client processes: A sends the long prompt, B
the short one, C decodes. Each round, on each swarm in turn: A, B and C alone; then C decoding while A prefills,
and B starting a quarter of A's lone time after A (so A is inside the first server's prefill). A server's decode
steps run on its event loop and prefills on its compute thread, so C should not stall either way; B waits for
one chunk of A's at each server when servers chunk, for the rest of A's prompt when they do not.
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
from pathlib import Path

import torch
from common import append_results, checkpoint, markdown_table
from transformers.utils import logging as hf_logging

WAYS = {
    "in one piece": ["--prefill-chunk-tokens", "0"],
    "in chunks of 512": ["--prefill-chunk-tokens", "512"],
}


def worker(path: str, peers: list[str]) -> None:
    """A client process. On stdin `SEED LENGTH NEW`: one greedy generate of NEW tokens after a random prompt of
    LENGTH tokens, answered with its tokens, start, and the time each new token came (CLOCK_MONOTONIC)."""
    from swarmllm import AutoDistributedModelForCausalLM

    torch.set_num_threads(1)  # the clients share the machine's cores with the servers
    remote = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=peers)
    vocab = remote.config.vocab_size

    class Clock:  # a transformers streamer: called with the prompt, then with each new token
        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.monotonic())

        def end(self):
            pass

    with torch.no_grad():
        remote.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)  # warm-up
        print("ready", flush=True)
        for line in sys.stdin:
            seed, length, new = (int(x) for x in line.split())
            ids = torch.randint(3, vocab, (1, length), generator=torch.Generator().manual_seed(seed))
            clock = Clock()
            began = time.monotonic()
            out = remote.generate(ids, max_new_tokens=new, do_sample=False, streamer=clock)
            reply = {"tokens": out[0, length:].tolist(), "began": began, "times": clock.times[1:]}
            print(json.dumps(reply), flush=True)
    remote.shutdown()


class Client:
    def __init__(self, path: Path, peers: list[str]):
        command = [sys.executable, __file__, "--worker", str(path), "--peers", *peers]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        if (line := self.proc.stdout.readline()).strip() != "ready":
            raise RuntimeError(f"a client did not start: {line!r}")

    def send(self, seed: int, length: int, new: int) -> None:
        self.proc.stdin.write(f"{seed} {length} {new}\n")
        self.proc.stdin.flush()

    def result(self) -> dict:
        return json.loads(self.proc.stdout.readline())

    def run(self, seed: int, length: int, new: int) -> dict:
        self.send(seed, length, new)
        return self.result()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def first_token_s(result: dict) -> float:
    return result["times"][0] - result["began"]


def gaps_within(result: dict, start: float, end: float) -> list[float]:
    """C's gaps between tokens that end inside [start, end]."""
    times = result["times"]
    return [b - a for a, b in zip(times, times[1:]) if start <= b <= end]


def one_round(clients: dict[str, Client], args: argparse.Namespace) -> dict:
    a, b, c = clients["a"], clients["b"], clients["c"]
    alone_a = a.run(1, args.long, 1)
    alone_b = b.run(2, args.short, 1)
    alone_c = c.run(3, 6, args.decode_tokens)
    c.send(3, 6, args.decode_tokens)
    time.sleep(0.5)  # C's prefill is done and it decodes
    a.send(1, args.long, 1)
    time.sleep(first_token_s(alone_a) / 4)  # A is inside the first server's prefill
    b.send(2, args.short, 1)
    beside_a, beside_b, beside_c = a.result(), b.result(), c.result()
    a_ended = beside_a["times"][0]
    during = gaps_within(beside_c, beside_a["began"], a_ended)
    return {
        "a_alone": first_token_s(alone_a),
        "b_alone": first_token_s(alone_b),
        "a_beside": first_token_s(beside_a),
        "b_beside": first_token_s(beside_b),
        "c_alone_gap": statistics.median(gaps_within(alone_c, 0, float("inf"))),
        "c_during": during,
        "tokens": [r["tokens"] for r in (alone_a, alone_b, alone_c, beside_a, beside_b, beside_c)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="medium")
    parser.add_argument("--long", type=int, default=1536, help="A's prompt tokens")
    parser.add_argument("--short", type=int, default=256, help="B's prompt tokens")
    parser.add_argument("--decode-tokens", type=int, default=96, help="C's new tokens (enough to outlast A)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[])
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--peers", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.peers)
    hf_logging.set_verbosity_error()
    from swarmllm.local import LocalSwarm

    path = checkpoint(args.model)
    blocks = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    spans = [(0, blocks // 2), (blocks // 2, blocks)]
    rounds: dict[str, list[dict]] = {way: [] for way in WAYS}
    with ExitStack() as stack:
        swarms = {}
        for way, flags in WAYS.items():
            print(f"starting the swarm that prefills {way} ...", flush=True)
            swarm = stack.enter_context(LocalSwarm())
            swarm.start_bootstrap()
            swarm.add_servers([(str(path), span) for span in spans], extra=[*args.server_args, *flags])
            swarms[way] = {name: Client(path, swarm.initial_peers) for name in "abc"}
            for client in swarms[way].values():
                stack.callback(client.close)
        for i in range(args.rounds):
            for way in list(WAYS)[i % 2 :] + list(WAYS)[: i % 2]:
                result = one_round(swarms[way], args)
                rounds[way].append(result)
                print(
                    f"round {i + 1} {way}: " + json.dumps({k: v for k, v in result.items() if k != "tokens"})
                )
    tokens = [r["tokens"] for way in WAYS for r in rounds[way]]
    stable = all(t == tokens[0] for t in tokens)
    header = [
        "servers prefill",
        "A's first token alone (s)",
        "B's alone (s)",
        "B's beside A (s)",
        "B waited (s)",
        "A's beside (s)",
        "C's token gap alone (ms)",
        "C's gaps while A prefills, all rounds: median / max (ms)",
    ]
    rows = []
    for way, results in rounds.items():
        m = {
            key: statistics.median(r[key] for r in results)
            for key in results[0]
            if key not in ("tokens", "c_during")
        }
        during = [
            gap for r in results for gap in r["c_during"]
        ]  # every round's, pooled: a short A may hold none
        c_during = (
            f"{statistics.median(during) * 1e3:.0f} / {max(during) * 1e3:.0f} ({len(during)} gaps)"
            if during
            else "none: no token of C's ended during A's prefill"
        )
        rows.append(
            [
                way,
                f"{m['a_alone']:.2f}",
                f"{m['b_alone']:.2f}",
                f"{m['b_beside']:.2f}",
                f"{m['b_beside'] - m['b_alone']:.2f}",
                f"{m['a_beside']:.2f}",
                f"{m['c_alone_gap'] * 1e3:.0f}",
                c_during,
            ]
        )
    table = markdown_table(header, rows)
    notes = (
        f"{args.model}, 2 servers per swarm, both swarms up at once and measured in turn, {args.rounds} rounds, "
        f"medians. A: a {args.long}-token prompt, B: {args.short} tokens (starting a quarter of A's lone time "
        f"after A), C: {args.decode_tokens} greedy tokens after 6, decoding throughout; each a client process. "
        f"Every generate's tokens equal across rounds and ways: {stable}. Server flags: "
        f"{' '.join(args.server_args) or 'defaults'}."
    )
    print(table)
    print(notes)
    if not args.no_record:
        append_results("A long prompt beside other users: chunked prefill against one piece", table, notes)


if __name__ == "__main__":
    main()
