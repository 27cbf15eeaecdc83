"""vLLM's guided decoding fields checked at the edge: which guide a request holds its answer to, and the 400s
(pydantic errors naming the field) for what cannot be held."""

import pytest
from pydantic import ValidationError

from swarmllm.api.schemas import ChatRequest, CompletionRequest, guided_logits

ASK = [{"role": "user", "content": "answer in json"}]


@pytest.mark.parametrize(
    "fields, guide",
    [
        ({}, None),
        ({"structured_outputs": None, "guided_json": None}, None),
        ({"guided_regex": r"\d+"}, ("regex", r"\d+")),
        ({"guided_choice": ["a", "b", "a"]}, ("choice", ("a", "b"))),
        ({"guided_json": '{"type": "integer"}'}, ("json_schema", {"type": "integer"})),
        (
            {"structured_outputs": {"json": {"type": "string"}, "regex": None}},
            ("json_schema", {"type": "string"}),
        ),
        ({"response_format": {"type": "json_object"}}, ("json_object", None)),
    ],
)
def test_a_request_holds_its_answer_to_its_one_guide(fields, guide):
    assert ChatRequest(model="m", messages=ASK, **fields).grammar() == guide
    if "response_format" not in fields:
        assert CompletionRequest(model="m", prompt="hi", **fields).grammar() == guide


@pytest.mark.parametrize(
    "fields, field, message",
    [
        ({"guided_regex": "(a"}, "guided_regex", "not closed"),
        ({"guided_regex": "(?=a)"}, "guided_regex", "groups other than"),
        ({"guided_choice": []}, "guided_choice", "non-empty"),
        ({"guided_json": "{bad"}, "guided_json", "json"),
        ({"guided_json": {"type": "integer", "multipleOf": 0.1}}, "guided_json", "whole number"),
        ({"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs", "not supported"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, None, "one guide at a time"),
        ({"guided_regex": "a", "response_format": {"type": "json_object"}}, None, "does not go with"),
    ],
)
def test_what_cannot_be_held_is_refused_naming_the_field(fields, field, message):
    with pytest.raises(ValidationError) as e:
        ChatRequest(model="m", messages=ASK, **fields)
    first = e.value.errors()[0]
    assert (first["loc"][0] if first["loc"] else None) == field and message in first["msg"], first


@pytest.mark.parametrize(
    "guide", [{}, {"yaml": ["a"]}, {"json": {}, "regex": "a"}, {"regex": "(a"}, ["regex", "a"]]
)
def test_guided_logits_refuses_what_is_not_one_guide(guide):
    with pytest.raises(ValueError):
        guided_logits(None, None, guide, 0)
