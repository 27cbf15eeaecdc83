"""A network emulator for benchmarks: a loopback TCP proxy in front of each server that delays every byte by half
a round trip each way and caps each direction of each connection at a bandwidth, so a local swarm runs as if its
peers were far apart (the Petals paper's settings: 100 ms round trip, 100 Mbit/s).

A server listens on a private port and announces the proxy's (`swarmllm serve --direct-port Q
--announce-direct-port P`), so everything that dials it over the direct path, clients and the servers pushing to
it, goes through the proxy. Each direction of a connection is a link that sends one chunk at a time at `rate`
and delivers it `delay` after its last byte went out: bytes keep their order, a big message takes its size /
rate, a small one the delay. (The DHT's libp2p traffic is not proxied: it is off the token path.) `--mbit-in`
caps the way into the servers apart (a client with a slow uplink, as home connections are: it also carries the
servers' pushes to each other).

    python benchmarks/netem.py --rtt-ms 100 --mbit 100 [--mbit-in 10] LISTEN:TARGET [LISTEN:TARGET ...]

prints `netem ready` once it listens; `Emulator` starts it as a child process (one process for every link, off
the client's and servers' event loops).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkSpec:
    delay_s: float  # one way
    rate: float | None  # bytes/s, None = unlimited


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, spec: LinkSpec) -> None:
    loop = asyncio.get_running_loop()
    busy_until = 0.0  # when the link finishes sending what it has taken so far
    last = loop.time()
    try:
        while data := await reader.read(1 << 16):
            now = loop.time()
            start = max(now, busy_until)
            busy_until = start + (len(data) / spec.rate if spec.rate else 0.0)
            last = busy_until + spec.delay_s
            loop.call_at(last, _write, writer, data)
    except (ConnectionError, OSError):
        pass
    loop.call_at(max(last, loop.time()), _close, writer)


def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    if not writer.is_closing():
        writer.write(data)


def _close(writer: asyncio.StreamWriter) -> None:
    if not writer.is_closing():
        writer.close()


async def _serve(listen: int, target: int, spec: LinkSpec, spec_in: LinkSpec) -> asyncio.AbstractServer:
    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target)
        except OSError:
            writer.close()
            return
        for w in (writer, up_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(_pump(reader, up_writer, spec_in), _pump(up_reader, writer, spec))

    return await asyncio.start_server(on_connection, "127.0.0.1", listen)


async def _main(pairs: list[tuple[int, int]], spec: LinkSpec, spec_in: LinkSpec) -> None:
    servers = [await _serve(listen, target, spec, spec_in) for listen, target in pairs]
    print("netem ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Emulator:
    """The proxy as a child process: `Emulator(rtt_ms, mbit).start(n)` gives n (listen, target) port pairs; a
    server serves on `--direct-port target --announce-direct-port listen`. `mbit_in`: the way into the servers
    at another rate than `mbit`."""

    def __init__(self, rtt_ms: float, mbit: float | None, mbit_in: float | None = None):
        self.rtt_ms, self.mbit, self.mbit_in = rtt_ms, mbit, mbit_in
        self.proc: subprocess.Popen | None = None
        self.pairs: list[tuple[int, int]] = []

    def start(self, links: int) -> list[tuple[int, int]]:
        self.pairs = [(free_port(), free_port()) for _ in range(links)]
        args = [sys.executable, __file__, "--rtt-ms", str(self.rtt_ms)]
        args += ["--mbit", str(self.mbit)] if self.mbit else []
        args += ["--mbit-in", str(self.mbit_in)] if self.mbit_in else []
        args += [f"{listen}:{target}" for listen, target in self.pairs]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if "netem ready" not in line:
            raise RuntimeError(f"the network emulator did not start: {line!r}")
        return self.pairs

    def server_args(self, i: int) -> list[str]:
        listen, target = self.pairs[i]
        return ["--direct-port", str(target), "--announce-direct-port", str(listen)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def __enter__(self) -> Emulator:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rtt-ms", type=float, default=100.0)
    parser.add_argument("--mbit", type=float, default=None, help="bandwidth per direction (default: no cap)")
    parser.add_argument(
        "--mbit-in", type=float, default=None, help="bandwidth into the servers (default: --mbit)"
    )
    parser.add_argument("pairs", nargs="+", help="LISTEN:TARGET port pairs on 127.0.0.1")
    args = parser.parse_args()
    pairs = [tuple(int(p) for p in pair.split(":")) for pair in args.pairs]
    spec = LinkSpec(args.rtt_ms / 2e3, args.mbit * 1e6 / 8 if args.mbit else None)
    spec_in = LinkSpec(spec.delay_s, args.mbit_in * 1e6 / 8) if args.mbit_in else spec
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(pairs, spec, spec_in))
    else:
        uvloop.run(_main(pairs, spec, spec_in))


if __name__ == "__main__":
    main()
