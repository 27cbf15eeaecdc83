"""Servers that share a host split its CPU cores and each device's memory without the user's help.

Each server registers its process id in a per-host folder of its device ("cpu", "cuda0", ...). A CPU server's
torch thread count is the cores it may use divided by the CPU servers registered there (at least 1): two servers
that each took every core would fight over them (on 2 cores, two tiny-model servers decode 4-5x slower that way
than with one thread each). The count is checked again every 2 s, so a server that starts or leaves re-splits
them soon; `--num-threads` overrides. Memory is split once, when a server sizes its span (`server.memory`).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

REGISTRY = Path(tempfile.gettempdir()) / f"swarmllm-servers-{os.getuid()}"


def host_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def device_folder(device: str) -> Path:
    """The registry of the servers using `device` on this host."""
    return REGISTRY / device.replace(":", "")


def threads_per_server(cores: int, servers: int) -> int:
    return max(1, cores // max(1, servers))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False  # no process's id (os.kill(0, ...) would signal our own process group)
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):  # (OverflowError: past any pid the kernel gives)
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


class HostShare:
    """This server's entry in the host's registry of the servers of one device."""

    def __init__(self, folder: Path, pid: int | None = None):
        self.folder = folder
        self.pid = os.getpid() if pid is None else pid

    def join(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(self.pid)).touch()

    def leave(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.folder / str(self.pid)).unlink()

    def servers(self) -> int:
        """Servers of this device running on this host, this one included; entries of dead processes are
        removed."""
        count = 0
        for entry in self.folder.glob("*"):
            if not entry.name.isdigit():
                continue
            if _alive(int(entry.name)):
                count += 1
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
        return max(count, 1)
