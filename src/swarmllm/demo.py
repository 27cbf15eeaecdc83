"""`swarmllm demo`: a whole swarm on this machine, a bootstrap peer and servers as real processes on 127.0.0.1,
serving a small bundled model; a client generates through it and checks the tokens against `transformers`
running the same checkpoint locally.

The model is a tiny Llama built from a fixed seed and trained for a few seconds on simple sentences made from
its word-level vocabulary (nothing is downloaded), so that what it writes through the swarm reads like text.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from transformers.generation.streamers import BaseStreamer

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


def demo_checkpoint(path: Path | None = None) -> Path:
    """The bundled demo model, built and trained once into `path` (default: the user's cache).

    Built beside `path` and renamed into place when trained, under a lock: a demo, an example or a test starting
    meanwhile waits for it, instead of finding the folder and serving weights not yet trained."""
    from swarmllm.models.built import built_once
    from swarmllm.models.tiny import make_tiny_checkpoint

    def build(building: Path) -> None:
        print(  # progress on stderr: `swarmllm fetch` prints the folder alone on stdout
            "building the demo model (once): a tiny Llama trained for a few seconds on simple sentences",
            file=sys.stderr,
        )
        make_tiny_checkpoint(building, "llama", num_layers=6, seed=2026)
        _train(building)

    return built_once(path or Path.home() / ".cache" / "swarmllm" / "demo-tiny-llama-v2", build)


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
            print(f"  training step {step + 1}/{steps}: loss {loss.item():.2f}", file=sys.stderr)
    model.eval().save_pretrained(path)


CHAT_PROMPT = "What is the capital of France?"
KILL_AT_TOKEN = 3  # early: a chat answer may end (EOS) after a few tokens


class _AtToken(BaseStreamer):
    """Calls `action()` right after the `at`-th new token, inside generate."""

    def __init__(self, at: int, action):
        self.at, self.action, self.tokens = at, action, -1

    def put(self, value) -> None:
        self.tokens += 1  # the first call carries the prompt
        if self.tokens == self.at:
            self.action()

    def end(self) -> None:
        pass


def run_demo(
    num_servers: int = 2, max_new_tokens: int = 24, model: str = "tiny", monitor_port: int = 0
) -> int:
    """Act 1: generate through a local swarm and compare with `transformers`. Act 2: a spare server joins, and
    the demo kills the server of the route's first hop in the middle of a generation, which goes on with the
    same tokens. The swarm's monitor page runs meanwhile (its URL is printed)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.bundled import bundled_model
    from swarmllm.local import LocalSwarm
    from swarmllm.server.host import host_cores, threads_per_server

    path = bundled_model(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    num_blocks = local.config.num_hidden_layers
    if num_servers > num_blocks:  # each server holds a span of one block at least
        print(
            f"swarmllm demo: the {model} model has {num_blocks} blocks: give --servers {num_blocks} or fewer",
            file=sys.stderr,
        )
        return 1
    if model == "tiny":
        prompt = DEMO_PROMPT
        inputs = tokenizer(prompt, return_tensors="pt")
    else:
        prompt = CHAT_PROMPT
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    prompt_length = inputs["input_ids"].shape[1]

    def answer(ids: torch.Tensor) -> str:
        new = ids[0] if model == "tiny" else ids[0, prompt_length:]
        return tokenizer.decode(new, skip_special_tokens=True)

    cuts = [round(i * num_blocks / num_servers) for i in range(num_servers + 1)]
    local_threads = threads_per_server(host_cores(), num_servers)
    print(f"model: {path} ({num_blocks} blocks)")
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        print("bootstrap peer:", " ".join(swarm.initial_peers))
        infos = swarm.add_servers([(str(path), (start, end)) for start, end in zip(cuts, cuts[1:])])
        for info in infos:
            print(
                f"server {info['peer_id'][-8:]} holds blocks [{info['start']}, {info['end']}), "
                f"direct path {info['direct']}"
            )
        url = swarm.start_monitor(port=monitor_port, extra=["--refresh", "1"])
        print(f"monitor: {url} (open it now: it follows the swarm while the demo runs)")

        distributed = AutoDistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers
        )
        greedy = {"max_new_tokens": max_new_tokens, "do_sample": False}
        try:
            # both warm: the swarm's routing and connections, and the local model's first call
            distributed.generate(**inputs, max_new_tokens=2, do_sample=False)
            began = time.perf_counter()
            swarm_out = distributed.generate(**inputs, **greedy)
            swarm_s = time.perf_counter() - began
            # locally with the threads one server gets (servers split the cores); torch's default of every core
            # loses most of its time to contention on a small model
            threads = torch.get_num_threads()
            torch.set_num_threads(local_threads)
            try:
                local.generate(**inputs, max_new_tokens=2, do_sample=False)
                began = time.perf_counter()
                local_out = local.generate(**inputs, **greedy)
                local_s = time.perf_counter() - began
            finally:
                torch.set_num_threads(threads)
            same = torch.equal(swarm_out, local_out)
            print(f"prompt:       {prompt!r}")
            print(f"swarm output: {answer(swarm_out)!r}")
            print(f"local output: {answer(local_out)!r}")
            print(f"tokens identical to local transformers: {same}")
            swarm_tps = (swarm_out.shape[1] - prompt_length) / swarm_s
            local_tps = (local_out.shape[1] - prompt_length) / local_s
            print(
                f"speed, both warm (after a 2-token warm-up each), greedy, batch 1: swarm of {num_servers} servers "
                f"{swarm_tps:.1f} tokens/s, local transformers {local_tps:.1f} tokens/s ({local_threads} CPU "
                f"thread{'s' if local_threads > 1 else ''}, as each server)"
            )

            print("\nact 2: a spare server joins, and a server of the route is killed mid-generation")
            # eager: it serves a few tokens, and compiling a step for its span first (another graph than the
            # route's) doubled a first demo's time on a 2-core VM (41 s of 98)
            spare = swarm.add_server(str(path), (0, num_blocks), extra=["--no-compile"])
            print(f"server {spare['peer_id'][-8:]} holds blocks [0, {num_blocks}) (the spare)")
            infos.append(spare)
            index = {info["peer_id"]: i for i, info in enumerate(infos)}
            killed: list[str] = []

            def kill_first_hop() -> None:
                hop = distributed._active.session.hops[0]
                swarm.servers[index[hop.peer_id]].kill()
                killed.append(hop.peer_id)
                # said now, before the client's own log lines of the failure that the next step meets
                print(
                    f"killed server {hop.peer_id[-8:]} (blocks [{hop.start}, {hop.end})) with SIGKILL after token "
                    f"{KILL_AT_TOKEN}",
                    flush=True,
                )

            with distributed.inference_session(max_length=prompt_length + max_new_tokens):
                again = distributed.generate(
                    **inputs, **greedy, streamer=_AtToken(KILL_AT_TOKEN, kill_first_hop)
                )
            if not killed:  # (--max-new-tokens below it, or an answer that ended sooner)
                print(f"  (the generation ended before token {KILL_AT_TOKEN}: no server was killed)")
            if killed and not distributed.swarm.failovers:
                print("  (the generation ended before its next step: no failover was needed)")
            for failover in distributed.swarm.failovers:
                to = ", ".join(f"{h.peer_id[-8:]} [{h.start}, {h.end})" for h in failover.replacement)
                print(
                    f"  failover: blocks [{failover.start}, {failover.end}) went to {to}: "
                    f"{failover.route_s:.2f} s routing, {failover.replay_s:.2f} s replaying "
                    f"{failover.replayed_tokens} tokens"
                )
            survived = torch.equal(again, local_out)
            print(f"output after the kill: {answer(again)!r}")
            print(f"tokens identical to local transformers after the kill: {survived}")
        finally:
            distributed.shutdown()
    return 0 if same and survived else 1
