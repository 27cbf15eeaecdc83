"""A client running more sessions than a server admits from one peer (`ServerInfo.max_sessions_per_peer`: an API
serving many users is one peer) queues them itself (`client.room.SessionPlaces`): the server refuses none of its
openings, every session gets transformers' tokens, sessions kept between uses give way, and a replica where the
client holds no session is taken rather than waited for."""

import asyncio
import gc
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import torch
from in_process import refusals, start_server
from server_infos import online_server
from transformers import AutoModelForCausalLM

from swarmllm.client.loop import run_sync
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.swarm import SwarmClient
from swarmllm.models import load_client_head
from swarmllm.server.handler import ServerLimits
from swarmllm.server.metrics import ServerMetrics
from swarmllm.wire import Identity

LIMIT = 2


def _prompts(n: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, 60, (1, 4 + i % 3), generator=generator) for i in range(n)]


def _expected(path: str, prompts: list[torch.Tensor], new_tokens: int) -> list[list[int]]:
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return [local.generate(p, max_new_tokens=new_tokens, do_sample=False).tolist() for p in prompts]


@contextmanager
def over_servers(
    path: str,
    prefix: str,
    speeds: list[float],
    announce: bool = True,
    idle_s: float = 300.0,
    cache_tokens: int = 4096,
    cache_share: float = 0.5,
    sessions: int = LIMIT,
):
    """The model of `path` over in-process servers of every block, one per speed (routing prefers the fastest),
    each admitting `sessions` of a peer and announcing it (`announce`), closing sessions idle for `idle_s`,
    with a cache of `cache_tokens` of which a peer may hold `cache_share`; yields the model and each server's
    metrics."""
    config, head = load_client_head(path)
    blocks = config.num_hidden_layers
    ids = [Identity.generate() for _ in speeds]
    metrics = [ServerMetrics() for _ in speeds]
    limits = ServerLimits(
        max_sessions_per_peer=sessions, session_idle_timeout_s=idle_s, max_cache_share_per_peer=cache_share
    )
    servers = [
        start_server(path, blocks, i, cache_tokens, limits, m) for i, m in zip(ids, metrics, strict=True)
    ]
    swarm = SwarmClient([], prefix, blocks, missing_blocks_timeout_s=0, request_timeout_s=120)
    announced = {"max_sessions_per_peer": sessions} if announce else {}
    swarm.use_servers(
        [
            online_server(i.peer_id, 0, blocks, address=s.address, inference_rps=rate, **announced)
            for i, s, rate in zip(ids, servers, speeds, strict=True)
        ]
    )
    try:
        yield DistributedModelForCausalLM(config, head, swarm).eval(), metrics
    finally:
        run_sync(swarm.shutdown())
        for server in servers:
            run_sync(server.stop())


def _generate_all(model, prompts: list[torch.Tensor], new_tokens: int) -> list[list[int]]:
    """Each prompt's generate in a thread of its own, all at once (each its own session)."""

    def one(ids: torch.Tensor) -> list[int]:
        with torch.no_grad():
            return model.generate(ids, max_new_tokens=new_tokens, do_sample=False).tolist()

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(one, prompts))


def test_sessions_past_the_servers_limit_wait_their_turn_in_the_client(llama_checkpoint):
    """6 generates at once, 2 sessions admitted per peer: the server refuses no opening (before: each closing
    woke every waiting session, which all tried again; all but one were refused, and the retries used up the
    request rate), every generate gets transformers' tokens, nothing is banned or failed over."""
    prompts = _prompts(6)
    expected = _expected(llama_checkpoint, prompts, 8)
    with over_servers(llama_checkpoint, "places-queue", [1.0]) as (model, (metrics,)):
        assert _generate_all(model, prompts, 8) == expected
        assert refusals(metrics, "quota") == 0
        assert model.swarm.bans._strikes == {} and not model.swarm.failovers
        assert model.swarm.places.held(next(iter(model.swarm._servers))) == 0  # every place given back


@pytest.mark.parametrize("limit", ["open sessions", "cache share"])
def test_a_limit_not_announced_is_learned_from_the_servers_refusals(llama_checkpoint, limit):
    """A server that does not announce its limit (an older one), or whose binding limit is this peer's share of
    its cache (30 of 100 tokens: two of these sessions): 12 generates at once get transformers' tokens, and the
    server refuses a few, those opened before its first refusals came back: the client then holds its sessions
    there to what it held when refused (before, every closing woke every waiting session, and all but one were
    refused again: 600 to 1,000 refusals)."""
    prompts = _prompts(12)
    expected = _expected(llama_checkpoint, prompts, 8)
    server = {"announce": False}  # (LIMIT sessions)
    if limit == "cache share":
        server = {"cache_tokens": 100, "cache_share": 0.3, "sessions": 16}
    with over_servers(llama_checkpoint, f"places-learned-{limit}", [1.0], **server) as (model, (metrics,)):
        assert _generate_all(model, prompts, 8) == expected
        assert 1 <= refusals(metrics, "quota") <= len(prompts)  # (without learning: 600-1,000)
        assert model.swarm.bans._strikes == {}


def test_sessions_kept_between_uses_give_their_places_to_waiting_ones(llama_checkpoint):
    """Two conversations kept open between turns (as the API keeps its last ones) hold both places: a new
    generate waits for a place, the kept sessions give theirs up (they are idle), it gets transformers' tokens
    with no refusal, and the kept conversations' next turns rebuild their hops and go on as transformers does."""
    prompts = _prompts(3)
    first, later = _expected(llama_checkpoint, prompts[:2], 3), _expected(llama_checkpoint, prompts, 7)
    with over_servers(llama_checkpoint, "places-kept", [1.0]) as (model, (metrics,)):
        kept = [model.open_session(max_length=64) for _ in range(2)]
        try:
            turns = []
            for remote, ids in zip(kept, prompts[:2], strict=True):
                with model.use_session(remote), torch.no_grad():
                    turns.append(model.generate(ids, max_new_tokens=3, do_sample=False))
            assert [t.tolist() for t in turns] == first
            assert _generate_all(model, prompts[2:], 7) == later[2:]
            for remote, turn, want in zip(kept, turns, later[:2], strict=True):
                with model.use_session(remote), torch.no_grad():
                    assert model.generate(turn, max_new_tokens=4, do_sample=False).tolist() == want
        finally:
            for remote in kept:
                model.close_session(remote)
        assert refusals(metrics, "quota") == 0


def test_a_replica_with_places_is_taken_rather_than_waited_for(llama_checkpoint):
    """Two servers of every block, A faster, 2 sessions of a peer admitted on each: two conversations open on A;
    a third session routes to B, where this client holds none, rather than wait for A (or have a kept
    conversation give its place up). All get transformers' tokens, with no refusals anywhere."""
    prompts = _prompts(3)
    expected = _expected(llama_checkpoint, prompts, 5)
    with over_servers(llama_checkpoint, "places-replica", [100.0, 1.0]) as (model, metrics):
        kept = [model.open_session(max_length=64) for _ in range(2)]
        try:
            for remote, ids, want in zip(kept, prompts[:2], expected[:2], strict=True):
                with model.use_session(remote), torch.no_grad():
                    assert model.generate(ids, max_new_tokens=5, do_sample=False).tolist() == want
            with torch.no_grad():
                assert model.generate(prompts[2], max_new_tokens=5, do_sample=False).tolist() == expected[2]
        finally:
            for remote in kept:
                model.close_session(remote)
        opened = [m.registry.get_sample_value("swarmllm_server_sessions_opened_total") for m in metrics]
        assert opened == [2, 1]
        assert [refusals(m, "quota") for m in metrics] == [0, 0] and not model.swarm.failovers


def test_a_session_never_closed_gives_its_place_back_once_collected(llama_checkpoint):
    """Kept sessions their user drops without closing: once they are collected, their places here are free again
    (the server frees its own after its idle timeout, 1 s here), and a later generate gets transformers' tokens
    (it would first wait out the room wait for places nobody gives back)."""
    prompts = _prompts(2)
    expected = _expected(llama_checkpoint, prompts[1:], 4)
    with over_servers(llama_checkpoint, "places-dropped", [1.0], idle_s=1.0) as (model, _):
        (peer,) = model.swarm._servers
        dropped = [model.open_session(max_length=64) for _ in range(LIMIT)]
        for remote in dropped:
            with model.use_session(remote), torch.no_grad():
                model.generate(prompts[0], max_new_tokens=1, do_sample=False)
        assert model.swarm.places.held(peer) == LIMIT
        del remote, dropped
        gc.collect()
        assert run_sync(_settled(model.swarm.places, peer)) == 0
        with torch.no_grad():
            assert model.generate(prompts[1], max_new_tokens=4, do_sample=False).tolist() == expected[0]


async def _settled(places, peer: str) -> int:
    """Its places on `peer` once the loop ran what collection handed it."""
    await asyncio.sleep(0)
    return places.held(peer)
