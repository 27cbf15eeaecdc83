"""`ServerInfo` records for client tests that route over given servers (`SwarmClient.use_servers`) without a DHT:
an online server of blocks [start, end), unit speeds, room in its cache; any field can be overridden."""

import contextlib

from swarmllm.dht import ServerInfo, ServerState
from swarmllm.models import load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler
from swarmllm.wire import DirectServer


def online_server(
    peer_id: str, start: int, end: int, *, address: tuple[str, int] | None = None, **fields
) -> ServerInfo:
    values = {
        "peer_id": peer_id,
        "state": ServerState.ONLINE,
        "start_block": start,
        "end_block": end,
        "throughput": 1.0,
        "inference_rps": 1.0,
        "forward_rps": 1.0,
        "cache_tokens_left": 1000,
        "version": "test",
        "dtype": "float32",
        **({"direct_addrs": (f"{address[0]}:{address[1]}",)} if address else {}),
    }
    return ServerInfo(**{**values, **fields})


@contextlib.asynccontextmanager
async def answering_server(checkpoint, identity, blocks: int):
    """A real server of blocks [0, blocks) of `checkpoint` (`RequestHandler` behind a `DirectServer`) under
    `identity`, answering pings and requests while the context lasts."""
    backend = Backend(load_span(str(checkpoint), 0, blocks), cache_tokens=1024)
    server = DirectServer(RequestHandler(backend, dict).handlers(), identity)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
