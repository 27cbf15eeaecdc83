"""Training tokens/s (forward + backward + optimizer step) through a local swarm of 2 servers, beside local
training of the same checkpoint with transformers (+ peft for LoRA), for prompt tuning and LoRA, in one run.

    python benchmarks/finetune.py [--models tiny] [--batch 8] [--length 128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import peft  # noqa: E402
import torch  # noqa: E402
from common import append_results, checkpoint, markdown_table, paired_median_times  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from swarmllm import AutoDistributedModelForCausalLM  # noqa: E402
from swarmllm.local import LocalSwarm  # noqa: E402

PRE_SEQ_LEN = 16
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])


def train_step(model, optimizer, forward):
    def step():
        loss = forward(model)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def local_ptune(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).requires_grad_(False)
    prompts = torch.nn.Parameter(torch.randn(PRE_SEQ_LEN, model.config.hidden_size) * 0.02)

    def forward(model):
        embeds = model.get_input_embeddings()(ids)
        logits = model(inputs_embeds=torch.cat([prompts.expand(ids.shape[0], -1, -1), embeds], 1)).logits
        logits = logits[:, PRE_SEQ_LEN:-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())

    return train_step(model, torch.optim.AdamW([prompts], lr=1e-3), forward)


def local_lora(path, ids):
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), peft.LoraConfig(**LORA)
    )
    params = [p for p in model.parameters() if p.requires_grad]
    return train_step(model, torch.optim.AdamW(params, lr=1e-3), lambda m: m(input_ids=ids, labels=ids).loss)


def swarm_step(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    return train_step(model.train(), torch.optim.AdamW(params, lr=1e-3), lambda m: m(ids, labels=ids).loss)


def bench(name: str, batch: int, length: int, repeats: int) -> list[list[object]]:
    path = checkpoint(name)
    config = AutoModelForCausalLM.from_pretrained(path).config
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0))
    blocks = config.num_hidden_layers
    rows = []
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(path), (0, blocks // 2)), (str(path), (blocks // 2, blocks))])
        for mode in ("ptune", "lora"):
            kwargs = dict(tuning_mode="ptune", pre_seq_len=PRE_SEQ_LEN) if mode == "ptune" else {}
            remote = AutoDistributedModelForCausalLM.from_pretrained(
                str(path), initial_peers=swarm.initial_peers, spot_check_fraction=0, **kwargs
            )
            try:
                if mode == "lora":
                    remote.add_adapter(peft.LoraConfig(**LORA))
                ours = swarm_step(remote, ids)
                theirs = local_ptune(path, ids) if mode == "ptune" else local_lora(path, ids)
                ours(), theirs()  # warm-up (connections, the first adapter upload)
                swarm_s, local_s = paired_median_times(ours, theirs, repeats)
            finally:
                remote.shutdown()
            tokens = batch * length
            rows.append(
                [
                    name,
                    mode,
                    f"{batch}x{length}",
                    f"{tokens / swarm_s:,.0f}",
                    f"{tokens / local_s:,.0f}",
                    f"{local_s / swarm_s:.2f}",
                ]
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny"], choices=["tiny", "medium"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="print only, don't append to RESULTS.md")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    rows = [row for name in args.models for row in bench(name, args.batch, args.length, args.repeats)]
    header = ["model", "mode", "batch", "swarm train tok/s", "local train tok/s", "swarm / local"]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        notes = (
            f"Median of {args.repeats} paired steps (forward + backward + AdamW step; loss over every token); "
            f"ptune: {PRE_SEQ_LEN} prompts; LoRA: r=8 on q_proj and v_proj. Swarm: 2 servers (1 thread each, "
            "the host's cores split between them), the client's autograd function, rows cut into micro-batches by the "
            "servers' announced speeds (up to 4); local: transformers (+ peft) with the default torch threads, same checkpoint and batch."
        )
        append_results("Fine-tuning through a local swarm (2 servers) vs local training", table, notes)


if __name__ == "__main__":
    main()
