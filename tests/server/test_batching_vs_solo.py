"""Continuous batching against solo runs, through real server processes: concurrent sessions drawn at random
(prompt lengths whose prefill runs in chunks beside others' decode steps, sessions joining and leaving between
steps, padded batches and single rows, every wire codec, a hosted adapter, a client's own adapter or none,
speculative decoding with rollbacks, seeded sampling and greedy, sessions refused a bad step mid-way) must each
give what the same request gives alone on the idle servers, and greedy ones what transformers (with the adapter
merged by PEFT) gives."""

from __future__ import annotations

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest
import torch
from test_arena import replayed
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.hop import HopSession
from swarmllm.client.loop import run_sync
from swarmllm.client.replies import SessionError
from swarmllm.client.routing import Hop
from swarmllm.local import LocalSwarm
from swarmllm.models import load_config, load_span
from swarmllm.models.convert import convert_to_ladder
from swarmllm.models.lora import LoraSettings, lora_shapes, write_peft_adapter
from swarmllm.server.backend import Backend
from swarmllm.wire import Message
from swarmllm.wire.compression import CODECS
from swarmllm.wire.messages import Step

peft = pytest.importorskip("peft")

HOSTED = "hosted"
CHUNK_TOKENS = 48  # the servers' --prefill-chunk-tokens: prompts of a few dozen tokens and more run in chunks
# logits of a session beside others against its solo run: merged rows may round differently, and a codec then
# rounds the difference up to its step
LOGIT_TOL = {"none": 1e-4, "float16": 5e-3, "bfloat16": 3e-2, "blockwise8": 8e-2}
OWN_LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj", "down_proj"])


def random_lora(config, settings, seed):
    generator = torch.Generator().manual_seed(seed)
    shapes = lora_shapes(config, settings, range(config.num_layers))
    return {name: torch.randn(shape, generator=generator) * 0.1 for name, shape in shapes.items()}


@dataclass(frozen=True)
class Job:
    """One client's request: which model (adapter), its prompt rows (left padded), how many new tokens, the
    codec its session uses, and how it picks tokens ("greedy", "sample", "speculative")."""

    model: str  # "plain", "hosted", "own"
    lengths: tuple[int, ...]  # prompt length per row
    new: int
    codec: str
    mode: str
    seed: int

    def prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(self.seed)
        longest = max(self.lengths)
        ids = torch.randint(3, 150, (len(self.lengths), longest), generator=generator)
        mask = torch.zeros_like(ids, dtype=torch.bool)
        for row, length in enumerate(self.lengths):
            mask[row, longest - length :] = True
        return ids.masked_fill(~mask, 0), mask


def draw_jobs(rng: random.Random, count: int) -> list[Job]:
    jobs = []
    for _ in range(count):
        mode = rng.choice(["greedy", "greedy", "sample", "speculative", "raw", "beam"])
        model = rng.choice(["plain", "hosted", "own"] + ["ptune"] * (mode != "speculative"))
        model = "plain" if mode == "raw" else model
        rows = 1 if mode == "speculative" else rng.choice([1, 1, 2])
        lengths = tuple(rng.choice([1, rng.randint(2, 12), rng.randint(40, 200)]) for _ in range(rows))
        codec = "none" if mode in ("speculative", "beam") else rng.choice(CODECS)
        jobs.append(Job(model, lengths, rng.randint(1, 14), codec, mode, rng.randrange(1 << 30)))
    return jobs


@dataclass
class Outcome:
    tokens: list[list[int]]
    logits: list[torch.Tensor]  # [rows, vocab] per new token (none for speculative decoding)


BAD_STEPS = ("nan", "position", "too_long", "hidden_size", "batch")


def bad_step(kind: str, hidden: torch.Tensor, position: int, max_length: int, step: int) -> Step:
    """A step the server must refuse in-band (the session stays usable)."""
    if kind == "nan":
        return Step(position, hidden.clone().fill_(float("nan")), step=step)
    if kind == "position":
        return Step(position + 1, hidden, step=step)
    if kind == "too_long":
        return Step(position, hidden.expand(-1, max_length, -1).contiguous(), step=step)
    if kind == "hidden_size":
        return Step(position, hidden[..., :-1].contiguous(), step=step)
    return Step(position, torch.cat([hidden, hidden]), step=step)


def run_raw(model, job: Job) -> Outcome:
    """A session on the first server alone, stepped with random hidden states, refused a bad step now and then;
    its outputs (the server's hidden states) stand for logits."""
    generator = torch.Generator().manual_seed(job.seed)
    rows, hidden_size = len(job.lengths), model.block_config.hidden_size
    max_length = max(job.lengths) + job.new

    async def steps() -> list[torch.Tensor]:
        first = min(await model.swarm.servers(), key=lambda s: s.start_block)
        end = first.end_block
        pending = model.swarm.carries_pending(end)
        hop = HopSession(
            Hop(first.peer_id, 0, end), rows, max_length, None, compression=job.codec, returns_pending=pending
        )
        await hop.open(await model.swarm.connection(first.peer_id), 30)
        try:
            outs, position, length, number = [], 0, max(job.lengths), 0
            for i in range(job.new + 1):
                hidden = torch.randn(rows, length, hidden_size, generator=generator)
                kind = BAD_STEPS[int(torch.randint(len(BAD_STEPS), (), generator=generator))]
                if i and bool(torch.rand((), generator=generator) < 0.4):
                    number += 1
                    await hop.send(bad_step(kind, hidden, position, max_length, number), 30)
                    with pytest.raises(SessionError):
                        await hop.recv(number, hidden, 30, position)
                number += 1
                await hop.send(Step(position, hidden, step=number), 30)
                outs.append((await hop.recv(number, hidden, 30, position)).hidden[:, -1])
                position, length = position + length, 1
            return outs
        finally:
            await hop.close()

    return Outcome([], run_sync(steps()))


def run_job(models: dict, draft, job: Job) -> Outcome:
    model = models[job.model]
    if job.mode == "raw":
        return run_raw(model, job)
    ids, mask = job.prompt()
    with torch.no_grad():
        if job.mode == "beam":
            with model.inference_session(max_length=ids.shape[1] + job.new, compression=job.codec):
                out = model.generate(
                    ids, attention_mask=mask.long(), max_new_tokens=job.new, num_beams=2, do_sample=False
                )
            return Outcome(out[:, ids.shape[1] :].tolist(), [])
        if job.mode == "speculative":
            out = model.generate(
                ids, max_new_tokens=job.new, do_sample=False, assistant_model=draft, num_assistant_tokens=3
            )
            return Outcome(out[:, ids.shape[1] :].tolist(), [])
        generator = torch.Generator().manual_seed(job.seed)
        logits_seen, new = [], []
        with model.inference_session(max_length=ids.shape[1] + job.new, compression=job.codec):
            for _ in range(job.new):
                logits = model(input_ids=ids, attention_mask=mask.long()).logits[:, -1].float()
                logits_seen.append(logits)
                if job.mode == "greedy":
                    token = logits.argmax(-1)
                else:
                    token = torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=generator)[:, 0]
                new.append(token)
                ids = torch.cat([ids, token[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        return Outcome(torch.stack(new, 1).tolist(), logits_seen)


def first_difference(a: list[list[int]], b: list[list[int]]) -> tuple[int, int] | None:
    for row, (x, y) in enumerate(zip(a, b, strict=True)):
        for step, (s, t) in enumerate(zip(x, y, strict=True)):
            if s != t:
                return row, step
    return None


def check_same(job: Job, got: Outcome, solo: Outcome) -> None:
    """`got` equals the solo run: its logits within the codec's tolerance while the tokens agree, and its
    tokens, unless they part where the solo run's top two logits were within that tolerance (a near tie)."""
    tol = LOGIT_TOL[job.codec]
    where = first_difference(got.tokens, solo.tokens)
    upto = len(solo.logits) if where is None else where[1] + 1
    for step in range(min(upto, len(got.logits))):
        torch.testing.assert_close(
            got.logits[step], solo.logits[step], rtol=tol, atol=tol, msg=f"{job} step {step}"
        )
    if where is not None:
        row, step = where
        assert job.mode not in ("speculative", "beam"), f"{job}: tokens {got.tokens} != solo {solo.tokens}"
        top = solo.logits[step][row].topk(2).values
        assert float(top[0] - top[1]) < 2 * tol, f"{job}: tokens {got.tokens} != solo {solo.tokens}"


# a checkpoint and the spans of its 2-3 servers: the ladder one is cut inside its ladder region, so its merged
# steps carry the pair (r, p)
FAMILIES = {
    "llama": ((), [(0, 2), (2, 4)]),
    "ladder": ((1, 5), [(0, 2), (2, 4), (4, 6)]),
}


@pytest.fixture(scope="module")
def swarm(request, checkpoints, tmp_path_factory):
    family = request.param
    ladder, spans = FAMILIES[family]
    if ladder:
        path = convert_to_ladder(
            checkpoints("llama", num_layers=6), tmp_path_factory.mktemp("ladder") / "ladder", *ladder
        )
    else:
        path = checkpoints(family)
    path = str(path)
    _, config = load_config(path)
    hosted = tmp_path_factory.mktemp("adapters") / HOSTED
    settings = LoraSettings(rank=2, alpha=4, modules=("q_proj", "v_proj", "gate_proj"))
    write_peft_adapter(hosted, settings, random_lora(config, settings, 99), path)
    flags = ["--adapters", str(hosted), "--prefill-chunk-tokens", str(CHUNK_TOKENS), "--dht-prefix", family]
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers([(path, span) for span in spans], extra=flags)
        options = dict(initial_peers=local.initial_peers, spot_check_fraction=0, dht_prefix=family)
        models = {
            "plain": AutoDistributedModelForCausalLM.from_pretrained(path, **options),
            "hosted": AutoDistributedModelForCausalLM.from_pretrained(path, active_adapter=HOSTED, **options),
            "own": AutoDistributedModelForCausalLM.from_pretrained(path, **options),
            "ptune": AutoDistributedModelForCausalLM.from_pretrained(
                path, tuning_mode="deep_ptune", pre_seq_len=3, **options
            ),
        }
        ptune = models["ptune"]
        with torch.no_grad():
            generator = torch.Generator().manual_seed(3)
            ptune.ptune.prompts.copy_(torch.randn(ptune.ptune.prompts.shape, generator=generator))
            ptune.ptune.deep.copy_(torch.randn(ptune.ptune.deep.shape, generator=generator) * 0.5)
        own = models["own"]
        own.add_adapter(peft.LoraConfig(**OWN_LORA))
        own.lora.load_tensors(random_lora(own.block_config, own.lora.settings, 7))
        own_dir = tmp_path_factory.mktemp("own") / "own"
        own.save_pretrained(own_dir)
        try:
            yield path, models, {"hosted": hosted, "own": own_dir}, bool(ladder)
        finally:
            for model in models.values():
                model.shutdown()


@pytest.fixture(scope="module")
def draft(llama_checkpoint):
    """A draft of the tiny Llama's vocabulary (every family's here)."""
    model = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05 * param.std())
    return model


@pytest.fixture(scope="module")
def references(swarm):
    """transformers' model of each job's kind, the adapter merged by PEFT (None for a ladder checkpoint)."""
    path, _, adapters, ladder = swarm
    if ladder:
        return None
    plain = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    merged = {
        kind: peft.PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), folder
        )
        .merge_and_unload()
        .eval()
        for kind, folder in adapters.items()
    }
    return {"plain": plain, **merged}


def merging(model) -> dict[str, tuple[int, int]]:
    """Each server's (merged decode steps run, session steps run in them) so far."""

    async def ask():
        servers = await model.swarm.servers(refresh=True)
        records = {}
        for s in servers:
            meta = (await (await model.swarm.connection(s.peer_id)).call("info", Message({}))).meta
            records[s.peer_id] = (meta["decode_steps"], meta["decode_session_steps"])
        return records

    return run_sync(ask())


def reference_tokens(references: dict, job: Job) -> list[list[int]]:
    ids, mask = job.prompt()
    beams = 2 if job.mode == "beam" else 1
    with torch.no_grad():
        out = references[job.model].generate(
            input_ids=ids,
            attention_mask=mask.long(),
            max_new_tokens=job.new,
            do_sample=False,
            num_beams=beams,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :].tolist()


@pytest.mark.parametrize("swarm, seed", [("llama", 0), ("llama", 1), ("ladder", 2)], indirect=["swarm"])
def test_concurrent_sessions_equal_their_solo_runs(swarm, draft, references, seed):
    _, models, _, _ = swarm
    jobs = draw_jobs(random.Random(seed), 8)
    solo = [run_job(models, draft, job) for job in jobs]
    before = merging(models["plain"])
    with ThreadPoolExecutor(len(jobs)) as pool:
        start = threading.Barrier(len(jobs))

        def together_(job):
            start.wait(timeout=60)
            return run_job(models, draft, job)

        futures = [pool.submit(together_, job) for job in jobs]
        together = [f.result(timeout=120) for f in futures]
    after = merging(models["plain"])
    # the servers merged some of these steps (session steps run > merged steps run)
    assert any(after[peer][1] - b[1] > after[peer][0] - b[0] for peer, b in before.items())
    for job, got, alone in zip(jobs, together, solo, strict=True):
        check_same(job, got, alone)
        exact = job.codec == "none" and job.model != "ptune"
        if references is not None and exact and job.mode in ("greedy", "speculative", "beam"):
            want = reference_tokens(references, job)
            check_same(job, Outcome(want, alone.logits), alone)


def test_merged_steps_of_sessions_that_return_the_ladder_pair_under_graphs(checkpoints, tmp_path):
    """Sessions over [0, 2) of a ladder checkpoint whose boundary 2 carries (r, p): their input is r alone, their
    output the pair. On a backend whose steps replay graphs (the CPU stand-in), their merged decode steps must
    return the pair as their solo steps do (the eager pair step), not fail every session of the step."""
    path = convert_to_ladder(checkpoints("llama", num_layers=6), tmp_path / "ladder", 1, 5)
    span = load_span(str(path), 0, 2)
    assert not span.config.carries_pending(0) and span.config.carries_pending(2)
    generator = torch.Generator().manual_seed(0)
    prompts, steps = (5, 3, 7), 6
    inputs = [torch.randn(1, p + steps, span.config.hidden_size, generator=generator) for p in prompts]

    async def run_session(backend, prompt, x):
        session = backend.open_session(0, 2, 1, 32)
        try:
            outs = [await backend.step(session, x[:, :prompt], 0, None)]
            for t in range(prompt, prompt + steps):
                # the round trip to the client: the other sessions' steps come meanwhile
                await asyncio.sleep(0)
                outs.append(await backend.step(session, x[:, t : t + 1], t, None))
            return torch.cat([r for r, _ in outs], 1), torch.cat([p for _, p in outs], 1)
        finally:
            backend.close_session(session)

    async def main():
        backend = Backend(span, cache_tokens=4096, batch_wait_s=0.05, arena_length=32)
        backend.decoder.cuda_graphs, backend.decoder._captured = True, replayed
        try:
            results = await asyncio.gather(*(run_session(backend, p, x) for p, x in zip(prompts, inputs)))
            return results, backend.batcher
        finally:
            backend.shutdown()

    results, batcher = asyncio.run(main())
    assert batcher.merged > batcher.steps  # steps were merged
    with torch.inference_mode():
        for x, (r, p) in zip(inputs, results, strict=True):
            want_r, want_p = span.forward_pair(x, None)
            torch.testing.assert_close(r, want_r, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(p, want_p, rtol=1e-5, atol=1e-5)
