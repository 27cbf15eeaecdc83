"""`swarmllm demo`: a whole swarm on this machine, a bootstrap peer and servers as real processes on 127.0.0.1,
serving a small bundled model; a client generates through it and checks the tokens against `transformers`
running the same checkpoint locally.

The model is a tiny Llama built from a fixed seed and trained for a few seconds on simple sentences made from
its word-level vocabulary (nothing is downloaded), so that what it writes through the swarm reads like text.
"""

from __future__ import annotations

import time
from pathlib import Path

DEMO_PROMPT = "the cat"
SUBJECTS = ["the cat", "the dog", "a dog", "the sun", "the moon", "the tree", "i", "you", "we", "they"]
VERBS = ["see", "meet", "hold", "help", "find", "hear", "want", "bring", "keep", "show"]
OBJECTS = ["the sea", "the tree", "the moon", "the sun", "a cat", "the dog", "them", "us", "her", "him"]
TEMPLATES = [
    "{s} {v} {o} .",
    "{s} can {v} {o} .",
    "{s} will {v} {o} with {o2} .",
    "when {s} {v} {o} , {s2} {v2} {o2} .",
    "{s} and {s2} {v} {o} .",
    "do {s} {v} {o} ? yes , {s} do .",
]


def demo_checkpoint(root: Path | None = None) -> Path:
    """The bundled demo model, built and trained once into the user's cache."""
    from swarmllm.models.tiny import make_tiny_checkpoint

    path = (root or Path.home() / ".cache" / "swarmllm") / "demo-tiny-llama-v2"
    if not (path / "config.json").exists():
        print("building the demo model (once): a tiny Llama trained for a few seconds on simple sentences")
        make_tiny_checkpoint(path, "llama", num_layers=6, seed=2026)
        _train(path)
    return path


def _train(path: Path, steps: int = 300, batch: int = 32, length: int = 32, seed: int = 2026) -> None:
    import random

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rng = random.Random(seed)
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)

    def sentence() -> str:
        pick = {
            k: rng.choice(v)
            for k, v in (
                ("s", SUBJECTS),
                ("s2", SUBJECTS),
                ("v", VERBS),
                ("v2", VERBS),
                ("o", OBJECTS),
                ("o2", OBJECTS),
            )
        }
        return rng.choice(TEMPLATES).format(**pick)

    model.train()
    for step in range(steps):
        rows = []
        for _ in range(batch):
            ids: list[int] = []
            while len(ids) < length:
                ids += tokenizer(sentence())["input_ids"]
            rows.append(ids[:length])
        ids = torch.tensor(rows)
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  training step {step + 1}/{steps}: loss {loss.item():.2f}")
    model.eval().save_pretrained(path)


def run_demo(num_servers: int = 2, max_new_tokens: int = 24) -> int:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.local import LocalSwarm

    path = demo_checkpoint()
    num_blocks = 6
    cuts = [round(i * num_blocks / num_servers) for i in range(num_servers + 1)]
    print(f"model: {path} ({num_blocks} blocks)")
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        print("bootstrap peer:", " ".join(swarm.initial_peers))
        for start, end in zip(cuts, cuts[1:]):
            info = swarm.add_server(str(path), (start, end))
            print(
                f"server {info['peer_id'][-8:]} holds blocks [{start}, {end}), direct path {info['direct']}"
            )

        tokenizer = AutoTokenizer.from_pretrained(path)
        inputs = tokenizer(DEMO_PROMPT, return_tensors="pt")
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        try:
            model.generate(**inputs, max_new_tokens=2, do_sample=False)  # warm-up: routing, connections
            began = time.perf_counter()
            swarm_out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            swarm_s = time.perf_counter() - began
            began = time.perf_counter()
            local_out = local.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
            local_s = time.perf_counter() - began
        finally:
            model.shutdown()
    same = torch.equal(swarm_out, local_out)
    print(f"prompt:       {DEMO_PROMPT!r}")
    print(f"swarm output: {tokenizer.decode(swarm_out[0], skip_special_tokens=True)!r}")
    print(f"local output: {tokenizer.decode(local_out[0], skip_special_tokens=True)!r}")
    print(f"tokens identical to local transformers: {same}")
    print(
        f"speed: swarm {max_new_tokens / swarm_s:.1f} tokens/s, local {max_new_tokens / local_s:.1f} tokens/s"
    )
    return 0 if same else 1
