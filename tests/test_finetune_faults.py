"""Fine-tuning through real server processes that fail, hang, leave or lie during training: every step's loss and
gradients equal those of PEFT on the local `transformers` model (the fault-free oracle), whichever server
computed them, and a hung server costs a step deadline, not a request's. Servers are real processes on 127.0.0.1,
except the liars (in-process servers on real direct connections, whose backward answers garbage)."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest
import torch
from server_infos import online_server
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from swarmllm.client.loop import run_sync
from swarmllm.dht import find_servers
from swarmllm.local import LocalSwarm
from swarmllm.models import load_client_head, load_config, load_span
from swarmllm.models.lora import lora_shapes
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.wire import DirectServer, Identity

logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
peft = pytest.importorskip("peft")

PREFIX = "finetune-faults"
TOL = dict(rtol=1e-4, atol=1e-5)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
STEP_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def swarm(llama_checkpoint):
    """Two servers of all 4 blocks: A (made the preferred one by the tests) and B, its replacement."""
    with LocalSwarm() as local:
        local.start_bootstrap()
        records = local.add_servers(
            [(str(llama_checkpoint), (0, 4)), (str(llama_checkpoint), (0, 4))], extra=["--dht-prefix", PREFIX]
        )
        peers = [r["peer_id"] for r in records]
        PORTS[:] = [int(str(r["direct"]).rsplit(":", 1)[1]) for r in records]
        yield local, peers


PORTS: list[int] = []  # each server's direct port


def restart(local: LocalSwarm, peers: list[str], index: int) -> None:
    local.servers[index].resume()
    record = local.restart_server(index)
    peers[index], PORTS[index] = record["peer_id"], int(str(record["direct"]).rsplit(":", 1)[1])


def unread_bytes(port: int) -> int:
    """Bytes received on 127.0.0.1:`port`'s connections that the (paused) server has not read yet."""
    total = 0
    with open("/proc/net/tcp") as table:
        for line in list(table)[1:]:
            fields = line.split()
            if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # ESTABLISHED
                total += int(fields[4].split(":")[1], 16)
    return total


def when_request_arrives(local: LocalSwarm, index: int, fault: str, call) -> None:
    """Pause server `index`, run `call` on a thread, and once the request it sends has reached the paused
    server, `fault` it (kill: SIGKILL; term: SIGTERM then SIGCONT; pause: leave it hanging)."""
    local.servers[index].pause()
    outcome: list = []

    def run():
        try:
            outcome.append(call())
        except BaseException as e:  # noqa: BLE001 - raised on the test's thread below
            outcome.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not unread_bytes(PORTS[index]) and thread.is_alive():
        assert time.monotonic() < deadline, "the request never reached the server"
        time.sleep(0.01)  # polling the kernel's socket table, not waiting for a guess of time
    if fault == "kill":
        local.servers[index].kill()
    elif fault == "term":
        local.servers[index].terminate()
        local.servers[index].resume()
    thread.join(60)
    assert not thread.is_alive(), "the step hangs"
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def client(path, local, peers, cls=AutoDistributedModelForCausalLM, lora=LORA, **kwargs):
    """A client (with a random adapter of settings `lora`, unless None) that routes to server A first (B is
    announced as very slow)."""
    kwargs = {"spot_check_fraction": 0, "step_timeout_s": STEP_TIMEOUT_S, "request_timeout_s": 60, **kwargs}
    model = cls.from_pretrained(str(path), initial_peers=local.initial_peers, dht_prefix=PREFIX, **kwargs)
    servers = {s.peer_id: s for s in run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, 4))}
    rates = {peers[0]: 1e9, peers[1]: 1e-6}
    model.swarm.use_servers([servers[p].model_copy(update={"forward_rps": rates[p]}) for p in peers])
    if lora is None:
        return model
    model.add_adapter(peft.LoraConfig(**lora))
    _, config = load_config(path)
    shapes = lora_shapes(config, model.lora.settings, range(config.num_layers))
    generator = torch.Generator().manual_seed(1)
    model.lora.load_tensors({n: torch.randn(s, generator=generator) * 0.1 for n, s in shapes.items()})
    return model


def ids(batch=2, length=7, seed=0):
    return torch.randint(3, 150, (batch, length), generator=torch.Generator().manual_seed(seed))


def peft_step(path, model, tmp_path, x):
    """PEFT's loss and adapter gradients (our tensor names) for the client's current adapter."""
    model.save_pretrained(tmp_path)
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, tmp_path, is_trainable=True).eval()
    loss = theirs(input_ids=x, labels=x).loss
    loss.backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    prefix = "base_model.model.model.layers."
    return loss, {name: grads[f"{prefix}{name}.default.weight"] for name in model.lora.names}


def assert_step_is_peft(path, model, tmp_path, x, loss):
    want_loss, want = peft_step(path, model, tmp_path, x)
    torch.testing.assert_close(loss, want_loss, **TOL)
    for name, weight in zip(model.lora.names, model.lora.weights, strict=True):
        assert weight.grad is not None, name
        torch.testing.assert_close(weight.grad, want[name], **TOL)


def test_a_server_paused_between_steps_costs_a_step_deadline(swarm, llama_checkpoint, tmp_path):
    """After an optimizer step the next request uploads the new adapter first: a server that hangs then is left
    for another within the step's deadline (not `request_timeout_s`), and the step's gradients are PEFT's."""
    local, peers = swarm
    model = client(llama_checkpoint, local, peers, request_timeout_s=30)
    try:
        optimizer = torch.optim.SGD(model.lora.parameters(), lr=0.1)
        x = ids(seed=1)
        model(x, labels=x).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        local.servers[0].pause()
        began = time.monotonic()
        loss = model(x, labels=x).loss
        loss.backward()
        elapsed = time.monotonic() - began
        assert_step_is_peft(llama_checkpoint, model, tmp_path, x, loss)
        assert elapsed < 6 * STEP_TIMEOUT_S, f"the step took {elapsed:.1f} s"
    finally:
        model.shutdown()
        restart(local, peers, 0)


def test_a_server_that_hung_during_an_upload_is_usable_again_once_it_answers(
    swarm, llama_checkpoint, tmp_path, caplog
):
    """An upload left unanswered (the server paused) must not leave its answer to be read as the next upload's:
    once the server answers again, the next version's upload to it succeeds, and it is not banned for it."""
    local, peers = swarm
    model = client(llama_checkpoint, local, peers, request_timeout_s=10)
    try:
        optimizer = torch.optim.SGD(model.lora.parameters(), lr=0.1)
        x = ids(seed=2)
        for pause in (False, True):
            if pause:
                local.servers[0].pause()
            model(x, labels=x).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert peers[0] in model.swarm.bans.banned(time.monotonic())
        local.servers[0].resume()
        model.swarm.bans.lift(peers[0])
        caplog.clear()
        loss = model(x, labels=x).loss
        loss.backward()
        assert_step_is_peft(llama_checkpoint, model, tmp_path, x, loss)
        assert not [r.message for r in caplog.records if r.levelno >= logging.WARNING]
        assert peers[0] not in model.swarm.bans.banned(time.monotonic())
    finally:
        model.shutdown()
        restart(local, peers, 0)


@pytest.mark.parametrize("fault", ["kill", "term", "pause"])
@pytest.mark.parametrize("phase", ["forward", "backward"])
def test_a_server_failing_during_a_call_gives_peft_gradients(
    swarm, llama_checkpoint, tmp_path, caplog, phase, fault
):
    """A server crashes, leaves or hangs with a training forward's or backward's request in its socket: the
    hop is computed on the other server, and the loss and every adapter gradient are PEFT's."""
    local, peers = swarm
    model = client(llama_checkpoint, local, peers)
    try:
        x = ids(batch=3, seed=3)
        model(x, labels=x).loss.backward()  # the adapter reaches server A: the next request is a forward
        model.zero_grad()
        if phase == "forward":
            loss = when_request_arrives(local, 0, fault, lambda: model(x, labels=x).loss)
            loss.backward()
        else:
            loss = model(x, labels=x).loss
            when_request_arrives(local, 0, fault, loss.backward)
        assert_step_is_peft(llama_checkpoint, model, tmp_path, x, loss)
        if fault != "term":  # a leaving server may still answer what it had received
            assert peers[0] in model.swarm.bans.banned(time.monotonic())
        if fault == "pause":  # it wakes up with a late answer on its connection: used again, it answers right
            local.servers[0].resume()
            model.swarm.bans.lift(peers[0])
            model.zero_grad()
            caplog.clear()
            loss = model(x, labels=x).loss
            loss.backward()
            assert_step_is_peft(llama_checkpoint, model, tmp_path, x, loss)
            assert not [r.message for r in caplog.records if r.levelno >= logging.WARNING]
    finally:
        model.shutdown()
        restart(local, peers, 0)


def _nan_first_lora(g):
    name = next(iter(g.lora))
    return dataclasses.replace(g, lora={**g.lora, name: torch.full_like(g.lora[name], float("nan"))})


GARBAGE = {
    "nan input gradient": lambda g: dataclasses.replace(g, hidden=torch.full_like(g.hidden, float("nan"))),
    "short input gradient": lambda g: dataclasses.replace(g, hidden=g.hidden[:, :-1]),
    "nan adapter gradient": _nan_first_lora,
    "adapter gradient of another shape": lambda g: dataclasses.replace(
        g, lora={n: t.T.contiguous() for n, t in g.lora.items()}
    ),
    "adapter gradient missing": lambda g: dataclasses.replace(g, lora=dict(list(g.lora.items())[1:])),
    "zero adapter gradients": lambda g: dataclasses.replace(g, lora={}),
}


@pytest.fixture(scope="module")
def liar_and_honest(llama_checkpoint):
    """Two in-process servers of all 4 blocks on real direct connections: the first answers backwards with
    `garbage[0](gradients)` (set by the test), the second honestly."""
    garbage: list = [None]
    infos, running = [], []
    for lies in (True, False):
        backend = Backend(load_span(str(llama_checkpoint), 0, 4), cache_tokens=256)
        if lies:
            honest_backward = backend.backward

            async def backward(*args, _honest=honest_backward, **kwargs):
                return garbage[0](await _honest(*args, **kwargs))

            backend.backward = backward
        handler = RequestHandler(backend, lambda: {"start_block": 0, "end_block": 4}, ServerLimits())
        identity = Identity.generate()
        server = DirectServer(handler.handlers(), identity)
        run_sync(server.start())
        running.append((server, backend))
        infos.append(
            online_server(identity.peer_id, 0, 4, address=server.address, forward_rps=1e9 if lies else 1e-6)
        )
    yield infos, garbage
    for server, backend in running:
        run_sync(server.stop())
        backend.shutdown()


@pytest.mark.parametrize("kind", list(GARBAGE))
def test_garbage_gradients_are_refused_and_computed_elsewhere(
    liar_and_honest, llama_checkpoint, tmp_path, kind
):
    """A backward answered with gradients that are not those asked for (NaN, another shape, some or all of the
    adapter's missing) is the server's fault: banned, computed on the other server, never applied."""
    infos, garbage = liar_and_honest
    garbage[0] = GARBAGE[kind]
    model = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=[], spot_check_fraction=0, step_timeout_s=STEP_TIMEOUT_S
    )
    try:
        model.swarm.use_servers(infos)
        model.add_adapter(peft.LoraConfig(**LORA))
        _, config = load_config(llama_checkpoint)
        shapes = lora_shapes(config, model.lora.settings, range(config.num_layers))
        generator = torch.Generator().manual_seed(4)
        model.lora.load_tensors({n: torch.randn(s, generator=generator) * 0.1 for n, s in shapes.items()})
        x = ids(seed=5)
        loss = model(x, labels=x).loss
        loss.backward()
        assert_step_is_peft(llama_checkpoint, model, tmp_path, x, loss)
        assert infos[0].peer_id in model.swarm.bans.banned(time.monotonic())
    finally:
        model.shutdown()


def test_dropout_gradients_survive_a_crash_as_in_the_fault_free_run(swarm, llama_checkpoint):
    """With adapter dropout (masks from the request's seed and the layer), a backward moved to another server
    after a crash recomputes the same masks: the gradients are the fault-free run's with the same torch seed."""
    local, peers = swarm
    lora = {**LORA, "lora_dropout": 0.3}

    def run(fault: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model = client(llama_checkpoint, local, peers, lora=lora)
        try:
            model.train()
            x = ids(batch=3, seed=6)
            model(x, labels=x).loss.backward()  # the adapter reaches server A
            model.zero_grad()
            torch.manual_seed(7)
            loss = model(x, labels=x).loss
            if fault:
                when_request_arrives(local, 0, "kill", loss.backward)
                assert peers[0] in model.swarm.bans.banned(time.monotonic())
            else:
                loss.backward()
            return loss.detach(), [w.grad for w in model.lora.weights]
        finally:
            model.shutdown()

    try:
        (clean_loss, clean), (loss, grads) = run(False), run(True)
        torch.testing.assert_close(loss, clean_loss, **TOL)
        for got, want in zip(grads, clean, strict=True):
            torch.testing.assert_close(got, want, **TOL)
    finally:
        restart(local, peers, 0)


def test_deep_prompts_and_classifier_head_survive_a_crash_in_the_backward(swarm, llama_checkpoint):
    """A classifier trained with deep prompts: a crash during the backward leaves the loss and the gradients of
    the prompts, the deep prompts and the head equal to local autograd over the same blocks."""
    local, peers = swarm
    model = client(
        llama_checkpoint,
        local,
        peers,
        cls=AutoDistributedModelForSequenceClassification,
        lora=None,
        tuning_mode="deep_ptune",
        pre_seq_len=2,
        num_labels=3,
    )
    try:
        generator = torch.Generator().manual_seed(8)
        with torch.no_grad():
            model.ptune.deep.copy_(torch.randn(model.ptune.deep.shape, generator=generator) * 0.1)
        x, labels = ids(batch=3, length=5, seed=9), torch.tensor([0, 2, 1])
        model(x, labels=labels).loss.backward()  # server A has computed for this client before
        model.zero_grad()
        out = model(x, labels=labels)
        when_request_arrives(local, 0, "kill", out.loss.backward)
        assert peers[0] in model.swarm.bans.banned(time.monotonic())

        _, head = load_client_head(llama_checkpoint)
        span = load_span(llama_checkpoint, 0, 4)
        prompts, deep, score = (
            t.detach().clone().requires_grad_()
            for t in (model.ptune.prompts, model.ptune.deep, model.score.weight)
        )
        hidden = torch.cat([prompts.expand(3, -1, -1), head.embed(x)], dim=1)
        hidden = head.norm(span(hidden, prompts=deep[:, None]))[:, -1]
        loss = torch.nn.functional.cross_entropy(hidden @ score.T, labels)
        loss.backward()
        torch.testing.assert_close(out.loss, loss, **TOL)
        for ours, want in [
            (model.ptune.prompts, prompts),
            (model.ptune.deep, deep),
            (model.score.weight, score),
        ]:
            torch.testing.assert_close(ours.grad, want.grad, **TOL)
    finally:
        model.shutdown()
        restart(local, peers, 0)


def test_a_training_loop_with_servers_leaving_and_joining_trains_as_peft_does(
    swarm, llama_checkpoint, tmp_path
):
    """Six SGD steps of two accumulated micro-steps each, through the DHT's servers, while one crashes, comes
    back (a new peer), the other leaves and comes back: every loss and the final adapter are those of the same
    loop in PEFT, the trained adapter's eval logits are PEFT's, and the servers' own weights are untouched (a
    plain client's logits are transformers')."""
    local, peers = swarm
    model = client(llama_checkpoint, local, peers, refresh_s=0.2)
    model.swarm.use_dht()
    plain = AutoDistributedModelForCausalLM.from_pretrained(
        str(llama_checkpoint), initial_peers=local.initial_peers, dht_prefix=PREFIX, spot_check_fraction=0
    )
    reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    probe = ids(batch=2, length=6, seed=99)
    with torch.no_grad():
        torch.testing.assert_close(plain(probe).logits, reference(probe).logits, **TOL)
    try:
        model.save_pretrained(tmp_path / "start")
        base = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "start", is_trainable=True).train()
        faults = {
            1: lambda: local.servers[0].kill(),
            2: lambda: restart(local, peers, 0),
            3: lambda: local.servers[1].stop(),
            4: lambda: restart(local, peers, 1),
        }
        model.train()
        ours_opt = torch.optim.SGD(model.lora.parameters(), lr=0.5)
        their_opt = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.5)
        for step in range(6):
            if step in faults:
                faults[step]()
            ours, want = [], []
            for micro in range(2):
                x = ids(batch=2, length=6, seed=100 + 2 * step + micro)
                loss = model(x, labels=x).loss / 2
                loss.backward()
                ours.append(loss.item())
                their_loss = theirs(input_ids=x, labels=x).loss / 2
                their_loss.backward()
                want.append(their_loss.item())
            ours_opt.step()
            ours_opt.zero_grad()
            their_opt.step()
            their_opt.zero_grad()
            torch.testing.assert_close(torch.tensor(ours), torch.tensor(want), **TOL)
        trained = {n: p for n, p in theirs.named_parameters() if p.requires_grad}
        prefix = "base_model.model.model.layers."
        for name, weight in zip(model.lora.names, model.lora.weights, strict=True):
            torch.testing.assert_close(weight, trained[f"{prefix}{name}.default.weight"], **TOL)
        model.eval()
        model.save_pretrained(tmp_path / "end")  # the client's own weights (the loop's drift aside)
        base = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32)
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "end").eval()
        with torch.no_grad():
            torch.testing.assert_close(model(probe).logits, theirs(input_ids=probe).logits, **TOL)
            plain.swarm.use_dht()
            torch.testing.assert_close(plain(probe).logits, reference(probe).logits, **TOL)
    finally:
        model.shutdown()
        plain.shutdown()
