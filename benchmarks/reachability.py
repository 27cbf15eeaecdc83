"""What a direct address nobody can dial costs a client, before and after the server's peers found it out.

Servers of the tiny model on loopback. The first announces its direct path at a port where a listener takes
connections and then answers nothing (as an address behind a NAT or a firewall that drops packets: a client waits
out its connect timeout there, 5 s, before it falls back to libp2p); alone, it has no peer to ask whether the
address works (`server/reachability.py`). A second, reachable server joins; a new client generates one token
while the dead address is still announced, and another once the first server asked its new peer (when that peer
asked it the same) and dropped the address: the time to that first token, the client's start (DHT, look-up) not counted. A third server, given a
dead address too, asks its peers before it comes online and never announces it: what that costs its start.

    python benchmarks/reachability.py [--repeats 3] [--no-record]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, checkpoint, markdown_table  # noqa: E402


def first_token_s(path: Path, peers: list[str], prompt: torch.Tensor) -> tuple[float, list[int]]:
    """A new client's time to its first token (after its start), and the tokens."""
    from swarmllm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=peers)
    try:
        began = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=1, do_sample=False)
        return time.perf_counter() - began, out[0].tolist()
    finally:
        model.shutdown()


def one_round(path: Path, prompt: torch.Tensor) -> tuple[float, float, float, float, float, bool]:
    """(first token with the dead address announced, when it was dropped after the first client's start, first
    token after that, a reachable and an unreachable server's start, tokens equal)."""
    from swarmllm.client.directory import Directory
    from swarmllm.client.loop import run_sync
    from swarmllm.dht.records import dht_prefix_for
    from swarmllm.local import LocalSwarm

    with LocalSwarm() as swarm, socket.socket() as hole:
        hole.bind(("127.0.0.1", 0))
        hole.listen(64)  # the kernel takes the connections; nobody ever answers on them
        dead = ["--announce-direct-port", str(hole.getsockname()[1])]
        swarm.start_bootstrap()
        # alone, it has nobody to ask: it announces the address, and asks the first peer that asks it (the next)
        first = swarm.add_server(str(path), (0, 3), extra=dead)
        swarm.add_server(str(path), (3, 6))
        began = time.monotonic()
        before, tokens = first_token_s(path, swarm.initial_peers, prompt)
        directory = Directory(swarm.initial_peers)
        run_sync(directory.start())
        try:
            while True:
                servers = run_sync(directory.servers(dht_prefix_for(str(path)), 6))
                if any(s.peer_id == first["peer_id"] and not s.direct_addrs for s in servers):
                    break
                if time.monotonic() - began > 60:
                    raise TimeoutError("the dead address was still announced after 60 s")
                time.sleep(0.1)
            dropped = time.monotonic() - began
        finally:
            run_sync(directory.shutdown())
        after, again = first_token_s(path, swarm.initial_peers, prompt)
        # (starts of the same span, after the first start of this shape on the host: warm caches)
        began = time.monotonic()
        swarm.add_server(str(path), (0, 3))
        reachable_start = time.monotonic() - began
        began = time.monotonic()
        swarm.add_server(
            str(path), (0, 3), extra=dead
        )  # it asks its peers first, never announcing the address
        unreachable_start = time.monotonic() - began
        return before, dropped, after, reachable_start, unreachable_start, tokens == again


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    path = checkpoint("tiny")
    prompt = torch.tensor([[1, 30, 40, 50, 60]])
    rounds = [one_round(path, prompt) for _ in range(args.repeats)]
    rows = [[i + 1, *(f"{v:.2f}" for v in r[:5]), r[5]] for i, r in enumerate(rounds)]
    rows.append(
        [
            "median",
            *(f"{statistics.median(r[k] for r in rounds):.2f}" for k in range(5)),
            all(r[5] for r in rounds),
        ]
    )
    header = [
        "round",
        "first token, dead address announced (s)",
        "address dropped, after that client's start (s)",
        "first token, address dropped (s)",
        "start of a reachable server (s)",
        "start of an unreachable one (s)",
        "same tokens",
    ]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        append_results(
            "A direct address nobody can dial: before and after the peers' check",
            table,
            "Tiny model on loopback. The first server announces its direct port at a listener that takes "
            "connections and answers nothing (alone, it has no peer to ask; it asks the first peer that asks it, "
            "and else again each 30 s announce period); a second, "
            "reachable server joins; a new client's first token (greedy, 5-token prompt, the client's start not "
            "counted) while the dead address is announced, and again once its peer's answer made the first server "
            "drop it; then a reachable server of the first one's blocks starts, and one with a dead address, which "
            "asks its peers before it comes online (`swarmllm serve` to its online line).",
        )


if __name__ == "__main__":
    main()
