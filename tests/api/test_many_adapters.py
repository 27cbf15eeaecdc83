"""`swarmllm api --lora-modules` with more adapters than a server keeps for one client (4): requests for all of them
at once each answer as PEFT's adapter on transformers' model, the servers' least recently used adapters giving way
and uploaded again when asked for, as vLLM serves any number of `--lora-modules`."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmllm.models import load_config
from swarmllm.models.lora import LoraSettings, lora_shapes, write_peft_adapter

ADAPTERS = 6
PROMPT = "the cat"


def test_six_lora_modules_answer_at_once_as_peft(local, llama_checkpoint, tmp_path):
    peft = pytest.importorskip("peft")
    _, config = load_config(llama_checkpoint)
    settings = LoraSettings(rank=4, alpha=8, modules=("q_proj", "v_proj"))
    folders = []
    for i in range(ADAPTERS):
        generator = torch.Generator().manual_seed(i)
        shapes = lora_shapes(config, settings, range(config.num_layers))
        tensors = {name: torch.randn(shape, generator=generator) * 0.5 for name, shape in shapes.items()}
        folders.append(tmp_path / f"a{i}")
        write_peft_adapter(folders[-1], settings, tensors, str(llama_checkpoint))
    tokenizer = AutoTokenizer.from_pretrained(llama_checkpoint)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    want = {}
    for i, folder in enumerate(folders):
        base = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, folder).eval()
        tokens = model.generate(input_ids=ids, max_new_tokens=6, do_sample=False)[0].tolist()
        before = tokenizer.decode(ids[0], skip_special_tokens=True)  # the API's text: what the tokens add
        want[f"a{i}"] = tokenizer.decode(tokens, skip_special_tokens=True)[len(before) :]
    assert len(set(want.values())) > ADAPTERS // 2  # (the adapters differ)

    local.add_servers([(str(llama_checkpoint), (0, 2)), (str(llama_checkpoint), (2, 4))])
    url = local.start_api(
        str(llama_checkpoint), extra=["--lora-modules", *[f"a{i}={f}" for i, f in enumerate(folders)]]
    )
    client = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)
    assert len(client.models.list().data) == 1 + ADAPTERS

    def complete(name: str) -> tuple[str, str]:
        reply = client.completions.create(model=name, prompt=PROMPT, max_tokens=6, temperature=0)
        return name, reply.choices[0].text

    names = [f"a{i % ADAPTERS}" for i in range(3 * ADAPTERS)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(complete, names))
    assert answers == [(name, want[name]) for name in names]
