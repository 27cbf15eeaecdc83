"""An OpenAI completions request of `n` choices through `swarmllm api`, paired: an API of another commit (A) and
one of the working tree (B) on one local swarm, requests alternating between them, each a prompt of random
tokens no request sent before (so what the servers' prefix caches hold from earlier requests never serves it).
Each choice is a session of its own; since the working tree's change, the others open theirs at the first
choice's first token and copy its prompt's whole blocks from the servers' prefix caches. Medians of the rounds
after the first (the first of each API warms it).

    python benchmarks/api_choices.py --a-commit HEAD [--n 4] [--prompt-tokens 300] [--max-tokens 16]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, commit_src, markdown_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a-commit", required=True, help="A's API runs this commit; B's the working tree")
    parser.add_argument("--model", default=str(Path.home() / ".cache/swarmllm/smollm2-135m-instruct"))
    parser.add_argument("--n", type=int, default=4, help="choices of each request")
    parser.add_argument("--prompt-tokens", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=7, help="requests to each API")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import openai

    from swarmllm.local import LocalSwarm

    times: tuple[list[float], list[float]] = ([], [])
    rng = random.Random(0)
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(fork=False) as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(args.model, (0, 15)), (args.model, (15, 30))])
        apis = []
        for src in (commit_src(args.a_commit, tmp), None):  # (None: the working tree, as installed)
            if src is not None:
                os.environ["PYTHONPATH"] = str(src)
            apis.append(swarm.start_api(args.model, extra=["--name", "m", "--keep-sessions", "0"]))
            os.environ.pop("PYTHONPATH", None)
        for round_ in range(args.rounds):
            for side in (0, 1) if round_ % 2 == 0 else (1, 0):
                client = openai.OpenAI(base_url=apis[side], api_key="unused", max_retries=0, timeout=300)
                prompt = [rng.randrange(100, 40000) for _ in range(args.prompt_tokens)]
                began = time.perf_counter()
                reply = client.completions.create(
                    model="m", prompt=prompt, max_tokens=args.max_tokens, temperature=1.0, n=args.n,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                times[side].append(time.perf_counter() - began)
                assert len(reply.choices) == args.n
                assert all(c.finish_reason == "length" for c in reply.choices)
    a, b = (statistics.median(t[1:]) for t in times)
    table = markdown_table(
        ["n", "prompt tokens", "new tokens", "A", "B", "A s/request", "B s/request", "A/B", "B faster in"],
        [
            [
                args.n,
                args.prompt_tokens,
                args.max_tokens,
                args.a_commit,
                "working tree",
                f"{a:.3f}",
                f"{b:.3f}",
                f"{a / b:.2f}",
                f"{sum(y < x for x, y in zip(*times, strict=True))}/{args.rounds}",
            ]
        ],
    )
    print(table)
    if not args.no_record:
        append_results(
            "A request's n choices through swarmllm api, paired against another commit",
            table,
            f"{Path(args.model).name} through 2 servers on loopback; two APIs on one swarm (`--keep-sessions 0`), "
            f"{args.rounds} requests each, alternating; sampled (temperature 1), `ignore_eos`; medians of the "
            "rounds after the first.",
        )


if __name__ == "__main__":
    main()
