"""OpenAI's Responses API beside chat completions (`POST /v1/responses`, `GET` and `DELETE /v1/responses/{id}`):
what the official client's `client.responses.create`, `.parse` and `.stream` speak, as vLLM and Ollama serve it.

Each request is translated into the chat request it means (`ChatRequest`), so it is checked, sampled and held to
a format exactly as chat is: `instructions` as the system message, then `input` (a text, or items: messages whose
content is text or text parts, earlier `function_call`s and their `function_call_output`s), `max_output_tokens`,
`text.format` as `response_format`, function `tools` in chat's nesting. A response is kept in memory (the last
`KEPT_RESPONSES`, unless `store: false`) for `GET` and for `previous_response_id`: a request that continues one
sends only its new input, the kept conversation goes first (without the earlier `instructions`, as OpenAI's), and
the API's kept inference sessions send the servers only the new tokens. Streamed, the events are the Responses
API's own: `response.created`, `response.in_progress`, the message item and its text part added,
`response.output_text.delta` per piece, the `done` events, then `response.completed` (or `response.incomplete`
when cut at `max_output_tokens`); with tools, the answer is sent once whole (a message, or `function_call` items
with their arguments in one delta). Not supported (a 400): items other than messages and function calls (images,
files, reasoning), built-in tools (web or file search, ...), `background`, `conversation`, stored `prompt`s,
output logprobs.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from swarmllm.api.schemas import ApiError, ChatRequest
from swarmllm.api.streams import joined, read_json, stream, validated
from swarmllm.api.tools import ToolCalling

KEPT_RESPONSES = 256  # kept for `previous_response_id` and GET, the oldest dropped first
# fields passed to the chat request as they are (the Responses API's own, and vLLM's sampling extras)
PASSED = (
    "temperature", "top_p", "parallel_tool_calls", "user", "seed", "top_k", "min_p", "repetition_penalty",
    "frequency_penalty", "presence_penalty", "stop", "min_tokens", "ignore_eos", "stop_token_ids", "logit_bias",
)  # fmt: skip
RENAMED = {
    "max_tokens": "max_output_tokens",
    "messages": "input",
    "response_format": "text",
}  # chat's -> ours
UNSUPPORTED = ("background", "conversation", "prompt")


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


def _renamed(e: ApiError) -> ApiError:
    """A chat request's error named with the Responses API's parameters."""
    error = e.body["error"]
    param = RENAMED.get(error["param"], error["param"])
    message = error["message"].replace(f"'{error['param']}'", f"'{param}'") if param else error["message"]
    return ApiError(e.status, message, error["type"], param, error["code"])


def _text(content: Any) -> str:
    """A message's content: a text, or text parts joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict)
        and p.get("type") in ("input_text", "output_text", "text")
        and isinstance(p.get("text"), str)
        for p in content
    ):
        return "".join(p["text"] for p in content)
    raise _bad("a message's content must be a text or a list of text parts (only text is supported)", "input")


def input_messages(items: Any) -> list[dict]:
    """The chat messages a request's `input` means."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items or not all(isinstance(item, dict) for item in items):
        raise _bad("input must be a text or a non-empty list of items", "input")
    out: list[dict] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise _bad(
                    f"a message's role must be user, assistant, system or developer, not {role!r}", "input"
                )
            out.append(
                {"role": "system" if role == "developer" else role, "content": _text(item.get("content"))}
            )
        elif kind == "function_call":
            name, arguments = item.get("name"), item.get("arguments")
            if not isinstance(name, str) or not isinstance(arguments, str):
                raise _bad("a function_call item needs a name and its arguments as a JSON text", "input")
            call = {
                "id": item.get("call_id"),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls"):
                out[-1]["tool_calls"].append(call)  # calls made together: one assistant turn
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            out.append({"role": "tool", "content": output if isinstance(output, str) else json.dumps(output)})
        else:
            raise _bad(
                f"input items of type {kind!r} are not supported (only text messages and function calls)",
                "input",
            )
    return out


def chat_tools(tools: Any) -> list | None:
    """Function tools as chat nests them (`{"type": "function", "function": {...}}`)."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("tools must be a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise _bad(f"tools[{i}]: only function tools are supported", "tools")
        fields = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": fields})
    return out


def chat_tool_choice(choice: Any) -> Any:
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def response_format(text: Any) -> dict | None:
    """`text.format` as chat's `response_format`."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad("text must be an object", "text")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad("text.format must be an object", "text")
    if fmt.get("type") == "json_schema":
        spec = {k: fmt[k] for k in ("name", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": spec}
    return {"type": fmt.get("type")}  # text or json_object (anything else: chat's 400)


@dataclass
class _Kept:
    response: dict
    messages: list[dict]  # the conversation it ended, without its instructions


def _event(kind: str, number: int, **fields) -> bytes:
    return (
        f"event: {kind}\ndata: {json.dumps({'type': kind, 'sequence_number': number, **fields})}\n\n".encode()
    )


class ResponsesApi:
    """The Responses routes over an `Api` (its engine, its checks), with the responses it keeps."""

    def __init__(self, api):
        self.api, self.engine = api, api.engine
        self.kept: OrderedDict[str, _Kept] = OrderedDict()

    def routes(self) -> list[tuple[str, str, Callable]]:
        return [
            ("POST", "/v1/responses", self.create),
            ("GET", "/v1/responses/{id}", self.retrieve),
            ("DELETE", "/v1/responses/{id}", self.delete),
        ]

    def _find(self, rid: str, param: str | None = None) -> _Kept:
        kept = self.kept.get(rid)
        if kept is None:
            raise ApiError(404, f"Response with id '{rid}' not found.", "invalid_request_error", param)
        return kept

    async def retrieve(self, request: web.Request) -> web.Response:
        try:
            return web.json_response(self._find(request.match_info["id"]).response)
        except ApiError as e:
            return web.json_response(e.body, status=e.status)

    async def delete(self, request: web.Request) -> web.Response:
        rid = request.match_info["id"]
        try:
            self._find(rid)
        except ApiError as e:
            return web.json_response(e.body, status=e.status)
        del self.kept[rid]
        return web.json_response({"id": rid, "object": "response.deleted", "deleted": True})

    def _chat(self, body: dict) -> tuple[ChatRequest, list[dict]]:
        """The chat request a Responses request means, and its conversation without the instructions."""
        for name in UNSUPPORTED:
            if body.get(name):
                raise _bad(f"{name} is not supported by this API", name)
        include = body.get("include") or []
        if not isinstance(include, list):
            raise _bad("include must be a list", "include")
        if "message.output_text.logprobs" in include:
            raise _bad(
                "output logprobs are not supported in responses (chat completions have them)", "include"
            )
        history: list[dict] = []
        if (previous := body.get("previous_response_id")) is not None:
            history = self._find(str(previous), "previous_response_id").messages
        messages = history + input_messages(body.get("input"))
        instructions = body.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise _bad("instructions must be a text", "instructions")
        system = [{"role": "system", "content": instructions}] if instructions else []
        fields = {k: body[k] for k in PASSED if body.get(k) is not None}
        fields.update(
            model=body.get("model"),
            messages=system + messages,
            max_tokens=body.get("max_output_tokens"),
            tools=chat_tools(body.get("tools")),
            tool_choice=chat_tool_choice(body.get("tool_choice")),
            response_format=response_format(body.get("text")),
        )
        chat = validated(ChatRequest, {k: v for k, v in fields.items() if v is not None})
        self.api._check_model(chat.model)
        self.api._check_sampling(chat)
        return chat, messages

    async def create(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await read_json(request)
            chat, messages = self._chat(body)
            ids, tools = self.api.chat_ids(chat)
            gen = self.engine.start(ids, chat.max_new_tokens(), chat)
        except ApiError as e:
            e = _renamed(e)
            return web.json_response(e.body, status=e.status)
        answer = _Answer(self, body, chat, gen, tools, messages)
        if body.get("stream"):
            return await answer.stream(request)
        try:
            (whole,) = await joined([gen])
        except ApiError as e:
            return web.json_response(e.body, status=e.status)
        return web.json_response(answer.finish(whole.text))

    def keep(self, rid: str, kept: _Kept) -> None:
        self.kept[rid] = kept
        while len(self.kept) > KEPT_RESPONSES:
            self.kept.popitem(last=False)


class _Answer:
    """One response: its envelope, its output items once the text is whole, and its stream of events."""

    def __init__(self, owner: ResponsesApi, body: dict, chat: ChatRequest, gen, tools: ToolCalling | None,
                 messages: list[dict]):  # fmt: skip
        self.owner, self.body, self.chat, self.gen, self.tools, self.messages = (
            owner,
            body,
            chat,
            gen,
            tools,
            messages,
        )
        self.id, self.message_id = f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0

    def response(self, status: str, output: list[dict]) -> dict:
        body, gen = self.body, self.gen
        done = status != "in_progress"
        usage = {
            "input_tokens": gen.prompt_tokens,
            "input_tokens_details": {"cached_tokens": gen.cached_tokens},
            "output_tokens": gen.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": gen.prompt_tokens + gen.completion_tokens,
        }
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "model": self.owner.engine.name, "output": output, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "previous_response_id": body.get("previous_response_id"), "metadata": body.get("metadata") or {},
            "parallel_tool_calls": self.chat.parallel_tool_calls, "temperature": self.chat.temperature,
            "top_p": self.chat.top_p, "tool_choice": body.get("tool_choice") or "auto", "tools": body.get("tools") or [],
            "text": {"format": (body.get("text") or {}).get("format") or {"type": "text"}},
            "store": body.get("store", True) is not False, "truncation": "disabled", "user": body.get("user"),
            "usage": usage if done else None,
        }  # fmt: skip

    def finish(self, text: str) -> dict:
        """The whole response for the answer `text` (kept unless `store: false`)."""
        content, calls = (text, []) if self.tools is None else self.tools.parse(text)
        # a message cut at max_output_tokens is incomplete, as the response is (OpenAI's)
        status = "incomplete" if not calls and self.gen.finish_reason == "length" else "completed"
        if calls:
            output = [
                {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                 "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": "completed"}
                for call in calls
            ]  # fmt: skip
            said = {"role": "assistant", "content": "", "tool_calls": calls}
        else:
            part = {"type": "output_text", "text": content or "", "annotations": [], "logprobs": []}
            output = [{"type": "message", "id": self.message_id, "status": status, "role": "assistant",
                       "content": [part]}]  # fmt: skip
            said = {"role": "assistant", "content": content or ""}
        response = self.response(status, output)
        if response["store"]:
            self.owner.keep(self.id, _Kept(response, [*self.messages, said]))
        return response

    def _event(self, kind: str, **fields) -> bytes:
        self.sequence += 1
        return _event(kind, self.sequence - 1, **fields)

    def _opened(self, index: int, item: dict) -> list[bytes]:
        """An output item added (empty), and for a message its text part."""
        if item["type"] == "function_call":
            return [self._event("response.output_item.added", output_index=index,
                                item={**item, "arguments": "", "status": "in_progress"})]  # fmt: skip
        empty = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event("response.output_item.added", output_index=index,
                        item={**item, "status": "in_progress", "content": []}),
            self._event("response.content_part.added", item_id=item["id"], output_index=index, content_index=0,
                        part=empty),
        ]  # fmt: skip

    def _delta(self, index: int, item_id: str, kind: str, text: str) -> bytes:
        if kind == "function_call":
            return self._event("response.function_call_arguments.delta", item_id=item_id, output_index=index,
                               delta=text)  # fmt: skip
        return self._event("response.output_text.delta", item_id=item_id, output_index=index, content_index=0,
                           delta=text, logprobs=[])  # fmt: skip

    def _closed(self, index: int, item: dict) -> list[bytes]:
        out = []
        if item["type"] == "function_call":
            out.append(self._event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                   name=item["name"], arguments=item["arguments"]))  # fmt: skip
        else:
            part = item["content"][0]
            out.append(self._event("response.output_text.done", item_id=item["id"], output_index=index,
                                   content_index=0, text=part["text"], logprobs=[]))  # fmt: skip
            out.append(self._event("response.content_part.done", item_id=item["id"], output_index=index,
                                   content_index=0, part=part))  # fmt: skip
        out.append(self._event("response.output_item.done", output_index=index, item=item))
        return out

    async def stream(self, request: web.Request) -> web.StreamResponse:
        async def events() -> AsyncIterator[bytes]:
            yield self._event("response.created", response=self.response("in_progress", []))
            yield self._event("response.in_progress", response=self.response("in_progress", []))
            live = self.tools is None  # text streams as it comes; an answer to tools is known once whole
            message = {"type": "message", "id": self.message_id, "role": "assistant"}
            if live:
                for event in self._opened(0, message):
                    yield event
            pieces = []
            async for piece in self.gen.text():
                pieces.append(piece.text)
                if live and piece.text:
                    yield self._delta(0, self.message_id, "message", piece.text)
            response = self.finish("".join(pieces))
            for index, item in enumerate(response["output"]):
                if not live:
                    for event in self._opened(index, item):
                        yield event
                    text = (
                        item["arguments"] if item["type"] == "function_call" else item["content"][0]["text"]
                    )
                    if text:
                        yield self._delta(index, item["id"], item["type"], text)
                for event in self._closed(index, item):
                    yield event
            yield self._event(f"response.{response['status']}", response=response)

        def failure(e: ApiError) -> bytes:
            return self._event(
                "error", code=e.body["error"]["code"], message=e.body["error"]["message"], param=None
            )

        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        return await stream(request, [self.gen], headers, events(), failure, lambda: b"")
