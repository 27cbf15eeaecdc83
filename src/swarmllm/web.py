"""Serving an aiohttp application on a socket bound first, for every HTTP page of the project (the monitor, the
API, a server's metrics): binding before anything else starts makes a port in use fail at once, as an OSError
the command line turns into one clear line, and port 0 picks a free port that the caller can print.

Every page is open to slow or hostile requesters, so each request has a bounded time to arrive: its head within
REQUEST_TIMEOUT_S of its connection opening (or of the last answer on a kept-alive connection, which is then
idle), else the connection is closed; its body within REQUEST_TIMEOUT_S of its head, else a 408 and the
connection closed. A body declared past the app's `client_max_size` is a 413 before it is read."""

from __future__ import annotations

import asyncio
import logging
import socket
import sys

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from swarmllm.wire.peer_log import PeerFaultLog

REQUEST_TIMEOUT_S = 10.0  # for a request's head, then for its body; and what a kept-alive connection may idle


def bind(host: str, port: int) -> socket.socket:
    return socket.create_server((host, port))


async def serve_app(app: web.Application, sock: socket.socket, *, cancel_left: bool = False) -> web.AppRunner:
    """Serve `app` on `sock` until the returned runner's `cleanup()`; with `cancel_left`, a requester that leaves
    cancels its handler (aiohttp's default lets it run to its end)."""
    app.middlewares.append(_bounded_body)  # the innermost: the app's own middlewares count and answer first
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=cancel_left,
        keepalive_timeout=REQUEST_TIMEOUT_S,  # aiohttp's also closes a connection whose head is not in by then
        logger=_RequesterErrors(logging.getLogger("aiohttp.server"), {}),
    )
    await runner.setup()
    await web.SockSite(runner, sock).start()
    return runner


@web.middleware
async def _bounded_body(request: web.Request, handler) -> web.StreamResponse:
    """The whole body read before the handler, within REQUEST_TIMEOUT_S (aiohttp waits for one forever)."""
    limit = request.client_max_size  # (0: none)
    if limit and request.content_length is not None and request.content_length > limit:
        raise web.HTTPRequestEntityTooLarge(limit, request.content_length)
    if request.body_exists:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT_S):
                await request.read()  # kept: the handler's read() or json() gets it
        except TimeoutError:
            response = web.Response(
                status=408, text=f"the request's body did not arrive in {REQUEST_TIMEOUT_S} s"
            )
            response.force_close()
            await response.prepare(request)
            await response.write_eof()
            request.protocol.force_close()  # sent as it closes, without waiting for the rest of the body
            return response
    return await handler(request)


class _RequesterErrors(logging.LoggerAdapter):
    """aiohttp's server log, where a request too malformed to parse (a line or a header past the limits, too
    many headers, bad syntax) is one warning line, not an error with a traceback: the requester's fault, and a
    hostile one's would fill the log (so past a few such lines, they are only counted: `PeerFaultLog`)."""

    def __init__(self, logger: logging.Logger, extra: dict):
        super().__init__(logger, extra)
        self.requester_faults = PeerFaultLog(logger)

    def exception(self, msg, *args, exc_info=True, **kwargs) -> None:
        error = sys.exc_info()[1] if exc_info is True else exc_info
        if isinstance(error, HttpProcessingError):
            # aiohttp's message spans lines and quotes the request: one line, its control characters escaped
            why = " ".join(str(error.message).split())
            self.requester_faults.log(
                logging.WARNING, "malformed request", f"{msg % args if args else msg}: {why!r}"
            )
        else:
            super().exception(msg, *args, exc_info=exc_info, **kwargs)
