"""A push that reaches a server before the session it is for (the previous server pushed a prompt's first chunk
sooner than the client's opening arrived, over another connection) waits for that session, in order, within
bounds, instead of costing the client a fallback round trip."""

import asyncio

import pytest
import torch

from swarmllm.models import load_span
from swarmllm.server import handler as handler_module
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler
from swarmllm.wire import DirectServer, Identity, Message, RemoteError, connect_direct

HIDDEN = 64
OPENING = {"batch_size": 1, "max_length": 16, "start": 0, "end": 2}


@pytest.fixture(scope="module")
def span(llama_checkpoint):
    return load_span(str(llama_checkpoint), 0, 2)


@pytest.fixture
async def second(span):
    """A server of blocks [0, 2), a client's connection to it and a pusher's (the previous server's identity)."""
    server = DirectServer(RequestHandler(Backend(span, cache_tokens=256), dict).handlers(), Identity.generate())
    await server.start()
    client = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
    pusher_id = Identity.generate()
    pusher = await connect_direct(*server.address, pusher_id, expected_peer_id=None)
    yield client, pusher, pusher_id.peer_id
    await client.close()
    await pusher.close()
    await server.stop()


def expected(span, hidden):
    with torch.inference_mode():
        return span(hidden)


def push(token: str, position: int, step: int, hidden: torch.Tensor, **meta) -> Message:
    return Message({"session_id": token, "position": position, "step": step, **meta}, [hidden])


async def test_pushes_before_their_session_are_computed_in_order_once_it_opens(second, span):
    client, pusher, pusher_peer = second
    hidden = torch.randn(1, 5, HIDDEN)
    errors: list[RemoteError] = []
    # the prompt's two parts and the next step, all before the opening
    await pusher.notify("push", push("b" * 24, 0, 1, hidden[:, :3]), errors.append)
    await pusher.notify("push", push("b" * 24, 3, 2, hidden[:, 3:4]), errors.append)
    await pusher.notify("push", push("b" * 24, 4, 3, hidden[:, 4:]), errors.append)
    stream = await client.open_stream(
        "inference", Message({**OPENING, "session_id": "b" * 24, "accept_push_from": pusher_peer})
    )
    replies = [await stream.recv(timeout=10) for _ in range(3)]
    assert [r.meta["step"] for r in replies] == [1, 2, 3]
    out = torch.cat([r.tensors[0] for r in replies], dim=1)
    torch.testing.assert_close(out, expected(span, hidden), rtol=1e-5, atol=1e-5)
    # the session goes on with the client's own steps
    await stream.send(Message({"position": 5, "step": 4}, [torch.randn(1, 1, HIDDEN)]))
    assert (await stream.recv(timeout=10)).meta["step"] == 4
    assert errors == []


async def test_an_early_push_from_a_peer_the_session_does_not_name_is_refused_when_it_opens(second):
    client, pusher, _ = second
    refused = asyncio.get_running_loop().create_future()
    await pusher.notify("push", push("c" * 24, 0, 1, torch.randn(1, 2, HIDDEN)), refused.set_result)
    stranger = Identity.generate().peer_id
    stream = await client.open_stream(
        "inference", Message({**OPENING, "session_id": "c" * 24, "accept_push_from": stranger})
    )
    assert (await asyncio.wait_for(refused, 10)).code == "forbidden"
    await stream.send(Message({"position": 0, "step": 1}, [torch.randn(1, 2, HIDDEN)]))
    assert (await stream.recv(timeout=10)).meta["step"] == 1  # the push was not computed into the session


async def test_an_early_push_whose_session_never_opens_is_refused_after_its_wait(second):
    _, pusher, _ = second
    refused = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    began = loop.time()
    await pusher.notify(
        "push", push("d" * 24, 0, 1, torch.randn(1, 2, HIDDEN), push_timeout_s=0.3), refused.set_result
    )
    error = await asyncio.wait_for(refused, 10)
    assert error.code == "unknown_session" and "waited 0.3 s" in str(error)
    assert loop.time() - began >= 0.3


async def test_early_pushes_held_at_once_are_bounded(second, span, monkeypatch):
    """Past the bound, a push for no open session is refused at once; those held still land when theirs open."""
    monkeypatch.setattr(handler_module, "MAX_EARLY_PUSHES", 2)
    client, pusher, pusher_peer = second
    hidden = torch.randn(1, 2, HIDDEN)
    refused = asyncio.get_running_loop().create_future()
    errors: list[RemoteError] = []
    for token in ("e" * 24, "f" * 24):
        await pusher.notify("push", push(token, 0, 1, hidden), errors.append)
    await pusher.notify("push", push("g" * 24, 0, 1, hidden), refused.set_result)
    assert (await asyncio.wait_for(refused, 10)).code == "unknown_session"
    for token in ("e" * 24, "f" * 24):
        stream = await client.open_stream(
            "inference", Message({**OPENING, "session_id": token, "accept_push_from": pusher_peer})
        )
        reply = await stream.recv(timeout=10)
        torch.testing.assert_close(reply.tensors[0], expected(span, hidden), rtol=1e-5, atol=1e-5)
    assert errors == []


async def test_a_byte_bound_refuses_an_early_push_too_large_to_hold(second, monkeypatch):
    monkeypatch.setattr(handler_module, "MAX_EARLY_PUSH_BYTES", 1000)
    _, pusher, _ = second
    refused = asyncio.get_running_loop().create_future()
    await pusher.notify("push", push("h" * 24, 0, 1, torch.randn(1, 4, HIDDEN)), refused.set_result)
    assert (await asyncio.wait_for(refused, 10)).code == "unknown_session"
