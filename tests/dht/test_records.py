"""Announce and look-up on real hivemind DHT peers (in this process, on 127.0.0.1)."""

import asyncio
import dataclasses
import time
from contextlib import contextmanager
from functools import partial

import hivemind
import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarmllm.dht import (
    ModelInfo,
    ServerInfo,
    ServerState,
    announce,
    block_key,
    find_server_views,
    find_servers,
    list_models,
    start_dht,
    visible_maddrs,
)
from swarmllm.dht.records import MODELS_KEY, _store_records
from swarmllm.wire import Identity


def info_for(peer_id: str, start=0, end=4, state=ServerState.ONLINE) -> ServerInfo:
    return ServerInfo(
        peer_id=peer_id,
        state=state,
        start_block=start,
        end_block=end,
        throughput=10.0,
        inference_rps=10.0,
        forward_rps=100.0,
        cache_tokens_left=1000,
        version="test",
        dtype="float32",
    )


MODEL = ModelInfo(dht_prefix="tiny", num_blocks=8, repository="local/tiny")


@contextmanager
def dht_peers(count: int):
    """`count` real DHT peers on 127.0.0.1, each (identity, dht, tag), all joined through the first."""
    identities = [Identity.generate() for _ in range(count)]
    first, first_tag = start_dht(identities[0])
    others = [start_dht(i, initial_peers=visible_maddrs(first)) for i in identities[1:]]
    nodes = [(identities[0], first, first_tag)] + [(i, d, t) for i, (d, t) in zip(identities[1:], others)]
    try:
        yield nodes
    finally:
        for _, dht, _ in nodes:
            dht.shutdown()


def owner_tag(owner: Identity) -> bytes:
    return RSASignatureValidator(owner.private_key).local_public_key


def signed_record(owner: Identity, key: str, value, subkey: bytes | None = None) -> DHTRecord:
    """A record as `owner` signs it, under its owner tag or any other `subkey` (a peer's hivemind signs only
    records under its own tag), expiring in a minute."""
    record = DHTRecord(
        DHTID.generate(source=key).to_bytes(),
        MSGPackSerializer.dumps(owner_tag(owner) if subkey is None else subkey),
        MSGPackSerializer.dumps(value),
        get_dht_time() + 60,
    )
    signature = owner.private_key.sign(MSGPackSerializer.dumps(dataclasses.astuple(record)))
    return dataclasses.replace(record, value=record.value + b"[signature:" + signature + b"]")


async def _call_store(
    _dht, node, peer: str, key: str, records: list[tuple[bytes, bytes, float]]
) -> list[bool] | None:
    """Each record stored or refused, or None where the peer did not answer within hivemind's wait timeout."""
    subkeys = [MSGPackSerializer.loads(subkey) for subkey, _, _ in records]
    stored = await node.protocol.call_store(
        PeerID.from_base58(peer),
        [DHTID.generate(source=key)] * len(records),
        [value for _, value, _ in records],
        [expiration for _, _, expiration in records],
        subkeys=subkeys,
    )
    return None if stored is None else [bool(ok) for ok in stored]


def pipe_chunks(records: list[tuple[bytes, bytes, float]], limit: int = 3000) -> list[list]:
    """Records in runs of at most `limit` bytes: a call into a DHT's process goes through a pipe that its process
    reads without blocking, so a message longer than the pipe writes at once (4 KiB) can be read half-written, and
    that kills the DHT process (BlockingIOError)."""
    chunks: list[list] = [[]]
    for record in records:
        if (
            chunks[-1]
            and sum(len(s) + len(v) for s, v, _ in chunks[-1]) + len(record[0]) + len(record[1]) > limit
        ):
            chunks.append([])
        chunks[-1].append(record)
    return chunks


def store_as(
    owners: list[Identity], values: list, key: str, via: hivemind.DHT, at: hivemind.DHT, tries: int = 3
) -> list[bool]:
    """Records of many owners under one key, each signed by its owner, sent by peer `via` to be stored at peer
    `at`: what one host holding many keys can do. A run the peer left unanswered (hivemind's 3 s wait, passed on
    a loaded machine) is signed again, with a later expiry, and sent again: the first may have been stored all
    the same, and a peer refuses a record that does not expire later than the one it holds."""

    def signed(pairs: list) -> list[tuple[bytes, bytes, float]]:
        records = [signed_record(owner, key, value) for owner, value in pairs]
        return [(r.subkey, r.value, r.expiration_time) for r in records]

    pairs = list(zip(owners, values, strict=True))
    stored: list[bool] = []
    for run in pipe_chunks(signed(pairs)):
        answer = None
        for attempt in range(tries):
            records = run if attempt == 0 else signed(pairs[len(stored) : len(stored) + len(run)])
            answer = via.run_coroutine(partial(_call_store, peer=str(at.peer_id), key=key, records=records))
            if answer is not None:
                break
        stored += answer if answer is not None else [False] * len(run)
    return stored


@pytest.fixture(scope="module")
def peers():
    with dht_peers(3) as nodes:
        yield nodes


async def test_dht_peer_id_is_the_identity(peers):
    for identity, dht, _ in peers:
        assert str(dht.peer_id) == identity.peer_id


async def test_announce_then_find_from_another_peer(peers):
    (server_id, server_dht, tag), (_, client_dht, _), _ = peers
    assert await announce(server_dht, tag, "tiny", info_for(server_id.peer_id, 2, 5), MODEL, expiration_s=60)
    found = await find_servers(client_dht, "tiny", 8)
    assert [(s.peer_id, s.start_block, s.end_block) for s in found] == [(server_id.peer_id, 2, 5)]
    assert [m.dht_prefix for m in await list_models(client_dht)] == ["tiny"]
    # a later announcement replaces the earlier one (same owner subkey)
    await announce(server_dht, tag, "tiny", info_for(server_id.peer_id, 2, 5, ServerState.OFFLINE), MODEL, 60)
    found = await find_servers(client_dht, "tiny", 8)
    assert [s.state for s in found] == [ServerState.OFFLINE]


async def test_nobody_can_announce_under_another_name(peers):
    (victim, _, victim_tag), (_, client_dht, _), (_, forger_dht, forger_tag) = peers
    # signed with the forger's own key but claiming the victim's peer id: readers drop it
    await announce(forger_dht, forger_tag, "forged", info_for(victim.peer_id), MODEL, 60)
    assert await find_servers(client_dht, "forged", 8) == []
    # written under the victim's owner tag without the victim's key: the DHT refuses to store it
    expiration = get_dht_time() + 60
    stored = forger_dht.store(
        block_key("forged2", 0), info_for(victim.peer_id).to_record(), expiration, subkey=victim_tag
    )
    assert not stored
    assert await find_servers(client_dht, "forged2", 8) == []


async def test_garbage_records_are_ignored(peers):
    (_, _, _), (_, client_dht, _), (forger, forger_dht, forger_tag) = peers
    expiration = get_dht_time() + 60
    forger_dht.store(block_key("junk", 0), {"peer_id": 5, "state": "??"}, expiration, subkey=forger_tag)
    forger_dht.store(block_key("junk", 1), b"\x00garbage", expiration, subkey=forger_tag)
    forger_dht.store(MODELS_KEY, {"num_blocks": -1}, expiration, subkey=b"no owner")
    assert await find_servers(client_dht, "junk", 8) == []
    assert all(m.num_blocks > 0 for m in await list_models(client_dht))


async def test_records_expire(peers):
    """(4 s to live: with 1 s, a look-up on a loaded CI box came after the record had expired.)"""
    (server_id, server_dht, tag), (_, client_dht, _), _ = peers
    await announce(server_dht, tag, "brief", info_for(server_id.peer_id), MODEL, expiration_s=4.0)
    assert len(await find_servers(client_dht, "brief", 8)) == 1
    deadline = time.monotonic() + 15
    while await find_servers(client_dht, "brief", 8):
        assert time.monotonic() < deadline, "an expired record was still returned"
        await asyncio.sleep(0.2)


async def test_a_moving_server_announces_its_new_blocks_as_joining_and_stays_online(peers):
    """A move announces only the new blocks as joining: readers still see the server online on its old span."""
    _, (server_id, server_dht, tag), (_, client_dht, _) = peers
    old = info_for(server_id.peer_id, 0, 2)
    assert await announce(server_dht, tag, "moving", old, MODEL, 60)
    joining = info_for(server_id.peer_id, 4, 6, ServerState.JOINING)
    assert await announce(server_dht, tag, "moving", joining, MODEL, 60, blocks=[4, 5])
    found = await find_servers(client_dht, "moving", 8)
    assert [(s.state, s.start_block, s.end_block) for s in found] == [(ServerState.ONLINE, 0, 2)]
    # servers choosing or balancing read where it is going; one read gives both views
    planned = await find_servers(client_dht, "moving", 8, planned=True)
    assert [(s.state, s.start_block, s.end_block) for s in planned] == [(ServerState.JOINING, 4, 6)]
    assert await find_server_views(client_dht, "moving", 8) == (found, planned)
    # once moved: online on the new span, offline on the blocks it left; the online record wins
    assert await announce(server_dht, tag, "moving", info_for(server_id.peer_id, 4, 6), MODEL, 60)
    assert await announce(
        server_dht, tag, "moving", old.model_copy(update={"state": ServerState.OFFLINE}), MODEL, 60
    )
    found = await find_servers(client_dht, "moving", 8)
    assert [(s.state, s.start_block, s.end_block) for s in found] == [(ServerState.ONLINE, 4, 6)]


async def _store_many(_dht, node, keys: list[str], values: list, subkey: bytes, expiration: float) -> dict:
    return await node.store_many(keys, values, expiration, subkeys=[subkey] * len(keys))


async def test_a_record_a_peer_holds_already_is_stored_again_a_little_later(peers):
    """A peer refuses to store a record it already holds, and hivemind answers a store with the last replica's
    word: a copy of a server's record, handed by a peer that stored it to another nearest peer of its key before
    the server's own store reached that one, made servers starting beside each other log "announcing online to
    the DHT failed" in a public swarm. The keys refused are stored again, a millisecond later, which every peer
    takes; here every peer holds the record already (the same record, sent again)."""
    (server_id, server_dht, tag), (_, client_dht, _), _ = peers
    info, expiration = info_for(server_id.peer_id, 0, 2).to_record(), get_dht_time() + 60
    store = partial(
        _store_records,
        dht_prefix="twice",
        blocks=[0, 1],
        subkey=tag,
        info=info,
        model=MODEL.to_record(),
        expiration=expiration,
    )
    assert await server_dht.run_coroutine(store, return_future=True)
    keys = [block_key("twice", 0), block_key("twice", 1), MODELS_KEY]
    values = [info, info, MODEL.to_record()]
    again = partial(_store_many, keys=keys, values=values, subkey=tag, expiration=expiration)
    assert not any((await server_dht.run_coroutine(again, return_future=True)).values())  # what hivemind says
    assert await server_dht.run_coroutine(store, return_future=True)
    found = await find_servers(client_dht, "twice", 2)
    assert [(s.peer_id, s.start_block, s.end_block) for s in found] == [(server_id.peer_id, 0, 2)]
