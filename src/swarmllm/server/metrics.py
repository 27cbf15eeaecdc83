"""What one server counts about its own work, in Prometheus' terms, and the `/metrics` page that shows it
(`swarmllm serve --metrics-port`).

The handler calls these counters where the work happens (a step, a forward, a session opening or closing, a
refusal); the cache figures are read from the backend when the page is scraped. Every server has its own
registry, so several servers (or tests) in one process never share a counter.

Names follow Prometheus' conventions: `swarmllm_server_` prefix, base units (seconds, tokens), `_total` on
counters. Labels: `kind` (`decode`: one token per sequence, `prefill`: more) and `reason` (the error code a
refused request got: `quota`, `busy`, `cache_full`, `server_leaving`, `too_large`, and `bad_request` for a
session larger than a peer's cache share).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# a decode step of one block on a CPU takes ~0.1 ms, a prefill of a long prompt over many blocks seconds
STEP_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.steps = Counter(
            "swarmllm_server_inference_steps", "Inference steps computed", ["kind"], registry=registry
        )
        self.tokens = Counter(
            "swarmllm_server_tokens",
            "Tokens (batch x positions) computed through this server's blocks, by request kind",
            ["kind"],
            registry=registry,
        )
        self.step_seconds = Histogram(
            "swarmllm_server_step_duration_seconds",
            "Compute time of an inference step on this server (its whole span)",
            ["kind"],
            buckets=STEP_BUCKETS_S,
            registry=registry,
        )
        self.forwards = Counter(
            "swarmllm_server_forward_requests", "Batch forward calls served", registry=registry
        )
        self.sessions_open = Gauge(
            "swarmllm_server_sessions_open", "Inference sessions open now", registry=registry
        )
        self.sessions_opened = Counter(
            "swarmllm_server_sessions_opened", "Inference sessions opened", registry=registry
        )
        self.room_waits = Gauge(
            "swarmllm_server_room_waits",
            "Room queries waiting now: clients refused room, to be told when a session here ends",
            registry=registry,
        )
        self.refusals = Counter(
            "swarmllm_server_refusals", "Requests refused, by error code", ["reason"], registry=registry
        )
        self.replays = Counter(
            "swarmllm_server_replays",
            "Failovers served: sessions opened to take over a failed server's blocks",
            registry=registry,
        )
        self.replayed_tokens = Counter(
            "swarmllm_server_replayed_tokens",
            "Tokens recomputed for sessions taken over from a failed server",
            registry=registry,
        )
        self.cache_used = Gauge(
            "swarmllm_server_cache_used_tokens", "KV-cache tokens held by open sessions", registry=registry
        )
        self.cache_capacity = Gauge(
            "swarmllm_server_cache_capacity_tokens", "KV-cache budget in tokens", registry=registry
        )
        self.prefix_held = Gauge(
            "swarmllm_server_prefix_cache_tokens",
            "Cache tokens the prefix cache holds (given up to sessions that need them)",
            registry=registry,
        )
        self.blocks = Gauge(
            "swarmllm_server_blocks",
            "Blocks served (the span's start and end are labels)",
            ["model", "start_block", "end_block"],
            registry=registry,
        )
        # created at 0, so that a scrape lists them before the first one happens; a step's three are looked up
        # once here (`labels` takes a lock and builds a key: on every step's path otherwise)
        self._by_kind = {
            kind: (self.steps.labels(kind), self.tokens.labels(kind), self.step_seconds.labels(kind))
            for kind in ("decode", "prefill")
        }
        self.tokens.labels("forward")

    def watch_cache(self, used_tokens: Callable[[], int], capacity_tokens: Callable[[], int]) -> None:
        """Read the cache figures at scrape time (the backend may change when the server moves)."""
        self.cache_used.set_function(used_tokens)
        self.cache_capacity.set_function(capacity_tokens)

    def watch_prefix(self, held_tokens: Callable[[], int], hit_tokens: Callable[[], int]) -> None:
        """Read the prefix cache's figures (`server.prefix`) at scrape time: the tokens it holds, and the positions
        sessions copied from it instead of computing them (since the backend began: a move starts it again)."""
        self.prefix_held.set_function(held_tokens)
        self.registry.register(_Total("swarmllm_server_prefix_cache_hit_tokens", _HITS_HELP, hit_tokens))

    def serving(self, model: str, start: int, end: int) -> None:
        self.blocks.clear()
        self.blocks.labels(model, str(start), str(end)).set(end - start)

    def step(self, tokens: int, length: int, seconds: float) -> None:
        steps, counted, duration = self._by_kind["decode" if length == 1 else "prefill"]
        steps.inc()
        counted.inc(tokens)
        duration.observe(seconds)

    def part(self, tokens: int, length: int) -> None:
        """The tokens of one part of a step pushed on in parts (`length`: the whole step's positions); the step
        itself, and its compute time, count once, by `step` when its last part is done."""
        self._by_kind["decode" if length == 1 else "prefill"][1].inc(tokens)

    def forward(self, tokens: int) -> None:
        self.forwards.inc()
        self.tokens.labels("forward").inc(tokens)

    def refused(self, reason: str) -> None:
        self.refusals.labels(reason).inc()

    def text(self) -> bytes:
        return generate_latest(self.registry)


_HITS_HELP = "Positions copied from the prefix cache instead of computed"


class _Total(Collector):
    """A counter whose value is read at scrape time."""

    def __init__(self, name: str, documentation: str, value: Callable[[], int]):
        self.name, self.documentation, self.value = name, documentation, value

    def collect(self):
        yield CounterMetricFamily(self.name, self.documentation, value=self.value())


async def serve_metrics(metrics: ServerMetrics, host: str, port: int):
    """Serve `/metrics` on host:port; returns the aiohttp runner (its `cleanup()` stops it) and the bound port."""
    from aiohttp import web

    from swarmllm.web import bind, serve_app

    async def page(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.text(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    sock = bind(host, port)
    app = web.Application()
    app.router.add_get("/metrics", page)
    runner = await serve_app(app, sock)
    bound = sock.getsockname()[1]
    logger.info("metrics at http://%s:%d/metrics", host, bound)
    return runner, bound
