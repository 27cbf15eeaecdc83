"""What hostile or buggy peers can put in the DHT, read back by real hivemind peers on 127.0.0.1: records that
sign and parse but carry values that would break whoever reads them (a server's balancer, a client's
connections, the monitor)."""

import json
import time

import pytest
from hivemind.utils import get_dht_time
from test_records import dht_peers

from swarmllm.client.directory import Directory
from swarmllm.dht import (
    ModelInfo,
    ServerInfo,
    ServerState,
    announce,
    block_key,
    find_servers,
    visible_maddrs,
)
from swarmllm.dht.info import MAX_PREFIX_CHARS
from swarmllm.dht.records import MODELS_KEY
from swarmllm.monitor.app import Monitor
from swarmllm.monitor.state import swarm_state
from swarmllm.wire import Identity, WireError
from swarmllm.wire.pool import ConnectionPool

NUM_BLOCKS = 4


def record(peer_id: str, start=0, end=NUM_BLOCKS, **fields) -> dict:
    values = {
        "peer_id": peer_id,
        "state": "online",
        "start_block": start,
        "end_block": end,
        "throughput": 10.0,
        "inference_rps": 10.0,
        "forward_rps": 100.0,
        "cache_tokens_left": 1000,
        "version": "test",
        "dtype": "float32",
    }
    return {**values, **fields}


@pytest.fixture(scope="module")
def swarm():
    """A bootstrap peer (also the honest server's), a reader, and two hostile peers with keys of their own."""
    with dht_peers(4) as nodes:
        yield nodes


def store(node, key: str, value, expiration_s: float = 60) -> bool:
    _, dht, tag = node
    return dht.store(key, value, get_dht_time() + expiration_s, subkey=tag)


async def test_announced_direct_addresses_fail_only_as_connection_errors(swarm):
    """A server pings its peers before rebalancing and treats TimeoutError, WireError and OSError as "does not
    answer"; anything else ends its serving loop. A record whose direct address has a port out of range made
    the pool raise OverflowError, so one such record stopped every movable server of the model."""
    _, (_, reader, _), hostile, _ = swarm
    peer_id = hostile[0].peer_id
    tried = []
    for prefix, addr in [
        ("closed", "127.0.0.1:1"),
        ("port-high", "127.0.0.1:99999"),
        ("port-neg", "127.0.0.1:-1"),
    ]:
        for b in range(NUM_BLOCKS):
            assert store(hostile, block_key(prefix, b), record(peer_id, direct_addrs=[addr]))
        pool = ConnectionPool(Identity.generate(), None, connect_timeout_s=1.0)
        for info in await find_servers(reader, prefix, NUM_BLOCKS):
            with pytest.raises((TimeoutError, WireError, OSError)):
                await pool.get(info.peer_id, info.direct_addrs)
            tried.append(prefix)
        await pool.close()
    assert "closed" in tried  # a well-formed address is still read


async def test_absurd_throughputs_keep_the_monitor_document_valid_json(swarm):
    """Two peers announcing the largest finite throughput sum to inf: the monitor's document then held
    Infinity, which is not JSON (the page's JSON.parse refuses the whole document)."""
    (honest, honest_dht, honest_tag), (_, reader, _), *hostile = swarm
    model = ModelInfo(dht_prefix="absurd", num_blocks=NUM_BLOCKS)
    info = ServerInfo.model_validate(record(honest.peer_id))
    assert await announce(honest_dht, honest_tag, "absurd", info, model, 60)
    for node in hostile:
        rates = {"throughput": 1e308, "inference_rps": 1e308, "forward_rps": 1e308}
        for b in range(2):
            assert store(node, block_key("absurd", b), record(node[0].peer_id, 0, 2, **rates))
    servers = await find_servers(reader, "absurd", NUM_BLOCKS)
    assert honest.peer_id in {s.peer_id for s in servers}
    state = swarm_state([model], {"absurd": servers}, {s.peer_id: 0.01 for s in servers}, updated_at=1.0)
    json.dumps(state, allow_nan=False)


async def test_a_registry_entry_with_absurd_block_count_does_not_blind_the_monitor(swarm):
    """One registry entry claiming 100,000 blocks made every refresh look 100,000 keys up: each timed out, so the
    monitor showed no model at all (and a claim of 10**12 blocks built a list of 10**12 keys)."""
    (honest, honest_dht, honest_tag), _, hostile, _ = swarm
    model = ModelInfo(dht_prefix="real", num_blocks=NUM_BLOCKS)
    info = ServerInfo.model_validate(record(honest.peer_id))
    assert await announce(honest_dht, honest_tag, "real", info, model, 60)
    assert store(hostile, MODELS_KEY, {"dht_prefix": "huge", "num_blocks": 100_000})
    directory = Directory([*visible_maddrs(honest_dht)], connect_timeout_s=1.0)
    await directory.start()
    try:
        monitor = Monitor(directory, lookup_timeout_s=5.0)
        began = time.monotonic()
        await monitor.refresh()
        assert monitor.state["dht"]["status"] == "ok", monitor.state["dht"]
        assert time.monotonic() - began < 5.0
        names = {m["name"]: m for m in monitor.state["models"]}
        assert names["real"]["num_blocks"] == NUM_BLOCKS
        assert [s["peer_id"] for s in monitor.state["servers"] if s["model"] == "real"] == [honest.peer_id]
    finally:
        await directory.shutdown()


async def test_a_registry_entry_with_a_long_prefix_does_not_jam_the_monitor(swarm):
    """The look-up of 300 blocks under a 250-character prefix sent its 76 KB of keys through hivemind's pipe into
    the monitor's DHT process, which reads it without blocking: it read part of a message, and no call to it was
    answered again, so every refresh from then on failed. Calls now carry the prefix once, and a registry entry's
    prefix is at most MAX_PREFIX_CHARS long (a longer one is dropped as malformed)."""
    (honest, honest_dht, honest_tag), _, hostile, other_hostile = swarm
    model = ModelInfo(dht_prefix="plain", num_blocks=NUM_BLOCKS)
    info = ServerInfo.model_validate(record(honest.peer_id))
    assert await announce(honest_dht, honest_tag, "plain", info, model, 60)
    long_prefix, too_long = "p" * 250, "q" * (MAX_PREFIX_CHARS + 1)
    assert store(hostile, MODELS_KEY, {"dht_prefix": long_prefix, "num_blocks": 300})
    assert store(other_hostile, MODELS_KEY, {"dht_prefix": too_long, "num_blocks": 1})
    directory = Directory([*visible_maddrs(honest_dht)], connect_timeout_s=1.0)
    await directory.start()
    try:
        monitor = Monitor(directory, lookup_timeout_s=5.0)
        for _ in range(3):  # (the later refreshes ask the same DHT process again)
            await monitor.refresh()
            assert monitor.state["dht"]["status"] == "ok", monitor.state["dht"]
            names = {m["name"]: m for m in monitor.state["models"]}
            assert names[long_prefix]["num_blocks"] == 300 and too_long not in names
            found = [s["peer_id"] for s in monitor.state["servers"] if s["model"] == "plain"]
            assert found == [honest.peer_id]
    finally:
        await directory.shutdown()


async def test_server_states_are_parsed_from_valid_records_only(swarm):
    """Wrong types, absurd values and extra fields: the record is dropped or its extras ignored, never raised."""
    _, (_, reader, _), hostile, _ = swarm
    peer_id = hostile[0].peer_id
    bad = [
        record(peer_id, 3, 3),
        record(peer_id, 3, 1),
        record(peer_id, throughput=-1.0),
        record(peer_id, throughput=float("nan")),
        record(peer_id, inference_rps=float("inf")),
        record(peer_id, start_block="zero"),
        record(peer_id, end_block=NUM_BLOCKS + 1),
        record(peer_id, adapters=5),
        record(peer_id, state="dancing"),
        [1, 2, 3],
        "x" * 10_000,
    ]
    for i, value in enumerate(bad):
        assert store(hostile, block_key(f"bad{i}", 0), value)
        assert await find_servers(reader, f"bad{i}", NUM_BLOCKS) == [], value
    assert store(hostile, block_key("extra", 0), record(peer_id, 0, 1, surprise={"nested": [1]}))
    (found,) = await find_servers(reader, "extra", NUM_BLOCKS)
    assert (found.peer_id, found.state, found.end_block) == (peer_id, ServerState.ONLINE, 1)
