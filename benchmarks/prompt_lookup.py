"""Prompt lookup decoding (drafts copied from the prompt and the answer so far, no draft model) through a local
swarm of 2 servers serving SmolLM2-135M-Instruct's real weights: single-session tokens/s of plain greedy
`generate` against `generate(prompt_lookup_num_tokens=K)` on chat requests whose answers copy their context
(code with a name changed, spelling corrected, a record turned into JSON, a sentence quoted) and one whose
answer does not (an explanation), the same tokens asserted; on loopback and under an emulated round trip
(`--rtt-ms`: the delay proxy of `speculative.py`, which every message to a server crosses).

    python benchmarks/prompt_lookup.py [--rtt-ms 0 50] [--lookup-tokens 5] [--new-tokens 96] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, markdown_table  # noqa: E402
from speculative import PROXY_HOST, DelayProxy, free_port  # noqa: E402

TASKS = {
    "code (rename)": "In the code below, rename the function `f` to `area`. Return the full code.\n\n```python\n"
    "def f(width, height):\n    return width * height\n\nprint(f(3, 4))\nprint(f(5, 6))\n```",
    "spelling": "Correct the spelling mistakes in this paragraph and return the corrected paragraph: 'Teh quick "
    "brown fox jumpd over the lazzy dog. Afterwards, the fox walkd back to its den in the forrest, where its "
    "famly was waiting for dinner.'",
    "to JSON": "Convert this record to JSON with the keys name, age and city: Alice Smith is 34 years old and "
    "lives in Paris. Bob Jones is 27 years old and lives in Berlin.",
    "quote": "What does the second sentence of this text say? Quote it. Text: 'The library opens at nine. "
    "Children under twelve must be accompanied by an adult at all times. Books can be borrowed for three weeks.'",
    "explain (no copying)": "Explain photosynthesis in two sentences.",
}


def rates(model, tokenizer, args) -> list[list]:
    """Per task: median tokens/s of plain and prompt-lookup greedy generation (paired, after a warm-up), the
    acceptance, rounds and tokens."""
    rows = []
    for task, text in TASKS.items():
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        options = dict(max_new_tokens=args.new_tokens, do_sample=False)
        lookup = dict(
            options, prompt_lookup_num_tokens=args.lookup_tokens, num_assistant_tokens_schedule=args.schedule
        )
        plain_s, lookup_s, stats = [], [], []
        for repeat in range(args.repeats + 1):  # the first: a warm-up
            began = time.perf_counter()
            plain = model.generate(ids, **options)
            plain_took = time.perf_counter() - began
            began = time.perf_counter()
            looked = model.generate(ids, **lookup)
            lookup_took = time.perf_counter() - began
            assert looked.tolist() == plain.tolist(), f"{task}: prompt lookup's greedy tokens differ"
            if repeat:
                plain_s.append(plain_took)
                lookup_s.append(lookup_took)
                stats.append(model.last_speculation)
        new = plain.shape[1] - ids.shape[1]
        plain_rate, lookup_rate = new / statistics.median(plain_s), new / statistics.median(lookup_s)
        drafted = sum(s.drafted for s in stats)
        acceptance = sum(s.accepted for s in stats) / drafted if drafted else 0.0
        rows.append(
            [
                task,
                new,
                f"{plain_rate:.1f}",
                f"{lookup_rate:.1f}",
                f"{lookup_rate / plain_rate:.2f}x",
                f"{acceptance:.0%}",
                f"{statistics.median(s.rounds for s in stats):.0f}",
            ]
        )
        print(rows[-1], repr(tokenizer.decode(plain[0, ids.shape[1] :])[:60]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rtt-ms", type=float, nargs="+", default=[0.0, 50.0])
    parser.add_argument("--lookup-tokens", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=96)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--schedule",
        choices=["constant", "heuristic"],
        default="heuristic",
        help="how K changes (the default adapts)",
    )
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.bundled import smollm2_checkpoint
    from swarmllm.local import LocalSwarm

    torch.set_num_threads(1)
    path = smollm2_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = []
    for rtt in args.rtt_ms:
        proxy = DelayProxy(rtt / 2e3) if rtt else None
        try:
            with LocalSwarm() as swarm:
                swarm.start_bootstrap()
                for span in ((0, 15), (15, 30)):
                    extra = ["--num-threads", "1"]
                    if proxy is not None:
                        port = free_port()
                        proxy.add(port)
                        extra += ["--direct-port", str(port), "--announce-host", PROXY_HOST]
                    swarm.add_server(str(path), span, extra=extra)
                model = AutoDistributedModelForCausalLM.from_pretrained(
                    str(path), initial_peers=swarm.initial_peers
                )
                try:
                    with torch.no_grad():
                        rows += [
                            [f"{rtt:.0f} ms" if rtt else "loopback", *row]
                            for row in rates(model, tokenizer, args)
                        ]
                finally:
                    model.shutdown()
        finally:
            if proxy is not None:
                proxy.close()
    table = markdown_table(
        [
            "link",
            "task",
            "tokens",
            "plain tokens/s",
            f"prompt lookup (K={args.lookup_tokens}) tokens/s",
            "speedup",
            "acceptance",
            "rounds",
        ],
        rows,
    )
    print(table)
    if not args.no_save:
        append_results(
            "Prompt lookup decoding through 2 servers (SmolLM2-135M-Instruct, real weights)",
            table,
            f"K's schedule: {args.schedule}. "
            f"Single session, greedy, batch 1, float32, each server 1 thread; up to {args.new_tokens} new tokens "
            f"(the answer's own end), medians of {args.repeats} paired runs after a warm-up; tokens asserted "
            "equal. The emulated round trip is `speculative.py`'s delay proxy (RTT/2 each way on every link to a "
            "server). `rounds`: trips through the chain per answer (plain decoding takes one a token).",
        )


if __name__ == "__main__":
    main()
