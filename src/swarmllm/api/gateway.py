"""One HTTP app for every model an API serves (`swarmllm api MODEL [MODEL ...]`), as Ollama serves each model it
holds behind one address: a request goes to the model its JSON body names (`model`; Ollama's with or without
`:latest`), its path names (`/v1/models/{model}`) or whose kept response it asks for (`/v1/responses/{id}`);
`/v1/models`, `/api/tags` and `/api/ps` list them all; `/health` is 200 only while every model's blocks are
served; `/metrics` counts them together. A request naming no model it serves goes to the first model's route,
which checks the body as ever and answers with its face's 404 naming every model served.

With API keys (`--api-key`, as vLLM's), every route but `/health` and `/metrics` asks for one.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import Callable, Sequence

from aiohttp import web

from swarmllm.api.app import Api
from swarmllm.api.messages import error_body
from swarmllm.api.schemas import ApiError
from swarmllm.version import __version__

OPEN_PATHS = ("/health", "/metrics")  # answered without an API key, as vLLM's


class Gateway:
    def __init__(self, apis: Sequence[Api], api_keys: Sequence[str] = ()):
        self.apis = list(apis)
        names = [api.engine.name for api in self.apis]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"an API serves one or more models, each under a name of its own, not {names}")
        for api in self.apis:
            api.served = names
        self.api_keys = [key.encode() for key in api_keys]  # any of them, as a bearer token (none: open)

    def app(self) -> web.Application:
        # the engines share one metrics registry (`load_engine(metrics=...)`): the first's is everyone's
        app = web.Application(middlewares=[self.apis[0].engine.metrics.middleware, self._authorized])
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/api/tags", self.tags)
        app.router.add_get("/api/ps", self.running)
        app.router.add_get("/api/version", self.version)
        tables = [api.routes() for api in self.apis]
        for i, (method, path, _) in enumerate(tables[0]):
            handlers = {api.engine.name: table[i][2] for api, table in zip(self.apis, tables, strict=True)}
            app.router.add_route(method, path, self._dispatch(path, handlers))
        return app

    def _dispatch(self, path: str, handlers: dict[str, Callable]) -> Callable:
        first = next(iter(handlers.values()))

        async def handler(request: web.Request) -> web.StreamResponse:
            return await handlers.get(await self._model(request, path), first)(request)

        return handler

    async def _model(self, request: web.Request, path: str) -> str | None:
        """The name of the model a request is for, if it names one."""
        if "model" in request.match_info:
            return request.match_info["model"]
        if "id" in request.match_info:  # a kept response: the model that answered it
            rid = request.match_info["id"]
            return next((api.engine.name for api in self.apis if rid in api.responses.kept), None)
        if request.method != "POST":
            return None
        try:
            data = json.loads(await request.read())  # (aiohttp keeps the body for the handler)
        except (ValueError, RecursionError):
            return None
        name = data.get("model") if isinstance(data, dict) else None
        if not isinstance(name, str):
            return None
        return name.removesuffix(":latest") if path.startswith("/api/") else name

    @web.middleware
    async def _authorized(self, request: web.Request, handler) -> web.StreamResponse:
        """With API keys, every route but OPEN_PATHS needs `Authorization: Bearer KEY` (what OpenAI's and
        Ollama's clients send for an `api_key` or a header) or `x-api-key: KEY` (Anthropic's client); else a 401
        in the face's error format."""
        if not self.api_keys or request.path in OPEN_PATHS:
            return await handler(request)
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else None
        if given is None and "x-api-key" in request.headers:
            given = request.headers["x-api-key"].strip().encode()
        # every key compared in constant time, so the time taken says nothing of how much of one matched
        if given is not None and sum(hmac.compare_digest(given, key) for key in self.api_keys):
            return await handler(request)
        message = "Incorrect or missing API key: send it as 'Authorization: Bearer KEY' or 'x-api-key: KEY'"
        if request.path.startswith("/api/"):  # Ollama's face
            return web.json_response({"error": message}, status=401)
        error = ApiError(401, message, "invalid_request_error", None, "invalid_api_key")
        if request.path.startswith("/v1/messages"):  # Anthropic's
            return web.json_response(error_body(error), status=401)
        return web.json_response(error.body, status=401)

    async def health(self, _request: web.Request) -> web.Response:
        """200 while online servers hold each block of every model (as the DHT says), else 503 with the blocks
        of each model that have none: what a load balancer or a container's health check asks."""
        results = await asyncio.gather(*(api.health() for api in self.apis))
        ok = all(good for good, _ in results)
        models = {api.engine.name: detail for api, (_, detail) in zip(self.apis, results, strict=True)}
        return web.json_response(
            {"status": "ok" if ok else "unavailable", "models": models}, status=200 if ok else 503
        )

    async def metrics(self, _request: web.Request) -> web.Response:
        return self.apis[0].engine.metrics.page()

    async def models(self, _request: web.Request) -> web.Response:
        cards = [api.model_card() for api in self.apis]
        # (OpenAI's list, with Anthropic's paging fields: one page)
        listed = {"has_more": False, "first_id": cards[0]["id"], "last_id": cards[-1]["id"]}
        return web.json_response({"object": "list", "data": cards, **listed})

    async def tags(self, _request: web.Request) -> web.Response:
        return web.json_response({"models": [api.ollama.card() for api in self.apis]})

    async def running(self, _request: web.Request) -> web.Response:
        """`ollama ps`: every model is always loaded (the API's client holds its embeddings and head)."""
        return web.json_response({"models": [{**api.ollama.card(), "size_vram": 0} for api in self.apis]})

    async def version(self, _request: web.Request) -> web.Response:
        return web.json_response({"version": __version__})
