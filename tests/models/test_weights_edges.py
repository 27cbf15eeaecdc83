"""Edge cases of loading weights: checkpoint layouts transformers reads that our loaders must read alike."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM

from swarmllm.models import load_client_head, load_span
from swarmllm.models.causal_lm import load_causal_lm
from swarmllm.models.convert import convert_to_ladder, save_weights
from swarmllm.models.panels import _compiler, build

LOGITS_ATOL = 1e-4


@pytest.mark.parametrize(("family", "shard"), [("qwen3", False), ("qwen2", True)])
def test_a_base_model_checkpoint_without_the_model_prefix_loads_as_transformers_loads_it(
    checkpoints, tmp_path, family, shard
):
    """A checkpoint saved from the base model (`AutoModel`, as embedding models ship: tensor names without the
    `model.` prefix, no LM head) is read by transformers' causal LM with the prefix added and the head tied; our
    span and client head read it alike, single file or sharded with blocks split over shards."""
    source = checkpoints(family)
    base = tmp_path / "base"
    AutoModel.from_pretrained(source, dtype=torch.float32).save_pretrained(
        base, max_shard_size="100KB" if shard else "10GB"
    )
    assert (base / "model.safetensors.index.json").exists() == shard
    hf = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    ids = torch.randint(4, 150, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        _, head = load_client_head(base)
        upper = load_span(base, 1, hf.config.num_hidden_layers)
        hidden = load_span(base, 0, 1)(head.embed(ids))
        got = head.logits(upper(hidden))
    torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_ATOL)


@pytest.mark.parametrize(("family", "shard"), [("llama", False), ("qwen2", True)])
def test_a_checkpoint_of_pytorch_bin_files_loads_as_its_safetensors_twin(
    checkpoints, tmp_path, family, shard
):
    """Older hub repositories hold `pytorch_model.bin` (or shards with `pytorch_model.bin.index.json`) instead of
    safetensors, which transformers still reads: the same weights give the same logits."""
    source = checkpoints(family, shard=shard)
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for file in source.iterdir():
        if file.suffix == ".safetensors":
            torch.save(
                load_file(file),
                legacy / file.name.replace("model", "pytorch_model").replace(".safetensors", ".bin"),
            )
        elif file.name == "model.safetensors.index.json":
            index = json.loads(file.read_text())
            index["weight_map"] = {
                name: shard_file.replace("model", "pytorch_model").replace(".safetensors", ".bin")
                for name, shard_file in index["weight_map"].items()
            }
            (legacy / "pytorch_model.bin.index.json").write_text(json.dumps(index))
        else:
            shutil.copy(file, legacy / file.name)
    assert not list(legacy.glob("*.safetensors"))
    assert (legacy / "pytorch_model.bin.index.json").exists() == shard
    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    ids = torch.randint(4, 150, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(ids).logits
        _, head = load_client_head(legacy, dtype=torch.bfloat16)
        span = load_span(legacy, 0, hf.config.num_hidden_layers, dtype=torch.bfloat16)
        assert {t.dtype for t in span.state_dict().values() if t.is_floating_point()} == {torch.bfloat16}
        _, head32 = load_client_head(legacy)
        got = head32.logits(load_span(legacy, 0, hf.config.num_hidden_layers)(head32.embed(ids)))
    torch.testing.assert_close(got, want, rtol=0, atol=LOGITS_ATOL)
    assert head.embed_tokens.weight.dtype == torch.bfloat16


def test_greedy_generation_of_no_new_tokens_returns_the_prompt(checkpoints):
    """`generate_greedy(ids, n)` is the prompt followed by n tokens: n = 0 adds none, a negative n is refused."""
    model = load_causal_lm(checkpoints("llama"))
    ids = torch.randint(4, 150, (2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.generate_greedy(ids, 0), ids)
    assert model.generate_greedy(ids, 3).shape == (2, 8)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate_greedy(ids, -1)


def test_trained_weights_are_saved_back_into_a_base_model_checkpoint(checkpoints, tmp_path):
    """`save_weights` writes a model back into a base model's checkpoint (names without `model.`) under its own
    names and dtype: reloading gives the model's weights."""
    base = tmp_path / "base"
    AutoModel.from_pretrained(checkpoints("qwen3"), dtype=torch.bfloat16).save_pretrained(
        base, max_shard_size="100KB"
    )
    converted = convert_to_ladder(base, tmp_path / "ladder", 1, 2)
    model = load_causal_lm(converted)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.5)
    save_weights(model, converted)
    reloaded = load_causal_lm(converted).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(reloaded[name], tensor.bfloat16().float()), name


def test_an_unwritable_kernel_folder_leaves_no_kernel_instead_of_failing(tmp_path, caplog):
    """Where the panel kernel cannot be built (here: its cache folder cannot be made, as on a read-only home),
    `build` gives None, so CPU projections stay in oneDNN's layout instead of the server failing to load."""
    compiler = _compiler()
    if compiler is None:
        pytest.skip("no C++ compiler on this machine")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert build(blocker / "kernels", compiler) is None
    assert "did not compile" in caplog.text
