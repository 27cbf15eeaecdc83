"""How fast this server's links are: round trip and upload bandwidth to a few peers, measured with `ping` calls
over the same connections that carry pushes (no outside service), and what that bandwidth means in hidden
states per second (`network_rps`), the figure balancing compares with the compute throughput."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import torch

from swarmllm.wire import Connection, Message, WireError

PING_MAX_BYTES = 4 * 2**20  # the largest payload a `ping` may carry (the handler refuses more)
PROBE_BYTES = 2**20
PROBES = 3  # per peer and payload size; the fastest counts (the others met queueing or scheduling noise)
PEERS = 3
TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LinkSpeed:
    rtt_s: float  # an empty ping's round trip
    bandwidth: float  # bytes/s upload: extra time a PROBE_BYTES ping takes over an empty one


async def measure_link(conn: Connection, probe_bytes: int = PROBE_BYTES) -> LinkSpeed:
    payload = torch.zeros(probe_bytes, dtype=torch.uint8)

    async def fastest(message: Message) -> float:
        times = []
        for _ in range(PROBES):
            began = time.perf_counter()
            await conn.call("ping", message)
            times.append(time.perf_counter() - began)
        return min(times)

    empty = await fastest(Message())
    full = await fastest(Message(tensors=[payload]))
    return LinkSpeed(rtt_s=empty, bandwidth=probe_bytes / max(full - empty, 1e-6))


async def measure_network(
    connect: Callable[[str], Awaitable[Connection]], peer_ids: Sequence[str]
) -> LinkSpeed | None:
    """The median round trip and bandwidth to the first `PEERS` of `peer_ids` that answer (of at most twice as
    many tried); None if none does."""
    speeds = []
    for peer_id in peer_ids[: 2 * PEERS]:
        try:
            async with asyncio.timeout(TIMEOUT_S):
                speeds.append(await measure_link(await connect(peer_id)))
        except (TimeoutError, WireError, OSError):
            continue
        if len(speeds) == PEERS:
            break
    if not speeds:
        return None
    return LinkSpeed(
        rtt_s=statistics.median(s.rtt_s for s in speeds),
        bandwidth=statistics.median(s.bandwidth for s in speeds),
    )


def network_rps(bandwidth: float, hidden_size: int, dtype_bytes: int) -> float:
    """Hidden states (one token's activations) per second that `bandwidth` bytes/s carry: what the link lets
    this server pass on, whatever its compute."""
    return bandwidth / (hidden_size * dtype_bytes)


def parse_bandwidth(mbit_s: float) -> float:
    """--bandwidth in Mbit/s (how ISPs state it) -> bytes/s."""
    if not 0 < mbit_s < float("inf"):
        raise ValueError(f"--bandwidth must be positive and finite, got {mbit_s}")
    return mbit_s * 1e6 / 8
