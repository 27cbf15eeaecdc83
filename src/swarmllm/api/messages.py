"""Anthropic's Messages API beside OpenAI's (`POST /v1/messages`, `POST /v1/messages/count_tokens`): what the
official `anthropic` client's `messages.create`, `messages.stream` and `messages.count_tokens` speak, and what
tools built on it send (Claude Code, pointed here by `ANTHROPIC_BASE_URL`), as Ollama and vLLM serve it.

Each request is translated into the chat request it means (`ChatRequest`), so it is checked, sampled and held to a
format exactly as chat is: `system` (a text or text blocks) as the system message, then `messages`, whose content is
a text or blocks: text, an assistant's `tool_use` (a call) and a user's `tool_result` (a call's output), a last
assistant message of text being a prefill that the answer continues; `max_tokens` (required; an answer that reaches
the model's context first ends there, with the stop reason `model_context_window_exceeded`, as Anthropic's),
`stop_sequences`, custom `tools` (their `input_schema` as the parameters), `tool_choice` (auto, any, a named tool,
none; `disable_parallel_tool_use`), `output_config.format` (structured output: the answer held to a JSON schema,
what the client's `messages.parse` sends), and the sampling fields the client no longer sends but older clients and
raw requests do (`temperature`, `top_p`, `top_k`; and vLLM's extras). The answer is a text block or `tool_use`
blocks, with `stop_reason` end_turn, max_tokens, stop_sequence (and the one met), tool_use or
model_context_window_exceeded, and usage as Anthropic counts it: `input_tokens` the prompt's tokens the servers
computed, `cache_read_input_tokens` those they held already or copied (`server.prefix`). Streamed, the events are
Anthropic's: message_start, content_block_start, ping, a content_block_delta per piece (text_delta; a tool call's
input_json_delta, sent once the answer is whole), content_block_stop, message_delta (the stop reason and usage),
message_stop; a failure once the stream has started is an `error` event. Errors are Anthropic's JSON. Ignored:
`cache_control` marks (the servers' prefix caches need none), `thinking` and `output_config.effort` (the answer has
no thinking blocks, as a model's that did not think), and the fields that steer Anthropic's service (`metadata`,
`service_tier`, `speed`, `inference_geo`, ...). Not supported (a 400): image, document and thinking blocks in the
messages, server tools, MCP servers.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from aiohttp import web

from swarmllm.api.schemas import ApiError, ChatRequest
from swarmllm.api.streams import joined, read_json, stream, validated
from swarmllm.api.tools import ToolCalling

# Anthropic's error types by HTTP status (anything else of 5xx: api_error)
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}
# fields passed to the chat request under chat's name (Anthropic's own, and vLLM's sampling extras)
PASSED = {
    "max_tokens": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
    "stop_sequences": "stop", "min_p": "min_p", "seed": "seed", "repetition_penalty": "repetition_penalty",
    "frequency_penalty": "frequency_penalty", "presence_penalty": "presence_penalty", "min_tokens": "min_tokens",
    "ignore_eos": "ignore_eos", "stop_token_ids": "stop_token_ids", "logit_bias": "logit_bias",
}  # fmt: skip
UNSUPPORTED = ("mcp_servers", "container")


def error_body(e: ApiError) -> dict:
    """An `ApiError` as Anthropic's error JSON."""
    kind = ERROR_TYPES.get(e.status, "api_error" if e.status >= 500 else "invalid_request_error")
    return {"type": "error", "error": {"type": kind, "message": e.body["error"]["message"]}}


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", "invalid_request_error", param)


def _block_text(content: Any, where: str) -> str:
    """A text, or text blocks joined (what a system prompt and a tool's result are)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str) for b in content
    ):
        return "".join(b["text"] for b in content)
    raise _bad("must be a text or a list of text blocks (only text is supported)", where)


def _message(message: Any, i: int) -> list[dict]:
    """The chat messages one Anthropic message means: a user's tool results each a tool message (before its
    text), an assistant's tool_use blocks its tool calls."""
    where = f"messages.{i}"
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        raise _bad("must be a message whose role is user or assistant", where)
    role, content = message["role"], message.get("content")
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise _bad("content must be a text or a list of content blocks", f"{where}.content")
    texts: list[str] = []
    results: list[dict] = []
    calls: list[dict] = []
    for j, block in enumerate(content):
        kind = block.get("type") if isinstance(block, dict) else None
        at = f"{where}.content.{j}"
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not isinstance(block.get("input"), dict):
                raise _bad("a tool_use block needs a name and an input object", at)
            arguments = json.dumps(block["input"])
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block["name"], "arguments": arguments},
                }
            )
        elif kind == "tool_result" and role == "user":
            output = _block_text(block.get("content", ""), f"{at}.content")
            results.append({"role": "tool", "content": output})
        else:
            raise _bad(
                f"content blocks of type {kind!r} are not supported here (text; tool_use from the assistant, "
                "tool_result from the user)",
                at,
            )
    if role == "assistant":
        return [{"role": "assistant", "content": "".join(texts), **({"tool_calls": calls} if calls else {})}]
    return [*results, *([{"role": "user", "content": "".join(texts)}] if texts or not results else [])]


def chat_messages(body: dict) -> list[dict]:
    """The chat conversation a request's `system` and `messages` mean."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("must be a non-empty list of messages", "messages")
    out = [m for i, message in enumerate(messages) for m in _message(message, i)]
    system = body.get("system")
    if system is not None and (text := _block_text(system, "system")):
        out.insert(0, {"role": "system", "content": text})
    return out


def chat_tools(tools: Any) -> list | None:
    """Custom tools as chat nests them (`input_schema` as the function's parameters)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type", "custom") != "custom" or "name" not in tool:
            raise _bad("only custom tools (a name and an input_schema) are supported", f"tools.{i}")
        fields = {"name": tool["name"], "parameters": tool.get("input_schema", {"type": "object"})}
        if tool.get("description") is not None:
            fields["description"] = tool["description"]
        out.append({"type": "function", "function": fields})
    return out


def response_format(config: Any) -> dict | None:
    """`output_config.format` (structured output: a JSON schema the answer is held to) as chat's
    `response_format`."""
    if config is None:
        return None
    fmt = config.get("format") if isinstance(config, dict) else "?"
    if fmt is None:
        return None
    if (
        not isinstance(fmt, dict)
        or fmt.get("type") != "json_schema"
        or not isinstance(fmt.get("schema"), dict)
    ):
        raise _bad("format must be an object of type json_schema with a schema", "output_config")
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt["schema"]}}


def chat_tool_choice(choice: Any) -> tuple[Any, bool]:
    """(chat's tool_choice, parallel_tool_calls) for Anthropic's `tool_choice`."""
    if choice is None:
        return None, True
    kind = choice.get("type") if isinstance(choice, dict) else None
    parallel = not (isinstance(choice, dict) and choice.get("disable_parallel_tool_use"))
    if kind == "tool":
        return {"type": "function", "function": {"name": choice.get("name")}}, parallel
    if kind in ("auto", "any", "none"):
        return {"auto": "auto", "any": "required", "none": "none"}[kind], parallel
    raise _bad("must be an object whose type is auto, any, tool or none", "tool_choice")


class MessagesApi:
    """The Messages routes over an `Api` (its engine, its checks)."""

    def __init__(self, api):
        self.api, self.engine = api, api.engine

    def routes(self) -> list[tuple[str, str, Callable]]:
        return [
            ("POST", "/v1/messages", self.create),
            ("POST", "/v1/messages/count_tokens", self.count_tokens),
        ]

    def _chat(self, body: dict, counting: bool = False) -> ChatRequest:
        """The chat request an Anthropic request means (counting tokens: no max_tokens needed)."""
        for name in UNSUPPORTED:
            if body.get(name):
                raise _bad("is not supported by this API", name)
        if not counting and body.get("max_tokens") is None:
            raise _bad("Field required", "max_tokens")
        choice, parallel = chat_tool_choice(body.get("tool_choice"))
        fields = {ours: body[theirs] for theirs, ours in PASSED.items() if body.get(theirs) is not None}
        if counting:
            fields.pop("max_tokens", None)
        messages = chat_messages(body)
        last = messages[-1]
        if last["role"] == "assistant" and not last.get("tool_calls"):  # a prefill: the answer continues it
            if last["content"] != last["content"].rstrip():
                raise _bad("final assistant content cannot end with trailing whitespace", "messages")
            fields["continue_final_message"] = True
        fields.update(
            model=body.get("model"),
            messages=messages,
            tools=chat_tools(body.get("tools")),
            tool_choice=choice,
            parallel_tool_calls=parallel,
            response_format=response_format(body.get("output_config")),
        )
        chat = validated(ChatRequest, {k: v for k, v in fields.items() if v is not None})
        self.api._check_model(chat.model)
        self.api._check_sampling(chat)
        return chat

    async def count_tokens(self, request: web.Request) -> web.Response:
        try:
            ids, _ = self.api.chat_ids(self._chat(await read_json(request), counting=True))
        except ApiError as e:
            return web.json_response(error_body(e), status=e.status)
        return web.json_response({"input_tokens": len(ids)})

    async def create(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await read_json(request)
            chat = self._chat(body)
            ids, tools = self.api.chat_ids(chat)
            # as Anthropic's: max_tokens bounds the answer, the context ends it where it comes first
            room = self.engine.context_length - len(ids)
            gen = self.engine.start(ids, max(1, min(chat.max_new_tokens(), room)), chat)
        except ApiError as e:
            return web.json_response(error_body(e), status=e.status)
        answer = _Answer(self.engine.name, gen, tools, chat.max_new_tokens())
        if body.get("stream"):
            return await answer.stream(request)
        try:
            (whole,) = await joined([gen])
        except ApiError as e:
            return web.json_response(error_body(e), status=e.status)
        return web.json_response(answer.message(whole.text))


def _use(name: str, arguments: dict) -> dict:
    return {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": name, "input": arguments}


class _Answer:
    """One message: its envelope, its content blocks once the text is whole, and its stream of events."""

    def __init__(self, model: str, gen, tools: ToolCalling | None, max_tokens: int):
        self.model, self.gen, self.tools, self.max_tokens = model, gen, tools, max_tokens
        self.id = f"msg_{uuid.uuid4().hex[:24]}"

    def usage(self) -> dict:
        gen = self.gen
        return {
            "input_tokens": gen.prompt_tokens - gen.cached_tokens,
            "output_tokens": gen.completion_tokens,
            "cache_read_input_tokens": gen.cached_tokens,
            "cache_creation_input_tokens": 0,
        }

    def envelope(self, content: list[dict], stop_reason: str | None, stop_sequence: str | None) -> dict:
        return {
            "id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
            "stop_reason": stop_reason, "stop_sequence": stop_sequence, "usage": self.usage(),
        }  # fmt: skip

    def blocks(self, text: str) -> tuple[list[dict], str, str | None]:
        """The content blocks of the answer `text`, its stop reason and the stop sequence met. Calls cut short
        come as Anthropic's do: tool_use blocks of the input so far, stop reason max_tokens."""
        content, calls = (text, []) if self.tools is None else self.tools.parse(text)
        if calls:
            return (
                [_use(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls],
                "tool_use",
                None,
            )
        stop, gen = self.gen.assembler.stop_string, self.gen
        if stop is not None:
            reason = "stop_sequence"
        elif gen.finish_reason != "length":
            reason = "end_turn"
        else:  # cut short: at max_tokens, or before where the model's context ended
            reason = (
                "max_tokens" if gen.completion_tokens >= self.max_tokens else "model_context_window_exceeded"
            )
            if self.tools is not None and (cut := self.tools.cut_calls(text)):
                return [_use(name, arguments) for name, arguments in cut], reason, None
        return [{"type": "text", "text": content or ""}], reason, stop

    def message(self, text: str) -> dict:
        return self.envelope(*self.blocks(text))

    async def stream(self, request: web.Request) -> web.StreamResponse:
        def event(kind: str, **fields) -> bytes:
            return f"event: {kind}\ndata: {json.dumps({'type': kind, **fields})}\n\n".encode()

        async def events() -> AsyncIterator[bytes]:
            yield event("message_start", message=self.envelope([], None, None))
            live = self.tools is None  # text streams as it comes; an answer to tools is known once whole
            if live:
                yield event("content_block_start", index=0, content_block={"type": "text", "text": ""})
            yield event("ping")
            pieces = []
            async for piece in self.gen.text():
                pieces.append(piece.text)
                if live and piece.text:
                    yield event(
                        "content_block_delta", index=0, delta={"type": "text_delta", "text": piece.text}
                    )
            blocks, reason, stop = self.blocks("".join(pieces))
            for index, block in enumerate(blocks):
                if not live:
                    if block["type"] == "tool_use":
                        yield event("content_block_start", index=index, content_block={**block, "input": {}})
                        delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
                    else:
                        yield event(
                            "content_block_start", index=index, content_block={"type": "text", "text": ""}
                        )
                        delta = {"type": "text_delta", "text": block["text"]}
                    yield event("content_block_delta", index=index, delta=delta)
                yield event("content_block_stop", index=index)
            yield event(
                "message_delta", delta={"stop_reason": reason, "stop_sequence": stop}, usage=self.usage()
            )
            yield event("message_stop")

        def failure(e: ApiError) -> bytes:
            return event("error", error=error_body(e)["error"])

        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        return await stream(request, [self.gen], headers, events(), failure, lambda: b"")
