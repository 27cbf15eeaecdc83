"""`swarmllm monitor`: looks the swarm up every `refresh_s` through the client's `Directory` (one DHT reader for
the whole project), pings each server, and serves what it found over HTTP:

- `/`: a page that fetches `/api/v1/state` every few seconds and renders it (it computes nothing itself);
- `/api/v1/state`: the state document (`monitor.state`, schema there);
- `/metrics`: the same in Prometheus' text format (`monitor.metrics`).

Requests are answered from the last look-up, never wait for the DHT: a slow or empty DHT changes the document's
`dht` status (which the page shows), not whether the monitor answers.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from importlib import resources

from aiohttp import web

from swarmllm.client.directory import Directory
from swarmllm.dht import ModelInfo, ServerInfo, ServerState
from swarmllm.monitor.metrics import metrics_text
from swarmllm.monitor.state import dht_status, swarm_state
from swarmllm.web import bind, serve_app

logger = logging.getLogger(__name__)

HISTORY_POINTS = 720  # chart points kept per model (an hour at the default refresh)
PING_TIMEOUT_S = 2.0
# Block keys one refresh looks up, over all models. hivemind's look-up of n keys costs more than n times one key
# (512 keys: ~1 s on a busy 2-core machine; 4,096, which one peer's valid record may claim: ~100 s), and the DHT
# process serves look-ups one after another: one such model made every refresh time out, for every model.
MAX_BLOCKS_PER_REFRESH = 512


def models_to_look_up(
    models: Sequence[ModelInfo],
    budget: int,
    turns: dict[str, tuple[int, int]] | None = None,
    refresh: int = 0,
) -> tuple[list[ModelInfo], list[ModelInfo]]:
    """(looked up, not looked up): the models waiting longest first, then the smallest, each while its blocks fit
    in what is left of `budget`, so a peer announcing a huge model cannot keep the others from being looked up,
    nor one announcing many small ones keep a model from it for good. `turns` (updated here, for the models
    announced): per model, since when it waits: (refresh, 0) when first announced then, (refresh, 1) when last
    looked up then, `refresh` being this one. Models announced or looked up later wait behind it, so a model that
    fits the budget is looked up within as many refreshes as there were models announced when it began to wait."""
    turns = {} if turns is None else turns
    for name in turns.keys() - {m.dht_prefix for m in models}:
        del turns[name]  # (one that comes back waits as a new one)
    for model in models:
        turns.setdefault(model.dht_prefix, (refresh, 0))
    chosen = set()
    for model in sorted(models, key=lambda m: (turns[m.dht_prefix], m.num_blocks, m.dht_prefix)):
        if model.num_blocks <= budget:
            chosen.add(model.dht_prefix)
            budget -= model.num_blocks
            turns[model.dht_prefix] = (refresh, 1)
    return [m for m in models if m.dht_prefix in chosen], [m for m in models if m.dht_prefix not in chosen]


class Monitor:
    def __init__(self, directory: Directory, *, refresh_s: float = 5.0, lookup_timeout_s: float = 10.0):
        self.directory = directory
        self.refresh_s = refresh_s
        self.lookup_timeout_s = lookup_timeout_s
        self.failures = 0
        self.history: dict[str, deque] = {}
        self.refreshes = 0
        self.turns: dict[str, tuple[int, int]] = {}  # `models_to_look_up`'s: each model's place in the queue
        # each model's last look-up (what it found, the servers' round trips, when), shown while it waits its turn
        self.last: dict[str, tuple[ModelInfo, list[ServerInfo], dict[str, float | None], float]] = {}
        self.state = swarm_state([], {}, {}, refresh_s=refresh_s)

    async def run(self) -> None:
        """Look the swarm up every `refresh_s`, for ever."""
        while True:
            began = time.monotonic()
            await self.refresh()
            await asyncio.sleep(max(0.0, self.refresh_s - (time.monotonic() - began)))

    async def refresh(self) -> None:
        began = time.perf_counter()
        try:
            async with asyncio.timeout(self.lookup_timeout_s):
                announced = await self.directory.models()
                models, skipped = models_to_look_up(
                    announced, MAX_BLOCKS_PER_REFRESH, self.turns, self.refreshes
                )
                self.refreshes += 1
                found = await asyncio.gather(
                    *(self.directory.servers(m.dht_prefix, m.num_blocks) for m in models)
                )
        except TimeoutError:
            self._failed("slow", f"no answer within {self.lookup_timeout_s:.0f} s")
            return
        except Exception as e:  # noqa: BLE001 - whatever the DHT does, the monitor keeps serving
            logger.warning("DHT look-up failed: %r", e)
            self._failed("unreachable", f"{type(e).__name__}: {e}")
            return
        lookup_s = time.perf_counter() - began
        servers = {m.dht_prefix: infos for m, infos in zip(models, found)}
        rtt_s = await self._ping([s for infos in found for s in infos])
        now = time.time()
        for model in models:
            self.last[model.dht_prefix] = (model, servers[model.dht_prefix], rtt_s, now)
        for name in self.last.keys() - {m.dht_prefix for m in announced}:
            del self.last[name]
        # models waiting their turn show what their last look-up found (one announced as it was then)
        waiting = [m for m in skipped if m.dht_prefix in self.last and self.last[m.dht_prefix][0] == m]
        for model in waiting:
            _, servers[model.dht_prefix], their_rtt_s, _ = self.last[model.dht_prefix]
            rtt_s = {**their_rtt_s, **rtt_s}
        state = swarm_state(
            [*models, *waiting],
            servers,
            rtt_s,
            history={name: list(points) for name, points in self.history.items()},
            dht=dht_status("ok" if announced else "empty", lookup_s, self.failures),
            updated_at=now,
            refresh_s=self.refresh_s,
            not_looked_up=skipped,
            block_budget=MAX_BLOCKS_PER_REFRESH,
            looked_up_at={m.dht_prefix: self.last[m.dht_prefix][3] for m in waiting},
        )
        for model in state["models"]:
            if model["looked_up_at"] != now:
                continue  # (no new point: it was not looked up)
            points = self.history.setdefault(model["name"], deque(maxlen=HISTORY_POINTS))
            points.append(model["history"][-1])
            if len(model["history"]) > HISTORY_POINTS:
                model["history"] = model["history"][-HISTORY_POINTS:]
        self.state = state

    def _failed(self, status: str, detail: str) -> None:
        self.failures += 1
        self.state = {**self.state, "dht": dht_status(status, None, self.failures, detail)}

    async def _ping(self, servers: list[ServerInfo]) -> dict[str, float | None]:
        """Each announced live server's round trip, or None when it does not answer (offline ones are not
        asked: they said they left)."""
        todo = {s.peer_id: s for s in servers if s.state != ServerState.OFFLINE}

        async def ping(info: ServerInfo) -> float | None:
            try:
                async with asyncio.timeout(PING_TIMEOUT_S):
                    return await self.directory.ping(info.peer_id, info.direct_addrs)
            except Exception:  # noqa: BLE001 - any failure means "did not answer"
                return None

        results = await asyncio.gather(*(ping(s) for s in todo.values()))
        return dict(zip(todo, results))


def make_app(monitor: Monitor) -> web.Application:
    page = resources.files("swarmllm.monitor").joinpath("page.html").read_text()

    async def index(_request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    async def state(_request: web.Request) -> web.Response:
        return web.json_response(monitor.state, headers={"Cache-Control": "no-store"})

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=metrics_text(monitor.state),
            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"},
        )

    app = web.Application()
    app.router.add_get("/", index)
    app.router.add_get("/api/v1/state", state)
    app.router.add_get("/metrics", metrics)
    return app


async def look_up_once(initial_peers: list[str], *, swarm_key: str | None = None) -> dict:
    """One look-up of the swarm, the monitor's state document (`swarmllm status`)."""
    directory = Directory(initial_peers, swarm_key=swarm_key, connect_timeout_s=PING_TIMEOUT_S)
    await directory.start()
    try:
        monitor = Monitor(directory, refresh_s=0.0)
        await monitor.refresh()
        return monitor.state
    finally:
        await directory.shutdown()


async def run_monitor(
    initial_peers: list[str],
    *,
    host: str,
    port: int,
    refresh_s: float = 5.0,
    swarm_key: str | None = None,
) -> None:
    sock = bind(host, port)
    directory = Directory(initial_peers, swarm_key=swarm_key, connect_timeout_s=PING_TIMEOUT_S)
    await directory.start()
    monitor = Monitor(directory, refresh_s=refresh_s)
    runner = await serve_app(make_app(monitor), sock)
    bound = sock.getsockname()[1]
    print(f"Monitor: http://{host}:{bound}/ (JSON: /api/v1/state, Prometheus: /metrics)", flush=True)
    try:
        await monitor.run()
    finally:
        await runner.cleanup()
        await directory.shutdown()
