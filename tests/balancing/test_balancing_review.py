"""Load balancing with real servers on 127.0.0.1 that choose, announce and move their blocks: where a joiner
without a measured speed goes, and a movable server holding a session moving while its client's tokens stay
transformers'."""

import torch
from test_balancing import NUM_LAYERS, KillAt, wait_until
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.dht import ServerState, find_servers
from swarmllm.local import LocalSwarm

PERIOD = ["--update-period", "2", "--balance-period", "2"]


def online_spans(model) -> dict[str, tuple[int, int, float, bool]]:
    servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, NUM_LAYERS))
    return {
        s.peer_id: (s.start_block, s.end_block, s.throughput, s.movable)
        for s in servers
        if s.state == ServerState.ONLINE
    }


def test_a_server_holding_a_session_moves_when_a_peer_joins_and_its_client_keeps_transformers_tokens(
    checkpoints,
):
    """P pinned to 0:3, M (3 blocks, no span) fills the gap 3:6; Q (3x faster) pinned to 3:6 joins
    mid-generation, so M moves to 0:3 (bottleneck 10 -> 20); the generation through M goes on with the fault-free tokens."""
    path = checkpoints("llama", num_layers=NUM_LAYERS)
    flags = [*PERIOD, "--throughput", "10"]
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        pinned = swarm.add_server(str(path), (0, 3), extra=flags)
        mover = swarm.add_server(str(path), extra=[*flags, "--num-blocks", "3"])
        assert (mover["start"], mover["end"]) == (3, 6)  # the blocks nobody holds
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        try:
            spans = online_spans(model)
            assert spans[pinned["peer_id"]] == (0, 3, 10.0, False)
            assert spans[mover["peer_id"]] == (3, 6, 10.0, True)
            prompt = torch.tensor([[1, 30, 40, 50, 7]])
            want = reference.generate(prompt, max_new_tokens=16, do_sample=False).tolist()
            joined = []

            def join_and_wait_for_the_move():
                joined.append(swarm.add_server(str(path), (3, 6), extra=[*PERIOD, "--throughput", "30"]))
                wait_until(lambda: online_spans(model).get(mover["peer_id"], (None,))[:2] == (0, 3), 30)

            got = model.generate(
                prompt, max_new_tokens=16, do_sample=False, streamer=KillAt(5, join_and_wait_for_the_move)
            )
            assert got.tolist() == want
            assert joined
            assert any("moved to blocks [0, 3)" in line for line in swarm.servers[1].log)
        finally:
            model.shutdown()


def test_a_joiner_without_throughput_takes_the_window_that_lifts_the_bottleneck_most(checkpoints):
    """Blocks 0-6 at 3, block 7 at 0.5, blocks 8-15 at 10 (pinned servers): a joiner of 8 blocks lifts the
    bottleneck to 10 only at 0:8 (any other window holding block 7 leaves a block at 3). One that measures its
    throughput (far above 10) after choosing chose with a placeholder of 1.0, for which all eight windows holding
    block 7 tie at 1.5, and took one at random: 7 times in 8 a window worth 3, and a move later."""
    path = checkpoints("llama", num_layers=16)
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers(
            [
                (str(path), (0, 7), ["--throughput", "3"]),
                (str(path), (7, 8), ["--throughput", "0.5"]),
                (str(path), (8, 16), ["--throughput", "10"]),
            ]
        )
        joiner = swarm.add_server(str(path), extra=["--num-blocks", "8"])
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        try:
            servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, 16))
            measured = next(s.throughput for s in servers if s.peer_id == joiner["peer_id"])
            assert measured > 10  # what makes 0:8 the only best window
            assert (joiner["start"], joiner["end"]) == (0, 8)
        finally:
            model.shutdown()
