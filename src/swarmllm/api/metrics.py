"""What `swarmllm api` counts about the requests it answers, in Prometheus' terms (`GET /metrics`), as vLLM's
server does for its own: requests by route and status with their durations (a middleware), the generations
running and those waiting for a worker, their prompt tokens (and those the servers held already), the tokens
generated, the time to each generation's first token and between its tokens (from the engine's worker),
speculative decoding's drafts and accepted tokens, and the inputs and tokens embedded, these by model (an API
serves several). The registry is the API's own, so several APIs (or tests) in one process never share a counter.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

if TYPE_CHECKING:
    from swarmllm.client.speculative import SpeculationStats

# a request: from a tokenize (ms) to a long answer through a slow swarm (minutes)
REQUEST_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
FIRST_TOKEN_BUCKETS_S = (0.02, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 60.0)
CLIENT_LEFT = 499  # the status of a request whose requester went away before its answer (nginx's)


class ApiMetrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "swarmllm_api_requests", "HTTP requests answered, by route and status", ["route", "status"],
            registry=registry,
        )  # fmt: skip
        self.request_seconds = Histogram(
            "swarmllm_api_request_duration_seconds", "Time to answer a request (a stream: until its end)", ["route"],
            buckets=REQUEST_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.requests_running = Gauge(
            "swarmllm_api_requests_running", "Requests being answered now", registry=registry
        )
        # each model's series carry its name (`model`, as vLLM's carry `model_name`)
        self.generations_running = Gauge(
            "swarmllm_api_generations_running", "Generations running now (each choice of a request one)",
            ["model"], registry=registry,
        )  # fmt: skip
        self.generations_waiting = Gauge(
            "swarmllm_api_generations_waiting", "Generations waiting for a worker (past --max-concurrent)",
            ["model"], registry=registry,
        )  # fmt: skip
        self.prompt_tokens = Counter(
            "swarmllm_api_prompt_tokens", "Prompt tokens of generations", ["model"], registry=registry
        )
        self.cached_tokens = Counter(
            "swarmllm_api_prompt_tokens_cached", "Prompt tokens the servers held already (kept sessions)",
            ["model"], registry=registry,
        )  # fmt: skip
        self.generation_tokens = Counter(
            "swarmllm_api_generation_tokens", "Tokens generated", ["model"], registry=registry
        )
        self.generation_failures = Counter(
            "swarmllm_api_generation_failures", "Generations that failed (the swarm could not serve them)",
            ["model"], registry=registry,
        )  # fmt: skip
        self.first_token_seconds = Histogram(
            "swarmllm_api_time_to_first_token_seconds", "From a generation's start to its first generated token",
            ["model"], buckets=FIRST_TOKEN_BUCKETS_S, registry=registry,
        )  # fmt: skip
        self.token_seconds = Histogram(
            "swarmllm_api_time_per_output_token_seconds", "Between a generation's tokens, after the first (its mean)",
            ["model"], buckets=TOKEN_BUCKETS_S, registry=registry,
        )  # fmt: skip
        # speculative decoding, as vLLM's spec_decode series: rounds (each one step through the swarm), the
        # tokens the draft proposed and those the swarm accepted
        self.draft_rounds = Counter(
            "swarmllm_api_spec_decode_drafts", "Speculative rounds: drafts checked by the swarm in one step",
            ["model"], registry=registry,
        )  # fmt: skip
        self.draft_tokens = Counter(
            "swarmllm_api_spec_decode_draft_tokens", "Tokens proposed by the draft model", ["model"],
            registry=registry,
        )  # fmt: skip
        self.accepted_tokens = Counter(
            "swarmllm_api_spec_decode_accepted_tokens", "Draft tokens the swarm accepted", ["model"],
            registry=registry,
        )  # fmt: skip
        self.embedded_inputs = Counter(
            "swarmllm_api_embedding_inputs", "Inputs embedded", ["model"], registry=registry
        )
        self.embedded_tokens = Counter(
            "swarmllm_api_embedding_tokens", "Tokens of inputs embedded", ["model"], registry=registry
        )

    def model(self, name: str) -> ModelMetrics:
        """The series of the model served as `name` (an engine's)."""
        return ModelMetrics(self, name)

    @web.middleware
    async def middleware(self, request: web.Request, handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        started, status = time.perf_counter(), 500
        self.requests_running.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:  # the requester left (its handler is cancelled): not the API's failure
            status = CLIENT_LEFT
            raise
        finally:
            self.requests_running.dec()
            self.requests.labels(route, str(status)).inc()
            self.request_seconds.labels(route).observe(time.perf_counter() - started)

    def page(self) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )


class ModelMetrics:
    """One model's series of an API's metrics."""

    def __init__(self, metrics: ApiMetrics, name: str):
        self.generations_running = metrics.generations_running.labels(name)
        self.generations_waiting = metrics.generations_waiting.labels(name)
        self.prompt_tokens = metrics.prompt_tokens.labels(name)
        self.cached_tokens = metrics.cached_tokens.labels(name)
        self.generation_tokens = metrics.generation_tokens.labels(name)
        self.generation_failures = metrics.generation_failures.labels(name)
        self.first_token_seconds = metrics.first_token_seconds.labels(name)
        self.token_seconds = metrics.token_seconds.labels(name)
        self.draft_rounds = metrics.draft_rounds.labels(name)
        self.draft_tokens = metrics.draft_tokens.labels(name)
        self.accepted_tokens = metrics.accepted_tokens.labels(name)
        self.embedded_inputs = metrics.embedded_inputs.labels(name)
        self.embedded_tokens = metrics.embedded_tokens.labels(name)

    def speculated(self, stats: SpeculationStats) -> None:
        """One speculative generation's rounds, drafted and accepted tokens."""
        self.draft_rounds.inc(stats.rounds)
        self.draft_tokens.inc(stats.drafted)
        self.accepted_tokens.inc(stats.accepted)

    def generated(
        self, started: float, first: float | None, ended: float, tokens: int, prompt: int, cached: int
    ) -> None:
        """One generation that ended (times from `time.perf_counter`; `first`: its first token, if any); its
        tokens were counted in `generation_tokens` as they came."""
        self.prompt_tokens.inc(prompt)
        self.cached_tokens.inc(cached)
        if first is not None:
            self.first_token_seconds.observe(first - started)
            if tokens > 1:
                self.token_seconds.observe((ended - first) / (tokens - 1))
