"""What one abusive client costs an honest one: an honest client's decode steps/s through a real local swarm of
1 server (tiny checkpoint), alone and while an abusive client, a separate process with its own identity, opens
hundreds of sessions and floods the server with `forward` calls at 10x its request rate limit.

    python benchmarks/abuse.py                          # default server limits
    python benchmarks/abuse.py --sessions 300 --rate-factor 10 --forward-tokens 128
    python benchmarks/abuse.py --server-src /tmp/base/src   # servers from another source tree (e.g. before quotas)

The abuser talks to the server's direct address: it opens `--sessions` sessions at once (each prefilled with one
token, and held), then sends forward calls of `--forward-tokens` tokens at `--rate-factor` x the server's
`peer_rate_per_s`, without waiting for replies (up to 4096 in flight), and counts the answers by code. The cost is
1 - (honest steps/s under abuse) / (honest steps/s alone), the median over `--rounds` pairs of generates
(alone, then under abuse: the machine's other load hits both alike).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from common import PROMPT, append_results, checkpoint, cpu_s, markdown_table


async def abuse(address: str, sessions: int, rate_per_s: float, forward_tokens: int, hidden: int) -> None:
    """The abusive client: runs until stdin closes, then prints what the server answered, as JSON."""
    from swarmllm.wire import Identity, Message, RemoteError, connect_direct

    host, port = address.rsplit(":", 1)
    conn = await connect_direct(host, int(port), Identity.generate(), expected_peer_id=None)
    counts: collections.Counter[str] = collections.Counter()

    async def hold_session() -> None:
        opening = {"start": 0, "end": 1, "batch_size": 1, "max_length": 64}
        try:
            stream = await conn.open_stream("inference", Message(opening))
            await stream.send(Message({"position": 0}, [torch.randn(1, 1, hidden)]))
            await stream.recv()
            counts["session opened"] += 1
        except RemoteError as e:
            counts[f"session refused: {e.code}"] += 1

    await asyncio.gather(*(hold_session() for _ in range(sessions)))
    print("ready", flush=True)

    forward = Message({"start": 0, "end": 1}, [torch.randn(1, forward_tokens, hidden)])
    in_flight: set[asyncio.Task] = set()

    async def call() -> None:
        try:
            await conn.call("forward", forward)
            counts["forward done"] += 1
        except RemoteError as e:
            counts[f"forward refused: {e.code}"] += 1

    # stdin: "on" starts flooding, "off" pauses it (and answers "off" once nothing is in flight), EOF stops
    commands: asyncio.Queue[str] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    loop.add_reader(sys.stdin, lambda: commands.put_nowait(sys.stdin.readline().strip() or "stop"))
    flooding_s, sent = 0.0, 0
    while await commands.get() == "on":
        began, due_sent = time.perf_counter(), sent
        while commands.empty():
            due = due_sent + int((time.perf_counter() - began) * rate_per_s)
            while sent < due and len(in_flight) < 4096:
                task = asyncio.ensure_future(call())
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
            await asyncio.sleep(1 / rate_per_s)
        flooding_s += time.perf_counter() - began
        if await commands.get() != "off":
            break
        await asyncio.gather(*in_flight)
        print("off", flush=True)
    for task in in_flight:
        task.cancel()
    print(json.dumps({"sent_per_s": sent / max(flooding_s, 1e-9), **counts}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sessions", type=int, default=300, help="sessions the abuser opens")
    parser.add_argument(
        "--rate-factor", type=float, default=10.0, help="abuser's calls/s over the rate limit"
    )
    parser.add_argument("--forward-tokens", type=int, default=128, help="tokens per abusive forward call")
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens per honest generate")
    parser.add_argument("--rounds", type=int, default=10, help="honest generates per phase")
    parser.add_argument("--server-src", help="run the server from this source tree (default: this one)")
    parser.add_argument("--server-args", default="", help="extra `swarmllm serve` flags")
    parser.add_argument("--no-record", action="store_true")
    parser.add_argument("--abuser", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.abuser:
        # in a real swarm the abuser burns its own machine's CPU, not the server's or the honest client's: here
        # it runs at the lowest priority, so what it costs is mostly what the server lets it cost
        os.nice(19)
        address, sessions, rate, tokens, hidden = args.abuser
        return asyncio.run(abuse(address, int(sessions), float(rate), int(tokens), int(hidden)))

    from transformers import AutoConfig

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.local import LocalSwarm
    from swarmllm.server.handler import ServerLimits

    path = checkpoint("tiny")
    config = AutoConfig.from_pretrained(path)
    limits = ServerLimits()
    rate = args.rate_factor * limits.peer_rate_per_s
    prompt = torch.tensor(PROMPT)
    env = dict(os.environ)
    if args.server_src:
        os.environ["PYTHONPATH"] = (
            args.server_src
        )  # the server processes inherit it; this one keeps its modules

    failures: list[str] = []

    server_cpu: dict[str, list[float]] = {"alone": [], "attacked": []}

    def honest_steps(remote, phase: str) -> float:
        """Steps/s of one generate; 0 when the swarm refused it (e.g. the abuser holds the whole cache)."""
        pid = swarm.servers[0].proc.pid
        began, cpu_began = time.perf_counter(), cpu_s(pid)
        try:
            remote.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
        except Exception as e:  # noqa: BLE001 - the outcome being measured, reported in the table
            failures.append(f"{type(e).__name__}: {str(e).splitlines()[-1]}")
            return 0.0
        took = time.perf_counter() - began
        server_cpu[phase].append((cpu_s(pid) - cpu_began) / took)
        return args.new_tokens / took

    def tell(command: str) -> None:
        abuser.stdin.write(command + "\n")
        abuser.stdin.flush()

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        record = swarm.add_server(str(path), (0, config.num_hidden_layers), extra=args.server_args.split())
        os.environ.clear()
        os.environ.update(env)
        # a refused honest client gives up after 2 s instead of waiting a minute for another server
        remote = AutoDistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, missing_blocks_timeout_s=2
        )
        with torch.no_grad():
            want = remote.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False)
            alone, attacked = [], []
            abuser = subprocess.Popen(
                [
                    sys.executable,
                    __file__,
                    "--abuser",
                    record["direct"],
                    str(args.sessions),
                    str(rate),
                    str(args.forward_tokens),
                    str(config.hidden_size),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            try:
                if abuser.stdout.readline().strip() != "ready":
                    raise RuntimeError("the abuser did not start")
                # alternate: the machine's other load hits both phases alike
                for _ in range(args.rounds):
                    alone.append(honest_steps(remote, "alone"))
                    tell("on")
                    attacked.append(honest_steps(remote, "attacked"))
                    tell("off")
                    if abuser.stdout.readline().strip() != "off":
                        raise RuntimeError("the abuser did not pause")
            finally:
                abuser.stdin.close()
                report = json.loads(abuser.stdout.readline() or "{}")
                abuser.wait()
            try:
                tokens_equal = (
                    remote.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False).tolist()
                    == want.tolist()
                )
            except Exception:  # noqa: BLE001 - reported as unequal
                tokens_equal = False
        remote.shutdown()
    cost = 1 - statistics.median(b / a if a else 0.0 for a, b in zip(alone, attacked))  # refused: 100%
    answers = ", ".join(f"{k} {v}" for k, v in sorted(report.items()) if k != "sent_per_s")
    table = markdown_table(
        [
            "server",
            "abuser sessions",
            "abuser forward calls/s (limit)",
            "honest steps/s alone",
            "under abuse",
            "cost (median of pairs)",
            "server CPU cores alone / under abuse",
            "tokens equal",
        ],
        [
            [
                args.server_src or "this tree",
                args.sessions,
                f"{report.get('sent_per_s', 0):.0f} ({limits.peer_rate_per_s:g})",
                f"{statistics.median(alone):.1f}",
                f"{statistics.median(attacked):.1f}",
                f"{cost:.1%}",
                " / ".join(
                    f"{statistics.median(server_cpu[p]):.2f}" if server_cpu[p] else "-"
                    for p in ("alone", "attacked")
                ),
                tokens_equal,
            ]
        ],
    )
    print(table)
    print("abuser's answers:", answers)
    failed = f" The honest client failed {len(failures)} times: {failures[0]}" if failures else ""
    print(failed)
    if not args.no_record:
        append_results(
            "One abusive client against an honest one (1 server, tiny model)",
            table,
            f"Honest: {args.rounds} pairs of greedy generates of {args.new_tokens} tokens, one alone, one while "
            f"the abuser (another process, its own identity, on this machine) sends {args.forward_tokens}-token "
            f"forward calls; the abuser holds its sessions throughout. Cost: 1 - median of the pairs' "
            f"ratios. Abuser's answers: {answers}.{failed}",
        )


if __name__ == "__main__":
    main()
