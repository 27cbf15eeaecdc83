"""Edge cases of the model configs and inputs where our blocks must still give transformers' own outputs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm.models import load_client_head, load_span

LOGITS_ATOL = 1e-4
SEQ_LEN = 12


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def hf_and_ours(path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of one random batch from transformers' model and from our client head + span."""
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    _, head = load_client_head(path)
    span = load_span(path, 0, hf.config.num_hidden_layers)
    ids = torch.randint(3, hf.config.vocab_size, (2, SEQ_LEN), generator=torch.Generator().manual_seed(1))
    return hf(ids).logits, head.logits(span(head.embed(ids)))


def test_llama_ignores_a_sliding_window_in_its_config(checkpoints):
    """transformers' Llama attends to the whole prefix whatever `sliding_window` its config.json carries (some
    converted checkpoints keep Mistral's): a window there must not reach our Llama blocks."""
    expected, logits = hf_and_ours(checkpoints("llama", sliding_window=4))
    torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL, rtol=0)


def test_swish_is_silu(checkpoints):
    """transformers maps `hidden_act: swish` to the same function as `silu`."""
    expected, logits = hf_and_ours(checkpoints("llama", hidden_act="swish"))
    torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL, rtol=0)


def test_a_pre_quantized_checkpoint_is_refused_by_name(checkpoints, tmp_path):
    """A GPTQ/AWQ/bitsandbytes checkpoint's weights are not the names and shapes our blocks load: refused with
    its method named, rather than a list of missing keys."""
    source = checkpoints("llama")
    for item in source.iterdir():
        (tmp_path / item.name).symlink_to(item)
    config = json.loads((source / "config.json").read_text())
    (tmp_path / "config.json").unlink()
    (tmp_path / "config.json").write_text(
        json.dumps({**config, "quantization_config": {"quant_method": "gptq"}})
    )
    with pytest.raises(ValueError, match="pre-quantized checkpoints \\(gptq\\)"):
        load_span(tmp_path, 0, 1)
