"""How a server runs one-token decode steps, the hot path of every generation.

All three ways run `BlockSpan.decode`, so they compute the same thing:
- eager: attends to exactly the slots so far; the default on CPU for blocks large enough to be bound by
  reading their weights (their projections are packed instead, `models.packed`).
- compiled (`--compile`; the default on CPU for blocks of under 2^20 weights, see `compiles_by_default`): torch.compile
  (Inductor, C++ wrapper) with the cache length marked dynamic, so one compilation serves every step; on a CPU
  it fuses a block's few dozen small ops into a handful of loops (tiny model: 0.58 -> 0.35-0.50 ms a step).
  Compiled on a thread of its own (`warm_up`, from `Backend.set_threads`), at start-up (before the server goes
  online) and again whenever the server's CPU thread count changes (torch guards a compiled step on it), for the
  steps of one sequence over the whole span without padding, which is what it then serves: any other step (a
  batch, padding, a sub-range of the span, an adapter, or a thread count not compiled yet), and every step
  while a compilation runs, runs eagerly on the compute thread, so no step ever waits for a compilation. A
  failure to compile (no C++ compiler, say) falls back to eager with a warning.
  The same step is built ahead of time instead (`--aot-step`, the default wherever the step is compiled on a
  CPU: AOTInductor, `AotStep`; its package kept on disk for the next start), and serves those steps from a
  session's second slot on (a first slot runs eagerly): its runner skips torch.compile's guards and wrappers,
  half a one-block step's time on a CPU (warm or with its caches evicted by other processes, as on a chain of
  servers sharing a host). torch.compile's step is then not compiled at all, unless the build fails.
- CUDA graphs: the default on CUDA, replayed with the slots and positions as tensors: one launch per step
  instead of hundreds. Sessions whose caches are rows of the server's cache arena (`server.arena`; those
  without an adapter) share row graphs: one per bucket of rows (a power of two that covers the highest row in
  the step) and of attended slots (`bucket`), each a step over the arena's rows [0, N) in which every row in
  use writes at its own slot and the rows without a step write to the scratch slot. Any mix of such sessions,
  single or merged (`step_many`, continuous batching), replays one of these graphs, captured once per server,
  when it starts (`capture_rows`; those over part of the span on first use).
  Any other session gets static input buffers of its own and, per bucket of attended slots, one captured
  graph of the whole span's step; a merged step of such sessions gets one graph per cohort: the same sessions,
  in the same order, each in the same bucket (the cohorts of sessions in lockstep repeat step after step). A
  cohort is captured once it has run `CAPTURE_AFTER` times, and the last `MAX_COHORTS` cohorts' graphs are
  kept; until then, and for cohorts carrying the ladder pair, it runs eagerly. A merged step that mixes arena
  sessions and others replays the row graph for the ones and the others' graph for the rest (`_replay_mixed`).
A session whose edge lies inside a Ladder Residual region steps the pair (r, p) through `step_pair`, eagerly: its
graphs would need a static buffer for p too (not built yet).

Where steps do not replay CUDA graphs, a merged step may also carry short prefills (`Member.tokens` > 1: a new
session's prompt, a verify step of speculative decoding), each as a chunk of rows attending causally to its own
cache, as `BlockSpan.forward` would: their rows share the step's read of the weights instead of reading them
once more (a 6-token prompt through 8 medium layers alone: 34 ms; as 6 more rows of a merged step: ~9).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree

from swarmllm.models import BlockConfig, BlockSpan, KVCache
from swarmllm.models.llama import BlockLora, DecodeSegment, position_ids
from swarmllm.server.arena import CacheArena

logger = logging.getLogger(__name__)

MIN_BUCKET = 64  # the smallest number of cache slots a CUDA graph attends to
CAPTURE_AFTER = 3  # merged steps of one cohort before its CUDA graph is captured (a passing mix is not)
MAX_COHORTS = 8  # cohorts whose merged-step graphs are kept (least recently used dropped)
COMPILE_BELOW_WEIGHTS = 1 << 20  # weights of a block whose step is bound by per-op costs (4 MiB in float32)
AOT_MAX_SLOTS = 1 << 20  # the longest cache an ahead-of-time step is built for
RECOMPILE_LIMIT = 256  # compiled graphs of `BlockSpan.decode` in one process (~4 per span and thread count)


def block_weights(config: BlockConfig) -> int:
    """The weights of one block's projections (q, k, v, o, gate, up, down)."""
    hidden, head_dim = config.hidden_size, config.head_dim
    attention = 2 * hidden * head_dim * (config.num_heads + config.num_kv_heads)
    return attention + 3 * hidden * config.intermediate_size


def compiles_by_default(config: BlockConfig, device: torch.device | str, quantized: bool) -> bool:
    """Whether a server compiles its decode step when not told: on a CPU, for unquantized blocks of fewer than
    `COMPILE_BELOW_WEIGHTS` weights. Their step is a few dozen ops that each cost more in fixed overhead than in
    arithmetic, which compiling fuses away (the tiny model's 2 servers: ~1.2x the tokens/s). A larger block's
    step is bound by reading its weights (SmolLM2-135M's 3.5M a block: as fast compiled as eager, measured),
    which the packed layout speeds up where a projection is large enough, and concurrent sessions' steps merge
    into one (continuous batching), which a compiled step does not serve."""
    small = block_weights(config) < COMPILE_BELOW_WEIGHTS
    return torch.device(device).type == "cpu" and not quantized and small


def aot_applies(compiled: bool, device: torch.device | str) -> bool:
    """Whether the step built ahead of time (`--aot-step`) can serve: it builds the compiled step, for a CPU only."""
    return compiled and torch.device(device).type == "cpu"


def bucket(slots: int, max_length: int) -> int:
    """Cache slots a captured graph attends to when `slots` are in use: the next power of two (at least
    MIN_BUCKET), so a session needs few graphs and mostly wastes at most half; the whole cache once the next
    power of two would reach past it (a 70-slot session gets one graph, not one of 64 slots and one of 70)."""
    size = MIN_BUCKET
    while size < slots:
        size *= 2
    return max_length if 2 * size > max_length else size


def graphs_enabled(device: torch.device, cuda_graphs: bool, compile: bool) -> bool:
    """Whether decode steps replay CUDA graphs: on CUDA unless told not to, and never beside a compiled step."""
    return cuda_graphs and device.type == "cuda" and not compile


def _bounds(blocks: slice | None) -> tuple[int, int] | None:
    """A blocks slice as a dict key (a slice is unhashable before Python 3.12)."""
    return None if blocks is None else (blocks.start, blocks.stop)


def row_bucket(top: int, rows: int) -> int:
    """Arena rows a row graph runs when rows [0, top) hold the step's sessions: the next power of two, at most
    the arena's `rows`."""
    size = 1
    while size < top:
        size *= 2
    return min(size, rows)


@dataclass
class _Graphs:
    """One session's static buffers and its captured graphs, by bucket."""

    hidden: torch.Tensor  # [B, H]
    positions: torch.Tensor  # [B] long
    slot: torch.Tensor  # [1] long
    by_bucket: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = field(default_factory=dict)


@dataclass
class Member:
    """One session's part of a merged decode step (`DecodeRunner.step_many`): a decode step, or a chunk of
    `tokens` > 1 tokens per sequence (a short prefill, merged so that it shares the step's read of the weights)."""

    hidden: torch.Tensor  # [B x tokens, H], in [B, tokens] order
    slot: int  # the cache slot its (first) tokens take
    key_mask: torch.Tensor  # [B, max_length]: the session's (it outlives the step)
    padded: bool  # whether any slot up to its last is a pad
    cache: KVCache
    lora: list[BlockLora] | None  # the session's adapter (fixed for its life)
    row: int | None = None  # its first row of the cache arena, where its cache is one (`server.arena`)
    tokens: int = 1

    def bucket(self) -> int:
        return bucket(self.slot + 1, self.cache.max_length)


def cohort_key(members: Sequence[Member], blocks: slice | None) -> tuple:
    """What a merged step's graph is valid for: the blocks run, then each member's cache, rows and bucket."""
    return (_bounds(blocks), *((id(m.cache), m.hidden.shape[0], m.bucket()) for m in members))


@dataclass
class _Cohort:
    """A merged step's static input buffers and, once captured, its graph (see the module doc)."""

    hidden: torch.Tensor  # [N, H]
    positions: torch.Tensor  # [N] long
    slots: list[torch.Tensor]  # [1] long per member
    runs: int = 0
    graph: torch.cuda.CUDAGraph | None = None
    out: torch.Tensor | None = None


@dataclass
class _RowInputs:
    """The row graphs' static inputs, one per arena row (a graph over rows [0, N) reads the first N)."""

    hidden: torch.Tensor  # [rows, H]
    positions: torch.Tensor  # [rows] long
    slots: torch.Tensor  # [rows] long: each row's arena slot (0, the scratch, for a row without a step)


class _WholeCacheStep(nn.Module):
    """`BlockSpan.decode` of one sequence over the whole span, given the whole cache and the attended length as
    the length of `attended` (an empty carrier): an AOTInductor graph takes its inputs' strides as they were at
    the export, and the slice a step attends to has its cache's, which differ from session to session."""

    def __init__(self, span: BlockSpan):
        super().__init__()
        self.span = span

    def forward(self, hidden, positions, slot, keys, values, attended):
        length = attended.shape[0]
        return self.span.decode(
            hidden, positions, slot, keys[:, :, :, :length], values[:, :, :, :length], None, None
        )


def aot_dir() -> Path:
    """Where built ahead-of-time steps are kept: `SWARMLLM_AOT_DIR`, else ~/.cache/swarmllm/aot."""
    return Path(os.environ.get("SWARMLLM_AOT_DIR", Path.home() / ".cache" / "swarmllm" / "aot"))


def _carrier(length: int, device: torch.device) -> torch.Tensor:
    """The attended length as a tensor's size (an export takes no int that varies)."""
    return torch.empty(length, dtype=torch.uint8, device=device)


def export_step(
    span: BlockSpan, device: torch.device
) -> tuple[_WholeCacheStep, torch.export.ExportedProgram]:
    """The span's one-token step over a whole cache, exported for any cache and attended length in
    [2, AOT_MAX_SLOTS]: what `AotStep` builds ahead of time."""
    dtype = next(span.parameters()).dtype
    cache = KVCache(len(span.blocks), 1, 8, span.config, dtype, device)
    hidden = torch.zeros(1, span.config.hidden_size, dtype=dtype, device=device)
    slot = torch.full((1,), 2, dtype=torch.long, device=device)
    length = torch.export.Dim("cache_length", min=2, max=AOT_MAX_SLOTS)
    attended = torch.export.Dim("attended", min=2, max=AOT_MAX_SLOTS)
    example = (hidden, slot, slot, cache.keys, cache.values, _carrier(3, device))
    shapes = ({}, {}, {}, {3: length}, {3: length}, {0: attended})
    module = _WholeCacheStep(span).eval()
    with torch.no_grad():
        return module, torch.export.export(module, example, dynamic_shapes=shapes)


def _package_key(program: torch.export.ExportedProgram) -> str:
    """What a built step depends on: the exported graph (its ops, shapes, dtypes and ranges, so the model code and
    config that made it), the constants folded into it (rotary frequencies), the thread count it was tuned for,
    torch and the CPU's instruction set. Not the weights, which are handed to it at load, nor where the source
    lies: the graph's printout comments each op with the file and line that made it, and keyed on those, an
    install at another path (or an edit that only moves lines) built a package of its own."""
    digest = hashlib.sha256()
    graph = program.graph_module.print_readable(print_output=False)
    parts = (
        torch.__version__,
        torch.backends.cpu.get_cpu_capability(),
        str(torch.get_num_threads()),
        "\n".join(line for line in graph.splitlines() if not line.lstrip().startswith("#")),
        str(program.graph_signature),
        str(program.range_constraints),
    )
    for part in parts:
        digest.update(part.encode() + b"\0")
    for name, tensor in sorted(program.constants.items()):
        digest.update(
            name.encode() + b"\0" + tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
        )
    return digest.hexdigest()[:20]


def _package(program: torch.export.ExportedProgram) -> tuple[Path, bool]:
    """The path of AOTInductor's package of `program`'s kernels, kept in `aot_dir` (built first unless it is
    there), and whether this call built it. Servers starting together on a host build it once: the others wait
    for the first one's build (a file lock, which the kernel lets go of if its holder dies) and load it. Where the
    folder is not writable, it is built in a temporary one, for this start only."""
    kept = aot_dir() / f"decode-{_package_key(program)}.pt2"
    if kept.exists():
        return kept, False
    try:
        kept.parent.mkdir(parents=True, exist_ok=True)
        lock = open(kept.with_suffix(".lock"), "a")  # noqa: SIM115 - held by the with below
    except OSError as e:
        logger.warning(
            "cannot keep the ahead-of-time step in %s (%s): it is built at each start", kept.parent, e
        )
        return _build(program, Path(tempfile.mkdtemp(prefix="swarmllm-aot-")) / kept.name), True
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if kept.exists():
            return kept, False
        logger.info("building the decode step ahead of time (AOTInductor), once; kept in %s", kept.parent)
        return _build(program, kept), True


def _build(program: torch.export.ExportedProgram, path: Path) -> Path:
    """Compile `program` into a package at `path`, its weights left out (`load_constants` hands them over);
    written under a name of its own and then renamed, so that no process loads a half-written one."""
    fd, partial = tempfile.mkstemp(suffix=".pt2", dir=path.parent)
    os.close(fd)
    try:
        with torch.no_grad():
            torch._inductor.aoti_compile_and_package(
                program,
                package_path=partial,
                inductor_configs={"aot_inductor.package_constants_in_so": False},
            )
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return path


class AotStep:
    """The compiled step built ahead of time (`torch.export` and AOTInductor) for one CPU thread count: a runner
    with no guards or Python wrappers around its kernels. The package holds the kernels only; the runner reads the
    span's own weight tensors (handed over at load, not copied), so every span whose step exports to the same
    graph shares one package, built once (7-30 s) and kept on disk (`aot_dir`)."""

    def __init__(self, span: BlockSpan, device: torch.device):
        module, program = export_step(span, device)
        path, self.built = _package(program)
        try:
            self._runner = torch._inductor.aoti_load_package(str(path))
        except RuntimeError as e:
            if self.built:
                raise
            # a kept package that does not load (damaged, or copied in from elsewhere): built again, once
            logger.warning("the kept ahead-of-time step %s does not load (%s); building it again", path, e)
            path.unlink(missing_ok=True)
            path, self.built = _package(program)
            self._runner = torch._inductor.aoti_load_package(str(path))
        if path.parent != aot_dir():  # built in a temporary folder: loaded, it is not needed any more
            shutil.rmtree(path.parent, ignore_errors=True)
        tensors = {**dict(module.named_parameters()), **dict(module.named_buffers())}
        names = self._runner.get_constant_fqns()
        self._runner.load_constants(
            {name: tensors[name] for name in names}, check_full_update=True, user_managed=True
        )
        # called through its loader's `boxed_run` with the flat list of inputs: the runner's own `__call__`
        # flattens and unflattens them with pytree on every step (13 of its 30 us, warm)
        inputs, output = (pytree.treespec_loads(spec) for spec in self._runner.loader.get_call_spec())
        if inputs.num_leaves != len(program.example_inputs[0]) or not output.is_leaf():
            raise RuntimeError(f"the exported step takes {inputs} and gives {output}, not flat tensors")
        self._run = self._runner.loader.boxed_run
        self.device = device

    def __call__(
        self, hidden: torch.Tensor, positions: torch.Tensor, cache: KVCache, slot: int
    ) -> torch.Tensor:
        """hidden [1, H] of one unpadded sequence's token taking cache slot `slot` (>= 1), so `positions` ([1]) is
        the slot as a tensor too; it attends to slots [0, slot]. -> [1, H]"""
        carrier = _carrier(slot + 1, self.device)
        return self._run([hidden, positions, positions, cache.keys, cache.values, carrier])[0]


class DecodeRunner:
    """Runs one token per sequence through a span: eagerly, compiled, or from CUDA graphs (see module doc)."""

    def __init__(
        self,
        span: BlockSpan,
        device: torch.device,
        *,
        compile: bool = False,
        cuda_graphs: bool = True,
        arena: CacheArena | None = None,
        aot: bool = False,
    ):
        """aot: with `compile` on a CPU, also build the step ahead of time (`AotStep`) and serve it from that."""
        self.span = span
        self.device = device
        self.cuda_graphs = graphs_enabled(device, cuda_graphs, compile)
        self.compiled = compile
        self.arena = arena
        self._decode = span.decode
        self._graphs: dict[int, _Graphs] = {}  # by id() of the session's cache
        # merged-step graphs by `cohort_key`
        self._cohorts: OrderedDict[tuple, _Cohort] = OrderedDict()
        self._rows: _RowInputs | None = None  # made on the first row step
        # row graphs and the tensors their replays write, by (blocks' bounds, rows, attended slots)
        self._row_graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._warm: set[int] = set()  # the CPU thread counts the decode step is compiled for
        self.aot = aot and aot_applies(compile, device)
        self._aot: dict[int, AotStep] = {}  # by CPU thread count
        self._compiling = False
        if compile:
            self._decode = torch.compile(span.decode, fullgraph=True, options={"cpp_wrapper": True})

    @property
    def mode(self) -> str:
        if self.cuda_graphs:
            return "cuda-graphs"
        return ("compiled ahead of time" if self.aot else "compiled") if self.compiled else "eager"

    def warm_up(self) -> None:
        """Compile the steps it serves (see the module doc) for the calling thread's CPU thread count (off the
        event loop and off the compute thread), so that no client's step waits seconds for it (a span with an
        edge inside a ladder region steps the ladder pair, eagerly: nothing to compile)."""
        config, span, threads = self.span.config, self.span, torch.get_num_threads()
        if not self.compiled or threads in self._warm:
            return
        if config.carries_pending(span.start) or config.carries_pending(span.end):
            return
        self._compiling = True  # the compute thread runs no compiled step meanwhile
        try:
            self._compile(threads)
        finally:
            self._compiling = False

    def _compile(self, threads: int) -> None:
        """The step ahead of time where it applies, else (or where it fails) torch.compile's: with the one built,
        torch.compile's step would serve only a session's first slot (below the export's range; eager serves
        it), and its compilation doubled a first start's (mistral's 2 tiny blocks: 37 s more)."""
        if self.aot:
            try:
                self._aot[threads] = AotStep(self.span, self.device)
            except Exception as e:  # noqa: BLE001 - any export or compiler failure: torch.compile's step serves
                logger.warning(
                    "the ahead-of-time step failed (%s: %s); compiling torch.compile's", type(e).__name__, e
                )
                self.aot = False
            else:
                self._warm.add(threads)
                return
        config, span = self.span.config, self.span
        logger.info(
            "compiling the decode step for %d CPU threads (torch.compile); this takes a while once", threads
        )
        dtype = next(self.span.parameters()).dtype
        hidden = torch.zeros(1, self.span.config.hidden_size, dtype=dtype, device=self.device)
        # torch guards apart the shapes a step's cache slice can take: one slot of a longer cache, several (slot 1
        # makes the attended length a symbol), and the whole cache (slot 3 of 4, and the single slot of a 1-token
        # cache), whose keys are then contiguous; each is compiled here, else a session's first step of that shape
        # (its last step, say) would compile, for seconds. The caches are made as a session's are (outside
        # inference mode), which torch guards too
        caches = {
            length: KVCache(len(span.blocks), 1, length, config, dtype, self.device) for length in (4, 1)
        }
        # torch's on-disk cache keys a compiled graph by the graph alone and hands back the first entry whose
        # guards pass, guards included: a model whose identical graph was compiled under a bound on the attended
        # length (another model's branch on a constant) would then recompile at every longer length. Keyed by the
        # span's config and bounds too, each model's graphs carry only their own guards
        tag = f"swarmllm-decode {config!r} {span.start}-{span.end}"
        # torch caps the graphs of one function (all spans' `decode`, every thread count) at 8 by default: a
        # server's third thread count would fail to compile and serve eagerly from then on
        limit = torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT)
        try:
            with torch.inference_mode(), torch.compiler.config.patch(cache_key_tag=tag), limit:
                for length, slots in ((4, (0, 1, 3)), (1, (0,))):
                    key_mask = torch.ones(1, length, dtype=torch.bool, device=self.device)
                    for slot in slots:
                        _, positions = self._attended(hidden, slot, key_mask, False)
                        keys, values, slot_tensor = self._slots(caches[length], slot)
                        # the attended length is a symbol of the graphs compiled here; the steps they then serve
                        # match them without the mark (torch guards their lengths against the symbol's range)
                        torch._dynamo.mark_dynamic(keys, 3)
                        torch._dynamo.mark_dynamic(values, 3)
                        self._compiled_step(hidden, positions, keys, values, slot_tensor)
        except Exception as e:  # noqa: BLE001 - any compiler failure: serve eagerly rather than not at all
            logger.warning("torch.compile failed (%s: %s); decoding eagerly", type(e).__name__, e)
            self.compiled, self._decode = False, self.span.decode
            return
        self._warm.add(threads)

    def _compiled_for(
        self,
        hidden: torch.Tensor,
        mask: torch.Tensor | None,
        blocks: slice | None,
        lora: list[BlockLora] | None,
    ) -> bool:
        """Whether the compiled step serves this step: one sequence, no padding, no adapter, the whole span and a
        thread count compiled for."""
        n = len(self.span.blocks)
        return (
            hidden.shape[0] == 1
            and mask is None
            and lora is None
            and (blocks is None or range(n)[blocks] == range(n))
            and torch.get_num_threads() in self._warm
            and not self._compiling
        )

    def _compiled_step(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        slot: torch.Tensor,
    ) -> torch.Tensor:
        """The compiled step: one sequence, the whole span, no padding; the attended length is a symbol."""
        return self._decode(hidden, positions, slot, keys, values, None, None)

    def step(
        self,
        hidden: torch.Tensor,
        slot: int,
        key_mask: torch.Tensor,
        padded: bool,
        cache: KVCache,
        blocks: slice | None,
        lora: list[BlockLora] | None = None,
        row: int | None = None,
    ) -> torch.Tensor:
        """hidden [B, H] of the tokens taking cache slot `slot`. key_mask [B, max_length] is the session's
        (False at pads, it outlives the step); padded says whether any slot up to `slot` is a pad; lora the
        session's adapter (it outlives the step too, so a captured graph may hold its tensors); row the
        session's first arena row, where its cache is one. -> [B, H]"""
        if self.cuda_graphs:
            try:
                return self._replay_mixed([Member(hidden, slot, key_mask, padded, cache, lora, row)], blocks)
            except RuntimeError as e:  # a capture this GPU or driver refuses: serve eagerly rather than fail
                self._without_graphs(e)
        mask, positions = self._attended(hidden, slot, key_mask, padded)
        if self._warm and self._compiled_for(hidden, mask, blocks, lora):
            aot = self._aot.get(torch.get_num_threads())
            if aot is None:
                return self._compiled_step(hidden, positions, *self._slots(cache, slot))
            if slot >= 1:  # (its export needs 2 attended slots or more: a first slot runs eagerly)
                return aot(hidden, positions, cache, slot)
        keys, values, slot_tensor = self._slots(cache, slot)
        # any other step would compile a graph of its own, for seconds, on the event loop: eager instead
        return self.span.decode(hidden, positions, slot_tensor, keys, values, mask, blocks, lora)

    def step_pair(
        self,
        hidden: torch.Tensor,
        pending: torch.Tensor | None,
        slot: int,
        key_mask: torch.Tensor,
        padded: bool,
        cache: KVCache,
        blocks: slice | None,
        lora: list[BlockLora] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`step` for the ladder pair (r [B, H], p [B, H] or None; `BlockSpan.decode_pair`), eagerly."""
        mask, positions = self._attended(hidden, slot, key_mask, padded)
        keys, values, slot_tensor = self._slots(cache, slot)
        return self.span.decode_pair(
            hidden, pending, positions, slot_tensor, keys, values, mask, blocks, lora
        )

    def _attended(
        self, hidden: torch.Tensor, slot: int, key_mask: torch.Tensor, padded: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The key mask of slots [0, slot] (None when none is a pad) and the tokens' rotary positions [B]."""
        if not padded:  # every position is the slot (one op: this is on every step's path)
            return None, torch.full((hidden.shape[0],), slot, dtype=torch.long, device=self.device)
        mask = key_mask[:, : slot + 1]
        return mask, position_ids(mask, hidden.shape[0], 1, slot, self.device)[:, 0]

    def _slots(self, cache: KVCache, slot: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The cache's keys and values over slots [0, slot], and `slot` as the [1] tensor decode takes."""
        keys, values = cache.keys[:, :, :, : slot + 1], cache.values[:, :, :, : slot + 1]
        return keys, values, torch.full((1,), slot, dtype=torch.long, device=self.device)

    def _replay(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        slot: int,
        key_mask: torch.Tensor,
        cache: KVCache,
        blocks: slice | None,
        lora: list[BlockLora] | None,
    ) -> torch.Tensor:
        graphs = self._graphs.get(id(cache))
        if graphs is None:
            batch = hidden.shape[0]
            graphs = _Graphs(
                torch.empty_like(hidden),
                torch.empty(batch, dtype=torch.long, device=self.device),
                torch.empty(1, dtype=torch.long, device=self.device),
            )
            self._graphs[id(cache)] = graphs
        graphs.hidden.copy_(hidden)
        graphs.positions.copy_(positions)
        graphs.slot.fill_(slot)
        size = bucket(slot + 1, cache.max_length)
        if size not in graphs.by_bucket:
            graphs.by_bucket[size] = self._capture(graphs, size, key_mask, cache, blocks, lora)
        graph, out = graphs.by_bucket[size]
        graph.replay()
        return out.clone()  # the next replay overwrites `out`

    def _capture(
        self,
        graphs: _Graphs,
        size: int,
        key_mask: torch.Tensor,
        cache: KVCache,
        blocks: slice | None,
        lora: list[BlockLora] | None,
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """Capture the span's step over the first `size` slots of this session's cache and key mask (tensors
        that live as long as the session), with the session's adapter (fixed for its life). Masking the slots
        after `slot` makes one graph valid for every step in the bucket, padded or not."""
        args = (
            graphs.hidden,
            graphs.positions,
            graphs.slot,
            cache.keys[:, :, :, :size],
            cache.values[:, :, :, :size],
            key_mask[:, :size],
            blocks,
            lora,
        )
        graph, out = self._captured(lambda: self.span.decode(*args))
        logger.debug("captured a decode graph over %d cache slots", size)
        return graph, out

    def _without_graphs(self, error: RuntimeError) -> None:
        """A capture failed: every step (single or merged) runs eagerly from now on, and the graphs go."""
        logger.warning("CUDA graph capture failed (%s); decoding eagerly from now on", error)
        self.cuda_graphs = False
        self._graphs.clear()
        self._cohorts.clear()
        self._row_graphs.clear()

    def _captured(self, run: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """`run` captured as a CUDA graph, and the tensor its replays write, after one run outside the capture
        (lazy cuBLAS initialisation and the like). The capture checks only this thread's CUDA calls: the
        backend's compute thread may allocate or wait on its own stream meanwhile (`Backend._on_stream`), which
        the default, process-wide check would turn into a failed capture, or a failed prefill."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            out = run()
        return graph, out

    def step_many(
        self, members: Sequence[Member], pending: torch.Tensor | None, blocks: slice | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Several sessions' steps over the same blocks in one pass (continuous batching): rows in the members'
        order, (r [N, H], p [N, H] or None) as `BlockSpan.decode_batch_pair` returns them; from CUDA graphs
        where enabled (`_replay_mixed`), else eagerly (the ladder pair at either edge, or a prefill's chunk
        among the members: see the module doc)."""
        chunks = any(m.tokens > 1 for m in members)
        if self.cuda_graphs and not chunks and not self._carries_pair(blocks):
            try:
                return self._replay_mixed(members, blocks), None
            except RuntimeError as e:  # a capture this GPU or driver refuses: merge eagerly rather than fail
                self._without_graphs(e)
        return self._merged(members, pending, blocks)

    def _carries_pair(self, blocks: slice | None) -> bool:
        """Whether an edge of `blocks` lies inside a ladder region: the steps take or return p, which the graphs
        (of `BlockSpan.decode`, r alone) cannot carry."""
        span, indices = self.span, range(len(self.span.blocks))[blocks or slice(None)]
        edges = (span.start + indices[0], span.start + indices[-1] + 1)
        return any(span.config.carries_pending(edge) for edge in edges)

    def _merged(
        self, members: Sequence[Member], pending: torch.Tensor | None, blocks: slice | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The merged step, eagerly."""
        segments, positions, rows = [], [], 0
        for m in members:
            batch = m.hidden.shape[0]
            if m.tokens == 1:
                mask, own = self._attended(m.hidden, m.slot, m.key_mask, m.padded)
                keys, values, slot = self._slots(m.cache, m.slot)
            else:  # a chunk: slots [slot, end), its positions and key mask as `BlockSpan.forward` takes them
                end = m.slot + m.tokens
                mask = m.key_mask[:, :end] if m.padded else None
                own = position_ids(mask, batch // m.tokens, m.tokens, m.slot, self.device).reshape(-1)
                keys, values, slot = self._slots(m.cache, end - 1)
            positions.append(own)
            segments.append(
                DecodeSegment(slice(rows, rows + batch), slot, keys, values, mask, m.lora, m.tokens)
            )
            rows += batch
        hidden = torch.cat([m.hidden for m in members])
        return self.span.decode_batch_pair(hidden, pending, torch.cat(positions), segments, blocks)

    def _replay_mixed(self, members: Sequence[Member], blocks: slice | None) -> torch.Tensor:
        """The step of one session or several from graphs: the arena sessions without an adapter from their row
        graph, the others (an adapter, a cache of their own) from their own graph if alone, else their cohort's,
        or eagerly until it is captured. A step that mixes the two runs both: two replays read the weights
        twice, but launch two graphs instead of an eager pass's hundreds of kernels (expected to win on a GPU,
        not measured yet); rows in the members' order."""
        in_arena = [m.row is not None and m.lora is None for m in members]
        parts = []
        for arena in (True, False):
            group = [m for m, a in zip(members, in_arena, strict=True) if a == arena]
            if not group:
                continue
            if arena:
                out = self._replay_rows(group, blocks)
            elif len(group) == 1:
                m = group[0]
                positions = self._attended(m.hidden, m.slot, m.key_mask, m.padded)[1]
                out = self._replay(m.hidden, positions, m.slot, m.key_mask, m.cache, blocks, m.lora)
            else:
                out = self._replay_many(group, blocks)
                if out is None:
                    out = self._merged(group, None, blocks)[0]
            parts.append((group, out))
        if len(parts) == 1:
            return parts[0][1]
        rows_of = {}
        for group, out in parts:
            for m, rows in zip(group, out.split([m.hidden.shape[0] for m in group]), strict=True):
                rows_of[id(m)] = rows
        return torch.cat([rows_of[id(m)] for m in members])

    def _replay_many(self, members: Sequence[Member], blocks: slice | None) -> torch.Tensor | None:
        """The merged step from its cohort's graph, captured now if the cohort has run often enough; None while
        it has not (the caller then runs it eagerly)."""
        cohort = self._cohort(cohort_key(members, blocks), members)
        cohort.runs += 1
        if cohort.graph is None:
            if cohort.runs < CAPTURE_AFTER:
                return None
            cohort.graph, cohort.out = self._captured(lambda: self._cohort_step(cohort, members, blocks))
            logger.debug("captured a merged decode graph of %d sessions", len(members))
        cohort.graph.replay()
        return cohort.out.clone()  # the next replay overwrites `out`

    def _cohort(self, key: tuple, members: Sequence[Member]) -> _Cohort:
        """The cohort's buffers (made on its first step, the least recently used cohort dropped beyond
        MAX_COHORTS), filled with this step's inputs."""
        cohort = self._cohorts.get(key)
        if cohort is None:
            hidden = torch.cat([m.hidden for m in members])
            cohort = _Cohort(
                torch.empty_like(hidden),
                torch.empty(hidden.shape[0], dtype=torch.long, device=self.device),
                [torch.empty(1, dtype=torch.long, device=self.device) for _ in members],
            )
            self._cohorts[key] = cohort
            while len(self._cohorts) > MAX_COHORTS:
                self._cohorts.popitem(last=False)
        self._cohorts.move_to_end(key)
        rows = 0
        for m, slot in zip(members, cohort.slots, strict=True):
            batch = m.hidden.shape[0]
            cohort.hidden[rows : rows + batch].copy_(m.hidden)
            positions = self._attended(m.hidden, m.slot, m.key_mask, m.padded)[1]
            cohort.positions[rows : rows + batch].copy_(positions)
            slot.fill_(m.slot)
            rows += batch
        return cohort

    def _cohort_step(self, cohort: _Cohort, members: Sequence[Member], blocks: slice | None) -> torch.Tensor:
        """What a cohort's graph runs: the merged step over each member's bucket of cache slots and key mask
        (tensors that live as long as the session), with the slots after each member's own masked out, so one
        graph serves every step of the cohort while its members stay in their buckets."""
        segments, rows = [], 0
        for m, slot in zip(members, cohort.slots, strict=True):
            batch, size = m.hidden.shape[0], m.bucket()
            keys, values = m.cache.keys[:, :, :, :size], m.cache.values[:, :, :, :size]
            mask = m.key_mask[:, :size]
            segments.append(DecodeSegment(slice(rows, rows + batch), slot, keys, values, mask, m.lora))
            rows += batch
        return self.span.decode_batch_pair(cohort.hidden, None, cohort.positions, segments, blocks)[0]

    def _replay_rows(self, members: Sequence[Member], blocks: slice | None) -> torch.Tensor:
        """The step of arena sessions (one or several) from the row graph of its bucket, captured now if this
        server has not run that bucket yet; rows in the members' order."""
        rows, size, index = self._fill_rows(members)
        graph, out = self._row_graph(rows, size, blocks)
        graph.replay()
        return out.index_select(0, index)  # (a copy: the next replay overwrites `out`)

    def _fill_rows(self, members: Sequence[Member]) -> tuple[int, int, torch.Tensor]:
        """Fill the row graphs' inputs with the members' step: (the rows the step runs, the slots it attends, the
        members' rows in their order as an index)."""
        arena, inputs = self.arena, self._row_inputs()
        rows = row_bucket(max(m.row + m.hidden.shape[0] for m in members), arena.rows)
        size = bucket(max(m.slot for m in members) + 1, arena.length)
        # built on the host and copied once each: a handful of small copies per step, whatever the members
        slots, positions, index = torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long), []
        for m in members:
            own = slice(m.row, m.row + m.hidden.shape[0])
            slots[own], positions[own] = m.slot + 1, m.slot  # (arena slot 0 is the scratch)
            index.extend(range(own.start, own.stop))
        index = torch.tensor(index, device=self.device)
        inputs.slots[:rows].copy_(slots)
        inputs.positions[:rows].copy_(positions)
        for m in members:
            if m.padded:  # its rotary positions count its real tokens only
                positions = self._attended(m.hidden, m.slot, m.key_mask, m.padded)[1]
                inputs.positions[m.row : m.row + m.hidden.shape[0]].copy_(positions)
        inputs.hidden[:rows].zero_()
        inputs.hidden.index_copy_(0, index, torch.cat([m.hidden for m in members]))
        return rows, size, index

    def _row_inputs(self) -> _RowInputs:
        """The row graphs' static inputs, made on first use."""
        if self._rows is None:
            arena = self.arena
            hidden = (arena.rows, self.span.config.hidden_size)
            self._rows = _RowInputs(
                torch.zeros(hidden, dtype=arena.keys.dtype, device=self.device),
                torch.zeros(arena.rows, dtype=torch.long, device=self.device),
                torch.zeros(arena.rows, dtype=torch.long, device=self.device),
            )
        return self._rows

    def capture_rows(self) -> int:
        """Capture the row graph of every bucket of rows and slots over the whole span, before any session
        steps (at start, on the compute thread): otherwise the first step of each bucket waits for its capture,
        tens of milliseconds on a GPU, in the middle of a client's generation. Returns how many it captured (0
        without an arena or graphs, or once a capture failed: steps then run eagerly)."""
        config, span = self.span.config, self.span
        if not self.cuda_graphs or self.arena is None:
            return 0
        if config.carries_pending(span.start) or config.carries_pending(span.end):
            return 0  # its whole-span steps carry the ladder pair: eager (see the module doc)
        arena, blocks, before = self.arena, slice(0, len(span.blocks)), len(self._row_graphs)
        # (the inputs' zeros meanwhile: every row writes to the scratch slot and attends to it alone)
        try:
            for rows in sorted({row_bucket(top, arena.rows) for top in range(1, arena.rows + 1)}):
                for size in sorted({bucket(slots, arena.length) for slots in range(1, arena.length + 1)}):
                    self._row_graph(rows, size, blocks)
        except RuntimeError as e:  # a capture this GPU or driver refuses: serve eagerly rather than fail
            self._without_graphs(e)
            return 0
        return len(self._row_graphs) - before

    def _row_graph(
        self, rows: int, size: int, blocks: slice | None
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The row graph of a bucket and the tensor its replays write, captured the first time it is asked for."""
        key = (_bounds(blocks), rows, size)
        if key not in self._row_graphs:
            self._row_graphs[key] = self._captured(lambda: self._rows_step(rows, size, blocks))
            logger.debug("captured a decode graph over %d arena rows and %d slots", rows, size)
        return self._row_graphs[key]

    def _rows_step(self, rows: int, size: int, blocks: slice | None) -> torch.Tensor:
        """What a row graph runs: the step of arena rows [0, rows) over the scratch slot and the first `size`
        slots of each (see the module doc): each row writes its keys and values at its slot of `_rows` and
        attends to its real slots up to there. -> [rows, H]"""
        arena, inputs, run = self.arena, self._row_inputs(), slice(None) if blocks is None else blocks
        keys, values = arena.keys[run, :rows, :, : 1 + size], arena.values[run, :rows, :, : 1 + size]
        return self.span.decode(
            inputs.hidden[:rows],
            inputs.positions[:rows],
            inputs.slots[:rows],
            keys,
            values,
            arena.key_mask[:rows, : 1 + size],
            blocks,
        )

    def forget(self, cache: KVCache) -> None:
        """Drop a closed session's graphs, and those of the cohorts it was in (and with them their memory)."""
        gone = id(cache)
        self._graphs.pop(gone, None)
        for key in [key for key in self._cohorts if any(member[0] == gone for member in key[1:])]:
            del self._cohorts[key]
