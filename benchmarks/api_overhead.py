"""What the OpenAI-compatible API (and Ollama's beside it) costs per token over calling `generate()` directly.

One local swarm (bootstrap + 2 servers, SmolLM2-135M-Instruct, 15 blocks each) serves both: this process's own
client calls `model.generate()` (greedy, the prompt's tokens, `max_tokens` new ones), and the `openai` client asks
`swarmllm api` (its own process and client) for the same completion, whole and streamed, as does the `ollama`
client of its `/api/generate` (raw). The ways are timed in alternation (the shared machine's noise hits all
alike), medians of `--repeats`; the texts must be equal. One run, reported as seconds per token and as a ratio
to `generate()`.

    python benchmarks/api_overhead.py [--tokens 64] [--repeats 5] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import time

import ollama
import openai
import torch
from common import append_results, markdown_table, smollm2_api
from transformers import AutoTokenizer

from swarmllm import AutoDistributedModelForCausalLM

PROMPT = "Once upon a time, in a small village by the sea, there lived"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    with smollm2_api() as (swarm, path, base):
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        options = {"model": "smollm2", "prompt": PROMPT, "max_tokens": args.tokens, "temperature": 0}

        def direct() -> tuple[str, int]:
            out = model.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.tokens, do_sample=False
            )
            new = out[0, ids.shape[1] :]
            return tokenizer.decode(new, skip_special_tokens=True), len(new)

        def whole() -> tuple[str, int]:
            reply = client.completions.create(**options)
            return reply.choices[0].text, reply.usage.completion_tokens

        def streamed() -> tuple[str, int]:
            chunks = list(
                client.completions.create(**options, stream=True, stream_options={"include_usage": True})
            )
            return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

        host = ollama.Client(host=base.removesuffix("/v1"), timeout=600)
        greedy = {"temperature": 0, "num_predict": args.tokens}

        def ollama_whole() -> tuple[str, int]:
            reply = host.generate(model="smollm2", prompt=PROMPT, raw=True, options=greedy)
            return reply.response, reply.eval_count

        def ollama_streamed() -> tuple[str, int]:
            parts = list(host.generate(model="smollm2", prompt=PROMPT, raw=True, options=greedy, stream=True))
            return "".join(p.response for p in parts), parts[-1].eval_count

        ways = {
            "generate() in this process": direct,
            "API, whole": whole,
            "API, streamed (SSE)": streamed,
            "Ollama's API, whole": ollama_whole,
            "Ollama's API, streamed (NDJSON)": ollama_streamed,
        }
        try:
            for way in ways.values():  # warm: routing, connections, the API's first request
                way()
            seconds: dict[str, list[float]] = {name: [] for name in ways}
            answers: dict[str, tuple[str, int]] = {}
            for _ in range(args.repeats):
                for name, way in ways.items():
                    began = time.perf_counter()
                    answers[name] = way()
                    seconds[name].append(time.perf_counter() - began)
        finally:
            model.shutdown()

    texts = {text for text, _ in answers.values()}
    counts = {count for _, count in answers.values()}
    assert len(texts) == 1 and len(counts) == 1, answers
    (tokens,) = counts
    base_s = statistics.median(seconds["generate() in this process"]) / tokens
    rows = []
    for name in ways:
        per_token = statistics.median(seconds[name]) / tokens
        rows.append(
            [
                name,
                f"{per_token * 1e3:.2f}",
                f"{(per_token - base_s) * 1e3:+.2f}",
                f"{per_token / base_s:.2f}",
            ]
        )
    table = markdown_table(["way", "ms/token", "overhead ms/token", "ratio to generate()"], rows)
    print(table)
    if not args.no_record:
        append_results(
            "OpenAI-compatible API overhead (issue 19)",
            table,
            f"SmolLM2-135M-Instruct on 2 local servers (15 blocks each, default flags), greedy, {tokens} new tokens "
            f"after a {ids.shape[1]}-token prompt, medians of {args.repeats} alternating runs; texts identical. "
            "The API's time includes its HTTP round trip, JSON or SSE framing and incremental detokenization; its "
            "generate runs in a worker thread of the API process, with its own client.",
        )


if __name__ == "__main__":
    main()
