"""Garbage schemas and tools from a client: each gets a SchemaError or ToolError (a 400), never another
exception; a schema that compiles takes any bytes without raising."""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmllm.api.json_schema import SchemaError, compile_schema
from swarmllm.api.regex import RegexError, compile_regex
from swarmllm.api.tools import ToolCalling, ToolError, message_text

KEYWORDS = [
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const",
    "anyOf", "allOf", "$ref", "$defs", "title", "pattern", "format", "minLength", "maxLength", "minimum",
    "maximum", "exclusiveMinimum", "exclusiveMaximum", "prefixItems", "oneOf", "discriminator",
]  # fmt: skip
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-3, 3)
    | st.sampled_from(
        [
            "object",
            "array",
            "string",
            "number",
            "integer",
            "boolean",
            "null",
            "#",
            "#/$defs/a",
            "#/properties/x",
            "a",
            "",
            "date",
            "uuid",
            "^[a-z]+$",
            "(a|b)*c",
            "\\d{2,3}",
            1.5,
            -0.25,
            1e300,
        ]
    )
)
JSON = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYWORDS) | st.sampled_from(["a", "x"]), inner, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema=JSON, text=st.binary(max_size=40))
def test_a_garbage_schema_is_refused_or_recognises_any_bytes(schema, text):
    try:
        grammar = compile_schema(schema)
    except SchemaError:
        return
    state = grammar.start
    for byte in text:
        state = grammar.advance(state, byte)
        if state is None:
            break
    grammar.complete(state)


@settings(max_examples=200, deadline=None)
@given(tools=st.lists(st.dictionaries(st.sampled_from(["type", "function", "x"]), JSON, max_size=3), max_size=3),
       choice=JSON)  # fmt: skip
def test_garbage_tools_and_choices_are_refused_with_the_field(tools, choice):
    try:
        ToolCalling(tools, choice)
    except ToolError as e:
        assert e.param in ("tools", "tool_choice")


FUNCTION = st.fixed_dictionaries({}, optional={"name": JSON, "arguments": JSON | st.text(max_size=12)})


@settings(max_examples=200, deadline=None)
@given(
    calls=st.lists(
        st.dictionaries(st.sampled_from(["function", "id"]), JSON | FUNCTION, max_size=2), max_size=3
    )
)
def test_garbage_tool_calls_in_the_history_are_refused_with_the_field(calls):
    try:
        message_text({"role": "assistant", "content": None, "tool_calls": calls})
    except ToolError as e:
        assert e.param == "messages"


def test_a_schema_nested_past_python_s_recursion_is_refused():
    schema: dict = {"type": "string"}
    for _ in range(5000):
        schema = {"type": "array", "items": schema}
    try:
        compile_schema(schema)
    except SchemaError as e:
        assert "deep" in str(e)
    else:
        raise AssertionError("a 5,000-deep schema compiled")


REGEX_TEXT = st.text(st.sampled_from(list("ab1.^$|()[]{}-,*+?\\dwsDWSbu0x:<>=!P")), max_size=16)


@settings(max_examples=500, deadline=None)
@given(pattern=REGEX_TEXT, texts=st.lists(st.text(st.sampled_from(list("ab1-.,{}")), max_size=6), max_size=8))
def test_a_garbage_pattern_is_refused_or_matches_only_what_python_finds(pattern, texts):
    """Any pattern text compiles or is a RegexError; what a compiled one matches, Python's `re` finds too
    (where Python compiles it)."""
    try:
        nfa = compile_regex(pattern)
    except RegexError:
        return
    try:
        python = re.compile(pattern)
    except re.error:
        return
    for text in texts:
        if nfa.matches(text):
            assert python.search(text) is not None, (pattern, text)
