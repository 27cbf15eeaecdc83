"""Checkpoint folders this project makes itself (the demo model, SmolLM2 from its GGUF file, a GGUF file's
conversion), each made once and shared by every process of the host."""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def built_once(path: Path, build: Callable[[Path], None]) -> Path:
    """Checkpoint folder `path`, made by `build(folder)` the first time: into a folder beside it, renamed into
    place whole (a folder with a config.json is complete), by one process at a time under a lock, while the
    others (servers, tests or demos starting at once) wait for it rather than find half a folder or remove it."""
    if (path / "config.json").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as lock:
        # (released when the file closes, or when a builder dies; a file system without locks, an NFS mount
        # without its lock service, builds unguarded, as before there was a lock)
        with contextlib.suppress(OSError):
            fcntl.flock(lock, fcntl.LOCK_EX)
        if (path / "config.json").exists():  # another process built it while this one waited
            return path
        building = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
        try:
            build(building)
            shutil.rmtree(path, ignore_errors=True)  # what an interrupted build (or an older version) left
            building.rename(path)
        finally:
            shutil.rmtree(building, ignore_errors=True)
    return path
