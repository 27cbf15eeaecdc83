"""A conversation's later turns through `swarmllm api`, with the sessions kept between requests (the default) and
without (`--keep-sessions 0`): time to the first token and to the whole answer, per turn.

One local swarm (bootstrap + 2 servers, SmolLM2-135M-Instruct, 15 blocks each) and two API processes over it,
one of each kind. A conversation: a long system message, then `--turns` user messages, each sent with the whole
history (as chat clients do), greedy answers of `--tokens` tokens, streamed. The two APIs take turns
conversation by conversation; medians over `--repeats` conversations each. Their answers must be equal.

    python benchmarks/chat_turns.py [--turns 4] [--tokens 32] [--repeats 3] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import time

import openai
from common import append_results, markdown_table

from swarmllm.bundled import smollm2_checkpoint
from swarmllm.local import LocalSwarm

SYSTEM = (
    "You are a helpful assistant for a small bakery. The bakery opens at seven in the morning and closes at six "
    "in the evening, every day but Monday. It sells bread (sourdough, rye, baguettes), pastries (croissants, "
    "pain au chocolat, cinnamon rolls) and cakes made to order with three days' notice. Delivery is free within "
    "five kilometres for orders above twenty euros. Answer briefly and politely, and never invent products. "
) * 3
QUESTIONS = [
    "When are you open?",
    "Do you deliver?",
    "What pastries do you have?",
    "Can I order a cake for tomorrow?",
    "Which breads do you sell?",
    "Are you open on Monday?",
]


def conversation(client: openai.OpenAI, turns: int, tokens: int) -> list[tuple[float, float, str, int]]:
    """Per turn: seconds to the first token, to the whole answer, the answer, and the prompt's cached tokens."""
    messages = [{"role": "system", "content": SYSTEM}]
    out = []
    for question in QUESTIONS[:turns]:
        messages.append({"role": "user", "content": question})
        began, first = time.perf_counter(), None
        pieces, cached = [], 0
        stream = client.chat.completions.create(
            model="smollm2",
            messages=messages,
            max_tokens=tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                cached = chunk.usage.prompt_tokens_details.cached_tokens
        answer = "".join(pieces)
        out.append((first - began, time.perf_counter() - began, answer, cached))
        messages.append({"role": "assistant", "content": answer})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    path = str(smollm2_checkpoint())
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(path, (0, 15)), (path, (15, 30))])
        fresh_url = swarm.start_api(path, extra=["--name", "smollm2", "--keep-sessions", "0"])
        fresh_api = swarm.api
        kept_url = swarm.start_api(path, extra=["--name", "smollm2"])
        try:
            clients = {
                way: openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
                for way, url in (("kept", kept_url), ("fresh", fresh_url))
            }
            conversation(clients["fresh"], 1, 4)  # warm-up: connections, the first session
            runs: dict[str, list] = {"kept": [], "fresh": []}
            for _ in range(args.repeats):
                for way, client in clients.items():
                    runs[way].append(conversation(client, args.turns, args.tokens))
        finally:
            fresh_api.stop()
    answers = {way: [[t[2] for t in run] for run in result] for way, result in runs.items()}
    assert answers["kept"] == answers["fresh"], "the two APIs answered differently"
    rows = []
    for turn in range(args.turns):

        def median(way: str, field: int, turn: int = turn) -> float:
            return statistics.median(run[turn][field] for run in runs[way])

        rows.append(
            [
                turn + 1,
                f"{median('fresh', 3):.0f} / {median('kept', 3):.0f}",
                f"{median('fresh', 0) * 1000:.0f}",
                f"{median('kept', 0) * 1000:.0f}",
                f"{median('fresh', 0) / median('kept', 0):.2f}x",
                f"{median('fresh', 1):.2f}",
                f"{median('kept', 1):.2f}",
            ]
        )
    header = [
        "turn",
        "cached prompt tokens (fresh / kept)",
        "first token, fresh (ms)",
        "first token, kept (ms)",
        "kept faster",
        "whole answer, fresh (s)",
        "whole answer, kept (s)",
    ]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        notes = (
            f"SmolLM2-135M-Instruct through 2 servers on loopback; a {len(SYSTEM)}-character system message, "
            f"{args.turns} user turns each sent with the whole history, greedy answers of up to {args.tokens} "
            f"tokens, streamed; medians of {args.repeats} conversations per API, the APIs alternating; equal "
            "answers. 'kept': `swarmllm api` as by default (4 kept sessions); 'fresh': `--keep-sessions 0`. The "
            "servers keep their prefix cache (the default): 'fresh' sessions copy what earlier ones computed."
        )
        append_results(
            "A conversation's turns through the API: kept sessions against fresh ones", table, notes
        )


if __name__ == "__main__":
    main()
