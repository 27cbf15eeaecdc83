"""The compute side of a server: a span of blocks, the sessions' KV caches, one compute thread.

The backend trusts its inputs: the RPC handler validates every message before calling it. Large work (prefill,
batch forward) runs on one dedicated thread so the event loop keeps answering pings, info and other sessions
meanwhile; that thread takes the peers' work in turn (`server.compute`), so one peer's pile of batch work
cannot starve another's; a long prefill runs there as chunks (`prefill_chunks`), each in its owner's turn, so
another peer's prefill waits for one chunk, not a whole long prompt. Small work (a decode step) runs inline on
the loop, because handing it to a thread and back costs more than computing it (~0.4 ms a hop on a 2-core box),
and so it never waits behind anyone's batch work (a prefill chunk on the compute thread runs beside the decode
steps, it does not stall them: on a GPU it runs on a CUDA stream of its own, `_on_stream`, and every output is
copied to the host where it is computed, `_host`, so the loop never waits for the compute thread's GPU work).
Concurrent sessions' decode steps are merged into one forward pass (continuous batching, `server.batching`):
the weights are read once per step for all of them, each session keeping its own cache, positions, padding and
adapter. A session's steps arrive one after another on its stream, so two steps never race on one cache either
way.

On a CPU the large projections are stored as panels for our own kernel (`models.panels`), one layout for every
row count. Where that kernel cannot run, they are packed for oneDNN (`models.packed`): in float32 laid out for
one row while the steps carry one, for many while they merge several: the backend watches its last
`LAYOUT_WINDOW` decode steps and re-lays the weights out on the compute thread when `layout_for` says so (a step
running meanwhile uses the old layout; both compute the same product).

On CUDA the sessions' caches are rows of one shared cache arena where they fit (`server.arena`), so that a step
of any of them, lone or merged, replays a CUDA graph of its bucket of rows and slots, captured once per server
(`server.decode`); a session that does not fit gets a cache of its own and graphs of its own.

Fine-tuning: a request may bring deep prompts and a LoRA adapter (`server.adapters`), which apply to it alone.
Inference and forwards run under `torch.inference_mode()`; `backward` recomputes the span's forward with autograd
on the compute thread (the weights are frozen: they never require grad) and returns the gradients of the inputs,
of the prompts and of the adapter's A/B matrices. A training forward and its backward pass the same dropout seed,
so the recomputation draws the same dropout masks.

Ladder Residual: where an edge of a request's blocks lies inside a ladder region, its state there is the pair
(r, p) (`BlockSpan.forward_pair`); the handler has checked that p comes exactly where the config says. A session
with such an edge (`Session.pair`) decodes eagerly (`DecodeRunner.step_pair`: no CUDA graph or compilation of the
pair step yet), and its decode steps merge with other sessions over the same blocks like any others (they all
carry p or none does). Every method returns (r, p), p None where the last edge carries r alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from swarmllm.models import BlockSpan, KVCache
from swarmllm.models.llama import BlockLora
from swarmllm.models.lora import span_lora
from swarmllm.models.packed import initial_rows, layout_for, packed_projections
from swarmllm.models.panels import PanelProjection, kernel
from swarmllm.models.quant import Nf4PanelProjection
from swarmllm.server.adapters import Adapter
from swarmllm.server.arena import ARENA_LENGTH, CacheArena, arena_rows, first_fit
from swarmllm.server.batching import DecodeBatcher
from swarmllm.server.cache import CacheBudget
from swarmllm.server.compute import ComputeThread
from swarmllm.server.decode import DecodeRunner, Member, graphs_enabled
from swarmllm.server.prefix import Chain, Entry, PrefixCache, root_key
from swarmllm.wire.prefix import BLOCK_TOKENS, block_keys

logger = logging.getLogger(__name__)

LAYOUT_WINDOW = 32  # decode steps between looks at the packed weights' layout, and the steps each look weighs
PREFILL_CHUNK_TOKENS = 512  # a longer prefill (over its rows) runs as chunks, other peers' work between them
# the most a prefill waits for another session computing its blocks (then it computes them)
COMPUTING_WAIT_S = 30.0


def prefill_chunks(length: int, batch: int, chunk_tokens: int, at_least: int = 0) -> list[tuple[int, int]]:
    """The positions [a, b) of a step over `length` positions of `batch` rows, cut into chunks of at most
    `chunk_tokens` tokens (one position at least), all of about the same size, except that the first covers at
    least `at_least` positions (those its deep prompts apply to). chunk_tokens 0, or a step that fits: one chunk."""
    if not chunk_tokens or length * batch <= chunk_tokens:
        return [(0, length)]
    per = max(1, chunk_tokens // batch)
    first = min(length, max(at_least, per)) if at_least else 0  # a first chunk held open for the prompts
    rest = length - first
    count = -(-rest // per)
    bounds = [0, first] if first else [0]
    bounds += [first + rest * i // count for i in range(1, count + 1)]
    return list(itertools.pairwise(bounds))


def _pads(new_mask: torch.Tensor | None) -> bool:
    """Whether a step's key mask marks left padding (a step whose outputs its inputs alone do not decide)."""
    return new_mask is not None and not bool(new_mask.all())


def joined(outs: list[tuple[torch.Tensor, torch.Tensor | None]]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A step's (r, p) from its chunks' (r, p), in order."""
    if len(outs) == 1:
        return outs[0]
    r, p = zip(*outs, strict=True)
    return torch.cat(r, 1), None if p[0] is None else torch.cat(p, 1)


# a session that stepped this recently counts as the server's load (`Backend.busy_rows`)
BUSY_WINDOW_S = 30.0


@dataclass
class Session:
    """One client's inference state over blocks [start, end) of this server."""

    session_id: str
    start: int
    end: int
    batch_size: int
    max_length: int
    cache: KVCache | int  # its KV cache (`server.tp_backend`'s: the cache's id on its ranks)
    key_mask: torch.Tensor  # [batch, max_length] bool: which cached positions are real tokens (left padding)
    owner: str = ""  # the peer that opened it: its prefill waits in that peer's compute queue
    length: int = 0
    padded: bool = False
    lora: list[BlockLora] | None = None  # the session's adapter, fixed when it opened
    pair: bool = False  # an edge lies inside a ladder region: its steps take or return p (Ladder Residual)
    row: int | None = None  # its first row of the cache arena, where its cache is one (`server.arena`)
    computed: bool = False  # it sent work to the compute thread (which may hold its cache after it closes)
    chain: Chain | None = None  # where it stands in the prefix cache (`server.prefix`); None: no part
    copied: int = 0  # positions of its latest step copied from the prefix cache
    alike: bool = True  # its rows have held the same inputs at every position so far (`Backend._row_chunks`)
    # when a step of it last came (time.monotonic()): see `Backend.busy_rows`
    stepped_at: float = float("-inf")


@dataclass(frozen=True)
class _Decode:
    """One session's decode step, or short prefill (`Backend.merges`), waiting to be merged with others'
    (`server.batching`)."""

    session: Session
    hidden: torch.Tensor  # [B, T, H]
    position: int
    new_mask: torch.Tensor | None
    pending: torch.Tensor | None  # [B, 1, H]: p, where the session's first edge carries the ladder pair


@dataclass
class Gradients:
    """What `Backend.backward` returns: the gradient of the span's inputs, of the deep prompts sent, and of the
    adapter's tensors (by name) when asked; of the input p where the span's first edge carries the ladder pair."""

    hidden: torch.Tensor
    prompts: torch.Tensor | None
    lora: dict[str, torch.Tensor]
    pending: torch.Tensor | None = None


class Backend:
    """Runs forward passes and inference steps over this server's span."""

    tunable = True  # requests may bring deep prompts and adapters, and ask for a backward

    def __init__(
        self,
        span: BlockSpan,
        *,
        cache_tokens: int,
        device: torch.device | str = "cpu",
        inline_tokens: int = 32,
        compile: bool = False,
        cuda_graphs: bool = True,
        batch_wait_s: float = 0.01,
        arena_length: int | None = None,
        prefill_chunk_tokens: int | None = None,
        aot_step: bool = False,
        prefix_cache_tokens: int | None = None,
    ):
        """aot_step: with `compile` on a CPU, the compiled step built ahead of time too (`decode.AotStep`).
        arena_length: the slots of a row of the shared cache arena (`server.arena`), 0 for none; by default
        `ARENA_LENGTH` where steps replay CUDA graphs, else none (on a CPU the arena gains nothing), and never
        with a compiled step (compiled for caches of their own, whose layout its guards check).
        prefill_chunk_tokens: a session's step over more tokens than this runs as several jobs of the compute
        thread (`prefill_chunks`), so another peer's prefill waits for one chunk, not the whole; 0: one job; by
        default `PREFILL_CHUNK_TOKENS`.
        prefix_cache_tokens: the most cache tokens the prefix cache (`server.prefix`) keeps, 0 for none; by default
        half the budget (taken back whenever sessions need them)."""
        self.span = span.requires_grad_(False)  # frozen: backward computes gradients of inputs only
        self.device = torch.device(device)
        self.dtype = next(span.parameters()).dtype
        self.budget = CacheBudget(cache_tokens)
        self.sessions: dict[str, Session] = {}
        self.compute = ComputeThread()
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarmllm-compile")
        # on a GPU the compute thread's work runs on a stream of its own (`on_compute_thread`)
        self._stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self._ids = itertools.count()
        self.inline_tokens = inline_tokens
        self.prefill_chunk_tokens = (
            PREFILL_CHUNK_TOKENS if prefill_chunk_tokens is None else prefill_chunk_tokens
        )
        if arena_length is None:
            arena_length = ARENA_LENGTH if graphs_enabled(self.device, cuda_graphs, compile) else 0
        self.arena = None if compile else self._make_arena(arena_length)
        if prefix_cache_tokens is None:
            prefix_cache_tokens = cache_tokens // 2
        self.prefix = PrefixCache(self.budget, prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        self.decoder = DecodeRunner(
            span, self.device, compile=compile, cuda_graphs=cuda_graphs, arena=self.arena, aot=aot_step
        )
        self.batcher: DecodeBatcher[_Decode] = DecodeBatcher(self._decode_many, max_wait_s=batch_wait_s)
        self._packed = packed_projections(span)
        self._panels = any(isinstance(m, PanelProjection | Nf4PanelProjection) for m in span.modules())
        self.layout_rows = initial_rows(self.dtype)
        # packed float32 weights follow the load (module doc); other dtypes keep their one best layout
        self._follows_load = bool(self._packed) and self.dtype == torch.float32
        self._recent_rows: deque[int] = deque(maxlen=LAYOUT_WINDOW)
        self._relayout: Future | None = None

    def _make_arena(self, length: int) -> CacheArena | None:
        """The shared cache arena, its tokens reserved in the budget (None if the budget has no room for a row)."""
        rows = arena_rows(self.budget.capacity_tokens, length)
        if rows == 0:
            return None
        arena = CacheArena(len(self.span.blocks), rows, length, self.span.config, self.dtype, self.device)
        self.budget.reserve("arena", arena.tokens)
        return arena

    @property
    def free_tokens(self) -> int:
        """Cache tokens free for new sessions: the budget's (the prefix cache's among them), and the arena's free
        rows."""
        arena = 0 if self.arena is None else self.arena.free_rows * self.arena.length
        return self._budget_free + arena

    @property
    def _budget_free(self) -> int:
        """The budget's free tokens, with those the prefix cache holds (it gives them up to sessions)."""
        return self.budget.free_tokens + (0 if self.prefix is None else self.prefix.tokens)

    def busy_rows(self, within_s: float = BUSY_WINDOW_S) -> int:
        """Rows of the sessions that stepped in the last `within_s` seconds: the load it announces, by which other
        clients spread new sessions over the servers of these blocks (sessions kept open, unused, for a
        conversation's next turn hold cache, not compute)."""
        since = time.monotonic() - within_s
        return sum(s.batch_size for s in self.sessions.values() if s.stepped_at >= since)

    @property
    def used_tokens(self) -> int:
        return self.budget.capacity_tokens - self.free_tokens

    @property
    def start(self) -> int:
        return self.span.start

    @property
    def end(self) -> int:
        return self.span.end

    @property
    def hidden_size(self) -> int:
        return self.span.config.hidden_size

    @property
    def weights_layout(self) -> str:
        """How the span's large projections are stored: as panels for our kernel (and the instruction set it was
        built for), packed for oneDNN and for how many rows, or "plain"."""
        if self._panels:
            return f"panels ({kernel().isa})"
        if not self._packed:
            return "plain"
        return f"packed for {self.layout_rows} row{'s' if self.layout_rows > 1 else ''}"

    def inline(self, tokens: int) -> bool:
        """Whether work over `tokens` tokens runs inline on the event loop (else on the compute thread)."""
        return tokens <= self.inline_tokens

    def merges(self, session: Session, batch: int, length: int) -> bool:
        """Whether a step of `length` tokens per sequence runs in a merged step (`server.batching`): a decode
        step that runs inline, and an inline prefill too where merged steps run eagerly (not from CUDA graphs)
        and the session's edges carry r alone. A prefill's rows then share the step's read of the weights."""
        if not self.inline(batch * length):
            return False
        return length == 1 or not (self.decoder.cuda_graphs or session.pair)

    async def run(self, tokens: int, owner: str, fn, *args):
        """`fn(*args)` inline when it touches at most `inline_tokens` tokens, else on the compute thread in
        `owner`'s turn."""
        if self.inline(tokens):
            return fn(*args)
        return await self.on_compute_thread(fn, *args, owner=owner)

    async def on_compute_thread(self, fn, *args, owner: str = ""):
        """`fn(*args)` on the compute thread (with its torch thread count), in `owner`'s turn among the peers
        with work queued there; on a GPU, on the thread's own CUDA stream (`_on_stream`)."""
        if self._stream is not None:
            fn, args = self._on_stream, (fn, *args)
        return await asyncio.wrap_future(self.compute.submit(owner, fn, *args))

    def _on_stream(self, fn, *args):
        """`fn(*args)` on the compute thread's CUDA stream, after the work queued so far on the event loop's (the
        caches it allocated, the decode steps that wrote them). On one stream, the decode steps' kernels would
        queue behind a prefill's, however long; on two, the GPU runs them side by side. Outputs are copied to
        the host before the job ends (`_host`), so the loop's next step over them finds them done."""
        self._stream.wait_stream(torch.cuda.default_stream(self.device))
        with torch.cuda.stream(self._stream):
            return fn(*args)

    def _blocks(self, start: int, end: int) -> slice:
        return slice(start - self.span.start, end - self.span.start)

    async def forward(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None,
        start: int,
        end: int,
        owner: str = "",
        prompts: torch.Tensor | None = None,
        adapter: Adapter | None = None,
        dropout_seed: int | None = None,
        pending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        tokens = hidden.shape[0] * hidden.shape[1]
        blocks = self._blocks(start, end)
        return await self.run(
            tokens, owner, self._forward, hidden, key_mask, blocks, prompts, adapter, dropout_seed, pending
        )

    @torch.inference_mode()
    def _forward(
        self,
        hidden: torch.Tensor,
        key_mask: torch.Tensor | None,
        blocks: slice,
        prompts: torch.Tensor | None = None,
        adapter: Adapter | None = None,
        dropout_seed: int | None = None,
        pending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        hidden = hidden.to(self.device, self.dtype)
        if key_mask is not None:
            key_mask = key_mask.to(self.device)
        if prompts is not None:
            prompts = prompts.to(self.device, self.dtype)
        lora = self._lora(adapter, blocks, dropout_seed)
        out = self.span.forward_pair(
            hidden, self._on_device(pending), key_mask=key_mask, blocks=blocks, prompts=prompts, lora=lora
        )
        return self._on_host(*out)

    def _on_device(self, pending: torch.Tensor | None) -> torch.Tensor | None:
        return None if pending is None else pending.to(self.device, self.dtype)

    def _lora(
        self,
        adapter: Adapter | None,
        blocks: slice,
        dropout_seed: int | None,
        tensors: dict[str, torch.Tensor] | None = None,
    ) -> list[BlockLora] | None:
        """The adapter of blocks `blocks` as the span applies it; a dropout seed turns its dropout on."""
        if adapter is None:
            return None
        generator = None
        if dropout_seed is not None and adapter.settings.dropout > 0:
            generator = torch.Generator(self.device).manual_seed(dropout_seed)
        layers = range(self.span.start + blocks.start, self.span.start + blocks.stop)
        return span_lora(self.span.config, adapter.settings, tensors or adapter.tensors, layers, generator)

    async def backward(
        self,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        key_mask: torch.Tensor | None,
        start: int,
        end: int,
        owner: str = "",
        prompts: torch.Tensor | None = None,
        adapter: Adapter | None = None,
        dropout_seed: int | None = None,
        lora_grads: bool = False,
        pending: torch.Tensor | None = None,
        grad_pending: torch.Tensor | None = None,
    ) -> Gradients:
        """Gradients of a forward over blocks [start, end) given the gradient of its outputs (r, and p where the
        last edge carries the ladder pair: `grad_pending`); always on the compute thread (a backward is several
        forwards' work)."""
        blocks = self._blocks(start, end)
        args = (
            hidden,
            grad,
            key_mask,
            blocks,
            prompts,
            adapter,
            dropout_seed,
            lora_grads,
            pending,
            grad_pending,
        )
        return await self.on_compute_thread(self._backward, *args, owner=owner)

    def _backward(
        self,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        key_mask: torch.Tensor | None,
        blocks: slice,
        prompts: torch.Tensor | None,
        adapter: Adapter | None,
        dropout_seed: int | None,
        lora_grads: bool,
        pending: torch.Tensor | None = None,
        grad_pending: torch.Tensor | None = None,
    ) -> Gradients:
        with torch.enable_grad():
            hidden = hidden.to(self.device, self.dtype).requires_grad_()
            leaves = [hidden]
            if pending is not None:
                pending = pending.to(self.device, self.dtype).requires_grad_()
                leaves.append(pending)
            if prompts is not None:
                prompts = prompts.to(self.device, self.dtype).requires_grad_()
                leaves.append(prompts)
            tensors = None
            if adapter is not None and lora_grads:
                layers = range(self.span.start + blocks.start, self.span.start + blocks.stop)
                prefixes = tuple(f"{layer}." for layer in layers)
                tensors = {
                    name: t.detach().requires_grad_() if name.startswith(prefixes) else t
                    for name, t in adapter.tensors.items()
                }
                trained = [name for name in tensors if name.startswith(prefixes)]
                leaves += [tensors[name] for name in trained]
            if key_mask is not None:
                key_mask = key_mask.to(self.device)
            lora = self._lora(adapter, blocks, dropout_seed, tensors)
            out, out_pending = self.span.forward_pair(
                hidden, pending, key_mask=key_mask, blocks=blocks, prompts=prompts, lora=lora
            )
            outputs, out_grads = [out], [grad.to(self.device, self.dtype)]
            if out_pending is not None:
                outputs.append(out_pending)
                out_grads.append(self._on_device(grad_pending))
            grads = torch.autograd.grad(outputs, leaves, out_grads)
        grads = list(grads)
        grad_hidden = grads.pop(0)
        grad_pending = grads.pop(0) if pending is not None else None
        grad_prompts = grads.pop(0) if prompts is not None else None
        lora = dict(zip(trained, grads, strict=True)) if tensors is not None else {}
        host = self._host
        return Gradients(
            host(grad_hidden), host(grad_prompts), {k: host(t) for k, t in lora.items()}, host(grad_pending)
        )

    def session_tokens(self, batch_size: int, max_length: int) -> int:
        """The cache tokens a session opened now holds: in the arena, whole rows of `arena.length` slots (a row
        is a row, however short the session), else batch_size x max_length. What its peer's share is charged
        (`server.quota`): a peer's short sessions must not take every row for a few tokens of its share."""
        if self.arena is not None and self.arena.fits(batch_size, max_length):
            return batch_size * self.arena.length
        return batch_size * max_length

    def open_session(
        self,
        start: int,
        end: int,
        batch_size: int,
        max_length: int,
        owner: str = "",
        adapter: Adapter | None = None,
        tokens: int | None = None,
    ) -> Session:
        """A session's cache: rows of the arena where it fits, else reserved and allocated; raises CacheFullError
        when it does not fit either way. tokens: what `session_tokens` said it holds (and its peer was charged):
        rows that came free since (given back on the compute thread) are not taken for a session charged less."""
        session_id = f"s{next(self._ids)}"
        placed = None
        if self.arena is not None and (tokens is None or tokens >= batch_size * self.arena.length):
            placed = self.arena.take(batch_size, max_length)
        if placed is None:
            if self.prefix is not None:
                self.prefix.evict(batch_size * max_length - self.budget.free_tokens)
            self.budget.reserve(session_id, batch_size * max_length)
            try:
                cache = self._new_cache(end - start, batch_size, max_length)
            except BaseException:
                self.budget.release(session_id)
                raise
            row, key_mask = None, torch.ones(batch_size, max_length, dtype=torch.bool, device=self.device)
        else:
            row, cache, key_mask = placed
            cache = KVCache.over(*(t[self._blocks(start, end)] for t in (cache.keys, cache.values)))
        session = Session(session_id, start, end, batch_size, max_length, cache, key_mask, owner, row=row)
        session.lora = self._lora(adapter, self._blocks(start, end), None)
        session.pair = self.span.config.carries_pending(start) or self.span.config.carries_pending(end)
        if self.prefix is not None and not session.pair and isinstance(session.cache, KVCache):
            session.chain = Chain(root_key(start, end, b"" if adapter is None else adapter.fingerprint))
        self.sessions[session_id] = session
        return session

    def has_room(self, *sessions: tuple[int, int, int]) -> bool:
        """Whether `open_session` would find cache now for these sessions (batch size, max length, and tokens as
        there), opened one after another: a session that waited for room is promised it (`server.room`), and
        another's opening must leave it enough."""
        arena, free = self.arena, self._budget_free
        taken = arena.taken() if arena is not None else []
        for batch_size, max_length, tokens in sessions:
            if arena is not None and tokens >= batch_size * arena.length and max_length <= arena.length:
                if (row := first_fit(taken, batch_size)) is not None:
                    taken[row : row + batch_size] = [True] * batch_size
                    continue
            if batch_size * max_length > free:
                return False
            free -= batch_size * max_length
        return True

    def _new_cache(self, blocks: int, batch_size: int, max_length: int) -> KVCache | int:
        return KVCache(blocks, batch_size, max_length, self.span.config, self.dtype, self.device)

    def close_session(self, session: Session) -> Future | None:
        """Free a session's cache (closing it twice is harmless: its arena rows may be another's by then). A cache
        of its own is kept alive by the work that still uses it, and its tokens come back after that work (so that
        no new session is allocated beside it past the budget), as arena rows do: then the returned future is
        done (None: the room is free at once)."""
        open_ = self.sessions.pop(session.session_id, None) is not None
        self.batcher.forget(session.session_id)
        self.decoder.forget(session.cache)
        if session.row is None:
            if open_ and session.computed:
                # the compute thread may still hold its cache: a prefill it runs, or one whose client went away,
                # cancelled but still queued (the release waits behind it, in the owner's turn)
                return self.compute.submit(session.owner, self.budget.release, session.session_id)
            self.budget.release(session.session_id)
        elif open_:
            # its rows go back once the compute thread is done with the session's work (a prefill running or
            # queued would write them): the give waits behind it, in the owner's turn
            return self.compute.submit(session.owner, self.arena.give, session.row, session.batch_size)
        return None

    def reorder(self, session: Session, rows: Sequence[int], length: int) -> None:
        """Before a session's next step (beam search): row i of its cache and key mask, over positions
        [0, length), becomes what row rows[i] held. On the event loop: the session's previous step is done and its
        next one waits for this (on a GPU, the compute thread's stream waits for the loop's, `_on_stream`)."""
        index = torch.tensor(rows, device=self.device)
        session.key_mask[:, :length] = session.key_mask[index, :length]
        self._reorder_cache(session, index, length)

    def _reorder_cache(self, session: Session, index: torch.Tensor, length: int) -> None:
        session.cache.reorder(index, length)

    async def step(
        self,
        session: Session,
        hidden: torch.Tensor,
        position: int,
        new_mask: torch.Tensor | None,
        prompts: torch.Tensor | None = None,
        pending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Process tokens [position, position + T) of a session; position < length rewinds (drops the tail).
        prompts: deep prompts for the first P of these tokens ([blocks, B or 1, P, H]); pending: their p, where
        the session's first edge carries the ladder pair. Returns (r, p) (see the module doc)."""
        chunks = self.step_chunks(session, hidden, position, new_mask, prompts, pending)
        return joined([(r, p) async for _, _, r, p in chunks])

    def step_chunks(
        self,
        session: Session,
        hidden: torch.Tensor,
        position: int,
        new_mask: torch.Tensor | None,
        prompts: torch.Tensor | None = None,
        pending: torch.Tensor | None = None,
    ) -> AsyncIterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """`step`, chunk by chunk: (a, b, r, p) for the step's tokens [a, b) as each chunk is done, so that a
        server can push each on at once (the next server computes chunk k while this one computes k + 1). A step
        over more than `prefill_chunk_tokens` tokens runs as several (`prefill_chunks`), each a job of the
        compute thread in the owner's turn; a client gone meanwhile (the call cancelled) stops it between two.
        Positions the prefix cache holds are copied from it (one chunk first), and whole blocks computed are kept
        in it (`server.prefix`). Rows that hold the same inputs (a prompt repeated for beams) are computed once."""
        session.stepped_at = time.monotonic()
        # (set before any of it runs: a session closed meanwhile gives its cache back behind the thread's work)
        session.computed = session.computed or not self.inline(hidden.shape[0] * hidden.shape[1])
        if session.batch_size > 1:
            if session.alike and self._rows_alike(session, hidden, new_mask, prompts, pending):
                return self._row_chunks(session, hidden, position)
            session.alike, session.chain = False, None
        return self._looked_up_chunks(session, hidden, position, new_mask, prompts, pending)

    def _rows_alike(
        self,
        session: Session,
        hidden: torch.Tensor,
        new_mask: torch.Tensor | None,
        prompts: torch.Tensor | None,
        pending: torch.Tensor | None,
    ) -> bool:
        """Whether a step of a session whose rows were alike so far keeps them alike, computed as one row: a
        prefill-like step (decode steps take the merged paths, arena row graphs included) of the same inputs in
        every row, with no padding, deep prompts or Ladder pair, over a cache of its own rows."""
        return (
            hidden.shape[1] > 1
            and prompts is None
            and pending is None
            and not session.pair
            and isinstance(session.cache, KVCache)
            and not _pads(new_mask)
            and bool((hidden == hidden[:1]).all())
        )

    async def _row_chunks(
        self, session: Session, hidden: torch.Tensor, position: int
    ) -> AsyncIterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """`step_chunks` of rows alike (`_rows_alike`): the first row alone, through the prefix cache as a session
        of one row, then its keys and values copied to the other rows. A prompt repeated for beam search or
        `num_return_sequences` costs one row's prefill, as vLLM's `n` shares its prompt's blocks."""
        rows, end = session.batch_size, position + hidden.shape[1]
        first = replace(
            session,
            batch_size=1,
            cache=KVCache.over(session.cache.keys[:, :1], session.cache.values[:, :1]),
            key_mask=session.key_mask[:1],
        )
        session.alike = False  # (alike again once the other rows hold the step too)
        async for a, b, r, _ in self._looked_up_chunks(first, hidden[:1], position, None):
            yield a, b, r.expand(rows, -1, -1).contiguous(), None
        await self.run(rows * hidden.shape[1], session.owner, self._spread, session, position, end)
        session.length, session.padded = end, first.padded
        session.chain, session.copied, session.alike = first.chain, first.copied, True

    @torch.inference_mode()
    def _spread(self, session: Session, position: int, end: int) -> None:
        """Copy the first row's keys and values over [position, end) to the session's other rows."""
        for t in (session.cache.keys, session.cache.values):
            t[:, 1:, :, position:end] = t[:, :1, :, position:end]
        session.key_mask[1:, position:end] = True

    async def _looked_up_chunks(
        self,
        session: Session,
        hidden: torch.Tensor,
        position: int,
        new_mask: torch.Tensor | None,
        prompts: torch.Tensor | None = None,
        pending: torch.Tensor | None = None,
    ) -> AsyncIterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """`step_chunks` of a session's rows as they come: positions found in the prefix cache copied, the rest
        computed (and its whole blocks kept) where the session takes part, else every position computed."""
        chain, session.chain, session.copied = session.chain, None, 0  # (alive again if the step completes)
        if (
            chain is None
            or position != chain.end
            or prompts is not None
            or pending is not None
            or _pads(new_mask)
        ):
            async for chunk in self._computed_chunks(session, hidden, position, new_mask, prompts, pending):
                yield chunk
            return
        copied, keys, claimed, kept_before = 0, None, [], []
        if not chain.tail and hidden.shape[1] >= BLOCK_TOKENS:
            # (a long prompt's hashing on the compute thread, off the loop)
            keys = await self.run(hidden.shape[1], session.owner, block_keys, chain.key, hidden[0])
            await self._await_computing(keys)
            if found := self.prefix.find(keys):
                copied = len(found) * BLOCK_TOKENS
                out = await self.run(copied, session.owner, self._copy_in, session, position, found)
                chain, session.copied = Chain(keys[len(found) - 1], position + copied), copied
                # (keys: those of the positions computed next)
                kept_before, keys = keys[: len(found)], keys[len(found) :]
                yield 0, copied, out, None
            claimed = self.prefix.claim(keys)
        try:
            rest, kept = hidden[:, copied:], 0  # (kept: how many of `keys` are kept so far)
            if rest.shape[1]:
                async for a, b, r, _ in self._computed_chunks(session, rest, position + copied, None):
                    yield copied + a, copied + b, r, None
                    if chain is None:  # (the cache found no room for an earlier chunk's blocks)
                        continue
                    # each chunk's whole blocks kept as it is done: a session waiting for the first of them goes on
                    # then, not after the whole prefill
                    chunk_keys, before = None, ()
                    if keys is not None:
                        whole = (chain.tail_length + b - a) // BLOCK_TOKENS
                        chunk_keys, before = keys[kept : kept + whole], {*kept_before, *keys[:kept]}
                        kept += whole
                    chain = await self._keep(session, chain, rest[0, a:b], [r[0]], chunk_keys, before)
                    if claimed:
                        done = set(claimed if chain is None else chunk_keys or ())
                        self.prefix.settle([key for key in claimed if key in done])
                        claimed = [key for key in claimed if key not in done]
            session.chain = chain
        finally:  # (a step cancelled too: sessions waiting for its blocks compute them themselves)
            self.prefix.settle(claimed)

    async def _await_computing(self, keys: list[bytes]) -> None:
        """Wait (up to `COMPUTING_WAIT_S` in all) while another session computes the first of `keys` not held yet:
        the blocks it keeps are copied rather than computed twice. It keeps them chunk by chunk of its prefill,
        so this waits for the blocks these keys share with it, not for its whole step."""
        deadline = time.monotonic() + COMPUTING_WAIT_S
        while (held := self.prefix.held(keys)) < len(keys) and (
            done := self.prefix.computing(keys[held])
        ) is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), max(deadline - time.monotonic(), 0.0))
            if time.monotonic() >= deadline:
                return

    async def _computed_chunks(
        self,
        session: Session,
        hidden: torch.Tensor,
        position: int,
        new_mask: torch.Tensor | None,
        prompts: torch.Tensor | None = None,
        pending: torch.Tensor | None = None,
    ) -> AsyncIterator[tuple[int, int, torch.Tensor, torch.Tensor | None]]:
        """`step_chunks` computing every position."""
        if prompts is None and self.merges(session, hidden.shape[0], hidden.shape[1]):
            # merged with the other sessions' decode steps (continuous batching), inline on the loop
            step = _Decode(session, hidden, position, new_mask, pending)
            gather = hidden.shape[1] > 1
            yield 0, hidden.shape[1], *await self.batcher.step(session.session_id, step, gather)
            return
        batch, at_least = hidden.shape[0], 0 if prompts is None else prompts.shape[2]
        for a, b in prefill_chunks(hidden.shape[1], batch, self.prefill_chunk_tokens, at_least):
            mask = None if new_mask is None else new_mask[:, a:b]
            p = None if pending is None else pending[:, a:b]
            args = (session, hidden[:, a:b], position + a, mask, prompts if a == 0 else None, p)
            yield a, b, *await self.run(batch * (b - a), session.owner, self._step, *args)

    @torch.inference_mode()
    def _copy_in(self, session: Session, position: int, found: list[Entry]) -> torch.Tensor:
        """Write the prefix cache's blocks into a session's cache from `position` on; their outputs [1, T, H]."""
        end = position + len(found) * BLOCK_TOKENS
        self._note_mask(session, position, end, None)
        for t, part in ((session.cache.keys, "keys"), (session.cache.values, "values")):
            t[:, 0, :, position:end] = torch.cat([getattr(entry, part) for entry in found], 2)
        if self.device.type == "cuda":
            # an entry dropped meanwhile keeps its memory until this stream has read it
            for entry in found:
                entry.keys.record_stream(torch.cuda.current_stream(self.device))
                entry.values.record_stream(torch.cuda.current_stream(self.device))
        session.length = end
        return torch.cat([entry.out for entry in found])[None]

    async def _keep(
        self,
        session: Session,
        chain: Chain,
        inputs: torch.Tensor,
        outs: list[torch.Tensor],
        keys: list[bytes] | None = None,
        before: Collection[bytes] = (),
    ) -> Chain | None:
        """Where a session stands after its positions from `chain.end` on were computed (inputs [T, H], outputs
        [t, H] a chunk): the whole blocks among them and the tail before kept in the prefix cache, the rest the
        new tail. None: the session no longer takes part (the cache found no room). `keys`: those of the whole
        blocks of the tail and `inputs`, where a look-up made them; `before`: the chain's blocks before them that
        this step copied or kept (the cache makes room for these without dropping them)."""
        if not outs:
            return chain
        tail = [*chain.tail, (inputs, torch.cat(outs) if len(outs) > 1 else outs[0])]
        length = chain.tail_length + inputs.shape[0]
        if length < BLOCK_TOKENS:  # (a decode step, mostly: no copy until a block is whole)
            return Chain(chain.key, chain.done, tail)
        inputs, out = (torch.cat(parts) for parts in zip(*tail, strict=True))
        whole = length // BLOCK_TOKENS * BLOCK_TOKENS
        keys, entries = await self.run(
            whole, session.owner, self._copy_out, session, chain, inputs, out[:whole], keys
        )
        if not self.prefix.add(list(zip(keys, entries, strict=True)), before):
            return None
        rest = [(inputs[whole:].clone(), out[whole:].clone())] if whole < length else []
        return Chain(keys[-1], chain.done + whole, rest)

    @torch.inference_mode()
    def _copy_out(
        self,
        session: Session,
        chain: Chain,
        inputs: torch.Tensor,
        out: torch.Tensor,
        keys: list[bytes] | None,
    ) -> tuple[list[bytes], list[Entry]]:
        """The keys (`keys`, or made here) and entries of a session's whole blocks from `chain.done` on: `out`
        covers them, `inputs` them and maybe a tail."""
        entries = []
        for a in range(0, out.shape[0], BLOCK_TOKENS):
            at = slice(chain.done + a, chain.done + a + BLOCK_TOKENS)
            k, v = (t[:, 0, :, at].clone() for t in (session.cache.keys, session.cache.values))
            entries.append(Entry(k, v, out[a : a + BLOCK_TOKENS].clone()))
        return block_keys(chain.key, inputs) if keys is None else keys, entries

    def _note_mask(self, session: Session, position: int, end: int, new_mask: torch.Tensor | None) -> None:
        """Record which of the slots [position, end) hold real tokens (False: left padding)."""
        if position == 0:
            session.padded = False
        if new_mask is None:
            session.key_mask[:, position:end] = True
        else:
            session.key_mask[:, position:end] = new_mask.to(self.device)
            session.padded = session.padded or _pads(new_mask)

    @torch.inference_mode()
    def _step(
        self,
        session: Session,
        hidden: torch.Tensor,
        position: int,
        new_mask: torch.Tensor | None,
        prompts: torch.Tensor | None = None,
        pending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        end = position + hidden.shape[1]
        self._note_mask(session, position, end, new_mask)
        if hidden.shape[1] == 1 and prompts is None:
            # a decode step of more rows than run inline, so on the compute thread: not through the arena's row
            # graphs, whose static inputs the event loop's decode steps fill meanwhile (its own graphs instead)
            return self._on_host(*self._decode(session, hidden, position, pending, None))
        key_mask = session.key_mask[:, :end] if session.padded else None
        out = self.span.forward_pair(
            hidden.to(self.device, self.dtype),
            self._on_device(pending),
            pos=position,
            key_mask=key_mask,
            cache=session.cache,
            blocks=self._blocks(session.start, session.end),
            prompts=None if prompts is None else prompts.to(self.device, self.dtype),
            lora=session.lora,
        )
        session.length = end
        return self._on_host(*out)

    def _decode(
        self,
        session: Session,
        hidden: torch.Tensor,
        position: int,
        pending: torch.Tensor | None,
        row: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """row: the session's first arena row, for a step through the row graphs (None: not through them)."""
        args = (position, session.key_mask, session.padded, session.cache)
        blocks = self._blocks(session.start, session.end)
        hidden = hidden[:, 0].to(self.device, self.dtype)
        if session.pair:
            p = None if pending is None else pending[:, 0].to(self.device, self.dtype)
            out, p = self.decoder.step_pair(hidden, p, *args, blocks, session.lora)
        else:
            out, p = self.decoder.step(hidden, *args, blocks, session.lora, row), None
        session.length = position + 1
        return out[:, None], None if p is None else p[:, None]

    @torch.inference_mode()
    def _decode_many(self, steps: list[_Decode]) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Several sessions' decode steps (and short prefills, as chunks) as one pass per group of sessions over
        the same blocks (sessions of one server may hold different sub-ranges of its span; those of a group all
        carry the ladder pair at their edges or none does), run by `DecodeRunner.step_many` (a cohort's CUDA
        graph where enabled); a lone decode step takes the single-session path (compiled or CUDA graphs where
        enabled)."""
        for d in steps:
            self._note_mask(d.session, d.position, d.position + d.hidden.shape[1], d.new_mask)
        if self._follows_load:
            self._follow_load(sum(d.hidden.shape[0] * d.hidden.shape[1] for d in steps))
        if len(steps) == 1 and steps[0].hidden.shape[1] == 1:
            d = steps[0]
            return [self._on_host(*self._decode(d.session, d.hidden, d.position, d.pending, d.session.row))]
        groups: dict[tuple[int, int], list[int]] = {}
        for i, d in enumerate(steps):
            groups.setdefault((d.session.start, d.session.end), []).append(i)
        outputs: list[tuple[torch.Tensor, torch.Tensor | None] | None] = [None] * len(steps)
        for (start, end), members in groups.items():
            if len(members) == 1 and steps[members[0]].hidden.shape[1] == 1:
                # a lone decode step: the single-session path (compiled or CUDA graphs where enabled); a lone
                # prefill's chunk takes the merged path, so that its bits never depend on what ran beside it
                d = steps[members[0]]
                out = self._decode(d.session, d.hidden, d.position, d.pending, d.session.row)
                outputs[members[0]] = self._on_host(*out)
                continue
            group = [steps[i] for i in members]
            merged = [
                Member(
                    d.hidden.flatten(0, 1).to(self.device, self.dtype),
                    d.position,
                    d.session.key_mask,
                    d.session.padded,
                    d.session.cache,
                    d.session.lora,
                    d.session.row,
                    d.hidden.shape[1],
                )
                for d in group
            ]
            pending = None
            if group[0].pending is not None:  # (decode steps only: a pair session's prefill is not merged)
                pending = torch.cat([d.pending[:, 0].to(self.device, self.dtype) for d in group])
            out, p = self._on_host(*self.decoder.step_many(merged, pending, self._blocks(start, end)))
            rows = 0
            for i, d in zip(members, group, strict=True):
                batch, length = d.hidden.shape[:2]
                own = slice(rows, rows + batch * length)
                d.session.length = d.position + length
                outputs[i] = (
                    out[own].view(batch, length, -1),
                    None if p is None else p[own].view(batch, length, -1),
                )
                rows = own.stop
        return outputs

    def _host(self, tensor: torch.Tensor | None) -> torch.Tensor | None:
        """An output on the host, copied where it is computed on a GPU. It goes on the wire anyway, and a GPU
        call returns once its kernels are launched: copied later, by the framing on the event loop, a prefill
        or backward on the compute thread would stall the loop (every session's decode steps) until it has
        run, and a decode step would look to the batcher as if it took no time (its wait for late sessions is
        capped at the last step's time, `server.batching`). A merged step is copied once, not once a session."""
        return tensor if tensor is None or self.device.type == "cpu" else tensor.cpu()

    def _on_host(self, out: torch.Tensor, p: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._host(out), self._host(p)

    def _follow_load(self, rows: int) -> None:
        """Note a decode step's rows; every `LAYOUT_WINDOW` steps, re-lay the packed weights out if `layout_for`
        says so (on the compute thread, one weight at a time: decode steps go on meanwhile)."""
        self._recent_rows.append(rows)
        if len(self._recent_rows) < LAYOUT_WINDOW or (
            self._relayout is not None and not self._relayout.done()
        ):
            return
        want = layout_for(self._recent_rows, self.layout_rows)
        self._recent_rows.clear()
        if want != self.layout_rows:
            logger.info(
                "decode steps carry %s rows: weights laid out for %d", "one" if want == 1 else "many", want
            )
            self.layout_rows = want
            self._relayout = self.compute.submit("", self._lay_out, want)

    def _lay_out(self, rows: int) -> None:
        for projection in self._packed:
            projection.repack(rows)

    def failure(self) -> str | None:
        """Why this backend can no longer compute (every later step would fail), or None while it can; the
        server leaves the swarm when it says so (`server.server`)."""
        return None

    def set_threads(self, threads: int) -> Future:
        """Torch's CPU thread count for the compute thread too (each thread keeps the count it started with).
        A compiled decode step then compiles for it (`DecodeRunner.warm_up`) on a thread of its own, so that
        steps go on, eagerly, for the seconds that takes; returns that job, done at once when nothing compiles.
        """
        self.compute.submit("", torch.set_num_threads, threads).result()
        return self._compiler.submit(self._warm_up, threads)

    def _warm_up(self, threads: int) -> None:
        torch.set_num_threads(threads)  # the compiled step is guarded on the calling thread's count
        self.decoder.warm_up()

    def shutdown(self) -> None:
        for session in list(self.sessions.values()):
            self.close_session(session)
        self.compute.shutdown()
        self._compiler.shutdown(wait=False, cancel_futures=True)
