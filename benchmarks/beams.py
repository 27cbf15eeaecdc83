"""Beam search through a local swarm of 2 servers: `generate(num_beams=N)` with the servers moving their cache rows
(`Step.reorder`), against the same client without it (when the beams kept do not continue their own rows, it
rewinds every row to the beams' common prefix and sends the rest again: what a client must do when servers cannot
reorder), against local transformers' beam search, and beside a greedy generate of one sequence through the same
swarm. The outputs must equal transformers'. Each way is timed in turn, round after round; medians.

    python benchmarks/beams.py [--models tiny medium] [--beams 4] [--new-tokens 32] [--repeats 3] [--no-record]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, checkpoint, markdown_table  # noqa: E402

PROMPT_TOKENS = 32


def _common_prefix(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, reusable):
    """`RemoteSession.reusable_prefix` without the reorder: the positions every row still shares."""
    start, rows = reusable(self, input_ids, attention_mask)
    if rows is None:
        return start, None
    same = (self.input_ids[:, :start] == input_ids[:, :start]).all(dim=0)
    mismatch = (~same).nonzero()
    return (int(mismatch[0]) if len(mismatch) else start), None


def run(name: str, beams: int, new_tokens: int, repeats: int) -> list[object]:
    from transformers import AutoModelForCausalLM

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.client import model as model_module
    from swarmllm.client import session as session_module
    from swarmllm.local import LocalSwarm

    path = checkpoint(name)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    blocks = local.config.num_hidden_layers
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, local.config.vocab_size, (1, PROMPT_TOKENS), generator=generator)
    options = dict(max_new_tokens=new_tokens, do_sample=False)
    sent = {"reorder": 0, "rewind": 0}  # positions x rows sent through the swarm, per way
    way = ["reorder"]
    original_step = session_module.InferenceSession.step
    reusable = model_module.RemoteSession.reusable_prefix

    async def counted_step(self, hidden, *args, **kwargs):
        sent[way[0]] += hidden.shape[0] * hidden.shape[1]
        return await original_step(self, hidden, *args, **kwargs)

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(path), (0, blocks // 2)), (str(path), (blocks // 2, blocks))])
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)

        def swarm_beams(reorder: bool) -> torch.Tensor:
            way[0] = "reorder" if reorder else "rewind"
            if not reorder:
                model_module.RemoteSession.reusable_prefix = lambda s, i, m: _common_prefix(s, i, m, reusable)
            try:
                return remote.generate(prompt, num_beams=beams, **options)
            finally:
                model_module.RemoteSession.reusable_prefix = reusable

        ways = {
            "reorder": lambda: swarm_beams(True),
            "rewind": lambda: swarm_beams(False),
            "local": lambda: local.generate(prompt, num_beams=beams, **options),
            "greedy": lambda: remote.generate(prompt, **options),
        }
        times: dict[str, list[float]] = {key: [] for key in ways}
        try:
            with torch.no_grad():
                want = ways["local"]().tolist()
                session_module.InferenceSession.step = counted_step
                equal = ways["reorder"]().tolist() == want and ways["rewind"]().tolist() == want
                session_module.InferenceSession.step = original_step
                for _ in range(repeats):
                    for key, fn in ways.items():
                        began = time.perf_counter()
                        fn()
                        times[key].append(time.perf_counter() - began)
        finally:
            session_module.InferenceSession.step = original_step
            remote.shutdown()
    median = {key: statistics.median(values) for key, values in times.items()}
    ratio = statistics.median(r / o for r, o in zip(times["rewind"], times["reorder"], strict=True))
    return [
        name,
        beams,
        new_tokens,
        f"{new_tokens / median['reorder']:.1f}",
        f"{new_tokens / median['rewind']:.1f}",
        f"{ratio:.2f}x",
        f"{new_tokens / median['local']:.1f}",
        f"{median['local'] / median['reorder']:.2f}x",
        f"{new_tokens / median['greedy']:.1f}",
        f"{sent['reorder']:,} / {sent['rewind']:,}",
        equal,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=["tiny", "medium"])
    parser.add_argument("--beams", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    header = [
        "model",
        "beams",
        "new tokens",
        "swarm, rows moved: steps/s",
        "swarm, rewinding: steps/s",
        "moved vs rewinding (pairs)",
        "local transformers: steps/s",
        "swarm / local (speed)",
        "swarm greedy, 1 sequence: steps/s",
        "positions x rows sent: moved / rewinding",
        "outputs equal transformers'",
    ]
    rows = [run(name, args.beams, args.new_tokens, args.repeats) for name in args.models]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        notes = (
            f"2 servers (1 thread each), a {PROMPT_TOKENS}-token prompt, greedy beam search; steps/s = new tokens "
            "per second of one generate (each step computes one token for every beam). 'Rewinding': the same "
            "client told not to reorder, so a step whose beams do not continue their own rows rewinds all rows "
            "to the beams' common prefix. Local transformers uses both cores. Each way timed in turn, round after "
            f"round, {args.repeats} rounds, medians."
        )
        append_results(
            "Beam search through 2 servers: rows moved on the servers, against rewinding", table, notes
        )


if __name__ == "__main__":
    main()
