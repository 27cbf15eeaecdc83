"""The monitor beside a hostile peer whose registry entry is valid but as big as records may be: 4,096 blocks
(`dht.info.MAX_BLOCKS`). Real hivemind peers on 127.0.0.1, a real server (`RequestHandler` over the tiny
checkpoint's blocks behind a `DirectServer`) that answers the monitor's ping, and the monitor in this process.
Every wait is on a condition with a deadline."""

import asyncio
import time

from dht.test_records import dht_peers
from server_infos import answering_server, online_server

from swarmllm.client.directory import Directory
from swarmllm.dht import ModelInfo, announce, visible_maddrs
from swarmllm.dht.info import MAX_BLOCKS
from swarmllm.models import load_client_head
from swarmllm.monitor.app import Monitor, models_to_look_up

REFRESHES = 3  # complete refreshes in a row that must each show the real model
DEADLINE_S = 20.0  # well under the 4,096-key look-up (~100 s here), well over a refresh of a few keys


async def test_a_model_of_4096_blocks_does_not_freeze_the_monitor(llama_checkpoint):
    """One peer announcing a valid 4,096-block model made every refresh look 4,096 keys up (~100 s on a busy
    2-core machine; hivemind's DHT process serves look-ups one after another): each refresh timed out after
    10 s, so the page stopped changing for the healthy model beside it too."""
    config, _ = load_client_head(str(llama_checkpoint))
    blocks = config.num_hidden_layers
    with dht_peers(2) as ((honest, honest_dht, honest_tag), (hostile, hostile_dht, hostile_tag)):
        async with answering_server(llama_checkpoint, honest, blocks) as server:
            real = ModelInfo(dht_prefix="real", num_blocks=blocks)
            assert await announce(
                honest_dht,
                honest_tag,
                "real",
                online_server(honest.peer_id, 0, blocks, address=server.address),
                real,
                60,
            )
            huge = ModelInfo(dht_prefix="huge", num_blocks=MAX_BLOCKS)
            assert await announce(
                hostile_dht, hostile_tag, "huge", online_server(hostile.peer_id, 0, 1), huge, 60
            )

            directory = Directory(visible_maddrs(honest_dht), connect_timeout_s=1.0)
            await directory.start()
            monitor = Monitor(directory, refresh_s=0.2)
            running = asyncio.create_task(monitor.run())
            try:
                seen: list[dict] = []
                deadline = time.monotonic() + DEADLINE_S
                while len(seen) < REFRESHES:
                    state = monitor.state
                    if state["updated_at"] is not None and (
                        not seen or state["updated_at"] > seen[-1]["updated_at"]
                    ):
                        seen.append(state)
                    assert time.monotonic() < deadline, (
                        f"{len(seen)} refresh(es) in {DEADLINE_S:.0f} s; dht: {monitor.state['dht']}"
                    )
                    await asyncio.sleep(0.05)  # the poll interval of a condition with a deadline
            finally:
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
                await directory.shutdown()

    for state in seen:
        assert state["dht"]["status"] == "ok", state["dht"]
        models = {m["name"]: m for m in state["models"]}
        assert models["real"]["verdict"] == "healthy" and models["real"]["servers"]["online"] == 1
        assert [(s["model"], s["peer_id"], s["state"]) for s in state["servers"]] == [
            ("real", honest.peer_id, "online")
        ]
        # the big model is named, with why it was not looked up, instead of being silently dropped
        (skipped,) = state["not_looked_up"]
        assert skipped["name"] == "huge" and skipped["num_blocks"] == MAX_BLOCKS
        assert str(MAX_BLOCKS) in skipped["reason"]


def test_the_block_budget_is_shared_by_models_smallest_first():
    """Many models each under the budget must not add up past it either: the smallest are looked up."""
    models = [
        ModelInfo(dht_prefix=name, num_blocks=n) for name, n in [("a", 300), ("b", 8), ("c", 300), ("d", 80)]
    ]
    looked_up, skipped = models_to_look_up(models, 512)
    assert [m.dht_prefix for m in looked_up] == ["a", "b", "d"] and [m.dht_prefix for m in skipped] == ["c"]
    assert sum(m.num_blocks for m in looked_up) <= 512
