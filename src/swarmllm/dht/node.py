"""Starting a DHT peer whose libp2p identity and record-signing key are one RSA key.

Sharing the key means the peer id others dial is the one derived from the owner tag of every record this peer
signs, which is what lets readers reject announcements made under another peer's name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tempfile
from collections.abc import Sequence
from functools import partial
from typing import NoReturn

import hivemind
import psutil
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import PeerID
from hivemind.utils.multiaddr import Multiaddr

from swarmllm.dht.membership import record_validators
from swarmllm.lifetime import after_exit
from swarmllm.wire.identity import Identity
from swarmllm.wire.swarm_key import SwarmKey


class OwnedDHT(hivemind.DHT):
    """A hivemind DHT whose process ends with the process that started it.

    hivemind's DHT process waits on a pipe it holds both ends of, so it never sees its owner die: a server or client
    killed outright (SIGKILL, the OOM killer, a Jupyter kernel's restart) left its DHT process and that process's
    libp2p daemon running for ever, still answering in the swarm for a peer that is gone. A thread of the DHT process
    watches the owner's pidfd (a process, not the thread that forked: `start_dht` runs on an executor's thread) and,
    once the owner has exited, kills the daemon and exits.
    """

    def __init__(self, *args, **kwargs) -> None:
        self._owner_pid = os.getpid()
        super().__init__(*args, **kwargs)

    def run(self) -> None:
        after_exit(self._owner_pid, _end_children_and_exit, parent=True)
        super().run()


def _end_children_and_exit() -> NoReturn:
    """Kill this process's children (its p2pd) and exit; remove the socket files p2pd listened on, as hivemind does
    when it stops p2pd itself."""
    with contextlib.suppress(psutil.Error):
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                sockets = [
                    arg.removeprefix("-listen=/unix")
                    for arg in child.cmdline()
                    if arg.startswith("-listen=/unix/")
                ]
                child.kill()
                for path in sockets:
                    with contextlib.suppress(OSError):
                        os.unlink(path)
    os._exit(1)


def start_dht(
    identity: Identity,
    *,
    initial_peers: Sequence[str] = (),
    client_mode: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
    announce_host: str | None = None,
    check_identity_free: bool = False,
    swarm_key: SwarmKey | None = None,
) -> tuple[hivemind.DHT, bytes]:
    """A running DHT peer and its owner tag (the subkey under which it announces).

    `check_identity_free` runs hivemind's check that no other peer uses the key (it starts a second p2pd; a
    just-generated key can't be; a server checks by the announcements under its id instead,
    `Server._check_identity_free`).
    With `swarm_key`, the peer stores and reads only records sealed with it (`membership.py`).
    """
    signer = RSASignatureValidator(identity.private_key)
    fd, identity_path = tempfile.mkstemp(prefix="swarmllm-id-")
    os.close(fd)
    os.unlink(identity_path)
    identity.save(identity_path)
    announce = [f"/ip4/{announce_host}/tcp/{port}"] if announce_host and port else None
    try:
        dht = OwnedDHT(
            initial_peers=list(initial_peers),
            start=True,
            client_mode=client_mode,
            record_validators=record_validators(signer, swarm_key),
            identity_path=identity_path,
            host_maddrs=[f"/ip4/{host}/tcp/{port}"],
            announce_maddrs=announce,
            check_if_identity_free=check_identity_free,
        )
    finally:
        os.unlink(identity_path)
    return dht, signer.local_public_key


def stop_dht(dht: hivemind.DHT, grace_s: float = 1.0) -> None:
    """Shut a DHT peer down; kill its process and libp2p daemon where they do not stop by themselves. A frozen
    process ignores hivemind's last resort (SIGTERM), and the exit of this one would wait for it for ever
    (multiprocessing joins its children at exit)."""
    dht.shutdown()
    dht.join(grace_s)
    if dht.is_alive():
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(dht.pid).children(recursive=True):
                child.kill()
        dht.kill()
        dht.join()


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    return [str(addr) for addr in dht.get_visible_maddrs()]


async def _ping_unknown(_dht: hivemind.DHT, node: hivemind.DHTNode, peer_ids: Sequence[PeerID]) -> int:
    unknown = [p for p in peer_ids if p not in node.protocol.routing_table]
    answers = await asyncio.gather(*(node.protocol.call_ping(p) for p in unknown))
    return sum(answer is not None for answer in answers)


async def rejoin(dht: hivemind.DHT, initial_peers: Sequence[str]) -> int:
    """Ping the initial peers that are not in this peer's routing table (how many answered). A peer that stopped
    answering is dropped from it, and nothing else would make us meet it again: a bootstrap peer restarted with
    its identity would stay empty, and clients joining through it would find no server. An answer adds it back,
    and hivemind hands it the records it should hold (`DHTProtocol.update_routing_table`)."""
    peer_ids = list(dict.fromkeys(PeerID.from_base58(Multiaddr(addr)["p2p"]) for addr in initial_peers))
    if not peer_ids:
        return 0
    return await dht.run_coroutine(partial(_ping_unknown, peer_ids=peer_ids), return_future=True)
