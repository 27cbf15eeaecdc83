"""A client's LM head for the rows of concurrent generates: one matmul of [rows, hidden] by the head's
[vocab, hidden] weight, in PyTorch's plain layout (`F.linear`, MKL) and packed for oneDNN laid out for one row
and for many (`models/packed.py`), and as panels for our own kernel (`models/panels.py`: what `PackedCopy` does with
a client's float32 head where the kernel runs, and servers with their projections), for 1 and 2 torch threads.
Median of repeated calls, in ms.

    python benchmarks/head_matmul.py [--vocab 32000] [--hidden 1024] [--rows 1 2 4 8 16] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import append_results, markdown_table

from swarmllm.models.packed import MANY_ROWS, ONE_ROW, PackedProjection
from swarmllm.models.panels import PanelProjection, kernel


def median_ms(call, repeats: int) -> float:
    for _ in range(3):
        call()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        call()
        times.append(time.perf_counter() - began)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    head = torch.nn.Linear(args.hidden, args.vocab, bias=False)
    weight = head.weight.detach()
    packed = {rows: PackedProjection.from_projection(head, rows) for rows in (ONE_ROW, MANY_ROWS)}
    panels = PanelProjection.from_projection(head) if kernel() is not None else None

    def pointwise(x: torch.Tensor, layout: int) -> torch.Tensor:
        return packed[layout](x)

    table_rows, worst = [], 0.0
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            x = torch.randn(rows, args.hidden, generator=torch.Generator().manual_seed(rows))
            with torch.no_grad():
                plain = F.linear(x, weight)
                worst = max(worst, float((pointwise(x, MANY_ROWS) - plain).abs().max() / plain.abs().max()))
                times = [
                    median_ms(lambda: F.linear(x, weight), args.repeats),  # noqa: B023 - called at once
                    median_ms(lambda: pointwise(x, ONE_ROW), args.repeats),  # noqa: B023
                    median_ms(lambda: pointwise(x, MANY_ROWS), args.repeats),  # noqa: B023
                    median_ms(lambda: panels(x), args.repeats) if panels is not None else float("nan"),  # noqa: B023
                ]
            table_rows.append([threads, rows, *(f"{t:.2f}" for t in times), f"{times[0] / times[2]:.2f}x"])
            print(table_rows[-1], flush=True)
    table = markdown_table(
        [
            "torch threads",
            "rows",
            "plain ms",
            "packed for 1 row ms",
            f"packed for {MANY_ROWS} rows ms",
            "panels ms",
            f"plain / packed for {MANY_ROWS}",
        ],
        table_rows,
    )
    print(table)
    if not args.no_record:
        append_results(
            f"A client's LM head for merged rows: plain against packed ([{args.vocab}, {args.hidden}] float32)",
            table,
            f"One matmul of [rows, {args.hidden}] by the head's weight; median of {args.repeats} calls after 3. "
            f"Packed: `PackedProjection` laid out for 1 or {MANY_ROWS} rows (`models/packed.py`, oneDNN). "
            f"Largest difference from the plain product: {worst:.1e} of its largest value.",
        )


if __name__ == "__main__":
    main()
