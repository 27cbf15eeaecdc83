"""Edges of the grammars (json_schema, json_constraints, regex), tool calling and the process forker, each checked
against an independent reference: `jsonschema` and Python's `json` and `re` for what an answer may be, pydantic's
own schemas for tools, and the operating system's list of open descriptors for the forker."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jsonschema
import pydantic
import pytest

from swarmllm.api.json_mode import feed
from swarmllm.api.json_schema import SchemaError, compile_schema
from swarmllm.api.tools import ToolCalling
from swarmllm.forking import ForkedProcess, Forker, forked
from swarmllm.local import ManagedProcess, ProcessFailed


def _whole(schema, text: str) -> bool:
    grammar = compile_schema(schema)
    return grammar.complete(feed(grammar.start, text.encode(), grammar))


def _valid(schema, text: str) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(json.loads(text))


# ---- tool calling: parameters with their own definitions -------------------------------------------------------


class Place(pydantic.BaseModel):
    city: str
    country: str | None = None


class Node(pydantic.BaseModel):
    name: str
    children: list["Node"] = []


class Weather(pydantic.BaseModel):
    place: Place
    unit: str = "celsius"


class Tree(pydantic.BaseModel):
    root: Node


def _tool(name: str, model: type[pydantic.BaseModel]) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": model.model_json_schema()}}


def test_tools_whose_parameters_refer_to_their_own_definitions_hold_answers_to_them():
    """pydantic writes a nested model's schema in `$defs` and refers to it with `#/$defs/...` (what
    `openai.pydantic_function_tool` sends): those references are into the parameters, not into the answer format
    that wraps them, so the answer schema must compile and hold each call's arguments to its own definitions
    (recursive ones too), as jsonschema reads the parameters."""
    tools = [_tool("weather", Weather), _tool("tree", Tree)]
    schemas = {"weather": Weather.model_json_schema(), "tree": Tree.model_json_schema()}
    assert "$defs" in schemas["weather"] and "$defs" in schemas["tree"]
    arguments = [
        ("weather", {"place": {"city": "Paris"}}, True),
        ("weather", {"place": {"city": "Paris", "country": "FR"}, "unit": "kelvin"}, True),
        ("weather", {"place": {"country": "FR"}}, False),
        ("weather", {"place": "Paris"}, False),
        ("tree", {"root": {"name": "a", "children": [{"name": "b", "children": [{"name": "c"}]}]}}, True),
        ("tree", {"root": {"name": "a", "children": [{"children": []}]}}, False),
    ]
    for choice in (None, "required", {"type": "function", "function": {"name": "tree"}}):
        calling = ToolCalling(tools, choice)
        for name, args, valid in arguments:
            if choice and isinstance(choice, dict) and name != "tree":
                continue
            assert jsonschema.Draft202012Validator(schemas[name]).is_valid(args) == valid
            text = json.dumps({"tool_calls": [{"name": name, "arguments": args}]})
            assert _whole(calling.schema, text) == valid, (choice, text)
            assert jsonschema.Draft202012Validator(calling.schema).is_valid(json.loads(text)) == valid
            if valid:
                _, calls = calling.parse(text)
                assert json.loads(calls[0]["function"]["arguments"]) == args


# ---- numbers with bounds, as validators read them ---------------------------------------------------------------


@pytest.mark.parametrize(
    "schema, text",
    [
        ({"type": "number", "exclusiveMaximum": 1}, "0.99999999999999999999"),  # reads as 1.0
        ({"type": "number", "exclusiveMinimum": 0.1}, "0.10000000000000000001"),  # reads as 0.1
        ({"type": "number", "exclusiveMaximum": 0.5, "minimum": 0}, "0.49999999999999999999"),
        ({"type": "number", "maximum": 2**54 + 3}, "18014398509481986.5"),  # reads as 2**54 + 4
    ],
)
def test_a_bounded_number_is_whole_only_if_it_holds_as_a_float(schema, text):
    """`json.loads` (and so jsonschema, pydantic) reads a number with a fraction as the nearest float: a text
    within an exclusive bound by less than a float's step reads as the bound itself, outside it."""
    assert not _valid(schema, text)
    assert not _whole(schema, text)


NUMBER_SCHEMAS = [
    {"type": "integer", "exclusiveMinimum": 10**30, "exclusiveMaximum": 10**30 + 2},
    {"type": "number", "exclusiveMinimum": 10**30, "exclusiveMaximum": 10**30 + 2},
    {"type": "integer", "exclusiveMinimum": 10**29 + 5, "maximum": 10**29 + 50, "multipleOf": 7},
    {"type": "number", "exclusiveMinimum": 0.1, "maximum": 0.10000000000000009},
    {"type": "number", "exclusiveMaximum": 1, "minimum": 0.9999999999999998},
    {"type": "number", "minimum": 2**54, "maximum": 2**54 + 3},
    {"type": "number", "exclusiveMinimum": -(10**25) - 10**10, "exclusiveMaximum": -(10**25)},
    {"type": "integer", "minimum": 1.2345678901234567e25, "maximum": 1.2345678901234568e25},
]


@pytest.mark.parametrize("schema", NUMBER_SCHEMAS, ids=range(len(NUMBER_SCHEMAS)))
def test_walks_through_bounded_numbers_never_dead_end_and_end_valid(schema):
    """Random byte walks through numbers whose bounds are long (past 28 digits, Decimal's default precision) or
    a float's step apart: every state the grammar lives in has a way on or is whole, and whatever it calls
    whole `jsonschema` calls valid."""
    rng = random.Random(json.dumps(schema))
    grammar = compile_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    ended = 0
    for _ in range(60):
        state, data = grammar.start, b""
        for _ in range(80):
            following = {b: s for b in b"-0123456789." if (s := grammar.advance(state, b)) is not None}
            assert following or grammar.complete(state), (schema, data)
            if grammar.complete(state) and (not following or rng.random() < 0.15):
                assert validator.is_valid(json.loads(data)), (schema, data)
                ended += 1
                break
            byte = rng.choice(list(following))
            data, state = data + bytes([byte]), following[byte]
    assert ended > 20


# ---- strings: characters a JSON string cannot hold as written ---------------------------------------------------


def test_a_pattern_that_needs_an_unwritable_character_never_leaves_the_answer_in_a_corner():
    """A held string is written without `\\u` escapes and JSON forbids raw control characters, so U+0001 or
    U+000B cannot be written: a pattern's way through them is no way on (the grammar must not start down it),
    and a pattern with no other way is refused."""
    schema = {"type": "string", "pattern": "^(a\x0b|a\x01c|b)$"}
    grammar = compile_schema(schema)
    for text in ('"', '"a', '"b'):
        state = feed(grammar.start, text.encode(), grammar)
        if state is not None:
            assert grammar.complete(state) or any(grammar.advance(state, b) for b in range(256)), text
    assert feed(grammar.start, b'"a', grammar) is None
    assert _whole(schema, '"b"') and _valid(schema, '"b"')
    with pytest.raises(SchemaError):
        compile_schema({"type": "string", "pattern": "^[\\x01-\\x07]+$"})
    # the escapable ones stay writable
    assert _whole({"type": "string", "pattern": "^\\t\\n$"}, '"\\t\\n"')
    assert re.fullmatch("\t\n", json.loads('"\\t\\n"'))


# ---- the forker: when the warm process dies ---------------------------------------------------------------------


def _env(mark: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "SWARMLLM_EDGE_TEST": mark}


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_start_through_a_forker_that_died_fails_without_leaking_descriptors():
    """A forker can die (the OOM killer, a kill of its pid): a start through it fails, and the pipes made for the
    child it never forked are closed (a swarm that restarts servers would run out of descriptors)."""
    env = _env("dead-forker")
    forker = Forker(env)
    os.kill(forker.proc.pid, signal.SIGKILL)
    forker.proc.wait(30)
    before = _open_fds()
    for _ in range(3):
        with pytest.raises((OSError, RuntimeError)):
            forker.spawn(["dht", "--help"], env)
    assert _open_fds() == before
    forker.close()


def test_a_forker_that_died_with_a_child_running_does_not_stop_later_starts():
    """The forker of one environment dies while its child runs (the child lives on, in its own session): a later
    start under another environment still starts and reports its exit status."""
    running = forked(["dht"], _env("dies"))
    try:
        assert isinstance(running, ForkedProcess)
        assert "Bootstrap peer" in running.stdout.readline()
        os.kill(running.forker_pid, signal.SIGKILL)
        later = forked(["dht", "--help"], _env("lives"))
        assert later.wait(120) == 0 and "--initial-peers" in later.stdout.read()
    finally:
        os.killpg(running.pid, signal.SIGKILL)


# ---- a local swarm's processes ----------------------------------------------------------------------------------


@pytest.mark.timeout(20)
def test_waiting_for_a_line_gives_up_after_its_timeout_even_while_other_lines_come():
    """A process that keeps logging (a server warning in a loop, a progress line) but never prints the line
    awaited: `wait_for` gives up after `timeout_s` in all, not after `timeout_s` without any line."""
    ticker = "import time\nwhile True:\n    print('tick', flush=True)\n    time.sleep(0.05)\n"
    proc = subprocess.Popen(
        [sys.executable, "-c", ticker], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    process = ManagedProcess("ticker", proc)
    try:
        assert process.wait_for(lambda line: line.startswith("tick"), 10).startswith("tick")
        began = time.monotonic()
        with pytest.raises(ProcessFailed, match="not ready in 1"):
            process.wait_for(lambda line: line.startswith("ready"), 1.0)
        assert time.monotonic() - began < 10
    finally:
        process.kill()


def test_an_integer_enum_or_const_written_with_a_zero_fraction_is_an_integer():
    """JSON schema calls 1.0 an integer (a number whose fraction is zero), as jsonschema does: an integer schema's
    `enum` or `const` of such values holds answers to them rather than being refused as of no value of its type."""
    for schema, texts in [
        ({"type": "integer", "enum": [1.0, 2, "x"]}, {"1.0": True, "2": True, '"x"': False, "1": False}),
        ({"type": "integer", "const": 3.0}, {"3.0": True, "3.5": False}),
        ({"type": ["integer", "string"], "enum": [4.0, 4.5, "y"]}, {"4.0": True, "4.5": False, '"y"': True}),
    ]:
        for text, whole in texts.items():
            assert _whole(schema, text) == whole, (schema, text)
            if whole:
                assert _valid(schema, text)
