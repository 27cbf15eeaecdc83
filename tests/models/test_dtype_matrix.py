"""The dtype and quantization matrix: spans loaded in float32, bfloat16 and float16, plain, as panels and quantized
(int8, nf4), against transformers on the same checkpoint at the same dtype (or, quantized, against the weights
bitsandbytes' format stands for)."""

from __future__ import annotations

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from swarmllm.models import load_client_head, load_span
from swarmllm.models.llama import Projection
from swarmllm.models.panels import PanelProjection, kernel
from swarmllm.models.quant import BitsAndBytesProjection, QuantizedProjection

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
pytest.importorskip("bitsandbytes")

HALF_DTYPES = (torch.bfloat16, torch.float16)
# projections of 2^20 weights: a CPU server stores them as panels (models.panels) in every dtype
WIDE = dict(
    hidden_size=1024, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, num_layers=2
)
NF4_TOLERANCE = 0.9  # README's stated nf4 tolerance (logits against float32, per-token relative L2)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest per-token relative L2 distance of a from b."""
    a, b = a.float(), b.float()
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def logits(path, dtype: torch.dtype, ids: torch.Tensor, **span_options) -> torch.Tensor:
    _, head = load_client_head(path, dtype=dtype)
    span = load_span(path, 0, head.config.num_layers, dtype=dtype, **span_options)
    with torch.no_grad():
        return head.logits(span(head.embed(ids)))


@pytest.mark.skipif(kernel() is None, reason="no AVX2 and FMA, or no C++ compiler, on this machine")
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_half_precision_panels_with_a_bias_round_once_as_transformers_linear_does(dtype):
    """A bfloat16 / float16 panel projection with a bias (Qwen2's q/k/v) gives what `F.linear` at that dtype gives:
    the product and the bias summed in float32 and rounded once (rounding the product first, then adding the
    bias in half precision, differed in ~30% of the outputs and moved a tiny Qwen2's logits as far from
    transformers' as bfloat16 is from float32)."""
    generator = torch.Generator().manual_seed(0)
    projection = Projection(512, 1024, bias=True)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(1024, 512, generator=generator) * 0.05)
        projection.bias.copy_(torch.randn(1024, generator=generator))
    projection = projection.to(dtype)
    panels = PanelProjection.from_projection(projection)
    x = torch.randn(5, 512, generator=generator).to(dtype)
    with torch.no_grad():
        want, got = projection(x), panels(x)
    assert got.dtype == dtype
    # the sums run in another order than oneDNN's: a rare last-bit difference, never a third of the outputs
    assert (got != want).float().mean() < 0.01
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(kernel() is None, reason="no AVX2 and FMA, or no C++ compiler, on this machine")
def test_packed_bfloat16_qwen2_span_gives_transformers_logits_at_that_dtype(checkpoints):
    """A CPU server's span (`pack=True`: projections of 2^18 weights or more as panels) of a Qwen2 checkpoint, whose
    q/k/v have biases, served in bfloat16 computes transformers' bfloat16 logits, up to a rare last-bit difference
    of a sum taken in another order (which this random network amplifies): far closer to them than bfloat16 is to
    float32 (with the bias added after rounding, a quarter of that or more)."""
    dtype = torch.bfloat16
    path = checkpoints("qwen2", **WIDE)
    ids = torch.randint(4, 150, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)(ids).logits
        half_error = rel_l2(want, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(ids).logits)
    got = logits(path, dtype, ids, pack=True)
    assert got.dtype == dtype
    assert rel_l2(got, want) < half_error / 4, (rel_l2(got, want), half_error)


def nf4_weight_of_codes(quantized: BitsAndBytesProjection) -> torch.Tensor:
    """The float32 weight that bitsandbytes' nf4 format stands for, decoded by brute force: the weight flattened,
    in blocks of 64 values, each value a code of the 16-entry table (two a byte, the first in the high half) times
    its block's absmax (as bitsandbytes' CUDA kernels and its generic dequantization read it)."""
    weight = quantized.linear.weight
    state = weight.quant_state
    packed = weight.data.view(torch.uint8).flatten().tolist()
    codes = [c for byte in packed for c in (byte >> 4, byte & 15)]
    table, absmax = state.code.float().tolist(), state.absmax.float().tolist()
    n = quantized.out_features * quantized.in_features
    values = [table[codes[i]] * absmax[i // state.blocksize] for i in range(n)]
    return torch.tensor(values).view(quantized.out_features, quantized.in_features)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("in_features", [96, 160])
def test_cpu_nf4_with_inputs_not_in_blocks_of_64_computes_the_weight_its_codes_stand_for(in_features, dtype):
    """nf4 on a CPU for inputs that are not a multiple of 64 (bitsandbytes' blocks of 64 straddle rows): the
    projection computes x @ W^T with W the weight its nf4 codes stand for, which is as close to the full-precision
    weight as nf4 is for any shape (~9% per weight). bitsandbytes' CPU dequantization reads blocks of 64 within
    rows, so it decoded such weights wrongly: 26% from the full weight, and a tiny model's logits past the stated
    nf4 tolerance."""
    generator = torch.Generator().manual_seed(in_features)
    projection = Projection(in_features, 192, bias=True)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(192, in_features, generator=generator) * 0.1)
        projection.bias.copy_(torch.randn(192, generator=generator))
    projection = projection.to(dtype)
    quantized = QuantizedProjection.from_projection(projection, "nf4")
    assert isinstance(quantized, BitsAndBytesProjection)
    weight = nf4_weight_of_codes(quantized)
    full = projection.weight.detach().float()
    assert float((weight - full).norm() / full.norm()) < 0.12  # nf4's error, whatever the shape

    x = torch.randn(3, in_features, generator=generator).to(dtype)
    with torch.no_grad():
        got = quantized(x)
        want = torch.nn.functional.linear(x.float(), weight, projection.bias.float())
    assert got.dtype == dtype
    assert rel_l2(got, want) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_nf4_logits_of_a_model_whose_sizes_are_not_multiples_of_64_are_within_the_stated_tolerance(
    checkpoints, family
):
    """README: nf4 logits within 0.9 (per-token relative L2) of float32's on the tiny llama/mistral/qwen2; a
    hidden size of 96 (and 160 intermediate) sends every projection but one through bitsandbytes on a CPU."""
    path = checkpoints(family, num_layers=2, hidden_size=96, intermediate_size=160)
    ids = torch.randint(4, 150, (2, 12), generator=torch.Generator().manual_seed(0))
    want = logits(path, torch.float32, ids)
    for dtype in (torch.float32, torch.bfloat16):
        assert rel_l2(logits(path, dtype, ids, quant="nf4"), want) <= NF4_TOLERANCE, dtype


@pytest.mark.parametrize("dtype", HALF_DTYPES)
@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3"])
def test_half_precision_decode_steps_give_transformers_logits(checkpoints, family, dtype):
    """A server's decode hot path (`BlockSpan.decode`, one token a step over its KV cache) at bfloat16 / float16
    gives, token by token, the logits of transformers at that dtype to 1e-4: of its own decode steps (its KV
    cache, one token a call) or of its forward over all the tokens at once. The two round otherwise (by ~5e-3 in
    bfloat16), and which one our step follows bit for bit depends on the CPU's matmul kernels: our fused q/k/v
    projection rounds as transformers' one-row k_proj on an Intel Xeon, and as its many-row one on an AMD EPYC
    with native bfloat16 dot products (oneDNN picks its kernel by the output width there). A fused rotary
    (`addcmul`: one rounding where transformers rounds three times) differed from both at every step after the
    first: ~1e-2 in bfloat16, ~1.5e-3 in float16. Once Mistral's sliding window (4 here) is passed,
    transformers' cache holds the window alone while our step masks the slots before it: the sums differ in
    their terms, and the step is held to transformers' own disagreement between its two ways instead."""
    path = checkpoints(family)
    steps = 8
    _, head = load_client_head(path, dtype=dtype)
    span = load_span(path, 0, head.config.num_layers, dtype=dtype)
    config = span.config
    ids = torch.randint(4, 150, (1, steps), generator=torch.Generator().manual_seed(0))
    keys = torch.zeros(config.num_layers, 1, config.num_kv_heads, steps, config.head_dim, dtype=dtype)
    values = torch.zeros_like(keys)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    cache = DynamicCache(config=model.config)
    window = config.sliding_window
    with torch.no_grad():
        whole = model(ids).logits
        hidden = head.embed(ids)
        for t in range(steps):
            step = model(ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits[:, 0]
            slots = torch.tensor([t])
            out = span.decode(hidden[:, t], slots, slots, keys[..., : t + 1, :], values[..., : t + 1, :])
            got = head.logits(out)
            assert got.dtype == dtype
            error, bound = min(rel_l2(got, step), rel_l2(got, whole[:, t])), 1e-4
            if window is not None and t >= window:
                bound = max(bound, 2 * rel_l2(step, whole[:, t]))
            assert error <= bound, (t, error, bound)


@pytest.mark.skipif(kernel() is None, reason="no AVX2 and FMA, or no C++ compiler, on this machine")
def test_a_bfloat16_server_and_client_generate_transformers_bfloat16_tokens(checkpoints):
    """A server started with `--dtype bfloat16` (a CPU server: its Qwen2 projections, q/k/v with biases, as
    panels) announces bfloat16 and, with a client loaded in bfloat16, computes transformers' bfloat16 logits and
    greedy tokens (its prefill and its decode steps), up to a rare last bit of a sum taken in another order; the
    bfloat16 codec is lossless on bfloat16 states."""
    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.client.loop import run_sync
    from swarmllm.dht import find_servers
    from swarmllm.local import LocalSwarm

    path = str(checkpoints("qwen2", **WIDE))
    prompt = torch.tensor([[1, 17, 42, 99, 5, 23, 8]])
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    with LocalSwarm() as local, torch.no_grad():
        local.start_bootstrap()
        local.add_server(path, (0, 2), extra=["--dtype", "bfloat16"])
        model = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=local.initial_peers, dtype=torch.bfloat16
        )
        try:
            servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, 2))
            assert [(s.dtype, s.quantization) for s in servers] == [("bfloat16", "none")]
            want = reference(prompt).logits
            half_error = rel_l2(
                want, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(prompt).logits
            )
            got = model(prompt).logits
            assert got.dtype == torch.bfloat16
            # the panels sum in another order than oneDNN: a rare last bit, far below bfloat16's own error
            assert rel_l2(got, want) < half_error / 4, (rel_l2(got, want), half_error)
            with model.inference_session(max_length=32, compression="bfloat16"):
                assert torch.equal(model(prompt).logits, got)
            tokens = model.generate(prompt, max_new_tokens=12, do_sample=False)
            assert tokens.tolist() == reference.generate(prompt, max_new_tokens=12, do_sample=False).tolist()
        finally:
            model.shutdown()
