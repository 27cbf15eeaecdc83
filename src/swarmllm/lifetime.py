"""Ending a process with the process it serves (its owner), which may die without a word: SIGKILL, the OOM
killer, a crash, a test runner's worker killed at its timeout. Nothing tells the processes it started: hivemind's
DHT process and the servers of a `LocalSwarm` (each in a session of its own) ran on for ever.
"""

from __future__ import annotations

import os
import select
import threading
import time
from collections.abc import Callable

OWNER_ENV = "SWARMLLM_OWNER_PID"  # a `swarmllm` command started for a LocalSwarm stops when this process ends


def after_exit(owner: int, then: Callable[[], object], *, parent: bool, poll_s: float = 1.0) -> None:
    """Call `then` on a daemon thread once process `owner` has exited (at once if it has). The owner's pidfd
    names it and no process that takes its pid later; without pidfds (Linux < 5.3) its pid is polled, and with
    `parent` (the owner forked this process) a parent that is no longer `owner` says it has gone."""
    try:
        pidfd: int | None = os.pidfd_open(owner)
        gone = False
    except ProcessLookupError:
        pidfd, gone = None, True
    except OSError:
        pidfd, gone = None, False
    # (a pidfd opened after the owner died names whatever process took its pid)
    gone = gone or (parent and os.getppid() != owner)

    def alive() -> bool:
        if parent:
            return os.getppid() == owner
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass  # (someone else's process took its pid: it is not ours to signal, but it runs)
        return True

    def watch() -> None:
        if not gone:
            if pidfd is None:
                while alive():
                    time.sleep(poll_s)
            else:
                select.select([pidfd], [], [])
        then()

    threading.Thread(target=watch, name="swarmllm-owner-watch", daemon=True).start()
