"""A CPU server's projections, one step: the 4 projections of each of `--layers` layers of the medium model's
shape (qkv [1536, 1024], o [1024, 1024], gate_up [5632, 1024], down [1024, 2816], float32) applied to a step's
rows in turn, as a decode step through a server's span does, in four layouts: PyTorch's plain one (MKL), packed
for oneDNN laid out for 1 row and for 16 (`models/packed.py`), and panels for our own kernel
(`models/panels.py`; on an AVX-512 host, through the AVX2 library as well); with `--quant`, also int8 and nf4
codes as panels (`models/quant.py`) and nf4 through bitsandbytes' CPU kernels. The layers' weights (362 MB for 8) are far larger than the caches, so every step reads
them from memory. Median of interleaved repeats, in ms a step; the panels' largest error against a float64
product.

    python benchmarks/panel_matmul.py [--layers 8] [--rows 1 2 4 8 16 512] [--threads 1 2] [--repeats 7] [--quant]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from common import append_results, markdown_table

from swarmllm.models.packed import MANY_ROWS, ONE_ROW, PackedProjection
from swarmllm.models.panels import PanelProjection, call_threads, host_isa, kernel
from swarmllm.models.quant import BitsAndBytesProjection, QuantizedProjection

SHAPES = [(1536, 1024), (1024, 1024), (5632, 1024), (1024, 2816)]  # one medium layer's [out, in]


def avx2_panels(projection: PanelProjection) -> Callable[[torch.Tensor], torch.Tensor]:
    """`projection`'s product through the AVX2 library (on a host whose panels use the AVX-512 one)."""
    panels, out_features = projection.panels, projection.out_features
    run = kernel("avx2").by_dtype[panels.dtype]

    def call(x: torch.Tensor) -> torch.Tensor:
        y = torch.empty(x.shape[0], out_features)
        threads = call_threads(panels.shape[0])
        run(x.data_ptr(), x.shape[0], x.shape[1], panels.data_ptr(), out_features, y.data_ptr(), threads)
        return y

    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 512])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quant", action="store_true", help="int8 and nf4 layouts too")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if kernel() is None:
        raise SystemExit("the panel kernel does not run here (no AVX2 and FMA, or no C++ compiler)")

    torch.manual_seed(0)
    linears = [torch.nn.Linear(k, n, bias=False) for _ in range(args.layers) for n, k in SHAPES]
    layouts = {
        "plain": linears,  # F.linear
        "packed for 1 row": [PackedProjection.from_projection(linear, ONE_ROW) for linear in linears],
        f"packed for {MANY_ROWS} rows": [
            PackedProjection.from_projection(linear, MANY_ROWS) for linear in linears
        ],
        "panels": [PanelProjection.from_projection(linear) for linear in linears],
    }
    float32 = [name for name in layouts if name != "panels"]  # what the panels are compared with
    # on an AVX-512 host, the panels of the AVX2 library too, for comparison
    if host_isa() == "avx512" and kernel("avx2") is not None:
        layouts["panels, AVX2 library"] = [avx2_panels(panel) for panel in layouts["panels"]]
    if args.quant:
        for mode in ("int8", "nf4"):
            layouts[f"{mode} panels"] = [QuantizedProjection.from_projection(lin, mode) for lin in linears]
        layouts["nf4 bitsandbytes"] = [BitsAndBytesProjection.from_projection(lin, "nf4") for lin in linears]
    megabytes = sum(n * k for n, k in SHAPES) * args.layers * 4 / 1e6

    table_rows, worst = [], 0.0
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            generator = torch.Generator().manual_seed(rows)
            inputs = {k: torch.randn(rows, k, generator=generator) for k in {k for _, k in SHAPES}}
            with torch.no_grad():
                for linear, panel in zip(linears[: len(SHAPES)], layouts["panels"], strict=False):
                    x = inputs[linear.in_features]
                    want = x.double() @ linear.weight.double().T
                    worst = max(worst, float((panel(x).double() - want).abs().max() / want.abs().max()))
                times: dict[str, list[float]] = {name: [] for name in layouts}
                for repeat in range(args.repeats + 1):  # the first round warms up
                    # in turn, the order reversed every other round (a layout run after another runs faster here)
                    for name, calls in list(layouts.items())[:: 1 if repeat % 2 else -1]:
                        began = time.perf_counter()
                        for call, linear in zip(calls, linears, strict=True):
                            call(inputs[linear.in_features])
                        times[name].append(time.perf_counter() - began)
            ms = {name: statistics.median(t[1:]) * 1e3 for name, t in times.items()}
            best_other = min(ms[name] for name in float32)
            table_rows.append(
                [threads, rows, *(f"{t:.1f}" for t in ms.values()), f"{best_other / ms['panels']:.2f}x"]
            )
            print(table_rows[-1], flush=True)
    table = markdown_table(
        ["torch threads", "rows", *(f"{name} ms" for name in layouts), "best float32 other / panels"],
        table_rows,
    )
    print(table)
    if not args.no_record:
        append_results(
            f"A CPU server's projections: panels against MKL and oneDNN ({args.layers} medium layers)",
            table,
            f"{len(linears)} projections ({megabytes:.0f} MB of float32 weights) applied in turn to a step's rows, "
            f"median of {args.repeats} interleaved repeats after one (the order reversed every other round). "
            f"Panels' largest error against a float64 product: {worst:.1e} of its largest value.",
        )


if __name__ == "__main__":
    main()
