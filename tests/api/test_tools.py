"""Tool calling's pure parts: the answer schema each tool choice allows (checked with jsonschema and the
recogniser), the instruction and the conversation the model reads, the parse of its answer, and refusals."""

import json
import random

import jsonschema
import pytest
from tool_specs import WEATHER

from swarmllm.api.json_mode import feed
from swarmllm.api.json_schema import compile_schema
from swarmllm.api.tools import ResponseStream, ToolCalling, ToolError, message_text

TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: no arguments

CALL_WEATHER = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]}
CALL_TIME = {"tool_calls": [{"name": "get_time", "arguments": {}}]}
CALL_BOTH = {"tool_calls": CALL_WEATHER["tool_calls"] + CALL_TIME["tool_calls"]}
ANSWERS = {
    "weather": CALL_WEATHER,
    "time": CALL_TIME,
    "both": CALL_BOTH,
    "response": {"response": "It is sunny."},
    "bad argument": {"tool_calls": [{"name": "get_weather", "arguments": {"city": 3}}]},
    "unknown tool": {"tool_calls": [{"name": "get_news", "arguments": {}}]},
    "no call": {"tool_calls": []},
    "time with arguments": {"tool_calls": [{"name": "get_time", "arguments": {"x": 1}}]},
}


def _admits(schema, value) -> bool:
    """Whether the recogniser takes the value as written (indented), checked against jsonschema's word."""
    grammar = compile_schema(schema)
    ours = grammar.complete(feed(grammar.start, json.dumps(value, indent=2).encode(), grammar))
    assert not ours or jsonschema.Draft202012Validator(schema).is_valid(value)
    return ours


@pytest.mark.parametrize(
    "choice, parallel, admitted",
    [
        ("auto", True, {"weather", "time", "both", "response"}),
        (None, True, {"weather", "time", "both", "response"}),  # OpenAI's default with tools: auto
        ("required", True, {"weather", "time", "both"}),
        ("required", False, {"weather", "time"}),
        ("auto", False, {"weather", "time", "response"}),
        ({"type": "function", "function": {"name": "get_time"}}, True, {"time"}),
    ],
)
def test_each_choice_admits_its_answers(choice, parallel, admitted):
    schema = ToolCalling([WEATHER, TIME], choice, parallel).schema
    assert {name for name, value in ANSWERS.items() if _admits(schema, value)} == admitted


def test_the_instruction_lists_the_tools_and_the_answer_format():
    auto = ToolCalling([WEATHER, TIME], "auto").instruction()
    listed = json.loads(auto.split("\n")[1])
    assert listed == [
        {
            "name": "get_weather",
            "description": "The current weather in a city",
            "parameters": WEATHER["function"]["parameters"],
        },
        {
            "name": "get_time",
            "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
        },
    ]
    assert '"tool_calls"' in auto and '"response"' in auto
    required = ToolCalling([WEATHER], "required").instruction()
    assert '"response"' not in required
    named = ToolCalling([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}).instruction()
    assert "'get_time' now" in named


def test_the_conversation_carries_the_instruction_and_earlier_calls_in_the_answer_format():
    tools = ToolCalling([WEATHER], "auto")
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
    }
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "-3 C, snow"},
    ]
    out = tools.messages(history)
    assert out[0] == {"role": "system", "content": tools.instruction()}
    assert out[2] == {
        "role": "assistant",
        "content": '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo"}}]}',
    }
    assert out[1:] == [{"role": m["role"], "content": message_text(m)} for m in history]
    assert out[3] == {"role": "tool", "content": "-3 C, snow"}
    with_system = tools.messages([{"role": "system", "content": "Be brief."}, *history])
    assert with_system[0]["content"] == "Be brief.\n\n" + tools.instruction() and len(with_system) == 4
    broken = {**call, "function": {"name": "get_weather", "arguments": "{city"}}
    with pytest.raises(ToolError) as e:
        tools.messages([{"role": "assistant", "content": None, "tool_calls": [broken]}])
    assert e.value.param == "messages"


def test_an_answer_parses_into_calls_or_content():
    content, calls = ToolCalling.parse(json.dumps(CALL_BOTH, indent=2))
    assert content is None
    assert [(c["type"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("function", "get_weather", {"city": "Paris", "unit": "celsius"}),
        ("function", "get_time", {}),
    ]
    assert len({c["id"] for c in calls}) == 2 and all(c["id"].startswith("call_") for c in calls)
    assert ToolCalling.parse('{"response": "It is sunny."}') == ("It is sunny.", [])
    assert ToolCalling.parse('{"tool_calls": [{"na') == ('{"tool_calls": [{"na', [])  # cut short: the text


@pytest.mark.parametrize(
    "tools, choice, param, named",
    [
        ([WEATHER, WEATHER], "auto", "tools", "same name"),
        ([{"type": "retrieval"}], "auto", "tools", "type function"),
        ([{"type": "function", "function": {"description": "x"}}], "auto", "tools", "needs a name"),
        ([WEATHER], {"type": "function", "function": {"name": "get_news"}}, "tool_choice", "among the tools"),
        ([WEATHER], "always", "tool_choice", "none, auto, required"),
        (
            [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"d": {"uniqueItems": True}}},
                    },
                }
            ],
            "auto",
            "tools",
            "'uniqueItems'",
        ),
    ],
)
def test_what_it_cannot_follow_is_refused_naming_the_field(tools, choice, param, named):
    with pytest.raises(ToolError) as e:
        ToolCalling(tools, choice)
    assert e.value.param == param and named in str(e.value)


def test_a_response_streams_as_its_text_decodes_and_a_call_streams_nothing():
    """Random texts (escapes, non-ASCII, emoji as surrogate pairs), written as a response with random spacing
    and cut into random pieces: what comes out is at each point a prefix of the text, and at the end all of it;
    a response cut short parses to what it has; a call gives out nothing."""
    rng = random.Random(3)
    alphabet = 'ab "\\/\n\t\u00e9\u4e2d\U0001f600\x01'
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randrange(12)))
        answer = json.dumps({"response": text}, indent=rng.choice([None, 2]), ensure_ascii=rng.random() < 0.5)
        stream, out, at = ResponseStream(), "", 0
        while at < len(answer):
            step = rng.randint(1, 5)
            out += stream.feed(answer[at : at + step])
            at += step
            assert text.startswith(out), (answer, out)
            cut_content, calls = ToolCalling.parse(answer[:at])
            assert (
                text.startswith(cut_content) or at < len(answer) and cut_content == answer[:at] and not calls
            )
        assert out == text and ToolCalling.parse(answer) == (text, [])
    stream = ResponseStream()
    assert "".join(stream.feed(c) for c in json.dumps(CALL_BOTH)) == ""
