"""The pure parts of spot checks: tolerances, the comparison, the vote, the odds; and routing by measured speed."""

import random

import pytest
import torch

from swarmllm.client.health import Speeds
from swarmllm.client.routing import cap_throughput, route_inference
from swarmllm.client.verify import (
    Gradients,
    detection_odds,
    judge,
    mismatch,
    should_check,
    steps_to_catch,
    tolerance,
)
from swarmllm.dht import ServerInfo, ServerState


def test_tolerance_is_the_coarsest_dtypes():
    assert tolerance(["float32", "float32"]) < tolerance(["float32", "float16"]) < tolerance(["bfloat16"])
    assert tolerance(["float32", "something new"]) == tolerance(["bfloat16"])


def test_mismatch_is_relative_per_token():
    a = torch.randn(2, 3, 16)
    assert mismatch(a, a.clone()) == 0.0
    b = a.clone()
    b[1, 2] *= 1.1  # one token 10% off, however large the others are
    assert abs(mismatch(a, b) - 0.1 / 1.1) < 1e-5
    assert abs(mismatch(a * 1000, b * 1000) - mismatch(a, b)) < 1e-6
    assert mismatch(a, a[:, :2]) == float("inf")


def test_judge_bans_the_minority_or_everyone_when_undecided():
    x = torch.randn(1, 1, 8)
    noise = torch.randn(1, 1, 8)
    assert judge([x, x + 1e-6 * noise], 1e-3) == []
    assert judge([x, x + noise], 1e-3) == [0, 1]  # two opinions that disagree: nobody can be trusted
    assert judge([x + noise, x, x], 1e-3) == [0]  # the checked server is outvoted
    assert judge([x, x + noise, x], 1e-3) == [1]  # its first checker is
    assert judge([x, x + noise, x - noise], 1e-3) == [0, 1, 2]


def test_seeded_detection_matches_the_odds():
    runs = 2000
    caught = sum(steps_to_catch(random.Random(s), 0.05, None, 0.05, 2000) is not None for s in range(runs))
    odds = detection_odds(0.05, 0.05, 2000)
    assert abs(caught / runs - odds) < 0.01
    assert (
        steps_to_catch(random.Random(0), 0.05, [False], 1.0, 1000) is None
    )  # an honest server is never caught
    assert not any(should_check(random.Random(s), 0.0) for s in range(100))


def info(peer_id, start, end, rps):
    return ServerInfo(
        peer_id=peer_id,
        state=ServerState.ONLINE,
        start_block=start,
        end_block=end,
        throughput=rps,
        inference_rps=rps,
        forward_rps=rps,
        cache_tokens_left=10_000,
        version="test",
        dtype="float32",
    )


def test_a_server_announcing_absurd_speed_is_routed_by_its_measured_one():
    """(An infinite speed is refused with the record: `dht.info`.)"""
    servers = [info("boaster", 0, 4, 1e30), info("honest", 0, 4, 100.0)]
    assert [h.peer_id for h in route_inference(servers, 4, {})] == ["boaster"]
    speeds = Speeds()
    for rate in (10.0, 12.0, 1e6):  # the median resists one outlier
        speeds.observe("boaster", "inference", rate)
    capped = cap_throughput(servers, speeds.measured("inference"), speeds.measured("forward"))
    assert capped[0].inference_rps == 12.0 and capped[0].forward_rps == 1e30
    assert capped[1] is servers[1]
    assert [h.peer_id for h in route_inference(capped, 4, {})] == ["honest"]
    # a hop's deadline caps one server the same way, without copying the server list
    for s in servers:
        for kind, announced in (("inference", s.inference_rps), ("forward", s.forward_rps)):
            want = next(c for c in capped if c.peer_id == s.peer_id).model_dump()[f"{kind}_rps"]
            assert speeds.capped(s.peer_id, kind, announced) == want


def test_gradient_opinions_differ_by_their_worst_part():
    """A backward's opinion: the input gradient per token, the prompts' and the adapter's as wholes; opinions
    that do not cover the same tensors never agree."""
    generator = torch.Generator().manual_seed(3)
    hidden, prompts = torch.randn(2, 3, 8, generator=generator), torch.randn(2, 1, 2, 8, generator=generator)
    lora = {"0.q_proj.lora_A": torch.randn(4, 8, generator=generator), "1.q_proj.lora_B": torch.randn(8, 4)}
    base = Gradients(hidden, prompts, lora)
    assert Gradients.distance(base, Gradients(hidden.clone(), prompts.clone(), dict(lora))) == 0
    off = {**lora, "1.q_proj.lora_B": lora["1.q_proj.lora_B"] * 1.1}
    whole = torch.cat([t.flatten() for _, t in sorted(lora.items())])
    want = float((whole - torch.cat([t.flatten() for _, t in sorted(off.items())])).norm() / whole.norm())
    got = Gradients.distance(base, Gradients(hidden, prompts, off))
    assert 0 < got and got == pytest.approx(want, rel=0.2)
    token = hidden.clone()
    token[1, 2] *= 2  # one token's gradient doubled: its own distance, 0.5, however small the rest
    assert Gradients.distance(base, Gradients(token, prompts, lora)) == pytest.approx(0.5)
    assert Gradients.distance(base, Gradients(hidden, None, lora)) == float("inf")
    assert Gradients.distance(
        base, Gradients(hidden, prompts, {"0.q_proj.lora_A": lora["0.q_proj.lora_A"]})
    ) == float("inf")
    assert judge([base, Gradients(hidden, prompts, off), base], 1e-3, Gradients.distance) == [1]
