"""Where servers should sit in the swarm: pure functions, no networking."""

from swarmllm.balancing.blocks import block_throughputs, choose_blocks

__all__ = ["block_throughputs", "choose_blocks"]
