"""One background event loop per client process, so synchronous user code (generate, forward) can drive the
asynchronous swarm: each call hands a coroutine to the loop thread and waits for its result."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import threading
import weakref
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

CANCEL_WAIT_S = 10.0  # how long a caller that stopped waiting waits for its coroutine's cancellation
EXIT_SHUTDOWN_S = 8.0  # what the owners left running get at exit to shut down (a DHT process takes ~1 s)
_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_at_exit: weakref.WeakSet = weakref.WeakSet()


def shut_down_at_exit(owner) -> None:
    """`await owner.shutdown()` on the loop at exit, unless `forget_at_exit(owner)` came first: a client left
    running at exit (or dropped, its finalizer's shutdown not yet done) still ends its DHT process and libp2p
    daemon cleanly. Killed with the interpreter, they left their socket files in /tmp, one per run. Only
    owners running on this loop (the monitor's run on a loop of their own)."""
    if asyncio.get_running_loop() is _loop:
        _at_exit.add(owner)


def forget_at_exit(owner) -> None:
    _at_exit.discard(owner)


def event_loop() -> asyncio.AbstractEventLoop:
    global _loop
    with _lock:
        if _loop is None or _loop.is_closed():
            try:
                import uvloop

                loop = uvloop.new_event_loop()
            except ImportError:
                loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="swarmllm-client-loop", daemon=True).start()
            atexit.register(_stop, loop)
            _loop = loop
        return _loop


def _stop(loop: asyncio.AbstractEventLoop) -> None:
    """At exit, cancel what still runs on the loop (e.g. libp2p control tasks) so nothing dies mid-flight."""

    async def cancel_all() -> None:
        if owners := list(_at_exit):
            await asyncio.wait(
                [asyncio.ensure_future(owner.shutdown()) for owner in owners], timeout=EXIT_SHUTDOWN_S
            )
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    if loop.is_running():
        try:
            asyncio.run_coroutine_threadsafe(cancel_all(), loop).result(timeout=EXIT_SHUTDOWN_S + 5)
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass
        loop.call_soon_threadsafe(loop.stop)


def run_sync(coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
    """Run a coroutine on the client loop from any other thread and return its result. If the caller stops
    waiting (Ctrl-C, `timeout`), the coroutine is cancelled and its cancellation waited for (at most
    `CANCEL_WAIT_S`): run on behind the caller's back, it would, e.g., step a session that the caller uses next."""
    loop = event_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        coro.close()
        raise RuntimeError("run_sync was called from the client loop itself; await the coroutine instead")
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        return future.result(timeout)
    except BaseException:
        if not future.done() or future.cancelled():
            _cancel(coro, loop)
        raise


def _cancel(coro: Coroutine, loop: asyncio.AbstractEventLoop) -> None:
    """Cancel the task running `coro` on the client loop and wait until it has ended."""

    async def cancel() -> None:
        # (the task exists by now: the loop made it before it runs this, which was scheduled after it)
        tasks = [t for t in asyncio.all_tasks() if t.get_coro() is coro]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    with contextlib.suppress(Exception):
        asyncio.run_coroutine_threadsafe(cancel(), loop).result(CANCEL_WAIT_S)
