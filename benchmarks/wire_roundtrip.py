"""Round-trip latency of one hidden state (1x1x4096 fp32 by default) over every way two processes can talk.

The server side runs in a child process (as in a real swarm); the client measures complete round trips:
request out, reply in, tensor decoded. Rows:
  raw TCP echo        asyncio streams echoing the 16 KiB of bytes (the floor for any Python protocol)
  raw TLS echo        the same over TLS 1.3 (the standard library's ssl, as the direct path uses it): the
                      encryption's own cost, next to the row above
  direct unary/stream swarmllm.wire over TLS 1.3 over TCP: Connection.call, and one Stream send+recv per step
  libp2p unary/stream swarmllm.wire over a hivemind P2P binary stream (through both p2pd daemons)
  hivemind unary      hivemind's protobuf unary RPC (call_protobuf_handler, ExpertRequest/serialize_torch_tensor)
  hivemind stream     hivemind's protobuf bidirectional stream, one message each way per step (Petals' pattern)

    python benchmarks/wire_roundtrip.py [--calls 500] [--loop uvloop|asyncio] [--shape 1,1,4096] [--append-results]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from collections.abc import Awaitable, Callable

import torch
import uvloop
from common import append_results
from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from swarmllm.wire import (
    Connection,
    DirectServer,
    Handlers,
    Identity,
    Message,
    connect_direct,
    connect_libp2p,
    serve_libp2p,
)
from swarmllm.wire.tls import client_context, server_context

SUMMARY = (
    "Full round trips (request out, reply in, tensors decoded) from a client process to a server in a child "
    "process on loopback; rows are explained in benchmarks/wire_roundtrip.py."
)
HOST_MADDRS = ["/ip4/127.0.0.1/tcp/0"]


def install_loop(loop: str) -> None:
    if loop == "uvloop":
        uvloop.install()


async def serve(loop_name: str, conn: mp.connection.Connection) -> None:
    """Everything the client will call: a raw echo server, a DirectServer and one P2P with all handlers."""

    async def raw_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(8), "little")
        try:
            while True:
                writer.write(await reader.readexactly(size))
        except asyncio.IncompleteReadError:
            writer.close()

    raw_server = await asyncio.start_server(raw_echo, "127.0.0.1", 0)
    tls_identity = Identity.generate()
    tls_server = await asyncio.start_server(raw_echo, "127.0.0.1", 0, ssl=server_context(tls_identity))

    handlers = Handlers()

    async def echo(request, context):
        return request

    async def echo_stream(opening, incoming, context):
        async for message in incoming:
            yield message

    handlers.add_unary("echo", echo)
    handlers.add_stream("echo_stream", echo_stream)
    identity = Identity.generate()
    direct = DirectServer(handlers, identity)
    await direct.start()

    p2p = await P2P.create(host_maddrs=HOST_MADDRS)
    await serve_libp2p(p2p, handlers)

    async def hivemind_unary(request: runtime_pb2.ExpertRequest, context) -> runtime_pb2.ExpertResponse:
        tensors = [serialize_torch_tensor(deserialize_torch_tensor(t)) for t in request.tensors]
        return runtime_pb2.ExpertResponse(tensors=tensors)

    async def hivemind_stream(requests, context):
        async for request in requests:
            tensors = [serialize_torch_tensor(deserialize_torch_tensor(t)) for t in request.tensors]
            yield runtime_pb2.ExpertResponse(tensors=tensors)

    await p2p.add_protobuf_handler("echo_unary", hivemind_unary, runtime_pb2.ExpertRequest)
    await p2p.add_protobuf_handler(
        "echo_stream", hivemind_stream, runtime_pb2.ExpertRequest, stream_input=True, stream_output=True
    )
    maddrs = [str(m) for m in await p2p.get_visible_maddrs()]
    raw_addresses = [s.sockets[0].getsockname()[:2] for s in (raw_server, tls_server)]
    addresses = (*raw_addresses, direct.address, identity.peer_id)
    conn.send((*addresses, p2p.peer_id.to_base58(), maddrs))
    await asyncio.get_running_loop().run_in_executor(
        None, conn.recv
    )  # returns (or raises EOFError) at shutdown
    await direct.stop()
    tls_server.close()
    await p2p.shutdown()


def server_main(loop_name: str, conn: mp.connection.Connection) -> None:
    install_loop(loop_name)
    try:
        asyncio.run(serve(loop_name, conn))
    except EOFError:
        pass


async def measure(step: Callable[[], Awaitable[None]], calls: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        await step()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        await step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


async def measure_wire(transport: str, connection: Connection, x: torch.Tensor, add: Callable) -> None:
    async def unary_step() -> None:
        reply = await connection.call("echo", Message({"position": 1}, [x]), timeout=10)
        assert reply.tensors[0].shape == x.shape

    await add(f"swarmllm {transport} unary", unary_step)
    stream = await connection.open_stream("echo_stream", Message())

    async def stream_step() -> None:
        await stream.send(Message({"position": 1}, [x]))
        reply = await stream.recv(timeout=10)
        assert reply.tensors[0].shape == x.shape

    await add(f"swarmllm {transport} stream", stream_step)
    await stream.close()
    await connection.close()


async def run_client(args: argparse.Namespace, addresses) -> list[tuple[str, list[float] | str]]:
    raw_address, tls_address, direct_address, direct_peer_id, p2p_peer_id, maddrs = addresses
    x = torch.randn(*args.shape)
    rows: list[tuple[str, list[float] | str]] = []

    async def add(name: str, step: Callable[[], Awaitable[None]]) -> None:
        try:
            rows.append((name, await measure(step, args.calls, args.warmup)))
        except Exception as e:  # e.g. hivemind's unary RPC refuses messages above 4 MiB
            rows.append((name, f"failed: {type(e).__name__}: {str(e)[:80]}"))
        print(f"  {name}: done", file=sys.stderr)

    payload = x.numpy().tobytes()
    for name, address, tls in (
        ("raw TCP echo", raw_address, None),
        ("raw TLS echo", tls_address, client_context()),
    ):
        reader, writer = await asyncio.open_connection(*address, ssl=tls, server_hostname="" if tls else None)
        writer.write(len(payload).to_bytes(8, "little"))

        async def raw_step(reader=reader, writer=writer) -> None:
            writer.write(payload)
            await reader.readexactly(len(payload))

        await add(f"{name} (bytes only)", raw_step)
        writer.close()

    client_p2p = await P2P.create(host_maddrs=HOST_MADDRS, initial_peers=maddrs)
    connections = {
        "direct": await connect_direct(*direct_address, Identity.generate(), expected_peer_id=direct_peer_id),
        "libp2p": await connect_libp2p(client_p2p, p2p_peer_id),
    }
    for transport, connection in connections.items():
        await measure_wire(transport, connection, x, add)

    server_id = PeerID.from_base58(p2p_peer_id)

    async def hivemind_unary_step() -> None:
        request = runtime_pb2.ExpertRequest(tensors=[serialize_torch_tensor(x)])
        reply = await client_p2p.call_protobuf_handler(
            server_id, "echo_unary", request, runtime_pb2.ExpertResponse
        )
        assert deserialize_torch_tensor(reply.tensors[0]).shape == x.shape

    await add("hivemind protobuf unary", hivemind_unary_step)

    requests: asyncio.Queue = asyncio.Queue()

    async def request_stream():
        while (request := await requests.get()) is not None:
            yield request

    responses = await client_p2p.iterate_protobuf_handler(
        server_id, "echo_stream", request_stream(), runtime_pb2.ExpertResponse
    )

    async def hivemind_stream_step() -> None:
        await requests.put(runtime_pb2.ExpertRequest(tensors=[serialize_torch_tensor(x)]))
        reply = await anext(responses)
        assert deserialize_torch_tensor(reply.tensors[0]).shape == x.shape

    await add("hivemind protobuf stream", hivemind_stream_step)
    await requests.put(None)
    await client_p2p.shutdown()
    return rows


def format_table(rows: list[tuple[str, list[float] | str]]) -> str:
    lines = ["| path | median ms | p90 ms | mean ms | min ms |", "| --- | --- | --- | --- | --- |"]
    for name, times in rows:
        if isinstance(times, str):
            lines.append(f"| {name} | {times} | | | |")
            continue
        ordered = sorted(times)
        p90 = ordered[int(0.9 * (len(ordered) - 1))]
        lines.append(
            f"| {name} | {statistics.median(ordered):.3f} | {p90:.3f} | {statistics.fmean(ordered):.3f} "
            f"| {ordered[0]:.3f} |"
        )
    return "\n".join(lines)


def run_roundtrips(*, calls: int, warmup: int, loop: str, shape: tuple[int, ...]) -> list:
    """Every row of the table: the server side in a child process, the client in this one."""
    context = mp.get_context("spawn")
    parent_conn, child_conn = context.Pipe()
    server = context.Process(target=server_main, args=(loop, child_conn), daemon=True)
    server.start()
    child_conn.close()  # so that recv() fails instead of hanging if the server process dies
    try:
        addresses = parent_conn.recv()
        install_loop(loop)
        options = argparse.Namespace(calls=calls, warmup=warmup, shape=shape)
        return asyncio.run(run_client(options, addresses))
    finally:
        parent_conn.close()
        server.join(timeout=30)
        if server.is_alive():
            server.terminate()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=500, help="measured round trips per row")
    parser.add_argument("--warmup", type=int, default=50, help="unmeasured round trips before each row")
    parser.add_argument(
        "--loop", choices=["uvloop", "asyncio"], default="uvloop", help="event loop, both processes"
    )
    parser.add_argument("--shape", type=lambda s: tuple(int(d) for d in s.split(",")), default=(1, 1, 4096))
    parser.add_argument("--append-results", action="store_true", help="append the table to RESULTS.md")
    args = parser.parse_args()

    rows = run_roundtrips(calls=args.calls, warmup=args.warmup, loop=args.loop, shape=args.shape)
    shape = "x".join(map(str, args.shape))
    title = f"{shape} fp32 ({torch.Size(args.shape).numel() * 4} bytes), {args.calls} calls, loop={args.loop}"
    table = format_table(rows)
    print(f"{title}\n{table}")
    if args.append_results:
        append_results(f"Wire round trip: {title}", table)


if __name__ == "__main__":
    main()
