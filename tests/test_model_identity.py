"""Two different checkpoints under one model name in one swarm (real processes on 127.0.0.1).

Both folders are called "model", so their servers announce under the same DHT prefix. X and Y have hidden
states of the same shape (a Y server takes X's states without complaint) but different configs and weights: a
client of X must never route through Y's servers, a movable server of X must not count Y's when it chooses its
blocks, and blocks that only Y serves are missing for X, with an error that says why.
"""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.routing import MissingBlocksError
from swarmllm.dht.info import model_fingerprint, parse_server_info, same_checkpoint
from swarmllm.local import LocalSwarm
from swarmllm.models import load_config
from swarmllm.models.tiny import make_tiny_checkpoint

PROMPT = "the cat and the dog"
NEW_TOKENS = 8
FIXED_SPEED = ["--throughput", "1", "--bandwidth", "1000"]  # equal announced speeds: a deterministic choice
X_PINNED = (0, 2)
Y_SPANS = [(0, 4), (2, 4), (2, 4)]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("same-name")
    x = make_tiny_checkpoint(root / "x" / "model", "llama", seed=0)
    y = make_tiny_checkpoint(root / "y" / "model", "llama", seed=1, intermediate_size=96)
    return x, y


@pytest.fixture(scope="module")
def swarm(paths):
    """X's server pinned at [0, 2) and Y's at [0, 4) and twice [2, 4): as one model, blocks 2..3 have more
    servers than 0..1; for X alone, no server holds 2..3."""
    x, y = paths
    with LocalSwarm() as local:
        local.start_bootstrap()
        specs = [(str(x), X_PINNED)] + [(str(y), span) for span in Y_SPANS]
        records = local.add_servers(specs, extra=FIXED_SPEED)
        yield local, {r["peer_id"] for r in records[:1]}, {r["peer_id"] for r in records[1:]}


def greedy_local(path, ids):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False), model(ids).logits


def test_blocks_only_another_model_serves_are_missing_and_the_error_says_so(paths, swarm):
    local, _, y_peers = swarm
    ids = AutoTokenizer.from_pretrained(paths[0])(PROMPT, return_tensors="pt")["input_ids"]
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(paths[0]), initial_peers=local.initial_peers, missing_blocks_timeout_s=0
    )
    try:
        with pytest.raises(MissingBlocksError, match=r"blocks 2..3 of 4.*another model"):
            remote.generate(ids, max_new_tokens=2, do_sample=False)
        assert y_peers <= remote.swarm.other_checkpoints.keys()
    finally:
        remote.shutdown()


def test_a_movable_server_chooses_its_blocks_among_its_own_models_servers(paths, swarm):
    """Counting Y's servers, X's joiner would take [0, 2) (blocks 0..1 look weakest); for X, [2, 4) is empty."""
    local, x_peers, _ = swarm
    record = local.add_server(str(paths[0]), extra=[*FIXED_SPEED, "--num-blocks", "2"])
    x_peers.add(record["peer_id"])
    assert (record["start"], record["end"]) == (2, 4)


def test_a_client_routes_only_through_its_own_models_servers(paths, swarm):
    """With X's [0, 2) + [2, 4) and Y's [0, 4) (one hop, the shorter route), the client of X takes X's: its greedy
    tokens and logits are transformers' on X (which differ from Y's)."""
    local, x_peers, y_peers = swarm
    ids = AutoTokenizer.from_pretrained(paths[0])(PROMPT, return_tensors="pt")["input_ids"]
    want, want_logits = greedy_local(paths[0], ids)
    assert not torch.equal(greedy_local(paths[1], ids)[0], want)
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(paths[0]), initial_peers=local.initial_peers, missing_blocks_timeout_s=10
    )
    try:
        with remote.inference_session(ids.shape[1] + NEW_TOKENS) as active:
            got = remote.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
            hops = {hop.peer_id for hop in active.session.hops}
        assert hops <= x_peers and not hops & y_peers, hops
        assert got.tolist() == want.tolist()
        with torch.no_grad():
            torch.testing.assert_close(remote(ids).logits, want_logits, atol=1e-4, rtol=0)
    finally:
        remote.shutdown()


def test_the_fingerprint_ignores_dtype_and_old_records_stay_usable(tmp_path):
    """One model saved in float32 and in bfloat16 (servers pick their dtype) has one fingerprint, another config
    another; a record from a server that announces none is read and used as before."""
    same = [
        make_tiny_checkpoint(tmp_path / str(dtype), "llama", dtype=dtype)
        for dtype in (torch.float32, torch.bfloat16)
    ]
    other = make_tiny_checkpoint(tmp_path / "other", "llama", rms_norm_eps=1e-5)
    prints = [model_fingerprint(load_config(path)[1]) for path in [*same, other]]
    assert prints[0] == prints[1] != prints[2]
    record = {
        "peer_id": "peer",
        "state": "online",
        "start_block": 0,
        "end_block": 4,
        "throughput": 1.0,
        "inference_rps": 1.0,
        "forward_rps": 1.0,
        "cache_tokens_left": 10,
        "version": "0",
        "dtype": "float32",
    }
    old = parse_server_info(record)
    assert old is not None and same_checkpoint(old, (), prints[0])
    new = parse_server_info({**record, "fingerprint": prints[2]})
    assert new is not None and not same_checkpoint(new, (), prints[0]) and same_checkpoint(new, (), prints[2])
    # a hub commit tells apart what one fingerprint does not (two revisions of one repository), where both know it
    a, b = "a" * 40, "b" * 40
    at_a = parse_server_info({**record, "fingerprint": prints[0], "commit": a})
    assert (
        at_a is not None
        and same_checkpoint(at_a, (), prints[0], a)
        and not same_checkpoint(at_a, (), prints[0], b)
    )
    assert same_checkpoint(at_a, (), prints[0]) and same_checkpoint(
        old, (), prints[0], b
    )  # unknown on one side
    assert not same_checkpoint(at_a, (), prints[2], a)
    assert parse_server_info({**record, "commit": "main"}) is None  # a commit is 40 hex digits
