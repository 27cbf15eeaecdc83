"""`swarmllm dht`: a DHT peer that holds no blocks, so a swarm has a stable address to join through."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from swarmllm.dht import start_dht, stop_dht, visible_maddrs
from swarmllm.wire import Identity, load_swarm_key


def run_bootstrap(
    initial_peers: list[str],
    *,
    host: str,
    port: int,
    identity_path: str | None,
    swarm_key_path: str | None = None,
    peers_file: str | None = None,
) -> int:
    identity = Identity.load_or_create(identity_path) if identity_path else Identity.generate()
    dht, _ = start_dht(
        identity,
        initial_peers=initial_peers,
        host=host,
        port=port,
        check_identity_free=identity_path is not None,
        swarm_key=load_swarm_key(swarm_key_path),
    )
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    maddrs = visible_maddrs(dht)
    kind = "private swarm (members need its --swarm-key)" if swarm_key_path else "public swarm"
    if peers_file:
        # written whole, then renamed, so a reader never sees half a file
        Path(peers_file + ".tmp").write_text("\n".join(maddrs) + "\n")
        os.replace(peers_file + ".tmp", peers_file)
    print(f"Bootstrap peer of a {kind} is running. Others join with:", flush=True)
    print("  --initial-peers " + " ".join(maddrs), flush=True)
    try:
        stop.wait()
    finally:
        if peers_file:
            Path(peers_file).unlink(missing_ok=True)
        stop_dht(dht)  # (its process and p2pd killed where they do not stop in time)
    return 0
