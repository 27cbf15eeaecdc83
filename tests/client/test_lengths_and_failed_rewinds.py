"""Client behaviour at the edges, each against a real server in this process (no DHT): `generate()`'s
lengths as transformers counts them (with and without a draft model), and what an inference session says it
holds after a rewinding step failed half-way along its chain."""

from __future__ import annotations

import copy

import pytest
import torch
from in_process import model_over_one_server
from server_infos import online_server
from transformers import AutoModelForCausalLM

from swarmllm.client.routing import MissingBlocksError
from swarmllm.client.session import InferenceSession
from swarmllm.client.swarm import SwarmClient
from swarmllm.models import load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler
from swarmllm.wire import DirectServer, Identity, RequestError


@pytest.fixture(scope="module")
def models(llama_checkpoint):
    """(the model over one in-process server of every block, the local transformers model, a close draft)."""
    path = str(llama_checkpoint)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    draft = copy.deepcopy(local)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 1e-3)
    with model_over_one_server(path, "lengths-client") as model:
        yield model, local, draft


def test_generate_without_a_length_adds_transformers_default_20_tokens(models):
    model, local, _ = models
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    want = local.generate(ids)
    assert want.shape[1] == ids.shape[1] + 20
    torch.testing.assert_close(model.generate(ids), want, rtol=0, atol=0)


def test_speculative_generate_without_a_length_adds_transformers_default_20_tokens(models):
    model, local, draft = models
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    want = local.generate(ids)
    torch.testing.assert_close(model.generate(ids, assistant_model=draft), want, rtol=0, atol=0)
    # an explicit max_length still counts the prompt, as in transformers
    want = local.generate(ids, max_length=14)
    torch.testing.assert_close(
        model.generate(ids, max_length=14, assistant_model=draft), want, rtol=0, atol=0
    )


class _RefusesRewinds(RequestHandler):
    """A server that refuses the first step that rewinds its session (a speculative round's rejected drafts)."""

    refused = 0

    async def _step(self, backend, session, step, compression, target):
        if step.position < session.length and not self.refused:
            type(self).refused += 1
            raise RequestError("busy", "injected: refused")
        return await super()._step(backend, session, step, compression, target)


async def test_a_rewind_that_fails_half_way_leaves_the_session_at_the_rewind(llama_checkpoint):
    """Hop 1 refuses a step that rewinds to position 7 after hop 0 took it, and nobody else holds its blocks:
    the step fails. Hop 0's server now holds 8 positions, not 9, so the session holds positions [0, 7) on every
    server; a session that still said 9 sent its next step at 9, beyond hop 0's cache, and banned a healthy
    server for refusing it."""
    path = str(llama_checkpoint)
    ids = [Identity.generate() for _ in range(3)]
    handlers = [
        RequestHandler(Backend(load_span(path, 0, 2), cache_tokens=64), dict),
        _RefusesRewinds(Backend(load_span(path, 2, 4), cache_tokens=64), dict),
        RequestHandler(Backend(load_span(path, 2, 4), cache_tokens=64), dict),
    ]
    servers = [DirectServer(h.handlers(), i) for h, i in zip(handlers, ids, strict=True)]
    for server in servers:
        await server.start()
    infos = [
        online_server(i.peer_id, a, b, address=s.address)
        for i, s, (a, b) in zip(ids, servers, [(0, 2), (2, 4), (2, 4)], strict=True)
    ]
    swarm = SwarmClient([], "failed-rewind", 4, missing_blocks_timeout_s=0, push=False, spot_check_fraction=0)
    swarm.use_servers(infos[:2])  # the third server joins after the failure
    hidden = torch.randn(1, 9, 64, generator=torch.Generator().manual_seed(0))
    try:
        session = InferenceSession(swarm, max_length=16)
        await session.step(hidden[:, :6])
        await session.step(hidden[:, 6:9])
        with pytest.raises(MissingBlocksError):
            await session.step(hidden[:, 7:8], position=7)
        assert session.position == 7
        swarm.use_servers(infos)
        out = await session.step(hidden[:, 7:8])  # at the position the session says it holds
        span = load_span(path, 0, 4)
        with torch.inference_mode():
            want = span(hidden[:, :8])[:, 7:]
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
        assert ids[0].peer_id not in swarm.bans.banned(0.0)  # the healthy first server was never blamed
        await session.close()
    finally:
        await swarm.shutdown()
        for server in servers:
            await server.stop()


class _Stop(Exception):
    pass


class _StopAfterFirstRound:
    """A streamer that stops generation by raising once the prompt and one round have come (a user's cancel)."""

    def __init__(self):
        self.puts = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            raise _Stop

    def end(self) -> None:
        pass


def test_a_session_reuses_only_what_its_servers_hold_after_a_speculative_generate_stopped(models):
    """A speculative generate that stops half-way (its streamer raised) has overwritten the servers' cache from
    where its prompt left the held tokens: the next generate in the session must not reuse the tokens held
    before it."""
    model, local, draft = models
    ids = torch.randint(3, model.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(2))
    other = torch.cat([ids[:, :3], (ids[:, 3:] + 1) % model.config.vocab_size], dim=1)
    with model.inference_session(max_length=64):
        model.generate(ids, max_new_tokens=4)
        with pytest.raises(_Stop):
            model.generate(other, max_new_tokens=8, assistant_model=draft, streamer=_StopAfterFirstRound())
        got = model.generate(ids, max_new_tokens=4)
    torch.testing.assert_close(got, local.generate(ids, max_new_tokens=4), rtol=0, atol=0)
