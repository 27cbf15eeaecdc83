"""Typed session messages: each survives the wire format, and malformed ones are refused by name."""

import asyncio

import pytest
import torch

from swarmllm.wire import Message, RequestError
from swarmllm.wire.framing import DEFAULT_LIMITS, Frame, Kind, encode_frame, read_frame
from swarmllm.wire.messages import (
    ForwardRequest,
    OpenSession,
    PushTarget,
    Repoint,
    Step,
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
