"""A real `swarmllm serve` process under peers that declare huge frames and stall, or open too many
connections: its memory stays bounded and it drops them within the configured deadlines."""

import asyncio
import json
import struct

import psutil
import pytest
import torch

from swarmllm.local import LocalSwarm
from swarmllm.wire import ConnectionLost, Identity, Kind, Message, RemoteError, connect_direct
from swarmllm.wire.direct import _client_handshake
from swarmllm.wire.tls import client_context

pytestmark = pytest.mark.asyncio(loop_scope="module")

BOUND = 20
FRAME_TIMEOUT_S = 2.0
MIN_FRAME_RATE = 1e9  # so a 1 GiB frame's deadline is 2 s + 1.07 s
GiB = 1 << 30
RSS_BOUND = 64 << 20
_HEADER = struct.Struct("<2sBBBBQIIQ")


def declaration(method: str, payload_len: int) -> bytes:
    """A REQUEST frame's header and head for one uint8 tensor of `payload_len` bytes, without the payload."""
    name = method.encode()
    desc = struct.pack("<BBQ", 9, 1, payload_len)
    return _HEADER.pack(b"SW", 1, Kind.REQUEST, len(name), 1, 1, 0, len(desc), payload_len) + name + desc


@pytest.fixture(scope="module")
def server(llama_checkpoint):
    with LocalSwarm() as swarm:
        record = swarm.add_server(
            str(llama_checkpoint),
            (0, 2),
            extra=[
                "--new-swarm",
                "--throughput",
                "100",
                "--bandwidth",
                "1000",
                "--frame-timeout",
                str(FRAME_TIMEOUT_S),
                "--min-frame-rate",
                str(MIN_FRAME_RATE),
                "--max-connections-per-peer",
                "2",
            ],
        )
        host, port = record["direct"].rsplit(":", 1)
        yield psutil.Process(swarm.servers[0].proc.pid), (host, int(port))


async def test_stalled_1gib_declarations_cost_no_memory_and_are_dropped_in_time(server):
    process, (host, port) = server
    peers = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection(host, port, ssl=client_context(), server_hostname="")
        await _client_handshake(reader, writer, Identity.generate(), None, None)
        peers.append((reader, writer))
    rss_before = process.memory_info().rss
    loop = asyncio.get_running_loop()
    began = loop.time()
    # every method's cap is far below 1 GiB on this server, so these payloads are read and dropped as they
    # arrive (tests/wire/test_limits.py covers a method that may take them: the buffer grows as bytes arrive)
    peers[0][1].write(declaration("forward", GiB) + bytes(1 << 20))
    peers[1][1].write(declaration("inference", GiB))
    peak = rss_before
    closing = [asyncio.ensure_future(asyncio.wait_for(r.read(), BOUND)) for r, _ in peers]
    while not all(task.done() for task in closing):
        peak = max(peak, process.memory_info().rss)
        await asyncio.wait(closing, timeout=0.05)
    took = loop.time() - began
    deadline = FRAME_TIMEOUT_S + GiB / MIN_FRAME_RATE
    assert peak - rss_before < RSS_BOUND
    assert deadline - 0.2 < took < deadline + 2.0
    for task in closing:
        assert b"frame_timeout" in task.result()
    for _, writer in peers:
        writer.close()


async def test_per_method_caps_and_per_peer_connection_caps(server, llama_checkpoint):
    _, (host, port) = server
    identity = Identity.generate()
    first = await connect_direct(host, port, identity, expected_peer_id=None)
    second = await connect_direct(host, port, identity, expected_peer_id=None)
    third = await connect_direct(host, port, identity, expected_peer_id=None)
    with pytest.raises(ConnectionLost, match="too_many_connections"):
        await asyncio.wait_for(third.call("info", Message()), BOUND)
    info = await first.call("info", Message())
    assert json.loads(json.dumps(info.meta))  # plain data
    with pytest.raises(RemoteError, match="too_large"):
        await first.call("info", Message(tensors=[torch.zeros(8)]))
    too_many_tokens = torch.zeros(1, 16385, 64)  # forward carries at most 16384 tokens of 64 floats
    with pytest.raises(RemoteError, match="too_large"):
        await second.call("forward", Message({"start": 0, "end": 2}, [too_many_tokens]))
    reply = await second.call("forward", Message({"start": 0, "end": 2}, [torch.zeros(1, 3, 64)]))
    assert reply.tensors[0].shape == (1, 3, 64)
    for conn in (first, second, third):
        await conn.close()
