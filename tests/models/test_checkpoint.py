"""Loading a span of blocks or the client head from a checkpoint, reading only the tensors asked for."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm.models import (
    files_for_tensors,
    load_client_head,
    load_config,
    load_span,
    resolve_checkpoint,
    tensor_names_for_blocks,
)
from swarmllm.models.checkpoint import INDEX_FILE
from swarmllm.models.llama import block_state_from_hf

BLOCK_TENSORS = [
    "input_layernorm.weight",
    "mlp.down_proj.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "post_attention_layernorm.weight",
    "self_attn.k_proj.weight",
    "self_attn.o_proj.weight",
    "self_attn.q_proj.weight",
    "self_attn.v_proj.weight",
]


@pytest.fixture(scope="module")
def sharded(checkpoints):
    return checkpoints("llama", num_layers=8, shard=True)


@pytest.fixture(scope="module")
def sharded_hf(sharded):
    return AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32)


def weight_map(path) -> dict[str, str]:
    return json.loads((path / INDEX_FILE).read_text())["weight_map"]


def test_tensor_names_for_blocks_selects_exactly_the_range():
    names = [
        f"model.layers.{i}.{t}"
        for i in (12, 1, 2, 3, 21)
        for t in ("mlp.up_proj.weight", "input_layernorm.weight")
    ]
    names += ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    names += ["model.layers.2.self_attn.rotary_emb.inv_freq"]  # in some old Llama 2 conversions; never loaded
    expected = [
        "model.layers.2.input_layernorm.weight",
        "model.layers.2.mlp.up_proj.weight",
        "model.layers.3.input_layernorm.weight",
        "model.layers.3.mlp.up_proj.weight",
    ]
    assert tensor_names_for_blocks(names, 2, 4) == expected
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "x.safetensors")}
    assert tensor_names_for_blocks(index, 2, 4) == expected
    assert tensor_names_for_blocks(index["weight_map"], 2, 4) == expected
    assert tensor_names_for_blocks(names, 1, 2) == [
        "model.layers.1.input_layernorm.weight",
        "model.layers.1.mlp.up_proj.weight",
    ]  # not layer 12 or 21


def test_files_for_tensors_groups_names_by_shard():
    index = {"a": "one.safetensors", "b": "two.safetensors", "c": "one.safetensors", "d": "three.safetensors"}
    assert files_for_tensors(index, ["a", "b", "c"]) == {
        "one.safetensors": ["a", "c"],
        "two.safetensors": ["b"],
    }


def test_load_span_holds_only_its_blocks_with_the_checkpoint_values(sharded, sharded_hf):
    span = load_span(sharded, 2, 4)
    assert (span.start, span.end, len(span.blocks)) == (2, 4, 2)
    state = span.state_dict()
    ours = sorted(block_state_from_hf(dict.fromkeys(BLOCK_TENSORS, torch.zeros(1))))
    assert sorted(state) == sorted(f"blocks.{i}.{t}" for i in (0, 1) for t in ours)
    for i, layer in ((0, 2), (1, 3)):
        for name, tensor in block_state_from_hf(sharded_hf.model.layers[layer].state_dict()).items():
            assert torch.equal(state[f"blocks.{i}.{name}"], tensor), name
    assert not any(p.is_meta for p in span.parameters())


def test_load_span_opens_only_the_shards_holding_its_blocks(sharded, tmp_path):
    index = weight_map(sharded)
    needed = files_for_tensors(index, tensor_names_for_blocks(index, 2, 4))
    assert 0 < len(needed) < len(set(index.values()))
    partial = tmp_path / "partial"
    shutil.copytree(
        sharded, partial, ignore=lambda _, files: [f for f in files if f.endswith(".safetensors")]
    )
    for file in needed:
        shutil.copy(sharded / file, partial / file)

    span = load_span(partial, 2, 4)  # would fail opening any shard it does not need
    reference = load_span(sharded, 2, 4)
    hidden = torch.randn(1, 5, span.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(span(hidden), reference(hidden))
    with pytest.raises(FileNotFoundError):
        load_span(partial, 6, 8)


def test_single_file_checkpoint(checkpoints):
    path = checkpoints("llama")
    assert not (path / INDEX_FILE).exists()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    span = load_span(path, 1, 3)
    state = span.blocks[1].state_dict()
    for name, tensor in block_state_from_hf(hf.model.layers[2].state_dict()).items():
        assert torch.equal(state[name], tensor)
    # the stacked projections hold HF's parts in order
    qkv = state["self_attn.qkv_proj.weight"]
    hf_attn = hf.model.layers[2].self_attn
    assert torch.equal(qkv, torch.cat([hf_attn.q_proj.weight, hf_attn.k_proj.weight, hf_attn.v_proj.weight]))


def test_untied_client_head_has_its_own_lm_head(sharded, sharded_hf):
    hf_config, head = load_client_head(sharded)
    assert hf_config.model_type == "llama" and not hf_config.tie_word_embeddings
    assert head.lm_head.weight is not head.embed_tokens.weight
    assert torch.equal(head.lm_head.weight, sharded_hf.lm_head.weight)
    assert torch.equal(head.embed_tokens.weight, sharded_hf.model.embed_tokens.weight)
    assert torch.equal(head.norm.weight, sharded_hf.model.norm.weight)
    assert not torch.equal(head.lm_head.weight, head.embed_tokens.weight)


def test_tied_client_head_shares_the_embedding(checkpoints):
    path = checkpoints("qwen2")
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf_config, head = load_client_head(path)
    assert hf_config.tie_word_embeddings
    assert head.lm_head.weight is head.embed_tokens.weight
    assert torch.equal(head.embed_tokens.weight, hf.model.embed_tokens.weight)
    assert {name for name, _ in head.named_parameters()} == {"embed_tokens.weight", "norm.weight"}


def test_bfloat16_load(sharded):
    span = load_span(sharded, 0, 2, dtype=torch.bfloat16)
    assert {p.dtype for p in span.parameters()} == {torch.bfloat16}
    assert span.rotary.inv_freq.dtype == torch.float32  # RoPE frequencies stay exact
    _, head = load_client_head(sharded, dtype=torch.bfloat16)
    assert {p.dtype for p in head.parameters()} == {torch.bfloat16}

    reference = load_span(sharded, 0, 2)
    hidden = torch.randn(1, 6, span.config.hidden_size)
    with torch.no_grad():
        low = span(hidden.bfloat16())
        assert low.dtype == torch.bfloat16
        torch.testing.assert_close(low.float(), reference(hidden), atol=0.1, rtol=0.05)


def test_bfloat16_checkpoint_loads_as_float32(checkpoints):
    path = checkpoints("llama", dtype=torch.bfloat16)
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert hf.dtype == torch.bfloat16
    span = load_span(path, 0, 1, dtype=torch.float32)
    assert {p.dtype for p in span.parameters()} == {torch.float32}
    up = span.blocks[0].mlp.gate_up_proj.weight[span.config.intermediate_size :]
    assert torch.equal(up, hf.model.layers[0].mlp.up_proj.weight.float())


def test_config_and_local_resolution(sharded):
    assert resolve_checkpoint(sharded) == sharded
    assert resolve_checkpoint(str(sharded), allow_patterns=["*.json"]) == sharded
    hf_config, config = load_config(sharded)
    assert (config.family, config.num_layers, config.hidden_size) == ("llama", 8, hf_config.hidden_size)


def test_bad_requests_are_refused(sharded):
    with pytest.raises(ValueError, match="dtype"):
        load_span(sharded, 0, 1, dtype=torch.float64)
    with pytest.raises(ValueError, match="span"):
        load_span(sharded, 6, 9)
    with pytest.raises(ValueError, match="span"):
        load_span(sharded, 3, 3)


def test_progress_is_logged_per_block(sharded, caplog):
    with caplog.at_level(logging.INFO, logger="swarmllm.models.checkpoint"):
        load_span(sharded, 5, 7)
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == ["loaded block 5", "loaded block 6"]
