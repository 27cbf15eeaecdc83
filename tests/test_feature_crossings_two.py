"""More features crossed with each other, through real server processes on 127.0.0.1 that all cut long steps into
prefill chunks: fine-tuning (a client's LoRA adapter, deep prompts) through int8 and nf4 servers against PEFT /
local autograd over the dequantized weights; a `--tp 2` server beside a client's adapter (refused alone, routed
around beside a plain server, for tokens and a training step) and in compressed sessions (float16, blockwise8);
speculative decoding with a client's adapter through int8; deep prompts in a chunked batch through nf4."""

from __future__ import annotations

import logging
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.client.routing import MissingBlocksError
from swarmllm.dht import find_servers
from swarmllm.local import LocalSwarm
from swarmllm.models import load_client_head, load_span
from swarmllm.models.quant import QuantizedProjection

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
peft = pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"])
TOL = dict(rtol=1e-4, atol=1e-5)
PROMPT = torch.tensor([[1, 30, 40, 50, 7, 9]])
FLAGS = {"int8": ["--quant", "int8"], "nf4": ["--quant", "nf4"], "tp2": ["--tp", "2"], "plain": []}
CHUNK = 3  # every server's --prefill-chunk-tokens: prompts and speculative checks run as chunks


@pytest.fixture(scope="module")
def swarm(llama_checkpoint):
    """One server of every block per kind (int8, nf4, --tp 2, plain), under one model name, all of them cutting
    steps of more than CHUNK tokens into chunks."""
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers(
            [
                (
                    str(llama_checkpoint),
                    (0, 4),
                    [*flags, "--public-name", kind, "--prefill-chunk-tokens", str(CHUNK)],
                )
                for kind, flags in FLAGS.items()
            ]
        )
        yield local


def remote(path, local, only: str | None, **kwargs):
    """A client over the servers of kind `only` (all of them: None)."""
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=local.initial_peers, **{"spot_check_fraction": 0, **kwargs}
    )
    if only is not None:
        model.swarm.use_servers([by_kind(model)[only]])
    return model


def by_kind(model):
    servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, 4))
    assert sorted(s.public_name for s in servers) == sorted(FLAGS)
    return {s.public_name: s for s in servers}


def ids(batch=2, length=7, seed=0):
    return torch.randint(3, 150, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_random_adapter(model, seed):
    model.add_adapter(peft.LoraConfig(**LORA))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.lora.weights:
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)
    return model


FUSED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "mlp.gate_up_proj": ("gate_proj", "up_proj")}


def dequantized_transformers(path, mode):
    """transformers' model of the checkpoint whose projections are a `--quant mode` server's weights, dequantized
    (the documented reference: the quantized matmul equals the dequantized weight's)."""
    local = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    span = load_span(str(path), 0, local.config.num_hidden_layers, quant=mode)
    for name, module in span.named_modules():
        if not isinstance(module, QuantizedProjection):
            continue
        weight = dense(module)
        _, layer, rest = name.split(".", 2)
        block = local.model.layers[int(layer)]
        parent, leaf = rest.split(".")
        targets = [getattr(getattr(block, parent), p) for p in FUSED.get(rest, (leaf,))]
        sizes = [t.weight.shape[0] for t in targets]
        with torch.no_grad():
            for target, part in zip(targets, weight.split(sizes), strict=True):
                target.weight.copy_(part)
    return local


def dense(projection):
    if hasattr(projection, "scales") and hasattr(projection, "codes"):
        return projection.codes.float() * projection.scales[: projection.out_features, None]
    return projection.weight


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_lora_gradients_through_a_quantized_server_equal_peft_over_its_dequantized_weights(
    swarm, llama_checkpoint, tmp_path, mode
):
    model = with_random_adapter(remote(llama_checkpoint, swarm, mode), seed=1)
    try:
        x = ids(seed=2)
        embeds = model.head.embed(x).detach().requires_grad_()
        loss = model(inputs_embeds=embeds, labels=x).loss
        loss.backward()
        model.save_pretrained(tmp_path)
        base = dequantized_transformers(llama_checkpoint, mode)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
        their_embeds = embeds.detach().clone().requires_grad_()
        their_loss = theirs(inputs_embeds=their_embeds, labels=x).loss
        their_loss.backward()
        torch.testing.assert_close(loss, their_loss, **TOL)
        torch.testing.assert_close(embeds.grad, their_embeds.grad, **TOL)
        their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
        for name, weight in zip(model.lora.names, model.lora.weights, strict=True):
            layer, rest = name.split(".", 1)
            want = their_grads[f"base_model.model.model.layers.{layer}.{rest}.default.weight"]
            assert want.abs().max() > 0
            torch.testing.assert_close(weight.grad, want, **TOL)
    finally:
        model.shutdown()


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_deep_prompt_gradients_through_a_quantized_server_equal_local_autograd(swarm, llama_checkpoint, mode):
    model = remote(llama_checkpoint, swarm, mode, tuning_mode="deep_ptune", pre_seq_len=2)
    try:
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            model.ptune.deep.copy_(torch.randn(model.ptune.deep.shape, generator=generator) * 0.1)
        x = ids(seed=4)
        model(x, labels=x).loss.backward()

        _, head = load_client_head(str(llama_checkpoint))
        span = load_span(str(llama_checkpoint), 0, 4, quant=mode)
        prompts = model.ptune.prompts.detach().clone().requires_grad_()
        deep = model.ptune.deep.detach().clone().requires_grad_()
        hidden = torch.cat([prompts.expand(2, -1, -1), head.embed(x)], dim=1)
        logits = head.logits(span(hidden, prompts=deep[:, None])[:, 2:])
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        loss.backward()
        for ours, want in [(model.ptune.prompts.grad, prompts.grad), (model.ptune.deep.grad, deep.grad)]:
            assert torch.isfinite(ours).all() and want.abs().max() > 0
            torch.testing.assert_close(ours, want, **TOL)
    finally:
        model.shutdown()


def greedy(local, ids, new):
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, local(ids).logits[:, -1:].argmax(-1)], 1)
    return ids


def test_a_client_adapter_is_refused_by_a_tp_server_and_routed_around(swarm, llama_checkpoint, tmp_path):
    """Alone, the --tp 2 server refuses a client's adapter clearly (inference and training); beside a plain
    server, the client routes around it: PEFT's greedy tokens and gradients."""
    model = with_random_adapter(remote(llama_checkpoint, swarm, "tp2"), seed=5)
    try:
        with pytest.raises(Exception, match="--tp"):
            model.generate(PROMPT, max_new_tokens=3)
        kinds = by_kind(model)
        model.swarm.use_servers([kinds["tp2"], kinds["plain"]])
        model.save_pretrained(tmp_path)
        base = AutoModelForCausalLM.from_pretrained(str(llama_checkpoint), dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
        assert model.generate(PROMPT, max_new_tokens=8).tolist() == greedy(theirs, PROMPT, 8).tolist()
        x = ids(seed=6)
        loss = model(x, labels=x).loss
        loss.backward()
        their_loss = theirs(input_ids=x, labels=x).loss
        their_loss.backward()
        torch.testing.assert_close(loss, their_loss, **TOL)
        grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
        for name, weight in zip(model.lora.names, model.lora.weights, strict=True):
            layer, rest = name.split(".", 1)
            want = grads[f"base_model.model.model.layers.{layer}.{rest}.default.weight"]
            torch.testing.assert_close(weight.grad, want, **TOL)
    finally:
        model.shutdown()


def test_requests_only_tunable_servers_take_fail_at_once_where_only_a_tp_server_holds_the_blocks(
    swarm, llama_checkpoint
):
    """The --tp 2 server announces `tunable: false`. With only it: deep prompts (a generate) and a client
    adapter's training step end at once in a MissingBlocksError that names --tp (before: refused at the step or
    the forward, banned, asked again as each ban ended, and ~105 s later a MissingBlocksError with no reason).
    Beside a plain server, deep prompts go to the plain one from the start."""
    deep = remote(llama_checkpoint, swarm, "tp2", tuning_mode="deep_ptune", pre_seq_len=2)
    adapted = with_random_adapter(remote(llama_checkpoint, swarm, "tp2"), seed=7)
    plain = remote(llama_checkpoint, swarm, "plain", tuning_mode="deep_ptune", pre_seq_len=2)
    try:
        kinds = by_kind(deep)
        assert not kinds["tp2"].tunable and kinds["plain"].tunable
        began = time.monotonic()
        with pytest.raises(MissingBlocksError, match="--tp"):
            deep.generate(PROMPT, max_new_tokens=3)
        x = ids(seed=8)
        with pytest.raises(MissingBlocksError, match="--tp"):
            adapted(x, labels=x).loss.backward()
        assert time.monotonic() - began < 30
        with torch.no_grad():  # the same trained prompts, deep ones not zero
            deep.ptune.deep.copy_(
                torch.randn(deep.ptune.deep.shape, generator=torch.Generator().manual_seed(9))
            )
            plain.ptune.load_state_dict(deep.ptune.state_dict())
        deep.swarm.use_servers([kinds["tp2"], kinds["plain"]])
        ours = deep.generate(PROMPT, max_new_tokens=4)
        assert ours.tolist() == plain.generate(PROMPT, max_new_tokens=4).tolist()
        assert not deep.swarm.bans.banned(time.monotonic())  # (no refusal on the way)
    finally:
        for model in (deep, adapted, plain):
            model.shutdown()


@pytest.mark.parametrize("codec, bound", [("blockwise8", 5e-2), ("float16", 2e-3)])
def test_a_tp_server_in_a_compressed_session_equals_a_plain_server_in_one(
    swarm, llama_checkpoint, codec, bound
):
    """Steps of a compressed session through the --tp 2 server: the tokens and logits of the same session through
    the TP=1 server (within TP's 1e-4), and within the codec's stated error of float32."""
    results = {}
    for kind in ("tp2", "plain"):
        model = remote(llama_checkpoint, swarm, kind)
        try:
            with model.inference_session(max_length=32, compression=codec):
                out = model.generate(
                    PROMPT, max_new_tokens=10, return_dict_in_generate=True, output_logits=True
                )
            results[kind] = out.sequences, torch.cat(out.logits)
        finally:
            model.shutdown()
    assert results["tp2"][0].tolist() == results["plain"][0].tolist()
    torch.testing.assert_close(results["tp2"][1], results["plain"][1], atol=2e-4, rtol=0)
    out, got = results["tp2"]
    local = AutoModelForCausalLM.from_pretrained(str(llama_checkpoint), dtype=torch.float32)
    with torch.no_grad():
        want = local(out[:, :-1]).logits[0, PROMPT.shape[1] - 1 :]
    error = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max()
    assert 0 < error <= bound, error


def test_speculation_with_a_client_lora_through_chunked_int8_keeps_pefts_greedy_tokens(
    swarm, llama_checkpoint, tmp_path
):
    """A speculative run with a client adapter through the int8 server, whose prompt and checks of 4 tokens run as
    chunks: the greedy tokens of PEFT over the dequantized weights, drafts rejected on the way."""
    from in_process import perturbed

    model = with_random_adapter(remote(llama_checkpoint, swarm, "int8"), seed=7)
    try:
        model.save_pretrained(tmp_path)
        theirs = peft.PeftModel.from_pretrained(dequantized_transformers(llama_checkpoint, "int8"), tmp_path)
        want = greedy(theirs.eval(), PROMPT, 14)
        draft = peft.PeftModel.from_pretrained(perturbed(str(llama_checkpoint), noise=0.1), tmp_path)
        draft = draft.merge_and_unload().eval()
        out = model.generate(PROMPT, max_new_tokens=14, assistant_model=draft, num_assistant_tokens=4)
        stats = model.last_speculation
        assert out.tolist() == want.tolist()
        assert 0 < stats.accepted < stats.drafted
    finally:
        model.shutdown()


def test_deep_prompts_in_a_chunked_batch_session_through_nf4_keep_its_local_tokens(swarm, llama_checkpoint):
    """Deep prompts with a prompt of 2 rows cut into chunks (the first holds the prompts' positions) through the nf4
    server give the greedy tokens of its quantized blocks run locally."""
    model = remote(llama_checkpoint, swarm, "nf4", tuning_mode="deep_ptune", pre_seq_len=2)
    try:
        generator = torch.Generator().manual_seed(8)
        with torch.no_grad():
            model.ptune.prompts.copy_(torch.randn(model.ptune.prompts.shape, generator=generator) * 0.5)
            model.ptune.deep.copy_(torch.randn(model.ptune.deep.shape, generator=generator) * 0.3)
        x = ids(batch=2, length=5, seed=9)
        out = model.generate(x, max_new_tokens=6)
        _, head = load_client_head(str(llama_checkpoint))
        span = load_span(str(llama_checkpoint), 0, 4, quant="nf4")
        want = x
        with torch.no_grad():
            for _ in range(6):
                hidden = torch.cat([model.ptune.prompts.expand(2, -1, -1), head.embed(want)], dim=1)
                logits = head.logits(span(hidden, prompts=model.ptune.deep[:, None]))
                want = torch.cat([want, logits[:, -1:].argmax(-1)], 1)
        assert out.tolist() == want.tolist()
    finally:
        model.shutdown()
