"""PEFT's own API on a swarm model, as on a local one: `peft.get_peft_model(swarm_model, LoraConfig(...))` trains
through the servers with local PEFT's loss and gradients, saves the folder local PEFT saves, `PeftModel.
from_pretrained(swarm_model, DIR)` generates local PEFT's tokens, adapters switch and disable; PEFT's prompt
tuning runs with its prompts sent once a generate; what the servers cannot compute as PEFT would is refused by
name, and the model keeps working after."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.session import InferenceSession

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
peft = pytest.importorskip("peft")

TOL = dict(rtol=1e-4, atol=1e-5)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def swarm(local, llama_checkpoint):
    local.add_servers([(str(llama_checkpoint), (0, 2)), (str(llama_checkpoint), (2, 4))])
    return local


def swarm_model(swarm, path):
    return AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)


def local_model(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def lora_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def randomize_like(ours, theirs, seed):
    """Both PeftModels' LoRA weights set to the same random values (B nonzero: the adapter then changes logits)."""
    generator = torch.Generator().manual_seed(seed)
    mine, other = lora_parameters(ours), lora_parameters(theirs)
    assert list(mine) == list(other)
    with torch.no_grad():
        for name, weight in mine.items():
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
            other[name].copy_(weight)


def tokens(batch=2, length=7, seed=0):
    return torch.randint(3, 150, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_get_peft_model_trains_saves_and_loads_as_local_peft(swarm, llama_checkpoint, tmp_path):
    model = swarm_model(swarm, llama_checkpoint)
    ours = peft.get_peft_model(model, peft.LoraConfig(**LORA))
    theirs = peft.get_peft_model(local_model(llama_checkpoint), peft.LoraConfig(**LORA))
    randomize_like(ours, theirs, seed=1)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == list(lora_parameters(theirs))
    x = tokens()
    for step in range(2):  # the second step's weights are new: uploaded again, and still PEFT's
        loss, their_loss = ours(input_ids=x, labels=x).loss, theirs(input_ids=x, labels=x).loss
        loss.backward()
        their_loss.backward()
        torch.testing.assert_close(loss, their_loss, **TOL)
        mine, other = lora_parameters(ours), lora_parameters(theirs)
        for name, weight in mine.items():
            torch.testing.assert_close(weight.grad, other[name].grad, **TOL, msg=f"step {step}: {name}")
        with torch.no_grad():
            for name, weight in mine.items():
                weight -= 0.5 * weight.grad
                other[name] -= 0.5 * other[name].grad
        ours.zero_grad()
        theirs.zero_grad()

    ours.eval(), theirs.eval()
    prompt = tokens(batch=1, length=5, seed=2)
    with torch.no_grad():
        want = theirs.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
        assert torch.equal(ours.generate(input_ids=prompt, max_new_tokens=8, do_sample=False), want)
        with ours.disable_adapter(), theirs.disable_adapter():  # the base model's tokens
            plain = theirs.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
            assert torch.equal(ours.generate(input_ids=prompt, max_new_tokens=8, do_sample=False), plain)
        assert not torch.equal(plain, want)

    ours.save_pretrained(tmp_path)  # PEFT's own folder, under transformers' key names
    reloaded = peft.PeftModel.from_pretrained(local_model(llama_checkpoint), tmp_path).eval()
    loaded = peft.PeftModel.from_pretrained(swarm_model(swarm, llama_checkpoint), tmp_path).eval()
    try:
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=x).logits, reloaded(input_ids=x).logits, **TOL)
            assert torch.equal(loaded.generate(input_ids=prompt, max_new_tokens=8, do_sample=False), want)
    finally:
        loaded.get_base_model().shutdown()

    # a second adapter, switched to and back, as PEFT switches them
    for model_ in (ours, theirs):
        model_.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj", "o_proj"]))
    randomize_like(ours, theirs, seed=3)  # (both adapters anew)
    with torch.no_grad():
        for name in ("other", "default", "other"):
            ours.set_adapter(name)
            theirs.set_adapter(name)
            torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, **TOL)
        for model_ in (ours, theirs):  # the two joined into one (ranks concatenated, weighted)
            model_.add_weighted_adapter(["default", "other"], [1.0, 0.5], "mix", combination_type="cat")
            model_.set_adapter("mix")
        torch.testing.assert_close(ours(input_ids=x).logits, theirs(input_ids=x).logits, **TOL)
    model.shutdown()


def test_what_peft_would_compute_otherwise_is_refused_and_the_model_goes_on(swarm, llama_checkpoint):
    model = swarm_model(swarm, llama_checkpoint)
    x = tokens(batch=1)
    try:
        ours = peft.get_peft_model(model, peft.LoraConfig(**LORA))
        theirs = peft.get_peft_model(local_model(llama_checkpoint), peft.LoraConfig(**LORA))
        randomize_like(ours, theirs, seed=4)
        with torch.no_grad():
            want = theirs(input_ids=x).logits
            for safe in (False, True):  # (a safe merge swaps the weight's data: the adapter would be dropped)
                with pytest.raises(RuntimeError, match="cannot be merged"):
                    ours.merge_and_unload(safe_merge=safe)
                torch.testing.assert_close(ours(input_ids=x).logits, want, **TOL)
            ours.add_adapter("second", peft.LoraConfig(r=2, target_modules=["q_proj"]))
            ours.base_model.set_adapter(["default", "second"])
            with pytest.raises(ValueError, match="active at once"):
                ours(input_ids=x)
        ours.base_model.set_adapter("default")
        base = ours.unload()
        assert base is model
        model.add_adapter(peft.LoraConfig(r=2, target_modules=["q_proj"]))  # add_adapter's and PEFT's at once
        peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["v_proj"]))
        with pytest.raises(ValueError, match="one at a time"):
            model(input_ids=x)
    finally:
        model.shutdown()

    refused = {
        "IA3": (
            peft.IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
            "'ia3'",
        ),
        "DoRA": (peft.LoraConfig(use_dora=True, target_modules=["q_proj"]), "DoRA"),
        "layers": (peft.LoraConfig(target_modules=["q_proj"], layers_to_transform=[0]), "some layers only"),
        "ranks": (
            peft.LoraConfig(target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}),
            "differ in",
        ),
        "head": (peft.LoraConfig(target_modules=["q_proj"], modules_to_save=["lm_head"]), "client's lm_head"),
    }
    for config, message in refused.values():
        model = swarm_model(swarm, llama_checkpoint)
        try:
            with pytest.raises(ValueError, match=message):
                peft.get_peft_model(model, config)(input_ids=x)
        finally:
            model.shutdown()
    model = swarm_model(swarm, llama_checkpoint)
    try:
        prefix = peft.get_peft_model(
            model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
        )
        # (its prefixes were ignored before; PEFT passes them as past_key_values, or as cache since 0.22)
        with pytest.raises(
            NotImplementedError, match="^(past_key_values|cache): the KV cache lives on the servers"
        ):
            prefix(input_ids=x)
        with torch.no_grad():  # the servers went on: the plain model answers as transformers does
            torch.testing.assert_close(
                model(input_ids=x).logits, local_model(llama_checkpoint)(x).logits, **TOL
            )
    finally:
        model.shutdown()


def test_peft_prompt_tuning_trains_and_generates_its_prompts_once(swarm, llama_checkpoint, monkeypatch):
    config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    model = swarm_model(swarm, llama_checkpoint)
    try:
        torch.manual_seed(5)
        ours = peft.get_peft_model(model, config)
        theirs = peft.get_peft_model(local_model(llama_checkpoint), config)
        theirs.prompt_encoder.load_state_dict(ours.prompt_encoder.state_dict())
        x = tokens(batch=1, length=6, seed=6)
        loss, their_loss = ours(input_ids=x, labels=x).loss, theirs(input_ids=x, labels=x).loss
        loss.backward()
        their_loss.backward()
        torch.testing.assert_close(loss, their_loss, **TOL)
        (name, prompts), (_, their_prompts) = [
            next((n, p) for n, p in m.named_parameters() if p.requires_grad) for m in (ours, theirs)
        ]
        assert "prompt_encoder" in name
        torch.testing.assert_close(prompts.grad, their_prompts.grad, **TOL)

        steps = []
        step = InferenceSession.step

        def recorded(session, hidden, *args, **kwargs):
            steps.append((kwargs.get("position"), hidden.shape[1]))
            return step(session, hidden, *args, **kwargs)

        monkeypatch.setattr(InferenceSession, "step", recorded)
        ours.eval(), theirs.eval()
        with torch.no_grad():
            out = ours.generate(input_ids=x, max_new_tokens=10, do_sample=False)
            # PEFT's own generate without a cache (its cached one numbers the new tokens' positions without its
            # prompts: its tokens then differ from its own forward's)
            assert torch.equal(
                out, theirs.generate(input_ids=x, max_new_tokens=10, do_sample=False, use_cache=False)
            )
        # PEFT sends the whole sequence's embeddings at each step: the servers are sent each new token alone
        assert steps == [(0, 4 + 6)] + [(4 + 6 + i, 1) for i in range(9)]
    finally:
        model.shutdown()


def test_an_adapter_in_half_precision_trains_with_gradients_of_its_own_dtype(swarm, llama_checkpoint):
    """A PEFT adapter cast to bfloat16 (as on a GPU, `peft_model.to(torch.bfloat16)`): the servers apply it, its
    gradients come back in bfloat16, close to those of the same weights in float32 through the same servers."""
    model = swarm_model(swarm, llama_checkpoint)
    try:
        ours = peft.get_peft_model(model, peft.LoraConfig(**LORA))
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for weight in lora_parameters(ours).values():
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
        x = tokens(seed=8)
        ours(input_ids=x, labels=x).loss.backward()
        full = {name: w.grad.clone() for name, w in lora_parameters(ours).items()}
        ours.zero_grad()
        for weight in lora_parameters(ours).values():
            weight.data = weight.data.to(torch.bfloat16)
        ours(input_ids=x, labels=x).loss.backward()
        for name, weight in lora_parameters(ours).items():
            assert weight.grad.dtype == torch.bfloat16, name
            torch.testing.assert_close(weight.grad.float(), full[name], rtol=0.05, atol=0.02, msg=name)
    finally:
        model.shutdown()
