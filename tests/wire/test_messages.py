"""Typed session messages: each survives the wire format, and malformed ones are refused by name."""

import asyncio

import pytest
import torch

from swarmllm.wire import Message, RequestError
from swarmllm.wire.framing import DEFAULT_LIMITS, Frame, Kind, encode_frame, read_frame
from swarmllm.wire.messages import (
    BackwardReply,
    BackwardRequest,
    ForwardReply,
    ForwardRequest,
    OpenSession,
    PushTarget,
    Repoint,
    Step,
    StepReply,
    parse_session_input,
)


def through_the_wire(message: Message) -> Message:
    """Encode a message as a frame and decode it again, as a peer would receive it."""

    async def roundtrip() -> Message:
        reader = asyncio.StreamReader()
        for part in encode_frame(Frame(Kind.MESSAGE, 1, message), DEFAULT_LIMITS):
            reader.feed_data(bytes(part))
        reader.feed_eof()
        return (await read_frame(reader, DEFAULT_LIMITS)).message

    return asyncio.run(roundtrip())


def test_session_messages_round_trip():
    opening = OpenSession(0, 4, 2, 64, "s" * 24, "QmPrevious")
    assert OpenSession.parse(through_the_wire(opening.to_message())) == opening
    hidden, mask = torch.randn(2, 3, 8), torch.tensor([[False, True, True], [True, True, True]])
    step = Step(5, hidden, mask, step=7, push=[PushTarget("QmNext", "t" * 20)], push_timeout_s=1.5)
    parsed = parse_session_input(through_the_wire(step.to_message()))
    assert isinstance(parsed, Step)
    assert (parsed.position, parsed.step, parsed.push, parsed.push_timeout_s) == (5, 7, step.push, 1.5)
    assert torch.equal(parsed.hidden, hidden) and torch.equal(parsed.key_mask, mask)
    assert parse_session_input(through_the_wire(Repoint("QmNew").to_message())) == Repoint("QmNew")
    forward = ForwardRequest.parse(through_the_wire(ForwardRequest(1, 3, hidden).to_message()))
    assert (forward.start, forward.end, forward.key_mask) == (1, 3, None)


def test_ladder_pairs_round_trip_and_standard_layouts_stay_positional():
    """p travels by name beside r where a boundary carries the ladder pair; without it every message keeps the
    positional layout that standard models (and older peers) use."""
    r, p, mask = torch.randn(2, 3, 8), torch.randn(2, 3, 8), torch.ones(2, 3, dtype=torch.bool)
    step = Step(4, r, mask, step=2, push=[PushTarget("QmNext", "t" * 20)], pending=p)
    parsed = parse_session_input(through_the_wire(step.to_message()))
    assert (
        torch.equal(parsed.hidden, r)
        and torch.equal(parsed.pending, p)
        and torch.equal(parsed.key_mask, mask)
    )
    assert Step(4, r, mask).to_message().meta.get("tensors") is None
    assert parse_session_input(through_the_wire(Step(4, r).to_message())).pending is None

    hidden, pending = StepReply.states(through_the_wire(StepReply(4, 2, r, pending=p).to_message()))
    assert torch.equal(hidden, r) and torch.equal(pending, p)
    assert StepReply(4, 2, r).to_message().meta.get("tensors") is None

    forward = ForwardRequest.parse(through_the_wire(ForwardRequest(2, 4, r, mask, pending=p).to_message()))
    assert torch.equal(forward.pending, p) and torch.equal(forward.key_mask, mask)
    reply = ForwardReply.parse(through_the_wire(ForwardReply(r, p).to_message()))
    assert torch.equal(reply.hidden, r) and torch.equal(reply.pending, p)
    plain = ForwardReply(r).to_message()
    assert plain.meta == {} and len(plain.tensors) == 1  # what servers always answered to a forward

    g, gp = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    backward = BackwardRequest.parse(
        through_the_wire(BackwardRequest(2, 4, r, g, pending=p, grad_pending=gp).to_message())
    )
    assert all(
        torch.equal(a, b) for a, b in ((backward.hidden, r), (backward.grad, g), (backward.pending, p))
    )
    assert torch.equal(backward.grad_pending, gp)
    grads = BackwardReply.parse(through_the_wire(BackwardReply(g, grad_pending=gp).to_message()))
    assert (
        torch.equal(grads.grad_hidden, g)
        and torch.equal(grads.grad_pending, gp)
        and grads.grad_prompts is None
    )


def test_pending_scales_without_pending_are_refused():
    scales = torch.ones(1, 3, 1, dtype=torch.bfloat16)
    message = Message(
        {"position": 0, "tensors": ["hidden", "pending_scales"]}, [torch.randn(1, 3, 8), scales]
    )
    with pytest.raises(RequestError, match="pending_scales without pending"):
        parse_session_input(message)


def test_a_reorder_round_trips_and_bad_ones_are_refused_by_name():
    step = Step(6, torch.randn(3, 1, 8), step=9, reorder=(2, 0, 0))
    assert parse_session_input(through_the_wire(step.to_message())).reorder == (2, 0, 0)
    assert parse_session_input(through_the_wire(Step(6, torch.randn(3, 1, 8)).to_message())).reorder is None
    bad = [
        ({"reorder": [0, 3, 1]}, torch.zeros(3, 1, 2), "row numbers in \\[0, 3\\)"),
        ({"reorder": [0, -1, 1]}, torch.zeros(3, 1, 2), "row numbers"),
        ({"reorder": [0, 1.0, 1]}, torch.zeros(3, 1, 2), "row numbers"),
        ({"reorder": "012"}, torch.zeros(3, 1, 2), "row numbers"),
        ({"reorder": [0, 1]}, torch.zeros(3, 1, 2), "a row number for each of its rows"),
        ({"reorder": [0, 1, 2]}, torch.zeros(3, 2, 2), "one-token step"),
        ({"reorder": [0, 1, 2], "whole": [6, 9]}, torch.zeros(3, 1, 2), "one-token step"),
        ({"reorder": [0, 1, 2]}, torch.zeros(3, 2), "\\[batch, tokens, hidden\\], got 2-d"),
        ({"whole": [6, 9]}, torch.zeros(3), "got 1-d"),
    ]
    for meta, hidden, match in bad:
        with pytest.raises(RequestError, match=match):
            parse_session_input(Message({"kind": "step", "position": 6, **meta}, [hidden]))


@pytest.mark.parametrize(
    ("message", "match"),
    [
        (Message({"start": 0, "end": "4", "batch_size": 1, "max_length": 8}), "end must be an integer"),
        (
            Message({"start": 0, "end": 4, "batch_size": 1, "max_length": 8, "session_id": "short"}),
            "16 to 128",
        ),
        (Message({"start": 0, "end": 4, "batch_size": True, "max_length": 8}), "batch_size"),
    ],
)
def test_bad_openings_are_refused_by_name(message, match):
    with pytest.raises(RequestError, match=match):
        OpenSession.parse(message)


@pytest.mark.parametrize(
    ("meta", "tensors", "match"),
    [
        ({"position": 0}, [], "tensors"),
        ({}, [torch.zeros(1, 1, 2)], "position"),
        ({"position": 0, "push": [{"peer_id": 3}]}, [torch.zeros(1, 1, 2)], "push"),
        ({"position": 0, "push": "x"}, [torch.zeros(1, 1, 2)], "push"),
        ({"position": 0, "push_timeout_s": "1"}, [torch.zeros(1, 1, 2)], "push_timeout_s"),
        ({"kind": "repoint"}, [], "accept_push_from"),
        ({"kind": "teleport", "position": 0}, [torch.zeros(1, 1, 2)], "unknown session message kind"),
    ],
)
def test_bad_session_inputs_are_refused_by_name(meta, tensors, match):
    with pytest.raises(RequestError, match=match):
        parse_session_input(Message(meta, tensors))
