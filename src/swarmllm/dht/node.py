"""Starting a DHT peer whose libp2p identity and record-signing key are one RSA key.

Sharing the key means the peer id others dial is the one derived from the owner tag of every record this peer
signs, which is what lets readers reject announcements made under another peer's name.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import hivemind
from hivemind.dht.crypto import RSASignatureValidator

from swarmllm.dht.membership import record_validators
from swarmllm.wire.identity import Identity
from swarmllm.wire.swarm_key import SwarmKey


def start_dht(
    identity: Identity,
    *,
    initial_peers: Sequence[str] = (),
    client_mode: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
    announce_host: str | None = None,
    fresh_identity: bool = True,
    swarm_key: SwarmKey | None = None,
) -> tuple[hivemind.DHT, bytes]:
    """A running DHT peer and its owner tag (the subkey under which it announces).

    `fresh_identity` skips hivemind's check that no other peer uses the key (a just-generated key can't be).
    With `swarm_key`, the peer stores and reads only records sealed with it (`membership.py`).
    """
    signer = RSASignatureValidator(identity.private_key)
    fd, identity_path = tempfile.mkstemp(prefix="swarmllm-id-")
    os.close(fd)
    os.unlink(identity_path)
    identity.save(identity_path)
    announce = [f"/ip4/{announce_host}/tcp/{port}"] if announce_host and port else None
    try:
        dht = hivemind.DHT(
            initial_peers=list(initial_peers),
            start=True,
            client_mode=client_mode,
            record_validators=record_validators(signer, swarm_key),
            identity_path=identity_path,
            host_maddrs=[f"/ip4/{host}/tcp/{port}"],
            announce_maddrs=announce,
            check_if_identity_free=not fresh_identity,
        )
    finally:
        os.unlink(identity_path)
    return dht, signer.local_public_key


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]
