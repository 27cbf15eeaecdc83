"""Where servers should sit in the swarm, and when concurrent steps merge: pure functions, no networking."""

from swarmllm.balancing.blocks import (
    BlockLoad,
    block_throughputs,
    choose_blocks,
    choose_start,
    swarm_bottleneck,
)
from swarmllm.balancing.moves import DEFAULT_MIN_GAIN, DEFAULT_MIN_LIFT, petals_should_move, should_move
from swarmllm.balancing.optimum import bottleneck_upper_bound, optimal_bottleneck

__all__ = [
    "DEFAULT_MIN_GAIN",
    "DEFAULT_MIN_LIFT",
    "BlockLoad",
    "block_throughputs",
    "bottleneck_upper_bound",
    "choose_blocks",
    "choose_start",
    "optimal_bottleneck",
    "petals_should_move",
    "should_move",
    "swarm_bottleneck",
]
