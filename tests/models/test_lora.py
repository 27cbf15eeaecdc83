"""LoRA in our stacked projections against PEFT on transformers' model, and PEFT folders both ways."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm.models import load_client_head, load_span
from swarmllm.models.lora import (
    LoraSettings,
    lora_shapes,
    read_peft_adapter,
    read_peft_head,
    span_lora,
    tensor_name,
    write_peft_adapter,
)

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
peft = pytest.importorskip("peft")

MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def random_adapter(span, settings, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = lora_shapes(span.config, settings, range(span.config.num_layers))
    return {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}


@pytest.fixture(scope="module")
def model(llama_checkpoint):
    _, head = load_client_head(llama_checkpoint)
    return head, load_span(llama_checkpoint, 0, 4)


def peft_model(path, adapter_dir):
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return peft.PeftModel.from_pretrained(base, adapter_dir).eval()


@pytest.mark.parametrize("modules", [("q_proj", "v_proj"), MODULES])
def test_span_with_lora_equals_peft_on_transformers(model, llama_checkpoint, tmp_path, modules):
    head, span = model
    settings = LoraSettings(rank=4, alpha=8, modules=modules)
    tensors = random_adapter(span, settings)
    write_peft_adapter(tmp_path, settings, tensors, str(llama_checkpoint))
    ids = torch.randint(3, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = peft_model(llama_checkpoint, tmp_path)(ids).logits
        lora = span_lora(span.config, settings, tensors, range(4))
        ours = head.logits(span(head.embed(ids), lora=lora))
        plain = head.logits(span(head.embed(ids)))
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert (ours - plain).abs().max() > 1e-2  # the adapter matters


def test_peft_folder_round_trip(model, tmp_path):
    _, span = model
    settings = LoraSettings(rank=2, alpha=4, modules=("q_proj", "down_proj"), dropout=0.1)
    tensors = random_adapter(span, settings)
    write_peft_adapter(tmp_path, settings, tensors, "base")
    read_settings, read = read_peft_adapter(tmp_path, span.config)
    assert read_settings == settings
    assert read.keys() == tensors.keys()
    for name in tensors:
        assert torch.equal(read[name], tensors[name])


def test_folders_that_do_not_fit_are_refused(model, tmp_path):
    _, span = model
    settings = LoraSettings(rank=2, alpha=4, modules=("q_proj",))
    tensors = random_adapter(span, settings)
    del tensors[tensor_name(3, "q_proj", "B")]
    write_peft_adapter(tmp_path, settings, tensors, "base")
    with pytest.raises(ValueError, match="missing"):
        read_peft_adapter(tmp_path, span.config)
    with pytest.raises(ValueError, match="target modules"):
        LoraSettings(rank=2, alpha=4, modules=("lm_head",))


def test_decode_path_applies_the_adapter_as_forward_does(model):
    _, span = model
    settings = LoraSettings(rank=4, alpha=8, modules=MODULES)
    lora = span_lora(span.config, settings, random_adapter(span, settings, seed=3), range(4))
    hidden = torch.randn(2, 6, span.config.hidden_size)
    with torch.no_grad():
        full = span(hidden, lora=lora)
        keys = torch.zeros(4, 2, span.config.num_kv_heads, 6, span.config.head_dim)
        values = torch.zeros_like(keys)
        steps = []
        for t in range(6):
            positions = torch.full((2,), t)
            slot = torch.tensor([t])
            out = span.decode(
                hidden[:, t], positions, slot, keys[:, :, :, : t + 1], values[:, :, :, : t + 1], lora=lora
            )
            steps.append(out)
    torch.testing.assert_close(torch.stack(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_dropout_masks_repeat_with_the_seed_and_gradients_reach_a_and_b(model):
    _, span = model
    settings = LoraSettings(rank=2, alpha=4, modules=("q_proj", "v_proj", "up_proj"), dropout=0.5)
    tensors = {k: v.requires_grad_() for k, v in random_adapter(span, settings).items()}
    hidden = torch.randn(1, 5, span.config.hidden_size)

    def run(seed):
        generator = torch.Generator().manual_seed(seed)
        return span(hidden, lora=span_lora(span.config, settings, tensors, range(4), generator))

    first, again, other = run(1), run(1), run(2)
    assert torch.equal(first, again) and not torch.equal(first, other)
    first.sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in tensors.values())


def test_a_classifiers_adapter_as_peft_writes_it_serves_and_gives_its_head(model, llama_checkpoint, tmp_path):
    """PEFT's SEQ_CLS adapter (task_type SEQ_CLS, the trained `score` head under modules_to_save) loads on a
    server, which takes its LoRA, and on a client, which takes the head too; ours is written alike."""
    from transformers import AutoModelForSequenceClassification

    _, span = model
    base = AutoModelForSequenceClassification.from_pretrained(llama_checkpoint, num_labels=3)
    config = peft.LoraConfig(task_type="SEQ_CLS", r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    theirs = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                parameter.normal_(generator=torch.Generator().manual_seed(len(name)))
    theirs.save_pretrained(tmp_path / "peft")
    settings, tensors = read_peft_adapter(tmp_path / "peft", span.config)
    assert settings == LoraSettings(rank=2, alpha=4, modules=("q_proj", "v_proj"))
    assert tensors.keys() == lora_shapes(span.config, settings, range(4)).keys()
    head = read_peft_head(tmp_path / "peft")
    trained = theirs.base_model.model.score.modules_to_save["default"].weight
    assert head is not None and torch.equal(head, trained.detach())

    write_peft_adapter(tmp_path / "ours", settings, tensors, str(llama_checkpoint), score=head)
    again = peft.PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(llama_checkpoint, num_labels=3), tmp_path / "ours"
    )
    ids = torch.randint(3, 100, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, theirs.eval()(ids).logits)
    assert read_peft_head(tmp_path / "ours") is not None
    # a causal LM's adapter holds no head
    write_peft_adapter(tmp_path / "causal", settings, tensors, str(llama_checkpoint))
    assert read_peft_head(tmp_path / "causal") is None
