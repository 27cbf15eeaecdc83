"""Brute force over every placement: the oracle the balancing tests check the pure functions against."""

from __future__ import annotations

import itertools
import random

from swarmllm.balancing import swarm_bottleneck


def best_bottleneck(num_blocks: int, servers: list[tuple[int, float]]) -> float:
    """The largest bottleneck over all start positions of all servers."""
    starts = [range(num_blocks - length + 1) for length, _ in servers]
    return max(
        swarm_bottleneck(num_blocks, [(s, s + length, t) for s, (length, t) in zip(choice, servers)])
        for choice in itertools.product(*starts)
    )


def random_swarm(seed: int) -> tuple[int, list[tuple[int, int, float]]]:
    """2-5 servers over 4-8 blocks, at random starts, with throughputs over 10x (some equal, to make ties)."""
    rng = random.Random(seed)
    num_blocks = rng.randint(4, 8)
    spans = []
    for _ in range(rng.randint(2, 5)):
        length = rng.randint(1, num_blocks - 1)
        start = rng.randint(0, num_blocks - length)
        spans.append((start, start + length, rng.choice([1.0, 2.0, 3.0, round(rng.uniform(1, 10), 2)])))
    return num_blocks, spans
