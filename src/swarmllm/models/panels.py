"""Projections stored as panels of 16 outputs, multiplied by a small AVX2 or AVX-512 kernel of our own
(`kernels/panel_gemm.cpp`): a CPU server's large projections, float32, bfloat16 or float16 (and int8 and nf4
codes, `models.quant`), always summed in float32.

A decode step is mostly the read of the span's weights, and a merged step (continuous batching) adds each row's
FLOPs. oneDNN's and MKL's kernels do the two one after the other: 8 rows through one server's 8 medium layers
took 45 ms where the read alone takes 22-26 (`benchmarks/RESULTS.md`, session 25). This kernel walks each panel
front to back once per call and lets the rows' FMAs run while the next lines stream in: on the same 32
projections, one thread, 1 row takes 17.6 ms against 22.8 for the best other layout, 8 rows 29.6 against 44.5,
and a 512-row prefill 1,047 against 1,099 (`benchmarks/panel_matmul.py`). A block of several panels asks for
their weights 32 inputs before it reads them: without that, a k's FMAs over several rows outlasted the hardware's
own prefetch and the read stalled behind them (8 rows, AVX-512: 32.8 ms, with it 26.4; 1 row 24.0 and 23.4 on
that VM). One layout serves every row count, so nothing is re-laid out as the load changes (as oneDNN's packed
weights must be, `models.packed`).

Each output is one float32 FMA chain over the input in order, so a row's result is bit for bit the same whatever
rows share its call: a merged step, a failover's replay and a lone step agree exactly.

On a CPU with AVX-512 the same source is built with it (`ISA_FLAGS`): a panel's 16 outputs fill one register, not
two, and a block of rows takes up to 8 rows x 3 panels. Reading the weights costs the same; the rows' FMAs take
half the instructions: 8 rows through 8 medium layers, one thread, 29 ms against 39-41 for the AVX2 build, a
512-row prefill 572-586 against 992-997, 1 row the same (an Intel Xeon with AVX-512, `benchmarks/panel_matmul.py`);
nf4 weights are looked up 16 at a time (1 row 8.8 ms against 25.5). The chains are the AVX2 build's lane for lane,
so servers of either build give the same bits too.

The kernel is compiled once per source with the host's C++ compiler (the one Inductor uses too) into
`~/.cache/swarmllm/kernels` and loaded with ctypes, which drops the GIL while it runs. Where the CPU lacks AVX2
and FMA, or no compiler is found, `kernel()` is None and callers keep oneDNN's layout (an AVX-512 build that fails
falls back to the AVX2 one). With more than one torch thread, a call splits its panels over that many threads of
torch's own OpenMP runtime (the library links libgomp.so.1, which torch has loaded: one pool of threads, not two
spinning against each other).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from swarmllm.models.llama import Lora, Projection, RowLoras

logger = logging.getLogger(__name__)

PANEL = 16  # outputs per panel (two AVX2 vectors, one AVX-512 vector)
PANEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
SOURCE = Path(__file__).with_name("kernels") / "panel_gemm.cpp"
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
# a library per instruction set (the source picks its AVX-512 path where built with these); both give the same bits
ISA_FLAGS = {"avx2": (), "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")}
# a call costs ~7 us more than a plain `F.linear` from Python: smaller weights (the tiny model's) stay plain; from
# 576 x 576 (SmolLM2's) on, panels are as fast for one row and faster for several
MIN_PANEL_ELEMENTS = 1 << 18
MIN_PANELS_PER_THREAD = 16  # a call splits over threads only where each gets at least this many panels
_pointer, _int = ctypes.c_void_p, ctypes.c_int64
# (x, M, K, panels, N, y, threads) and (x, M, K, codes, scales, N, y, threads)
_Float32 = ctypes.CFUNCTYPE(None, _pointer, _int, _int, _pointer, _int, _pointer, _int)
_Int8 = ctypes.CFUNCTYPE(None, _pointer, _int, _int, _pointer, _pointer, _int, _pointer, _int)
# (x, M, K, codes, absmax, table, N, y, threads)
_Nf4 = ctypes.CFUNCTYPE(None, _pointer, _int, _int, _pointer, _pointer, _pointer, _int, _pointer, _int)
NF4_BLOCK = 64  # inputs per nf4 absmax (bitsandbytes' blocks of 64 along a row)


@dataclass(frozen=True)
class Kernels:
    """The kernel's entry points: for float32, bfloat16 and float16 panels by dtype (the same arguments: only the
    weight's type differs), for int8 panels with a float32 scale per output, and for nf4 panels; `isa`: the
    instruction set the library was built for (`ISA_FLAGS`)."""

    isa: str
    by_dtype: dict[torch.dtype, Callable]
    int8: Callable
    nf4: Callable


def _cache_dir() -> Path:
    return Path(os.environ.get("SWARMLLM_KERNEL_DIR", Path.home() / ".cache" / "swarmllm" / "kernels"))


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def build(directory: Path, compiler: str, isa: str = "avx2") -> Path | None:
    """The kernel's library for instruction set `isa` (`ISA_FLAGS`) in `directory`, compiled there first unless a
    build of the same source, compiler and flags is there already; None if it does not compile."""
    source = SOURCE.read_bytes()
    flags = (*FLAGS, *ISA_FLAGS[isa])
    digest = hashlib.sha256(source + " ".join((compiler, *flags)).encode()).hexdigest()[:16]
    library = directory / f"panel_gemm-{isa}-{digest}.so"
    if library.exists():
        return library
    partial = None
    try:
        directory.mkdir(parents=True, exist_ok=True)  # (a read-only home fails here: no kernel, not a crash)
        # built under a name of its own, then renamed: processes starting together never load a half-written file
        fd, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        subprocess.run(
            [compiler, *flags, "-o", partial, str(SOURCE)], check=True, capture_output=True, timeout=120
        )
        os.replace(partial, library)
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or b"")[-500:].decode(errors="replace")
        logger.warning("the panel kernel did not compile (%s %s): oneDNN's layout is used", e, detail)
        return None
    finally:
        if partial is not None and os.path.exists(partial):
            os.unlink(partial)
    return library


def host_isa() -> str | None:
    """The widest instruction set of `ISA_FLAGS` this CPU runs (PyTorch's own choice, which
    `ATEN_CPU_CAPABILITY=avx2` lowers), or None."""
    return {"AVX2": "avx2", "AVX512": "avx512"}.get(torch.backends.cpu.get_cpu_capability())


@functools.cache
def kernel(isa: str | None = None) -> Kernels | None:
    """The compiled kernels for `isa` (by default the host's widest: an AVX-512 library that does not compile
    falls back to the AVX2 one), or None where they cannot run here."""
    widest = host_isa()
    if widest is None or (isa == "avx512" and widest != "avx512"):
        return None
    compiler = _compiler()
    if compiler is None:
        logger.info("no C++ compiler found: CPU projections stay in oneDNN's layout")
        return None
    chosen = isa or widest
    library = build(_cache_dir(), compiler, chosen)
    if library is None and isa is None and chosen != "avx2":
        chosen, library = "avx2", build(_cache_dir(), compiler, "avx2")
    if library is None:
        return None
    loaded = ctypes.CDLL(str(library))
    return Kernels(
        chosen,
        {
            torch.float32: _Float32(("swarmllm_panel_gemm", loaded)),
            torch.bfloat16: _Float32(("swarmllm_panel_gemm_bf16", loaded)),
            torch.float16: _Float32(("swarmllm_panel_gemm_f16", loaded)),
        },
        _Int8(("swarmllm_panel_gemm_int8", loaded)),
        _Nf4(("swarmllm_panel_gemm_nf4", loaded)),
    )


def panel_outputs(out_features: int) -> int:
    """The outputs a weight takes as panels: whole panels of 16, the last zero-padded (what the memory plan counts)."""
    return -(-out_features // PANEL) * PANEL


def to_panels(weight: Tensor) -> Tensor:
    """An [out, in] weight (float32, or int8 codes) as [ceil(out / 16), in, 16] panels, the last zero-padded."""
    out_features, in_features = weight.shape
    padded = torch.zeros(panel_outputs(out_features), in_features, dtype=weight.dtype)
    padded[:out_features] = weight
    return padded.view(-1, PANEL, in_features).transpose(1, 2).contiguous()


def from_panels(panels: Tensor, out_features: int) -> Tensor:
    """The plain [out, in] weight back (a copy)."""
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])[:out_features].contiguous()


def call_threads(panels: int) -> int:
    """The threads a call over `panels` panels splits them over: torch's count, each with MIN_PANELS_PER_THREAD."""
    return max(1, min(torch.get_num_threads(), panels // MIN_PANELS_PER_THREAD))


def _rows_through(
    x: Tensor,
    in_features: int,
    out_features: int,
    panels: int,
    what: str,
    run: Callable[[Kernels, Tensor, int, Tensor, int], None],
) -> Tensor:
    """Check x (float32 [..., in] on the CPU), then `run(kernels, rows, m, y, threads)` over its m rows into y
    ([m, out] float32), as [..., out]; the call splits `panels` over threads."""
    if x.dtype != torch.float32 or not x.is_cpu or x.shape[-1] != in_features:
        raise ValueError(
            f"{what} takes float32 CPU inputs of {in_features} features, got {x.dtype} {tuple(x.shape)} "
            f"on {x.device}"
        )
    rows = x.reshape(-1, in_features).contiguous()
    m = rows.shape[0]
    y = torch.empty(m, out_features, dtype=torch.float32)
    if m > 0:
        kernels = kernel()
        if kernels is None:
            raise RuntimeError("the panel kernel does not run on this machine")
        run(kernels, rows, m, y, call_threads(panels))
    return y.view(*x.shape[:-1], out_features)


def panel_matmul(x: Tensor, panels: Tensor, out_features: int, scales: Tensor | None = None) -> Tensor:
    """x W^T for a weight stored as `panels` (float32, bfloat16 or float16, summed in float32): x is float32
    [..., in] on the CPU; int8 panels are codes whose outputs `scales` (float32, one per panel output, padding
    included) multiply."""
    k = panels.shape[1]
    if panels.dtype == torch.int8 and (
        scales is None or scales.dtype != torch.float32 or scales.numel() != panels.shape[0] * PANEL
    ):
        raise ValueError("int8 panels need float32 scales, one per panel output")

    def run(kernels: Kernels, rows: Tensor, m: int, y: Tensor, threads: int) -> None:
        if panels.dtype == torch.int8:
            kernels.int8(
                rows.data_ptr(), m, k, panels.data_ptr(), scales.data_ptr(), out_features, y.data_ptr(), threads
            )  # fmt: skip
        else:
            kernels.by_dtype[panels.dtype](
                rows.data_ptr(), m, k, panels.data_ptr(), out_features, y.data_ptr(), threads
            )

    return _rows_through(x, k, out_features, panels.shape[0], "panel matmul", run)


def to_nf4_panels(codes: Tensor, absmax: Tensor) -> tuple[Tensor, Tensor]:
    """nf4 codes ([out, in] uint8, 0-15) and absmaxes ([out, in / 64] float32) as the kernel's panels: codes
    [ceil(out / 16), in, 8] bytes, output i's code in byte i's low half and output i + 8's in its high half, and
    absmaxes [ceil(out / 16), in / 64, 16]; the padding's absmax is 0."""
    out_features, in_features = codes.shape
    if in_features % NF4_BLOCK or absmax.shape != (out_features, in_features // NF4_BLOCK):
        raise ValueError(f"nf4 panels need inputs in blocks of {NF4_BLOCK} and one absmax a block")
    padded = panel_outputs(out_features)
    codes = nn.functional.pad(codes, (0, 0, 0, padded - out_features)).view(-1, PANEL, in_features)
    packed = codes[:, :8] | (codes[:, 8:] << 4)
    absmax = nn.functional.pad(absmax.float(), (0, 0, 0, padded - out_features)).view(
        -1, PANEL, absmax.shape[1]
    )
    return packed.transpose(1, 2).contiguous(), absmax.transpose(1, 2).contiguous()


def nf4_dense_weight(codes: Tensor, absmax: Tensor, table: Tensor, out_features: int) -> Tensor:
    """The float32 [out, in] weight that nf4 panels stand for: table[code] * absmax (a copy)."""
    both = torch.cat([codes & 15, codes >> 4], dim=2)  # [panels, in, 16]: outputs 0-7, then 8-15
    weight = table[both.long()] * absmax.repeat_interleave(NF4_BLOCK, dim=1)
    return weight.transpose(1, 2).reshape(-1, codes.shape[1])[:out_features].contiguous()


def nf4_matmul(x: Tensor, codes: Tensor, absmax: Tensor, table: Tensor, out_features: int) -> Tensor:
    """x W^T for an nf4 weight as panels (`to_nf4_panels`; table: the 16 float32 nf4 values): the float32
    panel product of the dequantized weight, bit for bit."""
    k = codes.shape[1]
    shape = (codes.shape[0], k // NF4_BLOCK, PANEL)
    if k % NF4_BLOCK or codes.dtype != torch.uint8 or absmax.dtype != torch.float32 or absmax.shape != shape:
        raise ValueError("nf4 panels are uint8 codes with float32 absmaxes as `to_nf4_panels` lays them out")
    if table.dtype != torch.float32 or table.numel() != 16:
        raise ValueError("the nf4 table is 16 float32 values")

    def run(kernels: Kernels, rows: Tensor, m: int, y: Tensor, threads: int) -> None:
        kernels.nf4(
            rows.data_ptr(), m, k, codes.data_ptr(), absmax.data_ptr(), table.data_ptr(), out_features,
            y.data_ptr(), threads,
        )  # fmt: skip

    return _rows_through(x, k, out_features, codes.shape[0], "nf4 panel matmul", run)


class _Nf4Matmul(torch.autograd.Function):
    """`nf4_matmul`; backward gives x's gradient only, from the dequantized weight."""

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, absmax: Tensor, table: Tensor, out_features: int) -> Tensor:
        ctx.save_for_backward(codes, absmax, table)
        ctx.out_features = out_features
        return nf4_matmul(x, codes, absmax, table, out_features)

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight = nf4_dense_weight(*ctx.saved_tensors, ctx.out_features)
        return grad @ weight.to(grad.dtype), None, None, None, None


def nf4_linear(x: Tensor, codes: Tensor, absmax: Tensor, table: Tensor, out_features: int) -> Tensor:
    """`nf4_matmul`, with the input's gradient where autograd asks for it."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Nf4Matmul.apply(x, codes, absmax, table, out_features)
    return nf4_matmul(x, codes, absmax, table, out_features)


def dense_weight(panels: Tensor, out_features: int, scales: Tensor | None = None) -> Tensor:
    """The float32 [out, in] weight that panels (and, for int8 codes, their `scales`) stand for (a copy)."""
    weight = from_panels(panels, out_features)
    return weight if scales is None else weight.float() * scales[:out_features, None]


class _PanelMatmul(torch.autograd.Function):
    """x W^T with W as panels; backward gives x's gradient only (server weights are frozen), from W made dense."""

    @staticmethod
    def forward(ctx, x: Tensor, panels: Tensor, out_features: int, scales: Tensor | None) -> Tensor:
        ctx.save_for_backward(panels, scales)
        ctx.out_features = out_features
        return panel_matmul(x, panels, out_features, scales)

    @staticmethod
    def backward(ctx, grad: Tensor):
        panels, scales = ctx.saved_tensors
        return grad @ dense_weight(panels, ctx.out_features, scales).to(grad.dtype), None, None, None


def panel_linear(x: Tensor, panels: Tensor, out_features: int, scales: Tensor | None = None) -> Tensor:
    """`panel_matmul`, with the input's gradient where autograd asks for it (fine-tuning through the server)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _PanelMatmul.apply(x, panels, out_features, scales)
    return panel_matmul(x, panels, out_features, scales)


class PanelProjection(nn.Module):
    """A `Projection` whose weight is stored as panels for the kernel above (see the module doc). A bfloat16 or
    float16 one reads half float32's bytes and computes in float32: its input is widened, its output rounded back
    (a plain half-precision matmul on a CPU costs float32's time for one row and 2x for 8). With `scales` the
    panels are int8 codes (`models.quant.Int8PanelProjection`)."""

    def __init__(self, panels: Tensor, out_features: int, bias: Tensor | None, scales: Tensor | None = None):
        super().__init__()
        self.register_buffer("panels", panels)
        self.register_buffer("scales", scales)  # one per panel output, the padding's 0
        self.out_features, self.in_features = out_features, panels.shape[1]
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    @classmethod
    def from_projection(cls, projection: Projection | nn.Linear) -> PanelProjection:
        bias = None if projection.bias is None else projection.bias.detach()
        return cls(to_panels(projection.weight.detach()), projection.out_features, bias)

    @property
    def weight(self) -> Tensor:
        """The plain [out, in] weight (a copy: for inspection and tests, not for the hot path)."""
        return dense_weight(self.panels, self.out_features, self.scales)

    def forward(self, x: Tensor, lora: Lora | RowLoras | None = None) -> Tensor:
        y = panel_linear(x.float(), self.panels, self.out_features, self.scales)
        if self.bias is not None:  # added in float32, then rounded once, as a half-precision `F.linear` does
            y = (y + self.bias).to(torch.promote_types(x.dtype, self.bias.dtype))
        elif x.dtype != torch.float32:
            y = y.to(x.dtype)
        return y if lora is None else y + lora(x)
