"""`--device` and `--dtype` of the client commands (`swarmllm api`, `generate`, `chat`): the embeddings and LM head
they hold are in that dtype (on a GPU host, with `--device cuda`, half precision there). Over a real swarm of the
tiny Llama, an API with `--dtype bfloat16` answers with the greedy tokens and the log-probabilities of a client
loaded in bfloat16, which differ from a float32 client's (so the flag reached the head); `swarmllm generate
--dtype bfloat16` prints that client's text."""

import openai
import pytest
import torch
from test_cli_errors import swarmllm
from transformers import AutoTokenizer

from swarmllm import AutoDistributedModelForCausalLM

NEW_TOKENS = 8
PROMPT = [5, 17, 42, 9, 77, 3]


@pytest.fixture(scope="module")
def api(local, llama_checkpoint):
    local.add_server(str(llama_checkpoint), (0, 4), extra=["--throughput", "50", "--bandwidth", "1000"])
    url = local.start_api(str(llama_checkpoint), extra=["--name", "t", "--dtype", "bfloat16"])
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


def client_answer(path, peers, dtype) -> tuple[list[int], torch.Tensor]:
    """A client's greedy tokens after PROMPT and the log-probability of each, in `dtype`."""
    model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=peers, dtype=dtype)
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([PROMPT]), max_new_tokens=NEW_TOKENS, do_sample=False)
            logits = model(out).logits[0, len(PROMPT) - 1 : -1].float()
    finally:
        model.shutdown()
    tokens = out[0, len(PROMPT) :].tolist()
    chosen = torch.log_softmax(logits, -1)[torch.arange(len(tokens)), tokens]
    return tokens, chosen


def test_an_api_in_bfloat16_answers_as_a_bfloat16_client(api, local, llama_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(llama_checkpoint)
    answer = api.completions.create(
        model="t",
        prompt=PROMPT,
        max_tokens=NEW_TOKENS,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True},
    )
    half_tokens, half = client_answer(llama_checkpoint, local.initial_peers, torch.bfloat16)
    _, full = client_answer(llama_checkpoint, local.initial_peers, torch.float32)
    choice = answer.choices[0]
    prompt_text = tokenizer.decode(PROMPT, skip_special_tokens=True)
    assert prompt_text + choice.text == tokenizer.decode(PROMPT + half_tokens, skip_special_tokens=True)
    got = torch.tensor(choice.logprobs.token_logprobs)
    torch.testing.assert_close(got, half[: len(got)], rtol=0, atol=1e-3)
    assert (half - full).abs().max() > 1e-3  # bfloat16's head is not float32's: the flag took effect


def test_generate_in_bfloat16_prints_a_bfloat16_clients_text(api, local, llama_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(llama_checkpoint)
    prompt = "hello there"
    ids = tokenizer(prompt)["input_ids"]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=local.initial_peers, dtype=torch.bfloat16
    )
    try:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        model.shutdown()
    done = swarmllm(
        "generate", str(llama_checkpoint), "--initial-peers", *local.initial_peers, "--prompt", prompt,
        "--max-new-tokens", str(NEW_TOKENS), "--dtype", "bfloat16",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == tokenizer.decode(out[0], skip_special_tokens=True).strip()
