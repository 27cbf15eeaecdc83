"""Quantized weights for a server's blocks: every `Projection` of a block stored as int8 or nf4. On a GPU both go
through `bitsandbytes`' kernels. On a CPU, int8 keeps bitsandbytes' int8 scheme (row-wise absmax codes) with a
quarter of float32's bytes to read, so a decode step, which is mostly that read, runs ~2x faster than float32's:
through our panel kernel where it runs (`Int8PanelProjection`, `models.panels`: float32 inputs and sums), else
through PyTorch's weight-only int8 matmul (`CpuInt8Projection`: bfloat16 inputs). nf4 keeps bitsandbytes' nf4
weights (blocks of 64 along a row) with 4.5 bits a weight to read: through the panel kernel where it runs
(`Nf4PanelProjection`, for inputs in blocks of 64: as fast as float32 with a seventh of its bytes), else through
the CPU kernels that bitsandbytes >= 0.46 ships, which dequantize the whole weight for every matmul (0.2-0.3x
float32's decode rate).

`quantize_block` swaps a block's projections for `QuantizedProjection`s in place, after the block's weights are
loaded, so that a loader holds one block in full precision at a time. A `QuantizedProjection` keeps the
projection's interface, `forward(x, lora)`: the full forward, the lean decode path and CUDA graph capture all call
it, and a request's LoRA adapter adds its low-rank update on top of the quantized matmul exactly as on a
full-precision one. Norms, biases and the KV cache stay in the span's dtype.

`quantized_weight_bytes` is the storage of one quantized weight matrix, for the memory plan (`server.memory`):
that of the class `quantized_kind` picks for it, panels padded to whole panels of 16 outputs included; a test
checks it against the modules built.

bitsandbytes is imported only when a span is quantized (it takes seconds to import and pulls in
torch._dynamo), so a server or client that does not quantize never pays for it.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from swarmllm.models.llama import LlamaBlock, Lora, Projection
from swarmllm.models.panels import (
    NF4_BLOCK,
    PANEL,
    PanelProjection,
    from_panels,
    kernel,
    nf4_dense_weight,
    nf4_linear,
    panel_outputs,
    to_nf4_panels,
    to_panels,
)

QUANT_MODES = ("none", "int8", "nf4")
# PyTorch's CPU int8 kernel steps along the input 16 values at a time (AVX-512; 8 with AVX2) with aligned loads and
# no remainder: other input sizes would read past a row (wrong sums, or a crash), so they dequantize instead
CPU_INT8_STEP = 16
# nf4 absmaxes stay float32 (no double quantization, transformers' default for bitsandbytes): 0.375 bits a weight
# more than with it, and the same quantized weights as transformers' `BitsAndBytesConfig(load_in_4bit=True)`


def check_quant(mode: str) -> str:
    if mode not in QUANT_MODES:
        raise ValueError(f"unknown quantization {mode!r}; use one of {QUANT_MODES}")
    return mode


def quantized_weight_bytes(
    out_features: int, in_features: int, mode: str, device: torch.device | str = "cpu"
) -> int:
    """Bytes that one [out, in] weight matrix takes on `device` when quantized with `mode` (not "none"): its codes
    and scales as the class that `quantized_kind` picks stores them."""
    if mode not in QUANT_MODES[1:]:
        raise ValueError(f"no quantized size for {mode!r}")
    return quantized_kind(mode, device, in_features).stored_bytes(out_features, in_features, mode)


def _bitsandbytes():
    # bitsandbytes logs a harmless "Failed to load CPU gemm_4bit_forward from kernels-community" on CPUs
    # without the optional `kernels` package, then uses its own CPU kernels
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes

    return bitsandbytes


class QuantizedProjection(nn.Module):
    """A `Projection` whose weight is stored quantized (int8 or nf4); computes in the input's dtype.
    `from_projection` picks the kernels: on a CPU `Int8PanelProjection` and `Nf4PanelProjection` (our kernel),
    or where that cannot run `CpuInt8Projection` for int8; else `BitsAndBytesProjection`."""

    def __init__(self, mode: str, in_features: int, out_features: int):
        super().__init__()
        self.mode, self.in_features, self.out_features = mode, in_features, out_features

    @staticmethod
    def from_projection(projection: Projection, mode: str) -> QuantizedProjection:
        kind = quantized_kind(mode, projection.weight.device, projection.in_features)
        if kind is BitsAndBytesProjection:
            return BitsAndBytesProjection.from_projection(projection, mode)
        return kind.from_projection(projection)

    def forward(self, x: Tensor, lora: Lora | None = None) -> Tensor:
        raise NotImplementedError

    def weight_bytes(self) -> int:
        """Bytes the quantized weight holds in memory (its codes and every scale)."""
        raise NotImplementedError

    @staticmethod
    def stored_bytes(out_features: int, in_features: int, mode: str) -> int:
        """What `weight_bytes` is for an [out, in] weight quantized as `mode`, before one is built."""
        raise NotImplementedError


class BitsAndBytesProjection(QuantizedProjection):
    """int8 or nf4 through bitsandbytes' modules (its CUDA kernels; on a CPU, its nf4 kernels, except for inputs
    not in blocks of 64, whose weight is decoded here for each call, as those kernels would dequantize it)."""

    def __init__(self, linear: nn.Module, mode: str, in_features: int, out_features: int):
        super().__init__(mode, in_features, out_features)
        self.linear = linear  # a bitsandbytes Linear8bitLt or Linear4bit, already quantized

    @staticmethod
    def from_projection(projection: Projection, mode: str) -> BitsAndBytesProjection:
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
        return BitsAndBytesProjection(linear, mode, in_features, out_features)

    def forward(self, x: Tensor, lora: Lora | None = None) -> Tensor:
        if self.mode == "nf4" and x.device.type == "cpu" and self.in_features % NF4_BLOCK:
            # bitsandbytes' CPU kernels read blocks of 64 within rows: where its blocks of the flattened weight
            # straddle rows they decode other weights than the codes stand for (26% off, not nf4's 9%)
            y = nn.functional.linear(x, _nf4_flat_weight(self.linear.weight, x.dtype), self.linear.bias)
        else:
            y = self.linear(x)
        if y.dtype != x.dtype:  # int8's matmul answers in float16 for half inputs of either kind
            y = y.to(x.dtype)
        return y if lora is None else y + lora(x)

    def weight_bytes(self) -> int:
        weight = self.linear.weight
        total = weight.numel() * weight.element_size()
        if (
            self.mode == "int8"
        ):  # the first forward moves the row scales from the weight to the module's state
            scales = weight.SCB if weight.SCB is not None else self.linear.state.SCB
            return total + scales.numel() * scales.element_size()
        absmax = weight.quant_state.absmax
        return total + absmax.numel() * absmax.element_size()

    @staticmethod
    def stored_bytes(out_features: int, in_features: int, mode: str) -> int:
        n = out_features * in_features
        if mode == "int8":
            return n + 4 * out_features  # int8 values + one float32 scale per output row
        # 4-bit codes and one float32 absmax per NF4_BLOCK weights (of the flattened weight): 4.5 bits a weight
        return -(-n // 2) + 4 * -(-n // NF4_BLOCK)


def _nf4_flat_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """The weight a bitsandbytes `Params4bit` stands for, in `dtype`: the flattened weight in blocks of
    `NF4_BLOCK` values, each a code of the table (two a byte, the first in the high half) times its block's absmax,
    as bitsandbytes' CUDA kernels read it."""
    state = weight.quant_state
    packed = weight.data.view(torch.uint8).flatten()
    n = state.shape.numel()
    codes = torch.stack([packed >> 4, packed & 15], dim=1).flatten()[:n]
    values = nn.functional.pad(state.code.float()[codes.long()], (0, -n % state.blocksize))
    values = values.view(-1, state.blocksize) * state.absmax.float()[:, None]
    return values.flatten()[:n].view(state.shape).to(dtype)


def int8_codes(weight: Tensor) -> tuple[Tensor, Tensor]:
    """bitsandbytes' int8 scheme: each output row's weights as int8 codes, times one float32 scale (the row's
    absmax / 127)."""
    weight = weight.float()
    scales = weight.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny) / 127
    codes = torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return codes.contiguous(), scales


def _dequantized(codes: Tensor, scales: Tensor, dtype: torch.dtype) -> Tensor:
    """The [out, in] weight that int8 `codes` and their row `scales` stand for, in `dtype`."""
    return codes.to(dtype) * scales[:, None].to(dtype)


def _int8_matmul(x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
    rows = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    if not rows.is_contiguous() or rows.data_ptr() % 64:  # the kernel's loads are aligned; a new tensor is
        rows = rows.clone(memory_format=torch.contiguous_format)
    y = torch._weight_int8pack_mm(rows, codes, scales.to(torch.bfloat16))
    return y.to(x.dtype).reshape(*x.shape[:-1], codes.shape[0])


class _Int8Matmul(torch.autograd.Function):
    """y = x W^T with W = codes * scales (row-wise), through PyTorch's CPU int8 kernel on bfloat16 inputs; the
    backward gives x's gradient only (server weights are frozen), from W dequantized for it."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, scales: Tensor) -> Tensor:
        ctx.save_for_backward(codes, scales)
        return _int8_matmul(x, codes, scales)

    @staticmethod
    def backward(ctx, grad: Tensor):
        codes, scales = ctx.saved_tensors
        return grad @ _dequantized(codes, scales, grad.dtype), None, None


class CpuInt8Projection(QuantizedProjection):
    """int8 on a CPU: each output row's weights as int8 codes times one float32 scale (the row's absmax / 127,
    as bitsandbytes' int8), multiplied by PyTorch's weight-only int8 kernel (`torch._weight_int8pack_mm`,
    gpt-fast's int8 on a CPU). It takes bfloat16 inputs and accumulates in float32: a decode step reads a quarter
    of float32's bytes. Each output is a dot product of its own, so a row's result does not depend on the rows
    beside it: a replay after a failover, a merged step and a chunked prefill repeat a decode step's matmuls
    bit for bit (past ~256 rows the kernel is slower than float32's GEMM, 1.8x at 512: a long prefill pays that
    for it). An input size the kernel cannot take (`CPU_INT8_STEP`) dequantizes the weight for the call."""

    def __init__(self, codes: Tensor, scales: Tensor, bias: Tensor | None):
        super().__init__("int8", codes.shape[1], codes.shape[0])
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.kernel = hasattr(torch, "_weight_int8pack_mm") and codes.shape[1] % CPU_INT8_STEP == 0

    @staticmethod
    def from_projection(projection: Projection) -> CpuInt8Projection:
        bias = None if projection.bias is None else projection.bias.detach()
        return CpuInt8Projection(*int8_codes(projection.weight.detach()), bias)

    def forward(self, x: Tensor, lora: Lora | None = None) -> Tensor:
        if self.kernel and torch.is_grad_enabled() and x.requires_grad:
            y = _Int8Matmul.apply(x, self.codes, self.scales)
        elif self.kernel:
            y = _int8_matmul(x, self.codes, self.scales)
        else:
            y = nn.functional.linear(x, _dequantized(self.codes, self.scales, x.dtype))
        if self.bias is not None:
            y = y + self.bias
        return y if lora is None else y + lora(x)

    def weight_bytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * self.scales.element_size()

    @staticmethod
    def stored_bytes(out_features: int, in_features: int, mode: str) -> int:
        return out_features * in_features + 4 * out_features


class Int8PanelProjection(QuantizedProjection):
    """int8 on a CPU where our panel kernel runs (`models.panels`): bitsandbytes' int8 codes (`int8_codes`)
    stored as panels, each output's sum taken in float32 over float32 inputs, then scaled. A decode step reads a
    quarter of float32's bytes and, unlike `CpuInt8Projection`, rounds no input to bfloat16; each output is one
    FMA chain, so a row's result does not depend on the rows beside it (merged steps, replays and chunked
    prefills repeat a decode step's matmuls bit for bit). Inputs of another dtype are computed in float32."""

    def __init__(self, panel: PanelProjection):
        super().__init__("int8", panel.in_features, panel.out_features)
        self.panel = panel  # its panels are the codes, with `scales`

    @staticmethod
    def from_projection(projection: Projection) -> Int8PanelProjection:
        codes, scales = int8_codes(projection.weight.detach())
        panels = to_panels(codes)
        padded = nn.functional.pad(scales, (0, panels.shape[0] * PANEL - scales.numel()))
        bias = None if projection.bias is None else projection.bias.detach()
        return Int8PanelProjection(PanelProjection(panels, codes.shape[0], bias, padded))

    @property
    def codes(self) -> Tensor:
        """The [out, in] int8 codes (a copy: for inspection and tests)."""
        return from_panels(self.panel.panels, self.out_features)

    @property
    def scales(self) -> Tensor:
        """One float32 scale per output, padded with zeros to the panels' outputs."""
        return self.panel.scales

    def forward(self, x: Tensor, lora: Lora | None = None) -> Tensor:
        return self.panel(x, lora)

    def weight_bytes(self) -> int:
        return self.panel.panels.numel() + self.scales.numel() * self.scales.element_size()

    @staticmethod
    def stored_bytes(out_features: int, in_features: int, mode: str) -> int:
        outputs = panel_outputs(out_features)  # codes and scales of the padding too
        return outputs * in_features + 4 * outputs


class Nf4PanelProjection(QuantizedProjection):
    """nf4 on a CPU where our panel kernel runs (`models.panels`): bitsandbytes' nf4 codes and absmaxes (blocks of
    64 along each row, no double quantization: the same weights as `BitsAndBytesProjection`), stored as panels.
    The kernel makes each weight in registers, table[code] * absmax, and sums it as a float32 panel's: the
    product is that of the dequantized weight (float32 inputs and sums, each output one FMA chain), where
    bitsandbytes' CPU kernel dequantizes the whole weight each call (0.2-0.3x float32's rate). A decode step
    reads 4.5 bits a weight. Inputs of another dtype are computed in float32."""

    def __init__(self, codes: Tensor, absmax: Tensor, table: Tensor, out_features: int, bias: Tensor | None):
        super().__init__("nf4", codes.shape[1], out_features)
        self.register_buffer("codes", codes)  # panels: [ceil(out / 16), in, 8] bytes of two codes
        self.register_buffer("absmax", absmax)  # [ceil(out / 16), in / 64, 16]
        self.register_buffer("table", table)  # the 16 nf4 values
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @staticmethod
    def from_projection(projection: Projection) -> Nf4PanelProjection:
        weight = projection.weight.detach()
        packed, state = _bitsandbytes().functional.quantize_4bit(
            weight, blocksize=NF4_BLOCK, compress_statistics=False, quant_type="nf4"
        )
        packed = packed.flatten()  # two codes a byte, the first in the high half
        codes = torch.stack([packed >> 4, packed & 15], dim=1).view(weight.shape)
        absmax = state.absmax.float().view(weight.shape[0], -1)
        bias = None if projection.bias is None else projection.bias.detach()
        return Nf4PanelProjection(*to_nf4_panels(codes, absmax), state.code.float(), weight.shape[0], bias)

    @property
    def weight(self) -> Tensor:
        """The dequantized float32 [out, in] weight (a copy: for inspection and tests)."""
        return nf4_dense_weight(self.codes, self.absmax, self.table, self.out_features)

    def forward(self, x: Tensor, lora: Lora | None = None) -> Tensor:
        y = nf4_linear(x.float(), self.codes, self.absmax, self.table, self.out_features).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y if lora is None else y + lora(x)

    def weight_bytes(self) -> int:
        return self.codes.numel() + self.absmax.numel() * self.absmax.element_size()

    @staticmethod
    def stored_bytes(out_features: int, in_features: int, mode: str) -> int:
        outputs = panel_outputs(out_features)  # codes and absmaxes of the padding too
        return outputs * in_features // 2 + 4 * outputs * (in_features // NF4_BLOCK)


def quantized_kind(mode: str, device: torch.device | str, in_features: int) -> type[QuantizedProjection]:
    """The class that stores a projection of `in_features` inputs on `device` quantized as `mode`: on a CPU our
    panel kernel where it runs (nf4: for inputs in blocks of 64), else PyTorch's int8 kernel for int8; else
    bitsandbytes."""
    on_cpu = torch.device(device).type == "cpu"
    if mode == "int8" and on_cpu:
        return Int8PanelProjection if kernel() is not None else CpuInt8Projection
    if mode == "nf4" and on_cpu and kernel() is not None and in_features % NF4_BLOCK == 0:
        return Nf4PanelProjection
    return BitsAndBytesProjection


def quantize_block(block: LlamaBlock, mode: str) -> LlamaBlock:
    """Replace the block's projections by quantized ones (in place); "none" leaves it as it is."""
    if check_quant(mode) == "none":
        return block
    for parent in (block.self_attn, block.mlp):
        for name, child in list(parent.named_children()):
            if isinstance(child, Projection):
                setattr(parent, name, QuantizedProjection.from_projection(child, mode))
    return block
