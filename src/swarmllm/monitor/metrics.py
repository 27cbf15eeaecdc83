"""The monitor's `/metrics`: the state document (`monitor.state`) in Prometheus' text format, so that the page,
the JSON and the metrics can never disagree. Names follow Prometheus' conventions (`swarmllm_` prefix, base
units, `model` / `block` / `peer_id` / `state` labels)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest

from swarmllm.monitor.state import STATES


def state_metrics(state: Mapping) -> Iterator[Metric]:
    servers = GaugeMetricFamily(
        "swarmllm_model_servers",
        "Servers of a model by state, as the monitor sees them",
        labels=["model", "state"],
    )
    healthy = GaugeMetricFamily(
        "swarmllm_model_healthy", "1 when every block of the model has an online server", labels=["model"]
    )
    missing = GaugeMetricFamily(
        "swarmllm_model_missing_blocks", "Blocks without an online server", labels=["model"]
    )
    bottleneck = GaugeMetricFamily(
        "swarmllm_model_bottleneck_steps_per_second",
        "The weakest block's total throughput (decode steps/s)",
        labels=["model"],
    )
    block_servers = GaugeMetricFamily(
        "swarmllm_block_servers", "Online servers holding a block", labels=["model", "block"]
    )
    block_throughput = GaugeMetricFamily(
        "swarmllm_block_throughput_steps_per_second",
        "Decode steps/s the online servers holding a block announce, summed",
        labels=["model", "block"],
    )
    for model in state["models"]:
        name = model["name"]
        for s in STATES:
            servers.add_metric([name, s], model["servers"][s])
        healthy.add_metric([name], 1.0 if model["verdict"] == "healthy" else 0.0)
        missing.add_metric([name], len(model["missing_blocks"]))
        bottleneck.add_metric([name], model["bottleneck_tps"])
        for block in model["blocks"]:
            online = sum(1 for s in block["servers"] if s["state"] == "online")
            block_servers.add_metric([name, str(block["index"])], online)
            block_throughput.add_metric([name, str(block["index"])], block["throughput_tps"])
    yield from (servers, healthy, missing, bottleneck, block_servers, block_throughput)

    labels = ["model", "peer_id", "public_name"]
    cache = GaugeMetricFamily(
        "swarmllm_server_cache_free_tokens", "Free KV-cache tokens a server announces", labels=labels
    )
    throughput = GaugeMetricFamily(
        "swarmllm_server_throughput_steps_per_second",
        "A server's announced decode steps/s per block",
        labels=labels,
    )
    busy = GaugeMetricFamily(
        "swarmllm_server_busy_rows",
        "Rows of a server's inference sessions that stepped in the last 30 s, as it announces",
        labels=labels,
    )
    rtt = GaugeMetricFamily(
        "swarmllm_server_rtt_seconds",
        "Round trip of the monitor's info call (absent: no answer)",
        labels=labels,
    )
    up = GaugeMetricFamily("swarmllm_server_up", "1 when the server answered the monitor", labels=labels)
    for row in state["servers"]:
        values = [row["model"], row["peer_id"], row["public_name"] or ""]
        cache.add_metric(values, row["cache_tokens_left"])
        throughput.add_metric(values, row["throughput"])
        busy.add_metric(values, row["busy_rows"])
        up.add_metric(values, 0.0 if row["rtt_ms"] is None else 1.0)
        if row["rtt_ms"] is not None:
            rtt.add_metric(values, row["rtt_ms"] / 1e3)
    yield from (cache, throughput, busy, rtt, up)

    dht = state["dht"]
    lookup = GaugeMetricFamily("swarmllm_dht_lookup_duration_seconds", "How long the last DHT look-up took")
    if dht["lookup_s"] is not None:
        lookup.add_metric([], dht["lookup_s"])
    failures = CounterMetricFamily(
        "swarmllm_dht_lookup_failures", "DHT look-ups that failed or timed out since the monitor started"
    )
    failures.add_metric([], dht["failures"])
    yield from (lookup, failures)


class _StateCollector:
    def __init__(self, state: Callable[[], Mapping]):
        self.state = state

    def collect(self) -> Iterator[Metric]:
        return state_metrics(self.state())


def metrics_text(state: Mapping) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StateCollector(lambda: state))
    return generate_latest(registry)
