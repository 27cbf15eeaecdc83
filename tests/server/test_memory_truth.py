"""Memory accounting checked against what is really allocated: the KV bytes the sessions' tensors hold never pass
the budget, `free_tokens` (announced as `cache_tokens_left`) is the budget minus what sessions hold at every step
(open, decode, rewind, beam reorder, close, disconnect, idle timeout), and the memory plan's block size is the
loaded block's bytes."""

import asyncio
import random
import threading
import weakref

import pytest
import torch

from swarmllm.models import KVCache, load_span
from swarmllm.server.backend import Backend
from swarmllm.server.cache import CacheFullError
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.wire import DirectServer, Identity, Message, RemoteError, StreamClosed, connect_direct

BOUND_S = 20.0  # only to fail a test instead of hanging


def kv_bytes(backend: Backend) -> int:
    """The bytes of the distinct storages under the sessions' caches and the arena (brute force)."""
    storages = {}
    tensors = [] if backend.arena is None else [backend.arena.keys, backend.arena.values]
    for session in backend.sessions.values():
        tensors += [session.cache.keys, session.cache.values]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_random_sessions_never_pass_the_budget_and_leave_no_leak(llama_checkpoint, dtype):
    """Sessions of random batch, length and blocks (GQA: 4 heads over 2 KV heads) opening and closing in a seeded
    random order: real KV bytes within the budget, free tokens exactly the budget less what is held, a refusal
    only for a session that does not fit them, and the whole budget back at the end."""
    span = load_span(str(llama_checkpoint), 0, 4, dtype=dtype)
    capacity, rng = 300, random.Random(0)
    backend = Backend(span, cache_tokens=capacity, arena_length=0)
    limit_bytes = capacity * KVCache.bytes_per_token(4, span.config, dtype)
    held: dict[str, int] = {}
    try:
        for _ in range(300):
            if held and rng.random() < 0.45:
                session = backend.sessions[rng.choice(sorted(held))]
                backend.close_session(session)
                del held[session.session_id]
            else:
                batch, length = rng.randint(1, 4), rng.randint(1, 90)
                start = rng.randint(0, 3)
                end = rng.randint(start + 1, 4)
                fits = batch * length <= capacity - sum(held.values())
                try:
                    session = backend.open_session(start, end, batch, length)
                    held[session.session_id] = batch * length
                    assert fits
                except CacheFullError:
                    assert not fits
            assert backend.free_tokens == capacity - sum(held.values())
            assert kv_bytes(backend) <= limit_bytes
        for session_id in list(held):
            backend.close_session(backend.sessions[session_id])
        assert backend.free_tokens == capacity and not backend.sessions
    finally:
        backend.shutdown()


async def _until(condition, timeout_s: float = BOUND_S) -> None:
    """Wait for a server-side effect of a client action (the server runs in this event loop)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def test_free_tokens_follow_every_step_of_a_session_over_a_real_connection(llama_checkpoint):
    span = load_span(str(llama_checkpoint), 0, 4)
    hidden_size, capacity = span.config.hidden_size, 96
    backend = Backend(span, cache_tokens=capacity, arena_length=0)
    limits = ServerLimits(
        max_batch_size=4, max_session_length=64, max_cache_share_per_peer=1.0, session_idle_timeout_s=BOUND_S
    )
    handler = RequestHandler(backend, dict, limits)
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    limit_bytes = capacity * KVCache.bytes_per_token(4, span.config, torch.float32)
    conns, peers = [], []

    async def connect():
        peers.append(Identity.generate())
        conns.append(await connect_direct(*server.address, peers[-1], expected_peer_id=None))
        return conns[-1]

    async def opened(conn, batch, length):
        opening = {"start": 0, "end": 4, "batch_size": batch, "max_length": length}
        stream = await conn.open_stream("inference", Message(opening))
        await stream.send(Message({"position": 0}, [torch.randn(batch, 2, hidden_size)]))
        await stream.recv(timeout=BOUND_S)
        return stream

    def check(held: int) -> None:
        assert backend.free_tokens == capacity - held
        assert kv_bytes(backend) <= limit_bytes

    try:
        a, b = await connect(), await connect()
        first = await opened(a, 2, 20)
        check(40)
        for position in (2, 3, 4):  # decode steps
            await first.send(Message({"position": position}, [torch.randn(2, 1, hidden_size)]))
            await first.recv(timeout=BOUND_S)
            check(40)
        await first.send(Message({"position": 3, "reorder": [1, 1]}, [torch.randn(2, 1, hidden_size)]))
        await first.recv(timeout=BOUND_S)  # a rewind (speculative tokens dropped) and a beam reorder
        check(40)
        second = await opened(b, 4, 14)
        check(96)
        refused = await b.open_stream(
            "inference", Message({"start": 0, "end": 4, "batch_size": 1, "max_length": 1})
        )
        with pytest.raises(RemoteError) as info:
            await refused.recv(timeout=BOUND_S)
        assert info.value.code == "cache_full"
        check(96)
        await first.close()
        await _until(lambda: len(backend.sessions) == 1)
        check(56)
        await b.close()  # a client that vanishes without closing its session
        await _until(lambda: not backend.sessions)
        check(0)
        assert second is not None and [handler.quotas.held(p.peer_id)[1] for p in peers] == [0, 0]
    finally:
        for conn in conns:
            await conn.close()
        await server.stop()
        backend.shutdown()


async def test_an_idle_session_gives_its_tokens_back(llama_checkpoint):
    span = load_span(str(llama_checkpoint), 0, 4)
    backend = Backend(span, cache_tokens=64, arena_length=0)
    handler = RequestHandler(
        backend, dict, ServerLimits(session_idle_timeout_s=0.3, max_cache_share_per_peer=1.0)
    )
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    try:
        client = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
        opening = {"start": 0, "end": 4, "batch_size": 2, "max_length": 32}
        stream = await client.open_stream("inference", Message(opening))
        await _until(lambda: backend.free_tokens == 0)
        with pytest.raises(StreamClosed):
            await stream.recv(timeout=BOUND_S)
        await _until(lambda: backend.free_tokens == 64 and not backend.sessions)
        await client.close()
    finally:
        await server.stop()
        backend.shutdown()


async def test_a_vanished_clients_queued_prefill_keeps_its_tokens_until_the_compute_thread_drops_it(
    llama_checkpoint,
):
    """Clients that send a prefill (compute thread work) and vanish while it waits behind another peer's job: the
    cache that job still holds is real memory until the thread drops the job, so the budget must count it until
    then; a new session meanwhile is refused (`cache_full`), never allocated beside it past the budget."""
    span = load_span(str(llama_checkpoint), 0, 4)
    hidden_size, capacity = span.config.hidden_size, 64
    backend = Backend(span, cache_tokens=capacity, arena_length=0)
    limits = ServerLimits(max_batch_size=2, max_session_length=32, max_cache_share_per_peer=1.0)
    handler = RequestHandler(backend, dict, limits)
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    limit_bytes = capacity * KVCache.bytes_per_token(4, span.config, torch.float32)
    caches: list[weakref.ref] = []  # every cache ever allocated: what is alive is allocated (brute force)

    def live_bytes() -> int:
        storages = {}
        for ref in caches:
            if (t := ref()) is not None:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return 2 * sum(storages.values())  # keys and values alike

    def note_caches() -> None:
        for session in backend.sessions.values():
            if all(ref() is not session.cache.keys for ref in caches):
                caches.append(weakref.ref(session.cache.keys))

    async def prefill(identity: Identity):
        """A client that opens a session and sends a prefill (40 tokens: compute thread work); (its connection,
        the reply awaited)."""
        client = await connect_direct(*server.address, identity, expected_peer_id=None)
        opening = {"start": 0, "end": 4, "batch_size": 2, "max_length": 32}
        stream = await client.open_stream("inference", Message(opening))
        await stream.send(Message({"position": 0}, [torch.randn(2, 20, hidden_size)]))
        reply = asyncio.ensure_future(stream.recv(timeout=BOUND_S))
        await _until(lambda: reply.done() or backend.compute.waiting(identity.peer_id) > 0)
        note_caches()
        return client, reply

    busy, go = threading.Event(), threading.Event()
    blocker = backend.compute.submit("another-peer", lambda: (busy.set(), go.wait(BOUND_S)))
    try:
        assert await asyncio.to_thread(busy.wait, BOUND_S)
        gone, lost = await prefill(Identity.generate())
        await gone.close()  # gone while its prefill waits for the compute thread
        assert isinstance((await asyncio.gather(lost, return_exceptions=True))[0], Exception)
        await _until(lambda: not backend.sessions)
        client, reply = await prefill(Identity.generate())
        assert live_bytes() <= limit_bytes
        with pytest.raises(RemoteError) as info:
            await reply
        assert info.value.code == "cache_full"
        await client.close()
        go.set()
        await _until(lambda: backend.free_tokens == capacity)  # the dropped job gave its tokens back
        client, reply = await prefill(Identity.generate())
        go_on = await reply
        assert go_on.tensors[0].shape == (2, 20, hidden_size)
        await client.close()
    finally:
        go.set()
        blocker.result(BOUND_S)
        await server.stop()
        backend.shutdown()
