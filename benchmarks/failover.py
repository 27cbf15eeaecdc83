"""The cost of one server failure in an inference session, with the client's default settings.

A local swarm of 4 server processes (tiny 6-layer Llama; blocks [0, 3) and [3, 6), each span on 2 servers, 1 CPU
thread each). For each session length, a fresh client (default options: no step-timeout override) generates
greedily once fault-free and once with the server of one hop of its chain (the first or the last) failing at the
middle step: (a) SIGKILL (the connection breaks), (b) SIGSTOP (the server hangs with its sockets open). Beside the
extra seconds over the fault-free run: routing (`route_s`) and replay (`replay_s`) from the client's
failover record, and detection (the wait for the token after the fault less route and replay: noticing the
failure, for a hang about the step deadline, and the step itself; measured inside that wait, so never below 0), set
against the fault-free length of the session. Between runs the failed server is restored (restarted with its
identity, so the same peer id, or resumed) and must answer with its whole cache free.

    python benchmarks/failover.py [--lengths 16 64 256] [--repeats 5] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import PROMPT, append_results, markdown_table
from transformers.generation.streamers import BaseStreamer
from transformers.utils import logging as hf_logging

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.local import LocalSwarm
from swarmllm.models.tiny import make_tiny_checkpoint
from swarmllm.wire import Message

SPANS = [(0, 3), (3, 6), (0, 3), (3, 6)]
CACHE_BUDGET = 16384  # the servers' default --max-cache-tokens
HEALTHY_TIMEOUT_S = 60.0


class _AtStep(BaseStreamer):
    """Calls `fault()` once, after `step` generated tokens (inside generate, between two steps)."""

    def __init__(self, step: int, fault):
        self.step, self.fault, self.count = step, fault, -1
        self.fault_at: float | None = None
        self.next_token_at: float | None = None  # the first token after the fault

    def put(self, value) -> None:
        self.count += 1
        if self.count == self.step:
            self.fault_at = time.perf_counter()
            self.fault()
        elif self.count == self.step + 1:
            self.next_token_at = time.perf_counter()

    def end(self) -> None:
        pass


class Bench:
    def __init__(self, root: Path):
        # no EOS, so every run generates all its tokens; positions beyond the longest session
        self.path = make_tiny_checkpoint(
            root / "llama", "llama", num_layers=6, eos_token_id=None, max_position_embeddings=1024
        )
        self.swarm = LocalSwarm()
        self.swarm.start_bootstrap()
        records = []
        for i, span in enumerate(SPANS):  # each with a key file: a restarted server keeps its peer id
            identity = ["--identity", str(root / f"server{i}.key")]
            records.append(self.swarm.add_server(str(self.path), span, extra=identity))
        self.peer_ids = [r["peer_id"] for r in records]

    def close(self) -> None:
        self.swarm.close()

    def client(self):
        return AutoDistributedModelForCausalLM.from_pretrained(
            str(self.path), initial_peers=self.swarm.initial_peers
        )

    def run(self, fault: str, hop: int, new_tokens: int) -> dict:
        """One repeat: a fresh client (no bans from earlier runs), a warm-up, a fault-free run, a faulted run."""
        model = self.client()
        prompt = torch.tensor(PROMPT)
        victim: list[int] = []
        try:
            model.generate(prompt, max_new_tokens=4, do_sample=False)  # connections and pings
            began = time.perf_counter()
            clean = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
            clean_s = time.perf_counter() - began

            with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:

                def inject() -> None:
                    index = self.peer_ids.index(session.session.hops[hop].peer_id)
                    victim.append(index)
                    server = self.swarm.servers[index]
                    server.kill() if fault == "kill" else server.pause()

                streamer = _AtStep(new_tokens // 2, inject)
                began = time.perf_counter()
                faulted = model.generate(
                    prompt, max_new_tokens=new_tokens, do_sample=False, streamer=streamer
                )
                faulted_s = time.perf_counter() - began
                failovers = list(session.session.failovers)
        finally:
            model.shutdown()
            self.restore(victim)
        route_s = sum(f.route_s for f in failovers)
        replay_s = sum(f.replay_s for f in failovers)
        extra_s = faulted_s - clean_s
        # the wait for the token after the fault holds the detection, the route, the replay and that step
        waited_s = streamer.next_token_at - streamer.fault_at
        return dict(
            clean_s=clean_s,
            extra_s=extra_s,
            detect_s=waited_s - route_s - replay_s,
            route_s=route_s,
            replay_s=replay_s,
            replayed=sum(f.replayed_tokens for f in failovers),
            failovers=len(failovers),
            equal=faulted.tolist() == clean.tolist(),
            reasons=[f.reason for f in failovers],
        )

    def restore(self, victims: list[int]) -> None:
        for index in victims:
            server = self.swarm.servers[index]
            if server.proc.poll() is None:
                server.resume()
            else:
                self.peer_ids[index] = self.swarm.restart_server(index)["peer_id"]
        self.wait_healthy()

    def wait_healthy(self) -> None:
        """Poll until every server answers `info` with its whole cache free (no session left behind)."""
        model = self.client()
        try:
            run_sync(model.swarm.servers(refresh=True))
            deadline = time.monotonic() + HEALTHY_TIMEOUT_S
            while True:
                free = {}
                for peer_id in self.peer_ids:
                    try:
                        conn = run_sync(model.swarm.connection(peer_id), timeout=10)
                        reply = run_sync(conn.call("info", Message(), timeout=5), timeout=10)
                        free[peer_id[-8:]] = int(reply.meta["cache_tokens_left"])
                    except Exception as e:  # noqa: BLE001 - not back yet; polled until the deadline
                        free[peer_id[-8:]] = type(e).__name__
                if all(v == CACHE_BUDGET for v in free.values()):
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"servers not healthy after a run: {free}")
                time.sleep(0.5)  # polling interval of a condition with a deadline
        finally:
            model.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256], help="generated tokens")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--faults", nargs="+", default=["kill", "pause"], choices=["kill", "pause"])
    parser.add_argument("--no-record", action="store_true", help="print only, don't append to RESULTS.md")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        try:
            for fault in args.faults:
                for hop, hop_name in ((0, "first"), (-1, "last")):
                    for length in args.lengths:
                        runs = [bench.run(fault, hop, length) for _ in range(args.repeats)]

                        def med(key: str, runs=runs) -> float:
                            return statistics.median(r[key] for r in runs)

                        row = [
                            {"kill": "SIGKILL", "pause": "SIGSTOP"}[fault],
                            hop_name,
                            length,
                            f"{med('clean_s'):.3f}",
                            f"{med('extra_s'):.3f}",
                            f"{med('detect_s'):.3f}",
                            f"{med('route_s'):.3f}",
                            f"{med('replay_s'):.3f}",
                            f"{med('replayed'):.0f}",
                            f"{med('extra_s') / med('clean_s'):.1f}x",
                            "/".join(str(r["failovers"]) for r in runs),
                            all(r["equal"] for r in runs),
                        ]
                        rows.append(row)
                        print(" | ".join(str(c) for c in row), "|", runs[0]["reasons"], flush=True)
        finally:
            bench.close()

    header = [
        "fault",
        "failed hop",
        "new tokens",
        "fault-free s",
        "extra s",
        "detection s",
        "route s",
        "replay s",
        "replayed tokens",
        "extra / fault-free",
        "failovers per run",
        "tokens equal",
    ]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        append_results(
            "Cost of one server failure in an inference session (default client settings)",
            table,
            f"Medians of {args.repeats} repeats, each with a fresh client: a fault-free greedy generate, then the "
            "same with the server of the first or last hop failing after half the tokens. 4 server processes "
            "(tiny 6-layer llama, blocks [0, 3) and [3, 6) on 2 servers each, 1 thread each), 6-token prompt. "
            "Extra: faulted minus fault-free seconds of the same repeat; route and replay from the client's "
            "failover record; detection: the wait for the next token after the fault, less route and replay. Tokens equal: the faulted run's tokens equal the fault-free "
            "run's.",
        )


if __name__ == "__main__":
    main()
