"""Structured output's schema recogniser against `jsonschema` (the reference validator) on random schemas, its
refusals, and the vocabulary walk over its states against a brute-force scan."""

import json
import random
from typing import Literal

import jsonschema
import pydantic
import pytest
from format_checks import FORMAT_CHECKER
from mutation import mutate
from random_schemas import instance_of, json_text, random_schema

from swarmllm.api.json_mode import DONE as JSON_DONE
from swarmllm.api.json_mode import MAX_DEPTH, GrammarMask, TokenTrie, feed
from swarmllm.api.json_mode import START as JSON_START
from swarmllm.api.json_schema import MAX_THREADS, SchemaError, SchemaGrammar, compile_schema


def _feed(grammar: SchemaGrammar, text: bytes, state=None):
    return feed(grammar.start if state is None else state, text, grammar)


def _valid(schema, text: bytes) -> bool:
    def no_constants(name):
        raise ValueError(name)

    try:
        value = json.loads(text, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return jsonschema.Draft202012Validator(schema, format_checker=FORMAT_CHECKER).is_valid(value)


def test_every_value_a_schema_admits_is_recognised_prefix_by_prefix():
    """On 300 random schemas, values drawn from each (declared keys in order, random spacing) pass every
    prefix, and are whole exactly at their end; jsonschema agrees they are valid, so the generator is right."""
    rng = random.Random(0)
    for _ in range(300):
        schema = random_schema(rng)
        grammar = compile_schema(schema)
        for _ in range(5):
            text = json_text(rng, instance_of(rng, schema, schema))
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
        schema = random_schema(rng)
        grammar = compile_schema(schema)
        other = random_schema(rng)
        texts = [json_text(rng, instance_of(rng, other, other)) for _ in range(3)]
        for _ in range(10):
            text = list(json_text(rng, instance_of(rng, schema, schema)).decode())
            mutate(rng, text, alphabet)
            texts.append("".join(text).encode())
        for text in texts:
            if grammar.complete(_feed(grammar, text)):
                whole += 1
                assert _valid(schema, text), (schema, text)
    assert whole > 500  # many mutated values stay whole: the check ran on them


BYTES = bytes(range(0x09, 0xF5))
CLOSING = b'"}],:123456789.'


def test_no_state_a_prefix_reaches_is_a_dead_end():
    """Random walks, byte by byte, from prefixes of valid and mutated values: wherever the recogniser still lives,
    some byte may follow or the text is whole (a held answer never writes itself into a corner: a month 13, a
    number past its maximum, a string too long for its pattern); walks that end whole are valid."""
    rng = random.Random(3)
    alphabet = '{}[]",:0123456789-+.eE \ntfnrulsaxé\\TZ@'
    steps = whole = 0
    for _ in range(200):
        schema = random_schema(rng)
        grammar = compile_schema(schema)
        for _ in range(4):
            text = list(json_text(rng, instance_of(rng, schema, schema)).decode())
            if rng.random() < 0.5:
                mutate(rng, text, alphabet)
            data = "".join(text).encode()
            data = data[: rng.randint(0, len(data))]
            state = _feed(grammar, data)
            for _ in range(80):
                if state is None:
                    break
                following = {b: s for b in BYTES if (s := grammar.advance(state, b)) is not None}
                assert following or grammar.complete(state), (schema, data)
                steps += 1
                if grammar.complete(state) and (not following or rng.random() < 0.3):
                    assert _valid(schema, data), (schema, data)
                    whole += 1
                    break
                closing = [b for b in CLOSING if b in following]
                byte = rng.choice(closing if closing and rng.random() < 0.7 else list(following))
                data, state = data + bytes([byte]), following[byte]
    assert steps > 5000 and whole > 300


def test_strings_hold_whole_utf8_characters_only():
    """Random bytes inside a string (leads, continuations, overlong and surrogate forms, ASCII): JSON mode, a
    schema's plain string and a held string accept them exactly when Python decodes them as UTF-8, so no answer
    closes a string on half a character."""
    rng = random.Random(4)
    pieces = [b"a", b"\xc3", b"\xa9", b"\x80", b"\xbf", b"\xe0", b"\xed", b"\xa0", b"\xf0", b"\x9f", b"\xf4",
              b"\x90", b"\xc0", b"\xf5", b"\xe4\xb8\xad", b"\xf0\x9f\x98\x80"]  # fmt: skip
    grammars = [None, compile_schema({"type": "string"}), compile_schema({"type": "string", "maxLength": 99})]
    checked = 0
    for _ in range(3000):
        body = b"".join(rng.choice(pieces) for _ in range(rng.randint(1, 5)))
        try:
            body.decode()
            valid = True
        except UnicodeDecodeError:
            valid = False
        checked += valid
        for grammar in grammars:
            if grammar is None:
                state = feed(JSON_START, b'{"k": "' + body + b'"}')
                assert (state is not None and state[1] == JSON_DONE) == valid, body
            else:
                assert grammar.complete(_feed(grammar, b'"' + body + b'"')) == valid, body
    assert 100 < checked < 2900  # both kinds met often


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
        ({"type": "string", "maxLength": 2}, '"\\n\U0001f600"'.encode(), True),  # two characters
        ({"type": "string", "maxLength": 2}, b'"\\u0041"', False),  # no \u escapes in a held string
        ({"type": "string", "minLength": 2}, '"é"'.encode(), False),
        ({"type": "string", "pattern": "^a"}, b'"abc"', True),
        ({"type": "string", "pattern": "b"}, b'"abc"', True),  # unanchored: anywhere
        ({"type": "string", "pattern": "^b"}, b'"abc"', False),
        ({"type": "string", "format": "date"}, b'"2023-02-29"', False),
        ({"type": "string", "format": "date"}, b'"2024-02-29"', True),
        ({"format": "uuid"}, b'"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"', True),  # a string, by its keyword
        ({"type": "integer", "minimum": 10}, b"9", False),
        ({"type": "integer", "minimum": 10}, b"90", True),
        ({"type": "integer", "exclusiveMaximum": 0}, b"-0", False),
        ({"type": "number", "exclusiveMinimum": 0, "maximum": 1}, b"0.001", True),
        ({"type": "number", "maximum": 1e3}, b"1e2", False),  # a bounded number has no exponent
        ({"type": "number", "maximum": 1.5}, b"1.50000", True),
        ({"type": "integer", "multipleOf": 5, "maximum": 12}, b"10", True),
        ({"type": "integer", "multipleOf": 5, "maximum": 12}, b"15", False),
        ({"type": "number", "multipleOf": 5}, b"-25", True),
        ({"type": "number", "multipleOf": 5}, b"25.0", False),  # a multiple is written as an integer
        (True, b'{"any": ["json", 1.5e-3, null]}', True),
    ],
)
def test_cases(schema, text, whole):
    assert compile_schema(schema).complete(_feed(compile_schema(schema), text)) == whole


class _Cat(pydantic.BaseModel):
    kind: Literal["cat"]
    lives: int


class _Dog(pydantic.BaseModel):
    kind: Literal["dog", "puppy"]
    good: bool


class _Owner(pydantic.BaseModel):
    pet: _Cat | _Dog = pydantic.Field(discriminator="kind")
    pair: tuple[int, str]


def test_pydantics_discriminated_unions_and_tuples():
    """What pydantic writes for a discriminated union (`oneOf` of `$ref`s with a `discriminator`) and a tuple
    (`prefixItems`, no more items): held, and what it holds pydantic parses."""
    grammar = compile_schema(_Owner.model_json_schema())
    for text, whole in [
        (b'{"pet": {"kind": "cat", "lives": 9}, "pair": [1, "a"]}', True),
        (b'{"pet": {"kind": "puppy", "good": true}, "pair": [1, "a"]}', True),
        (b'{"pet": {"kind": "cat", "good": true}, "pair": [1, "a"]}', False),
        (b'{"pet": {"kind": "dog", "good": true}, "pair": [1]}', False),
        (b'{"pet": {"kind": "dog", "good": true}, "pair": [1, "a", 2]}', False),
        (b'{"pet": {"kind": "dog", "good": true}, "pair": ["a", 1]}', False),
    ]:
        assert grammar.complete(_feed(grammar, text)) == whole, text
        if whole:
            _Owner.model_validate_json(text)


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
        ({"type": "number", "multipleOf": 0.5}, "whole number"),
        ({"not": {"type": "string"}}, "'not'"),
        ({"oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}, "oneOf"),  # both hold "ab"
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "oneOf"),  # both hold 1
        ({"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}, "prefixItems"),
        ({"type": "array", "items": [{}, {}]}, "prefixItems"),
        (
            {"type": "object", "properties": {"a": {"uniqueItems": True}}},
            "#/properties/a: the keyword 'uniqueItems'",
        ),
        ({"type": "string", "pattern": "(?=a)"}, "groups other than"),
        ({"type": "string", "pattern": "^\\d{5}$", "maxLength": 4}, "no string"),
        ({"type": "string", "format": "ipv6"}, "'ipv6' is not supported"),
        ({"type": "string", "format": "date", "pattern": "^2"}, "beside"),
        ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength"),
        ({"type": "integer", "minimum": 1.5, "exclusiveMaximum": 2}, "no number"),
        ({"type": "number", "maximum": "ten"}, "must be a number"),
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
            "d": {"type": "string", "format": "date"},
            "n": {"type": "integer", "minimum": -5, "maximum": 300},
            "s": {"type": "string", "maxLength": 3, "pattern": "^[^x]"},
            "t": {"type": "string", "maxLength": 30},  # its counts share masks but near the end
        },
        "required": ["b"],
    }
    grammar = compile_schema(schema)
    mask = GrammarMask(TokenTrie(pieces, [0]), grammar)
    states = {grammar.start}
    for text in (
        b'{"a": -12, "b": ["xy", 1], "k": "t\\u00e9", "d": "2024-02-29", "n": -5, "s": "\xc3\xa9\\n"}',
        b'{"b": [], "k": null, "n": 299, "t": "abcdefghijklmnopqrstuvwxyz\xc3\xa9bc"}',
    ):
        state = grammar.start
        for byte in text:
            state = grammar.advance(state, byte)
            states.add(state)
    for state in states:
        allowed = set(mask.allowed(state).nonzero().flatten().tolist())
        brute = {t for t, piece in enumerate(pieces) if piece and _feed(grammar, piece, state) is not None}
        assert allowed == brute | ({0} if grammar.complete(state) else set()), state
