"""`swarmllm ladder convert | retrain`: turn a checkpoint's layers into Ladder Residual layers, then recover its
quality with a short distillation from the source model, reporting held-out perplexity at each stage.

A face like cli.py: it parses, reads the data file, prints progress; the conversion, the local model and the
training step are models/convert.py and models/causal_lm.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def add_parser(commands: argparse._SubParsersAction) -> None:
    ladder = commands.add_parser("ladder", help="convert a checkpoint to Ladder Residual and retrain it")
    actions = ladder.add_subparsers(dest="ladder_command", required=True)

    convert = actions.add_parser(
        "convert", help="write a copy of a checkpoint whose layers A:B are ladder layers (tensors unchanged)"
    )
    convert.add_argument("source", help="local checkpoint folder or hub id")
    convert.add_argument("destination", help="new folder to write")
    convert.add_argument("--layers", required=True, metavar="A:B", help="layers [A, B) become ladder layers")

    retrain = actions.add_parser(
        "retrain", help="distil a converted checkpoint from its source model on a text file, in place"
    )
    retrain.add_argument("checkpoint", help="a folder written by `swarmllm ladder convert`")
    retrain.add_argument("--data", required=True, metavar="FILE", help="UTF-8 text to train and evaluate on")
    retrain.add_argument("--steps", type=int, required=True, help="optimizer steps")
    retrain.add_argument(
        "--source", help="the teacher (default: the folder the checkpoint was converted from)"
    )
    retrain.add_argument("--seq-len", type=int, default=64, help="tokens per training sequence")
    retrain.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    retrain.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate")
    retrain.add_argument(
        "--held-out", type=float, default=0.1, help="fraction of the data (its end) kept for perplexity"
    )
    retrain.add_argument("--device", default="cpu", help="torch device")
    retrain.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    if args.ladder_command == "convert":
        from swarmllm.models.convert import convert_to_ladder

        try:
            start, end = (int(x) for x in args.layers.split(":"))
            path = convert_to_ladder(args.source, args.destination, start, end)
        except ValueError as e:
            print(f"swarmllm ladder convert --layers {args.layers}: {e}", file=sys.stderr)
            return 2
        except FileExistsError as e:
            print(f"swarmllm ladder convert: {e}", file=sys.stderr)
            return 2
        print(f"wrote {path} (ladder layers {start}:{end})")
        return 0
    if problem := _retrain_problem(args):
        print(f"swarmllm ladder retrain: {problem}", file=sys.stderr)
        return 2
    try:
        report = retrain(
            args.checkpoint,
            args.data,
            args.steps,
            source=args.source,
            seq_len=args.seq_len,
            batch_size=args.batch_size,
            lr=args.lr,
            held_out=args.held_out,
            device=args.device,
            seed=args.seed,
        )
    except (FileNotFoundError, ValueError) as e:  # no conversion record, no data file, too little data
        print(f"swarmllm ladder retrain: {e}", file=sys.stderr)
        return 2
    print(report.table())
    return 0


def _retrain_problem(args: argparse.Namespace) -> str | None:
    """Why `ladder retrain` cannot run with these numbers (None: it can), before any model loads."""
    if args.steps < 0:
        return f"--steps {args.steps} must be at least 0"
    if args.seq_len < 2:  # perplexity and the training loss predict each sequence's tokens after its first
        return f"--seq-len {args.seq_len} must be at least 2"
    if args.batch_size < 1:
        return f"--batch-size {args.batch_size} must be at least 1"
    if not 0 < args.held_out < 1:
        return f"--held-out {args.held_out} must be a fraction between 0 and 1"
    return None


@dataclass
class RetrainReport:
    held_out_tokens: int
    source_ppl: float  # the source model: before conversion
    converted_ppl: float  # right after conversion, tensors unchanged
    retrained_ppl: float
    steps: int
    seconds: float

    def table(self) -> str:
        return (
            f"held-out perplexity over {self.held_out_tokens} tokens:\n"
            f"  before conversion  {self.source_ppl:10.3f}\n"
            f"  after conversion   {self.converted_ppl:10.3f}\n"
            f"  after retraining   {self.retrained_ppl:10.3f}  ({self.steps} steps, {self.seconds:.0f} s)"
        )


def retrain(
    checkpoint: str | Path,
    data: str | Path,
    steps: int,
    *,
    source: str | Path | None = None,
    seq_len: int = 64,
    batch_size: int = 8,
    lr: float = 3e-4,
    held_out: float = 0.1,
    device: str = "cpu",
    seed: int = 0,
    log=print,
) -> RetrainReport:
    """Distil `checkpoint` from its source on `data` for `steps` steps, write the weights back into its files,
    and report held-out perplexity of the source, of the checkpoint before and after."""
    import torch
    from transformers import AutoTokenizer

    from swarmllm.models.causal_lm import load_causal_lm, perplexity
    from swarmllm.models.convert import conversion_source, distill, save_weights

    teacher_path = Path(source) if source else conversion_source(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    ids = tokenizer(Path(data).read_text(), add_special_tokens=False)["input_ids"]
    count = len(ids) // seq_len
    evaluate = max(1, round(count * held_out))
    if count - evaluate < 1:
        raise ValueError(
            f"{data}: {len(ids)} tokens are too few for sequences of {seq_len} plus a held-out part"
        )
    sequences = torch.tensor(ids[: count * seq_len], device=device).view(count, seq_len)
    train, test = sequences[:-evaluate], sequences[-evaluate:]

    teacher = load_causal_lm(teacher_path, device=device).requires_grad_(False)
    student = load_causal_lm(checkpoint, device=device)
    source_ppl, converted_ppl = perplexity(teacher, test), perplexity(student, test)
    log(
        f"{len(train)} training and {len(test)} held-out sequences of {seq_len} tokens; teacher {teacher_path}"
    )
    log(f"held-out perplexity: source {source_ppl:.3f}, converted {converted_ppl:.3f}")

    generator = torch.Generator().manual_seed(seed)

    def batches():
        while True:
            yield train[torch.randint(len(train), (batch_size,), generator=generator).to(device)]

    began, every = time.perf_counter(), max(1, steps // 20)

    def progress(step: int, loss: float) -> None:
        if step % every == 0 or step == steps:
            log(f"step {step}/{steps}  KL {loss:.4f}  {time.perf_counter() - began:.0f} s")

    distill(student, teacher, batches(), steps, lr=lr, on_step=progress)
    seconds = time.perf_counter() - began
    retrained_ppl = perplexity(student, test)
    save_weights(student, checkpoint)
    return RetrainReport(test.numel() - len(test), source_ppl, converted_ppl, retrained_ppl, steps, seconds)
