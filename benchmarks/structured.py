"""What holding an answer to JSON, a JSON schema or a tool call costs per token, through the API.

One local swarm (bootstrap + 2 servers, SmolLM2-135M-Instruct, 15 blocks each) and `swarmllm api`; the `openai`
client asks the same chat question greedily as free text, in JSON mode, held to a 5-field schema, held to a
schema of constrained fields (string lengths, a date, number bounds, a pattern), and as a required tool call.
Each way's first request walks the vocabulary's trie for the states it meets (cold); the repeats find those
masks cached (warm). The ways are timed in alternation, medians of `--repeats`, each as
ms per generated token and as a ratio to free text (answers differ in length, so per token is the measure).

    python benchmarks/structured.py [--tokens 64] [--repeats 5] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import time

import openai
from common import append_results, markdown_table, smollm2_api

QUESTION = "Describe a pet as JSON: its name, kind, age, friends and owner."
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer"},
        "friends": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
        "owner": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["name", "kind", "age", "friends", "owner"],
    "additionalProperties": False,
}
HELD = {  # what a pydantic model with constrained fields sends: lengths, a date, bounds, a pattern
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "born": {"type": "string", "format": "date"},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "weight": {"type": "number", "exclusiveMinimum": 0, "maximum": 100},
        "tag": {"type": "string", "pattern": "^[A-Z]{3}-\\d{3}$"},
        "notes": {"type": "string", "maxLength": 200},
    },
    "required": ["name", "born", "age", "weight", "tag", "notes"],
    "additionalProperties": False,
}
TOOL = {
    "type": "function",
    "function": {
        "name": "register_pet",
        "description": "Registers a pet",
        "parameters": SCHEMA,
    },
}
WAYS = {
    "free text": {},
    "JSON mode": {"response_format": {"type": "json_object"}},
    "JSON schema (5 fields)": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA}}
    },
    "JSON schema (lengths, date, bounds, pattern)": {
        "response_format": {"type": "json_schema", "json_schema": {"name": "pet", "schema": HELD}}
    },
    "required tool call": {"tools": [TOOL], "tool_choice": "required", "parallel_tool_calls": False},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    with smollm2_api() as (_, _, base):
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=600)

        def ask(extra: dict) -> tuple[float, int, str | None, int]:
            start = time.perf_counter()
            reply = client.chat.completions.create(
                model="smollm2",
                messages=[{"role": "user", "content": QUESTION}],
                max_tokens=args.tokens,
                temperature=0,
                **extra,
            )
            elapsed = time.perf_counter() - start
            usage = reply.usage
            return elapsed, usage.completion_tokens, reply.choices[0].finish_reason, usage.prompt_tokens

        ask({})  # the swarm's and the API's own warm-up
        cold = {name: ask(extra) for name, extra in WAYS.items()}
        warm: dict[str, list[float]] = {name: [] for name in WAYS}
        finishes: dict[str, set[str]] = {name: set() for name in WAYS}
        for _ in range(args.repeats):
            for name, extra in WAYS.items():
                elapsed, tokens, finish, _ = ask(extra)
                warm[name].append(elapsed / tokens * 1000)
                finishes[name].add(finish)
                assert tokens == cold[name][1]  # greedy: the same answer every time

    free = statistics.median(warm["free text"])
    rows = [
        [
            name,
            str(cold[name][3]),
            str(cold[name][1]),
            f"{cold[name][0] / cold[name][1] * 1000:.1f}",
            f"{statistics.median(warm[name]):.1f}",
            f"{statistics.median(warm[name]) / free:.2f}",
            "/".join(sorted(finishes[name])),
        ]
        for name in WAYS
    ]
    table = markdown_table(
        [
            "way",
            "prompt tokens",
            "tokens",
            "first request ms/token",
            "repeats ms/token (median)",
            "ratio to free text",
            "finish",
        ],
        rows,
    )
    print(table)
    note = (
        f"SmolLM2-135M-Instruct on 2 local servers (15 blocks each, default flags), greedy chat, at most "
        f"{args.tokens} tokens, medians of {args.repeats} alternating repeats after one first request of each "
        "way (which walks the vocabulary's trie for the states it meets; the repeats find their masks cached). Per "
        "token includes each request's prefill: a tool call's prompt carries the instruction and the tool's schema."
    )
    print(note)
    if not args.no_record:
        append_results(
            "Constrained answers through the API: JSON mode, a JSON schema, a tool call", table, note
        )


if __name__ == "__main__":
    main()
