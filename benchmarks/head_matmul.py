"""A client's LM head for the rows of concurrent generates: one matmul of [rows, hidden] by the head's
[vocab, hidden] weight, in PyTorch's plain layout (`F.linear`, MKL) and packed for oneDNN laid out for one row
and for many (`models/packed.py`), and as panels for our own kernel (`models/panels.py`: what `PackedCopy` does with
a client's float32 head where the kernel runs, and servers with their projections), and a greedy step's call
through the head's int8 screen (`models/screen.py`), from the panels or, as for a head too large to copy, from the
plain weight, for 1 and 2 torch threads. Median of repeated calls, in ms.

The head is random unless `--checkpoint` names a saved causal LM: then it is that model's, and the rows are its
final hidden states over an English text (what decides how many outputs the screen leaves).

    python benchmarks/head_matmul.py [--vocab 32000] [--hidden 1024] [--rows 1 2 4 8 16] [--threads 1 2]
        [--checkpoint PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from common import append_results, markdown_table

from swarmllm.models.packed import MANY_ROWS, ONE_ROW, PackedProjection
from swarmllm.models.panels import PanelProjection, kernel, panel_matmul
from swarmllm.models.screen import Screen, argmax_logits, candidates

TEXT = (
    "The history of the Roman Empire spans many centuries. It began when Augustus became the first emperor in 27 "
    "BC, and the western half fell in 476 AD. Roman law, roads and the Latin language spread across Europe, and "
    "many of them are still with us. def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
)


def real_head(path: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A checkpoint's LM head weight, and its final hidden states over TEXT (normed, as the head reads them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(path)(TEXT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0]
    return model.get_output_embeddings().weight.detach().clone(), hidden


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
    parser.add_argument("--checkpoint", help="a saved causal LM whose head (and hidden states) to use")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    head = torch.nn.Linear(args.hidden, args.vocab, bias=False).requires_grad_(False)
    hidden = None
    if args.checkpoint:
        weight, hidden = real_head(args.checkpoint)
        head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False).requires_grad_(False)
        head.weight.copy_(weight)
        args.vocab, args.hidden = weight.shape
    weight = head.weight.detach()
    packed = {rows: PackedProjection.from_projection(head, rows) for rows in (ONE_ROW, MANY_ROWS)}
    panels = PanelProjection.from_projection(head) if kernel() is not None else None
    screen = Screen.of(weight) if panels is not None else None
    left: list[int] = []  # outputs the screen left, per row

    def pointwise(x: torch.Tensor, layout: int) -> torch.Tensor:
        return packed[layout](x)

    table_rows, worst = [], 0.0
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in args.rows:
            x = torch.randn(rows, args.hidden, generator=torch.Generator().manual_seed(rows))
            if hidden is not None:  # the text's last positions
                x = hidden[-rows:].contiguous()
            if screen is not None:
                screened = argmax_logits(x, panels.panels, screen)
                assert torch.equal(screened.argmax(-1), panels(x).argmax(-1))
                assert torch.equal(argmax_logits(x, weight, screen), screened)  # (from the plain weight)
                estimates = panel_matmul(x, screen.codes, args.vocab, screen.scales)
                left += candidates(estimates, screen.bounds(x)).sum(-1).tolist()
            with torch.no_grad():
                plain = F.linear(x, weight)
                worst = max(worst, float((pointwise(x, MANY_ROWS) - plain).abs().max() / plain.abs().max()))
                times = [
                    median_ms(lambda: F.linear(x, weight), args.repeats),  # noqa: B023 - called at once
                    median_ms(lambda: pointwise(x, ONE_ROW), args.repeats),  # noqa: B023
                    median_ms(lambda: pointwise(x, MANY_ROWS), args.repeats),  # noqa: B023
                    median_ms(lambda: panels(x), args.repeats) if panels is not None else float("nan"),  # noqa: B023
                    median_ms(lambda: argmax_logits(x, panels.panels, screen), args.repeats)  # noqa: B023
                    if screen is not None
                    else float("nan"),
                    median_ms(lambda: argmax_logits(x, weight, screen), args.repeats)  # noqa: B023
                    if screen is not None
                    else float("nan"),
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
            "panels, screened (greedy) ms",
            "plain weight, screened (no copy) ms",
            f"plain / packed for {MANY_ROWS}",
        ],
        table_rows,
    )
    print(table)
    if not args.no_record:
        append_results(
            f"A client's LM head for merged rows: plain against packed and screened ([{args.vocab}, {args.hidden}] "
            f"float32{', ' + args.checkpoint if args.checkpoint else ''})",
            table,
            f"One matmul of [rows, {args.hidden}] by the head's weight; median of {args.repeats} calls after 3. "
            f"Packed: `PackedProjection` laid out for 1 or {MANY_ROWS} rows (`models/packed.py`, oneDNN). "
            f"Largest difference from the plain product: {worst:.1e} of its largest value. Screened: the argmax "
            f"equals the panels' in every call; outputs left per row by the screen: median "
            f"{statistics.median(left) if left else float('nan')}, most {max(left, default=0)}.",
        )


if __name__ == "__main__":
    main()
