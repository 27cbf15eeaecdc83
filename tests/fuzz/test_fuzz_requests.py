"""Garbage request bodies for the Responses API and for embeddings (OpenAI's and Ollama's shapes): each is
read into the prompt ids it means or refused with an `ApiError` (a 4xx), never another exception (a 500), with
the API's own checks and the tiny tokenizer (no chat template: the plain layout)."""

from __future__ import annotations

from types import SimpleNamespace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmllm.api.app import Api
from swarmllm.api.schemas import ApiError, EmbeddingRequest
from swarmllm.api.streams import validated
from swarmllm.models.tiny import tiny_tokenizer

TOKENIZER = tiny_tokenizer()
KEYS = [
    "model", "input", "instructions", "previous_response_id", "max_output_tokens", "temperature", "top_p",
    "tools", "tool_choice", "parallel_tool_calls", "text", "format", "type", "role", "content", "text",
    "name", "arguments", "call_id", "output", "parameters", "schema", "stream", "store", "include",
    "background", "seed", "dimensions", "encoding_format", "truncate",
]  # fmt: skip
SCALARS = st.none() | st.booleans() | st.integers(-3, 70) | st.floats(allow_nan=True) | st.sampled_from(
    ["m", "", "hi there", "user", "assistant", "developer", "system", "tool", "message", "function",
     "function_call", "function_call_output", "input_text", "output_text", "input_image", "json_schema",
     "json_object", "text", "auto", "required", "none", "web_search", "{}", '{"a": 1}', "resp_x", "base64"]
)  # fmt: skip
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=6),
    max_leaves=30,
)
TEXT = st.sampled_from(["hi there", "", "the cat", "json please", "a b c"])
PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["input_text", "output_text", "input_image"]), "text": TEXT}
)
CONTENT = TEXT | st.lists(PART, max_size=3) | JSON
ITEM = (
    st.fixed_dictionaries(
        {"role": st.sampled_from(["user", "assistant", "developer", "system", "tool"]), "content": CONTENT},
        optional={"type": st.just("message")},
    )
    | st.fixed_dictionaries(
        {"type": st.just("function_call"), "name": st.just("f") | JSON, "arguments": st.just('{"a": 1}') | JSON},
        optional={"call_id": st.just("c1") | JSON},
    )
    | st.fixed_dictionaries({"type": st.just("function_call_output"), "output": TEXT | JSON},
                            optional={"call_id": st.just("c1")})
    | JSON
)  # fmt: skip
TOOL = st.fixed_dictionaries(
    {"type": st.sampled_from(["function", "web_search"]), "name": st.just("f") | JSON},
    optional={"parameters": st.just({"type": "object", "properties": {"a": {"type": "integer"}}}) | JSON},
)
FORMAT = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "json_object", "json_schema", "yaml"])},
    optional={"schema": st.just({"type": "object"}) | JSON, "name": TEXT},
)
RESPONSES_BODY = st.fixed_dictionaries(
    {"model": st.just("m") | JSON, "input": TEXT | st.lists(ITEM, max_size=4) | JSON},
    optional={
        "instructions": TEXT | JSON,
        "max_output_tokens": st.integers(-1, 80) | JSON,
        "temperature": st.floats(0, 2) | JSON,
        "top_p": st.floats(0, 1) | JSON,
        "tools": st.lists(TOOL, max_size=2) | JSON,
        "tool_choice": st.sampled_from(["auto", "required", "none"])
        | st.just({"type": "function", "name": "f"})
        | JSON,
        "parallel_tool_calls": st.booleans() | JSON,
        "text": st.fixed_dictionaries({"format": FORMAT}) | JSON,
        "include": st.lists(st.sampled_from(["message.output_text.logprobs", "reasoning"]), max_size=1)
        | JSON,
        "previous_response_id": st.just("resp_x") | JSON,
        "seed": st.integers(0, 5) | JSON,
        "background": st.booleans(),
    },
)
INPUTS = (
    TEXT
    | st.lists(TEXT, max_size=4)
    | st.lists(st.integers(-2, 80), max_size=5)
    | st.lists(st.lists(st.integers(-2, 80), max_size=5), max_size=3)
)
EMBEDDINGS_BODY = st.fixed_dictionaries(
    {"model": st.just("m") | JSON, "input": INPUTS | JSON},
    optional={
        "dimensions": st.integers(-1, 10) | JSON,
        "encoding_format": st.sampled_from(["float", "base64", "hex"]) | JSON,
    },
)


def _api() -> Api:
    config = SimpleNamespace(vocab_size=len(TOKENIZER), hidden_size=8)
    return Api(
        SimpleNamespace(
            name="m", tokenizer=TOKENIZER, context_length=64, model=SimpleNamespace(config=config)
        )
    )


API = _api()
RESPONSES = API.responses


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=RESPONSES_BODY)
def test_a_responses_body_is_read_or_refused(body):
    try:
        chat, _ = RESPONSES._chat(body)
        ids, _ = API.chat_ids(chat)
    except ApiError as e:
        assert 400 <= e.status < 500
        return
    assert ids and all(isinstance(t, int) for t in ids)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=EMBEDDINGS_BODY, truncate=st.booleans())
def test_an_embeddings_body_is_read_or_refused(body, truncate):
    try:
        ids = API.embedding_ids(validated(EmbeddingRequest, body), truncate)
    except ApiError as e:
        assert 400 <= e.status < 500
        return
    assert ids and all(0 < len(one) <= 64 for one in ids)
