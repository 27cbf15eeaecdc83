"""DHT keys and the announce / look-up of servers and models.

Layout: one key per (model, block) = "{dht_prefix}.{block}"; under it one subkey per server, the server's
signed owner tag ("[owner:<rsa public key>]"), holding its `ServerInfo`. hivemind's RSASignatureValidator makes
every such record signed by its owner, and readers check that the announced peer id is the one derived from the
owner key, so nobody can announce under another's name. The registry key lists the models a swarm serves.
Every record expires; servers re-announce before it does.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import partial
from typing import Any

import hivemind
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.utils import ValueWithExpiration, get_dht_time
from hivemind.utils.crypto import RSAPublicKey

from swarmllm.dht.info import ModelInfo, ServerInfo, ServerState, parse_model_info, parse_server_info
from swarmllm.wire.identity import peer_id_from_public_key

MODELS_KEY = "_swarmllm.models"
_OWNER_RE = re.compile(RSASignatureValidator.PUBLIC_KEY_REGEX)


def block_key(dht_prefix: str, block: int) -> str:
    return f"{dht_prefix}.{block}"


def owner_peer_id(subkey: Any) -> str | None:
    """The peer id proven by a record's owner tag, or None when the subkey carries no valid key."""
    if not isinstance(subkey, bytes):
        return None
    match = _OWNER_RE.search(subkey)
    if match is None:
        return None
    try:
        return peer_id_from_public_key(RSAPublicKey.from_bytes(match.group(1)))
    except (ValueError, TypeError):
        return None


STORE_TRIES = 3  # stores of the keys refused (see `_store_records`)


# Calls into the DHT's process carry a prefix and block numbers, never lists of keys: hivemind reads its pipe
# without blocking, and a message longer than the pipe holds (64 KiB; over 16 KiB, multiprocessing writes it in two)
# can be read before its end is there. That jams the DHT process for good: after a look-up of 4,096 blocks, or of
# 300 under a registry entry's 250-character prefix, no call to it was answered again. (Prefixes are at most
# MAX_PREFIX_CHARS.)
async def _store_records(
    _dht: hivemind.DHT, node: hivemind.DHTNode, dht_prefix: str, blocks, subkey, info, model, expiration
) -> bool:
    """Whether the last peer each record reached stored it. A peer refuses a record that expires no later than
    the one it holds under that subkey, and hivemind answers a store with the last replica's word. A peer that
    stored ours hands a copy to the key's other nearest peers as it meets them, and the copy may reach one before
    our own store does: refused, though the record is there (servers starting beside each other logged
    "announcing online to the DHT failed" in a public swarm). Only this peer's key signs under its subkey, so the
    keys refused are stored again, expiring a millisecond later, which a copy does not block; a refusal for any
    other cause (a private swarm's outsider) is the same each time."""
    keys = [block_key(dht_prefix, b) for b in blocks] + [MODELS_KEY]
    values = [info] * len(blocks) + [model]
    for _ in range(STORE_TRIES):
        results = await node.store_many(keys, values, expiration, subkeys=[subkey] * len(keys))
        refused = [i for i, key in enumerate(keys) if not results[key, subkey]]
        if not refused:
            return True
        keys, values = [keys[i] for i in refused], [values[i] for i in refused]
        expiration += 1e-3  # (newer than what a peer holds: it replaces the copy)
    return False


async def _get_records(
    _dht: hivemind.DHT, node: hivemind.DHTNode, dht_prefix: str | None, num_blocks: int = 0
) -> dict[str, dict[Any, ValueWithExpiration]]:
    """The records under a model's block keys, or with `dht_prefix` None under the model registry's key."""
    keys = [MODELS_KEY] if dht_prefix is None else [block_key(dht_prefix, b) for b in range(num_blocks)]
    found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
    out: dict[str, dict[Any, ValueWithExpiration]] = {}
    for key, entry in found.items():
        if entry is not None and isinstance(entry.value, dict):
            out[key] = dict(entry.value)
    return out


async def announce(
    dht: hivemind.DHT,
    owner_tag: bytes,
    dht_prefix: str,
    info: ServerInfo,
    model: ModelInfo,
    expiration_s: float,
    blocks: Sequence[int] | None = None,
) -> bool:
    """Write `info` under every block key of its span (or only of `blocks`: a moving server announces its new
    blocks as joining while it still serves the old ones) and the model registry, signed by `owner_tag`'s key."""
    expiration = get_dht_time() + expiration_s
    blocks = range(info.start_block, info.end_block) if blocks is None else list(blocks)
    store = partial(
        _store_records,
        dht_prefix=dht_prefix,
        blocks=blocks,
        subkey=owner_tag,
        info=info.to_record(),
        model=model.to_record(),
        expiration=expiration,
    )
    return await dht.run_coroutine(store, return_future=True)


async def find_servers(
    dht: hivemind.DHT, dht_prefix: str, num_blocks: int, *, planned: bool = False
) -> list[ServerInfo]:
    """Every valid server of a model, one entry per peer (records whose owner doesn't match are dropped): the
    record it serves by, or with `planned` the one of where it is going: a moving server's *joining* record of
    the blocks it loads before its *online* one of those it leaves (what servers balance by; clients route by
    the online one)."""
    online, where_going = await find_server_views(dht, dht_prefix, num_blocks)
    return where_going if planned else online


async def find_server_views(
    dht: hivemind.DHT, dht_prefix: str, num_blocks: int
) -> tuple[list[ServerInfo], list[ServerInfo]]:
    """`find_servers` and `find_servers(planned=True)` from one read of the DHT (a balancing server needs both)."""
    get = partial(_get_records, dht_prefix=dht_prefix, num_blocks=num_blocks)
    found = await dht.run_coroutine(get, return_future=True)
    records = []
    for held in found.values():  # (in block order)
        for subkey, item in held.items():
            info = parse_server_info(item.value)
            if info is None or owner_peer_id(subkey) != info.peer_id or info.end_block > num_blocks:
                continue
            records.append((info, item.expiration_time))
    return _one_per_peer(records, _PREFERENCE), _one_per_peer(records, _PLANNED)


def _one_per_peer(
    records: list[tuple[ServerInfo, float]], preference: dict[ServerState, int]
) -> list[ServerInfo]:
    servers: dict[str, tuple[tuple[int, float], ServerInfo]] = {}
    for info, expiration in records:
        rank = (preference[info.state], -expiration)
        known = servers.get(info.peer_id)
        if known is None or rank < known[0]:
            servers[info.peer_id] = rank, info
    return [info for _, info in servers.values()]


# A server that moved leaves an offline record under the blocks it gave up (until it expires) and an online one
# under its new blocks: the online one is the server. Among records in one state, the latest announced (it
# expires last) is: a server restarted with its identity, or stopped mid-move, leaves online records of its old
# span behind.
_PREFERENCE = {ServerState.ONLINE: 0, ServerState.JOINING: 1, ServerState.OFFLINE: 2}
_PLANNED = {ServerState.JOINING: 0, ServerState.ONLINE: 1, ServerState.OFFLINE: 2}


async def list_models(dht: hivemind.DHT) -> list[ModelInfo]:
    """The models announced in a swarm (deduplicated by DHT prefix)."""
    found = await dht.run_coroutine(partial(_get_records, dht_prefix=None), return_future=True)
    models: dict[str, ModelInfo] = {}
    for subkey, item in found.get(MODELS_KEY, {}).items():
        info = parse_model_info(item.value)
        if info is not None and owner_peer_id(subkey) is not None:
            models.setdefault(info.dht_prefix, info)
    return sorted(models.values(), key=lambda m: m.dht_prefix)


def dht_prefix_for(name_or_path: str) -> str:
    """The DHT prefix of a model: its hub repository name or local folder name (clients derive the same)."""
    name = name_or_path.rstrip("/").split("/")[-1]
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name) or "model"
