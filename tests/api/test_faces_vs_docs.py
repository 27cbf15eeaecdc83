"""Ollama's face against Ollama's documented (and implemented) behaviour, over a real aiohttp server and a local
transformers model in place of the swarm (as tests/api/test_request_edges.py): `seed: -1` (Ollama's default,
"random"), `keep_alive: 0` with nothing to answer (an unload), a null `truncate`, and the older
`/api/embeddings` called without a prompt (what the `ollama` package sends for a load)."""

import pytest
from test_request_edges import _post, local_engine

CONTEXT = 64


@pytest.fixture(scope="module")
def engine():
    engine = local_engine(CONTEXT)
    model = engine.model.model

    def hidden_states(input_ids, attention_mask):  # what embeddings ask of the swarm's model
        return model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    engine.model.hidden_states = hidden_states
    yield engine
    engine.shutdown()


async def _generated(client, options: dict) -> str:
    ask = {"model": "m", "prompt": "the cat", "stream": False, "options": {"num_predict": 12, **options}}
    status, body = await _post(client, "/api/generate", ask)
    assert status == 200, body
    return body["response"]


async def test_seed_minus_one_samples_unseeded_as_ollama(client):
    """Ollama's sampler seeds its generator only when `seed != -1` (-1 is its default: a fresh draw each
    time); here -1 seeded the generator, so every request with it gave the same answer."""
    seeded = {"seed": 7, "temperature": 1.0}
    assert await _generated(client, seeded) == await _generated(client, seeded)  # a real seed still holds
    answers = {await _generated(client, {"seed": -1, "temperature": 1.0}) for _ in range(3)}
    assert len(answers) > 1, answers


@pytest.mark.parametrize("keep_alive", [0, "0", "0s", "0m"])
@pytest.mark.parametrize(
    ("path", "body", "part"),
    [("/api/generate", {}, "response"), ("/api/chat", {"messages": []}, "message")],
)
async def test_keep_alive_zero_without_input_is_an_unload(client, keep_alive, path, body, part):
    """An empty generate (or chat) with `keep_alive: 0` is Ollama's "unload a model": done at once with
    `done_reason: "unload"` (it said "load")."""
    status, answer = await _post(client, path, {"model": "m", "keep_alive": keep_alive, **body})
    assert status == 200, answer
    assert answer["done"] is True and answer["done_reason"] == "unload" and part in answer
    status, answer = await _post(client, path, {"model": "m", "keep_alive": "5m", **body})
    assert status == 200 and answer["done_reason"] == "load", answer


async def test_embed_null_truncate_is_the_default(client):
    """Ollama's `truncate` is optional (a null is the field left out: true); a null was a 400."""
    long = "the cat sat " * 40  # past the context: cut there by default
    status, plain = await _post(client, "/api/embed", {"model": "m", "input": long})
    assert status == 200, plain
    status, null = await _post(client, "/api/embed", {"model": "m", "input": long, "truncate": None})
    assert status == 200, null
    assert null["embeddings"] == plain["embeddings"]


async def test_old_embeddings_without_prompt_loads_the_model(client):
    """Ollama's `/api/embeddings` answers a request without a prompt as one with an empty prompt: an empty
    embedding (what `ollama.Client().embeddings(model=...)` sends for a load; it was a 400)."""
    status, body = await _post(client, "/api/embeddings", {"model": "m"})
    assert status == 200 and body == {"embedding": []}, body
    status, body = await _post(client, "/api/embeddings", {"model": "m", "prompt": "the cat"})
    assert status == 200 and len(body["embedding"]) == 32, body
