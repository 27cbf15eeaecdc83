"""Request parameters of the HTTP faces against OpenAI's and Ollama's documented semantics, over a real aiohttp
server and a local transformers model in place of the swarm (as tests/api/test_request_edges.py): explicit nulls,
the effect of penalties and logit_bias on the logits (against a brute-force greedy loop), usage counts, and
Ollama's `options` and `stream`."""

import json

import pytest
import torch
from test_request_edges import _post, local_engine

from swarmllm.api.app import Api
from swarmllm.api.schemas import ChatRequest

CONTEXT = 48


@pytest.fixture(scope="module")
def engine():
    engine = local_engine(CONTEXT)
    yield engine
    engine.shutdown()


def _greedy(engine, prompt_ids: list[int], steps: int, bias: dict, frequency: float, presence: float):
    """OpenAI's documented penalties and bias, step by step over the whole sequence (no cache): each step's
    logits plus the bias, less frequency x count and presence x (count > 0) of the tokens generated so far."""
    model, eos = engine.model.model, set(engine.eos_ids)
    ids = list(prompt_ids)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        for token, value in bias.items():
            logits[token] += value
        for token in set(ids[len(prompt_ids) :]):
            count = ids[len(prompt_ids) :].count(token)
            logits[token] -= frequency * count + presence
        ids.append(int(logits.argmax()))
        if ids[-1] in eos:
            break
    return ids[len(prompt_ids) :]


async def test_explicit_nulls_take_the_defaults(client):
    """OpenAI's sampling fields are nullable: a null is the field left out (clients and SDKs that serialise
    every field send them). A null temperature, top_p, n, penalties, stream, echo or logprobs was a 400."""
    nulls = dict.fromkeys(
        ("temperature", "top_p", "n", "presence_penalty", "frequency_penalty", "stream", "logit_bias", "seed",
         "stop", "user", "stream_options", "top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos"),
    )  # fmt: skip
    ask = {"model": "m", "prompt": "the cat", "max_tokens": 3, "temperature": 0}
    _, plain = await _post(client, "/v1/completions", ask)
    status, body = await _post(
        client, "/v1/completions", {**ask, **nulls, "temperature": 0, "echo": None, "best_of": None}
    )
    assert status == 200, body
    assert body["choices"][0]["text"] == plain["choices"][0]["text"] and len(body["choices"]) == 1
    chat = {"model": "m", "messages": [{"role": "user", "content": "the cat"}], "max_tokens": 3}
    extra = {"logprobs": None, "top_logprobs": None, "parallel_tool_calls": None, "tool_choice": None}
    status, body = await _post(client, "/v1/chat/completions", {**chat, **nulls, **extra})
    assert status == 200 and len(body["choices"]) == 1, body
    status, body = await _post(client, "/v1/responses", {"model": "m", "input": "the cat", **nulls})
    assert status == 200, body


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_penalties_and_logit_bias_match_the_documented_formula(client, engine, path):
    """Greedy text under frequency/presence penalties and a logit_bias (token ids as string keys) is the
    brute-force loop's, and usage counts the prompt's tokens and every generated one (EOS too)."""
    steps, frequency, presence = 10, 1.5, -0.7
    if path == "/v1/completions":
        prompt_ids = engine.tokenizer("the cat sat on the")["input_ids"]
        ask = {"prompt": "the cat sat on the"}
    else:
        messages = [{"role": "user", "content": "the cat sat on the"}]
        ask = {"messages": messages}
        prompt_ids, _ = Api(engine).chat_ids(ChatRequest(model="m", messages=messages))
    plain = _greedy(engine, prompt_ids, steps, {}, 0.0, 0.0)
    bias = {plain[0]: -100.0, plain[1]: 4.0}
    expected = _greedy(engine, prompt_ids, steps, bias, frequency, presence)
    assert expected != plain  # (the parameters change the answer: the comparison can fail)
    body = {
        "model": "m", **ask, "max_tokens": steps, "temperature": 0, "frequency_penalty": frequency,
        "presence_penalty": presence, "logit_bias": {str(t): v for t, v in bias.items()},
    }  # fmt: skip
    status, reply = await _post(client, path, body)
    assert status == 200, reply
    choice = reply["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    decode = engine.decode
    assert decode(prompt_ids) + text == decode(prompt_ids + expected)
    usage = reply["usage"]
    assert usage["prompt_tokens"] == len(prompt_ids) and usage["completion_tokens"] == len(expected)
    assert usage["total_tokens"] == len(prompt_ids) + len(expected)


async def test_ollama_null_stream_is_streamed(client):
    """Ollama's `stream` defaults to true, and a null is the default (Go's *bool): it was a whole answer."""
    body = {"model": "m", "prompt": "the cat", "raw": True, "stream": None, "options": {"num_predict": 3}}
    reply = await client.post("/api/generate", json=body)
    assert reply.status == 200
    lines = [json.loads(line) for line in (await reply.text()).splitlines() if line]
    assert reply.headers["Content-Type"].startswith("application/x-ndjson")
    assert lines[-1]["done"] and not any(line["done"] for line in lines[:-1])


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat"])
async def test_ollama_num_predict_beyond_the_context_is_a_maximum(client, engine, path):
    """Ollama's num_predict is the most tokens to predict: one beyond the context ends the answer at the
    context (as -1 does), where it was a 400 (OpenAI's max_tokens rule)."""
    body = {"model": "m", "stream": False, "options": {"num_predict": 10 * CONTEXT, "temperature": 0}}
    if path == "/api/generate":
        body |= {"prompt": "the cat", "raw": True}
    else:
        body |= {"messages": [{"role": "user", "content": "the cat"}]}
    status, reply = await _post(client, path, body)
    assert status == 200, reply
    _, unlimited = await _post(client, path, {**body, "options": {"num_predict": -1, "temperature": 0}})
    assert reply["eval_count"] == unlimited["eval_count"] <= CONTEXT - reply["prompt_eval_count"]


async def test_top_p_zero_keeps_only_the_most_likely_token(client):
    """OpenAI's top_p ranges over [0, 1]: 0 is the smallest nucleus, the most likely token alone (what clients
    send for determinism), so any seed's answer is the greedy one. It was a 400."""
    ask = {"model": "m", "prompt": "the cat", "max_tokens": 6}
    _, greedy = await _post(client, "/v1/completions", {**ask, "temperature": 0})
    for seed in (1, 2):
        status, body = await _post(
            client, "/v1/completions", {**ask, "temperature": 1.5, "top_p": 0, "seed": seed, "n": 2}
        )
        assert status == 200, body
        assert [c["text"] for c in body["choices"]] == [greedy["choices"][0]["text"]] * 2
    reply = {"model": "m", "prompt": "the cat", "raw": True, "stream": False, "options": {"top_p": 0}}
    status, body = await _post(client, "/api/generate", reply)
    assert status == 200, body


async def test_ollama_show_takes_the_deprecated_name(client):
    """Ollama's /api/show reads `name` where `model` is not given (older clients send it): it was a 404."""
    status, body = await _post(client, "/api/show", {"name": "m"})
    assert status == 200 and body["model_info"]["context_length"] == CONTEXT, body
    status, _ = await _post(client, "/api/show", {"name": "other"})
    assert status == 404


async def test_ollama_empty_prompt_or_messages_load_the_model(client, engine):
    """Ollama's documented "load a model": a generate without a prompt or a chat without messages answers at
    once, done, with done_reason "load" (`ollama run` sends one before its first turn); they were a 400. The
    model is still checked, and a prompt of no tokens in a raw generate is still a 400."""
    for path, body, part in (
        ("/api/generate", {"model": "m", "prompt": ""}, {"response": ""}),
        ("/api/generate", {"model": "m"}, {"response": ""}),
        ("/api/chat", {"model": "m", "messages": []}, {"message": {"role": "assistant", "content": ""}}),
        ("/api/chat", {"model": "m:latest"}, {"message": {"role": "assistant", "content": ""}}),
    ):
        status, reply = await _post(client, path, body)
        assert status == 200, (path, body, reply)
        assert reply["done"] is True and reply["done_reason"] == "load" and reply["model"] == "m", reply
        assert {k: reply[k] for k in part} == part
        status, _ = await _post(client, path, {**body, "model": "other"})
        assert status == 404
    status, _ = await _post(client, "/api/generate", {"model": "m", "prompt": "  ", "raw": True})
    assert status == 400


async def test_logprobs_are_the_models_own_and_usage_streamed_is_the_whole_ones(client, engine):
    """Chat's logprobs/top_logprobs and an echoed prompt's token_logprobs are log_softmax of the model's logits
    (the top ones its most likely, best first); a stream's include_usage usage is the whole answer's."""
    messages = [{"role": "user", "content": "the cat sat"}]
    ask = {"model": "m", "messages": messages, "max_tokens": 5, "temperature": 0, "n": 2}
    status, whole = await _post(client, "/v1/chat/completions", {**ask, "logprobs": True, "top_logprobs": 3})
    assert status == 200, whole
    prompt_ids, _ = Api(engine).chat_ids(ChatRequest(model="m", messages=messages))
    tokens = _greedy(engine, prompt_ids, 5, {}, 0.0, 0.0)
    with torch.no_grad():
        logits = engine.model.model(torch.tensor([prompt_ids + tokens])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[len(prompt_ids) - 1 : -1]
    for choice in whole["choices"]:
        content = choice["logprobs"]["content"]
        shown = [t for t in tokens if t not in engine.eos_ids]
        assert len(content) == len(shown)
        for i, (entry, token) in enumerate(zip(content, shown, strict=True)):
            assert entry["logprob"] == pytest.approx(float(expected[i, token]), abs=1e-4)
            top = expected[i].topk(3).values.tolist()
            assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(top, abs=1e-4)
    streamed = await client.post(
        "/v1/chat/completions", json={**ask, "stream": True, "stream_options": {"include_usage": True}}
    )
    events = [json.loads(e[6:]) for e in (await streamed.text()).split("\n\n") if e.startswith("data: {")]
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]
    assert whole["usage"]["prompt_tokens"] == len(prompt_ids)
    assert whole["usage"]["completion_tokens"] == 2 * len(tokens)
    # an echoed prompt scored: each token's log-probability given those before it (the first has none)
    ids = engine.tokenizer("the cat sat on the mat")["input_ids"]
    body = {"model": "m", "prompt": "the cat sat on the mat", "max_tokens": 0, "echo": True, "logprobs": 2}
    status, scored = await _post(client, "/v1/completions", body)
    assert status == 200, scored
    with torch.no_grad():
        prompt_logprobs = torch.log_softmax(engine.model.model(torch.tensor([ids])).logits[0].float(), -1)
    got = scored["choices"][0]["logprobs"]["token_logprobs"]
    assert got[0] is None and len(got) == len(ids)
    assert got[1:] == pytest.approx([float(prompt_logprobs[i, t]) for i, t in enumerate(ids[1:])], abs=1e-4)
    assert scored["usage"]["prompt_tokens"] == len(ids) and scored["usage"]["completion_tokens"] == 0


async def test_ollama_show_model_info_has_ollamas_keys(client, engine):
    """Ollama's /api/show names the architecture in `model_info` and prefixes its numbers with it
    ("llama.context_length", "llama.embedding_length"), which clients read for the context and the vectors'
    length; the context was only under a key of its own."""
    status, body = await _post(client, "/api/show", {"model": "m"})
    assert status == 200, body
    info, arch = body["model_info"], engine.model.config.model_type
    assert info["general.architecture"] == arch == body["details"]["family"]
    assert info[f"{arch}.context_length"] == CONTEXT
    assert info[f"{arch}.embedding_length"] == engine.model.config.hidden_size


async def test_ollama_embed_of_no_input_loads_the_model(client):
    """Ollama's /api/embed without input (none, "" or []) loads the model and answers no embeddings; it was a
    400, or for "" the vector of a text of no words (its BOS token alone)."""
    for given in ({}, {"input": ""}, {"input": []}):
        status, body = await _post(client, "/api/embed", {"model": "m", **given})
        assert status == 200 and body["model"] == "m" and body["embeddings"] == [], (given, body)
    status, _ = await _post(client, "/api/embed", {"model": "m", "input": 5})
    assert status == 400


@pytest.mark.parametrize(
    "path, field, value",
    [
        ("/v1/completions", "temperature", "0.5"),
        ("/v1/completions", "stream", "no"),
        ("/v1/completions", "max_tokens", "16"),
        ("/v1/completions", "logprobs", True),
        ("/v1/completions", "n", 1.5),
        ("/v1/completions", "echo", 1),
        ("/v1/chat/completions", "top_p", "1"),
        ("/v1/chat/completions", "logprobs", 1),
        ("/v1/chat/completions", "top_logprobs", "2"),
        ("/v1/chat/completions", "seed", "7"),
        ("/v1/chat/completions", "presence_penalty", False),
    ],
)
async def test_a_parameter_of_the_wrong_json_type_is_a_400_naming_it(client, path, field, value):
    """OpenAI refuses a parameter of the wrong JSON type ("Invalid type for 'temperature': expected a number, but
    got a string"); they were read as what they looked like ("16" as 16, true as 1, "no" as false)."""
    body = {"model": "m", "max_tokens": 2, field: value}
    body |= (
        {"prompt": "the cat"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    status, answer = await _post(client, path, body)
    assert status == 400, answer
    assert answer["error"]["param"] == field, answer


THINKING_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if enable_thinking is defined and not enable_thinking %}nothink {% endif %}"
    "{% if add_generation_prompt %}assistant{% endif %}"
)


async def test_chat_template_kwargs_and_add_generation_prompt_are_vllms(client, engine):
    """vLLM's `chat_template_kwargs` (Qwen3's `enable_thinking`: false) reach the template, and
    `add_generation_prompt: false` leaves the assistant's turn unopened; a variable the API sets itself is a 400."""
    tokenizer = engine.tokenizer
    kept, tokenizer.chat_template = tokenizer.chat_template, THINKING_TEMPLATE
    try:
        messages = [{"role": "user", "content": "the cat"}]

        def ids(**fields) -> list[int]:
            return Api(engine).chat_ids(ChatRequest(model="m", messages=messages, **fields))[0]

        def words(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        assert ids() == words("user the cat assistant")
        assert ids(chat_template_kwargs={"enable_thinking": False}) == words("user the cat nothink assistant")
        assert ids(add_generation_prompt=False) == words("user the cat ")
        chat = {"model": "m", "messages": messages, "max_tokens": 1, "temperature": 0}
        counts = []
        for extra in ({}, {"chat_template_kwargs": {"enable_thinking": False}}):
            status, body = await _post(client, "/v1/chat/completions", {**chat, **extra})
            assert status == 200, body
            counts.append(body["usage"]["prompt_tokens"])
        assert counts[1] == counts[0] + 1  # the template's one more word
        status, body = await _post(
            client, "/v1/chat/completions", {**chat, "chat_template_kwargs": {"add_generation_prompt": False}}
        )
        assert status == 400 and body["error"]["param"] == "chat_template_kwargs", body
    finally:
        tokenizer.chat_template = kept
