"""`from_pretrained`'s loading options as transformers users pass them: `torch_dtype` (transformers' former name
for `dtype`), dtypes by name and "auto", the hub's `revision`, `cache_dir` and `token` (through a local hub cache,
offline: the real hub code path), and options that only mean something for local blocks refused by name."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import urllib.request

import pytest
import torch
from huggingface_hub import constants

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.models import load_client_head

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def loaded(path, **options):
    """The model's head dtype and the model (shut down), joined to no swarm."""
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=[], spot_check_fraction=0, **options
    )
    model.shutdown()
    return model.head.embed_tokens.weight.dtype, model


@pytest.fixture(scope="module")
def checkpoint(checkpoints, tmp_path_factory):
    """The tiny Llama with its config naming bfloat16 (for "auto")."""
    path = tmp_path_factory.mktemp("auto") / "tiny"
    shutil.copytree(checkpoints("llama"), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    return path


def test_dtypes_as_transformers_takes_them(checkpoint):
    assert loaded(checkpoint, torch_dtype=torch.float16)[0] == torch.float16
    assert loaded(checkpoint, dtype="bfloat16")[0] == torch.bfloat16
    assert loaded(checkpoint, dtype="auto")[0] == torch.bfloat16  # the config's
    assert loaded(checkpoint)[0] == torch.float32
    with pytest.raises(ValueError, match="names no torch dtype"):
        loaded(checkpoint, dtype="float17")


def test_options_for_local_blocks_are_refused_by_name(checkpoint):
    """transformers' options for loading blocks locally mean nothing to a client: each is named (it reached the
    swarm client as a TypeError about `SwarmClient.__init__`)."""
    with pytest.raises(TypeError, match=r"no option 'device_map', 'low_cpu_mem_usage'.*room_wait_s"):
        loaded(checkpoint, low_cpu_mem_usage=True, device_map="auto")


def test_a_hub_id_loads_from_the_hub_cache_at_the_revision_asked(checkpoint, tmp_path, monkeypatch):
    """A hub id through huggingface_hub's own cache layout, offline: `cache_dir`, `revision` (a commit, and
    "main" through refs/main) and `token` reach it; a revision the cache lacks is its error."""
    repo = tmp_path / "models--swarm--tiny"
    shutil.copytree(checkpoint, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _, want = load_client_head(checkpoint)
    for revision in (COMMIT, None):
        dtype, model = loaded("swarm/tiny", cache_dir=tmp_path, revision=revision, token="hf_unused")
        assert dtype == torch.float32 and model.config.vocab_size == want.config.vocab_size
        assert torch.equal(model.head.embed_tokens.weight, want.embed_tokens.weight)
    with pytest.raises(Exception, match="cached snapshot"):
        loaded("swarm/tiny", cache_dir=tmp_path, revision="v2")


def hub_cache(root, snapshots: dict[str, object], main: str):
    """huggingface_hub's cache layout for the repo swarm/tiny under `root`: a snapshot folder per commit (a copy
    of the checkpoint given), refs/main naming `main`."""
    repo = root / "models--swarm--tiny"
    for commit, path in snapshots.items():
        shutil.copytree(path, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main)


def test_servers_and_clients_load_the_hub_revision_they_are_given(checkpoints, tmp_path, monkeypatch):
    """`serve swarm/tiny --revision COMMIT` serves that commit's weights (real processes reading the hub cache,
    offline); a client at the same revision (`from_pretrained(revision=)`, `generate` and `api --revision`)
    generates transformers' tokens of that checkpoint, and one at main (another commit, another checkpoint) is
    told that only another checkpoint is served."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarmllm.client.routing import MissingBlocksError
    from swarmllm.local import LocalSwarm

    # (of one shape: they share a fingerprint, so the servers' announced commit tells them apart)
    pinned, newer = checkpoints("llama"), checkpoints("llama", seed=1)
    other = "fedcba9876543210fedcba9876543210fedcba98"
    hub_cache(tmp_path, {COMMIT: pinned, other: newer}, main=other)
    # for the server's processes (their huggingface_hub reads it at import), and then for this one's
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    prompt = torch.tensor([[1, 17, 42, 99, 5]])
    reference = AutoModelForCausalLM.from_pretrained(pinned).eval()
    want = reference.generate(prompt, max_new_tokens=6, do_sample=False)
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_server("swarm/tiny", (0, 4), extra=["--revision", COMMIT])
        options = dict(initial_peers=swarm.initial_peers, cache_dir=tmp_path, missing_blocks_timeout_s=0)
        model = AutoDistributedModelForCausalLM.from_pretrained("swarm/tiny", revision=COMMIT, **options)
        try:
            assert model.generate(prompt, max_new_tokens=6, do_sample=False).tolist() == want.tolist()
        finally:
            model.shutdown()
        peers = ["--initial-peers", *swarm.initial_peers]
        revision = ["--revision", COMMIT, "--max-new-tokens", "6"]
        command = ["generate", "swarm/tiny", *peers, *revision, "--prompt", "the cat"]
        cli = [sys.executable, "-m", "swarmllm.cli", *command]
        out = subprocess.run(cli, capture_output=True, text=True, timeout=240)
        tokenizer = AutoTokenizer.from_pretrained(pinned)
        ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
        text = tokenizer.decode(
            reference.generate(ids, max_new_tokens=6, do_sample=False)[0], skip_special_tokens=True
        )
        assert out.returncode == 0 and out.stdout.splitlines()[-1] == text, out.stdout + out.stderr
        api = swarm.start_api("swarm/tiny", extra=["--revision", COMMIT])
        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 6, "temperature": 0}
        request = urllib.request.Request(
            api + "/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            assert "the cat" + json.load(reply)["choices"][0]["text"] == text
        at_main = AutoDistributedModelForCausalLM.from_pretrained("swarm/tiny", **options)
        try:
            with pytest.raises(MissingBlocksError, match="another model"):  # the commit differs
                at_main.generate(prompt, max_new_tokens=2, do_sample=False)
        finally:
            at_main.shutdown()
