"""An error caused by the caller's own input (a key mask that does not fit the step, NaN or a wrong hidden size in
`inputs_embeds`) reaches the caller as a ValueError: no server is banned for it, nothing fails over, and the
inference session stays usable for a correct next step. Real server processes on 127.0.0.1."""

import asyncio
import itertools
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.client.routing import MissingBlocksError

PROMPT = torch.tensor([[1, 30, 40, 50, 7]])
_prefixes = itertools.count()


@pytest.fixture(scope="module")
def path(checkpoints):
    return str(checkpoints("llama"))  # 4 blocks


@pytest.fixture(scope="module")
def reference(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def prefix():
    return f"own-fault-{next(_prefixes)}"


@pytest.fixture(scope="module")
def servers(local, path, prefix):
    """Two chains of servers, [0, 2) + [2, 4) twice (a failover would find a healthy replacement): peer id ->
    (its blocks, its process)."""
    first = len(local.servers)
    spans = [(0, 2), (2, 4), (0, 2), (2, 4)]
    infos = local.add_servers([(path, span) for span in spans], extra=["--dht-prefix", prefix])
    return {
        info["peer_id"]: (span, local.servers[first + i])
        for i, (info, span) in enumerate(zip(infos, spans, strict=True))
    }


@pytest.fixture(scope="module")
def model(local, path, prefix, servers):
    model = AutoDistributedModelForCausalLM.from_pretrained(
        path,
        initial_peers=local.initial_peers,
        dht_prefix=prefix,
        missing_blocks_timeout_s=2.0,
        spot_check_fraction=0.0,
    )
    yield model
    model.shutdown()


@pytest.fixture
def clean(model):
    """The client as it must stay after each test: nobody banned (as it starts each test, whatever an earlier one
    did)."""
    for peer_id in model.swarm.bans.banned(time.monotonic()):
        model.swarm.bans.lift(peer_id)
    model.swarm.failovers.clear()
    yield model
    assert model.swarm.bans.banned(time.monotonic()) == set()


def assert_usable(model, reference):
    """Nothing failed over so far, and the active session's next (correct) step gives transformers' logits."""
    assert not model.swarm.failovers
    with torch.no_grad():
        got = model(PROMPT).logits
        want = reference(PROMPT).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_a_key_mask_shorter_than_the_step_is_a_value_error_in_a_session(clean, reference):
    model = clean
    mask = torch.tensor([[0, 1, 1, 1]])  # 4 positions for 5 tokens
    with model.inference_session(max_length=16):
        began = time.monotonic()
        with torch.no_grad(), pytest.raises(ValueError, match="key_mask"):
            model(PROMPT, attention_mask=mask)
        assert time.monotonic() - began < 5.0  # at once, not after a search for servers
        assert_usable(model, reference)


def test_nan_inputs_embeds_are_a_value_error_in_a_session(clean, reference):
    model = clean
    embeds = model.head.embed(PROMPT).clone()
    embeds[0, 2, 3] = float("nan")
    with model.inference_session(max_length=16):
        with torch.no_grad(), pytest.raises(ValueError, match="NaN"):
            model(inputs_embeds=embeds)
        assert_usable(model, reference)


def test_inputs_embeds_of_another_hidden_size_are_a_value_error_in_a_session(clean, reference):
    model = clean
    embeds = torch.randn(1, 5, model.config.hidden_size + 1)
    with model.inference_session(max_length=16):
        with torch.no_grad(), pytest.raises(ValueError, match="hidden"):
            model(inputs_embeds=embeds)
        assert_usable(model, reference)


def test_a_key_mask_of_another_dtype_is_a_value_error_in_a_session(clean, reference):
    model = clean
    embeds = model.head.embed(PROMPT)
    with model.inference_session(max_length=16) as remote:
        with pytest.raises(ValueError, match="key_mask"):
            run_sync(remote.session.step(embeds, torch.ones(1, 5, dtype=torch.float32)))
        assert_usable(model, reference)


def test_batch_forward_of_bad_input_is_a_value_error(clean, reference):
    model = clean
    embeds = model.head.embed(PROMPT).clone()
    embeds[0, 1, 0] = float("inf")
    with torch.no_grad():
        with pytest.raises(ValueError, match="NaN"):
            model(inputs_embeds=embeds)
        with pytest.raises(ValueError, match="key_mask"):
            model(PROMPT, attention_mask=torch.tensor([[0, 1, 1, 1]]))
        with pytest.raises(ValueError, match="hidden"):
            model(inputs_embeds=torch.randn(1, 5, model.config.hidden_size + 1))
        torch.testing.assert_close(model(PROMPT).logits, reference(PROMPT).logits, rtol=1e-4, atol=1e-4)


def test_a_nan_gradient_in_a_backward_is_a_value_error(clean, reference):
    """A NaN loss (e.g. every label ignored) sends NaN gradients back through the swarm."""
    model = clean
    embeds = model.head.embed(PROMPT).detach().requires_grad_()
    logits = model(inputs_embeds=embeds).logits
    with pytest.raises(ValueError, match="NaN"):
        (logits.sum() * float("nan")).backward()
    embeds.grad = None
    model(inputs_embeds=embeds).logits.sum().backward()
    want = model.head.embed(PROMPT).detach().requires_grad_()
    reference(inputs_embeds=want).logits.sum().backward()
    torch.testing.assert_close(embeds.grad, want.grad, rtol=1e-3, atol=1e-4)


def test_a_batch_forward_of_more_rows_than_a_session_takes_goes_through_plain_forwards(clean, reference):
    """65 rows of 10 tokens (650 tokens, far below a forward's limit): the pipelined path's temporary sessions
    are refused (a server takes sessions of at most 64 rows), which is no fault of the servers."""
    model = clean
    ids = torch.randint(3, 150, (65, 10), generator=torch.Generator().manual_seed(0))
    swarm = model.swarm
    saved = swarm.forward_chunk_tokens, swarm.min_chunk_s
    swarm.forward_chunk_tokens, swarm.min_chunk_s = 16, 0.0  # pipelined chunks, as for a long input
    try:
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=1e-4, atol=1e-4)
    finally:
        swarm.forward_chunk_tokens, swarm.min_chunk_s = saved


def test_a_session_no_server_takes_is_a_value_error(clean, reference):
    """Sessions of 65 rows, or of more positions than a server takes (8192): every server refuses to open
    them; none of them is banned for it, and the user learns why at once."""
    model = clean
    ids = torch.randint(3, 150, (65, 3), generator=torch.Generator().manual_seed(0))
    began = time.monotonic()
    with pytest.raises(ValueError, match="batch_size=65"):
        model.generate(ids, max_new_tokens=2, do_sample=False)
    with model.inference_session(max_length=9000):
        with torch.no_grad(), pytest.raises(ValueError, match="max_length=9000"):
            model(PROMPT)
    assert time.monotonic() - began < 10.0
    model.swarm.failovers.clear()  # (each session tried the other server of its blocks, which refused it too)
    with model.inference_session(max_length=16):
        assert_usable(model, reference)


def test_a_pipelined_forward_whose_first_hop_fails_leaves_no_task_behind(clean, servers):
    """The first hop's server hangs (SIGSTOP) in a pipelined batch forward and misses its deadline: the stage of
    the next hop, waiting for chunks that never come, must end with the forward, not wait for ever (holding the
    batch's tensors) on the client's loop."""
    model, swarm = clean, clean.swarm
    hung = next(p for p, (span, _) in servers.items() if span == (0, 2))
    after = next(p for p, (span, _) in servers.items() if span == (2, 4))
    infos = {s.peer_id: s for s in run_sync(swarm.servers(refresh=True))}
    saved = swarm.forward_chunk_tokens, swarm.min_chunk_s, swarm.step_timeout_s
    swarm.forward_chunk_tokens, swarm.min_chunk_s, swarm.step_timeout_s = 4, 0.0, 1.0
    swarm.use_servers([infos[hung], infos[after]])  # the only route: the hung server, then the other
    with torch.no_grad():
        model(PROMPT)  # (the client knows both servers now: it routes to them without pinging first)
    servers[hung][1].pause()
    try:
        with torch.no_grad(), pytest.raises(MissingBlocksError):
            model(PROMPT)
    finally:
        servers[hung][1].resume()
        swarm.forward_chunk_tokens, swarm.min_chunk_s, swarm.step_timeout_s = saved
        swarm.use_dht()
        swarm.bans.lift(hung)

    async def pending() -> list[str]:
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.sleep(0)  # (a task cancelled just now has run its last step)
        return [t.get_coro().__qualname__ for t in tasks if not t.done()]

    assert [name for name in run_sync(pending()) if "_pipelined_forward" in name] == []
