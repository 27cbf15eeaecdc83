"""Features crossed with each other, each against its oracle: speculative decoding through a server over
sliding-window layers, with a client's LoRA adapter (PEFT's tokens), inside a compressed session; trained prompts
with a left-padded batch of prompts of different lengths (transformers with the prompts prepended, row by row);
seeded sampling (transformers' tokens for the same seed, and the same tokens twice)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from in_process import beside_transformers, model_over_one_server, perturbed
from server_infos import online_server
from transformers import AutoModelForCausalLM

from swarmllm.client.loop import run_sync
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.remote import PromptTuning
from swarmllm.client.swarm import SwarmClient
from swarmllm.models import load_client_head, load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.wire import DirectServer, Identity

peft = pytest.importorskip("peft")

PROMPT = torch.tensor([[1, 17, 42, 99, 5, 23, 64, 8]])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def greedy_oracle(local, ids, new, **forward):
    """transformers' greedy tokens, one full forward per token (no cache to trust)."""
    with torch.no_grad():
        for _ in range(new):
            ids = torch.cat([ids, local(ids, **forward).logits[:, -1:].argmax(-1)], 1)
    return ids


SLIDING = {
    "mistral": dict(sliding_window=3),
    "qwen2": dict(use_sliding_window=True, sliding_window=3, max_window_layers=2),
    "qwen3": dict(use_sliding_window=True, sliding_window=3, max_window_layers=1),
}


@pytest.mark.parametrize("family", sorted(SLIDING))
def test_speculation_over_sliding_window_layers_keeps_transformers_greedy_tokens(checkpoints, family):
    """Rejected drafts rewind the server's cache across the window's edge: the tokens stay plain greedy's."""
    path = checkpoints(family, **SLIDING[family])
    with beside_transformers(str(path), f"cross-sw-{family}") as (model, local, _):
        want = greedy_oracle(local, PROMPT, 16)
        draft = perturbed(path, noise=0.1)
        out = model.generate(PROMPT, max_new_tokens=16, assistant_model=draft, num_assistant_tokens=4)
        stats = model.last_speculation
        assert out.tolist() == want.tolist()
        assert 0 < stats.accepted < stats.drafted  # drafts were rejected: the caches rewound


def test_speculation_with_a_client_lora_keeps_pefts_greedy_tokens(llama_checkpoint, tmp_path):
    path = str(llama_checkpoint)
    with model_over_one_server(path, "cross-lora") as model:
        model.add_adapter(
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
        )
        generator = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for weight in model.lora.weights:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
        model.save_pretrained(tmp_path)
        base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        without = greedy_oracle(base, PROMPT, 14)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path).eval()
        want = greedy_oracle(theirs, PROMPT, 14)
        assert want.tolist() != without.tolist()  # the adapter matters
        out = model.generate(
            PROMPT, max_new_tokens=14, assistant_model=perturbed(path), num_assistant_tokens=3
        )
        assert out.tolist() == want.tolist()


@pytest.mark.parametrize("codec", ["float16", "bfloat16"])
def test_speculation_in_a_compressed_session_equals_plain_decoding_in_one(llama_checkpoint, codec):
    path = str(llama_checkpoint)
    with model_over_one_server(path, f"cross-codec-{codec}") as model:
        with model.inference_session(max_length=40, compression=codec):
            plain = model.generate(PROMPT, max_new_tokens=16)
        with model.inference_session(max_length=40, compression=codec):
            fast = model.generate(
                PROMPT, max_new_tokens=16, assistant_model=perturbed(path), num_assistant_tokens=4
            )
        assert fast.tolist() == plain.tolist()


def prompted_oracle(local, prompts, row, new):
    """transformers' greedy tokens of one unpadded row with the trained prompts before it."""
    ids = row
    with torch.no_grad():
        for _ in range(new):
            embeds = torch.cat([prompts[None], local.get_input_embeddings()(ids)], 1)
            ids = torch.cat([ids, local(inputs_embeds=embeds).logits[:, -1:].argmax(-1)], 1)
    return ids


def with_prompts(model, length=3, deep=False, seed=0):
    model.ptune = PromptTuning(model.block_config, length, deep=deep)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.ptune.prompts.copy_(torch.randn(model.ptune.prompts.shape, generator=generator) * 0.5)
        if deep:
            model.ptune.deep.copy_(torch.randn(model.ptune.deep.shape, generator=generator) * 0.3)
    return model


def left_padded(rows, pad):
    longest = max(r.shape[1] for r in rows)
    ids = torch.cat([torch.cat([torch.full((1, longest - r.shape[1]), pad), r], 1) for r in rows])
    mask = torch.cat([torch.cat([torch.zeros(1, longest - r.shape[1]), torch.ones_like(r)], 1) for r in rows])
    return ids, mask.long()


ROWS = [torch.tensor([[1, 17, 42, 99, 5, 23]]), torch.tensor([[1, 64, 8]])]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_trained_prompts_with_a_left_padded_batch_give_transformers_tokens(checkpoints, family):
    """The prompts go before the pads, as in transformers given the padded batch's embeddings after them (a
    sliding window then counts the pads: mistral's short row no longer sees its prompts, there as here)."""
    path = str(checkpoints(family))
    with beside_transformers(path, f"cross-ptune-{family}") as (model, local, tokenizer):
        prompts = with_prompts(model).ptune.prompts.detach()
        pad = tokenizer.pad_token_id
        ids, mask = left_padded(ROWS, pad)
        embeds = torch.cat([prompts[None].expand(len(ROWS), -1, -1), local.get_input_embeddings()(ids)], 1)
        full_mask = torch.cat([torch.ones(len(ROWS), prompts.shape[0]).long(), mask], 1)
        options = dict(max_new_tokens=8, do_sample=False, pad_token_id=pad)
        want = local.generate(inputs_embeds=embeds.detach(), attention_mask=full_mask, **options)
        out = model.generate(ids, attention_mask=mask, **options)
        assert out[:, ids.shape[1] :].tolist() == want.tolist()
        if family == "llama":  # without a window each row's tokens are its own alone
            solo = [prompted_oracle(local, prompts, row, 8)[0, row.shape[1] :].tolist() for row in ROWS]
            assert want.tolist() == solo


def test_deep_prompts_with_a_left_padded_batch_keep_each_rows_solo_tokens(llama_checkpoint):
    path = str(llama_checkpoint)
    with beside_transformers(path, "cross-deep") as (model, _, tokenizer):
        with_prompts(model, deep=True)
        wants = [model.generate(row, max_new_tokens=8)[0, row.shape[1] :] for row in ROWS]
        ids, mask = left_padded(ROWS, tokenizer.pad_token_id)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
        assert [g.tolist() for g in out[:, ids.shape[1] :]] == [w.tolist() for w in wants]


def test_trained_prompts_with_beam_search_give_transformers_beams(llama_checkpoint):
    path = str(llama_checkpoint)
    with beside_transformers(path, "cross-ptune-beams") as (model, local, _):
        prompts = with_prompts(model).ptune.prompts.detach()
        row = ROWS[0]
        embeds = torch.cat([prompts[None], local.get_input_embeddings()(row)], 1).detach()
        options = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
        want = local.generate(
            inputs_embeds=embeds, attention_mask=torch.ones(1, embeds.shape[1]).long(), **options
        )
        out = model.generate(row, **options)
        assert out[:, row.shape[1] :].tolist() == want[:, -6:].tolist()


def test_trained_prompts_in_a_chat_session_keep_transformers_tokens(llama_checkpoint):
    path = str(llama_checkpoint)
    with beside_transformers(path, "cross-ptune-chat") as (model, local, _):
        prompts = with_prompts(model).ptune.prompts.detach()
        first = ROWS[0]
        follow = torch.tensor([[33, 44, 55]])
        want1 = prompted_oracle(local, prompts, first, 5)
        want2 = prompted_oracle(local, prompts, torch.cat([want1, follow], 1), 5)
        with model.inference_session(max_length=40):
            turn1 = model.generate(first, max_new_tokens=5)
            turn2 = model.generate(torch.cat([turn1, follow], 1), max_new_tokens=5)
        assert turn1.tolist() == want1.tolist()
        assert turn2.tolist() == want2.tolist()


def test_trained_prompts_with_inputs_embeds_give_the_tokens_of_input_ids(llama_checkpoint):
    path = str(llama_checkpoint)
    with beside_transformers(path, "cross-ptune-embeds") as (model, local, _):
        prompts = with_prompts(model).ptune.prompts.detach()
        row = ROWS[0]
        want = prompted_oracle(local, prompts, row, 6)[:, row.shape[1] :]
        out = model.generate(inputs_embeds=model.get_input_embeddings()(row), max_new_tokens=6)
        assert out[:, -6:].tolist() == want.tolist()


def test_seeded_sampling_gives_transformers_tokens_and_the_same_twice(llama_checkpoint):
    path = str(llama_checkpoint)
    with beside_transformers(path, "cross-seed") as (model, local, _):
        options = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=0)
        torch.manual_seed(11)
        want = local.generate(PROMPT, **options)
        runs = []
        for _ in range(2):
            torch.manual_seed(11)
            runs.append(model.generate(PROMPT, **options).tolist())
        assert runs[0] == runs[1] == want.tolist()


@contextmanager
def clients_of_one_server(path: str, clients: int, quant: str = "none") -> Iterator[tuple[list, Backend]]:
    """`clients` models (each its own SwarmClient) over one in-process server of every block (quantized as
    `quant` says), and its backend (whose batcher counts merged steps)."""
    config, head = load_client_head(path)
    blocks = config.num_hidden_layers
    identity = Identity.generate()
    backend = Backend(load_span(path, 0, blocks, quant=quant), cache_tokens=4096, batch_wait_s=0.5)

    async def start() -> DirectServer:
        server = DirectServer(RequestHandler(backend, dict, ServerLimits()).handlers(), identity)
        await server.start()
        return server

    server = run_sync(start())
    swarms = [SwarmClient([], f"cross-{quant}", blocks, missing_blocks_timeout_s=0) for _ in range(clients)]
    for swarm in swarms:
        swarm.use_servers([online_server(identity.peer_id, 0, blocks, address=server.address)])
    try:
        yield [DistributedModelForCausalLM(config, head, swarm).eval() for swarm in swarms], backend
    finally:
        for swarm in swarms:
            run_sync(swarm.shutdown())
        run_sync(server.stop())


def with_lora(model, seed, modules=("q_proj", "v_proj", "up_proj")):
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(modules)))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.lora.weights:
            weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
    return model


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_adapters_and_speculation_beside_each_other_keep_their_solo_tokens(llama_checkpoint, quant):
    """Three clients at once on one server (int8 or not): two with adapters of their own, one of them decoding
    speculatively, one plain; each gets its solo tokens, and the server merged their steps."""
    path = str(llama_checkpoint)
    draft = perturbed(path)
    with clients_of_one_server(path, 3, quant) as (models, backend):
        with_lora(models[0], 1)
        with_lora(models[1], 2, ("k_proj", "o_proj", "down_proj"))
        prompts = [PROMPT, torch.tensor([[1, 5, 9, 80, 12]]), torch.tensor([[1, 120, 3]])]

        def run(i):
            if i == 1:
                return models[i].generate(
                    prompts[i], max_new_tokens=16, assistant_model=draft, num_assistant_tokens=3
                )
            return models[i].generate(prompts[i], max_new_tokens=16)

        solo = [run(i).tolist() for i in range(3)]
        assert len({str(t[0][-16:]) for t in solo}) == 3
        merged_before = backend.batcher.merged - backend.batcher.steps
        with ThreadPoolExecutor(3) as pool:
            together = [job.result(timeout=120).tolist() for job in [pool.submit(run, i) for i in range(3)]]
        assert together == solo
        assert backend.batcher.merged - backend.batcher.steps > merged_before  # some steps ran merged


def test_speculation_with_trained_prompts_is_refused_clearly(llama_checkpoint):
    path = str(llama_checkpoint)
    with model_over_one_server(path, "cross-ptune-spec") as model:
        with_prompts(model)
        with pytest.raises(NotImplementedError, match="trainable prompts"):
            model.generate(PROMPT, max_new_tokens=4, assistant_model=perturbed(path))


def test_seeded_speculative_sampling_gives_the_same_tokens_twice(llama_checkpoint):
    path = str(llama_checkpoint)
    draft = perturbed(path, noise=0.2)
    with model_over_one_server(path, "cross-spec-seed") as model:
        runs = []
        for _ in range(2):
            generator = torch.Generator().manual_seed(5)
            options = dict(max_new_tokens=14, do_sample=True, temperature=0.8, generator=generator)
            runs.append(
                model.generate(PROMPT, assistant_model=draft, num_assistant_tokens=3, **options).tolist()
            )
        assert runs[0] == runs[1]


@pytest.mark.parametrize("codec, bound", [("float16", 5e-3), ("blockwise8", 6e-2)])
def test_speculation_in_a_compressed_session_carries_its_codec(llama_checkpoint, codec, bound):
    """The verified logits of a speculative run in a compressed session are the codec's: within its stated error
    of float32's, and not float32's own."""
    path = str(llama_checkpoint)
    with beside_transformers(path, f"cross-spec-{codec}") as (model, local, _):
        seen = []
        with model.inference_session(max_length=40, compression=codec):
            out = model.generate(
                PROMPT, max_new_tokens=12, assistant_model=perturbed(path), record_logits=seen.append
            )
        got = torch.cat(seen)
        with torch.no_grad():
            want = local(out[:, :-1]).logits[0, PROMPT.shape[1] - 1 :]
        error = ((got - want).norm(dim=-1) / want.norm(dim=-1)).max()
        assert 0 < error <= bound, error


def test_speculation_over_a_sliding_window_survives_a_kill_after_a_rejection(checkpoints):
    """Servers of mixed sliding/full layers; a round rejects drafts, then hop 1's server dies: the replacement's
    replayed cache is the accepted history's, so the tokens stay transformers' greedy ones."""
    from test_failover import Swarm
    from transformers.generation.streamers import BaseStreamer

    from swarmllm.local import LocalSwarm

    path = checkpoints("qwen2", **SLIDING["qwen2"])
    local_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = greedy_oracle(local_model, PROMPT, 20)
    draft = perturbed(path, noise=0.1)
    killed = []

    class KillAfterRejection(BaseStreamer):
        def put(self, value):
            stats = swarm.model.last_speculation
            if stats is not None and stats.drafted > stats.accepted and not killed:
                hop = swarm.model._active.session.hops[1]
                killed.append(hop.peer_id)
                swarm.local.servers[swarm.index[hop.peer_id]].kill()

        def end(self):
            pass

    with LocalSwarm() as local:
        local.start_bootstrap()
        swarm = Swarm(local, path, [(0, 2), (2, 4), (0, 2), (2, 4)], spot_check_fraction=0.0)
        try:
            with swarm.model.inference_session(max_length=40):
                out = swarm.model.generate(
                    PROMPT,
                    max_new_tokens=20,
                    assistant_model=draft,
                    num_assistant_tokens=4,
                    streamer=KillAfterRejection(),
                )
            assert killed and swarm.model.swarm.failovers
            assert out.tolist() == want.tolist()
        finally:
            swarm.close()
