"""A session whose opening failed opens again on its next step: it never answers a step without servers."""

import pytest
import torch

from swarmllm.client.routing import MissingBlocksError
from swarmllm.client.session import InferenceSession
from swarmllm.client.swarm import SwarmClient


async def test_a_failed_opening_is_retried_not_skipped():
    swarm = SwarmClient([], "nobody-serves-this", 2, missing_blocks_timeout_s=0)
    swarm.use_servers([])
    session = InferenceSession(swarm, max_length=8)
    for _ in range(2):  # before the fix, the second step returned its input unchanged
        with pytest.raises(MissingBlocksError, match="0..1 of 2"):
            await session.step(torch.randn(1, 2, 8))
    assert session.position == 0
    await swarm.shutdown()
