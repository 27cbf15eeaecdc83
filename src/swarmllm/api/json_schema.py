"""Structured output (`response_format: {"type": "json_schema", ...}`): the answer is held to a JSON schema.

`compile_schema` turns a schema into a table of nodes and a `SchemaGrammar`, a byte-level recogniser that plugs
into json_mode's `GrammarMask` as JSON mode's grammar does. A state is a frozenset of threads: a union (`anyOf`,
a list of types, a `$ref`) is followed down each alternative at once until the text tells them apart. A thread
is a pushdown state: the open containers' frames, a mode with its data, and the blanks in a row. At most
`MAX_THREADS` threads are followed at once, so an ambiguous schema (unions of containers, nested) cannot make
each byte cost twice the last.

What it writes is a subset of what the schema admits, which is all a constraint needs:
- an object with `properties` gets only those keys, in the schema's order, each optional one (not in
  `required`) skippable; without `properties` any keys, their values held to `additionalProperties`;
- keys, `enum` and `const` values are written as `json.dumps` writes them (non-ASCII as is, no blanks inside
  an array or object value), and an `integer` without a fraction or exponent.

Supported: `type` (a name or a list), `properties`, `required`, `additionalProperties`, `items`, `prefixItems`,
`minItems`, `maxItems`, `enum`, `const`, `anyOf`, `oneOf` where no value can hold to two alternatives (different
types, or a tagged union: `_Compiler.disjoint`), a one-element `allOf`, `$ref` into the schema (`$defs`,
`definitions`, recursion included), a string's `minLength`, `maxLength`, `pattern` and `format` and a number's
`minimum`, `maximum`, `exclusiveMinimum`, `exclusiveMaximum` and a whole `multipleOf` (json_constraints.py), and
annotations (`title`, `description`, `default`, `discriminator`, ...), which constrain nothing. Any other keyword
(`uniqueItems`, `not`, ...) is refused with a `SchemaError` that names it, rather than silently not honoured.
"""

from __future__ import annotations

import json
from typing import Any

from swarmllm.api.json_constraints import NumberBounds, StringRule
from swarmllm.api.json_mode import (
    DIGITS,
    ESCAPES,
    HEX,
    MAX_DEPTH,
    MAX_WHITESPACE,
    N_CAN_END,
    N_DOT,
    N_E,
    N_INT,
    N_MINUS,
    N_ZERO,
    WHITESPACE,
    _number,
)
from swarmllm.api.regex import utf8_span, utf8_step

ANNOTATIONS = frozenset(
    {"title", "description", "default", "examples", "$schema", "$id", "$comment", "deprecated", "readOnly",
     "writeOnly", "discriminator"}
)  # fmt: skip
STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
STRUCTURAL = frozenset(
    {"type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
     "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
) | STRING_KEYWORDS | NUMBER_KEYWORDS  # fmt: skip
DEFINITIONS = frozenset({"$defs", "definitions"})
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")

# node kinds: (UNION, alternatives) | (OBJECT, ((key bytes, node, required), ...), free keys' node or None)
# | (ARRAY, (the first items' nodes, ...), the other items' node or None, min items, max items or None)
# | (STRING, StringRule or None)
# | (NUMBER, integer only, NumberBounds or None) | (LITERALS, (bytes...))
UNION, OBJECT, ARRAY, STRING, NUMBER, LITERALS = range(6)

# thread modes
VALUE, OBJ_OPEN, OBJ_KEY, KEY, COLON, AFTER, ARR_OPEN, STR, NUM, LIT, DONE, RULED_STR, BOUNDED_NUM = range(13)
WS_MODES = frozenset({VALUE, OBJ_OPEN, OBJ_KEY, COLON, AFTER, ARR_OPEN})
NO_KEY = -1  # STR's b for a string value (else the node its key's value must match)
MAX_THREADS = 64  # alternatives followed at once; past it the text goes no further that way
ESCAPED = {ord(k): ord(v) for k, v in zip('"\\/bfnrt', '"\\/\b\f\n\r\t', strict=True)}  # "\n" -> newline

Thread = (
    tuple  # (frames, mode, a, b, blanks in a row); a frame: ("o" | "f" | "a", node, keys or items so far)
)


class SchemaError(ValueError):
    """A schema the API cannot hold an answer to; the message says where and which keyword."""


def compile_schema(schema: Any) -> SchemaGrammar:
    compiler = _Compiler(schema)
    try:
        root = compiler.node(schema, "#")
    except RecursionError:
        raise SchemaError("#: the schema is nested too deep") from None
    return SchemaGrammar(compiler.nodes, root)


def _literal(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _required_properties(schema: dict) -> set[str]:
    """The properties an object schema requires (none if the compiler may write something else than an object
    for it: typed otherwise, or a literal or a union)."""
    kind, properties, required = schema.get("type"), schema.get("properties"), schema.get("required")
    if kind not in ("object", None) or {"enum", "const", "anyOf", "oneOf", "allOf"} & set(schema):
        return set()
    if not isinstance(properties, dict) or not isinstance(required, list):
        return set()
    return {name for name in required if isinstance(name, str) and name in properties}


def _strings(schema: Any) -> set[str] | None:
    """The strings a `const` or an `enum` of strings admits (None for any other schema)."""
    if not isinstance(schema, dict):
        return None
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if not isinstance(values, list) or not values or not all(isinstance(v, str) for v in values):
        return None
    return set(values)


def _is_type(value: Any, kind: str) -> bool:
    if kind == "integer":  # as JSON schema counts: a number whose fraction is zero (1.0) too
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and value.is_integer()
        )
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    expected = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}[kind]
    return isinstance(value, expected)


class _Compiler:
    def __init__(self, root: Any):
        self.root = root
        self.nodes: list[tuple] = []
        self.refs: dict[str, int] = {}
        self._any: int | None = None

    def add(self, node: tuple) -> int:
        self.nodes.append(node)
        return len(self.nodes) - 1

    def any_node(self) -> int:
        """Any JSON value: a union of a free object and an array of any values, a string, a number, a literal."""
        if self._any is None:
            self._any = self.add((UNION, ()))
            alternatives = (
                self.add((OBJECT, (), self._any)),
                self.add((ARRAY, (), self._any, 0, None)),
                self.add((STRING, None)),
                self.add((NUMBER, False, None)),
                self.add((LITERALS, (b"true", b"false", b"null"))),
            )
            self.nodes[self._any] = (UNION, alternatives)
        return self._any

    def node(self, schema: Any, path: str) -> int:
        if schema is True:
            return self.any_node()
        if schema is False:
            raise SchemaError(f"{path}: the schema false admits no value")
        if not isinstance(schema, dict):
            raise SchemaError(f"{path}: a schema must be an object or a boolean")
        unknown = sorted(set(schema) - STRUCTURAL - ANNOTATIONS - DEFINITIONS)
        if unknown:
            raise SchemaError(f"{path}: the keyword {unknown[0]!r} is not supported")
        present = STRUCTURAL & set(schema)
        for combinator in ("$ref", "anyOf", "oneOf", "allOf"):
            if combinator in schema and present - {combinator}:
                other = sorted(present - {combinator})[0]
                raise SchemaError(f"{path}: {combinator!r} beside {other!r} is not supported")
        if "$ref" in schema:
            return self.ref(schema["$ref"], path)
        for union in ("anyOf", "oneOf"):
            if union in schema:
                alternatives = schema[union]
                if not isinstance(alternatives, list) or not alternatives:
                    raise SchemaError(f"{path}/{union}: must be a non-empty list")
                if union == "oneOf" and not self.disjoint(alternatives, path):
                    raise SchemaError(
                        f"{path}/oneOf: only alternatives of different types, or objects told apart by a "
                        "required property's const or enum strings, are supported"
                    )
                return self.add(
                    (UNION, tuple(self.node(s, f"{path}/{union}/{i}") for i, s in enumerate(alternatives)))
                )
        if "allOf" in schema:
            if not isinstance(schema["allOf"], list) or len(schema["allOf"]) != 1:
                raise SchemaError(f"{path}/allOf: only a list of one schema is supported")
            return self.node(schema["allOf"][0], f"{path}/allOf/0")
        kinds = schema.get("type")
        if isinstance(kinds, list) and not kinds:
            raise SchemaError(f"{path}/type: an empty list admits no value")
        for kind in kinds if isinstance(kinds, list) else [] if kinds is None else [kinds]:
            if kind not in TYPES:
                raise SchemaError(f"{path}/type: unknown type {kind!r}")
        if "enum" in schema or "const" in schema:
            return self.literals(schema, path, kinds)
        if isinstance(kinds, list):
            return self.add((UNION, tuple(self.typed(schema, k, path) for k in kinds)))
        if kinds is None:
            if {"properties", "required", "additionalProperties"} & set(schema):
                kinds = "object"
            elif {"items", "prefixItems", "minItems", "maxItems"} & set(schema):
                kinds = "array"
            elif STRING_KEYWORDS & set(schema):
                kinds = "string"
            elif NUMBER_KEYWORDS & set(schema):
                kinds = "number"
            else:
                return self.any_node()
        return self.typed(schema, kinds, path)

    def typed(self, schema: dict, kind: str, path: str) -> int:
        if kind == "object":
            return self.object(schema, path)
        if kind == "array":
            return self.array(schema, path)
        if kind == "string":
            rule = self.string_rule(schema, path) if STRING_KEYWORDS & set(schema) else None
            return self.add((STRING, rule))
        if kind in ("number", "integer"):
            bounds = self.bounds(schema, kind == "integer", path) if NUMBER_KEYWORDS & set(schema) else None
            return self.add((NUMBER, kind == "integer" or (bounds is not None and bounds.integer), bounds))
        return self.add((LITERALS, (b"true", b"false") if kind == "boolean" else (b"null",)))

    def string_rule(self, schema: dict, path: str) -> StringRule:
        low, high = schema.get("minLength", 0), schema.get("maxLength")
        if not _count(low) or (high is not None and (not _count(high) or high < low)):
            raise SchemaError(f"{path}: 'minLength' and 'maxLength' must be counts, the least first")
        pattern, format_name = schema.get("pattern"), schema.get("format")
        for name, value in (("pattern", pattern), ("format", format_name)):
            if value is not None and not isinstance(value, str):
                raise SchemaError(f"{path}/{name}: must be a string")
        try:
            return StringRule.build(pattern, format_name, low, high)
        except ValueError as error:
            raise SchemaError(f"{path}: {error}") from None

    def bounds(self, schema: dict, integer: bool, path: str) -> NumberBounds:
        try:
            return NumberBounds.build(schema, integer)
        except ValueError as error:
            raise SchemaError(f"{path}: {error}") from None

    def literals(self, schema: dict, path: str, kinds: str | list | None) -> int:
        """`enum` or `const`: their values of the schema's type (any of its types)."""
        others = sorted(STRUCTURAL & set(schema) - {"enum", "const", "type"})
        if others:
            raise SchemaError(f"{path}: 'enum' or 'const' beside {others[0]!r} is not supported")
        if "const" in schema:
            values = [schema["const"]]
        elif isinstance(schema["enum"], list):
            values = schema["enum"]
        else:
            raise SchemaError(f"{path}/enum: must be a list")
        if kinds is not None:
            kinds = kinds if isinstance(kinds, list) else [kinds]
            values = [v for v in values if any(_is_type(v, kind) for kind in kinds)]
        if not values:
            raise SchemaError(f"{path}: no value of 'enum' or 'const' is of the schema's type")
        return self.add((LITERALS, tuple(dict.fromkeys(_literal(v) for v in values))))

    def object(self, schema: dict, path: str) -> int:
        properties = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(properties, dict) or not isinstance(required, list):
            raise SchemaError(f"{path}: 'properties' must be an object and 'required' a list")
        if not all(isinstance(name, str) for name in required):
            raise SchemaError(f"{path}/required: must list property names")
        missing = [name for name in required if name not in properties]
        if missing:
            raise SchemaError(f"{path}/required: {missing[0]!r} is not in 'properties'")
        extra = schema.get("additionalProperties", True)
        if properties or extra is False:
            keys = tuple(
                (json.dumps(name, ensure_ascii=False).encode(), self.node(s, f"{path}/properties/{name}"),
                 name in required)
                for name, s in properties.items()
            )  # fmt: skip
            return self.add((OBJECT, keys, None))
        return self.add((OBJECT, (), self.node(extra, f"{path}/additionalProperties")))

    def array(self, schema: dict, path: str) -> int:
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        if not _count(low) or (high is not None and (not _count(high) or high < low)):
            raise SchemaError(f"{path}: 'minItems' and 'maxItems' must be counts, the least first")
        first = schema.get("prefixItems", [])
        if not isinstance(first, list) or isinstance(schema.get("items"), list):
            raise SchemaError(f"{path}: 'prefixItems' must be a list (and 'items' a schema, not a list)")
        nodes = tuple(self.node(s, f"{path}/prefixItems/{i}") for i, s in enumerate(first))
        rest = schema.get("items", True)
        other = None if rest is False else self.node(rest, f"{path}/items")
        if other is None:
            high = len(nodes) if high is None else min(high, len(nodes))
            if low > high:
                raise SchemaError(f"{path}: 'minItems' asks for more items than 'prefixItems' allows")
        return self.add((ARRAY, nodes, other, low, high))

    def disjoint(self, alternatives: list, path: str) -> bool:
        """Whether no value can hold to two of `oneOf`'s alternatives, so that it reads as `anyOf`: each names a
        type no other does (integers are numbers), or all are objects with a required property whose `const` or
        `enum` strings no two share (a tagged union, as pydantic's discriminated unions are)."""
        schemas = [self.resolve(s, f"{path}/oneOf/{i}") for i, s in enumerate(alternatives)]
        if not all(isinstance(s, dict) for s in schemas):
            return False
        kinds = [s.get("type") for s in schemas]
        if all(isinstance(k, str) for k in kinds):
            widened = ["number" if k == "integer" else k for k in kinds]
            if len(set(widened)) == len(widened):
                return True
        for tag in sorted(set.intersection(*map(_required_properties, schemas))):
            values = [_strings(self.resolve(s["properties"][tag], path)) for s in schemas]
            if all(v is not None for v in values) and sum(map(len, values)) == len(set().union(*values)):
                return True
        return False

    def resolve(self, schema: Any, path: str) -> Any:
        """The schema a chain of `$ref`s ends at."""
        for _ in range(MAX_DEPTH):
            if not isinstance(schema, dict) or "$ref" not in schema:
                return schema
            schema = self.target(schema["$ref"], path)
        raise SchemaError(f"{path}: '$ref's that go round in a circle")

    def target(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise SchemaError(f"{path}/$ref: only references into the schema itself (#/...) are supported")
        target = self.root
        for part in ref[2:].split("/") if ref != "#" else ():
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(target, dict) or part not in target:
                raise SchemaError(f"{path}/$ref: {ref!r} points at nothing")
            target = target[part]
        return target

    def ref(self, ref: Any, path: str) -> int:
        target = self.target(ref, path)  # first: it checks that ref is a string
        if ref in self.refs:
            return self.refs[ref]
        # a union of one: an alias that a recursive schema can name before it is compiled
        alias = self.refs[ref] = self.add((UNION, ()))
        self.nodes[alias] = (UNION, (self.node(target, ref),))
        return alias


class SchemaGrammar:
    """A schema's recogniser (see the module doc); its states are frozensets of threads."""

    def __init__(self, nodes: list[tuple], root: int):
        self.nodes = nodes
        self.start = frozenset({((), VALUE, root, None, 0)})

    def advance(self, state: frozenset, byte: int) -> frozenset | None:
        following: set = set()
        for thread in state:
            following.update(self._step(thread, byte))
        if len(following) > MAX_THREADS:
            return None  # an ambiguity that doubles at each nesting would cost each byte twice the last
        return frozenset(following) or None

    def complete(self, state: frozenset | None) -> bool:
        """Whether the text so far is a whole value of the schema (a top-level number or literal may still
        go on, and is whole too)."""
        if state is None:
            return False
        for frames, mode, a, b, _ in state:
            if mode == DONE:
                return True
            if not frames and mode == NUM and a in N_CAN_END:
                return True
            if not frames and mode == LIT and b in self.nodes[a][1]:
                return True
            if not frames and mode == BOUNDED_NUM and b[0] in N_CAN_END and self.nodes[a][2].holds(b[1]):
                return True
        return False

    def mask_key(self, state: frozenset, reach: int) -> frozenset:
        """The state with each held string's count as its rule caches masks under (`StringRule.key_count`)."""
        if all(mode != RULED_STR for _, mode, _, _, _ in state):
            return state
        return frozenset(
            (frames, mode, a, (b[0], self.nodes[a][1].key_count(b[1], reach), b[2]), blanks)
            if mode == RULED_STR
            else (frames, mode, a, b, blanks)
            for frames, mode, a, b, blanks in state
        )

    def _step(self, thread: Thread, byte: int) -> list[Thread]:
        frames, mode, a, b, blanks = thread
        if mode in WS_MODES and byte in WHITESPACE:
            return [(frames, mode, a, b, blanks + 1)] if blanks < MAX_WHITESPACE else []
        if mode == VALUE:
            return self._value(frames, a, byte, ())
        if mode == STR:
            return self._string(frames, a, b, byte)
        if mode == RULED_STR:
            return self._ruled_string(frames, a, b, byte)
        if mode == BOUNDED_NUM:
            return self._bounded_number(frames, a, b, byte)
        if mode == NUM:
            following = _number(a, byte)
            if following is not None and not (b and following in (N_DOT, N_E)):
                return [(frames, NUM, following, b, 0)]
            return self._step(self._done(frames), byte) if a in N_CAN_END else []
        if mode == LIT:
            prefix, literals = b + bytes([byte]), self.nodes[a][1]
            if any(literal.startswith(prefix) for literal in literals):
                return [self._literal(frames, a, prefix)]
            return self._step(self._done(frames), byte) if b in literals else []
        if mode == KEY:
            return self._key(frames, a, byte)
        if mode == COLON:
            return [(frames, VALUE, a, None, 0)] if byte == ord(":") else []
        if mode in (OBJ_OPEN, OBJ_KEY):
            if byte == 0x22:  # '"'
                return self._key_start(frames)
            return self._close(frames) if mode == OBJ_OPEN and byte == ord("}") else []
        if mode == ARR_OPEN:
            kind, node, _ = frames[-1]
            if byte == ord("]"):
                return self._close(frames) if self.nodes[node][3] == 0 else []
            item = self._item(node, 0)
            return [] if item is None else self._value(frames, item, byte, ())
        if mode == AFTER:
            return self._after(frames, byte)
        return []  # DONE: only the end of the sequence may follow

    def _value(self, frames: tuple, node: int, byte: int, seen: tuple) -> list[Thread]:
        """The threads after the first byte of a value of `node`."""
        kind = self.nodes[node][0]
        if kind == UNION:
            out = []
            for alternative in self.nodes[node][1]:
                if alternative not in seen:  # a reference to itself admits nothing more
                    out.extend(self._value(frames, alternative, byte, (*seen, node)))
            return out
        if kind == OBJECT and byte == ord("{") and len(frames) < MAX_DEPTH:
            free = self.nodes[node][2] is not None
            return [((*frames, ("f" if free else "o", node, 0)), OBJ_OPEN, None, None, 0)]
        if kind == ARRAY and byte == ord("[") and len(frames) < MAX_DEPTH:
            return [((*frames, ("a", node, 0)), ARR_OPEN, None, None, 0)]
        if kind == STRING and byte == 0x22:
            rule = self.nodes[node][1]
            if rule is None:
                return [(frames, STR, 0, NO_KEY, 0)]
            return [(frames, RULED_STR, node, (rule.start, 0, 0), 0)]
        if kind == NUMBER and (byte == ord("-") or byte in DIGITS):
            _, integer, bounds = self.nodes[node]
            syntax = N_MINUS if byte == ord("-") else N_ZERO if byte == ord("0") else N_INT
            if bounds is None:
                return [(frames, NUM, syntax, integer, 0)]
            if not bounds.admits(bytes([byte])):
                return []
            return [(frames, BOUNDED_NUM, node, (syntax, bytes([byte])), 0)]
        if kind == LITERALS:
            prefix = bytes([byte])
            if any(literal.startswith(prefix) for literal in self.nodes[node][1]):
                return [self._literal(frames, node, prefix)]
        return []

    def _literal(self, frames: tuple, node: int, prefix: bytes) -> Thread:
        """A literal so far: done once it is whole and no other literal goes on from it."""
        literals = self.nodes[node][1]
        if prefix in literals and not any(
            len(lit) > len(prefix) and lit.startswith(prefix) for lit in literals
        ):
            return self._done(frames)
        return (frames, LIT, node, prefix, 0)

    def _string(self, frames: tuple, escape: int, key_of: int, byte: int) -> list[Thread]:
        """In a string (a value's, or a free object's key): escape 0 in the text, -1 after a backslash, 1-4
        hex digits to go, or a UTF-8 sequence begun."""
        if isinstance(escape, tuple) or (escape == 0 and byte >= 0x80):
            pending = utf8_step(escape if isinstance(escape, tuple) else None, byte)
            return [] if pending is None else [(frames, STR, pending if pending[1] else 0, key_of, 0)]
        if escape == 0:
            if byte == 0x22:
                return [self._done(frames) if key_of == NO_KEY else (frames, COLON, key_of, None, 0)]
            if byte == 0x5C:  # '\'
                return [(frames, STR, -1, key_of, 0)]
            return [(frames, STR, 0, key_of, 0)] if byte >= 0x20 else []
        if escape == -1:
            if byte == ord("u"):
                return [(frames, STR, 4, key_of, 0)]
            return [(frames, STR, 0, key_of, 0)] if byte in ESCAPES else []
        return [(frames, STR, escape - 1, key_of, 0)] if byte in HEX else []

    def _ruled_string(self, frames: tuple, node: int, at: tuple, byte: int) -> list[Thread]:
        """In a string held to a `StringRule`: at is (live automaton states, characters so far, pending), pending
        0 between characters, -1 after a backslash, or (value so far, bytes to go, length) inside a UTF-8
        sequence."""
        rule: StringRule = self.nodes[node][1]
        states, count, pending = at
        if pending == -1:
            code = ESCAPED.get(byte)
            return [] if code is None else self._character(frames, node, rule, states, count, code)
        if pending == 0 and byte < 0x80:
            if byte == 0x22:
                return [self._done(frames)] if rule.may_end(states, count) else []
            if byte == 0x5C:
                escapable = any(rule.may_take(states, count, code, code) for code in ESCAPED.values())
                return [(frames, RULED_STR, node, (states, count, -1), 0)] if escapable else []
            return self._character(frames, node, rule, states, count, byte) if byte >= 0x20 else []
        pending = utf8_step(pending or None, byte)
        if pending is None:
            return []
        bits, left, _ = pending
        if not left:
            return self._character(frames, node, rule, states, count, bits)
        if not rule.may_take(states, count, *utf8_span(pending)):
            return []
        return [(frames, RULED_STR, node, (states, count, pending), 0)]

    def _character(
        self, frames: tuple, node: int, rule: StringRule, states: frozenset, count: int, code: int
    ) -> list[Thread]:
        following = rule.take(states, count, code)
        if following is None:
            return []
        return [(frames, RULED_STR, node, (following, rule.counted(count), 0), 0)]

    def _bounded_number(self, frames: tuple, node: int, at: tuple, byte: int) -> list[Thread]:
        """A number held to bounds: at is (its syntax state, its text so far); it is written without an
        exponent, and each byte must leave some number within the bounds still to be written."""
        syntax, text = at
        _, integer, bounds = self.nodes[node]
        following = _number(syntax, byte)
        if following is not None and following != N_E and not (integer and following == N_DOT):
            if bounds.admits(text + bytes([byte])):
                return [(frames, BOUNDED_NUM, node, (following, text + bytes([byte])), 0)]
            return []
        return self._step(self._done(frames), byte) if syntax in N_CAN_END and bounds.holds(text) else []

    def _item(self, node: int, index: int) -> int | None:
        """The node of an array's item at `index`, or None where no more items may come."""
        _, first, other, _, high = self.nodes[node]
        if high is not None and index >= high:
            return None
        return first[index] if index < len(first) else other

    def _candidates(self, node: int, done: int) -> range:
        """The properties whose key may come next, after `done` of them: up to the first required one."""
        keys = self.nodes[node][1]
        end = done
        while end < len(keys) and not keys[end][2]:
            end += 1
        return range(done, min(end + 1, len(keys)))

    def _key_start(self, frames: tuple) -> list[Thread]:
        kind, node, done = frames[-1]
        if kind == "f":
            return [(frames, STR, 0, self.nodes[node][2], 0)]
        if not self._candidates(node, done):
            return []
        return [(frames, KEY, b'"', None, 0)]

    def _key(self, frames: tuple, prefix: bytes, byte: int) -> list[Thread]:
        _, node, done = frames[-1]
        keys, prefix = self.nodes[node][1], prefix + bytes([byte])
        alive = False
        for index in self._candidates(node, done):
            key, value, _ = keys[index]
            if key == prefix:  # whole: no other key goes on from a closing quote
                return [((*frames[:-1], ("o", node, index + 1)), COLON, value, None, 0)]
            alive = alive or key.startswith(prefix)
        return [(frames, KEY, prefix, None, 0)] if alive else []

    def _after(self, frames: tuple, byte: int) -> list[Thread]:
        kind, node, count = frames[-1]
        if kind == "a":
            if byte == ord(","):
                item = self._item(node, count)
                return [] if item is None else [(frames, VALUE, item, None, 0)]
            return self._close(frames) if byte == ord("]") and count >= self.nodes[node][3] else []
        if byte == ord(","):
            if kind == "o" and not self._candidates(node, count):
                return []
            return [(frames, OBJ_KEY, None, None, 0)]
        return self._close(frames) if byte == ord("}") else []

    def _close(self, frames: tuple) -> list[Thread]:
        """The container on top closes, if it may (an object with no required key left)."""
        kind, node, done = frames[-1]
        if kind == "o" and any(required for _, _, required in self.nodes[node][1][done:]):
            return []
        return [self._done(frames[:-1])]

    @staticmethod
    def _done(frames: tuple) -> Thread:
        """A value ended: the text is whole at the top level, else its container counts it."""
        if not frames:
            return ((), DONE, None, None, 0)
        kind, node, count = frames[-1]
        if kind == "a":
            frames = (*frames[:-1], ("a", node, count + 1))
        return (frames, AFTER, None, None, 0)
