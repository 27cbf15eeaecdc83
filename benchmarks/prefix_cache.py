"""Users who share a long system message, each with a question of their own, through servers with the prefix
cache (the default) and without (`--prefix-cache-tokens 0`): time to the first token and to the whole answer.

One local swarm (bootstrap + 4 servers, SmolLM2-135M-Instruct, 15 blocks each): two servers under the DHT prefix
`cached` and two under `plain`. Every question is a new session (a new user): the first one's prefill computes the
system message everywhere; after it, the `cached` servers copy its positions. The two swarms take turns question by
question; their answers must be equal. Medians over the questions after the first, `--repeats` rounds.

    python benchmarks/prefix_cache.py [--tokens 16] [--repeats 3] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import time
import urllib.request

import torch
from chat_turns import QUESTIONS as CHAT_QUESTIONS
from chat_turns import SYSTEM
from common import append_results, markdown_table
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer
from transformers.generation.streamers import BaseStreamer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.bundled import smollm2_checkpoint
from swarmllm.local import LocalSwarm

QUESTIONS = [*CHAT_QUESTIONS, "Do you sell rye bread?"]


class FirstToken(BaseStreamer):
    """The time of the first generated token (the first `put` carries the prompt)."""

    def __init__(self) -> None:
        self.puts, self.at = 0, None

    def put(self, value) -> None:
        self.puts += 1
        if self.puts == 2:
            self.at = time.perf_counter()

    def end(self) -> None:
        pass


def hit_tokens(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "swarmllm_server_prefix_cache_hit_tokens_total":
                return sample.value
    raise LookupError("no prefix cache counter on the page")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    path = str(smollm2_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(path)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
        for q in QUESTIONS
    ]
    ways = {"cached": [], "plain": ["--prefix-cache-tokens", "0"]}
    times: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
    answers: dict[str, list[list[int]]] = {way: [] for way in ways}
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        infos = swarm.add_servers(
            [
                (path, span, ["--dht-prefix", way, "--metrics-port", "0", *flags])
                for way, flags in ways.items()
                for span in ((0, 15), (15, 30))
            ]
        )
        models = {
            way: AutoDistributedModelForCausalLM.from_pretrained(
                path, initial_peers=swarm.initial_peers, dht_prefix=way
            )
            for way in ways
        }
        try:
            for repeat in range(args.repeats):
                for i, ids in enumerate(prompts):
                    for way, model in models.items():
                        began, streamer = time.perf_counter(), FirstToken()
                        out = model.generate(
                            ids, max_new_tokens=args.tokens, do_sample=False, streamer=streamer
                        )
                        done = time.perf_counter()
                        if i > 0 or repeat > 0:  # the first question is the swarms' first sight of the system
                            times[way].append((streamer.at - began, done - began))
                        answers[way].append(out[0, ids.shape[1] :].tolist())
            hits = [hit_tokens(info["metrics"]) for info in infos[:2]]
        finally:
            for model in models.values():
                model.shutdown()
    assert answers["cached"] == answers["plain"], "the swarms answered differently"

    def median(way: str, field: int) -> float:
        return statistics.median(t[field] for t in times[way])

    shared = len(tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}], tokenize=False))
    rows = [
        [
            f"{min(p.shape[1] for p in prompts)}-{max(p.shape[1] for p in prompts)}",
            f"{median('plain', 0) * 1000:.0f}",
            f"{median('cached', 0) * 1000:.0f}",
            f"{median('plain', 0) / median('cached', 0):.2f}x",
            f"{median('plain', 1):.2f}",
            f"{median('cached', 1):.2f}",
            f"{median('plain', 1) / median('cached', 1):.2f}x",
            " / ".join(f"{h:.0f}" for h in hits),
        ]
    ]
    header = [
        "prompt tokens",
        "first token, no prefix cache (ms)",
        "first token, prefix cache (ms)",
        "faster",
        "whole answer, none (s)",
        "whole answer, cache (s)",
        "faster",
        "positions copied (server 1 / 2)",
    ]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        notes = (
            f"SmolLM2-135M-Instruct through 2 servers on loopback, float32; {len(QUESTIONS)} users sharing a system "
            f"message ({shared} characters with its template), each a question of its own in a new session, greedy "
            f"answers of {args.tokens} tokens; the two swarms alternating; medians of the {len(times['cached'])} "
            "questions after the first (which computes the system message on both); equal answers. 'prefix "
            "cache': servers as by default; 'no prefix cache': `--prefix-cache-tokens 0`. torch threads: "
            f"{torch.get_num_threads()} in the client."
        )
        append_results("Users sharing a system message: the servers' prefix cache", table, notes)


if __name__ == "__main__":
    main()
