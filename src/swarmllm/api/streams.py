"""Answering an HTTP requester from generations, for both faces (OpenAI's, api/app.py, and Ollama's,
api/ollama.py): a request's JSON body read and checked, the generations' pieces joined or merged as they come,
and a streamed response that carries a failure of the swarm in itself and cancels the generations when the
requester leaves."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aiohttp import web
from pydantic import ValidationError

from swarmllm.api.generation import Piece
from swarmllm.api.schemas import ApiError, validation_error

if TYPE_CHECKING:
    from swarmllm.api.app import Generation


async def read_json(request: web.Request) -> dict:
    """The request's body, a JSON object (else a 400)."""
    try:
        data = await request.json()
    # (ValueError: JSON's, a text's decoding or an integer of too many digits; LookupError: an unknown charset)
    except (ValueError, LookupError, RecursionError):
        raise ApiError(400, "The request body is not valid JSON", "invalid_request_error") from None
    if not isinstance(data, dict):
        raise ApiError(400, "The request body must be a JSON object", "invalid_request_error")
    return data


def validated(schema, data: dict):
    """`data` as the request model `schema`, or a 400 naming the first parameter at fault."""
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        body = validation_error(e)["error"]
        raise ApiError(400, body["message"], body["type"], body["param"], body["code"]) from None


def swarm_error(e: BaseException) -> ApiError:
    return ApiError(
        503, f"the swarm could not serve this request: {e}", "server_error", None, "swarm_unavailable"
    )


def _cancel(gens: list[Generation]) -> None:
    for gen in gens:
        gen.cancelled = True  # each stops at its next token
        if (abort := gen.abort) is not None:  # (before its first: at once)
            abort()


async def joined(gens: list[Generation]) -> list[Piece]:
    """Each generation's pieces joined into one; a failure of the swarm as a 503 (`ApiError`)."""
    out = []
    try:
        for gen in gens:  # (they all run meanwhile, each in its worker thread)
            pieces = [piece async for piece in gen.text()]
            out.append(Piece("".join(p.text for p in pieces), [e for p in pieces for e in p.logprobs]))
    except asyncio.CancelledError:  # the requester left (its handler is cancelled): stop generating for it
        _cancel(gens)
        raise
    except Exception as e:  # noqa: BLE001 - the swarm's failure
        _cancel(gens)
        raise swarm_error(e) from None
    return out


async def merged(gens: list[Generation]) -> AsyncIterator[tuple[int, Piece | None]]:
    """(i, piece) as the generations' pieces come, and (i, None) when generation i has ended; raises the first
    error of any."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for piece in gen.text():
                queue.put_nowait((i, piece))
            queue.put_nowait((i, None))
        except Exception as e:  # noqa: BLE001 - handed to the reader
            queue.put_nowait((i, e))

    tasks = [asyncio.create_task(pump(i, gen)) for i, gen in enumerate(gens)]
    ended = 0
    try:
        while ended < len(gens):
            i, item = await queue.get()
            if isinstance(item, Exception):
                raise item
            ended += item is None
            yield i, item
    finally:
        for task in tasks:
            task.cancel()


async def stream(
    request: web.Request,
    gens: list[Generation],
    headers: dict[str, str],
    chunks: AsyncIterator[bytes],
    failure: Callable[[ApiError], bytes],
    trailer: Callable[[], bytes],
) -> web.StreamResponse:
    """Each of `chunks` as it comes, then `trailer()` (made once they are all sent). Once the stream has
    started, a failure of the swarm goes in it as `failure(error)`; a requester that leaves cancels the
    generations."""
    response = web.StreamResponse(headers=headers)
    try:
        await response.prepare(request)  # (a requester gone already fails here)
        try:
            async for chunk in chunks:
                await response.write(chunk)
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as e:  # noqa: BLE001 - the stream has started: the error goes in it
            _cancel(gens)
            await response.write(failure(swarm_error(e)))
            return response
        await response.write(trailer())
    except ConnectionResetError:  # the requester left: stop generating for it (no error: nobody to tell)
        _cancel(gens)
    except asyncio.CancelledError:
        _cancel(gens)
        raise
    return response
