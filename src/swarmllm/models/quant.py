"""Quantized weights for a server's blocks: every `Projection` of a block stored as int8 or nf4 through
`bitsandbytes` (its CUDA kernels on a GPU; on a CPU, the CPU kernels that bitsandbytes >= 0.46 ships, which
dequantize and are slower than float32 there: the point on a CPU is memory, on a GPU also speed).

`quantize_block` swaps a block's projections for `QuantizedProjection`s in place, after the block's weights are
loaded, so that a loader holds one block in full precision at a time. A `QuantizedProjection` keeps the
projection's interface, `forward(x, lora)`: the full forward, the lean decode path and CUDA graph capture all call
it, and a request's LoRA adapter adds its low-rank update on top of the quantized matmul exactly as on a
full-precision one. Norms, biases and the KV cache stay in the span's dtype.

`quantized_weight_bytes` is the storage of one quantized weight matrix, for the memory plan (`server.memory`);
a test checks it against the modules bitsandbytes builds.

bitsandbytes is imported only when a span is quantized (it takes seconds to import and pulls in
torch._dynamo), so a server or client that does not quantize never pays for it.
"""

from __future__ import annotations

import logging

from torch import Tensor, nn

from swarmllm.models.llama import LlamaBlock, Lora, Projection

QUANT_MODES = ("none", "int8", "nf4")
NF4_BLOCK = 64  # weights per nf4 absmax (bitsandbytes' default)
# nf4 absmaxes stay float32 (no double quantization, transformers' default for bitsandbytes): 0.375 bits a weight
# more than with it, and the same quantized weights as transformers' `BitsAndBytesConfig(load_in_4bit=True)`


def check_quant(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; use one of {QUANT_MODES}")
    return mode


def quantized_weight_bytes(out_features: int, in_features: int, mode: str) -> int:
    """Bytes that one [out, in] weight matrix takes when quantized with `mode` (not "none")."""
    n = out_features * in_features
    if mode == "int8":
        return n + 4 * out_features  # int8 values + one float32 scale per output row
    if mode == "nf4":
        # 4-bit codes and one float32 absmax per NF4_BLOCK weights: 4.5 bits a weight
        return -(-n // 2) + 4 * -(-n // NF4_BLOCK)
    raise ValueError(f"no quantized size for {mode!r}")


def _bitsandbytes():
    # bitsandbytes logs a harmless "Failed to load CPU gemm_4bit_forward from kernels-community" on CPUs
    # without the optional `kernels` package, then uses its own CPU kernels
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


class QuantizedProjection(nn.Module):
    """A `Projection` whose weight is stored quantized (int8 or nf4); computes in the input's dtype."""

    def __init__(self, linear: nn.Module, mode: str, in_features: int, out_features: int):
        super().__init__()
        self.linear = linear  # a bitsandbytes Linear8bitLt or Linear4bit, already quantized
        self.mode, self.in_features, self.out_features = mode, in_features, out_features

    @classmethod
    def from_projection(cls, projection: Projection, mode: str) -> QuantizedProjection:
        bnb = _bitsandbytes()
        weight = projection.weight.detach()
        device, dtype = weight.device, weight.dtype
        has_bias = projection.bias is not None
        out_features, in_features = weight.shape
        # built on the meta device (no throwaway initialisation), then given the quantized weight: bitsandbytes
        # quantizes a parameter when it moves from the CPU to its device
        if mode == "int8":
            # threshold 0: no outlier columns kept in float16 (LLM.int8's mixed decomposition), so the matmul is
            # the same plain int8 kernel for every input, and a CUDA graph can capture it
            linear = bnb.nn.Linear8bitLt(
                in_features, out_features, bias=has_bias, has_fp16_weights=False, threshold=0.0, device="meta"
            )
            linear.weight = bnb.nn.Int8Params(weight.cpu(), requires_grad=False, has_fp16_weights=False).to(
                device
            )
        elif mode == "nf4":
            linear = bnb.nn.Linear4bit(
                in_features,
                out_features,
                bias=has_bias,
                compute_dtype=dtype,
                compress_statistics=False,
                quant_type="nf4",
                device="meta",
            )
            linear.weight = bnb.nn.Params4bit(
                weight.cpu(), requires_grad=False, compress_statistics=False, quant_type="nf4"
            ).to(device)
        else:
            raise ValueError(f"cannot quantize a projection as {mode!r}")
        if has_bias:
            linear.bias = nn.Parameter(projection.bias.detach(), requires_grad=False)
        return cls(linear, mode, in_features, out_features)

    def forward(self, x: Tensor, lora: Lora | None = None) -> Tensor:
        y = self.linear(x)
        if y.dtype != x.dtype:  # int8's matmul answers in float16 for half inputs of either kind
            y = y.to(x.dtype)
        return y if lora is None else y + lora(x)

    def weight_bytes(self) -> int:
        """Bytes the quantized weight holds in memory (its codes and every scale), as bitsandbytes stores it."""
        weight = self.linear.weight
        total = weight.numel() * weight.element_size()
        if (
            self.mode == "int8"
        ):  # the first forward moves the row scales from the weight to the module's state
            scales = weight.SCB if weight.SCB is not None else self.linear.state.SCB
            return total + scales.numel() * scales.element_size()
        absmax = weight.quant_state.absmax
        return total + absmax.numel() * absmax.element_size()


def quantize_block(block: LlamaBlock, mode: str) -> LlamaBlock:
    """Replace the block's projections by quantized ones (in place); "none" leaves it as it is."""
    if check_quant(mode) == "none":
        return block
    for parent in (block.self_attn, block.mlp):
        for name, child in list(parent.named_children()):
            if isinstance(child, Projection):
                setattr(parent, name, QuantizedProjection.from_projection(child, mode))
    return block


def span_quantization(module: nn.Module) -> str:
    """ "none", or the mode of the module's quantized projections."""
    modes = {m.mode for m in module.modules() if isinstance(m, QuantizedProjection)}
    if len(modes) > 1:
        raise ValueError(f"mixed quantization {sorted(modes)}")
    return modes.pop() if modes else "none"
