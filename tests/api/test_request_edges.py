"""Edge cases of the API's requests over a real aiohttp server and a local transformers model in place of the
swarm (each generate runs as `swarmllm api` runs it, in its worker thread, with a stand-in session): requests
that used to fail as a 503 or a 500 are a 400 naming what is wrong, and the text reads as the tokens do."""

import contextlib
import json
import re
import threading
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from swarmllm.api.app import Engine
from swarmllm.api.generation import TextAssembler, TokenLogprob, TokenTexts
from swarmllm.api.json_mode import token_bytes
from swarmllm.api.schemas import GuideMasks
from swarmllm.bundled import smollm2_checkpoint
from swarmllm.models.tiny import tiny_tokenizer


class LocalModel:
    """What the engine asks of the swarm's model, from a local transformers model: sessions that hold nothing,
    and generates that each wait for `gate` (set, unless a test clears it to decide when the slots free)."""

    def __init__(self, model):
        self.model, self.config, self.generation_config = model, model.config, model.generation_config
        self.device = model.device
        self.gate = threading.Event()
        self.gate.set()
        self.started = 0  # generates entered (each in a worker thread)
        self.lock = threading.Lock()

    def generate(self, *args, **kwargs):
        with self.lock:
            self.started += 1
        self.gate.wait(30)
        return self.model.generate(*args, **kwargs)

    def __call__(self, ids):
        return self.model(ids)

    def open_session(self, max_length: int):
        return SimpleNamespace(max_length=max_length, input_ids=None, position=0, copied=0)

    @contextlib.contextmanager
    def use_session(self, remote):
        yield remote

    def close_session(self, remote) -> None:
        pass


CONTEXT = 16


def local_engine(context_length: int, **options) -> Engine:
    """An Engine named "m" over a random one-layer llama in this process (`LocalModel`)."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, num_hidden_layers=1,
        vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LocalModel(AutoModelForCausalLM.from_config(config).eval())
    return Engine(
        model,
        tokenizer,
        "m",
        context_length=context_length,
        **{"max_concurrent": 2, "keep_sessions": 0, **options},
    )


@pytest.fixture(scope="module")
def engine():
    engine = local_engine(CONTEXT)
    yield engine
    engine.shutdown()


async def _post(client, path: str, body: dict) -> tuple[int, dict]:
    reply = await client.post(path, json=body)
    return reply.status, await reply.json()


async def test_an_empty_prompt_is_a_400_not_a_failure_of_the_swarm(client):
    """A prompt without a token (an empty text; as Ollama's raw generate, a text of blanks) has nothing to
    generate from: vLLM refuses it; it used to reach generate() and come back as the swarm's 503."""
    for prompt in ("", ["the cat", ""]):
        status, body = await _post(
            client, "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 2}
        )
        assert status == 400 and body["error"]["param"] == "prompt", body
    reply = await client.post(
        "/api/generate", json={"model": "m", "prompt": "   ", "raw": True, "stream": False}
    )
    assert reply.status == 400


async def test_a_prompt_that_fills_the_context_without_max_tokens_is_a_400(client):
    """Without max_tokens the answer may fill the context; a prompt that leaves no room for one token is a 400
    (context_length_exceeded), as it is with max_tokens, not a generate of 0 tokens that fails as a 503."""
    words = " ".join(["the cat"] * CONTEXT)
    status, body = await _post(client, "/v1/completions", {"model": "m", "prompt": words, "max_tokens": None})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    chat = {"model": "m", "messages": [{"role": "user", "content": words}]}
    status, body = await _post(client, "/v1/chat/completions", chat)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body


async def test_a_temperature_too_small_to_divide_by_is_greedy(client):
    """The logits divided by 1e-40 overflow into NaN, which no token can be drawn from: below vLLM's 1e-5 a
    temperature is greedy there, and so here (it was a 503)."""
    ask = {"model": "m", "prompt": "the cat", "max_tokens": 4, "seed": 1}
    status, tiny = await _post(client, "/v1/completions", {**ask, "temperature": 1e-40})
    assert status == 200, tiny
    _, greedy = await _post(client, "/v1/completions", {**ask, "temperature": 0})
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


async def test_a_seed_beyond_64_bits_is_a_400(client):
    """vLLM takes seeds of a signed 64-bit integer; a larger one cannot seed a generator (it was a 503)."""
    ask = {"model": "m", "prompt": "the cat", "max_tokens": 2, "temperature": 1}
    status, body = await _post(client, "/v1/completions", {**ask, "seed": 2**70})
    assert status == 400 and body["error"]["param"] == "seed", body
    status, _ = await _post(client, "/v1/completions", {**ask, "seed": 2**63 - 1, "n": 3})
    assert status == 200


async def test_the_text_reads_after_the_prompt_as_its_logprob_tokens_do(client, engine):
    """A word-level (or SentencePiece) token decoded first loses the space before it: the answer to "the cat"
    is " sat ...", as vLLM's text and the tokens' logprobs have it, and echo gives "the cat sat ...", not
    "the catsat ..."; the tokens joined are the text and each offset is where its token starts; a guided
    regex matches the whole text (the grammar reads the tokens' bytes as they follow the prompt)."""
    ask = {"model": "m", "prompt": "the cat", "max_tokens": 4, "temperature": 0, "logprobs": 1}
    for echo in (False, True):
        status, body = await _post(client, "/v1/completions", {**ask, "echo": echo})
        assert status == 200, body
        choice = body["choices"][0]
        tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
        assert "".join(tokens) == choice["text"]
        assert [choice["text"][o : o + len(t)] for o, t in zip(offsets, tokens, strict=True)] == tokens
    prompt = engine.tokenizer("the cat")["input_ids"]
    ids = engine.tokenizer(choice["text"])["input_ids"][len(prompt) :]
    assert choice["text"] == "the cat " + engine.tokenizer.decode(ids)
    streamed = await client.post("/v1/completions", json={**ask, "stream": True, "logprobs": None})
    events = [json.loads(e[6:]) for e in (await streamed.text()).split("\n\n") if e.startswith("data: {")]
    assert "the cat" + "".join(e["choices"][0]["text"] for e in events) == choice["text"]
    # a guided answer is held to the pattern as its tokens' bytes read after the prompt, so is its text
    guided = {
        "model": "m",
        "prompt": "the cat",
        "max_tokens": 3,
        "temperature": 0,
        "guided_regex": "( [a-z]+)+",
    }
    status, body = await _post(client, "/v1/completions", guided)
    assert status == 200 and re.fullmatch("( [a-z]+)+", body["choices"][0]["text"]), body


def test_token_bytes_of_part_of_a_character_are_its_own_bytes():
    """A byte-level BPE token that holds part of a UTF-8 character decodes alone as U+FFFD; its bytes are its
    own, else a held answer cannot write "日本" (SmolLM2 spells 日 as two such tokens: none could start it)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    pieces = token_bytes(tokenizer, len(tokenizer))
    text = "日本 😀 Zoë"
    assert b"".join(pieces[i] for i in tokenizer.encode(text)) == text.encode()
    masks = GuideMasks(tokenizer, len(tokenizer), [tokenizer.eos_token_id])
    mask = masks.mask(("choice", ("日本",)))
    assert mask.allowed(mask.grammar.start)[tokenizer.encode("日本")[0]]


async def test_bodies_json_cannot_read_are_a_400(client):
    """An integer of more digits than Python converts, and a charset no codec has, are bodies that cannot be
    read: a 400, as any JSON that does not parse (both were a 500)."""
    huge = '{"model": "m", "prompt": "the cat", "seed": ' + "1" * 5000 + "}"
    for data, kind in (
        (huge, "application/json"),
        ('{"model": "m", "prompt": "a"}', "application/json; charset=x"),
    ):
        reply = await client.post("/v1/completions", data=data, headers={"Content-Type": kind})
        assert reply.status == 400, await reply.text()
    reply = await client.post("/api/generate", data=huge.replace('"seed"', '"options": {}, "x"'))
    assert reply.status == 400


async def test_a_responses_text_that_is_not_an_object_is_a_400(client):
    status, body = await _post(client, "/v1/responses", {"model": "m", "input": "hi", "text": "json"})
    assert status == 400 and body["error"]["param"] == "text", body


async def test_ollama_tool_calls_that_are_not_calls_are_a_400(client):
    """A message's tool_calls as Ollama sends them: a list of {"function": {...}}; anything else was a 500."""
    for calls in ([{"function": 5}], 5, [{"function": {"name": "f", "arguments": {}}}, "x"]):
        message = {"role": "assistant", "content": "", "tool_calls": calls}
        body = {"model": "m", "messages": [message], "stream": False, "options": {"num_predict": 2}}
        reply = await client.post("/api/chat", json=body)
        assert reply.status == 400, (calls, await reply.text())


def test_a_stop_string_sent_before_min_tokens_does_not_stop_the_text_later():
    """vLLM's rule: a stop string counts only where it ends in text made after min_tokens. A short stop string
    sent whole within the first min_tokens tokens used to end the text at the next token, when a longer stop
    string widened the search back into what was already sent."""
    table = "abc XYZ"
    assembler = TextAssembler(lambda ids: "".join(table[i] for i in ids), ["a", "XYZ"], min_tokens=1)
    pieces = [assembler.add(t) for t in (0, 1, 2)] + [assembler.finish()]
    assert "".join(pieces) == "abc" and assembler.finish_reason is None


def test_chat_logprobs_bytes_of_part_of_a_character_are_its_own(engine):
    """OpenAI's `bytes` let a caller rejoin a character split across tokens: each token that holds part of it
    (text U+FFFD) carries its own bytes, so the tokens' bytes joined are the text's (they were U+FFFD's)."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    smollm2 = Engine(engine.model, tokenizer, "s", context_length=CONTEXT, max_concurrent=1, keep_sessions=0)
    try:
        text = "日本 😀"
        tokens = tokenizer.encode(text)
        entries = [TokenLogprob(t, -1.0, ((t, -1.0),)) for t in tokens]
        content = smollm2.chat_logprobs(entries, TokenTexts(tokenizer.decode))["content"]
        assert any(c["token"] == "\ufffd" for c in content)  # the case at hand: split characters
        assert bytes(b for c in content for b in c["bytes"]) == text.encode()
        assert [c["top_logprobs"][0]["bytes"] for c in content] == [c["bytes"] for c in content]
    finally:
        smollm2.shutdown()
