"""Tool calling (chat `tools` and `tool_choice`), the same for every model: a generic format held by a schema.

A model's own tool-call format (Hermes' `<tool_call>` tags, Llama 3.1's `ipython` turns, ...) needs a parser per
family (vLLM's `--tool-call-parser`). This API instead tells the model, in a system message, the tools it has and
the one answer format it must use, and holds the answer to that format with a JSON schema (json_schema.py), as
llama.cpp does for models without a native format:
- `{"tool_calls": [{"name": ..., "arguments": {...}}, ...]}` calls tools, each call's arguments held to that
  tool's `parameters` schema;
- `{"response": "..."}` answers in text, only where the model may choose (`tool_choice` `auto`).
`tool_choice` `required` leaves only calls, a named function only calls of it (one), `none` leaves the tools out.
`parallel_tool_calls: false` allows one call. Earlier turns go back to the model in the same format: an
assistant message's `tool_calls` as its JSON, a `tool` message's content as the tool's turn.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence

from swarmllm.api.json_schema import SchemaError, compile_schema

NO_ARGUMENTS = {"type": "object", "properties": {}, "additionalProperties": False}


class ToolError(ValueError):
    """Tools, a tool choice or a tool call the API cannot follow; `param` is the request's field at fault."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class ToolCalling:
    """One request's tools and choice: the instruction the model reads, the schema its answer is held to, and
    the parse of that answer."""

    def __init__(self, tools: Sequence[dict], choice: str | dict | None, parallel: bool = True):
        self.functions = [_function(tool, i) for i, tool in enumerate(tools)]
        names = [f["name"] for f in self.functions]
        if len(set(names)) < len(names):
            raise ToolError("tools", "two functions have the same name")
        self.named: str | None = None
        if isinstance(choice, dict):
            function = choice.get("function")
            self.named = function.get("name") if isinstance(function, dict) else None
            if choice.get("type") != "function" or self.named not in names:
                raise ToolError("tool_choice", "a named choice must be a function among the tools")
        elif choice not in (None, "auto", "required"):
            raise ToolError("tool_choice", "it must be none, auto, required or a named function")
        self.required = choice == "required" or self.named is not None
        self.single = not parallel or self.named is not None
        self.schema = self._schema()
        for function in self.functions:
            try:
                compile_schema(function["parameters"])
            except SchemaError as e:
                raise ToolError("tools", f"the parameters of {function['name']!r}: {e}") from None

    def _schema(self) -> dict:
        """The answer format; each function's parameters go in its `$defs` (their own `#/...` references moved
        with them: pydantic refers to a nested model's definition so), its calls' arguments refer there."""
        called = [
            (f"arguments{i}", f) for i, f in enumerate(self.functions) if self.named in (None, f["name"])
        ]
        call = [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "arguments": {"$ref": f"#/$defs/{key}"}},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for key, f in called
        ]
        definitions = {key: _rebased(f["parameters"], f"#/$defs/{key}") for key, f in called}
        calls = {"type": "array", "items": {"anyOf": call}, "minItems": 1}
        if self.single:
            calls["maxItems"] = 1
        calling = {
            "type": "object",
            "properties": {"tool_calls": calls},
            "required": ["tool_calls"],
            "additionalProperties": False,
        }
        if self.required:
            return {**calling, "$defs": definitions}
        answering = {
            "type": "object",
            "properties": {"response": {"type": "string"}},
            "required": ["response"],
            "additionalProperties": False,
        }
        return {"anyOf": [calling, answering], "$defs": definitions}

    def instruction(self) -> str:
        listed = json.dumps(
            [{k: f[k] for k in ("name", "description", "parameters") if k in f} for f in self.functions],
            ensure_ascii=False,
        )
        call = '{"tool_calls": [{"name": "<function name>", "arguments": {<its arguments>}}]}'
        if self.named is not None:
            how = f"Call the function {self.named!r} now. Answer with a JSON object: {call}"
        elif self.required:
            how = f"Call one or more of these functions now. Answer with a JSON object: {call}"
        else:
            how = (
                f"To call functions, answer with a JSON object: {call}. To answer the user directly, answer "
                'with a JSON object: {"response": "<your answer>"}'
            )
        if self.single and self.named is None:
            how += ". Call one function at a time"
        return f"You can call these functions (their arguments as JSON schemas):\n{listed}\n{how}."

    def messages(self, messages: Sequence[dict]) -> list[dict]:
        """The conversation as the model reads it: the instruction in the system message (added, or after the
        caller's), earlier calls in the answer format."""
        out = [{"role": m["role"], "content": message_text(m)} for m in messages]
        if out and out[0]["role"] == "system":
            out[0]["content"] = f"{out[0]['content']}\n\n{self.instruction()}"
        else:
            out.insert(0, {"role": "system", "content": self.instruction()})
        return out

    @staticmethod
    def parse(text: str) -> tuple[str | None, list[dict]]:
        """(content, tool calls) of an answer: calls with fresh ids, or the text of a direct response (of as
        much as there is, if it was cut short); any other text as it is (a call cut short)."""
        try:
            answer = json.loads(text)
        except ValueError:
            opened = ANSWERING.match(text)  # a response cut short: the text it has
            return (text, []) if opened is None else (_string_prefix(text[opened.end() :]), [])
        if isinstance(answer, dict) and "tool_calls" in answer:
            return None, [
                {
                    "id": f"call_{uuid.uuid4().hex[:24]}",
                    "type": "function",
                    "function": {
                        "name": call["name"],
                        "arguments": json.dumps(call["arguments"], ensure_ascii=False),
                    },
                }
                for call in answer["tool_calls"]
            ]
        if isinstance(answer, dict) and isinstance(answer.get("response"), str):
            return answer["response"], []
        return text, []

    @staticmethod
    def cut_calls(text: str) -> list[tuple[str, dict]]:
        """The calls of an answer cut short (at max_tokens) in the middle of its calls, as far as they go: each
        named call's (name, its arguments' whole values so far: `closed_json`); [] where the text is no cut call
        or no call's name is whole (Anthropic returns such a call as an incomplete tool_use block)."""
        if not CALLING.match(text):
            return []
        answer = closed_json(text)
        calls = answer.get("tool_calls") if isinstance(answer, dict) else None
        named = [c for c in calls or () if isinstance(c, dict) and isinstance(c.get("name"), str)]
        return [(c["name"], c["arguments"] if isinstance(c.get("arguments"), dict) else {}) for c in named]


# how far back a JSON text cut short is cut further to parse, once a string or number cut short is dropped (a
# partial literal, the key of what was dropped, a dangling comma or colon)
CLOSE_BACKTRACK = 256
NUMBER_CHARS = frozenset("0123456789.-+eE")


def closed_json(prefix: str) -> object | None:
    """The value of the longest prefix of `prefix` that parses once its open arrays and objects are closed, of
    whole values only: a string or number cut short is dropped, not taken for a shorter one (a command
    "rm -rf /tmp/x" cut to "rm -rf /", 1200 cut to 12); None where none does (cut at most `CLOSE_BACKTRACK`
    characters before that)."""
    top = _scan(prefix, ([], None, False))[1]  # (where a string cut short opens)
    if top is None:
        top = len(prefix)
        run = top - len(prefix.rstrip("".join(NUMBER_CHARS)))
        if any(c.isdigit() for c in prefix[top - run :]):
            top -= run
    floor = max(top - CLOSE_BACKTRACK, 0)
    state = _scan(prefix[:floor], ([], None, False))
    for end in range(top, floor - 1, -1):
        stack, open_at, _ = _scan(prefix[floor:end], state, floor)
        if open_at is not None or stack is None:
            continue
        try:
            return json.loads(prefix[:end] + "".join(reversed(stack)))
        except ValueError:
            continue
    return None


def _scan(
    text: str, state: tuple[list[str] | None, int | None, bool], at: int = 0
) -> tuple[list[str] | None, int | None, bool]:
    """(the closers of the containers open, where the string open begins, after a backslash) once `text`, which
    begins at position `at`, follows `state`; (None, None, False) once a bracket closes what is not open."""
    stack, open_at, escaped = state
    if stack is None:
        return state
    stack = list(stack)
    for i, ch in enumerate(text, at):
        if open_at is not None:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                open_at = None
        elif ch == '"':
            open_at = i
        elif ch in "[{":
            stack.append("]" if ch == "[" else "}")
        elif ch in "]}":
            if not stack or stack.pop() != ch:
                return None, None, False
    return stack, open_at, escaped


ANSWERING = re.compile(r'\s*\{\s*"response"\s*:\s*"')
CALLING = re.compile(r'\s*\{\s*"tool_calls"\s*:\s*\[')
ESCAPES = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


class ResponseStream:
    """The text of a `{"response": "..."}` answer as it is generated, for streaming: each piece of the answer's
    JSON in, the newly decoded text of its string out (nothing while it may still be a call, or inside an
    escape not yet whole). What comes out, joined, is a prefix of the parsed response."""

    def __init__(self) -> None:
        self.text, self.start, self.sent = "", -1, 0

    def feed(self, piece: str) -> str:
        self.text += piece
        if self.start < 0:
            opened = ANSWERING.match(self.text)
            if opened is None:
                return ""
            self.start = opened.end()
        decoded = _string_prefix(self.text[self.start :])
        new, self.sent = decoded[self.sent :], len(decoded)
        return new


def _string_prefix(body: str) -> str:
    """The decoded text of a JSON string's body up to its closing quote or the first escape not yet whole (the
    recogniser let only valid escapes through)."""
    out, i = [], 0
    while i < len(body) and body[i] != '"':
        if body[i] != "\\":
            out.append(body[i])
            i += 1
            continue
        if i + 1 >= len(body):
            break
        if body[i + 1] != "u":
            out.append(ESCAPES[body[i + 1]])
            i += 2
            continue
        if i + 6 > len(body):
            break
        code = int(body[i + 2 : i + 6], 16)
        if 0xD800 <= code < 0xDC00:  # a high surrogate: a low one may follow as its pair
            if i + 12 > len(body):
                break
            if body[i + 6 : i + 8] == "\\u" and 0xDC00 <= (low := int(body[i + 8 : i + 12], 16)) < 0xE000:
                out.append(chr(0x10000 + ((code - 0xD800) << 10) + (low - 0xDC00)))
                i += 12
                continue
        out.append(chr(code))
        i += 6
    return "".join(out)


SUBSCHEMAS = frozenset({"items", "additionalProperties", "not"})  # keywords whose value is one schema
SCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems"})  # ... a list of schemas
SCHEMA_MAPS = frozenset({"properties", "$defs", "definitions"})  # ... names to schemas


def _rebased(schema, base: str):
    """`schema` with each reference into itself (`#`, `#/...`) made a reference into `base`, where it is put."""
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and (value == "#" or value.startswith("#/")):
            value = base + value[1:]
        elif key in SUBSCHEMAS:
            value = _rebased(value, base)
        elif key in SCHEMA_LISTS and isinstance(value, list):
            value = [_rebased(item, base) for item in value]
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            value = {name: _rebased(item, base) for name, item in value.items()}
        out[key] = value
    return out


def _function(tool: dict, index: int) -> dict:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
        raise ToolError(
            "tools", f"tools[{index}]: only tools of type function (with a 'function' object) are supported"
        )
    if not isinstance(function.get("name"), str) or not function["name"]:
        raise ToolError("tools", f"tools[{index}]: the function needs a name")
    parameters = function.get("parameters") or NO_ARGUMENTS
    out = {"name": function["name"], "parameters": parameters}
    if function.get("description"):
        out["description"] = function["description"]
    return out


def message_text(message: dict) -> str:
    """An assistant turn that called tools, in the answer format; any other message's text."""
    calls = message.get("tool_calls")
    if message["role"] != "assistant" or not calls:
        return message.get("content") or ""
    written = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        arguments = function.get("arguments", "{}") if isinstance(function, dict) else None
        try:
            if not isinstance(arguments, str):
                raise ValueError(arguments)
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            raise ToolError(
                "messages", "a tool call needs a function whose arguments are a JSON text"
            ) from None
        written.append({"name": function.get("name"), "arguments": arguments})
    return json.dumps({"tool_calls": written}, ensure_ascii=False)
