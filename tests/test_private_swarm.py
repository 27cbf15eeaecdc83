"""A private swarm of real processes (bootstrap and server started with --swarm-key) on 127.0.0.1: members
generate through it; an outsider without the key is refused on every DHT store and every call, clearly."""

import asyncio
import os

import pytest
import torch
from hivemind.p2p import P2P
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.client.routing import MissingBlocksError
from swarmllm.dht import ModelInfo, ServerInfo, ServerState, announce, find_servers, list_models, start_dht
from swarmllm.local import LocalSwarm
from swarmllm.wire import (
    ConnectionLost,
    Identity,
    Message,
    NotAMember,
    SwarmKey,
    connect_direct,
    connect_libp2p,
)

BOUND = 20  # seconds; only to fail a test instead of hanging


@pytest.fixture(scope="module")
def private_swarm(llama_checkpoint, tmp_path_factory):
    key_path = tmp_path_factory.mktemp("swarm") / "swarm.key"
    key_path.write_bytes(os.urandom(32))
    with LocalSwarm() as local:
        local.start_bootstrap(extra=["--swarm-key", str(key_path)])
        record = local.add_server(str(llama_checkpoint), (0, 4), extra=["--swarm-key", str(key_path)])
        yield local, record, key_path


def test_a_member_generates_through_the_private_swarm(private_swarm, llama_checkpoint):
    local, _, key_path = private_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=local.initial_peers, swarm_key=str(key_path)
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(llama_checkpoint)
        reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
        inputs = tokenizer("the cat and the dog", return_tensors="pt")
        ours = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        theirs = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(ours, theirs)
    finally:
        model.shutdown()


def test_an_outsider_client_is_told_it_may_need_the_swarm_key(private_swarm, llama_checkpoint):
    """Without the key, the swarm's records cannot be read: the client finds no server and says what to check."""
    local, _, _ = private_swarm
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=local.initial_peers, missing_blocks_timeout_s=2
    )
    try:
        with pytest.raises(MissingBlocksError, match="swarm_key"):
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)
    finally:
        model.shutdown()


async def _outsider_calls(record: dict, initial_peers: list[str]) -> list[str]:
    """Every way an outsider can call the server; returns the errors it got."""
    errors = []
    host, _, port = record["direct"].rpartition(":")
    with pytest.raises(NotAMember) as direct:
        await connect_direct(host, int(port), Identity.generate(), expected_peer_id=record["peer_id"])
    errors.append(str(direct.value))
    p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=initial_peers)
    try:
        connection = await connect_libp2p(p2p, record["peer_id"])
        with pytest.raises(ConnectionLost) as libp2p:
            await connection.call("info", Message(), timeout=BOUND)
        errors.append(str(libp2p.value))
        await connection.close()
    finally:
        await p2p.shutdown()
    return errors


def test_an_outsider_is_refused_on_every_call(private_swarm):
    local, record, _ = private_swarm
    errors = run_sync(asyncio.wait_for(_outsider_calls(record, local.initial_peers), 3 * BOUND))
    assert len(errors) == 2
    assert all("not_a_member" in e and "--swarm-key" in e for e in errors), errors


def test_an_outsider_is_refused_on_every_store(private_swarm, llama_checkpoint):
    local, record, key_path = private_swarm
    outsider = Identity.generate()
    dht, tag = start_dht(outsider, initial_peers=local.initial_peers, client_mode=True)
    info = ServerInfo(
        peer_id=outsider.peer_id,
        state=ServerState.ONLINE,
        start_block=0,
        end_block=4,
        throughput=1e9,
        inference_rps=1e9,
        forward_rps=1e9,
        cache_tokens_left=10**6,
        version="evil",
        dtype="float32",
    )
    prefix = llama_checkpoint.name
    try:
        assert not run_sync(announce(dht, tag, prefix, info, ModelInfo(dht_prefix="evil", num_blocks=4), 60))
    finally:
        dht.shutdown()
    member, _ = start_dht(
        Identity.generate(),
        initial_peers=local.initial_peers,
        client_mode=True,
        swarm_key=SwarmKey.load(key_path),
    )
    try:
        servers = run_sync(find_servers(member, prefix, 4))
        assert [s.peer_id for s in servers] == [record["peer_id"]]  # the member server only
        assert [m.dht_prefix for m in run_sync(list_models(member))] == [prefix]
    finally:
        member.shutdown()
