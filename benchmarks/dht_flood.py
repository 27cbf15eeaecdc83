"""What a crowded block key costs the swarm's readers: one honest server's record under a block key, and a hostile
peer adding N records beside it, either as N subkeys of its one key ("[owner:<its key>]1", "...2": refused since
our peers store one record per owner under a key) or as one record from each of N keys of its own (a host with
many identities: still stored). Per case: the records an honest peer holds under the key, how long a client's
`find_servers` of that block takes (median of the repeats), and whether it still finds the honest server.

    python benchmarks/dht_flood.py [--subkeys 300 3000] [--owners 300 1000] [--repeats 5] [--no-record]

Real hivemind peers on 127.0.0.1: two full peers (the honest server's and the hostile one) and a client peer.
Each hostile record is a server record of the usual size (~0.4 KB, signed).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time
from functools import partial

from common import append_results, markdown_table
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
    find_servers,
    start_dht,
    stop_dht,
    visible_maddrs,
)
from swarmllm.wire import Identity

# bytes of records per call into a DHT's process: it reads its pipe without blocking, and a message over 16 KiB
# can be read half-written, which jams it (see dht/records.py)
CHUNK_BYTES = 8000


def server_record(peer_id: str) -> dict:
    info = ServerInfo(
        peer_id=peer_id,
        state=ServerState.ONLINE,
        start_block=0,
        end_block=1,
        throughput=10.0,
        inference_rps=10.0,
        forward_rps=100.0,
        cache_tokens_left=1000,
        version="bench",
        dtype="float32",
        direct_addrs=("127.0.0.1:40000",),
    )
    return info.to_record()


def signed(owner: Identity, key: str, value: dict, expiration: float) -> tuple[bytes, bytes, float]:
    """(subkey, signed value, expiration) of a record under `owner`'s tag, as its own peer would sign it."""
    tag = RSASignatureValidator(owner.private_key).local_public_key
    record = DHTRecord(
        DHTID.generate(source=key).to_bytes(),
        MSGPackSerializer.dumps(tag),
        MSGPackSerializer.dumps(value),
        expiration,
    )
    signature = owner.private_key.sign(MSGPackSerializer.dumps(dataclasses.astuple(record)))
    return tag, record.value + b"[signature:" + signature + b"]", expiration


async def _call_store(_dht, node, peer: str, key: str, records: list[tuple[bytes, bytes, float]]) -> int:
    stored = await node.protocol.call_store(
        PeerID.from_base58(peer),
        [DHTID.generate(source=key)] * len(records),
        [value for _, value, _ in records],
        [expiration for _, _, expiration in records],
        subkeys=[subkey for subkey, _, _ in records],
    )
    return sum(bool(ok) for ok in stored or [])


async def _store_subkeys(_dht, node, key: str, tag: bytes, count: int, value: dict) -> int:
    expiration = get_dht_time() + 600
    subkeys = [tag + str(i).encode() for i in range(count)]
    stored = await node.store_many([key] * count, [value] * count, expiration, subkeys=subkeys)
    return sum(bool(ok) for ok in stored.values()) if isinstance(stored, dict) else int(bool(stored))


async def _held(_dht, node, key: str) -> int:
    entry = node.protocol.storage.get(DHTID.generate(source=key))
    return 0 if entry is None else sum(1 for _ in entry.value.items())


async def look_ups(reader, prefix: str, honest_id: str, repeats: int) -> tuple[float, bool]:
    times, found_all = [], True
    for _ in range(repeats):
        began = time.perf_counter()
        found = await find_servers(reader, prefix, 1)
        times.append(time.perf_counter() - began)
        found_all &= honest_id in [s.peer_id for s in found]
    return statistics.median(times), found_all


async def run(args: argparse.Namespace) -> list[list[object]]:
    honest, hostile = Identity.generate(), Identity.generate()
    honest_dht, honest_tag = start_dht(honest)
    hostile_dht, hostile_tag = start_dht(hostile, initial_peers=visible_maddrs(honest_dht))
    reader, _ = start_dht(Identity.generate(), initial_peers=visible_maddrs(honest_dht), client_mode=True)
    rows = []
    try:
        cases = [("none", 0)] + [("subkeys of one key", n) for n in args.subkeys]
        cases += [("one record per key, many keys", n) for n in args.owners]
        for i, (how, count) in enumerate(cases):
            prefix = f"flood{i}"
            key = block_key(prefix, 0)
            model = ModelInfo(dht_prefix=prefix, num_blocks=1)
            info = ServerInfo.model_validate(server_record(honest.peer_id))
            await announce(honest_dht, honest_tag, prefix, info, model, 600)
            began = time.perf_counter()
            if how == "subkeys of one key":
                store = partial(
                    _store_subkeys,
                    key=key,
                    tag=hostile_tag,
                    count=count,
                    value=server_record(hostile.peer_id),
                )
                await hostile_dht.run_coroutine(store, return_future=True)
            elif count:
                owners = [Identity.generate() for _ in range(count)]
                expiration = get_dht_time() + 600
                records = [signed(o, key, server_record(o.peer_id), expiration) for o in owners]
                per_call = max(1, CHUNK_BYTES // (len(records[0][0]) + len(records[0][1])))
                for start in range(0, count, per_call):
                    for at in (honest_dht, hostile_dht):
                        chunk = records[start : start + per_call]
                        store = partial(_call_store, peer=str(at.peer_id), key=key, records=chunk)
                        await hostile_dht.run_coroutine(store, return_future=True)
            stored_s = time.perf_counter() - began
            held = await honest_dht.run_coroutine(partial(_held, key=key), return_future=True)
            median_s, found = await look_ups(reader, prefix, honest.peer_id, args.repeats)
            rows.append([how, count, held, f"{stored_s:.1f}", f"{median_s * 1000:.0f}", found])
            print(rows[-1], flush=True)
    finally:
        for dht in (reader, hostile_dht, honest_dht):
            stop_dht(dht)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subkeys", nargs="*", type=int, default=[300, 3000])
    parser.add_argument("--owners", nargs="*", type=int, default=[300, 1000])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    rows = asyncio.run(run(args))
    header = [
        "hostile records are",
        "hostile records sent",
        "records an honest peer holds under the key",
        "seconds to send them",
        "client look-up ms (median)",
        "honest server found",
    ]
    table = markdown_table(header, rows)
    print(table)
    if not args.no_record:
        notes = (
            f"One honest server record under the key, then the hostile ones; {args.repeats} look-ups of the block by "
            "a client peer (`find_servers`) after each case. Peers: the honest server's and the hostile one (full "
            "DHT peers), the client's (client mode), all on 127.0.0.1."
        )
        append_results("A crowded block key: what hostile records cost a look-up", table, notes)


if __name__ == "__main__":
    main()
