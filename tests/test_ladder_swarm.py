"""A ladder checkpoint served by a local swarm of real processes (127.0.0.1), compared with the local ladder model
(`models.causal_lm`). With server boundaries outside the ladder region, each span settles its pending output
itself and hands on r alone; with cuts inside it, the pair (r, p) crosses the hops: sent, pushed, replayed after a
failover and spot-checked. A standard server under the same model name is never chained with ladder servers."""

import pytest
import torch
from test_failover import AtStep
from transformers import AutoTokenizer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.client.routing import MissingBlocksError
from swarmllm.local import LocalSwarm
from swarmllm.models import load_config
from swarmllm.models.causal_lm import load_causal_lm
from swarmllm.models.convert import convert_to_ladder
from swarmllm.wire import RemoteError
from swarmllm.wire.messages import ForwardReply, ForwardRequest

SPANS = [(0, 2), (2, 4)]
PROMPTS = ["the cat and the dog", "a b c d e f g"]
NEW_TOKENS = 10

# the swarm with cuts inside the ladder region: layers 1..4 of 6 are ladder layers, so boundaries 2 and 4 carry
# (r, p); [2, 4) twice, for spot checks and failover; and the standard source model's [0, 3) under the same name
PREFIX = "ladder-cuts"
LADDER = (1, 5)
LADDER_SPANS = [(0, 2), (2, 4), (2, 4), (4, 6)]
STANDARD_SPAN = (0, 3)


def test_greedy_tokens_through_the_swarm_equal_the_local_ladder_model(checkpoints, tmp_path):
    path = convert_to_ladder(checkpoints("llama"), tmp_path / "llama-ladder", 2, 4)
    config = load_config(path)[1]
    assert not any(config.carries_pending(start) for start, _ in SPANS)
    local_model, standard = load_causal_lm(path), load_causal_lm(checkpoints("llama"))
    tokenizer = AutoTokenizer.from_pretrained(path)
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(path), span) for span in SPANS])
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=swarm.initial_peers)
        try:
            differs = False  # from the standard model's tokens: the servers really ran ladder layers
            for prompt in PROMPTS:
                ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
                want = local_model.generate_greedy(ids, 10)
                got = remote.generate(ids, max_new_tokens=10, do_sample=False)
                assert got.tolist() == want.tolist(), prompt
                differs |= not torch.equal(standard.generate_greedy(ids, 10), want)
            assert differs
            with torch.no_grad():
                torch.testing.assert_close(remote(ids).logits, local_model(ids), atol=1e-4, rtol=0)
        finally:
            remote.shutdown()


@pytest.fixture(scope="module")
def paths(checkpoints, tmp_path_factory):
    source = checkpoints("llama", num_layers=6)
    return source, convert_to_ladder(source, tmp_path_factory.mktemp("ladder-cuts") / "ladder", *LADDER)


@pytest.fixture(scope="module")
def cut_swarm(paths):
    """(local swarm, peer id -> index of its process), with every server under PREFIX."""
    source, ladder = paths
    with LocalSwarm() as local:
        local.start_bootstrap()
        specs = [(str(ladder), span) for span in LADDER_SPANS] + [(str(source), STANDARD_SPAN)]
        records = local.add_servers(specs, extra=["--dht-prefix", PREFIX])
        yield local, {record["peer_id"]: i for i, record in enumerate(records)}


@pytest.fixture(scope="module")
def reference(paths):
    """The local ladder model and the token ids of each prompt."""
    ladder = paths[1]
    tokenizer = AutoTokenizer.from_pretrained(ladder)
    return load_causal_lm(ladder), [tokenizer(p, return_tensors="pt")["input_ids"] for p in PROMPTS]


def client(path, local, **options):
    return AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=local.initial_peers, dht_prefix=PREFIX, **options
    )


def generate(remote, ids, compression=None, streamer=None):
    """Greedy tokens in one inference session, and that session's hops and pushed hop inputs."""
    with remote.inference_session(ids.shape[1] + NEW_TOKENS, compression) as active:
        out = remote.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)
        return out, active.session.hops, active.session.pushed_hops


def test_cuts_inside_the_ladder_region_carry_the_pair_and_generate_the_local_tokens(
    paths, cut_swarm, reference
):
    """Push on and off, compressed activations, spot checks of every hop, batch forward hop by hop and pipelined:
    the tokens are the local ladder model's, the logits within float tolerance, and the standard server under the
    same name is never used."""
    local, index = cut_swarm
    model, prompts = reference
    config = model.config
    standard_peer = next(p for p, i in index.items() if i == len(LADDER_SPANS))
    remote = client(paths[1], local, spot_check_fraction=1.0)
    unpushed = client(paths[1], local, push=False)
    try:
        for ids in prompts:
            want = model.generate_greedy(ids, NEW_TOKENS).tolist()
            got, hops, pushed = generate(remote, ids)
            assert got.tolist() == want
            assert pushed > 0 and any(config.carries_pending(hop.start) for hop in hops), hops
            assert standard_peer not in {hop.peer_id for hop in hops}
            got, _, pushed = generate(unpushed, ids)
            assert got.tolist() == want and pushed == 0
            assert generate(remote, ids, compression="float16")[0].tolist() == want
        assert standard_peer in remote.swarm.other_checkpoints
        outcomes = [check.outcome for check in remote.swarm.spot_checks]
        assert "agreed" in outcomes and "disagreed" not in outcomes, outcomes
        assert not remote.swarm.reports
        ids = prompts[1]
        with torch.no_grad():
            want = model(ids)
            torch.testing.assert_close(remote(ids).logits, want, atol=1e-4, rtol=0)
            pipelined = client(paths[1], local, forward_chunk_tokens=2, min_chunk_s=0.0)
            try:
                torch.testing.assert_close(pipelined(ids).logits, want, atol=1e-4, rtol=0)
            finally:
                pipelined.shutdown()
    finally:
        remote.shutdown()
        unpushed.shutdown()


def test_a_server_refuses_p_where_its_checkpoint_has_none_and_the_reverse_and_serves_on(paths, cut_swarm):
    local, index = cut_swarm
    remote = client(paths[1], local)
    try:
        servers = run_sync(remote.swarm.servers())
        middle = next(s for s in servers if (s.start_block, s.end_block) == (2, 4))
        conn = run_sync(remote.swarm.connection(middle.peer_id))
        r = torch.randn(1, 3, remote.config.hidden_size)
        for request, match in [
            (ForwardRequest(2, 4, r), "boundary 2 lies inside a ladder region.*pending is missing"),
            (ForwardRequest(3, 4, r, pending=r[:, :2]), "pending.*axis 1"),
        ]:
            with pytest.raises(RemoteError, match=match):
                run_sync(conn.call("forward", request.to_message()))
        reply = ForwardReply.parse(
            run_sync(conn.call("forward", ForwardRequest(2, 4, r, pending=r).to_message()))
        )
        assert reply.hidden.shape == reply.pending.shape == r.shape  # boundary 4 carries the pair too
        first = next(s for s in servers if (s.start_block, s.end_block) == (0, 2))
        conn = run_sync(remote.swarm.connection(first.peer_id))
        with pytest.raises(RemoteError, match="boundary 0 carries r alone.*pending must be absent"):
            run_sync(conn.call("forward", ForwardRequest(0, 2, r, pending=r).to_message()))
    finally:
        remote.shutdown()


def test_a_standard_client_under_the_same_name_never_chains_ladder_servers(paths, cut_swarm, reference):
    """Only the standard [0, 3) serves the source checkpoint: its client says so rather than use ladder blocks."""
    local, _ = cut_swarm
    remote = client(paths[0], local, missing_blocks_timeout_s=0)
    try:
        with pytest.raises(MissingBlocksError, match=r"blocks 3..5 of 6.*ladder layers 1:5.*never chained"):
            remote.generate(reference[1][0], max_new_tokens=2, do_sample=False)
    finally:
        remote.shutdown()


def test_gradients_through_cuts_inside_the_ladder_region_equal_local_autograd(paths, cut_swarm, reference):
    """A training forward and backward (micro-batches, hop by hop): each hop inside the region takes (r, p) and
    the gradients of both; the input embeddings' gradient equals local autograd through the whole model."""
    local, _ = cut_swarm
    model, _ = reference
    remote = client(paths[1], local, spot_check_fraction=0.0)
    try:
        x = torch.randint(3, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(8))
        weights = torch.randn(2, 6, model.config.vocab_size, generator=torch.Generator().manual_seed(9))
        embeds = remote.head.embed(x).detach().requires_grad_()
        (remote(inputs_embeds=embeds).logits * weights).sum().backward()
        mine = model.head.embed(x).detach().requires_grad_()
        (model.head.logits(model.span(mine)) * weights).sum().backward()
        torch.testing.assert_close(embeds.grad, mine.grad, atol=1e-4, rtol=1e-4)
    finally:
        remote.shutdown()


def test_killing_the_middle_server_mid_generation_replays_the_pair(paths, cut_swarm, reference):
    """SIGKILL of the server of hop [2, 4) after the third token: its kept inputs (r, p) are replayed into the
    other [2, 4) server, and the tokens are still the local model's (runs last: one server is gone after it)."""
    local, index = cut_swarm
    model, prompts = reference
    ids = prompts[0]
    remote = client(paths[1], local)
    killed = []

    def kill_middle():
        hop = next(h for h in remote._active.session.hops if h.start == 2)
        killed.append(hop.peer_id)
        local.servers[index[hop.peer_id]].kill()

    try:
        got, hops, _ = generate(remote, ids, streamer=AtStep({3: kill_middle}))
        assert got.tolist() == model.generate_greedy(ids, NEW_TOKENS).tolist()
        assert killed and killed[0] not in {hop.peer_id for hop in hops}
        (failover,) = remote.swarm.failovers
        assert (failover.peer_id, failover.start, failover.end) == (killed[0], 2, 4)
        assert failover.replayed_tokens > ids.shape[1]
    finally:
        remote.shutdown()


def test_the_layers_run_ranges_whose_ends_carry_r_alone_and_refuse_the_others(paths, cut_swarm, reference):
    """`model.model.layers[a:b]` (Petals' RemoteSequential): [0, 1) and [1, 6) chained give the local ladder model's
    span; [2, 4), whose ends inside the ladder region carry the pair, is refused for a call and a session."""
    local, _ = cut_swarm
    model, _ = reference
    remote = client(paths[1], local)
    try:
        x = model.head.embed(reference[1][0]).detach()
        layers = remote.model.layers
        with torch.no_grad():
            torch.testing.assert_close(layers[1:](layers[:1](x)), model.span(x), atol=1e-4, rtol=1e-4)
            with pytest.raises(ValueError, match=r"blocks \[2, 4\).*two tensors.*ladder layers 1:5"):
                layers[2:4](x)
            with pytest.raises(ValueError, match=r"blocks \[2, 4\).*two tensors"):
                with layers[2:4].inference_session(max_length=8):
                    pass
            with pytest.raises(
                NotImplementedError, match=r"output_hidden_states: blocks \[1, 2\).*two tensors"
            ):
                remote(
                    reference[1][0], output_hidden_states=True
                )  # (its state between blocks 2 and 3 is a pair)
    finally:
        remote.shutdown()
