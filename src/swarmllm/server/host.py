"""Servers that share a host split its CPU cores and each device's memory without the user's help.

Each server registers its process id (and the process's start time, so that a dead server's pid that the kernel
gave to another process is not taken for it) in a per-host folder of its device ("cpu", "cuda0", ...). A CPU
server's torch thread count is the cores it may use divided by the CPU servers registered there (at least 1): two
servers that each took every core would fight over them (on 2 cores, two tiny-model servers decode 4-5x slower
that way than with one thread each). The count is checked again every 2 s, so a server that starts or leaves
re-splits them soon; `--num-threads` overrides. Memory is split once, when a server sizes its span
(`server.memory`).
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


def _start_time(pid: int) -> str | None:
    """When process `pid` started (clock ticks since boot, /proc/<pid>/stat's 22nd field); None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:  # no such process, or not on Linux
        return None
    # (counted after the command name, which may hold spaces and parentheses)
    return stat.rpartition(")")[2].split()[19]


def _entry_alive(entry: Path) -> bool:
    """Whether the process that made registry entry `entry` still runs: its pid is alive and, where the entry
    recorded it, started when the entry says (else the pid is another process's now)."""
    pid = int(entry.name)
    if not _alive(pid):
        return False
    try:
        recorded = entry.read_text().strip()
    except FileNotFoundError:  # it left meanwhile
        return False
    except OSError:  # unreadable: its pid is all there is
        recorded = ""
    return not recorded or recorded == (_start_time(pid) or recorded)


class HostShare:
    """This server's entry in the host's registry of the servers of one device."""

    def __init__(self, folder: Path, pid: int | None = None):
        self.folder = folder
        self.pid = os.getpid() if pid is None else pid

    def join(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / str(self.pid)).write_text(_start_time(self.pid) or "")

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
            if _entry_alive(entry):
                count += 1
            else:
                with contextlib.suppress(FileNotFoundError):
                    entry.unlink()
        return max(count, 1)
