"""`swarmllm api`'s `/health`, `/metrics` and API keys over a real aiohttp server, with an engine whose swarm
lists given servers: healthy only while online servers hold every block; requests counted by route and status (an
unknown route too), a generation's tokens and times by `ApiMetrics.generated`; keys asked of every other route."""

from types import SimpleNamespace

import anthropic
import ollama
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from server_infos import online_server

from swarmllm.api.app import Api
from swarmllm.api.gateway import Gateway
from swarmllm.api.metrics import ApiMetrics
from swarmllm.dht import ServerState
from swarmllm.models.tiny import tiny_tokenizer


class Swarm:
    """What `/health` reads of a swarm client: its block count and its servers (as the DHT lists them)."""

    num_blocks = 4

    def __init__(self, servers):
        self.listed = servers

    async def servers(self):
        return list(self.listed)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_health_follows_the_blocks_and_metrics_count_requests():
    swarm = Swarm([online_server("a", 0, 2), online_server("b", 2, 4)])
    config = SimpleNamespace(vocab_size=10, hidden_size=8)
    engine = SimpleNamespace(
        name="m", parent=None, tokenizer=tiny_tokenizer(), context_length=64, metrics=ApiMetrics(),
        model=SimpleNamespace(config=config, swarm=swarm),
    )  # fmt: skip
    client = TestClient(TestServer(Gateway([Api(engine)]).app()))
    await client.start_server()
    try:
        reply = await client.get("/health")
        assert reply.status == 200 and (await reply.json())["status"] == "ok"
        swarm.listed = [online_server("a", 0, 2), online_server("b", 2, 4, state=ServerState.JOINING)]
        reply = await client.get("/health")
        assert reply.status == 503 and (await reply.json())["models"]["m"]["missing_blocks"] == [2, 3]
        assert (await client.get("/v1/models")).status == 200
        assert (await client.get("/v1/models/other")).status == 404
        assert (await client.get("/nowhere")).status == 404
        model, other = engine.metrics.model("m"), engine.metrics.model("other")
        model.generation_tokens.inc(5)  # (as a generation's streamer counts its tokens when they come)
        model.generated(started=1.0, first=1.5, ended=2.5, tokens=5, prompt=7, cached=3)
        model.generated(started=1.0, first=None, ended=1.0, tokens=0, prompt=2, cached=0)
        other.generated(started=1.0, first=3.0, ended=3.0, tokens=1, prompt=4, cached=0)
        reply = await client.get("/metrics")
        assert reply.status == 200 and reply.content_type == "text/plain"
        got = samples(await reply.text())
    finally:
        await client.close()

    def requests(route: str, status: str) -> float:
        return got[("swarmllm_api_requests_total", (("route", route), ("status", status)))]

    assert requests("/health", "200") == requests("/health", "503") == requests("/v1/models", "200") == 1
    assert requests("/v1/models/{model}", "404") == requests("unmatched", "404") == 1
    assert got[("swarmllm_api_requests_running", ())] == 1  # the scrape itself
    m, other = (("model", "m"),), (("model", "other"),)  # each model's series apart
    assert got[("swarmllm_api_prompt_tokens_total", m)] == 9
    assert got[("swarmllm_api_prompt_tokens_cached_total", m)] == 3
    assert got[("swarmllm_api_generation_tokens_total", m)] == 5
    assert got[("swarmllm_api_time_to_first_token_seconds_count", m)] == 1
    assert got[("swarmllm_api_time_to_first_token_seconds_sum", m)] == 0.5
    assert (
        got[("swarmllm_api_time_per_output_token_seconds_sum", m)] == 0.25
    )  # 1 s over the 4 after the first
    assert got[("swarmllm_api_prompt_tokens_total", other)] == 4
    assert got[("swarmllm_api_time_to_first_token_seconds_sum", other)] == 2.0
    assert got[("swarmllm_api_time_per_output_token_seconds_count", other)] == 0


async def test_api_keys_guard_every_route_but_health_and_metrics():
    """With `--api-key`s, the official OpenAI, Ollama and Anthropic clients get in with any one of them (a bearer
    token, or Anthropic's x-api-key) and get a 401 in their face's format without one; `/health` and `/metrics`
    stay open."""
    swarm = Swarm([online_server("a", 0, 4)])
    engine = SimpleNamespace(
        name="m", parent=None, tokenizer=tiny_tokenizer(), context_length=64, metrics=ApiMetrics(),
        model=SimpleNamespace(config=SimpleNamespace(vocab_size=10, hidden_size=8, model_type="llama"), swarm=swarm),
    )  # fmt: skip
    client = TestClient(TestServer(Gateway([Api(engine)], ["first-key", "second-key"]).app()))
    await client.start_server()
    base = str(client.make_url("/"))
    try:
        models = await openai.AsyncOpenAI(base_url=base + "v1", api_key="second-key").models.list()
        assert [m.id for m in models.data] == ["m"]
        with pytest.raises(openai.AuthenticationError) as refused:
            await openai.AsyncOpenAI(base_url=base + "v1", api_key="first-ke", max_retries=0).models.list()
        assert refused.value.code == "invalid_api_key"
        tags = await ollama.AsyncClient(host=base, headers={"Authorization": "Bearer first-key"}).list()
        assert [m.model for m in tags.models] == ["m"]
        with pytest.raises(ollama.ResponseError) as refused:
            await ollama.AsyncClient(host=base).list()
        assert refused.value.status_code == 401 and "API key" in refused.value.error
        for header in ({}, {"Authorization": "first-key"}, {"Authorization": "Basic first-key"}):
            assert (await client.get("/v1/models", headers=header)).status == 401
        # Anthropic's client sends its key as x-api-key, and gets Anthropic's error
        keyed = anthropic.AsyncAnthropic(base_url=base, api_key="second-key")
        assert [m.id for m in (await keyed.models.list()).data] == ["m"]  # (its format of the same list)
        assert (await keyed.models.retrieve("m")).display_name == "m"
        with pytest.raises(anthropic.AuthenticationError) as refused:
            await anthropic.AsyncAnthropic(base_url=base, api_key="second-ke", max_retries=0).messages.create(
                model="m", max_tokens=4, messages=[{"role": "user", "content": "Hi"}]
            )
        assert refused.value.body["error"]["type"] == "authentication_error"
        assert (await client.post("/tokenize", json={"prompt": "the cat"})).status == 401
        assert (await client.get("/health")).status == 200 and (await client.get("/metrics")).status == 200
    finally:
        await client.close()
