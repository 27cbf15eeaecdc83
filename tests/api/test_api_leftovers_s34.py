"""Leftovers of the OpenAI face, over a real aiohttp server and a local model (`test_request_edges.local_engine`):
the log-probabilities of an answer cut at a stop string (vLLM's rule: every token generated up to the one that
completes the stop string), and a Responses answer cut at `max_output_tokens` as OpenAI marks it, read through the
official client."""

import json

import openai
import pytest
from test_request_edges import _post, local_engine


@pytest.fixture(scope="module")
def engine():
    engine = local_engine(64)
    yield engine
    engine.shutdown()


def _events(text: str) -> list[dict]:
    return [json.loads(e[6:]) for e in text.split("\n\n") if e.startswith("data: {")]


async def _answer(client, path: str, ask: dict) -> tuple[str, list[str], int]:
    """The answer's text, its logprob tokens and its completion tokens, whole; and checks that streamed they are
    the same."""
    status, body = await _post(client, path, ask)
    assert status == 200, body
    choice = body["choices"][0]
    if path == "/v1/completions":
        text, tokens = choice["text"], choice["logprobs"]["tokens"]
    else:
        text, tokens = choice["message"]["content"], [e["token"] for e in choice["logprobs"]["content"]]
    streamed = await client.post(path, json={**ask, "stream": True})
    chunks = [e["choices"][0] for e in _events(await streamed.text()) if e["choices"]]
    if path == "/v1/completions":
        assert "".join(c["text"] for c in chunks) == text
        assert [t for c in chunks if c["logprobs"] for t in c["logprobs"]["tokens"]] == tokens
    else:
        assert "".join(c["delta"].get("content") or "" for c in chunks) == text
        assert [e["token"] for c in chunks if c["logprobs"] for e in c["logprobs"]["content"]] == tokens
    return text, tokens, body["usage"]["completion_tokens"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_a_stop_strings_tokens_keep_their_logprobs_as_vllms(client, path):
    """vLLM cuts the text at a stop string and keeps the log-probabilities of every token generated, up to the one
    that completes the stop string (its detokenizer truncates `output_text` alone): the tokens joined are the
    text, then the stop string (and the rest of its last token), none past it; streamed as whole."""
    ask = {"model": "m", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    ask |= {"prompt": "the cat", "logprobs": 0} if path == "/v1/completions" else {"logprobs": True}
    if path != "/v1/completions":
        ask["messages"] = [{"role": "user", "content": "the cat"}]
    _, free, _ = await _answer(client, path, ask)
    checked = 0
    for k in (2, 4, 6):
        for stop in (free[k].strip(), free[k - 1].strip() + free[k][:2]):  # one token's, and two tokens'
            if not stop or "".join(free[:k]).find(stop) >= 0 or stop in "".join(free[: k + 1])[: -len(stop)]:
                continue  # (it must first end in token k)
            text, tokens, generated = await _answer(client, path, {**ask, "stop": [stop]})
            whole = "".join(free[: k + 1])
            assert text == whole[: whole.find(stop)], (stop, text)
            assert tokens == free[: k + 1] and len(tokens) == generated, (stop, tokens)
            assert "".join(tokens).startswith(text + stop)
            checked += 1
    assert checked >= 3


async def _official(client) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=str(client.make_url("/v1")), api_key="unused", max_retries=0, timeout=60
    )


async def test_a_response_cut_at_max_output_tokens_marks_its_message_incomplete(client):
    """OpenAI marks a response cut at `max_output_tokens` incomplete, and the message item that was cut too
    (`status: "incomplete"`; the item said "completed"); the stream ends with `response.incomplete`, which the
    official client reads through (events and helper alike) into the same response."""
    oa = await _official(client)
    ask = {"model": "m", "input": "the cat", "max_output_tokens": 4, "temperature": 0,
           "extra_body": {"ignore_eos": True}}  # fmt: skip
    whole = await oa.responses.create(**ask)
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert [item.status for item in whole.output] == ["incomplete"]
    events = [event async for event in await oa.responses.create(**ask, stream=True)]
    assert events[-1].type == "response.incomplete"
    last = events[-1].response
    assert last.status == "incomplete" and last.incomplete_details.reason == "max_output_tokens"
    assert (
        last.output_text
        == whole.output_text
        == "".join(e.delta for e in events if e.type == "response.output_text.delta")
    )
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.status for item in done] == [item.status for item in last.output] == ["incomplete"]
    async with oa.responses.stream(**ask) as stream:
        kinds = [event.type async for event in stream]
    assert kinds == [e.type for e in events]
    # an answer that ends by itself (here at a stop string) is completed, its message too
    stop = whole.output_text.split()[-1]
    ask["extra_body"] |= {"stop": [stop]}
    ended = await oa.responses.create(**{**ask, "max_output_tokens": 8})
    assert ended.status == "completed" and ended.incomplete_details is None, ended
    assert [item.status for item in ended.output] == ["completed"]
    await oa.close()
