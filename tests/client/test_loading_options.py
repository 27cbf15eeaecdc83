"""`from_pretrained`'s loading options as transformers users pass them: `torch_dtype` (transformers' former name
for `dtype`), dtypes by name and "auto", the hub's `revision`, `cache_dir` and `token` (through a local hub cache,
offline: the real hub code path), and options that only mean something for local blocks refused by name."""

from __future__ import annotations

import json
import shutil

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
