"""A port for a test to give a process, or to find nothing at: one the kernel does not hand out on its own.

A port taken with bind(("127.0.0.1", 0)) and released is in the kernel's range for outbound connections' own
ports, and any connection opened before the test binds it (another test's client, a server dialling a peer back)
may take it: the process given it then fails with "port in use" (seen once in CI, by `tests/test_compose.py`).
Ports below that range are handed out only to whoever asks for them by number."""

from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST = 10_000


def _outbound_range() -> tuple[int, int]:
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


def free_port() -> int:
    """A port of 127.0.0.1 that nothing listens on now (bound and released), below the outbound range."""
    low = _outbound_range()[0]
    for _ in range(1000):
        port = random.randrange(LOWEST, low) if low > LOWEST else random.randrange(61000, 65536)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use: another
            return port
    raise RuntimeError("no free port below the outbound range")
