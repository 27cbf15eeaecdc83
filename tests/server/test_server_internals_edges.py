"""Edges of a server's internals: the throughput cache file, per-peer limits, hosted adapters and the compute
queue, each against the README's stated behaviour or a brute-force oracle."""

import json
import math
from fractions import Fraction

import pytest
import torch
from in_process import refusals

from swarmllm.models import load_span
from swarmllm.models.lora import LoraSettings, lora_shapes, write_peft_adapter
from swarmllm.server.adapters import AdapterStore
from swarmllm.server.backend import Backend
from swarmllm.server.compute import RoundRobin
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.server.host import HostShare
from swarmllm.server.quota import PeerLimits, PeerQuotas
from swarmllm.server.throughput import cached_threads, cached_throughput
from swarmllm.wire import DirectServer, Identity, Message, RemoteError, RequestError, connect_direct
from swarmllm.wire.messages import AdapterRef, AdapterUpload

HIDDEN = 64  # the tiny llama's


@pytest.fixture(scope="module")
def span(llama_checkpoint):
    return load_span(str(llama_checkpoint), 0, 2)


@pytest.mark.parametrize(
    "entry",
    [
        ["fast", 1.0],
        [None, 2.0],
        [{"a": 1}, 2.0],
        [-5.0, 3.0],
        [0, 0],
        [float("nan"), 1.0],
        [float("inf"), 1.0],
    ],
)
def test_a_corrupted_throughput_entry_is_measured_over(span, tmp_path, entry):
    """The cache file is the server's own: an entry that is not a measurement (hand edited, half written by an
    older version) is measured again, never a crash at start-up nor a rate that `ServerInfo` cannot announce."""
    path = tmp_path / "throughput.json"
    cached_throughput(span, "cpu", "float32", 1, path=path)
    (key,) = [k for k in json.loads(path.read_text()) if not k.startswith("last/")]
    path.write_text(json.dumps({key: entry}))
    rates = cached_throughput(span, "cpu", "float32", 1, path=path)
    assert all(math.isfinite(rate) and rate > 0 for rate in rates)
    kept = json.loads(path.read_text())[key]
    assert all(math.isfinite(rate) and rate > 0 for rate in kept)  # and the measurement replaced the entry


@pytest.mark.parametrize("entry", [1.0, True, 4.0])
def test_a_cached_thread_count_that_torch_refuses_is_measured_over(span, tmp_path, entry):
    path = tmp_path / "throughput.json"
    cached_threads(span, "cpu", "float32", 4, path=path)
    (key,) = [k for k in json.loads(path.read_text()) if k.endswith("/threads")]
    path.write_text(json.dumps({key: entry}))
    chosen = cached_threads(span, "cpu", "float32", 4, path=path)
    assert type(chosen) is int and chosen in (1, 4)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(chosen)  # what the server does with it
    finally:
        torch.set_num_threads(before)


def test_a_rate_that_is_not_a_number_is_refused():
    """`--peer-rate nan` would make every bucket full for ever: no rate limit at all."""
    with pytest.raises(ValueError):
        PeerLimits(rate_per_s=float("nan"))


@pytest.mark.parametrize("share", [0.29, 0.57, 0.58, 0.07, 0.1, 0.3, 0.7])
def test_a_peers_cache_share_is_the_fraction_the_operator_gave(share):
    """A share of 0.29 of 100 tokens is 29 tokens (float products like 0.29 * 100 = 28.999... must not floor to
    one fewer)."""
    capacity = 100
    allowed = math.floor(Fraction(str(share)) * capacity)  # the oracle: exact decimal arithmetic
    quotas = PeerQuotas(PeerLimits(max_sessions=1000, max_cache_share=share))
    assert quotas.open_session("a", allowed, capacity) is None
    assert quotas.open_session("a", 1, capacity) is not None


def test_two_hosted_adapters_of_one_name_are_refused(span, tmp_path):
    """Hosted adapters are announced by their folders' names: a second folder of a name already hosted would
    replace the first without a word (its clients silently get the other adapter's outputs)."""
    config = span.config
    settings = LoraSettings(rank=2, alpha=4.0, modules=("q_proj", "v_proj"))
    folders = []
    for seed, parent in enumerate(("run-a", "run-b")):
        generator = torch.Generator().manual_seed(seed)
        shapes = lora_shapes(config, settings, range(config.num_layers))
        tensors = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
        write_peft_adapter(tmp_path / parent / "final", settings, tensors, "tiny")
        folders.append(tmp_path / parent / "final")
    store = AdapterStore(config, torch.float32, "cpu")
    assert store.host(folders[0]) == "final"
    first = store.hosted["final"].tensors
    with pytest.raises(ValueError, match="final"):
        store.host(folders[1])
    assert store.hosted["final"].tensors is first


def test_a_peers_least_recently_used_adapters_give_way_to_its_new_ones(span, tmp_path):
    """A peer's fifth adapter (or one past its bytes) replaces the peer's least recently used one, where it was
    refused (its client waited for room that never came); other peers' stay; a folder whose name clients could
    not send is not hosted."""
    config = span.config
    settings = LoraSettings(rank=2, alpha=4.0, modules=("q_proj", "v_proj"))
    tensors = {name: torch.zeros(shape) for name, shape in lora_shapes(config, settings, range(2)).items()}

    def upload(name: str, version: int = 1) -> AdapterUpload:
        return AdapterUpload(name, version, 2, 4.0, 0.0, ("q_proj", "v_proj"), False, 0, 2, tensors)

    store = AdapterStore(config, torch.float32, "cpu", max_adapters_per_peer=4)
    span_of = (0, 2)
    for i in range(4):
        store.upload("alice", upload(f"a{i}"), span_of)
    store.upload("bob", upload("b0"), span_of)
    store.find("alice", AdapterRef("a0", 1), 0, 2)  # a1 is now the least recently used
    store.upload("alice", upload("a4"), span_of)
    assert store.held("alice") == ["a0", "a2", "a3", "a4"] and store.held("bob") == ["b0"]
    with pytest.raises(RequestError) as dropped:
        store.find("alice", AdapterRef("a1", 1), 0, 2)
    assert dropped.value.code == "unknown_adapter"  # what has the client upload it again
    store.upload("alice", upload("a2", version=2), span_of)  # a new version takes its own place
    assert store.held("alice") == ["a0", "a2", "a3", "a4"]
    size = store._uploaded["alice"]["a0"].nbytes
    store.max_bytes_per_peer = 2 * size  # by bytes: the two least recently used go
    store.upload("alice", upload("a5"), span_of)
    assert store.held("alice") == ["a2", "a5"]
    store.max_bytes_per_peer = size - 1  # one alone too large: refused, nothing dropped
    with pytest.raises(RequestError, match="MiB"):
        store.upload("alice", upload("a6"), span_of)
    assert store.held("alice") == ["a2", "a5"]
    write_peft_adapter(tmp_path / "styled v2", settings, tensors, "tiny")
    with pytest.raises(ValueError, match="named by its folder"):
        store.host(tmp_path / "styled v2")


def test_popping_an_empty_round_robin_raises_index_error():
    """As its docstring says: StopIteration escaping into a generator or coroutine becomes a RuntimeError."""
    queue = RoundRobin()
    with pytest.raises(IndexError):
        queue.pop()
    queue.push("a", 1)
    assert queue.pop() == 1
    with pytest.raises(IndexError):
        queue.pop()


async def _open(conn, batch_size, max_length):
    opening = {"start": 0, "end": 2, "batch_size": batch_size, "max_length": max_length}
    stream = await conn.open_stream("inference", Message(opening))
    hidden = torch.randn(batch_size, 1, HIDDEN)
    await stream.send(Message({"position": 0}, [hidden]))
    try:
        reply = await stream.recv()
    except RemoteError as e:
        return e.code
    assert reply.tensors[0].shape == (batch_size, 1, HIDDEN)
    return stream


async def test_a_peer_cannot_take_the_whole_cache_through_arena_rows(span):
    """README: `--max-cache-share-per-peer` (0.5) means "no single client can take the whole cache". A session
    placed in the shared arena (CUDA's default) holds a whole row of `arena_length` slots, but the peer's share
    is charged batch x max_length: sessions of max_length 1 take every row for a few tokens of the share, and
    the rest of the budget then fits in the share too."""
    backend = Backend(span, cache_tokens=300, arena_length=32)  # 4 rows of 32 slots (+1 scratch each)
    handler = RequestHandler(backend, dict, ServerLimits())
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    conns = []
    try:
        for _ in range(2):
            conns.append(await connect_direct(*server.address, Identity.generate(), expected_peer_id=None))
        greedy, honest = conns
        held = [await _open(greedy, 1, 1) for _ in range(backend.arena.rows)]  # every arena row
        assert all(not isinstance(s, str) for s in held) and backend.arena.free_rows == 0
        # as much more as its share lets it have (the oracle: half of 300 tokens, whatever the layout)
        for tokens in (146, 100, 50, 22, 10, 1):
            if not isinstance(stream := await _open(greedy, 1, tokens), str):
                held.append(stream)
        greedy_tokens = backend.used_tokens - backend.arena.rows  # (the rows' scratch slots are no one's)
        assert greedy_tokens <= 150
        assert not isinstance(await _open(honest, 1, 32), str)  # so another peer's session fits
    finally:
        for conn in conns:
            await conn.close()
        await server.stop()
        backend.shutdown()


async def test_every_refusal_is_counted_by_its_code(span):
    """README: `swarmllm_server_refusals_total{reason=quota|busy|cache_full|server_leaving|too_large}` counts
    the requests refused. A call over the peer's request rate is refused with `quota` (before its payload is
    read) and a backward over `max_forward_tokens` with `too_large`, as a forward is: each counts once."""
    backend = Backend(span, cache_tokens=64)
    handler = RequestHandler(
        backend, dict, ServerLimits(peer_rate_per_s=0.001, peer_burst=2, max_forward_tokens=4)
    )
    server = DirectServer(handler.handlers(), Identity.generate())
    await server.start()
    conn = await connect_direct(*server.address, Identity.generate(), expected_peer_id=None)
    try:
        hidden = torch.randn(1, 5, HIDDEN)
        with pytest.raises(RemoteError) as info:  # 1 of the burst
            await conn.call("forward", Message({"start": 0, "end": 2}, [hidden]))
        assert info.value.code == "too_large" and refusals(handler.metrics, "too_large") == 1
        with pytest.raises(RemoteError) as info:  # 2 of the burst
            await conn.call("backward", Message({"start": 0, "end": 2}, [hidden, torch.ones_like(hidden)]))
        assert info.value.code == "too_large" and refusals(handler.metrics, "too_large") == 2
        with pytest.raises(RemoteError) as info:
            await conn.call("info", Message())
        assert info.value.code == "quota" and "request rate" in str(info.value)
        assert refusals(handler.metrics, "quota") == 1
    finally:
        await conn.close()
        await server.stop()
        backend.shutdown()


def test_a_registry_entry_that_is_no_process_id_is_forgotten(tmp_path):
    """The host's registry holds process ids; a name of digits that no process can have (0 would signal our
    own process group, a number past the kernel's pids overflows `os.kill`) is a stray entry: removed, like a
    dead process's, never counted as a server nor a crash of the server's start-up or its 2 s re-split."""
    me = HostShare(tmp_path)
    me.join()
    for name in ("0", "00", "99999999999", str(2**64)):
        (tmp_path / name).touch()
    assert me.servers() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(me.pid)]
