"""Quantized projections (int8, nf4; through bitsandbytes, and on a CPU through our panel kernel or PyTorch's int8 kernel): their
memory, their error against full precision per family, the same nf4 weights as transformers' bitsandbytes loading,
the CPU int8 matmul against its dequantized weight, and LoRA and the decode path on top."""

from __future__ import annotations

import logging

import pytest
import torch

from swarmllm.models import LlamaBlock, load_client_head, load_config, load_span
from swarmllm.models.llama import Projection
from swarmllm.models.lora import LoraSettings, lora_shapes, span_lora
from swarmllm.models.panels import kernel, nf4_matmul, panel_matmul, to_nf4_panels, to_panels
from swarmllm.models.quant import (
    CPU_INT8_STEP,
    BitsAndBytesProjection,
    CpuInt8Projection,
    Int8PanelProjection,
    Nf4PanelProjection,
    QuantizedProjection,
    quantize_block,
    quantized_weight_bytes,
)
from swarmllm.server.memory import block_bytes

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
bnb = pytest.importorskip("bitsandbytes")

# The stated tolerance: the largest per-token relative L2 distance of a quantized model's logits from float32's,
# over the tiny random checkpoints (measured: benchmarks/quant_error.py; int8 <= 0.05, nf4 <= 0.75). nf4's error
# is ~9% per weight; these random networks (weights N(0, 0.1)) amplify it from block to block, where trained ones
# do not (see RESULTS.md for SmolLM2-135M).
TOLERANCE = {"int8": 0.08, "nf4": 0.9}
MIN_ARGMAX_AGREEMENT = {"int8": 0.85, "nf4": 0.3}
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


def dequantized_nf4(linear) -> torch.Tensor:
    """A bitsandbytes Linear4bit's weight, dequantized."""
    return bnb.functional.dequantize_4bit(linear.weight.data, linear.weight.quant_state)


def dequantized_weight(projection: QuantizedProjection) -> torch.Tensor:
    """The float32 weight a quantized projection stands for (CPU int8: codes times row scales; nf4)."""
    if isinstance(projection, CpuInt8Projection | Int8PanelProjection):
        return projection.codes.float() * projection.scales[: projection.out_features, None]
    if isinstance(projection, Nf4PanelProjection):
        return projection.weight
    return dequantized_nf4(projection.linear)


def random_projection(in_features: int, out_features: int, generator: torch.Generator) -> Projection:
    projection = Projection(in_features, out_features, bias=True)
    with torch.no_grad():
        projection.weight.copy_(torch.randn(out_features, in_features, generator=generator) * 0.05)
        projection.bias.copy_(torch.randn(out_features, generator=generator))
    return projection


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_weight_bytes_are_what_the_quantized_modules_store(llama_checkpoint, mode):
    _, config = load_config(llama_checkpoint)
    projection = Projection(64, 192, bias=True)
    quantized = QuantizedProjection.from_projection(projection, mode)
    assert quantized.weight_bytes() == quantized_weight_bytes(192, 64, mode)
    quantized(torch.randn(1, 64))  # int8 moves its scales into the module's state on the first call
    assert quantized.weight_bytes() == quantized_weight_bytes(192, 64, mode)

    block = quantize_block(LlamaBlock(config), mode)
    held = sum(p.numel() * p.element_size() for n, p in block.named_parameters() if "linear.weight" not in n)
    held += sum(m.weight_bytes() for m in block.modules() if isinstance(m, QuantizedProjection))
    assert block_bytes(config, torch.float32, mode) == held
    full = block_bytes(config, torch.float32)
    assert full / held > {"int8": 3.5, "nf4": 6.0}[mode]  # against float32; norms and biases stay float32


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_logits_within_tolerance_of_float32(checkpoints, family):
    path = checkpoints(family)
    _, head = load_client_head(path)
    ids = torch.randint(4, 150, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = head.embed(ids)
        want = head.logits(load_span(path, 0, 4)(hidden))
        for mode in ("int8", "nf4"):
            got = head.logits(load_span(path, 0, 4, quant=mode)(hidden))
            assert rel_l2(got, want) <= TOLERANCE[mode], mode
            agreement = (got.argmax(-1) == want.argmax(-1)).float().mean()
            assert agreement >= MIN_ARGMAX_AGREEMENT[mode], mode
            assert rel_l2(got, want) > 1e-4  # the weights really are quantized


def test_nf4_weights_are_transformers_bitsandbytes_weights(llama_checkpoint):
    """Our fused q/k/v and gate/up quantize to exactly the nf4 weights transformers' own bitsandbytes loading
    gives each part (blocks of 64 along rows whose length is a multiple of 64 are the same blocks)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    theirs = AutoModelForCausalLM.from_pretrained(
        llama_checkpoint, quantization_config=config, device_map="cpu", dtype=torch.float32
    )
    ours = load_span(llama_checkpoint, 0, 4, quant="nf4")
    for layer, block in zip(theirs.model.layers, ours.blocks, strict=True):
        qkv = torch.cat([dequantized_nf4(getattr(layer.self_attn, f"{p}_proj")) for p in "qkv"])
        torch.testing.assert_close(dequantized_weight(block.self_attn.qkv_proj), qkv, rtol=0, atol=0)
        down = dequantized_nf4(layer.mlp.down_proj)
        torch.testing.assert_close(dequantized_weight(block.mlp.down_proj), down, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_lora_and_the_decode_path_apply_on_top_of_quantized_weights(llama_checkpoint, mode):
    """A quantized span with a LoRA adapter computes what a float32 span with the dequantized weights and the
    same adapter computes (int8 on a CPU: within float32 rounding through our panel kernel, within bfloat16's
    through PyTorch's kernel where ours cannot run), through the full forward and through the lean decode path,
    token by token."""
    tolerance = {"nf4": 1e-5, "int8": 1e-5 if kernel() is not None else 1e-2}[mode]  # per-token relative L2
    _, head = load_client_head(llama_checkpoint)
    span = load_span(llama_checkpoint, 0, 4, quant=mode)
    dense = load_span(llama_checkpoint, 0, 4)
    for block, dense_block in zip(span.blocks, dense.blocks, strict=True):
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"):
            weight = dequantized_weight(block.get_submodule(name))
            dense_block.get_submodule(name).weight.data.copy_(weight)
    settings = LoraSettings(rank=4, alpha=8, modules=("q_proj", "v_proj", "o_proj", "down_proj"))
    generator = torch.Generator().manual_seed(0)
    shapes = lora_shapes(span.config, settings, range(4))
    tensors = {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}
    lora = span_lora(span.config, settings, tensors, range(4))

    ids = torch.randint(4, 150, (1, 6), generator=generator)
    with torch.no_grad():
        hidden = head.embed(ids)
        want = dense(hidden, lora=lora)
        got = span(hidden, lora=lora)
        assert rel_l2(got, want) <= tolerance
        assert rel_l2(got, span(hidden)) > 10 * tolerance  # the adapter matters

        cache_keys = torch.zeros(4, 1, span.config.num_kv_heads, 6, span.config.head_dim)
        cache_values = torch.zeros_like(cache_keys)
        for t in range(6):
            out = span.decode(
                hidden[:, t],
                torch.tensor([t]),
                torch.tensor([t]),
                cache_keys[:, :, :, : t + 1],
                cache_values[:, :, :, : t + 1],
                lora=lora,
            )
            assert rel_l2(out, want[:, t]) <= tolerance


@pytest.mark.parametrize("in_features", [64, 1024, 72])
def test_cpu_int8_computes_its_dequantized_weight_within_bfloat16_rounding(in_features):
    """int8 on a CPU where our panel kernel cannot run: row-wise absmax codes (each row's largest weight is +-127); the kernel (inputs a multiple of
    `CPU_INT8_STEP`) gives x @ W^T of the dequantized W within bfloat16's rounding, for 1 to 9 rows and 300,
    batched, and for a bfloat16 input that is a misaligned view (the kernel's loads are aligned), a row's result
    bit for bit the same alone or among others; another input size dequantizes (exactly). The input's gradient
    is that of the dequantized weight."""
    generator = torch.Generator().manual_seed(in_features)
    projection = random_projection(in_features, 200, generator)
    quantized = CpuInt8Projection.from_projection(projection)
    assert quantized.kernel == (in_features % CPU_INT8_STEP == 0)
    assert int(quantized.codes.abs().amax(1).min()) == 127
    weight = dequantized_weight(quantized)
    assert (
        float((weight - projection.weight.detach()).abs().max()) <= float(quantized.scales.max()) / 2 + 1e-7
    )
    tolerance = 1e-2 if quantized.kernel else 1e-5

    def check(x, tolerance=tolerance):
        want = torch.nn.functional.linear(x.float(), weight, projection.bias)
        got = quantized(x)
        assert got.dtype == torch.promote_types(x.dtype, projection.bias.dtype) and got.shape == want.shape
        assert float((got.float() - want).norm() / want.norm()) < tolerance

    with torch.no_grad():
        for rows in (1, 4, 9):
            check(torch.randn(rows, in_features, generator=generator))
        many = torch.randn(300, in_features, generator=generator)
        check(many)
        if quantized.kernel:  # a row's result is the same whatever rows go with it (replays, merged steps)
            assert torch.equal(quantized(many[7:8]), quantized(many)[7:8])
            assert torch.equal(quantized(many[:5]), quantized(many)[:5])
        check(torch.randn(2, 3, in_features, generator=generator))
        storage = torch.randn(4 * in_features + 3, generator=generator).to(torch.bfloat16)
        misaligned = storage[3:].view(4, in_features)
        assert misaligned.data_ptr() % 64
        check(misaligned, tolerance=2e-2)  # (bfloat16 throughout)
    x = torch.randn(3, in_features, generator=generator, requires_grad=True)
    quantized(x).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(kernel() is None, reason="no AVX2 and FMA, or no C++ compiler, on this machine")
@pytest.mark.parametrize("in_features", [64, 1024])
def test_nf4_panels_compute_the_float32_panel_product_of_bitsandbytes_dequantized_weight(in_features):
    """nf4 on a CPU where our panel kernel runs (the default there): bitsandbytes' own nf4 weights (dequantized,
    equal to its module's), and the product bit for bit that of float32 panels of that weight, for 1 to 8 rows
    (made in registers up to 4, through a float32 panel beyond), 13 and 300 rows, on 1 thread and 2, batched and
    in bfloat16; 200 outputs fill 13 panels, the last padded. Its bias, its gradient, its bytes."""
    generator = torch.Generator().manual_seed(in_features)
    projection = random_projection(in_features, 200, generator)
    quantized = QuantizedProjection.from_projection(projection, "nf4")
    assert isinstance(quantized, Nf4PanelProjection)
    theirs = BitsAndBytesProjection.from_projection(projection, "nf4")
    weight = dequantized_weight(quantized)
    assert torch.equal(weight, dequantized_nf4(theirs.linear))
    assert quantized.weight_bytes() == 208 * in_features // 2 + 4 * 208 * in_features // 64
    panels = to_panels(weight)
    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            for threads in (1, 2):
                torch.set_num_threads(threads)
                for rows in (1, 2, 3, 4, 5, 6, 7, 8, 13, 300):
                    x = torch.randn(rows, in_features, generator=generator)
                    want = panel_matmul(x, panels, 200) + projection.bias
                    assert torch.equal(quantized(x), want), (threads, rows)
            x = torch.randn(2, 3, in_features, generator=generator)
            assert torch.equal(quantized(x), panel_matmul(x, panels, 200) + projection.bias)
            half = torch.randn(4, in_features, generator=generator).to(torch.bfloat16)
            got, want = quantized(half), panel_matmul(half.float(), panels, 200) + projection.bias
            assert got.dtype == torch.promote_types(half.dtype, projection.bias.dtype)  # as a float32 layer's
            torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)
    finally:
        torch.set_num_threads(before)
    x = torch.randn(3, in_features, generator=generator, requires_grad=True)
    quantized(x).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)


def test_nf4_inputs_not_in_blocks_of_64_stay_with_bitsandbytes_and_bad_nf4_panels_get_a_clear_error():
    projection = Projection(72, 32, bias=False)  # bitsandbytes' blocks of 64 would straddle rows
    assert isinstance(QuantizedProjection.from_projection(projection, "nf4"), BitsAndBytesProjection)
    codes = torch.zeros(32, 72, dtype=torch.uint8)
    with pytest.raises(ValueError, match="blocks of 64"):
        to_nf4_panels(codes, torch.ones(32, 1))
    if kernel() is None:
        return
    quantized = QuantizedProjection.from_projection(Projection(64, 32, bias=False), "nf4")
    with pytest.raises(ValueError, match="float32 CPU inputs of 64 features"):
        nf4_matmul(torch.zeros(1, 63), quantized.codes, quantized.absmax, quantized.table, 32)
    with pytest.raises(ValueError, match="16 float32 values"):
        nf4_matmul(torch.zeros(1, 64), quantized.codes, quantized.absmax, quantized.table[:8], 32)
    with pytest.raises(ValueError, match="as `to_nf4_panels` lays them out"):
        nf4_matmul(torch.zeros(1, 64), quantized.codes, quantized.absmax[:, :, :8], quantized.table, 32)
    with pytest.raises(ValueError, match="as `to_nf4_panels` lays them out"):  # inputs not in blocks of 64
        nf4_matmul(torch.zeros(1, 32), quantized.codes[:, :32], quantized.absmax[:, :0], quantized.table, 32)


@pytest.mark.skipif(kernel() is None, reason="no AVX2 and FMA, or no C++ compiler, on this machine")
@pytest.mark.parametrize("in_features", [64, 1024, 72])
def test_int8_panels_compute_the_dequantized_weight_within_float32_rounding(in_features):
    """int8 on a CPU where our panel kernel runs (the default there): the same codes as `CpuInt8Projection`, and
    x @ W^T of the dequantized W within float32 rounding (inputs are not rounded to bfloat16) for 1 to 9 rows, 300,
    batched, and a bfloat16 input (computed in float32, answered in bfloat16); a row's result bit for bit the
    same alone or among others; 200 outputs fill 13 panels, the last padded. The input's gradient is that of the
    dequantized weight."""
    generator = torch.Generator().manual_seed(in_features)
    projection = random_projection(in_features, 200, generator)
    quantized = QuantizedProjection.from_projection(projection, "int8")
    assert isinstance(quantized, Int8PanelProjection)
    assert torch.equal(quantized.codes, CpuInt8Projection.from_projection(projection).codes)
    assert quantized.weight_bytes() == 208 * in_features + 4 * 208  # 13 panels of 16 outputs and their scales
    weight = dequantized_weight(quantized)

    def check(x, tolerance=1e-6):
        want = torch.nn.functional.linear(x.double(), weight.double(), projection.bias.double())
        got = quantized(x)
        assert got.dtype == torch.promote_types(x.dtype, projection.bias.dtype) and got.shape == want.shape
        assert float((got.double() - want).norm() / want.norm()) < tolerance

    with torch.no_grad():
        for rows in (1, 2, 3, 4, 9):
            check(torch.randn(rows, in_features, generator=generator))
        many = torch.randn(300, in_features, generator=generator)
        check(many)
        assert torch.equal(quantized(many[7:8]), quantized(many)[7:8])
        assert torch.equal(quantized(many[:5]), quantized(many)[:5])
        check(torch.randn(2, 3, in_features, generator=generator))
        check(torch.randn(4, in_features, generator=generator).to(torch.bfloat16), tolerance=1e-2)
    x = torch.randn(3, in_features, generator=generator, requires_grad=True)
    quantized(x).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)
