"""The monitor's state document and its Prometheus text, from plain records (no network)."""

from prometheus_client.parser import text_string_to_metric_families

from swarmllm.dht import ModelInfo, ServerInfo, ServerState
from swarmllm.monitor.metrics import metrics_text
from swarmllm.monitor.state import block_ranges, dht_status, swarm_state

MODEL = ModelInfo(dht_prefix="m", num_blocks=6, repository="org/m")


def info(peer: str, start: int, end: int, state=ServerState.ONLINE, throughput=10.0, **extra) -> ServerInfo:
    return ServerInfo(
        peer_id=peer,
        state=state,
        start_block=start,
        end_block=end,
        throughput=throughput,
        inference_rps=throughput,
        forward_rps=100.0,
        cache_tokens_left=512,
        version="0.1.0",
        dtype="float32",
        **extra,
    )


def test_block_ranges():
    assert block_ranges([]) == "" and block_ranges([3]) == "3"
    assert block_ranges([0, 1, 2, 4, 6, 7]) == "0..2, 4, 6..7"


def test_verdict_counts_only_servers_that_are_online_and_answer():
    servers = [
        info("a", 0, 3),
        info("b", 3, 6, throughput=4.0),
        info("c", 0, 6, state=ServerState.JOINING),
        info("d", 3, 5, state=ServerState.OFFLINE),
        info("e", 2, 4),  # announces online, does not answer
    ]
    rtt = {"a": 0.001, "b": 0.002, "c": 0.003, "e": None}
    state = swarm_state([MODEL], {"m": servers}, rtt, dht=dht_status("ok", 0.05), updated_at=100.0)
    (model,) = state["models"]
    assert model["verdict"] == "healthy" and model["missing_blocks"] == []
    assert model["servers"] == {"online": 2, "joining": 1, "offline": 1, "unreachable": 1}
    assert [b["throughput_tps"] for b in model["blocks"]] == [10, 10, 10, 4, 4, 4]
    assert model["bottleneck_tps"] == 4
    holders = {s["peer_id"]: s["state"] for s in model["blocks"][3]["servers"]}
    assert holders == {"b": "online", "c": "joining", "d": "offline", "e": "unreachable"}
    assert model["history"] == [{"t": 100.0, "online": 2, "bottleneck_tps": 4}]
    rows = {r["peer_id"]: r for r in state["servers"]}
    assert rows["e"]["state"] == "unreachable" and rows["e"]["announced_state"] == "online"
    assert rows["e"]["rtt_ms"] is None and rows["a"]["rtt_ms"] == 1.0

    without_b = swarm_state([MODEL], {"m": servers}, {**rtt, "b": None}, updated_at=101.0)
    assert without_b["models"][0]["verdict"] == "broken"
    assert (
        without_b["models"][0]["missing_blocks"] == [3, 4, 5] and without_b["models"][0]["missing"] == "3..5"
    )


def test_connection_kinds_and_history_carried_over():
    servers = [
        info("a", 0, 6, direct_addrs=("127.0.0.1:1",)),
        info("r", 0, 6, using_relay=True),
        info("p", 0, 6),
    ]
    earlier = {"m": [{"t": 1.0, "online": 1, "bottleneck_tps": 10.0}]}
    state = swarm_state(
        [MODEL], {"m": servers}, {"a": 0.1, "r": 0.1, "p": 0.1}, history=earlier, updated_at=2.0
    )
    assert {r["peer_id"]: r["connection"] for r in state["servers"]} == {
        "a": "direct",
        "r": "relayed",
        "p": "libp2p",
    }
    assert [p["t"] for p in state["models"][0]["history"]] == [1.0, 2.0]


def test_empty_and_slow_dht_still_make_a_document():
    empty = swarm_state([], {}, {}, dht=dht_status("empty", 0.01))
    assert empty["models"] == [] and empty["servers"] == [] and "no model" in empty["dht"]["message"]
    assert "timed out" in dht_status("slow", None, 3)["message"]


def test_metrics_text_parses_and_matches_the_state():
    servers = [info("a", 0, 3, public_name="alice"), info("b", 3, 6)]
    state = swarm_state([MODEL], {"m": servers}, {"a": 0.002, "b": None}, dht=dht_status("ok", 0.05, 2))
    samples = {}
    for family in text_string_to_metric_families(metrics_text(state).decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    assert samples[("swarmllm_model_servers", (("model", "m"), ("state", "online")))] == 1
    assert samples[("swarmllm_model_servers", (("model", "m"), ("state", "unreachable")))] == 1
    assert samples[("swarmllm_model_healthy", (("model", "m"),))] == 0
    assert samples[("swarmllm_model_missing_blocks", (("model", "m"),))] == 3
    assert samples[("swarmllm_block_throughput_steps_per_second", (("block", "0"), ("model", "m")))] == 10
    assert samples[("swarmllm_block_servers", (("block", "4"), ("model", "m")))] == 0
    alice = (("model", "m"), ("peer_id", "a"), ("public_name", "alice"))
    assert samples[("swarmllm_server_rtt_seconds", alice)] == 0.002
    assert samples[("swarmllm_server_cache_free_tokens", alice)] == 512
    assert (
        "swarmllm_server_rtt_seconds",
        (("model", "m"), ("peer_id", "b"), ("public_name", "")),
    ) not in samples
    assert samples[("swarmllm_dht_lookup_duration_seconds", ())] == 0.05
    assert samples[("swarmllm_dht_lookup_failures_total", ())] == 2


def test_a_model_whose_blocks_only_other_checkpoints_complete_is_broken():
    """Servers of two checkpoints under one name (`ServerInfo.fingerprint`; clients chain only one of them): X
    holds blocks 0..2 and Y 3..5, so no client can route, and the verdict says broken, with the blocks the best
    checkpoint lacks; a record without a fingerprint (an older server, 0..1) counts with either: Y with it lacks
    block 2 alone."""
    x, y = "a" * 16, "b" * 16
    servers = [info("x", 0, 3, fingerprint=x), info("y", 3, 6, fingerprint=y), info("old", 0, 2)]
    rtt = dict.fromkeys(("x", "y", "old"), 0.01)
    (model,) = swarm_state([MODEL], {"m": servers}, rtt)["models"]
    assert model["verdict"] == "broken" and model["missing_blocks"] == [2]
    assert model["checkpoints"] == [x, y]
    assert model["bottleneck_tps"] == 0.0  # what a client of X (or of Y) can get: some block has none
    servers.append(info("x2", 3, 6, fingerprint=x, throughput=4.0))
    rtt["x2"] = 0.01
    (model,) = swarm_state([MODEL], {"m": servers}, rtt)["models"]
    assert model["verdict"] == "healthy" and model["missing_blocks"] == [] and model["bottleneck_tps"] == 4.0
    # two hub commits of X (one fingerprint) are two checkpoints too: X at commit 1 lacks what only commit 2 holds
    servers = [
        info("x", 0, 3, fingerprint=x, commit="1" * 40),
        info("x2", 3, 6, fingerprint=x, commit="2" * 40),
    ]
    (model,) = swarm_state([MODEL], {"m": servers}, rtt)["models"]
    assert model["verdict"] == "broken" and model["missing_blocks"] in ([0, 1, 2], [3, 4, 5])
