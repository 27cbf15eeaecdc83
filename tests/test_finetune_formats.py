"""Fine-tuning's user surface against PEFT and transformers on the same checkpoint: PEFT configs honoured or
refused, adapters PEFT itself saved loaded with PEFT's logits, and a classifier's pooling and saved head as
transformers + PEFT have them. One real server process holds every block."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from swarmllm import (
    AutoDistributedModel,
    AutoDistributedModelForCausalLM,
    AutoDistributedModelForSequenceClassification,
)
from swarmllm.local import LocalSwarm
from swarmllm.models.lora import LoraSettings

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-4, atol=1e-5)


def ids(batch=2, length=6, seed=0):
    return torch.randint(3, 150, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "targets",
    [
        ["model.layers.0.self_attn.q_proj"],  # PEFT adapts layer 0 only
        ["layers.1.mlp.down_proj", "v_proj"],  # layer 1's down_proj only, v_proj everywhere
        ["mlp.q_proj"],  # no such module: PEFT raises
    ],
)
def test_target_modules_naming_some_layers_or_no_module_are_refused(targets):
    """PEFT matches a target by its full name's suffix: a target naming a layer adapts that layer alone, and a
    wrong path adapts nothing (PEFT raises). Applying it to every layer would train another model."""
    with pytest.raises(ValueError, match="target"):
        LoraSettings.from_peft(peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))


def assert_lora_grads_are_pefts(model, their_grads: dict) -> None:
    """Each LoRA tensor's gradient equals PEFT's, named as PEFT names it."""
    for name, weight in zip(model.lora.names, model.lora.weights, strict=True):
        layer, rest = name.split(".", 1)
        want = their_grads[f"base_model.model.model.layers.{layer}.{rest}.default.weight"]
        torch.testing.assert_close(weight.grad, want, **TOL)


def test_target_modules_as_peft_matches_every_layer_are_honoured():
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["self_attn.q_proj", "down_proj"])
    assert LoraSettings.from_peft(config).modules == ("q_proj", "down_proj")


@pytest.mark.parametrize(
    "option",
    [
        {"trainable_token_indices": [3, 4]},  # PEFT trains these embedding rows too
        {"alora_invocation_tokens": [5]},  # aLoRA: the adapter acts only after these tokens
        {"layer_replication": [[0, 2], [1, 4]]},  # PEFT builds a deeper model
        {"target_parameters": ["mlp.down_proj.weight"]},  # more adapted weights
        {"init_lora_weights": "pissa"},  # PEFT rewrites the base weights
    ],
)
def test_peft_options_that_compute_otherwise_are_refused(option):
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], task_type="CAUSAL_LM", **option)
    with pytest.raises(ValueError, match=next(iter(option))):
        LoraSettings.from_peft(config)


@pytest.mark.parametrize(
    "option", ["arrow_config", "use_bdlora", "velora_config", "monteclora_config", "kasa_config"]
)
def test_peft_saved_lora_variants_are_refused(option):
    """An adapter_config.json (as PEFT saves it) of a LoRA variant that computes or trains A/B otherwise."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]).to_dict()
    config[option] = {"nblocks": 2}
    with pytest.raises(ValueError, match=option):
        LoraSettings.from_peft(config)


@pytest.fixture(scope="module")
def peers(llama_checkpoint):
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_server(str(llama_checkpoint), (0, 4))
        yield local.initial_peers


def classifier(path, peers, num_labels=3):
    return AutoDistributedModelForSequenceClassification.from_pretrained(
        str(path), initial_peers=peers, spot_check_fraction=0, num_labels=num_labels
    )


def test_classifier_without_mask_pools_at_the_last_non_pad_token_as_transformers(peers, llama_checkpoint):
    """transformers' sequence classifiers pool at each row's last token that is not the pad token (without an
    attention mask too); the pads a row ends with are not its last token."""
    model = classifier(llama_checkpoint, peers)
    try:
        theirs = AutoModelForSequenceClassification.from_pretrained(llama_checkpoint, num_labels=3).eval()
        with torch.no_grad():
            theirs.score.weight.copy_(model.score.weight)
        x = ids(batch=2, length=6, seed=1)
        x[0, 4:] = model.config.pad_token_id  # right-padded, no mask
        with torch.no_grad():
            torch.testing.assert_close(model(x).logits, theirs(input_ids=x).logits, **TOL)
    finally:
        model.shutdown()


def test_a_frozen_classifier_head_is_saved_with_the_adapter(peers, llama_checkpoint, tmp_path):
    """Training only the LoRA of a classifier (its head frozen, as at random init) still saves the head: PEFT on
    transformers' classifier, and `load_adapter` into a new model, give the saved model's logits."""
    model, other = classifier(llama_checkpoint, peers), classifier(llama_checkpoint, peers)
    try:
        model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        model.score.requires_grad_(False)
        with torch.no_grad():
            for weight in model.lora.weights:
                weight.normal_(0, 0.1)
        x = ids(batch=1, seed=2)
        with torch.no_grad():
            ours = model(x).logits
        model.save_pretrained(tmp_path)
        base = AutoModelForSequenceClassification.from_pretrained(llama_checkpoint, num_labels=3)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
        other.load_adapter(tmp_path)
        with torch.no_grad():
            torch.testing.assert_close(theirs(x).logits, ours, **TOL)
            torch.testing.assert_close(other(x).logits, ours, **TOL)
    finally:
        model.shutdown()
        other.shutdown()


def peft_saved(base, config, path, seed):
    torch.manual_seed(seed)  # init_lora_weights=False: B random too, so the adapter matters
    model = peft.get_peft_model(base, config)
    model.save_pretrained(path)
    return model.eval()


def test_adapters_peft_saved_load_with_peft_logits(peers, llama_checkpoint, tmp_path):
    """What PEFT itself saves (rsLoRA, dropout, four targets; a SEQ_CLS adapter with its head) loads with
    `load_adapter` and gives PEFT's logits (eval mode: no dropout)."""
    lora = dict(r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.1, init_lora_weights=False)
    lora["target_modules"] = ["q_proj", "k_proj", "gate_proj", "down_proj"]
    x = ids(seed=3)
    theirs = peft_saved(
        AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32),
        peft.LoraConfig(task_type="CAUSAL_LM", **lora),
        tmp_path / "lm",
        seed=4,
    )
    ours = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=peers, spot_check_fraction=0
    )
    try:
        ours.load_adapter(tmp_path / "lm")
        with torch.no_grad():
            torch.testing.assert_close(ours(x).logits, theirs(input_ids=x).logits, **TOL)
    finally:
        ours.shutdown()
    theirs = peft_saved(
        AutoModelForSequenceClassification.from_pretrained(llama_checkpoint, num_labels=3),
        peft.LoraConfig(task_type="SEQ_CLS", **lora),
        tmp_path / "cls",
        seed=5,
    )
    ours = classifier(llama_checkpoint, peers)
    try:
        ours.load_adapter(tmp_path / "cls")
        mask = torch.ones_like(x)
        mask[1, :2] = 0  # left padding
        with torch.no_grad():
            want = theirs(input_ids=x, attention_mask=mask).logits
            torch.testing.assert_close(ours(x, attention_mask=mask).logits, want, **TOL)
    finally:
        ours.shutdown()


def test_accumulated_gradients_over_backward_calls_equal_peft(peers, llama_checkpoint, tmp_path):
    """Several backward calls (two batches, and one graph twice with retain_graph) sum the gradients as local
    autograd does on PEFT's model, in train mode without dropout."""
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=peers, spot_check_fraction=0
    )
    try:
        model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj", "o_proj", "up_proj"]))
        with torch.no_grad():
            for weight in model.lora.weights:
                weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(weight.numel()))
        model.train()
        model.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32),
            tmp_path,
            is_trainable=True,
        ).train()
        batches = [ids(seed=6), ids(batch=3, length=4, seed=7)]
        for m in (model, theirs):
            first = m(input_ids=batches[0], labels=batches[0]).loss
            first.backward(retain_graph=True)
            first.backward()
            m(input_ids=batches[1], labels=batches[1]).loss.backward()
        their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
        assert_lora_grads_are_pefts(model, their_grads)
    finally:
        model.shutdown()


@pytest.mark.parametrize("init", [False, "gaussian"])
def test_an_initialisation_other_than_peft_default_is_honoured_or_refused(peers, llama_checkpoint, init):
    """PEFT's `init_lora_weights=False` starts B random (the new adapter changes the logits) and "gaussian" draws
    A otherwise: a new adapter starting as PEFT's default one instead would train another model."""
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=peers, spot_check_fraction=0
    )
    try:
        with pytest.raises(ValueError, match="init_lora_weights"):
            model.add_adapter(
                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=init)
            )
        assert model.lora is None
    finally:
        model.shutdown()


def test_classifier_gradients_equal_peft_seq_cls(peers, llama_checkpoint, tmp_path):
    """A LoRA-tuned classifier's loss and the gradients of its LoRA and head, over left-padded rows, are those of
    PEFT's SEQ_CLS model on transformers' classifier."""
    model = classifier(llama_checkpoint, peers)
    try:
        model.add_adapter(
            peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
        )
        with torch.no_grad():
            for weight in model.lora.weights:
                weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(weight.numel()))
        model.save_pretrained(tmp_path)
        base = AutoModelForSequenceClassification.from_pretrained(llama_checkpoint, num_labels=3)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
        model.train()
        theirs.train()
        x, labels = ids(batch=3, seed=8), torch.tensor([0, 2, 1])
        mask = torch.ones_like(x)
        mask[1, :3] = 0
        ours, want = (
            model(x, attention_mask=mask, labels=labels),
            theirs(input_ids=x, attention_mask=mask, labels=labels),
        )
        ours.loss.backward()
        want.loss.backward()
        torch.testing.assert_close(ours.loss, want.loss, **TOL)
        their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
        torch.testing.assert_close(
            model.score.weight.grad,
            their_grads["base_model.model.score.modules_to_save.default.weight"],
            **TOL,
        )
        assert_lora_grads_are_pefts(model, their_grads)
    finally:
        model.shutdown()


def test_load_adapter_refuses_what_it_cannot_load_and_changes_nothing(peers, llama_checkpoint, tmp_path):
    """A folder without an adapter is an error (as PEFT's), and a classifier's adapter refused by a causal LM
    (its head does not fit) leaves the model's own adapter as it was."""
    model = classifier(llama_checkpoint, peers)
    lm = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=peers, spot_check_fraction=0
    )
    try:
        model.add_adapter(peft.LoraConfig(r=2, lora_alpha=4, target_modules=["k_proj"]))
        model.save_pretrained(tmp_path / "cls")
        lm.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
        with torch.no_grad():
            for weight in lm.lora.weights:
                weight.normal_(0, 0.1)
        x = ids(seed=9)
        with torch.no_grad():
            before = lm(x).logits
        with pytest.raises((ValueError, FileNotFoundError)):
            lm.load_adapter(tmp_path / "missing")
        with pytest.raises(ValueError, match="score"):
            lm.load_adapter(tmp_path / "cls")
        assert lm.lora.settings.modules == ("q_proj",)
        with torch.no_grad():
            torch.testing.assert_close(lm(x).logits, before)
    finally:
        model.shutdown()
        lm.shutdown()


def test_padded_batch_lora_gradients_equal_peft(peers, llama_checkpoint, tmp_path):
    """Left- and right-padded rows (pads labelled -100, as collators do): loss and LoRA gradients are PEFT's."""
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=peers, spot_check_fraction=0
    )
    try:
        model.add_adapter(
            peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "gate_proj"])
        )
        with torch.no_grad():
            for weight in model.lora.weights:
                weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(weight.numel() + 1))
        model.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32),
            tmp_path,
            is_trainable=True,
        )
        x = ids(batch=3, length=7, seed=10)
        mask = torch.ones_like(x)
        mask[0, :3] = 0
        mask[2, 5:] = 0
        labels = x.masked_fill(mask == 0, -100)
        # the first real token after left pads is predicted from a pad, whose logits transformers' own attention
        # implementations disagree on (eager and sdpa differ): not labelled here
        labels[0, 3] = -100
        ours = model(x, attention_mask=mask, labels=labels)
        want = theirs(input_ids=x, attention_mask=mask, labels=labels)
        ours.loss.backward()
        want.loss.backward()
        torch.testing.assert_close(ours.loss, want.loss, **TOL)
        their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
        assert_lora_grads_are_pefts(model, their_grads)
    finally:
        model.shutdown()


def test_a_base_models_adapter_is_peft_feature_extraction(peers, llama_checkpoint, tmp_path):
    """The base model (`AutoDistributedModel`, transformers' `AutoModel`) saves an adapter PEFT loads onto
    `AutoModel` with its `last_hidden_state`, and loads what PEFT saved from `AutoModel`."""
    model = AutoDistributedModel.from_pretrained(
        str(llama_checkpoint), initial_peers=peers, spot_check_fraction=0
    )
    try:
        model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
        with torch.no_grad():
            for weight in model.lora.weights:
                weight.normal_(0, 0.1)
        x = ids(seed=11)
        model.save_pretrained(tmp_path / "ours")
        theirs = peft.PeftModel.from_pretrained(
            AutoModel.from_pretrained(llama_checkpoint), tmp_path / "ours"
        )
        with torch.no_grad():
            want = theirs.eval()(input_ids=x).last_hidden_state
            torch.testing.assert_close(model(x).last_hidden_state, want, **TOL)
        theirs = peft_saved(
            AutoModel.from_pretrained(llama_checkpoint),
            peft.LoraConfig(
                task_type="FEATURE_EXTRACTION",
                r=2,
                lora_alpha=4,
                target_modules=["v_proj"],
                init_lora_weights=False,
            ),
            tmp_path / "peft",
            seed=12,
        )
        model.load_adapter(tmp_path / "peft")
        with torch.no_grad():
            want = theirs(input_ids=x).last_hidden_state
            torch.testing.assert_close(model(x).last_hidden_state, want, **TOL)
    finally:
        model.shutdown()
