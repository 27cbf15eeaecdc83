"""Single-session decode steps/s and batch-forward tokens/s through a local swarm of 2 servers, beside the same
checkpoint run locally with transformers (the no-network limit), as ratios measured in one run.

    python benchmarks/inference.py [--models tiny medium] [--new-tokens 64] [--forward-tokens 512]
"""

from __future__ import annotations

import argparse

import torch
from common import PROMPT, append_results, checkpoint, markdown_table, paired_median_times
from transformers import AutoModelForCausalLM
from transformers.utils import logging as hf_logging

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.local import LocalSwarm


def bench_model(name: str, new_tokens: int, forward_tokens: int, repeats: int) -> list[object]:
    path = checkpoint(name)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    num_blocks = local.config.num_hidden_layers
    prompt = torch.tensor(PROMPT)
    batch = torch.randint(
        0, local.config.vocab_size, (1, forward_tokens), generator=torch.Generator().manual_seed(0)
    )
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(path), (0, num_blocks // 2)), (str(path), (num_blocks // 2, num_blocks))])
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        try:
            with torch.no_grad():
                want = local.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
                got = remote.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
                remote(batch)  # warm-up of the forward path
                # swarm and local runs alternate, so the machine's noise falls on both alike
                swarm_gen, local_gen = paired_median_times(
                    lambda: remote.generate(prompt, max_new_tokens=new_tokens, do_sample=False),
                    lambda: local.generate(prompt, max_new_tokens=new_tokens, do_sample=False),
                    repeats,
                )
                swarm_fwd, local_fwd = paired_median_times(
                    lambda: remote(batch), lambda: local(batch), repeats
                )
        finally:
            remote.shutdown()
    swarm_steps, local_steps = new_tokens / swarm_gen, new_tokens / local_gen
    swarm_tps, local_tps = forward_tokens / swarm_fwd, forward_tokens / local_fwd
    return [
        name,
        f"{swarm_steps:.1f}",
        f"{local_steps:.1f}",
        f"{swarm_steps / local_steps:.2f}",
        f"{swarm_tps:,.0f}",
        f"{local_tps:,.0f}",
        f"{swarm_tps / local_tps:.2f}",
        got.tolist() == want.tolist(),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium"])
    parser.add_argument("--new-tokens", type=int, default=None, help="default: 64 tiny, 32 medium")
    parser.add_argument("--forward-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true", help="print only, don't append to RESULTS.md")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    rows = []
    for name in args.models:
        new_tokens = args.new_tokens or (64 if name == "tiny" else 32)
        rows.append(bench_model(name, new_tokens, args.forward_tokens, args.repeats))
    header = [
        "model",
        "swarm steps/s",
        "local steps/s",
        "ratio",
        f"swarm fwd tok/s (1x{args.forward_tokens})",
        "local fwd tok/s",
        "ratio",
        "tokens equal",
    ]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        append_results(
            "Inference through a local swarm (2 servers, 1 CPU thread each) vs local transformers",
            table,
            f"Median of {args.repeats}; single session, batch 1, 6-token prompt, greedy; local transformers uses the "
            "default torch threads.",
        )


if __name__ == "__main__":
    main()
