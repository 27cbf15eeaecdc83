"""Failover combined with what rewrites a session's server-side history: speculative decoding's rejected drafts
(a step at an earlier position), beam search's `reorder`, an inference session's edited history and a reopening
for another batch size, pushes along a chain, adapters and deep prompts. Real server processes on 127.0.0.1;
faults (SIGKILL, SIGSTOP, SIGTERM) injected at precise moments from inside `generate` (a streamer, a logits
processor, or a hook on a hop's reply); the tokens must equal a fault-free run's."""

from __future__ import annotations

import copy

import pytest
import torch
from test_failover import Swarm as FailoverSwarm
from test_finetune import random_lora
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.hop import History, HopSession, KeptInput
from swarmllm.local import LocalSwarm

PROMPT = torch.tensor([[1, 30, 40, 50, 7, 12, 9]])


class AtRound(BaseStreamer):
    """Calls `action(k, tokens)` after each put but the prompt's (k from 1)."""

    def __init__(self, action):
        self.action, self.calls = action, -1

    def put(self, value):
        self.calls += 1
        if self.calls:
            self.action(self.calls, value)

    def end(self):
        pass


class AtBeamStep(LogitsProcessor):
    """Calls `actions[k]()` when the scores of the k-th step come (k from 1): beam search takes no streamer."""

    def __init__(self, actions):
        self.actions, self.steps = actions, 0

    def __call__(self, input_ids, scores):
        self.steps += 1
        if self.steps in self.actions:
            self.actions[self.steps]()
        return scores


@pytest.fixture(scope="module")
def path(llama_checkpoint):
    return llama_checkpoint  # 4 blocks


@pytest.fixture(scope="module")
def reference(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def draft(reference):
    """A draft that agrees with the model often, not always: some rounds reject drafts."""
    model = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.5 * param.std())
    return model


class Swarm(FailoverSwarm):
    """test_failover's swarm, with server flags of its own and no spot checks unless asked."""

    def __init__(self, local: LocalSwarm, path, spans, server_flags=(), **client_options):
        self.server_flags = list(server_flags)
        super().__init__(local, path, spans, **{"spot_check_fraction": 0.0, **client_options})
        self.remote = None

    @property
    def extra(self):
        return [*super().extra, *self.server_flags]

    @property
    def session(self):
        """The active inference session (also from the client's loop thread, where `_active` is not set)."""
        active = self.model._active
        if active is not None:
            self.remote = active
        return self.remote.session

    def server_of_hop(self, hop: int):
        """The process serving hop `hop` of the active session."""
        return self.local.servers[self.index[self.session.hops[hop].peer_id]]


@pytest.fixture
def make_swarm(local, path):
    made = []

    def make(spans, **options):
        made.append(Swarm(local, path, spans, **options))
        return made[-1]

    yield make
    for swarm in made:
        swarm.close()


@pytest.fixture
def after_reply(monkeypatch):
    """`after_reply(condition)`: once, right after a hop's reply is received by the client, calls `condition(hop,
    reply, position)`; a true result is what it did (a fault it injected), and no later reply is looked at."""
    fired = []

    def install(condition):
        recv = HopSession.recv

        async def hooked(self, step, sent, timeout_s, position):
            reply = await recv(self, step, sent, timeout_s, position)
            if not fired and condition(self, reply, position):
                fired.append((step, position))
            return reply

        monkeypatch.setattr(HopSession, "recv", hooked)
        return fired

    return install


def greedy(reference, ids, new):
    with torch.no_grad():
        return reference.generate(ids, max_new_tokens=new, do_sample=False).tolist()


SPEC_SPANS = [(0, 2), (2, 4), (0, 2), (2, 4)]


def test_speculative_kill_after_a_round_that_rejected_drafts(make_swarm, reference, draft):
    """A round rejects drafts (the servers hold them until the next round's earlier position rewinds them);
    then hop 1's server dies: its replacement must end up with the accepted history only, and the tokens are
    plain greedy decoding's."""
    swarm = make_swarm(SPEC_SPANS)
    new = 24
    seen = {"rejected": 0}
    killed = []

    def on_round(k, tokens):
        stats = swarm.model.last_speculation
        rejected = stats.drafted - stats.accepted
        if rejected > seen["rejected"] and not killed:
            killed.append((k, swarm.session.position))
            swarm.server_of_hop(1).kill()
        seen["rejected"] = rejected

    with swarm.model.inference_session(max_length=PROMPT.shape[1] + new + 8):
        out = swarm.model.generate(
            PROMPT,
            max_new_tokens=new,
            assistant_model=draft,
            num_assistant_tokens=4,
            streamer=AtRound(on_round),
        )
    assert killed, "no round rejected a draft: the test's draft is too good"
    assert out.tolist() == greedy(reference, PROMPT, new)
    (failover,) = swarm.model.swarm.failovers
    assert "ConnectionLost" in failover.reason


def test_speculative_sampling_with_a_seed_survives_a_kill(make_swarm, draft):
    """Seeded speculative sampling gives the fault-free run's tokens through a failover after a rejection."""
    swarm = make_swarm(SPEC_SPANS)
    new = 20
    options = dict(max_new_tokens=new, assistant_model=draft, num_assistant_tokens=3, do_sample=True)
    options.update(temperature=1.2, top_k=40)
    with swarm.model.inference_session(max_length=PROMPT.shape[1] + new + 8):
        fault_free = swarm.model.generate(PROMPT, generator=torch.Generator().manual_seed(5), **options)
    seen, killed = {"rejected": 0}, []

    def on_round(k, tokens):
        stats = swarm.model.last_speculation
        rejected = stats.drafted - stats.accepted
        if rejected > seen["rejected"] and not killed and k > 1:
            killed.append(k)
            swarm.server_of_hop(0).kill()
        seen["rejected"] = rejected

    with swarm.model.inference_session(max_length=PROMPT.shape[1] + new + 8):
        out = swarm.model.generate(
            PROMPT, generator=torch.Generator().manual_seed(5), streamer=AtRound(on_round), **options
        )
    assert killed
    assert out.tolist() == fault_free.tolist()
    assert len(swarm.model.swarm.failovers) == 1


def test_beams_through_a_push_chain_whose_middle_server_dies_mid_step(make_swarm, reference, after_reply):
    """3 hops with push; on a step that reorders the beams' rows, the middle server is killed right after the
    first hop replied (it pushed the step, with its reorder, on): the replacement is rebuilt with the rows as
    they stood and takes the step's reorder once; the last hop takes it once too."""
    swarm = make_swarm([(0, 1), (1, 3), (3, 4), (1, 3)])
    new = 16
    beams = dict(num_beams=3, max_new_tokens=new, do_sample=False)
    with torch.no_grad():
        want = reference.generate(PROMPT, **beams).tolist()
    state = {"reorders": 0}

    def on_a_reordering_step(hop, reply, position):
        session = swarm.session
        if hop is not session._hops[0] or session.reorders < 3 or position < PROMPT.shape[1]:
            return False
        if session.reorders == state["reorders"]:
            return False  # this step does not reorder
        swarm.server_of_hop(1).kill()
        return True

    def arm():
        state["reorders"] = swarm.session.reorders

    with swarm.model.inference_session(max_length=PROMPT.shape[1] + new) as swarm.remote:
        processors = LogitsProcessorList([AtBeamStep({k: arm for k in range(1, new + 1)})])
        fired = after_reply(on_a_reordering_step)
        out = swarm.model.generate(PROMPT, logits_processor=processors, **beams)
        assert [(h.start, h.end) for h in swarm.session.hops] == [(0, 1), (1, 3), (3, 4)]
    assert fired
    assert out.tolist() == want
    assert len(swarm.model.swarm.failovers) == 1


def test_an_edited_history_then_a_kill_in_the_next_generate(make_swarm, reference):
    """Generate, then generate again from an edited history (the session rewinds to the common prefix), with
    hop 1's server killed between the two and hop 0's killed during the second: the second's tokens are those
    of a fresh greedy run over the edited history."""
    swarm = make_swarm([(0, 2), (2, 4), (0, 2), (2, 4), (0, 2)])
    with swarm.model.inference_session(max_length=64) as swarm.remote:
        first = swarm.model.generate(PROMPT, max_new_tokens=10, do_sample=False)
        assert first.tolist() == greedy(reference, PROMPT, 10)
        swarm.server_of_hop(1).kill()  # between the generates
        edited = torch.cat([first[:, :9], torch.tensor([[77, 78, 79]])], dim=1)  # rewinds to position 9
        streamer = AtRound(lambda k, tokens: k == 4 and swarm.server_of_hop(0).kill())
        second = swarm.model.generate(edited, max_new_tokens=10, do_sample=False, streamer=streamer)
    assert second.tolist() == greedy(reference, edited, 10)
    assert len(swarm.model.swarm.failovers) == 2


def test_other_batch_sizes_in_one_session_with_kills(make_swarm, reference):
    """In one session: greedy, then beams (the session reopens for 3 rows) with a kill, then greedy again (it
    reopens for 1 row) with a kill: each equals transformers'."""
    swarm = make_swarm([(0, 2), (2, 4), (0, 2), (2, 4), (2, 4)])
    beams = dict(num_beams=3, max_new_tokens=10, do_sample=False)
    with torch.no_grad():
        want_beams = reference.generate(PROMPT, **beams).tolist()
    with swarm.model.inference_session(max_length=64) as swarm.remote:
        first = swarm.model.generate(PROMPT, max_new_tokens=8, do_sample=False)
        kill = LogitsProcessorList([AtBeamStep({5: lambda: swarm.server_of_hop(1).kill()})])
        assert swarm.model.generate(PROMPT, logits_processor=kill, **beams).tolist() == want_beams
        streamer = AtRound(lambda k, tokens: k == 3 and swarm.server_of_hop(1).kill())
        again = swarm.model.generate(first, max_new_tokens=8, do_sample=False, streamer=streamer)
    assert first.tolist() == greedy(reference, PROMPT, 8)
    assert again.tolist() == greedy(reference, first, 8)
    assert len(swarm.model.swarm.failovers) == 2


def test_a_hosted_adapter_survives_a_kill_mid_beam_search(make_swarm, path, tmp_path):
    """Every server hosts the adapter; hop 1's dies after steps that reordered: the replacement applies the same
    adapter, and the beams are PEFT's."""
    peft = pytest.importorskip("peft")
    from swarmllm.models import load_config
    from swarmllm.models.lora import LoraSettings, write_peft_adapter

    _, config = load_config(path)
    hosted = tmp_path / "styled"
    settings = LoraSettings(rank=2, alpha=4, modules=("q_proj", "v_proj"))
    write_peft_adapter(hosted, settings, random_lora(config, settings, 99), str(path))
    swarm = make_swarm(SPEC_SPANS, server_flags=["--adapters", str(hosted)], active_adapter="styled")
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = peft.PeftModel.from_pretrained(base, hosted).eval()
    beams = dict(num_beams=3, max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        want = theirs.generate(input_ids=PROMPT, **beams).tolist()
    with swarm.model.inference_session(max_length=PROMPT.shape[1] + 12) as swarm.remote:
        kill = LogitsProcessorList([AtBeamStep({6: lambda: swarm.server_of_hop(1).kill()})])
        out = swarm.model.generate(PROMPT, logits_processor=kill, **beams)
    assert out.tolist() == want
    assert len(swarm.model.swarm.failovers) == 1


def test_a_client_lora_and_deep_prompts_survive_kills(make_swarm, path):
    """A client's own LoRA adapter (uploaded to each replacement), and deep prompts with an edited history, each
    through a kill: the fault-free run's tokens."""
    peft = pytest.importorskip("peft")
    swarm = make_swarm(SPEC_SPANS + [(0, 2), (2, 4)])
    model = swarm.model
    model.add_adapter(peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    model.lora.load_tensors(random_lora(model.block_config, model.lora.settings, 7))
    with model.inference_session(max_length=40) as swarm.remote:
        fault_free = model.generate(PROMPT, max_new_tokens=14, do_sample=False)
    with model.inference_session(max_length=40) as swarm.remote:
        streamer = AtRound(lambda k, tokens: k == 5 and swarm.server_of_hop(1).kill())
        assert model.generate(PROMPT, max_new_tokens=14, do_sample=False, streamer=streamer).tolist() == (
            fault_free.tolist()
        )
    assert len(model.swarm.failovers) == 1
    prompted = AutoDistributedModelForCausalLM.from_pretrained(
        swarm.path,
        initial_peers=swarm.local.initial_peers,
        dht_prefix=swarm.prefix,
        spot_check_fraction=0.0,
        tuning_mode="deep_ptune",
        pre_seq_len=3,
    )
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            for p in prompted.ptune.parameters():
                p.normal_(0, 1.0)
        edited = torch.cat([PROMPT[:, :4], torch.tensor([[61, 62]])], dim=1)
        with prompted.inference_session(max_length=40):
            want = [prompted.generate(PROMPT, max_new_tokens=8, do_sample=False)]
            want.append(prompted.generate(edited, max_new_tokens=8, do_sample=False))
        swarm.model = prompted  # server_of_hop reads the prompted model's session
        with prompted.inference_session(max_length=40) as swarm.remote:
            streamer = AtRound(lambda k, tokens: k == 3 and swarm.server_of_hop(0).kill())
            got = [prompted.generate(PROMPT, max_new_tokens=8, do_sample=False, streamer=streamer)]
            streamer = AtRound(lambda k, tokens: k == 2 and swarm.server_of_hop(1).kill())
            got.append(prompted.generate(edited, max_new_tokens=8, do_sample=False, streamer=streamer))
        assert [g.tolist() for g in got] == [w.tolist() for w in want]
        assert len(prompted.swarm.failovers) == 2
    finally:
        swarm.model = model
        prompted.shutdown()


def test_speculation_through_a_push_chain_whose_middle_server_fails_mid_round(
    make_swarm, reference, draft, after_reply
):
    """3 hops with push; right after the first hop replied to a round that rewinds, the middle server is killed:
    the rejected drafts it held must not reach the tokens."""
    swarm = make_swarm([(0, 1), (1, 3), (3, 4), (1, 3)], step_timeout_s=2.0)
    new = 20
    victims = []

    def during_a_rewinding_round(hop, reply, position):
        session = swarm.session
        if hop is not session._hops[0] or reply.hidden.shape[1] < 2 or position + 1 >= session.position:
            return False
        victims.append(swarm.server_of_hop(1))
        victims[0].kill()
        return True

    fired = after_reply(during_a_rewinding_round)
    try:
        with swarm.model.inference_session(max_length=PROMPT.shape[1] + new + 8) as swarm.remote:
            out = swarm.model.generate(
                PROMPT, max_new_tokens=new, assistant_model=draft, num_assistant_tokens=4
            )
    finally:
        for server in victims:
            server.resume()
    assert fired
    assert out.tolist() == greedy(reference, PROMPT, new)
    (failover,) = swarm.model.swarm.failovers
    assert (failover.start, failover.end) == (1, 3)


def test_a_replay_after_rewinds_gives_the_fault_free_logits_bit_for_bit(make_swarm, draft):
    """Speculative rounds rewind the servers (rejected drafts), which cuts the kept inputs of a round that
    rejected; a server killed a round later must be replayed the steps as they were sent (a round's k + 1
    tokens, not the a + 1 it kept: another shape computes other roundings), so that every later logit is the
    fault-free run's exactly, as the README promises."""
    swarm = make_swarm(SPEC_SPANS)
    new = 24
    options = dict(max_new_tokens=new, assistant_model=draft, num_assistant_tokens=4)

    def run(on_round):
        logits = []
        with swarm.model.inference_session(max_length=PROMPT.shape[1] + new + 8) as swarm.remote:
            out = swarm.model.generate(
                PROMPT,
                record_logits=lambda x: logits.append(x.clone()),
                streamer=AtRound(on_round),
                **options,
            )
        return out.tolist(), torch.cat(logits)

    want_tokens, want_logits = run(lambda k, tokens: None)
    seen, rejected_at, killed = {"rejected": 0}, [], []

    def on_round(k, tokens):
        stats = swarm.model.last_speculation
        if stats.drafted - stats.accepted > seen["rejected"] and not rejected_at:
            rejected_at.append(k)
        seen["rejected"] = stats.drafted - stats.accepted
        if rejected_at and k == rejected_at[0] + 1:  # every hop has cut the rejected round's kept input
            killed.append(k)
            swarm.server_of_hop(1).kill()

    tokens, logits = run(on_round)
    assert killed
    assert len(swarm.model.swarm.failovers) == 1
    assert tokens == want_tokens
    assert torch.equal(logits, want_logits), (logits - want_logits).abs().max()


def test_a_rewind_keeps_the_cut_step_whole_for_replays():
    """What a rewind cut stays whole in the steps a replay sends (`held` says where it was cut), while the inputs
    of positions [0, length) are cut as before."""
    history = History()
    round_ = torch.randn(1, 5, 4)
    history.add(KeptInput(0, torch.randn(1, 7, 4), None))
    history.add(KeptInput(7, round_, None))  # a speculative round: 5 tokens, 2 of them accepted
    history.add(KeptInput(9, torch.randn(1, 3, 4), None))  # the next round, at the first rejected position
    assert [(e.position, e.hidden.shape[1], e.held) for e in history.steps] == [
        (0, 7, None),
        (7, 5, 9),
        (9, 3, None),
    ]
    assert torch.equal(history.steps[1].hidden, round_)
    assert [(e.position, e.end) for e in history.entries] == [(0, 7), (7, 9), (9, 12)]
    assert history.length == 12 and history.nbytes == 12 * 4 * 4
