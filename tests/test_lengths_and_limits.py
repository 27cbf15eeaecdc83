"""Lengths and limits end to end: how many tokens each face generates when a request names no length (or Ollama's
"infinite" one), against transformers' greedy `generate` on the same checkpoint, and what a client does when a
server refuses to open a session for lack of cache room. Servers are real ones in this process on 127.0.0.1
(no DHT)."""

from __future__ import annotations

import pytest
import torch
from aiohttp.test_utils import TestClient, TestServer
from in_process import model_over_one_server
from server_infos import online_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmllm.api.app import Api, Engine
from swarmllm.api.gateway import Gateway
from swarmllm.client.loop import run_sync
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.session import InferenceSession
from swarmllm.client.swarm import SwarmClient
from swarmllm.models import load_client_head, load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.wire import DirectServer, Identity

CONTEXT = 40  # the API's context: prompt and answer tokens at most
PROMPT = "the cat and the dog"


@pytest.fixture(scope="module")
def faces(llama_checkpoint):
    """(an engine over one in-process server of every block, the local transformers model, its tokenizer)."""
    path = str(llama_checkpoint)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with model_over_one_server(path, "lengths-faces") as model:
        engine = Engine(model, tokenizer, "m", context_length=CONTEXT, max_concurrent=2, keep_sessions=0)
        try:
            yield engine, local, tokenizer
        finally:
            engine.shutdown()


@pytest.fixture
async def client(faces):
    client = TestClient(TestServer(Gateway([Api(faces[0])]).app()))
    await client.start_server()
    yield client
    await client.close()


def _greedy_text(local, tokenizer, ids: list[int], max_new_tokens: int) -> tuple[str, int]:
    """transformers' greedy answer to `ids`: its text (what its tokens add to the prompt's, as the API reads it)
    and how many tokens it has."""
    out = local.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[0].tolist()
    prompt = tokenizer.decode(ids, skip_special_tokens=True)
    return tokenizer.decode(out, skip_special_tokens=True)[len(prompt) :], len(out) - len(ids)


async def test_ollama_raw_generate_without_num_predict_runs_up_to_the_context(faces, client):
    """Ollama's `num_predict` defaults to -1 ("infinite": up to the context), and -2 fills the context; a raw
    generate then answers up to the context, as its templated one does, not the 16 tokens of OpenAI's
    completions default that its translation into a completions request used to bring along."""
    _, local, tokenizer = faces
    ids = tokenizer(PROMPT)["input_ids"]
    want, count = _greedy_text(local, tokenizer, ids, CONTEXT - len(ids))
    assert count > 16  # (the checkpoint's greedy answer does not end by itself before then)
    for options in ({}, {"num_predict": -1}, {"num_predict": -2}):
        body = {"model": "m", "prompt": PROMPT, "raw": True, "stream": False}
        reply = await client.post("/api/generate", json={**body, "options": {"temperature": 0, **options}})
        answer = await reply.json()
        assert reply.status == 200, answer
        assert (answer["response"], answer["eval_count"]) == (want, count), options


@pytest.fixture
async def small_cache_server(llama_checkpoint):
    """(a server of every block in this process with a cache of 64 tokens, of which a peer may hold 32; its
    ServerInfo for a client to route over)."""
    identity = Identity.generate()
    backend = Backend(load_span(str(llama_checkpoint), 0, 4), cache_tokens=64)
    server = DirectServer(RequestHandler(backend, dict).handlers(), identity)
    await server.start()
    try:
        yield online_server(identity.peer_id, 0, 4, address=server.address)
    finally:
        await server.stop()


def _client(info, **options: float) -> SwarmClient:
    swarm = SwarmClient([], "lengths-cache", 4, missing_blocks_timeout_s=0, spot_check_fraction=0, **options)
    swarm.use_servers([info])
    return swarm


async def test_a_session_refused_for_its_peers_cache_share_leaves_the_server_usable(small_cache_server):
    """A session that would take the client past its share of a server's cache is refused (`quota`, naming the
    limit). That is the request's size, not a fault of the server: the client, told not to wait for room
    (`room_wait_s=0`), says why at once, and its next session that fits opens there. It used to ban the server as
    failed, so every session of the client found "no online server holds blocks 0..3" until the ban ran out."""
    swarm = _client(small_cache_server, room_wait_s=0)
    hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(0))
    try:
        held = InferenceSession(swarm, max_length=24)
        want = await held.step(hidden)
        refused = InferenceSession(swarm, max_length=24)  # 48 tokens of a share of 32
        with pytest.raises(ValueError, match="cache share limit"):
            await refused.step(hidden)
        await refused.close()
        await held.close()
        fits = InferenceSession(swarm, max_length=24)
        torch.testing.assert_close(await fits.step(hidden), want, rtol=0, atol=0)
        await fits.close()
    finally:
        await swarm.shutdown()


async def test_a_session_refused_for_a_full_cache_leaves_the_server_usable(small_cache_server):
    """Two clients hold the server's whole cache: a third client's session, told not to wait for room
    (`room_wait_s=0`; tests/client/test_rate_limit_waits.py has the wait), is refused with `cache_full` (naming
    the free tokens), and once a session closes, the third client's next one opens on the same server."""
    swarms = [_client(small_cache_server) for _ in range(2)] + [_client(small_cache_server, room_wait_s=0)]
    hidden = torch.randn(1, 4, 64, generator=torch.Generator().manual_seed(1))
    try:
        full = [InferenceSession(swarm, max_length=32) for swarm in swarms[:2]]
        outs = [await session.step(hidden) for session in full]
        refused = InferenceSession(swarms[2], max_length=8)
        with pytest.raises(ValueError, match="0 of 64 are free"):
            await refused.step(hidden)
        await refused.close()
        await full[0].close()
        fits = InferenceSession(swarms[2], max_length=8)
        torch.testing.assert_close(await fits.step(hidden), outs[0], rtol=0, atol=0)
        await fits.close()
        await full[1].close()
    finally:
        for swarm in swarms:
            await swarm.shutdown()


@pytest.fixture(scope="module")
def capped_model(llama_checkpoint):
    """The model over one in-process server of every block whose sessions are capped at CONTEXT positions."""
    path = str(llama_checkpoint)
    config, head = load_client_head(path)
    identity = Identity.generate()

    async def start() -> DirectServer:
        backend = Backend(load_span(path, 0, 4), cache_tokens=4 * CONTEXT)
        handler = RequestHandler(backend, dict, ServerLimits(max_session_length=CONTEXT))
        server = DirectServer(handler.handlers(), identity)
        await server.start()
        return server

    server = run_sync(start())
    swarm = SwarmClient([], "lengths-capped", 4, missing_blocks_timeout_s=0, spot_check_fraction=0)
    swarm.use_servers([online_server(identity.peer_id, 0, 4, address=server.address)])
    try:
        yield DistributedModelForCausalLM(config, head, swarm).eval()
    finally:
        run_sync(swarm.shutdown())
        run_sync(server.stop())


async def test_scoring_a_prompt_as_long_as_the_context_fits_servers_capped_at_the_context(
    faces, capped_model
):
    """`echo` with `max_tokens: 0` scores a prompt alone (lm-evaluation-harness's log-likelihoods): one forward
    over its tokens, no token generated. A prompt of exactly `--context-length` tokens is within the context, so
    it is scored on servers whose sessions are capped at that length (`--context-length 8192` over servers'
    default `max_session_length` of 8192); its session used to ask for one position more, which every server
    refused, a 503. Log-probabilities as transformers computes them."""
    _, local, tokenizer = faces
    engine = Engine(capped_model, tokenizer, "m", context_length=CONTEXT, max_concurrent=1, keep_sessions=1)
    client = TestClient(TestServer(Gateway([Api(engine)]).app()))
    await client.start_server()
    vocab = local.config.vocab_size
    ids = torch.randint(3, vocab, (CONTEXT,), generator=torch.Generator().manual_seed(2)).tolist()
    try:
        body = {"model": "m", "prompt": ids, "echo": True, "max_tokens": 0, "logprobs": 0}
        reply = await client.post("/v1/completions", json=body)
        answer = await reply.json()
        assert reply.status == 200, answer
        got = answer["choices"][0]["logprobs"]["token_logprobs"]
        with torch.no_grad():
            logprobs = torch.log_softmax(local(torch.tensor([ids])).logits[0].float(), dim=-1)
        want = [logprobs[i, t].item() for i, t in enumerate(ids[1:])]
        assert got[0] is None and len(got) == CONTEXT
        torch.testing.assert_close(torch.tensor(got[1:]), torch.tensor(want), rtol=0, atol=1e-4)
    finally:
        await client.close()
        engine.shutdown()


async def test_kept_sessions_give_way_to_a_new_conversation(llama_checkpoint):
    """The API keeps finished requests' sessions for their next turns, each holding cache on the servers. A new
    conversation that the servers then refuse room (here, past the peer's share: two sessions of 40 in 160
    tokens) gets it from the kept sessions, which are closed, where it was a 503 until they timed out (120 s).
    Each answer is transformers' greedy one."""
    path = str(llama_checkpoint)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    with model_over_one_server(path, "lengths-kept", cache_tokens=4 * CONTEXT) as model:
        engine = Engine(model, tokenizer, "m", context_length=CONTEXT, max_concurrent=1, keep_sessions=4)
        client = TestClient(TestServer(Gateway([Api(engine)]).app()))
        await client.start_server()
        try:
            for prompt in ("the cat", "a dog", "moon is", "hello there"):
                body = {"model": "m", "prompt": prompt, "max_tokens": None, "temperature": 0}
                reply = await client.post("/v1/completions", json=body)
                answer = await reply.json()
                assert reply.status == 200, (prompt, answer)
                ids = tokenizer(prompt)["input_ids"]
                want, count = _greedy_text(local, tokenizer, ids, CONTEXT - len(ids))
                assert answer["choices"][0]["text"] == want and answer["usage"]["completion_tokens"] == count
        finally:
            await client.close()
            engine.shutdown()
