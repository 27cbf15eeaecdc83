"""The Responses API's translation into chat (`api.responses`), without a swarm: input items as chat messages,
tools and formats as chat nests them, and chat's errors named with the Responses fields."""

import pytest

from swarmllm.api.responses import _renamed, chat_tool_choice, chat_tools, input_messages, response_format
from swarmllm.api.schemas import ApiError


def test_input_items_become_the_chat_messages_they_mean():
    assert input_messages("hi") == [{"role": "user", "content": "hi"}]
    items = [
        {"role": "developer", "content": "Be brief."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather "},
                                                          {"type": "input_text", "text": "in Paris?"}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Lyon"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": {"sky": "grey"}},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny, and grey."}]},
    ]  # fmt: skip
    calls = [
        {
            "id": "c1",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
        },
        {
            "id": "c2",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Lyon"}'},
        },
    ]
    assert input_messages(items) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": calls},  # calls made together: one turn
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": '{"sky": "grey"}'},
        {"role": "assistant", "content": "Sunny, and grey."},
    ]


@pytest.mark.parametrize(
    "items",
    [
        [],
        5,
        [5],
        [{"type": "input_image", "image_url": "data:"}],
        [{"role": "user", "content": [{"type": "input_image", "image_url": "data:"}]}],
        [{"role": "tool", "content": "x"}],
        [{"type": "function_call", "name": "f", "arguments": {"a": 1}}],
        [{"type": "reasoning", "summary": []}],
    ],
)
def test_items_it_cannot_read_are_refused_naming_input(items):
    with pytest.raises(ApiError) as refused:
        input_messages(items)
    assert refused.value.status == 400 and refused.value.body["error"]["param"] == "input"


def test_tools_and_formats_as_chat_nests_them():
    tool = {
        "type": "function",
        "name": "f",
        "description": "does f",
        "parameters": {"type": "object"},
        "strict": True,
    }
    assert chat_tools([tool]) == [
        {
            "type": "function",
            "function": {"name": "f", "description": "does f", "parameters": {"type": "object"}},
        }
    ]
    assert chat_tools(None) is None
    for bad in ({"type": "function"}, [{"type": "web_search"}], ["f"]):
        with pytest.raises(ApiError) as refused:
            chat_tools(bad)
        assert refused.value.body["error"]["param"] == "tools"
    assert chat_tool_choice({"type": "function", "name": "f"}) == {
        "type": "function",
        "function": {"name": "f"},
    }
    assert chat_tool_choice("required") == "required"
    schema = {"type": "json_schema", "name": "Color", "schema": {"type": "object"}, "strict": True}
    assert response_format({"format": schema}) == {
        "type": "json_schema",
        "json_schema": {"name": "Color", "schema": {"type": "object"}, "strict": True},
    }
    assert response_format({"format": {"type": "json_object"}}) == {"type": "json_object"}
    assert response_format(None) is None and response_format({}) is None


def test_chat_errors_are_named_with_the_responses_fields():
    chat = ApiError(
        400, "Invalid value for 'max_tokens': too small", "invalid_request_error", "max_tokens", "x"
    )
    renamed = _renamed(chat)
    assert renamed.status == 400 and renamed.body["error"]["param"] == "max_output_tokens"
    assert renamed.body["error"]["message"] == "Invalid value for 'max_output_tokens': too small"
    kept = _renamed(ApiError(404, "no such model", "invalid_request_error", None, "model_not_found"))
    assert kept.body == ApiError(404, "no such model", "invalid_request_error", None, "model_not_found").body
