"""Seeded chaos schedules (see tests/chaos.py): servers killed, frozen, leaving and joining while a client
generates; every token must equal transformers' greedy output, and the swarm must come back whole.

A failure prints its seed and actions; replay it alone with `python tests/chaos.py --seed S`."""

import pytest
from chaos import NUM_LAYERS, Chaos

# the first seeds, plus schedules with two faults at once and with a server joining (see `plan`)
SEEDS = [*range(10), 13, 20, 36, 38]


@pytest.fixture(scope="module")
def chaos(checkpoints):
    path = checkpoints("llama", num_layers=NUM_LAYERS)
    with Chaos(path, step_timeout_s=2.0, missing_blocks_timeout_s=60.0) as harness:
        yield harness


@pytest.mark.parametrize("seed", SEEDS)
def test_chaos_schedule(chaos, seed):
    result = chaos.run_schedule(seed)
    recovery = "-" if result.recovery_s is None else f"{result.recovery_s:.2f} s"
    print(
        f"\nseed {seed}: {result.actions_text()} | failovers {len(result.failovers)} | recovery {recovery} | "
        f"wall {result.wall_s:.1f} s (quiesce {result.quiesce_s:.1f} s)"
    )
    assert result.ok, result.report()
