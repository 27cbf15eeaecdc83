"""Text from generated tokens, as every face streams it or stops it, against the tokenizer's own `decode` of the
whole sequence: real tokenizers built offline (a byte-level BPE as GPT-2's and Llama 3's, and a SentencePiece-like
one with byte fallback as Llama 2's and Mistral's), pure functions fed token ids, and a checkpoint whose greedy
tokens are known (each token's successor is fixed: a bigram table in its LM head) served by a real server on
127.0.0.1 behind the API."""

from __future__ import annotations

import io
import json
import random

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from in_process import model_over_one_server
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from swarmllm.api.app import Api, Engine
from swarmllm.api.gateway import Gateway
from swarmllm.api.generation import TextAssembler, chat_prompt
from swarmllm.chat import Chat

MESSAGES = [{"role": "user", "content": "hi"}]
CORPUS = [
    "Hello world, héllo wörld! 日本語のテキスト 你好世界 😀🎉👍🏽 e\u0301 n\u0303 café naïve",
    "The quick brown fox jumps over the lazy dog. Don't stop; it's fine.",
    "Ünïcödé: ∑ ∫ √ → ← 😀😀 🇫🇷 한국어 ไทย العربية",
]


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2's, Llama 3's, Qwen's kind): a character may be split across tokens."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"]
    )
    backend.train_from_iterator(CORPUS * 3, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|endoftext|>", bos_token="<|endoftext|>"
    )


def byte_fallback_tokenizer() -> PreTrainedTokenizerFast:
    """SentencePiece as Llama 2's and Mistral's tokenizer.json has it: "▁" for a space, the first one dropped when
    decoding, and a character missing from the vocabulary as its UTF-8 bytes, one `<0xNN>` token each."""
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    words = [
        "▁",
        "▁Hello",
        "▁world",
        "Hello",
        "e",
        "\u0301",
        "▁caf",
        "é",
        "▁日本",
        "語",
        "!",
        ".",
        "▁the",
        "a",
    ]
    vocab = [(p, 0.0) for p in pieces] + [(w, -float(i + 1)) for i, w in enumerate(words)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0, byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def added_text(tokenizer, prompt: list[int], generated: list[int]) -> str:
    """The oracle: what the generated tokens add to the prompt's text, both decoded whole."""
    before, after = tokenizer.decode(prompt, skip_special_tokens=True), decoder(tokenizer)(prompt + generated)
    assert after.startswith(before)
    return after[len(before) :]


def streamed(assembler: TextAssembler, tokens: list[int]) -> list[str]:
    return [assembler.add(t) for t in tokens] + [assembler.finish()]


def test_an_answer_of_byte_tokens_after_a_prompt_of_byte_tokens_reads_as_decoded():
    """A prompt that ends with more byte tokens than the assembler's context (two emoji: 8 of them) left the
    context starting inside a character: SentencePiece's byte fallback then shows the whole run of bytes as
    U+FFFD, the answer's first bytes with it ("ü world" came out as "�� world")."""
    tokenizer = byte_fallback_tokenizer()
    rng = random.Random(0)
    groups = [  # the tokens of "ü", " world" and "😀" (a character missing from the vocabulary: its bytes)
        tokenizer.convert_tokens_to_ids(names)
        for names in (["<0xC3>", "<0xBC>"], ["▁world"], ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"])
    ]
    for _ in range(200):
        prompt = tokenizer(
            "".join(rng.choice(["😀", "é", "日本", " a", "ü", "✓"]) for _ in range(rng.randint(1, 5)))
        )["input_ids"]
        generated = [t for _ in range(rng.randint(1, 4)) for t in rng.choice(groups)]
        want = added_text(tokenizer, prompt, generated)
        if "\ufffd" in want:
            continue  # (bytes that never make a character)
        pieces = streamed(TextAssembler(decoder(tokenizer), context=prompt), generated)
        assert "".join(pieces) == want, (tokenizer.convert_ids_to_tokens(prompt + generated), pieces)


def bigram_checkpoint(path, tokenizer, successor: dict[int, int]) -> str:
    """A one-block Llama whose greedy next token is `successor[token]` (EOS for any other), with `tokenizer`:
    its block adds nothing (all zero), its embeddings are one-hot and its LM head the table."""
    vocab = len(tokenizer)
    hidden = vocab + -vocab % 4
    config = LlamaConfig(
        hidden_size=hidden, num_attention_heads=1, num_key_value_heads=1, head_dim=hidden, intermediate_size=4,
        num_hidden_layers=1, vocab_size=vocab, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.fill_(1.0) if "norm" in name else param.zero_()
        model.model.embed_tokens.weight[:, :vocab] = torch.eye(vocab)
        for token in range(vocab):
            model.lm_head.weight[successor.get(token, tokenizer.eos_token_id), token] = 1.0
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class Served:
    """A bigram checkpoint whose greedy answer to `prompt` (and to any prompt that ends with a token of
    `also_after`) is `answer`, then EOS."""

    def __init__(self, tokenizer, prompt: list[int], answer: list[int], path, also_after: list[int] = ()):
        starts = [prompt[-1], *also_after]
        assert not set(starts) & set(answer) and len(set(answer)) == len(answer)
        successor = {start: answer[0] for start in starts} | dict(zip(answer, answer[1:]))
        self.tokenizer, self.prompt, self.answer = tokenizer, prompt, answer
        self.path = bigram_checkpoint(path, tokenizer, successor)


async def _client(engine) -> TestClient:
    client = TestClient(TestServer(Gateway([Api(engine)]).app()))
    await client.start_server()
    return client


async def _events(client, path: str, body: dict) -> list[dict]:
    """A streamed answer's server-sent events (or Ollama's lines)."""
    raw = (await (await client.post(path, json=body)).read()).decode()
    if path.startswith("/api/"):
        return [json.loads(line) for line in raw.splitlines()]
    return [json.loads(e.split("data: ", 1)[1]) for e in raw.split("\n\n") if "data: {" in e]


@pytest.fixture(scope="module")
def emoji_answer(tmp_path_factory):
    """Byte fallback: a prompt that ends with two emoji (8 byte tokens), an answer of "ü world✓é!" whose "ü" and
    "✓" are bytes (the first joined to the prompt's run) and whose "é" is "e" and a combining mark, then EOS."""
    tokenizer = byte_fallback_tokenizer()
    prompt = tokenizer("Emoji: 😀😀")["input_ids"]
    answer = tokenizer.convert_tokens_to_ids(
        ["<0xC3>", "<0xBC>", "▁world", "<0xE2>", "<0x9C>", "<0x93>", "e", "\u0301", "!"]
    )
    chat = tokenizer(chat_prompt(tokenizer, MESSAGES), add_special_tokens=False)["input_ids"]
    served = Served(tokenizer, prompt, answer, tmp_path_factory.mktemp("emoji-answer"), also_after=[chat[-1]])
    with model_over_one_server(served.path, "text-streaming-emoji") as model:
        engine = Engine(model, tokenizer, "m", context_length=64, max_concurrent=2, keep_sessions=0)
        yield served, engine
        engine.shutdown()


async def test_every_face_streams_and_returns_the_decoded_answer(emoji_answer):
    """Completions, Ollama's generate (raw) whole and streamed: the text is what the answer's tokens add to the
    prompt's (decoded whole), with finish reason "stop" and the EOS counted."""
    served, engine = emoji_answer
    tokenizer, prompt = served.tokenizer, served.prompt
    want = added_text(tokenizer, prompt, served.answer)
    assert "\ufffd" not in want
    client = await _client(engine)
    try:
        body = {"model": "m", "prompt": prompt, "max_tokens": 20, "temperature": 0}
        whole = await (await client.post("/v1/completions", json=body)).json()
        (choice,) = whole["choices"]
        assert (choice["text"], choice["finish_reason"]) == (want, "stop")
        assert whole["usage"]["completion_tokens"] == len(served.answer) + 1  # (EOS)
        events = await _events(client, "/v1/completions", {**body, "stream": True})
        assert "".join(c["text"] for e in events for c in e["choices"]) == want
        ollama = {"model": "m", "prompt": "Emoji: 😀😀", "raw": True, "options": {"temperature": 0}}
        whole = await (await client.post("/api/generate", json={**ollama, "stream": False})).json()
        assert (whole["response"], whole["done_reason"], whole["eval_count"]) == (
            want,
            "stop",
            len(served.answer) + 1,
        )
        lines = await _events(client, "/api/generate", ollama)
        assert "".join(line["response"] for line in lines) == want and lines[-1]["done"]
    finally:
        await client.close()


def stopped_text(decode, tokens: list[int], stops: list[str], min_tokens: int) -> tuple[str, str | None, int]:
    """The oracle for stop strings (vLLM's, OpenAI's): after each token past the first `min_tokens`, a stop string
    that ends in the text that token added ends the answer; the text is cut where the first of them starts.
    (text, finish reason, tokens generated)."""
    done = 0  # characters of the text before this token (less a character not yet whole)
    for k in range(1, len(tokens) + 1):
        text = decode(tokens[:k])
        if k > min_tokens:
            found = [i for s in stops if (i := text.find(s, max(0, done - len(s) + 1))) >= 0]
            if found:
                return text[: min(found)], "stop", k
        done = max(done, len(text.rstrip("\ufffd")))
    return decode(tokens), None, len(tokens)


@pytest.mark.parametrize("make", [byte_level_tokenizer, byte_fallback_tokenizer])
def test_stop_strings_cut_the_answer_where_the_oracle_does(make):
    """Random answers (multi-byte characters split across tokens, combining marks) and stop strings drawn from
    them: spanning tokens, inside one, several, one the start of another, at the first token, with and without
    `min_tokens`. Before, a stop string that began in the first `min_tokens` tokens' text and ended after it
    left its beginning in the answer (min_tokens 2, stop "ab", tokens "x" "a" "b": "xa", not "x")."""
    tokenizer = make()
    decode = decoder(tokenizer)
    rng = random.Random(1)
    alphabet = ["a", "b", "x", " ", "é", "e\u0301", "日", "😀", "ü", "!"]
    for _ in range(1500):
        tokens = tokenizer(
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 8))), add_special_tokens=False
        )["input_ids"]
        text = decode(tokens)
        stops = []
        for _ in range(rng.randint(1, 3)):
            start = rng.randrange(len(text))
            stops.append(text[start : start + rng.randint(1, 3)])
        min_tokens = rng.choice([0, 0, 1, 2, 3])
        assembler = TextAssembler(decode, stops, min_tokens=min_tokens)
        pieces = streamed(assembler, tokens)
        got = ("".join(pieces), assembler.finish_reason, len(assembler.tokens))
        assert got == stopped_text(decode, tokens, stops, min_tokens), (tokens, stops, min_tokens, pieces)
        if "\ufffd" not in text:
            assert not any("\ufffd" in piece for piece in pieces)


def expected(tokenizer, prompt: list[int], answer: list[int], stops: list[str], max_tokens: int):
    """(text, finish reason, completion tokens) of a greedy answer `answer` then EOS to `prompt`, by the oracles:
    what the tokens add to the prompt's text, cut by the stop strings or `max_tokens`."""
    before = tokenizer.decode(prompt, skip_special_tokens=True)

    def decode(ids: list[int]) -> str:  # (bytes joined to the prompt's that make no character yet: U+FFFD)
        after = decoder(tokenizer)(prompt + ids)
        return after[len(before) :] if after.startswith(before) else "\ufffd"

    text, reason, count = stopped_text(decode, answer[:max_tokens], stops, 0)
    if reason is None:
        reason, count = ("stop", count + 1) if len(answer) < max_tokens else ("length", count)
    return text, reason, count


CASES = [  # (stop strings, max_tokens): of the answer "ü world✓é!" (é: "e" and a combining mark)
    ([], 20),  # EOS
    ([], 4),  # cut inside "✓" (its first byte): the text ends as decoded, with U+FFFD
    ([], 6),  # cut right after "✓"
    (["d✓"], 20),  # a stop string spanning tokens, one of them bytes
    (["orl"], 20),  # inside one token
    (["ü"], 20),  # at the very first tokens
    (["é!", "\u0301"], 20),  # two, one inside the other's first character
    (["✓é", "✓"], 20),  # one the start of the other
    (["✓"], 5),  # the stop string would have come after max_tokens
]


@pytest.mark.parametrize(("stops", "max_tokens"), CASES)
async def test_every_face_returns_and_streams_the_oracles_text(emoji_answer, stops, max_tokens):
    """OpenAI's completions, chat and Responses, Ollama's generate and chat, each whole and streamed: the text,
    finish reason (Ollama's `done_reason`, the Responses' status) and completion tokens are the oracle's."""
    served, engine = emoji_answer
    tokenizer, answer = served.tokenizer, served.answer
    chat = tokenizer(chat_prompt(tokenizer, MESSAGES), add_special_tokens=False)["input_ids"]
    want = expected(tokenizer, served.prompt, answer, stops, max_tokens)
    want_chat = expected(tokenizer, chat, answer, stops, max_tokens)
    sampling = {"model": "m", "temperature": 0, "stop": stops}
    options = {"model": "m", "options": {"temperature": 0, "stop": stops, "num_predict": max_tokens}}
    client = await _client(engine)
    try:
        body = {**sampling, "prompt": served.prompt, "max_tokens": max_tokens}
        reply = await (await client.post("/v1/completions", json=body)).json()
        got = (
            reply["choices"][0]["text"],
            reply["choices"][0]["finish_reason"],
            reply["usage"]["completion_tokens"],
        )
        assert got == want, "completions"
        events = await _events(
            client, "/v1/completions", {**body, "stream": True, "stream_options": {"include_usage": True}}
        )
        text = "".join(c["text"] for e in events for c in e["choices"])
        reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert (text, *reasons, events[-1]["usage"]["completion_tokens"]) == want, "completions, streamed"

        body = {**sampling, "messages": MESSAGES, "max_tokens": max_tokens}
        reply = await (await client.post("/v1/chat/completions", json=body)).json()
        (choice,) = reply["choices"]
        got = choice["message"]["content"], choice["finish_reason"], reply["usage"]["completion_tokens"]
        assert got == want_chat, "chat"
        events = await _events(
            client,
            "/v1/chat/completions",
            {**body, "stream": True, "stream_options": {"include_usage": True}},
        )
        text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        assert (text, *reasons, events[-1]["usage"]["completion_tokens"]) == want_chat, "chat, streamed"

        body = {**sampling, "input": "hi", "max_output_tokens": max_tokens}
        status = "completed" if want_chat[1] == "stop" else "incomplete"
        reply = await (await client.post("/v1/responses", json=body)).json()
        got = reply["output"][0]["content"][0]["text"], reply["status"], reply["usage"]["output_tokens"]
        assert got == (want_chat[0], status, want_chat[2]), "responses"
        events = await _events(client, "/v1/responses", {**body, "stream": True})
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert (text, events[-1]["response"]["status"]) == (want_chat[0], status), "responses, streamed"

        for path, body, field, want_here in [
            ("/api/generate", {**options, "prompt": "Emoji: 😀😀", "raw": True}, "response", want),
            ("/api/chat", {**options, "messages": MESSAGES}, "message", want_chat),
        ]:
            reply = await (await client.post(path, json={**body, "stream": False})).json()
            text = reply[field] if field == "response" else reply[field]["content"]
            assert (text, reply["done_reason"], reply["eval_count"]) == want_here, path
            lines = await _events(client, path, body)
            text = "".join(line[field] if field == "response" else line[field]["content"] for line in lines)
            assert (text, lines[-1]["done_reason"], lines[-1]["eval_count"]) == want_here, f"{path}, streamed"
    finally:
        await client.close()


def test_swarmllm_chat_prints_the_decoded_answer(emoji_answer):
    """`swarmllm chat` writes each answer as it comes: what it printed is the answer's tokens decoded."""
    served, engine = emoji_answer
    chat = Chat(engine.model, served.tokenizer, temperature=0, max_new_tokens=20, context_length=64)
    out = io.StringIO()
    answer = chat.say("hi", out)
    assert out.getvalue() == decoder(served.tokenizer)(served.answer) + "\n" and answer == out.getvalue()[:-1]
    assert chat.last.tokens == len(served.answer) + 1


async def test_completion_logprobs_tokens_join_to_the_text_and_offsets_point_into_it(emoji_answer):
    """Completions' `logprobs`: the tokens joined are the text, whole or streamed, and each `text_offset` is where
    its token's text starts in it, also where a character's bytes span tokens (a token that starts one reads "",
    the one that completes it the whole character; alone each would read U+FFFD and the offsets drift)."""
    served, engine = emoji_answer
    want = added_text(served.tokenizer, served.prompt, served.answer)
    client = await _client(engine)
    try:
        body = {"model": "m", "prompt": served.prompt, "max_tokens": 20, "temperature": 0, "logprobs": 1}
        (choice,) = (await (await client.post("/v1/completions", json=body)).json())["choices"]
        events = await _events(client, "/v1/completions", {**body, "stream": True})
    finally:
        await client.close()
    streamed = [c["logprobs"] for e in events for c in e["choices"] if c.get("logprobs")]
    for tokens, offsets in [
        (choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]),
        ([t for lp in streamed for t in lp["tokens"]], [o for lp in streamed for o in lp["text_offset"]]),
    ]:
        assert "".join(tokens) == want == choice["text"]
        assert offsets == [len("".join(tokens[:i])) for i in range(len(tokens))]
        assert all(want.startswith(t, o) for t, o in zip(tokens, offsets, strict=True))
