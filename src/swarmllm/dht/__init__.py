"""The swarm's shared directory on a hivemind DHT.

- `info`: ServerInfo / ModelInfo, the records servers announce;
- `records`: DHT keys, announce and look-up (signed records, owner checks);
- `node`: starting a DHT peer whose libp2p identity is its record-signing key, meeting its initial peers again,
  stopping it.
"""

from swarmllm.dht.info import ModelInfo, ServerInfo, ServerState, parse_model_info, parse_server_info
from swarmllm.dht.node import rejoin, start_dht, stop_dht, visible_maddrs
from swarmllm.dht.records import (
    MODELS_KEY,
    announce,
    block_key,
    find_server_views,
    find_servers,
    list_models,
    owner_peer_id,
)

__all__ = [
    "MODELS_KEY",
    "ModelInfo",
    "ServerInfo",
    "ServerState",
    "announce",
    "block_key",
    "find_server_views",
    "find_servers",
    "list_models",
    "owner_peer_id",
    "parse_model_info",
    "parse_server_info",
    "rejoin",
    "start_dht",
    "stop_dht",
    "visible_maddrs",
]
