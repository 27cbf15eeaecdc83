"""A burst of users sharing one beginning: N requests at the same moment whose prompts begin with the same
`--shared` tokens (a system message no request sent before), each with a few tokens of its own, through servers of
another commit (A) and of the working tree (B). Two local swarms of 2 SmolLM2 servers (A's run from the commit's
tree), each with a `swarmllm api` of the working tree that keeps no sessions; bursts alternate between them. Each
burst reports the time from its start to each request's answer of one token (its first token).

With `--long N`, the first user of each burst sends N tokens of its own after the shared ones (a document), `--lead`
s before the others: their first tokens then measure how long a session waits for the blocks it shares with one
computing them (the servers keep a long prefill's blocks chunk by chunk, `--prefill-chunk-tokens`); the table is
of the others' first tokens, and the long one's beside them.

    python benchmarks/prefix_burst.py --a-commit HEAD [--users 4] [--shared 288] [--long 0] [--rounds 6]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, commit_src, markdown_table  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a-commit", required=True, help="A's servers run this commit; B's the working tree")
    parser.add_argument("--model", default=str(Path.home() / ".cache/swarmllm/smollm2-135m-instruct"))
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--shared", type=int, default=288, help="tokens every prompt of a burst begins with")
    parser.add_argument("--own", type=int, default=12, help="tokens of each prompt after the shared ones")
    parser.add_argument("--long", type=int, default=0, help="tokens of the first user's own (0: --own)")
    parser.add_argument("--lead", type=float, default=0.2, help="seconds the long user's request goes first")
    parser.add_argument("--rounds", type=int, default=6, help="bursts through each swarm")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()

    import openai

    from swarmllm.local import LocalSwarm

    rng = random.Random(0)
    times: tuple[list[list[float]], list[list[float]]] = ([], [])
    longs: tuple[list[float], list[float]] = ([], [])
    with tempfile.TemporaryDirectory() as tmp, LocalSwarm(fork=False) as a, LocalSwarm(fork=False) as b:
        old = commit_src(args.a_commit, tmp)
        apis = []
        for swarm, src in ((a, old), (b, None)):
            if src is not None:  # (the servers alone run the older tree)
                os.environ["PYTHONPATH"] = str(src)
            swarm.start_bootstrap()
            swarm.add_servers([(args.model, (0, 15)), (args.model, (15, 30))])
            os.environ.pop("PYTHONPATH", None)
            apis.append(swarm.start_api(args.model, extra=["--name", "m", "--keep-sessions", "0"]))
        clients = [openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=300) for url in apis]

        def ask(side: int, prompt: list[int], began: float) -> float:
            clients[side].completions.create(model="m", prompt=prompt, max_tokens=1, temperature=0)
            return time.perf_counter() - began

        with ThreadPoolExecutor(args.users) as pool:
            for round_ in range(args.rounds + 1):  # (the first round of each warms it, not counted)
                for side in (0, 1) if round_ % 2 == 0 else (1, 0):
                    shared = [rng.randrange(100, 40000) for _ in range(args.shared)]
                    prompts = [
                        shared + [rng.randrange(100, 40000) for _ in range(args.own)]
                        for _ in range(args.users)
                    ]
                    began = time.perf_counter()
                    if args.long:  # (a user who came a moment before, with a document)
                        prompts[0] = shared + [rng.randrange(100, 40000) for _ in range(args.long)]
                        first = pool.submit(ask, side, prompts.pop(0), began)
                        time.sleep(args.lead)  # (the workload: the others come this much later)
                    firsts = sorted(pool.map(lambda p, s=side, t=began: ask(s, p, t), prompts))
                    if round_:
                        times[side].append(firsts)
                        if args.long:
                            longs[side].append(first.result())
    rows = []
    for name, tree, bursts, long in (
        ("A", args.a_commit, times[0], longs[0]),
        ("B", "working tree", times[1], longs[1]),
    ):
        medians, lasts = [statistics.median(t) for t in bursts], [t[-1] for t in bursts]
        row = [f"{name}: {tree}", f"{statistics.median(medians):.3f}", f"{statistics.median(lasts):.3f}"]
        rows.append(row + ([f"{statistics.median(long):.3f}"] if args.long else []))
    ratios = [x[-1] / y[-1] for x, y in zip(*times, strict=True)]
    rows.append(
        ["A / B (median of the bursts' ratios, last first token)", "", f"{statistics.median(ratios):.2f}x"]
        + ([""] if args.long else [])
    )
    others = "the others' " if args.long else ""
    head = ["servers' tree", f"median of {others}first tokens s", f"last of {others}first tokens s"]
    table = markdown_table(head + (["the long one's first token s"] if args.long else []), rows)
    print(table)
    if not args.no_record:
        append_results(
            f"A burst of {args.users} users sharing a {args.shared}-token beginning: A/B",
            table,
            f"{Path(args.model).name}, 2 servers on loopback per swarm, each with `swarmllm api --keep-sessions 0` "
            f"(the working tree); {args.users} completions at once, each of the shared tokens and {args.own} of "
            f"its own (random ids, a new beginning each burst), 1 token each"
            + (
                f", the first with {args.long} of its own instead, sent {args.lead} s before the others"
                if args.long
                else ""
            )
            + f"; {args.rounds} bursts per swarm after one to warm it, alternating; medians over bursts.",
        )


if __name__ == "__main__":
    main()
