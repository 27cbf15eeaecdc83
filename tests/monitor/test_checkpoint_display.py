"""What the monitor and the API show of a swarm that a hostile peer crowds, or where two checkpoints share one
name. Real hivemind peers on 127.0.0.1 announcing signed records, a real server (`RequestHandler` over the tiny
checkpoint's blocks behind a `DirectServer`) that answers pings, the monitor and the API in this process."""

import asyncio
import threading

from aiohttp.test_utils import TestClient, TestServer
from dht.test_records import dht_peers, store_as
from server_infos import answering_server, online_server

from swarmllm.api.app import Api, load_engine
from swarmllm.api.gateway import Gateway
from swarmllm.client.directory import Directory
from swarmllm.dht import ModelInfo, announce, visible_maddrs
from swarmllm.dht.info import model_fingerprint
from swarmllm.dht.records import MODELS_KEY
from swarmllm.models import load_client_head, load_config
from swarmllm.models.tiny import make_tiny_checkpoint
from swarmllm.monitor.app import MAX_BLOCKS_PER_REFRESH, Monitor, make_app, models_to_look_up
from swarmllm.monitor.state import swarm_state
from swarmllm.web import bind, serve_app
from swarmllm.wire import Identity

FAKE_MODELS = 200
FAKE_BLOCKS = 3  # 600 blocks in all, sorted before the real model: smallest first, then by name


async def test_many_small_fake_models_do_not_hide_the_real_one_for_good(llama_checkpoint):
    """One host registers 200 models of 3 blocks (a signed registry entry each, under 200 keys of its own):
    smallest first, 170 of them filled every refresh's 512 keys and the real model, sorted after them, was
    never looked up, in any refresh. Each model must be looked up within a bounded number of refreshes, and once
    looked up stay on show, as then found, while it waits its turn again."""
    config, _ = load_client_head(str(llama_checkpoint))
    blocks = config.num_hidden_layers
    with dht_peers(2) as ((honest, honest_dht, honest_tag), (_, hostile_dht, _)):
        async with answering_server(llama_checkpoint, honest, blocks) as server:
            real = ModelInfo(dht_prefix="real", num_blocks=blocks)
            info = online_server(honest.peer_id, 0, blocks, address=server.address)
            assert await announce(honest_dht, honest_tag, "real", info, real, 60)
            fakes = [ModelInfo(dht_prefix=f"fake{i:03d}", num_blocks=FAKE_BLOCKS) for i in range(FAKE_MODELS)]
            owners = [Identity.generate() for _ in fakes]  # a peer stores one registry entry per owner
            stored = store_as(
                owners, [f.to_record() for f in fakes], MODELS_KEY, via=hostile_dht, at=honest_dht
            )
            assert all(stored)

            directory = Directory(visible_maddrs(honest_dht), connect_timeout_s=1.0)
            await directory.start()
            monitor = Monitor(directory, refresh_s=0.2)
            try:
                announced = await directory.models()
                assert len(announced) == FAKE_MODELS + 1
                # every model once: as many refreshes as the budget takes to cover all blocks, one more for packing
                total = sum(m.num_blocks for m in announced)
                refreshes = -(-total // MAX_BLOCKS_PER_REFRESH) + 1
                seen: dict[str, int] = {}
                states = []
                for refresh in range(refreshes + 1):  # (and one as models looked up wait their turn again)
                    await monitor.refresh()
                    state = monitor.state
                    assert state["dht"]["status"] == "ok", state["dht"]
                    states.append(state)
                    for model in state["models"]:
                        seen.setdefault(model["name"], refresh)
            finally:
                await directory.shutdown()

    for state in states:
        fresh = [m for m in state["models"] if m["looked_up_at"] == state["updated_at"]]
        assert sum(m["num_blocks"] for m in fresh) <= MAX_BLOCKS_PER_REFRESH
        waiting = {m["name"] for m in state["not_looked_up"]}
        assert {m["name"] for m in state["models"]} - {m["name"] for m in fresh} <= waiting
        assert len({m["name"] for m in fresh} | waiting) == FAKE_MODELS + 1  # each looked up or named as not
        assert all("waits its turn" in m["reason"] for m in state["not_looked_up"])
    assert set(seen) == {m.dht_prefix for m in announced}, f"never looked up: {sorted({'real'} - set(seen))}"
    shown = [(m, state) for state in states[seen["real"] :] for m in state["models"] if m["name"] == "real"]
    assert len(shown) == len(states) - seen["real"]  # on show from its first look-up on
    looked_up = []  # its look-ups' times, as each refresh shows it: now, or as an earlier one found it
    for m, state in shown:
        assert m["verdict"] == "healthy" and m["servers"]["online"] == 1
        assert [s["model"] for s in state["servers"]].count("real") == 1  # its server's row too
        if m["looked_up_at"] == state["updated_at"]:
            looked_up.append(m["looked_up_at"])
        assert m["looked_up_at"] == looked_up[-1]  # waiting: as its last look-up found it
        assert len(m["history"]) == len(looked_up)  # a point per look-up, none while it waits
    assert len(looked_up) < len(shown), "never shown while it waited its turn"


def test_the_page_shows_a_model_waiting_its_turn_as_found_then(browser):
    """In a real browser: a model shown as its last look-up found it says so, with when; one looked up now does
    not."""
    now, found_then = 1_800_000_000.0, 1_799_999_990.0
    fresh, waiting = (ModelInfo(dht_prefix=name, num_blocks=2) for name in ("fresh", "waiting"))
    a, b = (Identity.generate().peer_id for _ in range(2))
    state = swarm_state(
        [fresh, waiting],
        {"fresh": [online_server(a, 0, 2)], "waiting": [online_server(b, 0, 2)]},
        {a: 0.001, b: 0.001},
        updated_at=now,
        not_looked_up=[waiting],
        block_budget=2,
        looked_up_at={"waiting": found_then},
    )
    monitor = Monitor(None)
    monitor.state = state
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sock = bind("127.0.0.1", 0)
    runner = asyncio.run_coroutine_threadsafe(serve_app(make_app(monitor), sock), loop).result(10)
    try:
        browser.open(f"http://127.0.0.1:{sock.getsockname()[1]}/")
        browser.wait_for(
            "document.querySelectorAll('section[data-model]').length === 2", 30, "the two models"
        )
        marked = browser.evaluate(
            "[...document.querySelectorAll('[data-looked-up-at]')]"
            ".map(e => [e.closest('section').dataset.model, e.dataset.lookedUpAt, e.textContent])"
        )
        assert [(model, float(at)) for model, at, _ in marked] == [("waiting", found_then)]
        assert "waits its turn" in marked[0][2]
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_the_budget_rotates_over_refreshes_and_a_model_announced_later_waits_its_turn():
    """Pure: models looked up longest ago go first, so each is looked up within a bounded number of refreshes,
    and models first seen after another cannot push it back (a peer announcing new names every refresh)."""
    small = [ModelInfo(dht_prefix=f"s{i:02d}", num_blocks=3) for i in range(10)]
    big = ModelInfo(dht_prefix="z", num_blocks=10)
    last: dict[str, int] = {}
    rounds = []
    for refresh in range(4):
        # new small names appear each refresh, sorted before the big one
        extra = [ModelInfo(dht_prefix=f"n{refresh}{i}", num_blocks=3) for i in range(5)]
        models = [*small, big, *extra]
        looked_up, skipped = models_to_look_up(models, 20, last, refresh)
        assert sum(m.num_blocks for m in looked_up) <= 20
        assert {m.dht_prefix for m in looked_up} | {m.dht_prefix for m in skipped} == {
            m.dht_prefix for m in models
        }
        rounds.append([m.dht_prefix for m in looked_up])
    assert "z" in rounds[0] + rounds[1] + rounds[2], rounds


async def test_the_api_reports_the_swarm_of_its_own_checkpoint(tmp_path):
    """X (blocks 0..2) and Y (same folder name, another intermediate size; blocks 3..5) under one DHT prefix: as
    one model every block has a server, but no client of X (the API's) can use Y's. The API lists only the
    models it loaded, and its `/health` must say X's blocks 3..5 have no server."""
    x = make_tiny_checkpoint(tmp_path / "x" / "model", "llama", num_layers=6, seed=0)
    y = make_tiny_checkpoint(tmp_path / "y" / "model", "llama", num_layers=6, seed=1, intermediate_size=96)
    prints = [model_fingerprint(load_config(path)[1]) for path in (x, y)]
    assert prints[0] != prints[1]
    model = ModelInfo(dht_prefix="model", num_blocks=6)
    with dht_peers(2) as ((xs, x_dht, x_tag), (ys, y_dht, y_tag)):
        assert await announce(
            x_dht, x_tag, "model", online_server(xs.peer_id, 0, 3, fingerprint=prints[0]), model, 60
        )
        assert await announce(
            y_dht, y_tag, "model", online_server(ys.peer_id, 3, 6, fingerprint=prints[1]), model, 60
        )
        engine = load_engine(str(x), visible_maddrs(x_dht), missing_blocks_timeout_s=0)
        client = TestClient(TestServer(Gateway([Api(engine)]).app()))
        await client.start_server()
        try:
            health = await client.get("/health")
            body = await health.json()
            listed = await (await client.get("/v1/models")).json()
            tags = await (await client.get("/api/tags")).json()
        finally:
            await client.close()
            engine.model.shutdown()
    assert [m["id"] for m in listed["data"]] == ["model"] and [m["name"] for m in tags["models"]] == ["model"]
    assert health.status == 503, body
    assert body["models"]["model"]["missing_blocks"] == [3, 4, 5], body
