"""The pure parts of spot checks: tolerances, the comparison, the vote, the odds; and routing by measured speed."""

import random

import pytest
import torch

from swarmllm.client.health import Speeds
from swarmllm.client.routing import MIN_UNMEASURED_SHARE, cap_throughput, route_inference
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
    # the unmeasured one is taken at the share its measured replica delivers, but the boaster's shortfall is its
    # own past half: it makes the honest one look at most half as fast
    assert capped[1].inference_rps == 100.0 * MIN_UNMEASURED_SHARE and capped[1].forward_rps == 100.0
    assert [h.peer_id for h in route_inference(capped, 4, {})] == ["honest"]
    # a hop's deadline caps a measured server the same way, without copying the server list; an unmeasured one's
    # is by its announced speed (the tighter deadline)
    for kind, announced in (("inference", 1e30), ("forward", 1e30)):
        assert speeds.capped("boaster", kind, announced) == capped[0].model_dump()[f"{kind}_rps"]
        assert speeds.capped("honest", kind, 100.0) == 100.0


def test_an_unmeasured_replica_is_discounted_by_what_a_measured_one_delivers():
    """A used replica is measured with the client's own overheads (its loop, the wire), which an unused one's
    announced speed lacks: both are compared as delivering the same share of what they announce, the best
    measured share, so the used one (which may keep a conversation's beginning) is not left for a replica of
    the same speed. (Without the share the unused one looked 1.25x faster and took the session.)"""
    servers = [info("used", 0, 4, 100.0), info("unused", 0, 4, 100.0), info("slow", 0, 4, 100.0)]
    speeds = Speeds()
    speeds.observe("used", "inference", 80.0)
    speeds.observe("slow", "inference", 20.0)
    speeds.observe("used", "forward", 60.0)
    capped = cap_throughput(servers, speeds.measured("inference"), speeds.measured("forward"))
    assert [(s.inference_rps, s.forward_rps) for s in capped] == [(80.0, 60.0), (80.0, 60.0), (20.0, 60.0)]
    # the used one a little nearer: it keeps the session (the unused one, at its announced speed, took it)
    rtt = {"used": 0.001, "unused": 0.0011, "slow": 0.0}
    assert [h.peer_id for h in route_inference(capped, 4, rtt)] == ["used"]
    # nothing measured: announced speeds as they are
    assert cap_throughput(servers, {}, {}) == servers


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
