"""What the monitor and the API show of a swarm that a hostile peer crowds, or where two checkpoints share one
name. Real hivemind peers on 127.0.0.1 announcing signed records, a real server (`RequestHandler` over the tiny
checkpoint's blocks behind a `DirectServer`) that answers pings, the monitor and the API in this process."""

from aiohttp.test_utils import TestClient, TestServer
from dht.test_records import dht_peers
from server_infos import answering_server, online_server

from swarmllm.api.app import Api, load_engine
from swarmllm.api.gateway import Gateway
from swarmllm.client.directory import Directory
from swarmllm.dht import ModelInfo, announce, visible_maddrs
from swarmllm.dht.info import model_fingerprint
from swarmllm.models import load_client_head, load_config
from swarmllm.models.tiny import make_tiny_checkpoint
from swarmllm.monitor.app import MAX_BLOCKS_PER_REFRESH, Monitor, models_to_look_up

FAKE_MODELS = 200
FAKE_BLOCKS = 3  # 600 blocks in all, sorted before the real model: smallest first, then by name


async def test_many_small_fake_models_do_not_hide_the_real_one_for_good(llama_checkpoint):
    """One peer registers 200 models of 3 blocks (one signed registry entry each, under owner tags of its own
    key): smallest first, 170 of them filled every refresh's 512 keys and the real model, sorted after them, was
    never looked up, in any refresh. Each model must be looked up within a bounded number of refreshes."""
    config, _ = load_client_head(str(llama_checkpoint))
    blocks = config.num_hidden_layers
    with dht_peers(2) as ((honest, honest_dht, honest_tag), (hostile, hostile_dht, hostile_tag)):
        async with answering_server(llama_checkpoint, honest, blocks) as server:
            real = ModelInfo(dht_prefix="real", num_blocks=blocks)
            info = online_server(honest.peer_id, 0, blocks, address=server.address)
            assert await announce(honest_dht, honest_tag, "real", info, real, 60)
            for i in range(FAKE_MODELS):
                fake = ModelInfo(dht_prefix=f"fake{i:03d}", num_blocks=FAKE_BLOCKS)
                tag = f"{i}".encode() + hostile_tag  # another registry subkey, signed by the same key
                assert await announce(
                    hostile_dht,
                    tag,
                    fake.dht_prefix,
                    online_server(hostile.peer_id, 0, 1),
                    fake,
                    60,
                    blocks=[],
                )

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
                for refresh in range(refreshes):
                    await monitor.refresh()
                    state = monitor.state
                    assert state["dht"]["status"] == "ok", state["dht"]
                    states.append(state)
                    for model in state["models"]:
                        seen.setdefault(model["name"], refresh)
            finally:
                await directory.shutdown()

    for state in states:
        assert sum(m["num_blocks"] for m in state["models"]) <= MAX_BLOCKS_PER_REFRESH
        names = {m["name"] for m in state["models"]} | {m["name"] for m in state["not_looked_up"]}
        assert len(names) == FAKE_MODELS + 1  # each model either shown or named as not looked up
        assert all("waits its turn" in m["reason"] for m in state["not_looked_up"])
    assert set(seen) == {m.dht_prefix for m in announced}, f"never looked up: {sorted({'real'} - set(seen))}"
    (shown,) = [m for state in states for m in state["models"] if m["name"] == "real"]
    assert shown["verdict"] == "healthy" and shown["servers"]["online"] == 1


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
