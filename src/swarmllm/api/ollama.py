"""Ollama's API beside the OpenAI one (`/api/chat`, `/api/generate`, `/api/embed`, `/api/tags`, `/api/ps`,
`/api/show`, `/api/version`), so tools and clients written for Ollama (its `ollama` Python package, editors, chat
front ends, retrieval pipelines) use the swarm as is.

Each request is translated into the OpenAI request it means (`ChatRequest`, `CompletionRequest` or
`EmbeddingRequest`), so it is
checked, sampled and held to a format exactly as those are, and answered in Ollama's shape: whole, or streamed
as newline-delimited JSON (Ollama's default). Its `options` map to the same sampling fields, with Ollama's
defaults where a request leaves them out (temperature 0.8, top_k 40, top_p 0.9); `repeat_penalty` applies
transformers' rule over the whole text, not Ollama's last 64 tokens, so it is only applied when given.
`format: "json"` holds the answer to a JSON object and a schema to that schema (api/json_schema.py); `tools`
are called in the generic format of api/tools.py, the calls returned with their arguments as objects, as
Ollama does. `/api/embed` truncates an input longer than the context unless `truncate` is false, and returns
vectors of length 1, as Ollama does; its older `/api/embeddings` (one `prompt`) returns the vector as it is,
not normalised, as Ollama's does. Errors are Ollama's `{"error": message}`.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from swarmllm.api.schemas import ApiError, ChatRequest, CompletionRequest, EmbeddingRequest
from swarmllm.api.streams import joined, read_json, stream, validated

DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9}  # Ollama's, for what a request leaves out
OPTIONS = {  # Ollama's option -> the OpenAI (or vLLM) field it means
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


class OllamaError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _error_body(e: OllamaError | ApiError) -> dict:
    return {"error": e.body["error"]["message"] if isinstance(e, ApiError) else str(e)}


def _error(e: OllamaError | ApiError) -> web.Response:
    return web.json_response(_error_body(e), status=e.status)


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _fields(body: dict) -> dict:
    """The OpenAI request fields an Ollama body's `options` and `format` mean."""
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise OllamaError(400, "options must be an object")
    fields = dict(DEFAULTS)
    fields.update({OPTIONS[k]: v for k, v in options.items() if k in OPTIONS and v is not None})
    if options.get("seed") == -1:  # Ollama's default: its sampler draws unseeded
        del fields["seed"]
    predict = options.get("num_predict")
    # unset, -1 or -2 (Ollama's default "infinite" and "fill"): up to the context, also where the OpenAI request
    # it becomes (a raw generate's completions request) would default to a few tokens
    fields["max_tokens"] = predict if isinstance(predict, int) and predict > 0 else None
    fmt = body.get("format")
    if fmt == "json":
        fields["guided_json"] = {"type": "object"}  # any JSON object, as Ollama's JSON mode
    elif isinstance(fmt, dict):
        fields["guided_json"] = fmt
    elif fmt not in (None, ""):
        raise OllamaError(400, 'format must be "json" or a JSON schema')
    return fields


def _unloads(body: dict) -> bool:
    """Whether a request's `keep_alive` is zero (a number of seconds, or a Go duration such as "0s"): with
    nothing to answer, Ollama's "unload the model"."""
    keep_alive = body.get("keep_alive")
    if isinstance(keep_alive, bool):
        return False
    if isinstance(keep_alive, int | float):
        return keep_alive == 0
    zero = r"(0+(\.0*)?(ns|us|µs|ms|s|m|h)?)+"
    return isinstance(keep_alive, str) and re.fullmatch(zero, keep_alive) is not None


def _openai_message(message: dict) -> dict:
    """An Ollama chat message as OpenAI's: its tool calls' arguments as JSON text."""
    out: dict[str, Any] = {"role": message.get("role"), "content": message.get("content") or ""}
    given = message.get("tool_calls") or []
    if not isinstance(given, list) or not all(
        isinstance(c, dict) and isinstance(c.get("function"), dict) for c in given
    ):
        raise OllamaError(
            400, "a message's tool_calls must be a list of objects, each with a function object"
        )
    calls = [c["function"] for c in given]
    if calls:
        out["tool_calls"] = [
            {
                "type": "function",
                "function": {"name": c.get("name"), "arguments": json.dumps(c.get("arguments"))},
            }
            for c in calls
        ]
    return out


class OllamaApi:
    """Ollama's routes over an `Api` (its engine, its checks)."""

    def __init__(self, api):
        self.api, self.engine = api, api.engine

    def routes(self) -> list[tuple[str, str, Callable]]:
        """The routes that answer for this model (a gateway lists the models and the version itself)."""
        return [
            ("POST", "/api/show", self.show),
            ("POST", "/api/chat", self.chat),
            ("POST", "/api/generate", self.generate),
            ("POST", "/api/embed", self.embed),
            ("POST", "/api/embeddings", self.embeddings),  # Ollama's older endpoint
        ]

    def card(self) -> dict:
        details = {"format": "safetensors", "family": self.engine.model.config.model_type}
        return {"name": self.engine.name, "model": self.engine.name, "modified_at": _now(), "size": 0,
                "digest": "", "details": details}  # fmt: skip

    async def show(self, request: web.Request) -> web.Response:
        try:
            body = await read_json(request)
            # (`name`: Ollama's older field)
            self._check_model({"model": body.get("model") or body.get("name")})
        except (OllamaError, ApiError) as e:
            return _error(e)
        template = getattr(self.engine.tokenizer, "chat_template", None) or ""
        arch, config = self.engine.model.config.model_type, self.engine.model.config
        info = {  # Ollama's keys, the numbers prefixed with the architecture (what clients read)
            "general.architecture": arch,
            f"{arch}.context_length": self.engine.context_length,
            f"{arch}.embedding_length": config.hidden_size,
            "context_length": self.engine.context_length,
        }
        return web.json_response(
            {"template": template, "details": self.card()["details"], "model_info": info,
             "capabilities": ["completion", "tools", "embedding"]}
        )  # fmt: skip

    def _check_model(self, body: dict) -> None:
        name = body.get("model")
        if not isinstance(name, str) or name.removesuffix(":latest") != self.engine.name:
            served = ", ".join(f"'{n}'" for n in self.api.served)
            raise OllamaError(404, f"model '{name}' not found (this API serves {served})")

    def _predict(self, ids: list[int], asked) -> int | None:
        """The most tokens to generate: `num_predict`, up to the context (Ollama's is a maximum, not OpenAI's
        max_tokens that must fit); None: up to the context."""
        most = asked.max_new_tokens()
        room = self.engine.context_length - len(ids)
        return most if most is None or room < 1 else min(most, room)

    def _request(self, schema, data: dict):
        """The OpenAI request an Ollama one means, checked as the OpenAI API checks it."""
        return validated(schema, {"model": self.engine.name, **data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await read_json(request)
            self._check_model(body)
            messages = body.get("messages") or []
            if messages == []:  # Ollama's "load a model": nothing to answer
                return _loaded({"message": _assistant("")}, self.engine.name, _unloads(body))
            if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
                raise OllamaError(400, "messages must be a list of objects")
            if any(m.get("images") for m in messages):
                raise OllamaError(400, "images are not supported by this text model")
            fields = {"messages": [_openai_message(m) for m in messages], **_fields(body)}
            chat = self._request(ChatRequest, {**fields, "tools": body.get("tools") or None})
            ids, tools = self.api.chat_ids(chat)
            gen = self.engine.start(ids, self._predict(ids, chat), chat)
        except (OllamaError, ApiError) as e:
            return _error(e)
        if tools is None:
            return await self._answer(request, body, gen, lambda text: {"message": _assistant(text)})

        def called(text: str) -> dict:
            content, calls = tools.parse(text)
            message = _assistant(content or "")
            if calls:
                message["tool_calls"] = [
                    {
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": json.loads(c["function"]["arguments"]),
                        }
                    }
                    for c in calls
                ]
            return {"message": message}

        return await self._answer(request, body, gen, called, at_end=True)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await read_json(request)
            self._check_model(body)
            if body.get("images") or body.get("suffix"):
                raise OllamaError(400, "images and suffix are not supported by this text model")
            if body.get("context"):
                raise OllamaError(400, "context is not supported: send the conversation to /api/chat")
            if body.get("prompt") in (None, ""):  # Ollama's "load a model": nothing to answer
                return _loaded({"response": ""}, self.engine.name, _unloads(body))
            prompt = body.get("prompt") or ""
            if not isinstance(prompt, str) or not prompt:
                raise OllamaError(400, "prompt must be a string of some text")
            if body.get("raw"):  # the prompt as it is
                asked = self._request(CompletionRequest, {"prompt": prompt, **_fields(body)})
                ids = self.engine.tokenizer(prompt)["input_ids"]
            else:  # the model's template around it (and the system message), as Ollama does
                system = body.get("system")
                messages = [{"role": "system", "content": system}] if system else []
                messages.append({"role": "user", "content": prompt})
                asked = self._request(ChatRequest, {"messages": messages, **_fields(body)})
                ids, _ = self.api.chat_ids(asked)
            gen = self.engine.start(ids, self._predict(ids, asked), asked)
        except (OllamaError, ApiError) as e:
            return _error(e)
        return await self._answer(request, body, gen, lambda text: {"response": text})

    async def embed(self, request: web.Request) -> web.Response:
        started = time.perf_counter_ns()
        try:
            body = await read_json(request)
            self._check_model(body)
            if body.get("input") in (None, "", []):  # Ollama's "load a model": no embeddings
                return web.json_response({"model": self.engine.name, "embeddings": []})
            if not isinstance(body.get("input"), str | list):
                raise OllamaError(400, "input must be a string or a list of strings")
            asked = self._request(
                EmbeddingRequest, {"input": body["input"], "dimensions": body.get("dimensions")}
            )
            truncate = True if body.get("truncate") is None else body["truncate"]
            if not isinstance(truncate, bool):
                raise OllamaError(400, "truncate must be true or false")
            ids = self.api.embedding_ids(asked, truncate)
            vectors = await self.engine.embed(ids, asked.dimensions)
        except (OllamaError, ApiError) as e:
            return _error(e)
        return web.json_response(
            {"model": self.engine.name, "embeddings": vectors.tolist(), "load_duration": 0,
             "total_duration": time.perf_counter_ns() - started, "prompt_eval_count": sum(map(len, ids))}
        )  # fmt: skip

    async def embeddings(self, request: web.Request) -> web.Response:
        """Ollama's older endpoint: one `prompt`, its vector not normalised (an empty prompt: an empty one)."""
        try:
            body = await read_json(request)
            self._check_model(body)
            prompt = "" if body.get("prompt") is None else body["prompt"]  # (left out: empty, as Ollama's)
            if not isinstance(prompt, str):
                raise OllamaError(400, "prompt must be a string")
            if not prompt:
                return web.json_response({"embedding": []})
            asked = self._request(EmbeddingRequest, {"input": prompt})
            ids = self.api.embedding_ids(asked, truncate=True)
            (vector,) = await self.engine.embed(ids, None, normalize=False)
        except (OllamaError, ApiError) as e:
            return _error(e)
        return web.json_response({"embedding": vector.tolist()})

    async def _answer(
        self, request: web.Request, body: dict, gen, part: Callable[[str], dict], at_end: bool = False
    ) -> web.StreamResponse:
        """Ollama's answer: streamed (its default) as one JSON line per piece, `part(text)`, and a last line
        with `done` and the counts; or whole, as that last line with all the text. `at_end`: the text is sent
        only once whole, in the last line (tool calls are known only then)."""
        started = time.perf_counter_ns()

        def line(text: str, done: bool) -> dict:
            out = {"model": self.engine.name, "created_at": _now(), **part(text), "done": done}
            if done:
                spent = time.perf_counter_ns() - started
                out.update(done_reason=gen.finish_reason, total_duration=spent, load_duration=0,
                           prompt_eval_count=gen.prompt_tokens, prompt_eval_duration=0,
                           eval_count=gen.completion_tokens, eval_duration=spent)  # fmt: skip
            return out

        if body.get("stream") is not None and not body["stream"]:  # (null: the default, streamed)
            try:
                (whole,) = await joined([gen])
            except ApiError as e:
                return _error(e)
            return web.json_response(line(whole.text, True))
        sent: list[str] = []

        async def chunks() -> AsyncIterator[bytes]:
            async for piece in gen.text():
                sent.append(piece.text)
                if not at_end:
                    yield _line(line(piece.text, False))

        def last() -> bytes:
            return _line(line("".join(sent) if at_end else "", True))

        headers = {"Content-Type": "application/x-ndjson"}
        return await stream(request, [gen], headers, chunks(), lambda e: _line(_error_body(e)), last)


def _line(data: dict) -> bytes:
    return json.dumps(data).encode() + b"\n"


def _loaded(part: dict, model: str, unload: bool = False) -> web.Response:
    """Ollama's answer to a request to load the model (held by the swarm already), or with `keep_alive` 0 to
    unload it (the swarm's servers keep it): done at once."""
    reason = "unload" if unload else "load"
    return web.json_response(
        {"model": model, "created_at": _now(), **part, "done": True, "done_reason": reason}
    )


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}
