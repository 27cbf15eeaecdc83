"""The model's layers as Petals' `RemoteSequential`: `model.model.layers`, a slice of them, or one layer, called on
hidden states, run them through those blocks on the servers, differentiably, with the model's adapter; their
`inference_session` steps them with the servers' caches. Checked against transformers' own decoder layers on the
same checkpoint (a local model cut to the same layers)."""

from __future__ import annotations

import contextlib
import copy
import logging

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModel, AutoDistributedModelForCausalLM

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def swarm(local, llama_checkpoint):
    local.add_servers([(str(llama_checkpoint), (0, 2)), (str(llama_checkpoint), (2, 4))])
    return local


@pytest.fixture(scope="module")
def model(swarm, llama_checkpoint):
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=swarm.initial_peers
    )
    yield remote
    remote.shutdown()


@pytest.fixture(scope="module")
def hf(llama_checkpoint):
    return AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32)


def local_layers(hf, start: int, end: int):
    """transformers' decoder model cut to layers [start, end), without its final norm: hidden states in, theirs
    after those layers out (positions from 0, as the servers number a request's)."""
    cut = copy.deepcopy(hf.model)
    cut.layers = nn.ModuleList(list(cut.layers)[start:end])
    cut.norm = nn.Identity()
    return lambda hidden, mask=None: (
        cut(inputs_embeds=hidden, attention_mask=mask, use_cache=False).last_hidden_state
    )


@contextlib.contextmanager
def peft_pair(swarm, llama_checkpoint, hf, seed):
    """(a swarm model under PEFT's LoRA, local PEFT on transformers' model, each's LoRA parameters by name), the
    same random weights in both (B nonzero: the adapter changes the states)."""
    peft = pytest.importorskip("peft")
    config = dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=swarm.initial_peers
    )
    try:
        ours = peft.get_peft_model(remote, peft.LoraConfig(**config))
        theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(**config))
        mine = {n: p for n, p in ours.named_parameters() if "lora_" in n}
        other = {n: p for n, p in theirs.named_parameters() if "lora_" in n}
        assert list(mine) == list(other)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, weight in mine.items():
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)
                other[name].copy_(weight)
        yield ours, theirs, mine, other
    finally:
        remote.shutdown()


def states(model, batch=2, length=7, seed=0):
    ids = torch.randint(3, 150, (batch, length), generator=torch.Generator().manual_seed(seed))
    return model.get_input_embeddings()(ids).detach()


def test_slices_and_single_layers_give_transformers_hidden_states(model, hf):
    layers = model.model.layers
    assert isinstance(layers, nn.ModuleList) and len(layers) == 4
    x = states(model)
    with torch.no_grad():
        want = hf(inputs_embeds=x, output_hidden_states=True).hidden_states  # [i]: after i layers
        for start, end in [(0, 2), (1, 3), (0, 3)]:
            torch.testing.assert_close(
                layers[start:end](want[start]), want[end], **TOL, msg=f"[{start}:{end})"
            )
        # (the last of transformers' hidden states is after the final norm: a cut model gives them before it)
        torch.testing.assert_close(layers[2:](want[2]), local_layers(hf, 2, 4)(want[2]), **TOL)
        torch.testing.assert_close(layers[1](want[1]), want[2], **TOL)
        torch.testing.assert_close(layers[-1](want[3]), local_layers(hf, 3, 4)(want[3]), **TOL)
        torch.testing.assert_close(layers(x), local_layers(hf, 0, 4)(x), **TOL)
        # a padded batch: the real positions as transformers computes them with the same mask
        mask = torch.ones(2, 7, dtype=torch.long)
        mask[1, :3] = 0
        mine, theirs = layers[1:3](want[1], attention_mask=mask), local_layers(hf, 1, 3)(want[1], mask)
        torch.testing.assert_close(mine[mask.bool()], theirs[mask.bool()], **TOL)


def test_gradients_through_a_slice_equal_local_autograd(model, hf):
    x = states(model, seed=1)
    ours = x.clone().requires_grad_()
    theirs = x.clone().requires_grad_()
    weights = torch.randn(2, 7, x.shape[2], generator=torch.Generator().manual_seed(2))
    (model.model.layers[1:4](ours) * weights).sum().backward()
    (local_layers(hf, 1, 4)(theirs) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad, **TOL)


def test_an_inference_session_steps_a_slice_as_its_forward(model, hf):
    x = states(model, length=8, seed=3)
    layers = model.model.layers[1:3]
    with torch.no_grad():
        whole = local_layers(hf, 1, 3)(x)
        with layers.inference_session(max_length=10) as session:
            parts = [session.step(x[:, :4]), session.step(x[:, 4:5]), session.step(x[:, 5:7])]
            assert session.position == 7
            # rewound to position 5, and beam search's reorder (row 0 continues row 1's states)
            torch.testing.assert_close(session.step(x[:, 5:7], position=5), whole[:, 5:7], **TOL)
            swapped = x[[1, 1]]
            torch.testing.assert_close(
                session.step(swapped[:, 7:8], reorder=[1, 1]),
                local_layers(hf, 1, 3)(swapped[:, :8])[:, 7:],
                **TOL,
            )
    torch.testing.assert_close(torch.cat(parts, 1), whole[:, :7], **TOL)


def test_the_layers_apply_the_models_peft_adapter(swarm, llama_checkpoint, hf):
    with peft_pair(swarm, llama_checkpoint, hf, seed=4) as (ours, theirs, _, _):
        x = states(ours, seed=5)
        with torch.no_grad():
            want = theirs(inputs_embeds=x, output_hidden_states=True).hidden_states
            got = ours.base_model.model.model.layers[1:3](want[1])
            torch.testing.assert_close(got, want[3], **TOL)
            assert not torch.allclose(got, hf(inputs_embeds=x, output_hidden_states=True).hidden_states[3])


def test_a_base_models_layers_and_what_is_refused(model, swarm, llama_checkpoint, hf):
    base = AutoDistributedModel.from_pretrained(str(llama_checkpoint), initial_peers=swarm.initial_peers)
    try:
        x = states(model, seed=6)
        with torch.no_grad():
            torch.testing.assert_close(base.layers[0:2](x), model.model.layers[:2](x), **TOL)
    finally:
        base.shutdown()
    layers = model.model.layers
    with pytest.raises(IndexError, match="non-empty slice of step 1"):
        layers[2:2]
    with pytest.raises(IndexError, match="non-empty slice of step 1"):
        layers[::2]
    with pytest.raises(TypeError, match="token ids go through the model's embeddings"):
        layers(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="3 dimensions"):
        layers(x[0])
    with torch.no_grad():
        torch.testing.assert_close(layers[:1](x), local_layers(hf, 0, 1)(x), **TOL)  # and it goes on


def test_a_session_through_a_slice_survives_its_server_dying(model, swarm, llama_checkpoint, hf):
    """(Last in this file: it kills one of the module's servers.) A third server holds [1, 4); the server of the
    session's last hop is killed mid-session, and the next steps replay to others: the states of a fault-free
    run."""
    third = swarm.add_server(str(llama_checkpoint), (1, 4))["peer_id"]
    x = states(model, seed=9)
    with torch.no_grad():
        want = local_layers(hf, 1, 4)(x)
        with model.model.layers[1:].inference_session(max_length=12) as session:
            parts = [session.step(x[:, :4])]
            # the third server if the session goes through it, else the fixture's second, of [2, 4)
            hops = session.session.hops
            index = 2 if third in {h.peer_id for h in hops} else 1
            victim = hops[-1].peer_id
            swarm.servers[index].kill()
            parts += [session.step(x[:, t : t + 1]) for t in range(4, 7)]
            assert victim not in {hop.peer_id for hop in session.session.hops}
            assert len(session.session.failovers) == 1
    torch.testing.assert_close(torch.cat(parts, 1), want, **TOL)


def test_output_hidden_states_with_an_adapter_give_local_peft_states_and_gradients(
    swarm, llama_checkpoint, hf
):
    """`output_hidden_states=True` (a request a block): with a PEFT adapter, local PEFT's states, and a loss on
    a middle layer's states gives its gradients (none for the blocks after it)."""
    with peft_pair(swarm, llama_checkpoint, hf, seed=10) as (ours, theirs, mine, other):
        x = torch.randint(3, 150, (2, 6), generator=torch.Generator().manual_seed(11))
        got = ours(input_ids=x, output_hidden_states=True).hidden_states
        want = theirs(input_ids=x, output_hidden_states=True).hidden_states
        assert len(got) == len(want) == 5
        for i, (a, b) in enumerate(zip(got, want, strict=True)):
            torch.testing.assert_close(a, b, **TOL, msg=f"hidden_states[{i}]")
        weights = torch.randn(got[2].shape, generator=torch.Generator().manual_seed(12))
        (got[2] * weights).sum().backward()
        (want[2] * weights).sum().backward()
        for name, weight in mine.items():
            torch.testing.assert_close(weight.grad, other[name].grad, **TOL, msg=name)
        lora_a = "base_model.model.model.layers.{}.self_attn.q_proj.lora_A.default.weight"
        assert mine[lora_a.format(0)].grad.abs().sum() > 0 and mine[lora_a.format(3)].grad is None


def test_output_hidden_states_of_a_base_model_and_with_deep_prompts(swarm, llama_checkpoint, hf):
    """A base model's `hidden_states` are transformers' `AutoModel`'s; with deep prompts (cut off each state, added
    before every block) the last state's logits are the plain forward's."""
    base = AutoDistributedModel.from_pretrained(str(llama_checkpoint), initial_peers=swarm.initial_peers)
    tuned = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=swarm.initial_peers, tuning_mode="deep_ptune", pre_seq_len=2
    )
    try:
        x = torch.randint(3, 150, (2, 6), generator=torch.Generator().manual_seed(12))
        with torch.no_grad():
            got = base(x, output_hidden_states=True)
            want = hf.model(x, output_hidden_states=True)
            for i, (a, b) in enumerate(zip(got.hidden_states, want.hidden_states, strict=True)):
                torch.testing.assert_close(a, b, **TOL, msg=f"hidden_states[{i}]")
            torch.testing.assert_close(got.last_hidden_state, want.last_hidden_state, **TOL)
            tuned.ptune.deep.normal_(generator=torch.Generator().manual_seed(13))
            every = tuned(x, output_hidden_states=True)
            assert all(state.shape == (2, 6, hf.config.hidden_size) for state in every.hidden_states)
            torch.testing.assert_close(every.logits, tuned(x).logits, **TOL)
            assert not torch.allclose(every.logits, hf(x).logits, **TOL)
    finally:
        base.shutdown()
        tuned.shutdown()


def prompted_layers(hf, start: int, end: int, prompts):
    """`local_layers` with `prompts[i]` ([B or 1, P, H]) added to the first P positions of block start + i's
    input: deep prompts as the servers apply them."""
    cut = copy.deepcopy(hf.model)
    cut.layers = nn.ModuleList(list(cut.layers)[start:end])
    cut.norm = nn.Identity()
    for i, layer in enumerate(cut.layers):

        def add(module, args, kwargs, i=i):
            hidden = args[0] if args else kwargs["hidden_states"]
            n = prompts.shape[2]
            hidden = torch.cat([hidden[:, :n] + prompts[i], hidden[:, n:]], 1)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        layer.register_forward_pre_hook(add, with_kwargs=True)
    return lambda hidden: cut(inputs_embeds=hidden, use_cache=False).last_hidden_state


def test_the_layers_take_deep_prompts_as_petals_remote_sequential_does(model, hf):
    """`layers[a:b](x, prompts=...)` (Petals' `RemoteSequential`): block i's prompts added to the first positions
    of its input, per row or one for all rows, as transformers computes with the same additions; their gradients
    and the input's are local autograd's; a wrong shape is refused, naming the expected one."""
    x = states(model, seed=5)
    generator = torch.Generator().manual_seed(6)
    for rows in (2, 1):
        prompts = torch.randn(2, rows, 3, x.shape[2], generator=generator) * 0.5
        ours, theirs = prompts.clone().requires_grad_(), prompts.clone().requires_grad_()
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = model.model.layers[1:3](x_ours, prompts=ours)
        want = prompted_layers(hf, 1, 3, theirs)(x_theirs)
        torch.testing.assert_close(got, want, **TOL)
        assert not torch.allclose(got, local_layers(hf, 1, 3)(x), **TOL)
        weights = torch.randn(got.shape, generator=generator)
        (got * weights).sum().backward()
        (want * weights).sum().backward()
        torch.testing.assert_close(ours.grad, theirs.grad, **TOL)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, **TOL)
    with pytest.raises(ValueError, match=r"prompts must be \[blocks=2, batch=2 or 1, positions <= 7"):
        model.model.layers[1:3](x, prompts=torch.zeros(3, 1, 2, x.shape[2]))
