"""How long torch's OpenMP workers spin after a parallel region before they sleep (libgomp's `GOMP_SPINCOUNT`).

libgomp reads the count once, as torch loads, and spins 300,000 rounds by default: milliseconds in which a core
does nothing for anyone else on the host. A server runs many short regions back to back in each step, so it keeps
a short spin (answering a flood of small calls, it used 0.20-0.24 of a core instead of 0.56-0.61;
benchmarks/omp_spin.py). A client runs a few regions a token and then waits for the swarm: its spinning worker
took a core from the servers that compute that token on the same host, so a client does not spin (a 6-server
chain of the tiny model: 11.9 ms a token with libgomp's default, 7.9-10.1 without a spin; RESULTS.md, session 49).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

SERVER = "30000"
CLIENT = "0"
_chosen: str | None = None  # the count `choose` put into this process's environment: not an operator's


def spincount(command: str) -> str:
    """The count for a `swarmllm` command: `serve`, and `api`, whose steps compute the LM head of many requests at
    once, regions back to back as a server's (8 medium requests: 76.4 tokens/s without a spin, 78.3 with 30,000;
    RESULTS.md, session 49), spin briefly; every other command is a lone client of the swarm or does no torch work
    (`dht`, `monitor`)."""
    return SERVER if command in ("serve", "api") else CLIENT


def choose(count: str) -> None:
    """Take `count` for this process if torch has not loaded yet; an operator's `GOMP_SPINCOUNT` wins."""
    global _chosen
    if "torch" not in sys.modules and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = _chosen = count


def for_command(command: str, env: Mapping[str, str]) -> dict[str, str]:
    """`env` for a child `swarmllm COMMAND`, with that command's count unless an operator chose one: a client
    (the demo, a test) that starts servers passes on its environment, in which `choose` put a client's count."""
    count = env.get("GOMP_SPINCOUNT")
    if count is None or count == _chosen:
        count = spincount(command)
    return {**env, "GOMP_SPINCOUNT": count}
