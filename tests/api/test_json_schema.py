"""Structured output's schema recogniser against `jsonschema` (the reference validator) on random schemas, its
refusals, and the vocabulary walk over its states against a brute-force scan."""

import json
import random

import jsonschema
import pytest
from mutation import mutate

from swarmllm.api.json_mode import MAX_DEPTH, GrammarMask, TokenTrie, feed
from swarmllm.api.json_schema import MAX_THREADS, SchemaError, SchemaGrammar, compile_schema

NAMES = ["a", "b", "name", "é", 'q"uote', "back\\slash", "k1", "中"]
SCALARS = [0, 1, 12, -3, 1.5, 1e20, "x", "xy", "é", "", True, False, None]


def _schema(rng: random.Random, depth: int = 0) -> dict:
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "any", "nullable"]
    if depth < 3:
        kinds += ["object", "object", "free object", "array", "anyOf"]
    kind = rng.choice(kinds)
    if kind == "object":
        names = rng.sample(NAMES, rng.randint(1, 4))
        schema = {"type": "object", "properties": {n: _schema(rng, depth + 1) for n in names}}
        schema["required"] = [n for n in names if rng.random() < 0.5]
        if rng.random() < 0.5:
            schema["additionalProperties"] = False
        return schema
    if kind == "free object":
        return {"type": "object", "additionalProperties": rng.choice([True, _schema(rng, depth + 1)])}
    if kind == "array":
        schema = {"type": "array", "items": _schema(rng, depth + 1)}
        if rng.random() < 0.5:
            schema["minItems"] = rng.randint(0, 2)
            schema["maxItems"] = schema["minItems"] + rng.randint(0, 2)
        return schema
    if kind == "anyOf":
        return {"anyOf": [_schema(rng, depth + 1) for _ in range(rng.randint(1, 3))]}
    if kind == "nullable":
        return {"type": [rng.choice(["string", "integer", "boolean"]), "null"], "title": "a note"}
    if kind == "enum":
        return {"enum": rng.sample(SCALARS, rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(SCALARS), "description": "constrains nothing"}
    if kind == "any":
        return {}
    return {"type": kind}


def _any(rng: random.Random, depth: int):
    kind = rng.randrange(6 if depth < 3 else 4)
    if kind == 0:
        return rng.choice([True, False, None])
    if kind == 1:
        return rng.choice([rng.randint(-1000, 1000), rng.uniform(-1e6, 1e6)])
    if kind in (2, 3):
        return _text(rng)
    if kind == 4:
        return [_any(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {_text(rng): _any(rng, depth + 1) for _ in range(rng.randrange(3))}


def _text(rng: random.Random) -> str:
    return "".join(rng.choice('ab "\\/\n\u00e9\u4e2d\U0001f600') for _ in range(rng.randrange(5)))


def _instance(rng: random.Random, schema, root: dict, depth: int = 0):
    """A value the schema admits, written as the recogniser writes objects: declared keys in order."""
    if schema is True or schema == {}:
        return _any(rng, depth)
    if "$ref" in schema:
        return _instance(rng, root["$defs"][schema["$ref"].split("/")[-1]], root, depth)
    if "anyOf" in schema:
        return _instance(rng, rng.choice(schema["anyOf"]), root, depth)
    if "enum" in schema:
        return rng.choice(schema["enum"])
    if "const" in schema:
        return schema["const"]
    kind = schema["type"]
    if isinstance(kind, list):
        kind = rng.choice(kind)
    if kind == "object" and "properties" in schema:
        return {
            name: _instance(rng, sub, root, depth + 1)
            for name, sub in schema["properties"].items()
            if name in schema["required"] or rng.random() < 0.5
        }
    if kind == "object":
        extra = schema["additionalProperties"]
        return {_text(rng): _instance(rng, extra, root, depth + 1) for _ in range(rng.randrange(3))}
    if kind == "array":
        count = rng.randint(schema.get("minItems", 0), schema.get("maxItems", 3))
        return [_instance(rng, schema["items"], root, depth + 1) for _ in range(count)]
    return {
        "string": lambda: _text(rng),
        "integer": lambda: rng.randint(-(10**6), 10**6),
        "number": lambda: rng.choice(
            [rng.randint(-9, 9), rng.uniform(-1e6, 1e6) * 10 ** rng.randint(-30, 30)]
        ),
        "boolean": lambda: rng.random() < 0.5,
        "null": lambda: None,
    }[kind]()


def _root(rng: random.Random) -> dict:
    """A random schema, a third of them with a definition that one of its properties refers to."""
    schema = _schema(rng)
    if rng.random() < 0.33:
        schema = {
            "$defs": {"Item": schema},
            "type": "object",
            "properties": {
                "item": {"$ref": "#/$defs/Item"},
                "more": {"type": "array", "items": {"$ref": "#/$defs/Item"}},
            },
            "required": ["item"],
            "additionalProperties": False,
        }
    return schema


def _text_of(rng: random.Random, value) -> bytes:
    indent = rng.choice([None, None, 1, 2])
    separators = rng.choice([None, (",", ":"), (", ", ": ")])
    return json.dumps(value, indent=indent, separators=separators, ensure_ascii=False).encode()


def _feed(grammar: SchemaGrammar, text: bytes, state=None):
    return feed(grammar.start if state is None else state, text, grammar)


def _valid(schema, text: bytes) -> bool:
    def no_constants(name):
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return jsonschema.Draft202012Validator(schema).is_valid(value)


def test_every_value_a_schema_admits_is_recognised_prefix_by_prefix():
    """On 300 random schemas, values drawn from each (declared keys in order, random spacing) pass every
    prefix, and are whole exactly at their end; jsonschema agrees they are valid, so the generator is right."""
    rng = random.Random(0)
    for _ in range(300):
        schema = _root(rng)
        grammar = compile_schema(schema)
        for _ in range(5):
            text = _text_of(rng, _instance(rng, schema, schema))
            assert _valid(schema, text), (schema, text)
            state = grammar.start
            for i, byte in enumerate(text):
                state = grammar.advance(state, byte)
                assert state is not None, (schema, text, i)
            assert grammar.complete(state), (schema, text)
            assert _feed(grammar, text + b" ") is None  # a whole value ends there, not even blanks after it


def test_whatever_the_recogniser_calls_whole_is_valid_under_the_schema():
    """Mutated values, and values of other schemas, that the recogniser calls whole parse and validate under
    jsonschema (soundness: what a constrained answer can be is a subset of what the schema admits)."""
    rng = random.Random(1)
    alphabet = '{}[]",:0123456789-+.eE \ntfnrulsaxé\\'
    whole = 0
    for _ in range(300):
        schema = _root(rng)
        grammar = compile_schema(schema)
        other = _root(rng)
        texts = [_text_of(rng, _instance(rng, other, other)) for _ in range(3)]
        for _ in range(10):
            text = list(_text_of(rng, _instance(rng, schema, schema)).decode())
            mutate(rng, text, alphabet)
            texts.append("".join(text).encode())
        for text in texts:
            if grammar.complete(_feed(grammar, text)):
                whole += 1
                assert _valid(schema, text), (schema, text)
    assert whole > 500  # many mutated values stay whole: the check ran on them


@pytest.mark.parametrize(
    "schema, text, whole",
    [
        ({"type": "integer"}, b"12", True),
        ({"type": "integer"}, b"1.5", False),  # integers are written without a fraction
        ({"type": "integer"}, b"1e3", False),
        ({"enum": [1, 12]}, b"1", True),  # one literal goes on from the other
        ({"enum": [1, 12]}, b"12", True),
        ({"enum": [1, 12]}, b"123", False),
        ({"enum": ["a", "b"]}, b'"c"', False),
        ({"type": "string", "enum": ["a", 1]}, b"1", False),  # values not of the type are dropped
        ({"const": {"k": [1, 2]}}, b'{"k":[1,2]}', True),
        ({"const": {"k": [1, 2]}}, b'{"k": [1, 2]}', False),  # a literal is written compactly
        ({"type": "object", "properties": {"a": {}}, "required": ["a"]}, b"{}", False),
        ({"type": "object", "properties": {"a": {}, "b": {}}}, b'{"b": 1}', True),  # optional a skipped
        ({"type": "object", "properties": {"a": {}, "b": {}}}, b'{"b": 1, "a": 2}', False),  # schema order
        ({"type": "object", "properties": {"a": {}}}, b'{"a": 1, "a": 2}', False),
        ({"type": "object", "properties": {"a": {}}}, b'{"z": 1}', False),  # only declared keys
        ({"type": "object", "additionalProperties": False}, b"{}", True),
        ({"type": "object", "additionalProperties": False}, b'{"a": 1}', False),
        ({"type": "object", "additionalProperties": {"type": "null"}}, b'{"x": null, "\\u00e9": null}', True),
        ({"type": "array", "minItems": 1, "maxItems": 2}, b"[]", False),
        ({"type": "array", "minItems": 1, "maxItems": 2}, b"[1, [2]]", True),
        ({"type": "array", "minItems": 1, "maxItems": 2}, b"[1, 2, 3]", False),
        ({"type": "array", "maxItems": 0}, b"[]", True),
        ({"type": ["string", "null"]}, b"null", True),
        (
            {"anyOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"type": "array"}]},
            b"[]",
            True,
        ),
        ({"$ref": "#"}, b"1", False),  # a reference to itself admits nothing
        (True, b'{"any": ["json", 1.5e-3, null]}', True),
    ],
)
def test_cases(schema, text, whole):
    assert compile_schema(schema).complete(_feed(compile_schema(schema), text)) == whole


def test_a_recursive_schema_nests_to_the_depth_cap():
    tree = {
        "$defs": {
            "Node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/Node"}}},
            }
        },
        "$ref": "#/$defs/Node",
    }
    grammar = compile_schema(tree)
    assert grammar.complete(_feed(grammar, b'{"kids": [{"kids": []}, {}]}'))
    deep = b'{"kids": [' * (MAX_DEPTH // 2)
    assert _feed(grammar, deep) is not None
    assert _feed(grammar, deep + b'{"kids": [') is None


def test_an_ambiguity_that_doubles_with_each_nesting_is_cut_at_the_thread_cap():
    """Two identical alternatives of nested arrays: each "[" doubles the threads followed; the text goes no
    further once they would pass MAX_THREADS, rather than each byte costing twice the last."""
    branch = {"type": "array", "items": {"$ref": "#/$defs/A"}}
    grammar = compile_schema({"$defs": {"A": {"anyOf": [branch, dict(branch)]}}, "$ref": "#/$defs/A"})
    levels = MAX_THREADS.bit_length() - 1  # 2 ** levels threads: at the cap
    assert len(_feed(grammar, b"[" * levels)) == MAX_THREADS
    assert _feed(grammar, b"[" * (levels + 1)) is None
    assert grammar.complete(_feed(grammar, b"[[]]"))


@pytest.mark.parametrize(
    "schema, named",
    [
        ({"type": "string", "pattern": "a+"}, "'pattern'"),
        ({"type": "string", "format": "date"}, "'format'"),
        ({"type": "integer", "minimum": 0}, "'minimum'"),
        ({"oneOf": [{"type": "string"}]}, "'oneOf'"),
        (
            {"type": "object", "properties": {"a": {"maxLength": 3}}},
            "#/properties/a: the keyword 'maxLength'",
        ),
        ({"allOf": [{}, {}]}, "allOf"),
        ({"anyOf": [{}], "type": "string"}, "'type'"),
        ({"$ref": "https://example.com/s.json"}, "$ref"),
        ({"$ref": "#/$defs/Missing"}, "points at nothing"),
        ({"type": "object", "required": ["a"]}, "'a' is not in 'properties'"),
        ({"type": "array", "minItems": 3, "maxItems": 1}, "minItems"),
        ({"type": "string", "enum": [1, 2]}, "no value"),
        ({"type": "thing"}, "unknown type"),
        (False, "admits no value"),
        ([1], "must be an object"),
    ],
)
def test_schemas_it_cannot_hold_an_answer_to_are_refused_naming_why(schema, named):
    with pytest.raises(SchemaError, match=None) as e:
        compile_schema(schema)
    assert named in str(e.value)


def test_the_trie_walk_over_schema_states_equals_a_brute_force_scan():
    rng = random.Random(2)
    alphabet = b'{}[]",:0123456789-.eE \ntfnrulabkxy\\\xc3\xa9'
    pieces = [None] + [bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
    schema = {
        "type": "object",
        "properties": {
            "a": {"type": "integer"},
            "b": {"type": "array", "items": {"enum": ["x", "xy", 1]}, "maxItems": 2},
            "k": {"anyOf": [{"type": "string"}, {"type": "null"}]},
        },
        "required": ["b"],
    }
    grammar = compile_schema(schema)
    mask = GrammarMask(TokenTrie(pieces, [0]), grammar)
    states = {grammar.start}
    for text in (b'{"a": -12, "b": ["xy", 1], "k": "t\\u00e9"}', b'{"b": [], "k": null}'):
        state = grammar.start
        for byte in text:
            state = grammar.advance(state, byte)
            states.add(state)
    for state in states:
        allowed = set(mask.allowed(state).nonzero().flatten().tolist())
        brute = {t for t, piece in enumerate(pieces) if piece and _feed(grammar, piece, state) is not None}
        assert allowed == brute | ({0} if grammar.complete(state) else set()), state
