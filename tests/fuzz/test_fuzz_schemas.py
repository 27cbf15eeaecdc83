"""Garbage schemas and tools from a client: each gets a SchemaError or ToolError (a 400), never another
exception; a schema that compiles takes any bytes without raising."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from swarmllm.api.json_schema import SchemaError, compile_schema
from swarmllm.api.tools import ToolCalling, ToolError, message_text

KEYWORDS = [
    "type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum", "const",
    "anyOf", "allOf", "$ref", "$defs", "title", "pattern",
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
