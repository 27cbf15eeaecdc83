"""The prefix cache (`server.prefix`): its bookkeeping as plain functions, and a backend whose sessions copy what
earlier sessions computed against one that computes everything (the oracle): the same outputs and caches, the hits
where the inputs (and the adapter) begin the same and nowhere else, and its tokens given up to sessions that need
them."""

import asyncio

import pytest
import torch

from swarmllm.models import load_span
from swarmllm.models.lora import LoraSettings, lora_shapes
from swarmllm.server.adapters import Adapter
from swarmllm.server.backend import Backend
from swarmllm.server.cache import CacheBudget, CacheFullError
from swarmllm.server.prefix import OWNER, Entry, PrefixCache, root_key
from swarmllm.wire.prefix import BLOCK_TOKENS, block_keys

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = 1e-5  # a position computed in another chunking rounds differently


def entry(value: float = 0.0) -> Entry:
    return Entry(
        torch.full((1, 1, BLOCK_TOKENS, 2), value), torch.zeros(1, 1, BLOCK_TOKENS, 2), torch.zeros(4)
    )


def test_keys_chain_every_block_on_all_the_inputs_before_it():
    x = torch.randn(50, 8)
    keys = block_keys(root_key(0, 2), x)
    assert len(keys) == 50 // BLOCK_TOKENS
    assert block_keys(root_key(0, 2), x[:32]) == keys[:2]  # a block's key does not depend on what follows
    y = x.clone()
    y[20, 3] += 1e-3  # a change in block 1 changes its key and every later one, not block 0's
    changed = block_keys(root_key(0, 2), y)
    assert changed[0] == keys[0] and all(a != b for a, b in zip(changed[1:], keys[1:], strict=True))
    assert block_keys(root_key(0, 3), x)[0] != keys[0]  # another span's blocks
    assert block_keys(root_key(0, 2), x.half())[0] != block_keys(root_key(0, 2), x)[0]  # other bytes
    assert block_keys(root_key(0, 2), x.bfloat16())  # any float dtype hashes


def test_cache_finds_the_longest_run_and_drops_the_least_recently_used_within_budget():
    budget = CacheBudget(10 * BLOCK_TOKENS)
    cache = PrefixCache(budget, 4 * BLOCK_TOKENS)
    a = [(bytes([1, i]), entry(i)) for i in range(3)]
    assert cache.add(a) and cache.tokens == 3 * BLOCK_TOKENS
    assert budget.free_tokens == 7 * BLOCK_TOKENS  # held in the server's budget
    keys = [key for key, _ in a]
    assert [e.keys[0, 0, 0, 0].item() for e in cache.find(keys)] == [0, 1, 2]
    assert len(cache.find([keys[0], b"x", keys[2]])) == 1  # a run from the first key only
    assert cache.find([b"x", *keys]) == []
    assert cache.hit_tokens == 4 * BLOCK_TOKENS
    # a second chain past the capacity: the oldest blocks go, a chain's last before its first
    b = [(bytes([2, i]), entry(10 + i)) for i in range(2)]
    assert cache.add(b) and cache.tokens == 4 * BLOCK_TOKENS
    assert len(cache.find(keys)) == 2 and len(cache.find([key for key, _ in b])) == 2
    # a session's reservation takes what the cache holds beyond the free tokens
    cache.evict(budget.capacity_tokens - budget.free_tokens + 1)
    assert cache.tokens == 0 and budget.free_tokens == budget.capacity_tokens
    # no room in the budget: nothing kept, and the caller told
    budget.reserve("session", budget.capacity_tokens - BLOCK_TOKENS)
    assert not cache.add(a) and cache.tokens == BLOCK_TOKENS and len(cache.find(keys)) == 1
    with pytest.raises(CacheFullError):
        budget.reserve("another", 1)
    cache.evict(cache.tokens)
    assert OWNER not in budget._held


def test_a_chain_kept_chunk_by_chunk_past_the_capacity_keeps_its_beginning():
    """A long prefill keeps its blocks chunk by chunk: a later chunk's blocks make room by dropping other chains,
    never the chain's own earlier blocks (without which they are unreachable); past the capacity the chain's
    beginning stays, as when it was kept at once."""
    cache = PrefixCache(CacheBudget(100 * BLOCK_TOKENS), 4 * BLOCK_TOKENS)
    other = [(bytes([9, i]), entry()) for i in range(2)]
    chain = [(bytes([1, i]), entry(i)) for i in range(6)]
    assert cache.add(other) and cache.add(chain[:3])
    assert not cache.add(chain[3:], before=[key for key, _ in chain[:3]])
    keys = [key for key, _ in chain]
    assert len(cache.find(keys)) == 4 and cache.find([key for key, _ in other]) == []
    # (dropping the oldest regardless lost the chain's beginning: 1 block found)


@pytest.fixture(scope="module")
def span_path(llama_checkpoint):
    return str(llama_checkpoint)


def backends(path: str, cache_tokens: int = 4096, **kwargs) -> tuple[Backend, Backend]:
    """A backend with a prefix cache, and the oracle: one without."""
    cached = Backend(load_span(path, 0, 4), cache_tokens=cache_tokens, **kwargs)
    oracle = Backend(load_span(path, 0, 4), cache_tokens=cache_tokens, prefix_cache_tokens=0, **kwargs)
    return cached, oracle


def run_both(cached: Backend, oracle: Backend, steps, length: int = 160, rows: int = 1, adapter=None):
    """Open a session on each (with `adapter`) and take `steps` ((hidden, position, mask, prompts) each) on both:
    the outputs and then the caches over the session's length must agree; returns the two sessions."""

    async def go():
        a = cached.open_session(0, 4, rows, length, adapter=adapter)
        b = oracle.open_session(0, 4, rows, length, adapter=adapter)
        for hidden, position, mask, prompts in steps:
            out_a = (await cached.step(a, hidden, position, mask, prompts))[0]
            out_b = (await oracle.step(b, hidden, position, mask, prompts))[0]
            assert out_a.shape == out_b.shape and (out_a - out_b).abs().max() < TOL
        for t_a, t_b in ((a.cache.keys, b.cache.keys), (a.cache.values, b.cache.values)):
            assert (t_a[:, :, :, : a.length] - t_b[:, :, :, : b.length]).abs().max() < TOL
        assert a.length == b.length
        return a, b

    return asyncio.run(go())


def inputs(length: int, seed: int, hidden: int) -> torch.Tensor:
    return torch.randn(1, length, hidden, generator=torch.Generator().manual_seed(seed))


def test_sessions_beginning_alike_copy_what_the_first_computed(span_path):
    cached, oracle = backends(span_path, prefill_chunk_tokens=24)  # steps run in chunks across blocks
    hidden = cached.hidden_size
    x = inputs(70, 0, hidden)
    # the first session's prompt arrives in two steps whose edge is not a block's: blocks [0, 64) kept
    run_both(cached, oracle, [(x[:, :37], 0, None, None), (x[:, 37:], 37, None, None)])
    assert cached.prefix.hit_tokens == 0 and cached.prefix.tokens == 64
    # the same beginning up to position 50: blocks [0, 48) copied, the rest computed (and then kept)
    y = torch.cat([x[:, :50], inputs(30, 1, hidden)], 1)
    decode = [(inputs(1, 2 + i, hidden), 80 + i, None, None) for i in range(3)]
    run_both(cached, oracle, [(y, 0, None, None), *decode])
    assert cached.prefix.hit_tokens == 48 and cached.prefix.tokens == 64 + 32
    # the whole step found (a resent conversation): nothing computed, and the session steps on from there
    before = cached.prefix.hit_tokens
    run_both(cached, oracle, [(x[:, :64], 0, None, None), (inputs(1, 9, hidden), 64, None, None)])
    assert cached.prefix.hit_tokens - before == 64
    # other inputs from the start: nothing found
    before = cached.prefix.hit_tokens
    run_both(cached, oracle, [(inputs(40, 3, hidden), 0, None, None)])
    assert cached.prefix.hit_tokens == before


def test_decode_steps_extend_what_is_kept_and_a_rewind_stops_it(span_path):
    """A chat's next turn resends the reply too: positions decoded one at a time are kept as well; after a
    rewind (a rejected draft) the session keeps nothing more, and what was kept before it stays right."""
    cached, oracle = backends(span_path)
    hidden = cached.hidden_size
    prompt, replies = inputs(20, 4, hidden), [inputs(1, 100 + i, hidden) for i in range(14)]
    run_both(
        cached, oracle, [(prompt, 0, None, None), *((r, 20 + i, None, None) for i, r in enumerate(replies))]
    )
    assert cached.prefix.tokens == 32  # blocks [0, 32): the prompt's 20 and 12 decoded
    turn = torch.cat([prompt, *replies, inputs(10, 5, hidden)], 1)
    before = cached.prefix.hit_tokens
    run_both(cached, oracle, [(turn, 0, None, None)])
    assert cached.prefix.hit_tokens - before == 32

    rewound = [(inputs(40, 6, hidden), 0, None, None), (inputs(3, 7, hidden), 30, None, None)]
    kept = cached.prefix.tokens
    run_both(cached, oracle, [*rewound, (inputs(20, 8, hidden), 33, None, None)])
    assert cached.prefix.tokens == kept + 32  # the first step's blocks [0, 32) only
    before = cached.prefix.hit_tokens
    run_both(cached, oracle, [(rewound[0][0], 0, None, None)])
    assert cached.prefix.hit_tokens - before == 32


def test_steps_the_inputs_alone_do_not_decide_take_no_part(span_path):
    cached, oracle = backends(span_path)
    hidden, blocks = cached.hidden_size, 4
    x = inputs(40, 10, hidden)
    prompts = torch.randn(blocks, 1, 4, hidden) * 0.1
    run_both(cached, oracle, [(x, 0, None, prompts)])  # deep prompts change the keys and values
    padded = torch.ones(1, 40, dtype=torch.bool)
    padded[0, :3] = False
    run_both(cached, oracle, [(x, 0, padded, None)])  # left padding
    rows = torch.cat([x, inputs(40, 11, hidden)])
    run_both(cached, oracle, [(rows, 0, None, None)], rows=2)  # rows that differ
    assert cached.prefix.tokens == 0 and cached.prefix.hit_tokens == 0


def lora(backend: Backend, seed: int, version: int | None) -> Adapter:
    settings = LoraSettings(rank=2, alpha=4, modules=("q_proj", "v_proj"))
    generator = torch.Generator().manual_seed(seed)
    shapes = lora_shapes(backend.span.config, settings, range(4))
    return Adapter(
        settings, {n: torch.randn(s, generator=generator) * 0.1 for n, s in shapes.items()}, 0, 4, version
    )


def test_sessions_with_an_adapter_share_blocks_with_its_equals_alone(span_path):
    """An adapter's keys and values are its own: its sessions find what sessions with an equal adapter kept (another
    client's upload, another version), never a plain session's or another adapter's."""
    cached, oracle = backends(span_path)
    x = inputs(40, 12, cached.hidden_size)
    run_both(cached, oracle, [(x, 0, None, None)], adapter=lora(cached, 0, 3))
    assert cached.prefix.tokens == 32 and cached.prefix.hit_tokens == 0
    run_both(cached, oracle, [(x, 0, None, None)], adapter=lora(cached, 0, 1))  # equal tensors
    assert cached.prefix.hit_tokens == 32
    run_both(cached, oracle, [(x, 0, None, None)], adapter=lora(cached, 1, 3))  # other tensors
    run_both(cached, oracle, [(x, 0, None, None)], adapter=lora(cached, 0, None))  # hosted: found too
    run_both(cached, oracle, [(x, 0, None, None)])  # no adapter
    assert cached.prefix.hit_tokens == 64 and cached.prefix.tokens == 96


def test_sessions_take_back_the_tokens_it_holds(span_path):
    cached, oracle = backends(span_path, cache_tokens=256)
    hidden = cached.hidden_size
    session, _ = run_both(cached, oracle, [(inputs(100, 11, hidden), 0, None, None)], length=100)
    assert cached.prefix.tokens == 96 and cached.free_tokens == 256 - 100
    if (released := cached.close_session(session)) is not None:
        released.result(timeout=10)
    # the session closed, the kept blocks count as free: announced, promised and given
    assert cached.free_tokens == 256 and cached.used_tokens == 0
    assert cached.has_room((1, 256, 256)) and not cached.has_room((1, 257, 257))
    session = cached.open_session(0, 4, 1, 200)
    assert cached.prefix.tokens == 48  # the oldest blocks gave way, as few as needed
    assert cached.free_tokens == 256 - 200
    cached.close_session(session)


def computed_rows(backend: Backend) -> list[int]:
    """The row counts of every prefill `backend` computes from now on (its span's calls, passed through)."""
    calls, forward = [], backend.span.forward_pair

    def counted(hidden, *args, **kwargs):
        calls.append(hidden.shape[0])
        return forward(hidden, *args, **kwargs)

    backend.span.forward_pair = counted
    return calls


def test_rows_alike_are_computed_once_and_share_the_prefix_cache(span_path):
    """A prompt repeated in every row (beam search, `num_return_sequences`) costs one row's prefill, its keys and
    values copied to the other rows, and finds and keeps blocks as a one-row session does; once the rows differ,
    every row is computed. The oracle computes every row all along."""
    # (every prefill on the compute thread, through the span's forward: none merged inline)
    cached, oracle = backends(span_path, prefill_chunk_tokens=24, inline_tokens=0)
    hidden = cached.hidden_size
    calls = computed_rows(cached)
    x = inputs(40, 20, hidden)
    decode = [(inputs(3, 30 + i, hidden).transpose(0, 1), 40 + i, None, None) for i in range(2)]
    session, _ = run_both(cached, oracle, [(x.expand(3, -1, -1), 0, None, None), *decode], rows=3)
    assert calls == [1, 1] and not session.alike  # two chunks of one row; then the rows' own tokens
    assert cached.prefix.tokens == 32 and cached.prefix.hit_tokens == 0
    # the same beginning in two rows: its blocks copied (a one-row session's too), the rest computed in one row
    calls.clear()
    y = torch.cat([x, inputs(8, 21, hidden)], 1)
    run_both(cached, oracle, [(y.expand(2, -1, -1), 0, None, None), (y[:, :2].expand(2, -1, -1), 48, None, None)],
             rows=2)  # fmt: skip
    assert cached.prefix.hit_tokens == 32 and calls == [1, 1]  # [32, 48), then 2 more
    before = cached.prefix.hit_tokens
    run_both(cached, oracle, [(y[:, :34], 0, None, None)])
    assert cached.prefix.hit_tokens - before == 32  # (kept by the rows alike: [0, 32) of the first, again)
    # rows alike after rows that differed: every row computed (their caches differ)
    calls.clear()
    unlike = torch.cat([inputs(1, 22, hidden), inputs(1, 23, hidden)])
    run_both(cached, oracle, [(unlike, 0, None, None), (y[:, :5].expand(2, -1, -1), 1, None, None)], rows=2)
    assert calls == [2]  # (the rows' first tokens decoded, on the decode path)
    # padded rows alike: computed as they are (a mask is per row)
    calls.clear()
    padded = torch.ones(2, 40, dtype=torch.bool)
    padded[:, :3] = False
    run_both(cached, oracle, [(x.expand(2, -1, -1), 0, padded, None)], rows=2)
    assert calls and set(calls) == {2}


def test_a_session_waits_for_the_blocks_it_shares_not_for_the_others_whole_prefill(span_path):
    """A long prompt computed in chunks keeps each chunk's blocks as it is done: sessions sent at the same moment
    whose prompts share its first chunk's blocks, or one and a half chunks', copy them and are done while the long
    one still computes (they waited for its whole prefill, ten chunks, before); every output is the oracle's."""
    # (chunks of 4 blocks: past the backend's 32 tokens run inline, so on the compute thread, in the peers' turns)
    cached, oracle = backends(span_path, prefill_chunk_tokens=4 * BLOCK_TOKENS)
    hidden = cached.hidden_size
    long = inputs(40 * BLOCK_TOKENS, 60, hidden)
    short = torch.cat([long[:, : 4 * BLOCK_TOKENS], inputs(8, 61, hidden)], 1)
    middle = torch.cat([long[:, : 6 * BLOCK_TOKENS], inputs(8, 62, hidden)], 1)
    finished = []

    async def together():
        async def step(name: str, prompt: torch.Tensor) -> torch.Tensor:
            session = cached.open_session(0, 4, 1, prompt.shape[1], owner=name)
            out = (await cached.step(session, prompt, 0, None))[0]
            finished.append(name)
            if (released := cached.close_session(session)) is not None:
                await asyncio.wrap_future(released)
            return out

        first = asyncio.create_task(step("long", long))
        return await asyncio.gather(first, step("short", short), step("middle", middle))

    def computed(prompt: torch.Tensor) -> torch.Tensor:
        return asyncio.run(oracle.step(oracle.open_session(0, 4, 1, prompt.shape[1]), prompt, 0, None))[0]

    outs = asyncio.run(together())
    assert finished[-1] == "long"
    # the short one copied the long one's first 4 blocks, the middle one its first 6 (it waited for two chunks)
    assert cached.prefix.hit_tokens == (4 + 6) * BLOCK_TOKENS
    assert cached.prefix.tokens >= 40 * BLOCK_TOKENS  # and the long one kept all of its own
    for out, prompt in zip(outs, (long, short, middle), strict=True):
        assert (out[0] - computed(prompt)).abs().max() < TOL


def test_sessions_sending_one_beginning_at_once_compute_it_once(span_path):
    """Two sessions whose prompts begin alike, sent at the same moment: the second waits for the blocks the first
    computes and copies them (both outputs the oracle's); a claiming step that is cancelled lets the waiting one
    compute them itself."""
    cached, oracle = backends(span_path)
    hidden = cached.hidden_size
    x = inputs(50, 40, hidden)
    y = torch.cat([x[:, :48], inputs(10, 41, hidden)], 1)

    async def together(prompts, cancel_first: bool = False):
        sessions = [cached.open_session(0, 4, 1, 64) for _ in prompts]
        steps = [
            asyncio.create_task(cached.step(s, p, 0, None)) for s, p in zip(sessions, prompts, strict=True)
        ]
        if cancel_first:  # once it has claimed its blocks (a condition polled with a deadline)
            first_key = block_keys(root_key(0, 4), prompts[0][0])[0]
            deadline = asyncio.get_running_loop().time() + 30
            while cached.prefix.computing(first_key) is None:
                assert asyncio.get_running_loop().time() < deadline, (
                    "the first session never claimed its blocks"
                )
                await asyncio.sleep(0.001)
            steps[0].cancel()
        outs = await asyncio.gather(*steps, return_exceptions=True)
        for s in sessions:
            if (released := cached.close_session(s)) is not None:
                await asyncio.wrap_future(released)
        return outs

    def computed(prompt: torch.Tensor) -> torch.Tensor:
        return asyncio.run(oracle.step(oracle.open_session(0, 4, 1, 64), prompt, 0, None))[0]

    first, second = asyncio.run(together([x, y]))
    assert cached.prefix.hit_tokens == 48  # the second copied the first's 3 blocks
    assert (first[0] - computed(x)).abs().max() < TOL and (second[0] - computed(y)).abs().max() < TOL

    z = inputs(50, 42, hidden)
    cancelled, alone = asyncio.run(together([z, z.clone()], cancel_first=True))
    assert isinstance(cancelled, asyncio.CancelledError) and cached.prefix.hit_tokens == 48  # nothing copied
    assert (alone[0] - computed(z)).abs().max() < TOL
