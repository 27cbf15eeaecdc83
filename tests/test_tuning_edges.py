"""Fine-tuning edge cases against transformers and PEFT on the same checkpoint, through two in-process servers:
losses as transformers computes them (multi-label classification, `num_items_in_batch` from a Trainer with
gradient accumulation), PEFT options that would compute differently refused, empty inputs that are the
caller's error, not the servers', and adapter dropout masks drawn per layer, whichever server runs it, and per
micro-batch."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from server_infos import online_server
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from swarmllm import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from swarmllm.client.loop import run_sync
from swarmllm.models import load_config, load_span
from swarmllm.models.lora import LoraSettings, lora_shapes, span_lora
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.wire import DirectServer, Identity

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
peft = pytest.importorskip("peft")

SPANS = [(0, 2), (2, 4)]
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def servers(llama_checkpoint):
    """Two servers of the tiny model's blocks on real direct connections, as `ServerInfo`s to route over."""
    infos, running = [], []
    for start, end in SPANS:
        backend = Backend(load_span(str(llama_checkpoint), start, end), cache_tokens=256)
        handler = RequestHandler(
            backend, lambda s=start, e=end: {"start_block": s, "end_block": e}, ServerLimits()
        )
        identity = Identity.generate()
        server = DirectServer(handler.handlers(), identity)
        run_sync(server.start())
        running.append((server, backend))
        infos.append(online_server(identity.peer_id, start, end, address=server.address))
    yield infos
    for server, backend in running:
        run_sync(server.stop())
        backend.shutdown()


def remote_model(path, infos, cls=AutoDistributedModelForCausalLM, **kwargs):
    model = cls.from_pretrained(str(path), initial_peers=[], spot_check_fraction=0, **kwargs)
    model.swarm.use_servers(infos)
    return model


def ids(batch=3, length=6, seed=0):
    return torch.randint(3, 150, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_multi_label_classification_loss_is_transformers(servers, llama_checkpoint):
    """Float labels over several classes are multi-label targets (BCE with logits), as transformers reads them."""
    model = remote_model(
        llama_checkpoint, servers, cls=AutoDistributedModelForSequenceClassification, num_labels=3
    )
    try:
        theirs = AutoModelForSequenceClassification.from_pretrained(llama_checkpoint, num_labels=3).eval()
        with torch.no_grad():
            theirs.score.weight.copy_(model.score.weight)
        model.score.weight.requires_grad_()
        x, labels = ids(), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
        out, want = model(x, labels=labels), theirs(input_ids=x, labels=labels)
        out.loss.backward()
        want.loss.backward()
        torch.testing.assert_close(out.logits, want.logits, **TOL)
        torch.testing.assert_close(out.loss, want.loss, **TOL)
        torch.testing.assert_close(model.score.weight.grad, theirs.score.weight.grad, **TOL)
    finally:
        model.shutdown()


def test_num_items_in_batch_normalises_the_loss_as_transformers_does(servers, llama_checkpoint):
    """A Trainer accumulating gradients passes `num_items_in_batch` (the forward takes **kwargs) and leaves the
    loss unscaled: the loss must be the sum over the batch's labels divided by it, or the gradients come out
    `gradient_accumulation_steps` times too large."""
    model = remote_model(llama_checkpoint, servers)
    try:
        theirs = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
        x = ids(seed=1)
        labels = x.clone()
        labels[0, 3:] = -100
        n = torch.tensor(
            2 * int((labels[:, 1:] != -100).sum())
        )  # as if this were half of the accumulated labels
        torch.testing.assert_close(
            model(x, labels=labels, num_items_in_batch=n).loss,
            theirs(input_ids=x, labels=labels, num_items_in_batch=n).loss,
            **TOL,
        )
    finally:
        model.shutdown()


@pytest.mark.parametrize(
    "option", [{"modules_to_save": ["lm_head"]}, {"lora_bias": True}, {"exclude_modules": ["v_proj"]}]
)
def test_peft_options_that_would_train_something_else_are_refused(servers, llama_checkpoint, option):
    """PEFT would train other parameters (a copy of the LM head, B's biases) or adapt other modules than the
    swarm would: refused, rather than silently trained without them."""
    model = remote_model(llama_checkpoint, servers)
    try:
        with pytest.raises(ValueError, match=next(iter(option))):
            model.add_adapter(
                peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **option)
            )
        assert model.lora is None
    finally:
        model.shutdown()


@pytest.mark.parametrize("shape", [(0, 5), (2, 0)], ids=["no rows", "no tokens"])
def test_an_empty_input_is_the_callers_error_and_bans_no_server(servers, llama_checkpoint, shape):
    model = remote_model(llama_checkpoint, servers)
    try:
        model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
        model.train()
        x = torch.ones(shape, dtype=torch.long)
        with pytest.raises(ValueError, match="empty"):
            model(x, labels=x)
        with torch.no_grad(), pytest.raises(ValueError, match="empty"):
            model(x)
        assert not model.swarm.bans.banned(time.monotonic())
        y = ids(batch=2, length=4, seed=2)  # the servers still serve this client
        model(y, labels=y).loss.backward()
    finally:
        model.shutdown()


@pytest.mark.parametrize("tuning", ["lora", "peft", "deep_ptune"])
def test_a_diverged_adapter_or_prompt_is_the_callers_error_and_bans_no_server(
    servers, llama_checkpoint, tuning
):
    """NaN in the client's trainable tensors (float16 AdamW makes them at its first step): servers refuse them, so
    the client refuses them first, naming the tensor, rather than ban each healthy server in turn."""
    options = {"tuning_mode": "deep_ptune", "pre_seq_len": 2} if tuning == "deep_ptune" else {}
    model = remote_model(llama_checkpoint, servers, **options)
    try:
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
        if tuning == "lora":
            model.add_adapter(config)
        trained = peft.get_peft_model(model, config) if tuning == "peft" else model
        if tuning == "lora":
            weight = model.lora.weights[0]  # (0.self_attn.q_proj.lora_A)
        else:
            weight = next(
                p for name, p in trained.named_parameters() if "lora_A" in name or "ptune.deep" in name
            )
        with torch.no_grad():
            weight[0, 0] = float("nan")
        x = ids(batch=2, length=4, seed=3)
        message = (
            "deep prompts hold NaN" if tuning == "deep_ptune" else r"0\.self_attn\.q_proj\.lora_A hold NaN"
        )
        with pytest.raises(ValueError, match=message):
            trained(input_ids=x, labels=x)
        with torch.no_grad(), pytest.raises(ValueError, match=message):
            trained.generate(input_ids=x, max_new_tokens=2)
        assert not model.swarm.bans.banned(time.monotonic())
        with torch.no_grad():
            weight[0, 0] = 0.0
        trained(input_ids=x, labels=x).loss.backward()  # the servers still serve this client
    finally:
        model.shutdown()


def test_dropout_masks_are_drawn_per_layer_whatever_server_runs_it(llama_checkpoint):
    """A request's dropout seed reaches every server of its route: each layer's masks come from the seed and the
    layer, so the next server's first layer does not repeat the masks of this server's first layer (PEFT draws
    every layer's independently), and a layer's masks do not depend on how the route splits the blocks."""
    _, config = load_config(llama_checkpoint)
    settings = LoraSettings(rank=2, alpha=4, modules=("q_proj",), dropout=0.5)
    shape = lora_shapes(config, settings, range(1))["0.self_attn.q_proj.lora_A"]
    one = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    tensors = {
        name: one if name.endswith("A") else torch.ones(shape)
        for name, shape in lora_shapes(config, settings, range(4)).items()
    }

    def span(layers: range) -> list:
        return span_lora(config, settings, tensors, layers, torch.Generator().manual_seed(7))

    x = torch.ones(1, 8, config.hidden_size)
    first, second, whole = span(range(0, 2)), span(range(2, 4)), span(range(0, 4))
    layer_0, layer_2 = first[0].qkv_proj(x), second[0].qkv_proj(x)
    assert not torch.equal(layer_0, layer_2), "the next server repeats this one's dropout masks"
    first, second = span(range(0, 2)), span(range(2, 4))  # masks not drawn yet
    for i in range(4):
        torch.testing.assert_close(whole[i].qkv_proj(x), (first + second)[i].qkv_proj(x))


def add_dropout_adapter(model) -> None:
    """A LoRA adapter with dropout 0.5 on q_proj, its B not zero (PEFT's init, which would hide every mask)."""
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], lora_dropout=0.5))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)))


def test_each_micro_batch_draws_dropout_masks_of_its_own(servers, llama_checkpoint):
    """A training batch cut into micro-batches (one row each here) gives each its own dropout seed: two equal
    rows get different masks, as they do in one micro-batch; with one seed for all, they came out equal."""
    model = remote_model(llama_checkpoint, servers)
    try:
        add_dropout_adapter(model)
        model.train()
        model.swarm.forward_chunk_tokens, model.swarm.min_chunk_s = 1, 0.0  # a micro-batch per row
        x = ids(batch=1, length=6, seed=4).repeat(2, 1)
        assert len(model.swarm._micro_batches(torch.zeros(2, 6, 1))) == 2
        out = model(x, labels=x)
        assert not torch.equal(out.logits[0], out.logits[1])
        out.loss.backward()  # each micro-batch's backward recomputes its forward with its own seed
    finally:
        model.shutdown()


def test_training_mode_applies_adapter_dropout_without_gradients_too(servers, llama_checkpoint):
    """As in PEFT (nn.Dropout reads the module's mode, not autograd's): a forward in training mode under
    `torch.no_grad` draws the same masks as one with gradients from the same torch seed, and differs from eval."""
    model = remote_model(llama_checkpoint, servers)
    try:
        add_dropout_adapter(model)
        x = ids(batch=2, length=6, seed=5)
        model.eval()
        with torch.no_grad():
            plain = model(x).logits
        model.train()
        torch.manual_seed(11)
        with_grad = model(x).logits.detach()
        torch.manual_seed(11)
        with torch.no_grad():
            without_grad = model(x).logits
        assert not torch.allclose(with_grad, plain, atol=1e-4)
        torch.testing.assert_close(without_grad, with_grad, atol=1e-5, rtol=0)
    finally:
        model.shutdown()
