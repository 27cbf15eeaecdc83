"""Anthropic's Messages API as the chat request it means (`api.messages`), as plain functions: a conversation's
blocks as chat messages (a user's tool results before its text, an assistant's tool_use blocks its tool calls),
tools, tool choices and structured output in chat's nesting, errors naming the field in Anthropic's form; and the
text assembler naming the stop sequence that ended a text."""

import json

import pytest

from swarmllm.api.generation import TextAssembler, chat_prompt
from swarmllm.api.messages import chat_messages, chat_tool_choice, chat_tools, error_body, response_format
from swarmllm.api.schemas import ApiError, ChatRequest
from swarmllm.api.streams import validated
from swarmllm.api.tools import ToolCalling, closed_json
from swarmllm.models.tiny import tiny_tokenizer


def test_a_conversation_of_blocks_is_chats_messages():
    use = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}
    body = {
        "system": [{"type": "text", "text": "Be brief. ", "cache_control": {"type": "ephemeral"}},
                   {"type": "text", "text": "Use tools."}],
        "messages": [
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, use]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18 C"}]},
                {"type": "text", "text": "And tomorrow?"},
            ]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_2", "content": "rain"}]},
        ],
    }  # fmt: skip
    call = {
        "id": "toolu_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    assert chat_messages(body) == [
        {"role": "system", "content": "Be brief. Use tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
        {"role": "tool", "content": "18 C"},
        {"role": "user", "content": "And tomorrow?"},
        {"role": "tool", "content": "rain"},  # (a user turn of results alone adds no empty user message)
    ]
    assert json.loads(call["function"]["arguments"]) == use["input"]


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0"),
        ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages.0.content.0"),
        ({"messages": [{"role": "user", "content": [{"type": "tool_use", "name": "f", "input": {}}]}]},
         "messages.0.content.0"),
        ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "name": "f", "input": "x"}]}]},
         "messages.0.content.0"),
        ({"messages": [{"role": "user", "content": "x"}], "system": [{"type": "image"}]}, "system"),
    ],
)  # fmt: skip
def test_what_a_text_model_cannot_take_is_refused_naming_where(body, named):
    with pytest.raises(ApiError) as refused:
        chat_messages(body)
    assert refused.value.status == 400 and refused.value.body["error"]["message"].startswith(f"{named}: ")


def test_tools_choices_and_formats_in_chats_nesting():
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    tools = [
        {"name": "get_weather", "description": "d", "input_schema": schema, "cache_control": {"type": "x"}}
    ]
    assert chat_tools(tools) == [
        {"type": "function", "function": {"name": "get_weather", "parameters": schema, "description": "d"}}
    ]
    with pytest.raises(ApiError, match="tools.0"):
        chat_tools([{"type": "web_search_20250305", "name": "web_search"}])  # a server tool
    assert chat_tool_choice(None) == (None, True)
    assert chat_tool_choice({"type": "auto"}) == ("auto", True)
    assert chat_tool_choice({"type": "any", "disable_parallel_tool_use": True}) == ("required", False)
    assert chat_tool_choice({"type": "none"}) == ("none", True)
    named = {"type": "function", "function": {"name": "get_weather"}}
    assert chat_tool_choice({"type": "tool", "name": "get_weather"}) == (named, True)
    with pytest.raises(ApiError, match="tool_choice"):
        chat_tool_choice("auto")
    assert response_format({"effort": "low"}) is None
    assert response_format({"format": {"type": "json_schema", "schema": schema}}) == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema},
    }
    with pytest.raises(ApiError, match="output_config"):
        response_format({"format": {"type": "json_object"}})


def test_errors_are_anthropics():
    for status, kind in ((400, "invalid_request_error"), (404, "not_found_error"), (503, "overloaded_error"),
                         (500, "api_error"), (422, "invalid_request_error")):  # fmt: skip
        body = error_body(ApiError(status, "what went wrong", "x", None))
        assert body == {"type": "error", "error": {"type": kind, "message": "what went wrong"}}


def test_the_assembler_names_the_stop_sequence_met():
    assembler = TextAssembler(lambda ids: "".join(chr(97 + i) for i in ids), ["zz", "cd"])
    text = "".join(assembler.add(i) for i in (0, 1, 2, 3, 4))
    assert text + assembler.finish() == "ab" and assembler.stop_string == "cd"
    plain = TextAssembler(lambda ids: "".join(chr(97 + i) for i in ids), ["zz"], eos_ids=[9])
    assert "".join(plain.add(i) for i in (0, 9)) == "a" and plain.stop_string is None


def test_a_continued_final_message_is_the_assistants_text_left_open():
    """vLLM's `continue_final_message` (an Anthropic prefill): the prompt ends inside the assistant's message, in
    the template and in the plain layout of a tokenizer without one; refused where the last message is not the
    assistant's text, or where the answer might call tools."""
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Red,"}]
    assert chat_prompt(tiny_tokenizer(), messages, continue_final=True) == "user: hi\nassistant: Red,"
    assert chat_prompt(tiny_tokenizer(), messages[:1]) == "user: hi\nassistant:"
    chat = {"model": "m", "messages": messages, "continue_final_message": True}
    assert validated(ChatRequest, chat).continue_final_message
    with pytest.raises(ApiError, match="the assistant's text") as refused:
        validated(ChatRequest, {**chat, "messages": messages[:1]})
    assert refused.value.body["error"]["param"] == "messages"
    tools = {"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]}
    with pytest.raises(ApiError, match="calls no tools"):
        validated(ChatRequest, {**chat, **tools})
    assert validated(ChatRequest, {**chat, **tools, "tool_choice": "none"}).continue_final_message


CALLS = {
    "tool_calls": [
        {
            "name": "Bash",
            "arguments": {"command": 'ls -la "/tmp"', "timeout": 1200, "flags": [True, None, -2.5e3]},
        },
        {"name": "Read", "arguments": {"path": "/x", "nested": {"a": [1, {"b": "c"}], "d": False}}},
    ]
}


def _within(cut, whole) -> bool:
    """`cut` is what a prefix of `whole`'s text holds of whole values: equal, or a container whose items are each
    within their counterparts (those it has, in order)."""
    if isinstance(cut, dict):
        return isinstance(whole, dict) and all(k in whole and _within(v, whole[k]) for k, v in cut.items())
    if isinstance(cut, list):
        return isinstance(whole, list) and len(cut) <= len(whole) and all(map(_within, cut, whole))
    return cut == whole and type(cut) is type(whole)


def test_calls_cut_short_are_their_arguments_so_far_at_every_cut():
    """At every cut of a calls answer: only calls whose name is whole, each with the whole values that a prefix of
    the whole call's holds (no string or number cut short taken for a whole one: "ls -la" cut to "ls -", 1200 cut
    to 12, are dropped); the whole text is its calls."""
    text = json.dumps(CALLS)
    whole = [(c["name"], c["arguments"]) for c in CALLS["tool_calls"]]
    seen = set()
    for end in range(len(text) + 1):
        cut = ToolCalling.cut_calls(text[:end])
        assert [name for name, _ in cut] == [name for name, _ in whole][: len(cut)], text[:end]
        for (_, arguments), (_, full) in zip(cut, whole, strict=False):
            assert _within(arguments, full), (text[:end], arguments)
        seen.add(json.dumps(cut))
        if '"timeout": 12' in text[:end] and '"timeout": 1200' not in text[:end]:
            assert "timeout" not in cut[0][1]
    assert ToolCalling.cut_calls(text) == whole and len(seen) > 10
    assert ToolCalling.cut_calls('{"response": "a cut answ') == []  # an answer, not a call
    assert closed_json("[1, 2, 3,") == [1, 2, 3] and closed_json("[1, 2, 3") == [1, 2]
    assert closed_json('{"a": "x\\') == {} and closed_json('{"a": ["x", "y') == {"a": ["x"]}
    assert closed_json("]") is None and closed_json('"abc') is None
