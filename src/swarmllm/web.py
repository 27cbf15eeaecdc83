"""Serving an aiohttp application on a socket bound first, for every HTTP page of the project (the monitor, the
API, a server's metrics): binding before anything else starts makes a port in use fail at once, as an OSError
the command line turns into one clear line, and port 0 picks a free port that the caller can print."""

from __future__ import annotations

import socket

from aiohttp import web


def bind(host: str, port: int) -> socket.socket:
    return socket.create_server((host, port))


async def serve_app(app: web.Application, sock: socket.socket, *, cancel_left: bool = False) -> web.AppRunner:
    """Serve `app` on `sock` until the returned runner's `cleanup()`; with `cancel_left`, a requester that leaves
    cancels its handler (aiohttp's default lets it run to its end)."""
    runner = web.AppRunner(app, access_log=None, handler_cancellation=cancel_left)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner
