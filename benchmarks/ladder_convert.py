"""Converting a small trained model to Ladder Residual: held-out perplexity before conversion, right after it
(tensors unchanged), and after a short distillation from the source (`swarmllm ladder retrain`).

The model is trained here for the purpose: a Llama of hidden 128, 6 layers (GQA 4/2), the tiny word-level
tokenizer, trained from scratch on generated text with structure a small model can learn (subject-verb-object
sentences whose verb and preposition follow from the subject, counting runs of digits, repeated letter
sequences). Then `swarmllm ladder convert` (the upper half, and all layers) and `swarmllm ladder retrain` on a
fresh text file from the same generator (its end held out for perplexity).

    python benchmarks/ladder_convert.py [--pretrain-steps 600] [--retrain-steps 200] [--no-record]
"""

from __future__ import annotations

import argparse
import random
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from common import append_results, markdown_table
from transformers.utils import logging as hf_logging

from swarmllm.ladder_commands import retrain
from swarmllm.models.causal_lm import load_causal_lm, loss_per_token
from swarmllm.models.convert import convert_to_ladder, save_weights
from swarmllm.models.tiny import make_tiny_checkpoint, tiny_tokenizer

SUBJECTS = {
    "cat": ("sat", "on"),
    "dog": ("ran", "to"),
    "she": ("went", "to"),
    "he": ("looked", "at"),
    "they": ("sat", "by"),
}
OBJECTS = ("tree", "sea", "sun", "moon", "dog", "cat")
SHAPE = dict(hidden_size=128, intermediate_size=384, num_attention_heads=4, num_key_value_heads=2)


def generated_text(words: int, seed: int) -> str:
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < words:
        kind = rng.random()
        if kind < 0.5:
            subject = rng.choice(list(SUBJECTS))
            verb, prep = SUBJECTS[subject]
            out += [
                "the" if subject in ("cat", "dog") else "",
                subject,
                verb,
                prep,
                "the",
                rng.choice(OBJECTS),
                ".",
            ]
        elif kind < 0.75:
            start = rng.randrange(10)
            out += [str((start + i) % 10) for i in range(rng.randrange(4, 9))] + ["."]
        else:
            letters = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(3)]
            out += letters + ["-"] + letters + ["."]
    return " ".join(w for w in out if w)


def pretrain(path: Path, steps: int, seq_len: int, batch_size: int, log) -> float:
    """Train the standard model at `path` from scratch on generated text; writes the weights back."""
    tokenizer = tiny_tokenizer()
    ids = tokenizer(
        generated_text(steps * batch_size * seq_len // 4 + 5000, seed=1), add_special_tokens=False
    )
    ids = torch.tensor(ids["input_ids"])
    sequences = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    model = load_causal_lm(path).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(0)
    began = time.perf_counter()
    for step in range(1, steps + 1):
        loss = loss_per_token(
            model, sequences[torch.randint(len(sequences), (batch_size,), generator=generator)]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % max(1, steps // 10) == 0:
            log(f"pretrain step {step}/{steps}  loss {loss.item():.3f}  {time.perf_counter() - began:.0f} s")
    model.eval()
    save_weights(model, path)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--retrain-steps", type=int, default=200)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    torch.set_num_threads(1)
    half = args.layers // 2
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        source = make_tiny_checkpoint(root / "source", "llama", num_layers=args.layers, **SHAPE)
        pretrain_s = pretrain(source, args.pretrain_steps, args.seq_len, args.batch_size, print)
        data = root / "data.txt"
        data.write_text(generated_text(60_000, seed=2))
        rows = []
        for start, end in ((half, args.layers), (0, args.layers)):
            converted = convert_to_ladder(source, root / f"ladder-{start}-{end}", start, end)
            report = retrain(
                converted,
                data,
                args.retrain_steps,
                seq_len=args.seq_len,
                batch_size=args.batch_size,
                lr=1e-3,
            )
            print(report.table())
            rows.append(
                [
                    f"{start}:{end}",
                    f"{report.source_ppl:.3f}",
                    f"{report.converted_ppl:.3f}",
                    f"{report.retrained_ppl:.3f}",
                    report.steps,
                    f"{report.seconds:.0f}",
                ]
            )
    table = markdown_table(
        [
            "ladder layers",
            "ppl before conversion",
            "ppl after conversion",
            "ppl after retraining",
            "retrain steps",
            "retrain s",
        ],
        rows,
    )
    uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    notes = (
        f"Model: Llama, hidden {SHAPE['hidden_size']}, {args.layers} layers, heads 4/2 kv, MLP "
        f"{SHAPE['intermediate_size']}, vocab 186 (the tiny word-level tokenizer), trained from scratch for "
        f"{args.pretrain_steps} steps ({pretrain_s:.0f} s, batch {args.batch_size} x {args.seq_len}) on generated "
        f"text (benchmarks/ladder_convert.py: sentences with subject-dependent verbs, counting digits, repeated "
        f"letters). Retraining: `retrain(...)` as `swarmllm ladder retrain` runs it (KL to the source model, AdamW "
        f"lr 1e-3, batch {args.batch_size} x {args.seq_len}) on a fresh 60,000-word file from the same generator; "
        f"perplexity on its last 10% (held out). 1 CPU thread; `uptime`: {uptime}."
    )
    print(table)
    print(notes)
    if not args.no_record:
        append_results("Ladder Residual conversion of a small trained model", table, notes)


if __name__ == "__main__":
    main()
