"""Embeddings through the swarm's API against local transformers: texts per second for a batch of texts.

One local swarm (bootstrap + 2 servers, SmolLM2-135M-Instruct, 15 blocks each) and `swarmllm api` over it. Each
way embeds the same `--texts` texts (8 to ~120 tokens): OpenAI's `/v1/embeddings` with all of them in one request
(batched through the swarm) and with one request a text, Ollama's `/api/embed` with all of them, and transformers'
`AutoModel` in this process (its last token's `last_hidden_state`, normalised), in batches of the same sizes and
one text at a time. The ways are timed in alternation, medians of `--repeats`; every way's vectors must be within
1e-4 of transformers' one at a time.

    python benchmarks/embeddings.py [--texts 64] [--repeats 5] [--no-record]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from types import SimpleNamespace

import ollama
import openai
import torch
from common import append_results, markdown_table, smollm2_api
from transformers import AutoModel, AutoTokenizer

from swarmllm.api.embeddings import embed, unit

WORDS = "swarm model volunteer server block client token machine network cache layer answer share run".split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randrange(8, 120))) for _ in range(args.texts)]

    with smollm2_api() as (_swarm, path, base):
        tokenizer = AutoTokenizer.from_pretrained(path)
        ids = [tokenizer(text)["input_ids"] for text in texts]
        tokens = sum(map(len, ids))
        local = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)
        host = ollama.Client(host=base.removesuffix("/v1"), timeout=600)

        @torch.no_grad()
        def local_alone() -> torch.Tensor:
            rows = [local(torch.tensor([one])).last_hidden_state[0, -1] for one in ids]
            return torch.nn.functional.normalize(torch.stack(rows), dim=-1)

        # the API's own batching and pooling (api/embeddings.py), over transformers in this process
        in_process = SimpleNamespace(
            config=local.config,
            hidden_states=lambda input_ids, mask: (
                local(input_ids=input_ids, attention_mask=mask).last_hidden_state
            ),
        )

        def local_batched() -> torch.Tensor:
            return unit(embed(in_process, ids, pad_id=0))

        def api_batched() -> torch.Tensor:
            reply = client.embeddings.create(model="smollm2", input=texts)
            return torch.tensor([d.embedding for d in reply.data])

        def api_alone() -> torch.Tensor:
            return torch.tensor(
                [client.embeddings.create(model="smollm2", input=t).data[0].embedding for t in texts]
            )

        def ollama_batched() -> torch.Tensor:
            return torch.tensor(host.embed(model="smollm2", input=texts).embeddings)

        ways = {
            "transformers, one text at a time": local_alone,
            "transformers, batched": local_batched,
            "API /v1/embeddings, all texts in one request": api_batched,
            "API /v1/embeddings, one request a text": api_alone,
            "Ollama /api/embed, all texts in one request": ollama_batched,
        }
        for way in ways.values():  # warm: routing, connections, the API's first request
            way()
        seconds: dict[str, list[float]] = {name: [] for name in ways}
        vectors: dict[str, torch.Tensor] = {}
        for _ in range(args.repeats):
            for name, way in ways.items():
                began = time.perf_counter()
                vectors[name] = way()
                seconds[name].append(time.perf_counter() - began)

    reference = vectors["transformers, one text at a time"]
    base_s = statistics.median(seconds["transformers, batched"])
    rows = []
    for name in ways:
        spent = statistics.median(seconds[name])
        error = float((vectors[name] - reference).abs().max())
        assert error < 1e-4, (name, error)
        rows.append(
            [
                name,
                f"{len(texts) / spent:.1f}",
                f"{tokens / spent:.0f}",
                f"{error:.1e}",
                f"{base_s / spent:.2f}",
            ]
        )
    table = markdown_table(
        ["way", "texts/s", "tokens/s", "max error vs transformers alone", "speed vs transformers batched"],
        rows,
    )
    print(table)
    if not args.no_record:
        append_results(
            "Embeddings through the API against local transformers",
            table,
            f"SmolLM2-135M-Instruct on 2 local servers (15 blocks each, default flags); {len(texts)} texts of "
            f"{min(map(len, ids))}-{max(map(len, ids))} tokens ({tokens} in all), medians of {args.repeats} "
            "alternating runs. Batches: sorted by length, at most 16 texts and 4,096 padded tokens each. "
            "transformers runs in the benchmark's process with both cores while the swarm idles.",
        )


if __name__ == "__main__":
    main()
