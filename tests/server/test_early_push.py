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
from swarmllm.wire import (
    CallContext,
    DirectServer,
    Identity,
    Message,
    RemoteError,
    RequestError,
    connect_direct,
)

HIDDEN = 64
OPENING = {"batch_size": 1, "max_length": 16, "start": 0, "end": 2}


@pytest.fixture(scope="module")
def span(llama_checkpoint):
    return load_span(str(llama_checkpoint), 0, 2)


@pytest.fixture
async def server(span):
    """A server of blocks [0, 2)."""
    server = DirectServer(
        RequestHandler(Backend(span, cache_tokens=256), dict).handlers(), Identity.generate()
    )
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def second(server):
    """A client's connection to `server` and a pusher's (the previous server's identity)."""
    client = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
    pusher_id = Identity.generate()
    pusher = await connect_direct(*server.address, pusher_id, expected_peer_id=None)
    yield client, pusher, pusher_id.peer_id
    await client.close()
    await pusher.close()


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


async def test_one_peer_holds_only_its_share_of_the_early_pushes(server, second, span, monkeypatch):
    """A peer whose parked pushes fill its share (pushes for sessions that never open, say) is refused at once
    past it, by count or by bytes; another peer's early push still waits for its session and lands."""
    monkeypatch.setattr(handler_module, "MAX_EARLY_PUSHES_PER_PEER", 2)
    monkeypatch.setattr(handler_module, "MAX_EARLY_PUSH_BYTES_PER_PEER", 5000)
    client, pusher, _ = second
    hidden = torch.randn(1, 2, HIDDEN)  # 512 bytes
    for token in ("p" * 24, "q" * 24):
        await pusher.notify("push", push(token, 0, 1, hidden), lambda error: None)
    refused = asyncio.get_running_loop().create_future()
    await pusher.notify("push", push("r" * 24, 0, 1, hidden), refused.set_result)
    assert (await asyncio.wait_for(refused, 10)).code == "unknown_session"
    other_id = Identity.generate()
    other = await connect_direct(*server.address, other_id, expected_peer_id=None)
    try:
        too_big = asyncio.get_running_loop().create_future()
        await other.notify("push", push("s" * 24, 0, 1, torch.randn(1, 20, HIDDEN)), too_big.set_result)
        assert (await asyncio.wait_for(too_big, 10)).code == "unknown_session"  # 5120 bytes: past its share
        errors: list[RemoteError] = []
        await other.notify("push", push("t" * 24, 0, 1, hidden), errors.append)
        stream = await client.open_stream(
            "inference", Message({**OPENING, "session_id": "t" * 24, "accept_push_from": other_id.peer_id})
        )
        reply = await stream.recv(timeout=10)
        torch.testing.assert_close(reply.tensors[0], expected(span, hidden), rtol=1e-5, atol=1e-5)
        assert errors == []
    finally:
        await other.close()


async def test_a_byte_bound_refuses_an_early_push_too_large_to_hold(second, monkeypatch):
    monkeypatch.setattr(handler_module, "MAX_EARLY_PUSH_BYTES", 1000)
    _, pusher, _ = second
    refused = asyncio.get_running_loop().create_future()
    await pusher.notify("push", push("h" * 24, 0, 1, torch.randn(1, 4, HIDDEN)), refused.set_result)
    assert (await asyncio.wait_for(refused, 10)).code == "unknown_session"


async def test_a_parked_push_whose_connection_ends_leaves_no_entry_behind_an_identical_one(span):
    """Two pushes with the same content wait for one session (a replaced server pushes a step again, or a peer
    repeats one): when the later one's connection ends (its task is cancelled, as `serve_connection` does), it
    must leave quietly and free its place in the bounds, whatever the other holds."""
    handler = RequestHandler(Backend(span, cache_tokens=256), dict)
    hidden = torch.randn(1, 3, HIDDEN)
    token = "p" * 24
    waits = []
    for peer in ("first", "second"):
        context = CallContext(peer_id=peer, transport="direct", method="push")
        waits.append(asyncio.ensure_future(handler.rpc_push(push(token, 0, 1, hidden.clone()), context)))
    while sum(len(held) for held in handler._early.values()) < 2:
        await asyncio.sleep(0)  # (each task parks at its first step)
    first, second = waits
    second.cancel()
    (outcome,) = await asyncio.gather(second, return_exceptions=True)
    assert isinstance(outcome, asyncio.CancelledError), outcome
    assert [early.sender for early in handler._early[token]] == ["first"]
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert handler._early == {}


async def test_a_parked_push_refused_after_its_wait_frees_its_place_under_an_identical_one(span, monkeypatch):
    """The same with a wait that ends by its timeout: an identical push parked earlier but waiting longer (the
    wait bound was larger when it came) must not make the later one's clean-up fail."""
    from swarmllm.server import handler as handler_module

    handler = RequestHandler(Backend(span, cache_tokens=256), dict)
    hidden = torch.randn(1, 3, HIDDEN)
    token = "q" * 24
    context = CallContext(peer_id="peer", transport="direct", method="push")
    first = asyncio.ensure_future(handler.rpc_push(push(token, 0, 1, hidden.clone()), context))
    while token not in handler._early:
        await asyncio.sleep(0)
    monkeypatch.setattr(handler_module, "EARLY_PUSH_WAIT_S", 0.05)
    second = asyncio.ensure_future(handler.rpc_push(push(token, 0, 1, hidden.clone()), context))
    (outcome,) = await asyncio.gather(second, return_exceptions=True)
    assert isinstance(outcome, RequestError) and outcome.code == "unknown_session", outcome
    assert len(handler._early[token]) == 1
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert handler._early == {}


@pytest.fixture
async def server_of(span):
    """A server of blocks [0, 2) and its handler."""
    handler = RequestHandler(Backend(span, cache_tokens=256), dict)
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    yield server, handler
    await server.stop()


async def test_a_push_read_right_after_its_sessions_opening_is_not_parked_past_it(server_of, span):
    """The opening and a push read in one go (here on one connection: the read loop creates the session's task,
    then reads the push before that task ran): the push must land in the session, not wait out its bound for
    a session that opened just before it and then be refused."""
    server, handler = server_of
    me = Identity.generate()
    conn = await connect_direct(*server.address, me, expected_peer_id=None)
    hidden = torch.randn(1, 3, HIDDEN)
    token = "r" * 24
    errors: list[RemoteError] = []
    opening = Message({**OPENING, "session_id": token, "accept_push_from": me.peer_id})
    # (neither call waits while the send buffer has room: the server gets both frames in one read)
    stream = await conn.open_stream("inference", opening)
    await conn.notify("push", push(token, 0, 1, hidden, push_timeout_s=30.0), errors.append)
    reply = await stream.recv(timeout=10)  # (refused after its wait, the push would never be answered)
    assert reply.meta["step"] == 1
    torch.testing.assert_close(reply.tensors[0], span(hidden), rtol=1e-5, atol=1e-5)
    assert errors == []
    await conn.close()


def test_a_prompt_pushed_in_parts_before_the_next_hops_opening_waits_for_it(local, checkpoints, monkeypatch):
    """End to end, two real servers prefilling in chunks: the client's opening of the second hop is held back
    until the first server has replied to the prompt's step, so every part the first server pushed reached the
    second before its session existed. The parts wait for it there: the second hop's input of every step still
    comes from the first server (`pushed_hops`), and the tokens are transformers'."""
    from transformers import AutoModelForCausalLM

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.client.hop import HopSession

    path = checkpoints("llama", num_layers=3)
    local.add_servers([(str(path), (0, 2)), (str(path), (2, 3))], extra=["--prefill-chunk-tokens", "64"])
    opens, recvs = HopSession.open, HopSession.recv
    held: list = []  # the second hop's opening, until the first hop's reply
    deferred = []

    async def open_late(self, conn, timeout_s, *, replay=False):
        if self.start == 0:
            return await opens(self, conn, timeout_s, replay=replay)
        held.append((self, conn, timeout_s, replay))
        deferred.append(self.start)

    async def recv_then_open(self, step, sent, timeout_s, position):
        reply = await recvs(self, step, sent, timeout_s, position)
        while held:
            hop, conn, open_timeout_s, replay = held.pop(0)
            await opens(hop, conn, open_timeout_s, replay=replay)
        return reply

    monkeypatch.setattr(HopSession, "open", open_late)
    monkeypatch.setattr(HopSession, "recv", recv_then_open)
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=local.initial_peers, push_timeout_s=30.0
    )
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # long enough for the client to let the first server push it on (`PUSH_UNANSWERED_TOKENS`), in 5 parts
    prompt = torch.randint(
        3, reference.config.vocab_size, (1, 300), generator=torch.Generator().manual_seed(0)
    )
    batch = {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)}
    try:
        with remote.inference_session(max_length=310) as session:
            ours = remote.generate(**batch, max_new_tokens=4, do_sample=False)
            assert deferred == [2]  # (the hook held the second hop's opening back)
            assert session.session.pushed_hops == 4 and not remote.swarm.failovers
        theirs = reference.generate(**batch, max_new_tokens=4, do_sample=False)
        assert ours.tolist() == theirs.tolist()
    finally:
        remote.shutdown()


async def test_the_byte_bound_counts_what_a_compressed_parked_push_holds(span, monkeypatch):
    """A blockwise8 push is held both as it came (int8 codes) and as parsed (float32, four times the codes):
    parked, it must count all it holds against MAX_EARLY_PUSH_BYTES, or the bound lets peers make the server
    hold five times that."""
    from swarmllm.server import handler as handler_module
    from swarmllm.wire.messages import Step

    handler = RequestHandler(Backend(span, cache_tokens=256), dict)
    message = Step(0, torch.randn(1, 8, HIDDEN), session_id="s" * 24, compression="blockwise8").to_message()
    wire = sum(t.numel() * t.element_size() for t in message.tensors)
    monkeypatch.setattr(
        handler_module, "MAX_EARLY_PUSH_BYTES", 2 * wire
    )  # over the codes, under what it holds
    context = CallContext(peer_id="peer", transport="direct", method="push")
    parked = asyncio.ensure_future(handler.rpc_push(message, context))
    while not parked.done() and not handler._early:
        await asyncio.sleep(0)
    held = [early for waiting in handler._early.values() for early in waiting]
    parked.cancel()
    (outcome,) = await asyncio.gather(parked, return_exceptions=True)
    assert held == [], "parked, holding 8 x 64 float32 values and their codes, over the bound"
    assert isinstance(outcome, RequestError) and outcome.code == "unknown_session", outcome
