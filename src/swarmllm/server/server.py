"""A swarm server's life: join the DHT, choose and load blocks, serve them, announce, move, leave cleanly.

Order matters to the swarm: the server announces JOINING before it loads (so others balance around it), ONLINE
only once both transports answer, and OFFLINE on SIGTERM/SIGINT, before it hands its sessions back to their
clients (each finishes the step it has, then ends with `server_leaving`) and exits. A server that chose its
blocks checks every balance period (and at once when a connection to a peer breaks) whether the swarm is better
off with it elsewhere (`balancing.next_move`), and moves the same way: new blocks joining, online, then the
sessions on the old ones handed back. A server whose compute breaks (a tensor-parallel rank died or froze:
`Backend.failure`) leaves the same way, its sessions ending with `compute_failed`, and exits with status 1; so
does one whose DHT process died (no announcement or look-up would ever be answered), its sessions handed back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import multiprocessing
import os
import random
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmllm.balancing import choose_blocks
from swarmllm.balancing.memory import blocks_that_fit
from swarmllm.balancing.moves import next_move
from swarmllm.dht import (
    ModelInfo,
    ServerInfo,
    ServerState,
    announce,
    find_server_views,
    rejoin,
    start_dht,
    stop_dht,
    visible_maddrs,
)
from swarmllm.dht.info import (
    MAX_BUSY_ROWS,
    MAX_PREFIX_CHARS,
    MAX_RATE,
    MAX_RECORD_BYTES,
    model_fingerprint,
    record_bytes,
    same_checkpoint,
)
from swarmllm.dht.records import dht_prefix_for
from swarmllm.models import BlockConfig, BlockSpan, KVCache, hub_commit, load_config, load_span
from swarmllm.models.ladder import layer_ranges
from swarmllm.models.tp import check_shardable
from swarmllm.server.adapters import AdapterStore
from swarmllm.server.backend import Backend
from swarmllm.server.corrupt import corrupt_outputs
from swarmllm.server.decode import aot_applies, compiles_by_default
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.server.host import HostShare, device_folder, host_cores, threads_per_server
from swarmllm.server.memory import block_bytes, cache_bytes_per_block, device_memory, memory_share
from swarmllm.server.metrics import ServerMetrics, serve_metrics
from swarmllm.server.network import measure_network, network_rps
from swarmllm.server.reachability import RECHECK_S, DialBacks, ask_address, ask_reachable
from swarmllm.server.throughput import cached_threads, cached_throughput, last_measured
from swarmllm.server.tp import STEP_TIMEOUT_S, TensorParallelSpan
from swarmllm.server.tp_backend import TensorParallelBackend
from swarmllm.version import __version__
from swarmllm.wire import (
    Connection,
    ConnectionPool,
    ConnectionSlots,
    DirectServer,
    Identity,
    Message,
    WireError,
    WireLimits,
    load_swarm_key,
    proves_at,
    serve_libp2p,
)

logger = logging.getLogger(__name__)

PEERS_REFRESH_S = 1.0  # at most this often, a push to a peer we do not know makes us look the swarm up again
MAX_PINGS = 64  # peers pinged before each rebalancing decision
PING_TIMEOUT_S = 3.0
HOST_CHECK_S = 2.0  # how often a CPU server looks for other servers on its host
WATCH_S = 1.0  # how often the server looks for broken connections to its peers (one may have died)
# a change of its busy rows is announced at once, rather than at the next period, but no more often than this:
# clients spread new sessions by it (`ServerInfo.busy_rows`), and a period is long beside a burst of them
LOAD_ANNOUNCE_S = 5.0
UNSETTLED_CHECK_S = 2.0  # while a move is due (by us or another server), check again this soon
MAX_MOVE_BACKOFF_S = 600.0  # a move that keeps failing (out of memory, ...) is tried at most this rarely
LEAVE_ANNOUNCE_TIMEOUT_S = 5.0  # on leaving, the most the offline announcement may take
WILDCARD_HOSTS = ("0.0.0.0", "::", "")  # a --host that listens everywhere, which no peer can dial
IDENTITY_CHECK_S = 3.0  # at start, the wait for a server announced under our identity to prove it is running
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ServeConfigError(ValueError):
    """A setting that does not fit the model, known only once its config is read (the CLI prints one line)."""


class DhtGone(RuntimeError):
    """The server's DHT process exited: no announcement or look-up will ever be answered."""


class ServeStartError(RuntimeError):
    """Start-up cannot go on (its DHT failed it before it served): the CLI prints one line and exits 1."""


@dataclass
class ServerConfig:
    model: str
    # the hub's revision of `model` (a branch, tag or commit; None: the default branch)
    revision: str | None = None
    blocks: tuple[int, int] | None = None
    num_blocks: int | None = None
    initial_peers: list[str] = field(default_factory=list)
    host: str = "127.0.0.1"
    port: int = 0
    direct_port: int = 0
    # the address others dial ("auto": the one peers see this server's connections come from, `server.reachability`;
    # the default where `host` is a wildcard, which nobody can dial)
    announce_host: str | None = None
    announce_direct_port: int | None = None  # the direct port others dial, if not ours (a forward or proxy)
    dtype: str = "float32"
    quant: str = "none"  # "int8" | "nf4": the blocks' projections stored quantized (models.quant)
    device: str = "cpu"
    max_cache_tokens: int = 16384
    max_memory: int | None = None  # bytes for weights + KV cache; default: a fraction of the free memory
    public_name: str | None = None
    adapters: list[str] = field(default_factory=list)  # PEFT LoRA folders to host, announced by folder name
    dht_prefix: str | None = None
    identity_path: str | None = None
    swarm_key_path: str | None = (
        None  # a private swarm's key file: only its members may store, announce and call
    )
    num_threads: int | None = None
    # torch.compile the decode step (seconds to compile at start, then ~1.2-2x faster steps on a CPU); None: on
    # a CPU for small blocks only (`decode.compiles_by_default`)
    compile: bool | None = None
    # with compile on a CPU, the step built ahead of time too (AOTInductor, decode.AotStep); None: wherever the
    # compiled step runs on a CPU
    aot_step: bool | None = None
    cuda_graphs: bool = True  # on CUDA, replay captured graphs of the decode step
    # on a CPU, large projections as panels or for oneDNN (models.packed; not --compile)
    packed_weights: bool = True
    batch_wait_s: float = 0.01  # the most a decode step waits for others to merge with (server/batching.py)
    # slots of a row of the shared cache arena (server/arena.py), 0 for none; None: 1024 where steps replay CUDA
    # graphs, else none
    arena_length: int | None = None
    # a prefill over more tokens runs as chunks on the compute thread, other peers' work between them; 0: in one
    # piece; None: the backend's PREFILL_CHUNK_TOKENS
    prefill_chunk_tokens: int | None = None
    # the most cache tokens the prefix cache keeps (server/prefix.py), 0 for none; None: half of max_cache_tokens
    prefix_cache_tokens: int | None = None
    # processes (devices) the span runs across, tensor-parallel (server/tp_backend.py); needs blocks
    tp: int = 1
    # with --tp, a call on the ranks past this plus 10x its expected time means a rank froze (server/tp.py)
    tp_step_timeout_s: float = STEP_TIMEOUT_S
    throughput: float | None = None  # announced decode steps/s per block instead of measuring
    bandwidth: float | None = None  # bytes/s of this server's uplink instead of measuring it to peers
    update_period_s: float = 30.0  # re-announce this often (records expire after 3 periods)
    reach_recheck_s: float = RECHECK_S  # ask peers again whether they reach our direct address this often
    balance_period_s: float = 15.0  # a movable server checks whether to move this often, and soon after a
    # connection to a peer breaks
    # the most a DHT request may take (hivemind gives up on a peer after 3 s; a store or look-up asks a few in turn):
    # a DHT process that froze must not stop the serving loop (announcements, checks, a SIGTERM's leave) for ever
    dht_timeout_s: float = 30.0
    leave_timeout_s: float = 5.0  # on SIGTERM, how long open sessions may take to finish their current step
    expiration_s: float | None = None
    limits: ServerLimits = field(default_factory=ServerLimits)
    # frame sizes and deadlines, stream inbox bytes, connection caps (shared by the direct and libp2p transports)
    wire: WireLimits = field(default_factory=WireLimits)
    handshake_timeout_s: float = 10.0  # a direct connection that has not proven its peer by then is dropped
    metrics_port: int | None = None  # serve Prometheus `/metrics` on this port (0: any free port) at `host`
    corrupt_every: int = 0  # FOR TESTS ONLY: every Nth output is made wrong (server/corrupt.py)


class Server:
    def __init__(self, config: ServerConfig):
        self.config = config
        self.identity = (
            Identity.load_or_create(config.identity_path) if config.identity_path else Identity.generate()
        )
        self.swarm_key = load_swarm_key(config.swarm_key_path)
        self.dht_prefix = config.dht_prefix or dht_prefix_for(config.model)
        self.state = ServerState.JOINING
        self.start = self.end = 0
        self.inference_rps = self.forward_rps = config.throughput or 1.0
        self.network_rps: float | None = None
        self._network_task: asyncio.Task | None = None
        self.backend: Backend | None = None
        # the busy rows it last announced, and when (`_load_moved`)
        self._announced_rows, self._announced_at = 0, float("-inf")
        self.adapters: AdapterStore | None = None  # hosted (--adapters) and clients' uploaded LoRA adapters
        self.direct_addr: str | None = None
        self.direct_port = 0  # the direct port others dial
        # the direct address is learned from peers (`ServerConfig.announce_host`)
        self.auto_host = config.announce_host == "auto" or (
            config.announce_host is None and config.host in WILDCARD_HOSTS
        )
        # whether peers reach us at direct_addr (`server.reachability`): None until one answers
        self.direct_reachable: bool | None = None
        self._reach_task: asyncio.Task | None = None
        self._reached_at = -math.inf  # (monotonic) when peers last gave a verdict
        self.peers: dict[str, ServerInfo] = {}  # the other servers of this model, for pushes to the next one
        self.ladder: tuple[tuple[int, int], ...] = ()  # the checkpoint's ladder layers, as announced
        self.fingerprint: str | None = None  # the checkpoint's dht.info.model_fingerprint, as announced
        self.commit: str | None = None  # the hub commit it is read at (None: a local folder), as announced
        self.revision: str | None = None  # what it loads at: that commit, or --revision (a folder has none)
        self.compiles = False  # config.compile, resolved for this checkpoint and device
        self.aot_step = False  # config.aot_step, likewise
        self._peers_at = -float("inf")
        self._stop = asyncio.Event()
        # servers of one device on this host split its memory, and CPU ones without --num-threads its cores
        self.host_share = HostShare(device_folder(config.device))
        # (a tensor-parallel span's ranks keep the threads they started with)
        self._share_threads = (
            config.num_threads is None and torch.device(config.device).type == "cpu" and config.tp == 1
        )
        self._threads: int | None = None
        self._main: asyncio.Task | None = None  # run(), cancelled by a signal during start-up
        self._serving = False  # start-up is done: a signal asks for a graceful leave
        self.stopped_by: int | None = None  # the signal that stopped the server
        self.failed: str | None = None  # why its compute or DHT broke: it left for that (and exits with 1)
        # after a failed move, none before _move_retry_at (monotonic); the wait doubles with each failure
        self._move_backoff_s = 0.0
        self._move_retry_at = 0.0

    def stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int) -> None:
        """SIGTERM or SIGINT. Once serving, leave gracefully (announce offline, hand sessions back). During start-up
        nothing reads the stop event, and loading blocks or compiling runs in a worker thread that cannot be
        interrupted: cancel start-up where it is, and `run_server` exits without waiting for that thread."""
        self.stopped_by = signum
        if self._serving:
            self.stop()
        elif self._main is not None:
            self._main.cancel()

    async def run(self) -> None:
        cfg = self.config
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self._main = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.host_share.join()  # early, so that servers starting together see each other
        try:
            await self._start_and_serve()
        finally:
            self.host_share.leave()

    async def _start_and_serve(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        # every load at the one commit it announces (a branch may move while it serves, and it loads on moves)
        self.commit = hub_commit(cfg.model, revision=cfg.revision)
        self.revision = self.commit or cfg.revision
        _, block_config = load_config(cfg.model, revision=self.revision)
        if cfg.tp > 1:
            try:
                check_shardable(block_config, cfg.tp)
            except ValueError as e:
                raise ServeConfigError(f"--tp {cfg.tp}: {e}") from None
        if cfg.num_blocks is not None and cfg.num_blocks > block_config.num_layers:
            raise ServeConfigError(
                f"--num-blocks {cfg.num_blocks} is more than the model's {block_config.num_layers} blocks"
            )
        self.ladder = layer_ranges(block_config.ladder_layers)
        self.fingerprint = model_fingerprint(block_config)
        self.compiles = cfg.compile
        if self.compiles is None:
            self.compiles = cfg.tp == 1 and compiles_by_default(block_config, cfg.device, cfg.quant != "none")
        aot_step = aot_applies(self.compiles, cfg.device)
        if cfg.aot_step and not aot_step:
            raise ServeConfigError(
                "--aot-step builds the compiled step ahead of time: it needs the compiled step on a CPU "
                "(--compile, or blocks small enough to compile by default, and --device cpu)"
            )
        self.aot_step = aot_step and cfg.aot_step is not False
        limits = cfg.limits
        self.adapters = AdapterStore(
            block_config,
            DTYPES[cfg.dtype],
            cfg.device,
            max_adapters_per_peer=limits.max_adapters_per_peer,
            max_bytes_per_peer=limits.max_adapter_bytes_per_peer,
            idle_timeout_s=limits.adapter_idle_timeout_s,
        )
        for path in cfg.adapters:  # before joining: a bad folder stops the server at once
            try:
                logger.info("hosting adapter %r from %s", self.adapters.host(path), path)
            except OSError as e:
                raise ServeConfigError(f"--adapters {path}: cannot read {e.filename}: {e.strerror}") from None
            except ValueError as e:
                raise ServeConfigError(f"--adapters {e}") from None
        if len(self.dht_prefix) > MAX_PREFIX_CHARS:
            raise ServeConfigError(
                f"--dht-prefix: at most {MAX_PREFIX_CHARS} characters, not {len(self.dht_prefix)}"
            )
        self.model_info = ModelInfo(
            dht_prefix=self.dht_prefix, num_blocks=block_config.num_layers, repository=cfg.model
        )
        self._check_record_size()
        self.dht, self.owner_tag = await loop.run_in_executor(
            None,
            lambda: start_dht(
                self.identity,
                initial_peers=cfg.initial_peers,
                host=cfg.host,
                port=cfg.port,
                announce_host=None if self.auto_host else cfg.announce_host,
                swarm_key=self.swarm_key,
            ),
        )
        try:
            await self._serve(block_config)
        finally:
            stop_dht(self.dht)

    async def _serve(self, block_config: BlockConfig) -> None:
        cfg = self.config
        # (a fresh identity is nobody else's; the swarm as read for the check is the one to choose blocks in)
        servers = await self._check_identity_free() if cfg.identity_path is not None else None
        start, end = await self._choose_span(block_config, servers)
        self.start, self.end = start, end
        await self._announce()
        logger.info(
            "loading blocks [%d, %d) of %s as %s (quantization: %s)",
            start,
            end,
            cfg.model,
            cfg.dtype,
            cfg.quant,
        )
        span = await asyncio.get_running_loop().run_in_executor(None, lambda: self._load(start, end))
        self._share_cores()
        if cfg.bandwidth is not None:
            self.network_rps = network_rps(cfg.bandwidth, span.config.hidden_size, DTYPES[cfg.dtype].itemsize)
        self.backend = await self._make_backend(span)
        await self._measure_compute()
        if self.compiles:  # compiled for the settled thread count (torch guards a compiled step on it)
            await asyncio.wrap_future(self.backend.set_threads(torch.get_num_threads()))
        p2p = await self.dht.replicate_p2p()
        self.pool = ConnectionPool(self.identity, p2p, swarm_key=self.swarm_key)
        self.metrics = ServerMetrics()
        self.metrics.watch_cache(
            lambda: self.backend.used_tokens, lambda: self.backend.budget.capacity_tokens
        )
        self.metrics.watch_prefix(
            lambda: 0 if self.backend.prefix is None else self.backend.prefix.tokens,
            lambda: 0 if self.backend.prefix is None else self.backend.prefix.hit_tokens,
        )
        self.metrics.serving(self.dht_prefix, start, end)
        self.handler = handler = RequestHandler(
            self.backend,
            self._info_record,
            cfg.limits,
            self._connect,
            self.identity.peer_id,
            self.adapters,
            self.metrics,
            DialBacks(self.identity, self.swarm_key, asked=self._asked_reach),
        )
        handlers = handler.handlers()
        slots = ConnectionSlots(cfg.wire)
        direct = DirectServer(
            handlers,
            self.identity,
            host=cfg.host,
            port=cfg.direct_port,
            limits=cfg.wire,
            handshake_timeout=cfg.handshake_timeout_s,
            slots=slots,
            swarm_key=self.swarm_key,
        )
        await direct.start()
        host, port = direct.address
        self.direct_port = cfg.announce_direct_port or port
        # (an address to learn from peers: none announced until one reaches us)
        self.direct_addr = None if self.auto_host else f"{cfg.announce_host or host}:{self.direct_port}"
        await serve_libp2p(p2p, handlers, limits=cfg.wire, slots=slots, swarm_key=self.swarm_key)
        # peers now (not inside the first push's time budget), and whether they reach us at the direct address,
        # so that one none can dial is never announced (none answering: asked again each period)
        await self._refresh_peers()
        await self._check_reach()
        metrics_page, metrics_url = None, None
        if cfg.metrics_port is not None:
            metrics_page, bound = await serve_metrics(self.metrics, cfg.host, cfg.metrics_port)
            public = cfg.announce_host or cfg.host
            if self.auto_host:  # (the host peers reached us at, where one did)
                public = self.direct_addr.rpartition(":")[0] if self.direct_addr else cfg.host
            metrics_url = f"http://{public}:{bound}/metrics"
        self.state = ServerState.ONLINE
        await self._announce()
        self._measure_network_soon()
        print(
            json.dumps(
                {
                    "event": "server_online",
                    "peer_id": self.identity.peer_id,
                    "start": start,
                    "end": end,
                    "direct": self.direct_addr,
                    "maddrs": visible_maddrs(self.dht),
                    "metrics": metrics_url,
                }
            ),
            flush=True,
        )
        host_watch = asyncio.create_task(self._watch_host()) if self._share_threads else None
        rejoining: asyncio.Task | None = None
        next_announce = next_balance = time.monotonic()
        next_announce += cfg.update_period_s
        next_balance += cfg.balance_period_s
        self._serving = True
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), WATCH_S)
                    break
                except TimeoutError:
                    pass
                if (why := self._failure()) is not None:  # it cannot go on as a server: leave, for a restart
                    self._fail(why)
                    break
                now, lost = time.monotonic(), self.pool.drop_broken()
                if now >= next_announce:
                    next_announce = now + cfg.update_period_s
                    # initial peers that left our routing table (a bootstrap peer restarted) are met again
                    if rejoining is None or rejoining.done():
                        rejoining = asyncio.create_task(self._rejoin())
                    await self._announce()
                    await self._refresh_peers()
                    self._measure_network_soon()
                    self._check_reach_soon()
                elif self._load_moved(now):
                    await self._announce()
                # an operator's --blocks is kept; a chosen span may move
                if cfg.blocks is None and (now >= next_balance or lost):
                    if lost:
                        logger.info("connections to %s broke; checking the swarm now", ", ".join(lost))
                    # a repair may take several moves, by servers that notice at different times: check again
                    # soon while one is due, so the next one doesn't wait a whole period
                    unsettled = await self._rebalance()
                    next_balance = time.monotonic() + (
                        UNSETTLED_CHECK_S if unsettled else cfg.balance_period_s
                    )
        except DhtGone:
            pass  # (`_on_dht` said why) its sessions are handed back all the same
        finally:
            for task in (host_watch, self._network_task, self._reach_task, rejoining):
                if task is not None:
                    task.cancel()
            self.state = ServerState.OFFLINE
            with contextlib.suppress(DhtGone):
                await self._announce(leaving=True)
            await handler.leave(cfg.leave_timeout_s)
            await direct.stop()
            if metrics_page is not None:
                await metrics_page.cleanup()
            await self.pool.close()
            await self.pool.p2p.shutdown()  # (removes its socket file in /tmp, which stayed after every stop)
            self.backend.shutdown()
            logger.info("server %s left the swarm", self.identity.peer_id)

    def _failure(self) -> str | None:
        """Why this server cannot go on serving (its compute or its DHT is gone), or None."""
        if not self.dht.is_alive():
            return f"the DHT process (pid {self.dht.pid}) exited with status {self.dht.exitcode}"
        why = self.backend.failure() if self.backend is not None else None
        return None if why is None else f"compute failed: {why}"

    def _fail(self, why: str) -> None:
        if self.failed is None:
            self.failed = why
            logger.error("%s; leaving the swarm", why)

    async def _on_dht(self, request, *, leaving: bool = False):
        """The answer of a DHT request (a coroutine); DhtGone where the DHT process is dead or dies meanwhile
        (hivemind's future would wait for its answer for ever); TimeoutError where it has not answered in
        `dht_timeout_s` (a frozen DHT process), or once the server is asked to leave (then only the offline
        announcement of `leaving` is still worth waiting for, LEAVE_ANNOUNCE_TIMEOUT_S at most)."""
        task = asyncio.ensure_future(request)
        timeout_s = LEAVE_ANNOUNCE_TIMEOUT_S if leaving else self.config.dht_timeout_s
        deadline = time.monotonic() + timeout_s
        try:
            while not task.done():
                if not self.dht.is_alive():
                    self._fail(self._failure())
                    raise DhtGone(self.failed)
                if time.monotonic() >= deadline or (self._stop.is_set() and not leaving):
                    leave = self._stop.is_set() and not leaving
                    raise TimeoutError("left first" if leave else f"no answer in {timeout_s:.0f} s")
                await asyncio.wait({task}, timeout=min(WATCH_S, max(0.0, deadline - time.monotonic())))
            return task.result()
        finally:
            task.cancel()

    def _load(self, start: int, end: int, reuse: BlockSpan | None = None) -> BlockSpan | TensorParallelSpan:
        """Blocks [start, end) in this process, or sharded over `tp` processes (each with its share of the
        host's cores, unless --num-threads says otherwise); a moving server's blocks reuse those of its old span
        (`reuse`) that it keeps."""
        cfg = self.config
        if cfg.tp > 1:
            threads = cfg.num_threads or max(1, host_cores() // cfg.tp)
            return TensorParallelSpan(
                cfg.model,
                start,
                end,
                world=cfg.tp,
                dtype=DTYPES[cfg.dtype],
                device=cfg.device,
                threads=threads,
                step_timeout_s=cfg.tp_step_timeout_s,
                revision=self.revision,
            )
        return load_span(
            cfg.model,
            start,
            end,
            revision=self.revision,
            dtype=DTYPES[cfg.dtype],
            device=cfg.device,
            reuse=reuse,
            quant=cfg.quant,
            pack=self._pack,
        )

    @property
    def _pack(self) -> bool:
        """Whether loaded blocks get packed weights (torch.compile lays weights out itself)."""
        return self.config.packed_weights and not self.compiles

    async def _make_backend(self, span: BlockSpan | TensorParallelSpan) -> Backend:
        cfg = self.config
        if isinstance(span, TensorParallelSpan):
            backend = TensorParallelBackend(
                span, cache_tokens=cfg.max_cache_tokens, prefill_chunk_tokens=cfg.prefill_chunk_tokens
            )
            logger.info("steps run tensor-parallel over %d processes, eagerly", cfg.tp)
        else:
            backend = await asyncio.get_running_loop().run_in_executor(
                None,
                lambda: Backend(
                    span,
                    cache_tokens=cfg.max_cache_tokens,
                    device=cfg.device,
                    compile=self.compiles,
                    aot_step=self.aot_step,
                    cuda_graphs=cfg.cuda_graphs,
                    batch_wait_s=cfg.batch_wait_s,
                    arena_length=cfg.arena_length,
                    prefill_chunk_tokens=cfg.prefill_chunk_tokens,
                    prefix_cache_tokens=cfg.prefix_cache_tokens,
                ),
            )
            logger.info("decode steps run %s; weights %s", backend.decoder.mode, backend.weights_layout)
            if backend.prefix is not None:
                logger.info("prefix cache: up to %d tokens", backend.prefix.capacity_tokens)
            if backend.arena is not None:
                arena, began = backend.arena, time.perf_counter()
                logger.info(
                    "cache arena: %d rows of %d slots (sessions up to that long)", arena.rows, arena.length
                )
                captured = await backend.on_compute_thread(backend.decoder.capture_rows)
                if captured:
                    logger.info("captured %d decode graphs in %.1f s", captured, time.perf_counter() - began)
        corrupt_outputs(backend, cfg.corrupt_every)
        cache_mib = (
            cfg.max_cache_tokens
            * KVCache.bytes_per_token(span.end - span.start, span.config, DTYPES[cfg.dtype])
            / 2**20
        )
        logger.info("KV-cache budget: %d tokens, up to %.0f MiB", cfg.max_cache_tokens, cache_mib)
        return backend

    async def _rebalance(self) -> bool:
        """Move to other blocks when that raises the swarm's bottleneck enough (`balancing.should_move`). Peers
        are pinged first: a server that died keeps its record until it expires, and its blocks may need us now.
        Returns whether a move was due (ours, now made, or another server's)."""
        if self._move_retry_at and time.monotonic() >= self._move_retry_at:
            # our back-off is over: movable again (`_info`), said before we count on it, so that the others
            # and we agree on who moves
            self._move_retry_at = 0.0
            await self._announce()
            return True
        try:  # (one look-up gives the servers as they serve, for our peers, and where the others are going)
            online, planned = await self._find_server_views()
        except TimeoutError as e:
            logger.warning("looking the swarm up failed (%s); not balancing this time", e)
            return False
        self._keep_peers(online)
        # where the others are going: one that moves counts at the blocks it loads, as it will serve them
        others = [s for s in planned if s.state != ServerState.OFFLINE and s.peer_id != self.identity.peer_id]
        alive = await asyncio.gather(*(self._answers(s.peer_id) for s in others[:MAX_PINGS]))
        others = [s for s, ok in zip(others, alive) if ok] + others[MAX_PINGS:]
        # every server orders the swarm alike (by peer id), so all agree on which one of them should move
        swarm = sorted([*others, self._info()], key=lambda s: s.peer_id)
        spans = [(s.start_block, s.end_block, s.throughput) for s in swarm]
        me = next(i for i, s in enumerate(swarm) if s.peer_id == self.identity.peer_id)
        # servers pinned by --blocks never move, so nobody waits for them to
        # lookahead: also a move that costs nothing and lets another one pay (two servers overlapping around a
        # gap that neither can fill alone: the balancing simulator found it worth its extra moves)
        movable = [s.movable for s in swarm]
        move = next_move(self.model_info.num_blocks, spans, movable=movable, lookahead=True)
        logger.debug("rebalancing over %s as %d: %s", spans, me, move)
        if move is not None and move[0] == me:  # (never while we back off: we announce movable: false)
            await self._move(*move[1])
        return move is not None

    async def _answers(self, peer_id: str) -> bool:
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                conn = await self._connect(peer_id)
                await conn.call("info", Message())
            return True
        except (TimeoutError, WireError, OSError):
            logger.info("peer %s does not answer; balancing without it", peer_id)
            return False

    async def _move(self, start: int, end: int) -> None:
        """Serve blocks [start, end) instead: announce the new blocks as joining, load only those while still
        serving the old ones, switch, announce, and hand the sessions on the old blocks back to their clients
        (whose failover moves them without banning us: we are healthy, only elsewhere)."""
        cfg, old_backend = self.config, self.backend
        old_start, old_end = self.start, self.end
        logger.info("moving from blocks [%d, %d) to [%d, %d)", old_start, old_end, start, end)
        began = time.perf_counter()
        info = self._info()
        joining = info.model_copy(
            update={"state": ServerState.JOINING, "start_block": start, "end_block": end}
        )
        # the new blocks as joining, so that others balance around them; the old ones stay online meanwhile
        new_blocks = [b for b in range(start, end) if not old_start <= b < old_end]
        load = asyncio.get_running_loop().run_in_executor(
            None,
            lambda: self._load(start, end, reuse=old_backend.span),
        )
        # the joining records go out while the blocks load (a store may wait seconds on a slow DHT peer)
        joining_records = self._announce(joining, blocks=new_blocks)
        span, _ = await asyncio.gather(load, joining_records, return_exceptions=True)
        loaded = time.perf_counter()
        try:
            if isinstance(span, BaseException):
                raise span
            backend = await self._make_backend(span)
        except Exception as e:  # (e.g. out of memory, a missing shard) the old blocks still serve: keep them
            backoff = min(max(2 * self._move_backoff_s, cfg.balance_period_s), MAX_MOVE_BACKOFF_S)
            self._move_backoff_s, self._move_retry_at = backoff, time.monotonic() + backoff
            logger.warning(
                "moving to blocks [%d, %d) failed (%s: %s); serving [%d, %d) still, no move for %.0f s",
                start,
                end,
                type(e).__name__,
                str(e).splitlines()[0] if str(e) else "",
                old_start,
                old_end,
                backoff,
            )
            await self._announce(info.model_copy(update={"state": ServerState.OFFLINE}), blocks=new_blocks)
            # not movable until the back-off ends (`_info`), said now: the others would otherwise keep choosing
            # us as the mover of the round and wait for a move we do not make, leaving the gap open meanwhile
            await self._announce()
            return
        self.backend, self._move_backoff_s = backend, 0.0
        if self.compiles:  # the new span's step compiles on the compute thread; until then steps run eagerly
            self.backend.set_threads(torch.get_num_threads())
        self.handler.use_backend(self.backend)
        self.start, self.end = start, end
        self.metrics.serving(self.dht_prefix, start, end)
        await self._announce()  # the new blocks online first: a reader prefers a peer's online record
        gone = info.model_copy(update={"state": ServerState.OFFLINE})
        await self._announce(gone, blocks=[b for b in range(old_start, old_end) if not start <= b < end])
        announced = time.perf_counter()
        self.handler.hand_back(old_backend)  # now that a client's failover finds where the blocks went
        await self.handler.sessions_closed(old_backend, cfg.leave_timeout_s)
        old_backend.shutdown()
        logger.info(
            "moved to blocks [%d, %d): loaded in %.2f s, online %.2f s later, old sessions closed %.2f s later",
            start,
            end,
            loaded - began,
            announced - loaded,
            time.perf_counter() - announced,
        )

    async def _watch_host(self) -> None:
        """Re-split the host's cores soon after a server on it starts or stops (the check is a folder listing),
        and measure (or look up) what the new share computes, so the next announcement says it."""
        while True:
            await asyncio.sleep(HOST_CHECK_S)
            if self._share_cores():
                await self._measure_compute()

    def _share_cores(self) -> bool:
        """Use this server's share of the host's cores (see `server.host`); whether it changed."""
        if not self._share_threads:
            return False
        servers = self.host_share.servers()
        threads = threads_per_server(host_cores(), servers)
        if threads == self._threads:
            return False
        logger.info("using %d CPU threads (%d CPU servers on this host)", threads, servers)
        self._threads = threads
        self._use_threads(threads)
        return True

    def _use_threads(self, threads: int) -> None:
        """torch's CPU thread count, here and on the backend's compute thread."""
        torch.set_num_threads(threads)
        if self.backend is not None:
            self.backend.set_threads(threads)

    async def _measure_compute(self) -> None:
        """Decode steps/s and forward tokens/s per block at this device, dtype and thread count, measured on the
        compute thread (or found in the on-disk cache), unless --throughput gave them. First, a CPU server whose
        share of the cores runs its blocks no faster than one thread uses one (`throughput.threads_that_pay`)."""
        cfg = self.config
        threads = torch.get_num_threads() if torch.device(cfg.device).type == "cpu" else 0
        backend = self.backend
        span = backend.parallel if isinstance(backend, TensorParallelBackend) else backend.span
        dtype = self._measured_dtype(tp=False)
        if self._share_threads and threads > 1:  # (--num-threads: the operator's count stands)
            useful = await backend.on_compute_thread(cached_threads, span, cfg.device, dtype, threads)
            if useful < threads:
                logger.info("%d CPU threads are no faster than 1 for these blocks: using 1", threads)
                self._use_threads(useful)
                threads = useful
        if cfg.throughput is not None:
            return
        self.inference_rps, self.forward_rps = await self.backend.on_compute_thread(
            cached_throughput, span, cfg.device, self._measured_dtype(), threads
        )
        logger.info(
            "throughput per block: %.1f decode steps/s, %.0f forward tokens/s (%d threads)",
            self.inference_rps,
            self.forward_rps,
            threads,
        )

    def _measured_dtype(self, tp: bool = True) -> str:
        """The name its measurements are cached under besides the model, device and threads: the dtype, with the
        quantization and (`tp`) the tensor-parallel degree where there are."""
        cfg = self.config
        dtype = cfg.dtype if cfg.quant == "none" else f"{cfg.dtype}+{cfg.quant}"
        return dtype if cfg.tp == 1 or not tp else f"{dtype}+tp{cfg.tp}"

    async def _check_identity_free(self) -> list[ServerInfo]:
        """Refuse to start where a running server proves our identity (the same --identity file started twice,
        or copied to another machine): two servers under one peer id overwrite each other's records, and the swarm
        sees one of them at a time. hivemind's own check asks libp2p's peer routing, which finds no peer of a swarm
        like ours. A record of ours that no server answers for is this server's own, from before a restart.
        Returns the model's servers as read for it (where they are going: `_find_server_views`)."""
        _, servers = await self._views_at_start("check that no other server runs with this identity")
        me = self.identity.peer_id
        for addr in (
            a for s in servers if s.peer_id == me and s.state != ServerState.OFFLINE for a in s.direct_addrs
        ):
            proved = await proves_at(
                addr,
                self.identity,
                me,
                timeout=IDENTITY_CHECK_S,
                swarm_key=self.swarm_key,
                limits=self.config.wire,
            )
            if proved:
                raise ServeStartError(
                    f"another server is running with this identity ({me}, at {addr}): stop it, or give this one an "
                    "--identity of its own"
                )
        return servers

    async def _views_at_start(self, doing: str) -> tuple[list[ServerInfo], list[ServerInfo]]:
        """`_find_server_views`, where a DHT that fails it stops the start with one line saying what it was
        `doing`."""
        try:
            return await self._find_server_views()
        except TimeoutError:
            raise ServeStartError(
                f"cannot {doing}: the DHT process (pid {self.dht.pid}) did not answer a look-up of the swarm in "
                f"{self.config.dht_timeout_s:g} s"
            ) from None
        except DhtGone as e:
            raise ServeStartError(f"cannot {doing}: {e}") from None

    async def _choose_span(
        self, block_config: BlockConfig, servers: list[ServerInfo] | None
    ) -> tuple[int, int]:
        """The span to serve: --blocks, else the best window among the model's `servers` (read now where None)."""
        cfg = self.config
        total_blocks = block_config.num_layers
        last = last_measured(block_config, cfg.device, self._measured_dtype())
        if cfg.throughput is None and last is not None:
            # announced while it loads, until its own are measured: what it measured when it last served here
            self.inference_rps, self.forward_rps = last
        if cfg.blocks is not None:
            start, end = cfg.blocks
            if not 0 <= start < end <= total_blocks:
                raise ServeConfigError(f"--blocks {start}:{end} is outside the model's {total_blocks} blocks")
            return start, end
        length = min(cfg.num_blocks or self._blocks_that_fit(block_config), total_blocks)
        # (a span chosen blind could take blocks the swarm has plenty of: stop, for a restart)
        if servers is None:
            _, servers = await self._views_at_start("choose blocks")
        # (a record of ours is this server's own from before a restart: the blocks it held are free)
        others = [s for s in servers if s.state != ServerState.OFFLINE and s.peer_id != self.identity.peer_id]
        live = [(s.start_block, s.end_block, s.throughput) for s in others]
        if cfg.throughput is None and last is None and others:
            # never measured here: the swarm's typical figures (a placeholder of 1.0 counted it as next to nothing,
            # and a server joining meanwhile took the same weak blocks)
            self.inference_rps = statistics.median(s.inference_rps for s in others)
            self.forward_rps = statistics.median(s.forward_rps for s in others)
        # its throughput is measured only once the blocks are loaded: until then, choose as a joiner faster than
        # any block's total, whose best windows are best whatever it measures (a placeholder of 1.0 tied them
        # with windows that leave the bottleneck lower, and one was taken at random)
        throughput = cfg.throughput if cfg.throughput is not None else 1.0 + sum(t for _, _, t in live)
        # jitter among equally good windows, so that servers starting together spread out
        return choose_blocks(total_blocks, length, live, throughput=throughput, rng=random.Random())

    def _blocks_that_fit(self, block_config: BlockConfig) -> int:
        """The number of blocks whose weights and KV-cache budget fit the memory this server may use."""
        cfg, dtype = self.config, DTYPES[self.config.dtype]
        servers = self.host_share.servers()
        memory = cfg.max_memory or memory_share(*device_memory(cfg.device), servers)
        weights = block_bytes(block_config, dtype, cfg.quant, cfg.device, self._pack)
        cache = cache_bytes_per_block(block_config, dtype, cfg.max_cache_tokens)
        fit = blocks_that_fit(memory, weights, cache, block_config.num_layers)
        logger.info(
            "memory for blocks: %.0f MiB (%d servers on %s); a block takes %.1f MiB of weights + %.1f MiB of KV "
            "cache: %d blocks",
            memory / 2**20,
            servers,
            cfg.device,
            weights / 2**20,
            cache / 2**20,
            fit,
        )
        return fit

    def _check_record_size(self) -> None:
        """Refuse at start a server whose DHT record peers would not store (`dht.info.MAX_RECORD_BYTES`): it would
        load its blocks and serve unseen. Its record at its widest: every number and its direct address as long
        as they can be; what varies is its hosted adapters' names and its public name."""
        widest = self._info(
            start_block=0,
            end_block=self.model_info.num_blocks,
            throughput=MAX_RATE,
            inference_rps=MAX_RATE,
            forward_rps=MAX_RATE,
            network_rps=MAX_RATE,
            cache_tokens_left=2**63 - 1,
            busy_rows=MAX_BUSY_ROWS,
            direct_addrs=(f"{'x' * 253}:65535",),
        )
        size = record_bytes(widest.to_record())
        if size > MAX_RECORD_BYTES:
            raise ServeConfigError(
                f"this server's DHT record would be {size} bytes with its --adapters and --public-name, and peers "
                f"store records of at most {MAX_RECORD_BYTES}: host fewer adapters or give a shorter name"
            )

    def _info(self, **overrides: Any) -> ServerInfo:
        """What this server announces now (`overrides`: fields set otherwise, for the start-up size check)."""
        free = self.backend.free_tokens if self.backend else self.config.max_cache_tokens
        fields = dict(
            peer_id=self.identity.peer_id,
            state=self.state,
            start_block=self.start,
            end_block=self.end,
            throughput=min(self.inference_rps, self.network_rps or float("inf")),
            inference_rps=self.inference_rps,
            forward_rps=self.forward_rps,
            network_rps=self.network_rps,
            cache_tokens_left=free,
            busy_rows=self.backend.busy_rows() if self.backend else 0,
            max_sessions_per_peer=self.config.limits.max_sessions_per_peer,
            version=__version__,
            dtype=self.config.dtype,
            quantization=self.config.quant,
            public_name=self.config.public_name,
            adapters=tuple(sorted(self.adapters.hosted)) if self.adapters else (),
            # a server backing off after a failed move is not waited for either (see `_move`)
            movable=self.config.blocks is None and time.monotonic() >= self._move_retry_at,
            # an address no peer could dial is not announced: others go straight to libp2p
            direct_addrs=(self.direct_addr,)
            if self.direct_addr and self.direct_reachable is not False
            else (),
            tunable=self.config.tp == 1,
            ladder=self.ladder,
            fingerprint=self.fingerprint,
            commit=self.commit,
        )
        return ServerInfo(**{**fields, **overrides})

    def _info_record(self) -> dict:
        return {
            **self._info().to_record(),
            "dht_prefix": self.dht_prefix,
            "total_blocks": self.model_info.num_blocks,
            # continuous batching so far: merged decode steps run, and session steps run in them
            "decode_steps": self.backend.batcher.steps if self.backend else 0,
            "decode_session_steps": self.backend.batcher.merged if self.backend else 0,
            "weights_layout": self.backend.weights_layout if self.backend else None,
            # whether peers reached it at its direct address (None: not known yet), `server.reachability`
            "direct_reachable": self.direct_reachable,
        }

    async def _connect(self, peer_id: str) -> Connection:
        """A connection to another server of the model: direct at its announced address, else libp2p."""
        info = self.peers.get(peer_id)
        # unknown, or known from before it served (a joining record has no direct address yet): look again
        if (info is None or not info.direct_addrs) and time.monotonic() - self._peers_at > PEERS_REFRESH_S:
            await self._refresh_peers()
            info = self.peers.get(peer_id)
        return await self.pool.get(peer_id, info.direct_addrs if info is not None else ())

    async def _refresh_peers(self) -> None:
        self._peers_at = time.monotonic()  # (a look-up that fails is not tried again at once either)
        try:
            online, _ = await self._find_server_views()
        except TimeoutError as e:
            logger.warning("looking the swarm up failed (%s); keeping the servers known before", e)
            return
        self._keep_peers(online)

    def _keep_peers(self, online: list[ServerInfo]) -> None:
        self._peers_at = time.monotonic()
        self.peers = {s.peer_id: s for s in online if s.peer_id != self.identity.peer_id}

    async def _find_server_views(self) -> tuple[list[ServerInfo], list[ServerInfo]]:
        """The model's servers that serve our checkpoint, as they serve and where they are going (a moving
        server's new blocks: `find_servers(planned=True)`, for choosing and balancing): those of another checkpoint
        under the same name (other ladder layers, another model's config) are never chained with us, so they
        neither cover our blocks nor take our pushes."""
        views = await self._on_dht(find_server_views(self.dht, self.dht_prefix, self.model_info.num_blocks))
        return tuple(
            [s for s in view if same_checkpoint(s, self.ladder, self.fingerprint, self.commit)]
            for view in views
        )

    async def _rejoin(self) -> None:
        """Ping the initial peers missing from our DHT routing table (`dht.rejoin`), in the background: one that
        does not answer may take the DHT's whole wait."""
        with contextlib.suppress(DhtGone, TimeoutError):  # (the serving loop notices a dead DHT itself)
            await self._on_dht(rejoin(self.dht, self.config.initial_peers))

    def _measure_network_soon(self) -> None:
        """Measure the network in the background (it may wait seconds on peers that do not answer)."""
        if self.network_rps is None and (self._network_task is None or self._network_task.done()):
            self._network_task = asyncio.create_task(self._measure_network())

    async def _measure_network(self) -> None:
        """Time pings to a few online peers, once (`server.network`); until then, or with --bandwidth, the
        announced throughput is the compute figure alone."""
        if self.network_rps is not None:
            return
        peers = [p for p, s in self.peers.items() if s.state == ServerState.ONLINE]
        speed = await measure_network(self._connect, random.sample(peers, len(peers)))
        if speed is None:
            return
        hidden, dtype = self.backend.span.config.hidden_size, DTYPES[self.config.dtype]
        self.network_rps = network_rps(speed.bandwidth, hidden, dtype.itemsize)
        logger.info(
            "network: %.1f ms round trip, %.0f Mbit/s to peers: %.0f hidden states/s",
            speed.rtt_s * 1e3,
            speed.bandwidth * 8 / 1e6,
            self.network_rps,
        )

    def _check_reach_soon(self, asker: str | None = None) -> None:
        """Ask peers, in the background, whether they reach us at our direct address: until one answers, then
        every `reach_recheck_s`; `asker` (a peer that asked us the same) first."""
        due = (
            self.direct_reachable is None
            or time.monotonic() - self._reached_at >= self.config.reach_recheck_s
        )
        if (
            due
            and (self.direct_addr or self.auto_host)
            and (self._reach_task is None or self._reach_task.done())
        ):
            self._reach_task = asyncio.create_task(self._check_reach(asker))

    def _asked_reach(self, peer_id: str) -> None:
        """A peer asked us to dial it back (a server joining): the first server of a swarm, whose own question
        found nobody to ask, asks it now rather than at its next announce period."""
        if self.direct_reachable is None and self.state == ServerState.ONLINE:
            self._check_reach_soon(peer_id)

    async def _check_reach(self, asker: str | None = None) -> None:
        """Whether peers reach us at the direct address (with `auto_host`: at which address they do, the one they
        see our connections come from); announced at once where that changed (after we came online)."""
        peers = [p for p, s in self.peers.items() if s.state == ServerState.ONLINE and p != asker]
        order = [asker] * (asker is not None) + random.sample(peers, len(peers))
        before = (self.direct_reachable, self.direct_addr)
        if self.auto_host:
            reachable, learned = await ask_address(self._connect, order, self.direct_port)
            self.direct_addr = learned or self.direct_addr
        else:
            reachable = await ask_reachable(self._connect, order, self.direct_addr)
        if reachable is None:
            return
        self.direct_reachable, self._reached_at = reachable, time.monotonic()
        if (reachable, self.direct_addr) == before:
            return  # (a re-check that found what we announce)
        if reachable:
            logger.info("peers reach this server's direct address %s", self.direct_addr)
        else:
            logger.warning(
                "no peer could dial this server at %s: it announces no direct address, and clients reach it "
                "through libp2p (slower). Open or forward the port (--direct-port, --announce-direct-port) and give "
                "the address others dial (--announce-host), then restart",
                self.direct_addr or f"port {self.direct_port}",
            )
        if self.state == ServerState.ONLINE:  # (found after it came online: its first peers had not answered)
            await self._announce()  # at once: a dead address costs each new connection its wait there

    def _load_moved(self, now: float) -> bool:
        """Whether its busy rows changed since it last announced, at least `LOAD_ANNOUNCE_S` ago."""
        if (
            self.backend is None
            or self.state != ServerState.ONLINE
            or now - self._announced_at < LOAD_ANNOUNCE_S
        ):
            return False
        return self.backend.busy_rows() != self._announced_rows

    async def _announce(
        self,
        info: ServerInfo | None = None,
        blocks: list[int] | None = None,
        *,
        leaving: bool = False,
    ) -> None:
        expiration = self.config.expiration_s or 3 * self.config.update_period_s
        info = info or self._info()
        self._announced_rows, self._announced_at = info.busy_rows, time.monotonic()
        store = announce(
            self.dht, self.owner_tag, self.dht_prefix, info, self.model_info, expiration, blocks=blocks
        )
        try:
            ok, why = await self._on_dht(store, leaving=leaving), ""
        except TimeoutError as e:
            ok, why = False, f" ({e})"
        if not ok:
            logger.warning(
                "announcing %s to the DHT failed%s; retrying next period%s",
                self.state.value,
                why,
                "" if self.swarm_key or why else " (a private swarm refuses peers without its --swarm-key)",
            )


def run_server(config: ServerConfig) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    server = Server(config)
    with asyncio.Runner() as runner:
        try:
            runner.run(server.run())
        except asyncio.CancelledError:
            if server.stopped_by is None:
                raise
            # stopped during start-up: a block load or a compilation may still run in a worker thread, which
            # the runner would wait for; the DHT is shut down, so exit now (and take the TP ranks along)
            logger.info("stopped during start-up (signal %d)", server.stopped_by)
            for child in multiprocessing.active_children():
                child.terminate()
            logging.shutdown()
            os._exit(128 + server.stopped_by)
        except KeyboardInterrupt:
            sys.exit(130)
    if server.failed is not None:  # (the log said why) a supervisor restarts a server that exits in error
        sys.exit(1)
