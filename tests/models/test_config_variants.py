"""Config variants of the Llama family against transformers on the same tiny checkpoint: logits of a long prompt
(longer than any sliding window) and of decode steps past it, and what must be refused at load time."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.local import LocalSwarm
from swarmllm.models import KVCache
from swarmllm.models.causal_lm import CausalLM, load_causal_lm

LOGITS_ATOL = 1e-4
PROMPT = 24
NEW_TOKENS = 8


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def with_config(source: Path, folder: Path, drop: Sequence[str] = (), **changes) -> Path:
    """`folder` holding `source`'s files (linked) with `changes` written into config.json and the keys `drop`
    taken out of it."""
    folder.mkdir()
    for item in source.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    config = {k: v for k, v in config.items() if k not in drop}
    (folder / "config.json").write_text(json.dumps({**config, **changes}))
    return folder


def decode_logits(model: CausalLM, tokens: torch.Tensor, prompt: int) -> torch.Tensor:
    """Logits [B, T - prompt, vocab] predicting tokens[:, prompt:]: a prefill of the first `prompt` tokens, then
    one-token steps through the decode path (as a server runs them)."""
    batch, total = tokens.shape
    cache = KVCache(model.config.num_layers, batch, total, model.config, torch.float32, "cpu")
    steps = [model(tokens[:, :prompt], cache=cache)[:, -1]]
    for slot in range(prompt, total - 1):
        hidden = model.span.decode(
            model.head.embed(tokens[:, slot]),
            torch.full((batch,), slot),
            torch.tensor([slot]),
            cache.keys[:, :, :, : slot + 1],
            cache.values[:, :, :, : slot + 1],
        )
        steps.append(model.head.logits(hidden))
    return torch.stack(steps, dim=1)


def assert_matches_transformers(path: Path) -> None:
    """Prefill logits, decode-step logits and greedy tokens of our model equal transformers' on `path`."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_causal_lm(path)
    ids = torch.randint(3, hf.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(ids), hf(ids).logits, atol=LOGITS_ATOL, rtol=0)
    tokens = hf.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, eos_token_id=None)
    expected = hf(tokens).logits[:, PROMPT - 1 : -1]
    torch.testing.assert_close(decode_logits(ours, tokens, PROMPT), expected, atol=LOGITS_ATOL, rtol=0)
    assert ours.generate_greedy(ids, NEW_TOKENS).tolist() == tokens.tolist()


def test_tied_config_with_a_distinct_lm_head_keeps_the_stored_head(checkpoints, tmp_path):
    """A checkpoint whose config says tie_word_embeddings but which stores its own, different lm_head.weight:
    transformers 5 keeps both tensors (it ties only equal ones), so the logits come from the stored head."""
    path = with_config(checkpoints("llama"), tmp_path / "tied", tie_word_embeddings=True)
    assert_matches_transformers(path)


YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64}


@pytest.mark.parametrize("family, rope", [("llama", YARN), ("llama3", None), ("qwen2", YARN)])
def test_top_level_original_max_position_embeddings_wins_as_in_transformers(
    checkpoints, tmp_path, family, rope
):
    """A config.json with `original_max_position_embeddings` next to (not inside) its rope parameters, as Phi-3
    style exports write it: transformers' scaled RoPE (llama3, yarn) reads the top-level value over the nested one."""
    changes = {"original_max_position_embeddings": 8} | ({"rope_parameters": rope} if rope else {})
    assert_matches_transformers(with_config(checkpoints(family), tmp_path / "rope", **changes))


@pytest.mark.parametrize(
    "family, overrides",
    [
        ("llama", {"head_dim": 32, "num_key_value_heads": 1}),  # head size apart from hidden / heads, MQA
        ("llama", {"num_key_value_heads": 4, "attention_bias": True, "mlp_bias": True}),  # MHA, every bias
        ("llama", {"tie_word_embeddings": True, "rms_norm_eps": 0.3, "vocab_size": 173}),
        (
            "mistral",
            {"head_dim": 24, "num_key_value_heads": 1},
        ),  # window 4, a prompt of 24 and 8 steps past it
        ("mistral", {"sliding_window": None}),
        ("qwen2", {"tie_word_embeddings": False, "head_dim": 32}),
        ("qwen3", {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 2}),
    ],
    ids=lambda value: value if isinstance(value, str) else "-".join(f"{k}={v}" for k, v in value.items()),
)
def test_shape_and_bias_variants_match_transformers(checkpoints, family, overrides):
    assert_matches_transformers(checkpoints(family, num_layers=3, **overrides))


@pytest.mark.parametrize(
    "family, changes",
    [
        # as Llama 3.1 / Qwen2.5 config.json files write them: `rope_scaling` (with `type` in older ones) and
        # a top-level rope_theta
        (
            "llama",
            {
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 16,
                },
            },
        ),
        ("llama", {"rope_theta": 777.0, "rope_scaling": {"type": "linear", "factor": 2.0}}),
        (
            "qwen2",
            {
                "rope_theta": 1e6,
                "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
            },
        ),
        (
            "mistral",
            {
                "rope_parameters": {
                    **YARN,
                    "beta_fast": 16.0,
                    "beta_slow": 2.0,
                    "attention_factor": 1.3,
                    "truncate": False,
                }
            },
        ),
        (
            "qwen2",
            {"use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
        ),
        (
            "qwen2",
            {
                "use_sliding_window": True,
                "sliding_window": 4,
                "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            },
        ),
    ],
    ids=[
        "llama3-legacy",
        "linear-legacy-type",
        "qwen2-yarn-legacy",
        "mistral-yarn-options",
        "qwen2-window",
        "qwen2-layer-types",
    ],
)
def test_config_json_variants_match_transformers(checkpoints, tmp_path, family, changes):
    drop = ["layer_types"]  # saved ones would keep every layer full: derived again from the window settings
    if "rope_scaling" in changes:  # the legacy keys alone, as older files have them
        drop.append("rope_parameters")
    assert_matches_transformers(
        with_config(checkpoints(family), tmp_path / "variant", tuple(drop), **changes)
    )


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}},
            "rope_type 'dynamic'",
        ),
        (
            {
                "rope_parameters": {
                    "rope_type": "longrope",
                    "rope_theta": 1e4,
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                    "original_max_position_embeddings": 16,
                }
            },
            "rope_type 'longrope'",
        ),
        ({"partial_rotary_factor": 0.5}, "partial rotary"),
        ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh'"),
    ],
    ids=["dynamic", "longrope", "partial-rotary", "gelu"],
)
def test_what_we_would_compute_differently_is_refused_at_load(checkpoints, tmp_path, changes, message):
    path = with_config(checkpoints("llama"), tmp_path / "refused", **changes)
    with pytest.raises(ValueError, match=message):
        load_causal_lm(path)


@pytest.mark.parametrize("family", ["llama3", "mistral", "qwen2"])
def test_bfloat16_prefill_matches_transformers(checkpoints, family):
    path = checkpoints(family)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    ours = load_causal_lm(path, dtype=torch.bfloat16)
    ids = torch.randint(3, hf.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(ours(ids).float(), hf(ids).logits.float(), atol=1e-2, rtol=0)


def test_windowed_layers_behind_a_server_split_match_transformers(checkpoints):
    """Qwen2 windowing its layers 1.. only, served as blocks [0, 1) and [1, 3) by two real servers: each server
    windows by absolute layer index, through a prompt longer than the window and decode steps past it."""
    path = checkpoints("qwen2", num_layers=3, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.randint(
        3, reference.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(2)
    )
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers([(str(path), (0, 1)), (str(path), (1, 3))])
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=local.initial_peers)
        try:
            torch.testing.assert_close(
                remote(input_ids=ids).logits, reference(ids).logits, atol=LOGITS_ATOL, rtol=0
            )
            ours = remote.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        finally:
            remote.shutdown()
    theirs = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()
