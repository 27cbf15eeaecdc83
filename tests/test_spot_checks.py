"""Spot checks against a server that lies: real server processes on 127.0.0.1, one of them started with the
test-only `--corrupt-every N` (every Nth output it computes is wrong) and announcing a huge throughput so that
routes go through it. The client checks every step (`spot_check_fraction=1`), bans the liar, reports it, and the
tokens and logits are still those of `transformers`."""

import random
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.dht import find_servers
from swarmllm.local import LocalSwarm
from swarmllm.models.lora import lora_shapes

PROMPT = torch.tensor([[1, 30, 40, 50, 7]])
NEW_TOKENS = 12
PREFIX = "spot-checks"


@pytest.fixture(scope="module")
def path(checkpoints):
    return str(checkpoints("llama"))  # 4 blocks


@pytest.fixture(scope="module")
def swarm(path):
    """A liar on [0, 2) that corrupts every 4th output, two honest servers of [0, 2), one of [2, 4). The liar
    announces a huge throughput and the honest servers of [0, 2) a tiny one, so that routes go through the liar
    and it is the checked server, not a checker."""
    with LocalSwarm() as local:
        local.start_bootstrap()
        extra = ["--dht-prefix", PREFIX]
        (liar,) = local.add_servers(
            [(path, (0, 2))], extra=[*extra, "--corrupt-every", "4", "--throughput", "1e9"]
        )
        local.add_servers([(path, (0, 2)), (path, (0, 2))], extra=[*extra, "--throughput", "1"])
        local.add_servers([(path, (2, 4))], extra=extra)
        yield local, liar["peer_id"]


def client(local: LocalSwarm, path: str):
    return AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=local.initial_peers, dht_prefix=PREFIX, spot_check_fraction=1.0, spot_check_seed=0
    )


def test_a_liar_caught_in_a_beam_search_step_is_routed_around_with_the_rows_reordered_once(swarm, path):
    """First in this file, so that the liar's 4th output is the 4th step of this beam search, which swaps two
    beams (rows (1, 0, 2)): the chain is rebuilt from kept inputs that took that reorder already, and taking it
    again would swap them back."""
    local, liar = swarm
    beams = dict(num_beams=3, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True)
    beams["return_dict_in_generate"] = True
    want = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval().generate(PROMPT, **beams)
    model = client(local, path)
    try:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            out = model.generate(PROMPT, **beams)
            assert session.session.reorders > 0
        assert out.sequences.tolist() == want.sequences.tolist()
        torch.testing.assert_close(torch.stack(out.scores), torch.stack(want.scores), atol=1e-4, rtol=1e-4)
        assert [r.wrong for r in model.swarm.reports] == [(liar,)]
        (failover,) = model.swarm.failovers
        assert failover.peer_id == liar and (failover.start, failover.end) == (0, 4)
        assert failover.replayed_tokens == PROMPT.shape[1] + 2  # the prompt, 2 steps: caught at the 4th
    finally:
        model.shutdown()


def test_a_lying_server_is_banned_and_the_tokens_stay_right(swarm, path):
    local, liar = swarm
    want = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    want = want.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
    model = client(local, path)
    try:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS):
            tokens = model.generate(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False).tolist()
            first_hop = model._active.session.hops[0].peer_id
        assert tokens == want
        reports = model.swarm.reports
        assert [r.wrong for r in reports] == [(liar,)]  # caught at its 4th output here, the 4th step
        assert len(reports[0].checkers) == 2  # a third opinion decided between the liar and its checker
        assert reports[0].mismatch > reports[0].tolerance
        assert liar in model.swarm.bans.banned(time.monotonic()) and first_hop != liar
        (failover,) = model.swarm.failovers
        assert failover.peer_id == liar and "CorruptOutputError" in failover.reason
        assert (failover.start, failover.end) == (0, 4)  # the hops after it were rebuilt too
        outcomes = {(c.start, c.outcome) for c in model.swarm.spot_checks}
        assert outcomes == {
            (0, "agreed"),
            (0, "disagreed"),
            (2, "skipped: no other server holds these blocks"),
        }
    finally:
        model.shutdown()


def test_batch_forward_recomputes_a_wrong_hop(swarm, path):
    local, liar = swarm
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    inputs = torch.randint(3, 150, (2, 20), generator=torch.Generator().manual_seed(0))
    model = client(local, path)
    model.swarm.rng = random.Random(0)
    try:
        with torch.no_grad():
            want = reference(input_ids=inputs).logits
            # the liar is routed by its announced throughput until the client has measured it, then by the
            # measured one (one time in three), and it lies every 2nd time
            for _ in range(30):
                torch.testing.assert_close(model(input_ids=inputs).logits, want, rtol=1e-4, atol=1e-4)
                if model.swarm.reports:
                    break
        assert [r.wrong for r in model.swarm.reports] == [(liar,)]
        assert liar in model.swarm.bans.banned(time.monotonic())
    finally:
        model.shutdown()


def test_wrong_training_forwards_and_backwards_are_computed_again_and_the_gradients_stay_right(
    swarm, path, tmp_path
):
    """A LoRA adapter without dropout makes training deterministic, so its forwards and backwards are spot
    checked. Last in this file: it adds a second liar, on the later blocks (its wrong input gradient would flow
    into the first blocks' backward), that corrupts every 2nd output, and an honest server beside it; the
    clients leave the first liar out. Client A's training step meets the new liar in the backward (its 2nd
    output), client B's (after a plain forward, the 3rd) in the forward. Each wrong hop is computed again on
    other servers, the liar is banned, and the loss and the adapter's gradients are peft's."""
    peft = pytest.importorskip("peft")
    local, first_liar = swarm
    x = torch.randint(3, 150, (2, 9), generator=torch.Generator().manual_seed(2))
    extra = ["--dht-prefix", PREFIX]
    (liar,) = local.add_servers(
        [(path, (2, 4))], extra=[*extra, "--corrupt-every", "2", "--throughput", "1e9"]
    )
    local.add_servers([(path, (2, 4))], extra=[*extra, "--throughput", "1"])
    theirs = None
    for name in ("A", "B"):
        model = client(local, path)
        try:
            servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, 4))
            model.swarm.use_servers([s for s in servers if s.peer_id != first_liar])
            model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
            generator = torch.Generator().manual_seed(1)
            config = model.block_config
            shapes = lora_shapes(config, model.lora.settings, range(config.num_layers))
            model.lora.load_tensors({n: torch.randn(s, generator=generator) * 0.1 for n, s in shapes.items()})
            if theirs is None:
                model.save_pretrained(tmp_path)
                base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
                theirs = peft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True)
                their_loss = theirs(input_ids=x, labels=x).loss
                their_loss.backward()
                their_grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
            if name == "B":
                with torch.no_grad():
                    model(x)  # the liar's 3rd output, honest: B's training forward is its 4th
                assert not model.swarm.reports
            loss = model(x, labels=x).loss
            loss.backward()
            torch.testing.assert_close(loss, their_loss, rtol=1e-4, atol=1e-5)
            for lora_name, weight in zip(model.lora.names, model.lora.weights, strict=True):
                layer, rest = lora_name.split(".", 1)
                want = their_grads[f"base_model.model.model.layers.{layer}.{rest}.default.weight"]
                torch.testing.assert_close(weight.grad, want, rtol=1e-4, atol=1e-5)
            kind = "backward" if name == "A" else "forward"
            assert [(r.wrong, r.kind) for r in model.swarm.reports] == [((liar["peer_id"],), kind)]
            assert liar["peer_id"] in model.swarm.bans.banned(time.monotonic())
        finally:
            model.shutdown()
