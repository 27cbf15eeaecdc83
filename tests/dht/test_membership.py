"""Who may store what, on real hivemind DHT peers (in this process, on 127.0.0.1): owned records only, and in a
private swarm only members' records. What members hold is read from their own storage, not from look-ups."""

from functools import partial

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator
from hivemind.utils import get_dht_time
from test_records import owner_tag, signed_record

from swarmllm.dht import (
    ModelInfo,
    ServerInfo,
    ServerState,
    announce,
    block_key,
    find_servers,
    list_models,
    start_dht,
    visible_maddrs,
)
from swarmllm.dht.info import MAX_RECORD_BYTES
from swarmllm.dht.membership import record_validators
from swarmllm.dht.records import MODELS_KEY
from swarmllm.wire import Identity, SwarmKey

KEY = SwarmKey(b"members only, 32 bytes of secret")
MODEL = ModelInfo(dht_prefix="private", num_blocks=4, repository="local/private")


def info_for(peer_id: str) -> ServerInfo:
    return ServerInfo(
        peer_id=peer_id,
        state=ServerState.ONLINE,
        start_block=0,
        end_block=4,
        throughput=10.0,
        inference_rps=10.0,
        forward_rps=100.0,
        cache_tokens_left=1000,
        version="test",
        dtype="float32",
    )


async def _stored(_dht, node, key_ids: list[bytes]) -> int:
    """How many of these keys this peer holds, in its storage or its cache (runs in the DHT's process)."""
    held = [
        key_id for storage in (node.protocol.storage, node.protocol.cache) for key_id, _ in storage.items()
    ]
    return sum(DHTID.from_bytes(key_id) in held for key_id in key_ids)


async def stored(dht, keys: list[str]) -> int:
    key_ids = [DHTID.generate(source=key).to_bytes() for key in keys]
    return await dht.run_coroutine(partial(_stored, key_ids=key_ids), return_future=True)


@pytest.fixture(scope="module")
def swarm():
    """Two members, an outsider peer (no key) and an outsider client, all joined through the first member."""
    identities = [Identity.generate() for _ in range(4)]
    first, first_tag = start_dht(identities[0], swarm_key=KEY)
    maddrs = visible_maddrs(first)
    second = start_dht(identities[1], initial_peers=maddrs, swarm_key=KEY)
    outsider = start_dht(identities[2], initial_peers=maddrs)
    outsider_client = start_dht(identities[3], initial_peers=maddrs, client_mode=True)
    nodes = {
        "member": (identities[0], first, first_tag),
        "member2": (identities[1], *second),
        "outsider": (identities[2], *outsider),
        "outsider client": (identities[3], *outsider_client),
    }
    yield nodes
    for _, dht, _ in nodes.values():
        dht.shutdown()


async def test_members_announce_and_find_each_other(swarm):
    identity, dht, tag = swarm["member"]
    # not asserted: the result is the last replica's answer, and the outsider peer refuses sealed records
    await announce(dht, tag, "private", info_for(identity.peer_id), MODEL, 60)
    _, reader, _ = swarm["member2"]
    assert [s.peer_id for s in await find_servers(reader, "private", 4)] == [identity.peer_id]
    assert [m.dht_prefix for m in await list_models(reader)] == ["private"]
    # an outsider cannot read members' records either: they are sealed with the swarm key
    _, outsider, _ = swarm["outsider client"]
    assert await find_servers(outsider, "private", 4) == []


@pytest.mark.parametrize("who", ["outsider", "outsider client"])
async def test_outsiders_are_refused_on_every_store(swarm, who):
    identity, dht, tag = swarm[who]
    prefix = f"intruder-{who.replace(' ', '-')}"
    model = ModelInfo(dht_prefix=prefix, num_blocks=4)
    await announce(dht, tag, prefix, info_for(identity.peer_id), model, 60)  # the outsider peer may accept it
    keys = [block_key(prefix, b) for b in range(4)]
    for member in ("member", "member2"):
        _, member_dht, _ = swarm[member]
        assert await stored(member_dht, keys) == 0
        assert prefix not in [m.dht_prefix for m in await list_models(member_dht)]
        assert await find_servers(member_dht, prefix, 4) == []


async def test_unowned_records_are_refused_on_store():
    """In a public swarm too: a record whose subkey names no owner (so carries no signature) is not stored."""
    first, _ = start_dht(Identity.generate())
    writer, writer_tag = start_dht(Identity.generate(), initial_peers=visible_maddrs(first), client_mode=True)
    try:
        expiration = get_dht_time() + 60
        assert not writer.store(
            MODELS_KEY,
            ModelInfo(dht_prefix="unsigned", num_blocks=2).to_record(),
            expiration,
            subkey=b"anyone",
        )
        assert not writer.store("unowned", b"plain value", expiration)
        assert await stored(first, [MODELS_KEY, "unowned"]) == 0
        # an owned, signed registry entry is stored
        assert writer.store(
            MODELS_KEY,
            ModelInfo(dht_prefix="signed", num_blocks=2).to_record(),
            expiration,
            subkey=writer_tag,
        )
        assert [m.dht_prefix for m in await list_models(first)] == ["signed"]
    finally:
        writer.shutdown()
        first.shutdown()


async def _subkeys(_dht, node, key_id: bytes) -> list:
    """The subkeys this peer holds under one key (runs in the DHT's process)."""
    entry = node.protocol.storage.get(DHTID.from_bytes(key_id))
    return [] if entry is None else sorted(subkey for subkey, _ in entry.value.items())


async def _store_padded(_dht, node, key: str, subkey: bytes, size: int) -> bool:
    """Store a record of about `size` bytes (built in the DHT's process: its pipe takes no large arguments)."""
    return await node.store(key, {"pad": "x" * size}, get_dht_time() + 60, subkey=subkey)


async def test_a_peer_stores_one_small_record_per_key():
    """hivemind's signature check only searches a subkey for an owner tag, so one peer could sign any number of
    subkeys under a block key ("[owner:<its key>]1", ...), or a value of megabytes: 3,000 such subkeys made a
    look-up of the block take 1.3 s. Peers now store one record per owner under a key, of at most
    MAX_RECORD_BYTES, and an owned record of that size still goes in."""
    first, first_tag = start_dht(Identity.generate())
    writer, tag = start_dht(Identity.generate(), initial_peers=visible_maddrs(first), client_mode=True)
    key = block_key("crowded", 0)

    def put(subkey: bytes, size: int) -> bool:
        return writer.run_coroutine(partial(_store_padded, key=key, subkey=subkey, size=size))

    try:
        assert put(tag, MAX_RECORD_BYTES - 100)
        assert [put(tag + str(i).encode(), 10) for i in range(3)] == [False] * 3
        assert not put(tag + tag, 10)
        assert not put(tag, MAX_RECORD_BYTES)  # over the bound once the dict is packed
        key_id = DHTID.generate(source=key).to_bytes()
        held = await first.run_coroutine(partial(_subkeys, key_id=key_id), return_future=True)
        assert held == [tag]
    finally:
        writer.shutdown()
        first.shutdown()


def test_an_owner_tag_counts_only_as_its_key_writes_itself():
    """A key parses alike with a comment after it or spaces doubled, and hivemind's pattern matches two tags in a
    row as one: each such subkey signed by its owner passes hivemind's check, and would be one more record of
    the same peer under a key. Ours takes the tag written as the key writes itself, and nothing else."""
    owner, reader = Identity.generate(), Identity.generate()
    ours = CompositeValidator(record_validators(RSASignatureValidator(reader.private_key), None))
    hivemind_alone = RSASignatureValidator(reader.private_key)
    tag = owner_tag(owner)
    key_text = tag[len(b"[owner:") : -1]
    value = info_for(owner.peer_id).to_record()
    assert ours.validate(signed_record(owner, "m.0", value, tag))
    variants = [
        tag + b"1",
        b"[owner:" + key_text + b" comment]",
        b"[owner:" + key_text.replace(b" ", b"  ", 1) + b"]",
        tag + tag,
    ]
    for subkey in variants:
        record = signed_record(owner, "m.0", value, subkey)
        assert hivemind_alone.validate(record), subkey
        assert not ours.validate(record), subkey
    assert not ours.validate(signed_record(owner, "m.0", {"pad": "x" * MAX_RECORD_BYTES}))
