"""End to end: a bootstrap peer and server processes on 127.0.0.1, a client generating through them, compared
with transformers running the same checkpoint locally."""

import itertools

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessor, LogitsProcessorList
from transformers.generation.streamers import BaseStreamer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.cli import main
from swarmllm.client.loop import run_sync
from swarmllm.client.routing import MissingBlocksError
from swarmllm.dht import ServerState, find_servers
from swarmllm.local import LocalSwarm

# blocks per server; llama has two overlapping servers
SPLITS = {
    "llama": [(0, 2), (2, 4), (1, 4)],
    "mistral": [(0, 3), (3, 4)],
    "qwen2": [(0, 2), (2, 4)],
    "qwen3": [(0, 4)],
}
PROMPTS = ["the cat and the dog", "what is the sun", "a b c d e f g"]


@pytest.fixture(scope="module")
def swarm(checkpoints):
    paths = {family: checkpoints(family) for family in SPLITS}
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers([(str(paths[f]), span) for f, spans in SPLITS.items() for span in spans])
        yield local, paths


@pytest.fixture(scope="module")
def models(swarm):
    local, paths = swarm
    loaded = {}
    for family, path in paths.items():
        remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=local.initial_peers)
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        loaded[family] = (remote, reference, AutoTokenizer.from_pretrained(path))
    yield loaded
    for remote, _, _ in loaded.values():
        remote.shutdown()


@pytest.mark.parametrize("family", list(SPLITS))
def test_greedy_tokens_equal_transformers(models, family):
    remote, reference, tokenizer = models[family]
    for prompt in PROMPTS:
        inputs = tokenizer(prompt, return_tensors="pt")
        ours = remote.generate(**inputs, max_new_tokens=12, do_sample=False)
        theirs = reference.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert ours.tolist() == theirs.tolist(), prompt


@pytest.mark.parametrize("family", list(SPLITS))
def test_forward_logits_match(models, family):
    remote, reference, tokenizer = models[family]
    inputs = tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        ours = remote(**inputs).logits
        theirs = reference(**inputs).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_every_split_is_used(models, swarm):
    """Both chains over the overlapping llama servers give transformers' tokens and logits."""
    remote, reference, tokenizer = models["llama"]
    servers = run_sync(find_servers(remote.swarm.dht, remote.swarm.dht_prefix, 4))
    assert sorted((s.start_block, s.end_block) for s in servers) == sorted(SPLITS["llama"])
    inputs = tokenizer(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        want_logits = reference(**inputs).logits
    want_tokens = reference.generate(**inputs, max_new_tokens=8, do_sample=False).tolist()
    try:
        for left_out in ((2, 4), (1, 4)):  # pin the client to one chain, then to the other
            chain = [s for s in servers if (s.start_block, s.end_block) != left_out]
            remote.swarm.use_servers(chain)
            with torch.no_grad():
                torch.testing.assert_close(remote(**inputs).logits, want_logits, rtol=1e-4, atol=1e-4)
            with remote.inference_session(max_length=32) as session:
                assert remote.generate(**inputs, max_new_tokens=8, do_sample=False).tolist() == want_tokens
                used = {hop.peer_id for hop in session.session.hops}
            assert used == {s.peer_id for s in chain}
    finally:
        remote.swarm.use_dht()


def test_padded_batch_equals_transformers(models):
    remote, reference, tokenizer = models["llama"]
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert not bool(batch["attention_mask"].all())
    ours = remote.generate(**batch, max_new_tokens=10, do_sample=False)
    theirs = reference.generate(**batch, max_new_tokens=10, do_sample=False)
    assert ours.tolist() == theirs.tolist()
    with torch.no_grad():
        mask = batch["attention_mask"].bool()
        ours_logits = remote(**batch).logits[mask]
        theirs_logits = reference(**batch).logits[mask]
    torch.testing.assert_close(ours_logits, theirs_logits, rtol=1e-4, atol=1e-4)


def test_sampling_with_a_seed_is_reproducible(models):
    remote, _, tokenizer = models["qwen2"]
    inputs = tokenizer(PROMPTS[0], return_tensors="pt")
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(
            remote.generate(
                **inputs, max_new_tokens=16, do_sample=True, temperature=1.5, top_k=40, top_p=0.95
            ).tolist()
        )
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_eos_and_streamer(models):
    remote, reference, tokenizer = models["mistral"]
    inputs = tokenizer(PROMPTS[2], return_tensors="pt")
    free = reference.generate(**inputs, max_new_tokens=10, do_sample=False)[0]
    stop_token = int(free[inputs["input_ids"].shape[1] + 3])

    class Collect(BaseStreamer):
        def __init__(self):
            self.tokens = []

        def put(self, value):
            self.tokens.extend(value.flatten().tolist())

        def end(self):
            self.tokens.append("end")

    streamer = Collect()
    ours = remote.generate(
        **inputs, max_new_tokens=10, do_sample=False, eos_token_id=stop_token, streamer=streamer
    )
    theirs = reference.generate(**inputs, max_new_tokens=10, do_sample=False, eos_token_id=stop_token)
    assert ours.tolist() == theirs.tolist()
    assert ours[0, -1] == stop_token and ours.shape[1] < free.shape[0]
    assert streamer.tokens == [*ours[0].tolist(), "end"]


def test_inference_session_keeps_the_cache_across_turns(models):
    remote, reference, tokenizer = models["llama"]
    first = tokenizer("the cat", return_tensors="pt")["input_ids"]
    with remote.inference_session(max_length=64) as session:
        turn1 = remote.generate(first, max_new_tokens=6, do_sample=False)
        held = session.position
        assert held == turn1.shape[1] - 1  # the last sampled token was never fed back
        follow_up = tokenizer("and the dog", return_tensors="pt")["input_ids"]
        conversation = torch.cat([turn1, follow_up], dim=1)
        turn2 = remote.generate(conversation, max_new_tokens=6, do_sample=False)
        assert session.position == turn2.shape[1] - 1
    assert turn2.tolist() == reference.generate(conversation, max_new_tokens=6, do_sample=False).tolist()


class _Sequences(LogitsProcessor):
    """Records the sequences each step of a generate computes."""

    def __init__(self):
        self.inputs = []

    def __call__(self, input_ids, scores):
        self.inputs.append(input_ids.clone())
        return scores


def test_beam_search_equals_transformers_and_reorders_the_servers_rows(models):
    """Each beam step sends one token a row and moves the servers' cache rows to the beams kept (no history is
    sent again); padded prompts, several sequences returned, a length penalty, beam sampling with a seed."""
    remote, reference, tokenizer = models["llama"]
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    cases = [
        {"num_beams": 3, "do_sample": False},
        {"num_beams": 4, "num_return_sequences": 2, "length_penalty": 0.5, "do_sample": False},
        {"num_beams": 3, "do_sample": True, "temperature": 0.9},
    ]
    for options in cases:
        options.update(max_new_tokens=12, output_scores=True, return_dict_in_generate=True)
        with remote.inference_session(max_length=batch["input_ids"].shape[1] + 12) as session:
            torch.manual_seed(0)
            ours = remote.generate(**batch, **options)
            reorders = session.session.reorders
        seen = _Sequences()
        torch.manual_seed(0)
        theirs = reference.generate(**batch, logits_processor=LogitsProcessorList([seen]), **options)
        assert ours.sequences.tolist() == theirs.sequences.tolist(), options
        # every beam's scores at every step, also those of beams pruned later
        torch.testing.assert_close(torch.stack(ours.scores), torch.stack(theirs.scores), atol=1e-4, rtol=1e-4)
        # a step whose beams do not continue the previous step's rows in order is a reorder (one token a row)
        moved = [not torch.equal(now[:, :-1], then) for then, now in itertools.pairwise(seen.inputs)]
        assert reorders == sum(moved) > 0, options


def test_missing_blocks_give_a_clear_error(swarm, checkpoints):
    local, paths = swarm
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(paths["llama"]),
        initial_peers=local.initial_peers,
        dht_prefix="nobody-serves-this",
        missing_blocks_timeout_s=1.0,
    )
    try:
        with pytest.raises(MissingBlocksError, match="0..3"):
            remote.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
        with pytest.raises(MissingBlocksError, match="0..3"):
            remote(input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        remote.shutdown()


def test_server_announces_offline_and_exits_cleanly(swarm, models):
    local, paths = swarm
    remote = models["qwen2"][0]
    info = local.add_server(str(paths["qwen2"]), (0, 4), extra=["--update-period", "60"])
    servers = {s.peer_id: s for s in run_sync(find_servers(remote.swarm.dht, remote.swarm.dht_prefix, 4))}
    assert servers[info["peer_id"]].state == ServerState.ONLINE
    assert local.stop_server(len(local.servers) - 1) == 0
    servers = {s.peer_id: s for s in run_sync(find_servers(remote.swarm.dht, remote.swarm.dht_prefix, 4))}
    assert servers[info["peer_id"]].state == ServerState.OFFLINE


def test_long_forward_is_pipelined_in_chunks_and_exact(models):
    remote, reference, _ = models["llama"]
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 150, (2, 200), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, :37] = 0
    with torch.no_grad():
        theirs = reference(input_ids=input_ids, attention_mask=mask).logits[mask.bool()]
        remote.swarm.min_chunk_s = 0.0
        for chunk_tokens in (64, 1000):  # 64: pipelined chunks of 32 positions; 1000: one plain call per hop
            remote.swarm.forward_chunk_tokens = chunk_tokens
            ours = remote(input_ids=input_ids, attention_mask=mask).logits[mask.bool()]
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    remote.swarm.forward_chunk_tokens, remote.swarm.min_chunk_s = 128, 0.02


def test_libp2p_path_gives_the_same_tokens(swarm, models):
    local, paths = swarm
    _, reference, tokenizer = models["llama"]
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(paths["llama"]), initial_peers=local.initial_peers, prefer_direct=False
    )
    try:
        inputs = tokenizer(PROMPTS[0], return_tensors="pt")
        ours = remote.generate(**inputs, max_new_tokens=8, do_sample=False)
        assert ours.tolist() == reference.generate(**inputs, max_new_tokens=8, do_sample=False).tolist()
        transports = {run_sync(remote.swarm.connection(p)).transport for p in remote.swarm.rtt_s}
        assert transports == {"libp2p"}
    finally:
        remote.shutdown()


def test_falls_back_to_libp2p_when_the_direct_address_is_unreachable(swarm, checkpoints):
    local, _ = swarm
    path = checkpoints("llama3")
    # the server listens on 127.0.0.1 but announces its direct path at 127.0.0.2, where nothing answers
    info = local.add_server(str(path), (0, 4), extra=["--announce-host", "127.0.0.2"])
    assert info["direct"].startswith("127.0.0.2:")
    remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=local.initial_peers)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    try:
        prompt = torch.tensor([[1, 30, 40, 50]])
        ours = remote.generate(prompt, max_new_tokens=8, do_sample=False)
        assert ours.tolist() == reference.generate(prompt, max_new_tokens=8, do_sample=False).tolist()
        assert run_sync(remote.swarm.connection(info["peer_id"])).transport == "libp2p"
    finally:
        remote.shutdown()


def test_servers_push_activations_along_the_chain(models):
    remote, reference, tokenizer = models["qwen2"]
    inputs = tokenizer(PROMPTS[1], return_tensors="pt")
    theirs = reference.generate(**inputs, max_new_tokens=8, do_sample=False)
    for push in (True, False):
        remote.swarm.push = push
        with remote.inference_session(max_length=32) as session:
            ours = remote.generate(**inputs, max_new_tokens=8, do_sample=False)
            assert len(session.session.hops) == 2
            # every step after the first (the second session had not answered yet, so a push could outrun
            # its opening) has its second hop's input pushed by the first server
            assert session.session.pushed_hops == (7 if push else 0)
        assert ours.tolist() == theirs.tolist()
    remote.swarm.push = True


def test_concurrent_clients_are_batched_and_each_gets_its_own_tokens(models):
    """Sessions generating at once through the same 2 servers (with push): the servers merge their decode
    steps (continuous batching), and every session's tokens equal transformers' for its own prompt."""
    from concurrent.futures import ThreadPoolExecutor

    from swarmllm.client.loop import run_sync
    from swarmllm.wire import Message

    remote, reference, tokenizer = models["qwen2"]
    prompts = [*PROMPTS, "one two three", "the sun and the cat"]

    def merged() -> tuple[int, int]:
        async def ask():
            steps = sessions = 0
            for info in await remote.swarm.servers(refresh=True):
                if info.state != ServerState.ONLINE:  # one an earlier test stopped
                    continue
                meta = (await (await remote.swarm.connection(info.peer_id)).call("info", Message({}))).meta
                steps, sessions = steps + meta["decode_steps"], sessions + meta["decode_session_steps"]
            return steps, sessions

        return run_sync(ask())

    def generate(prompt):
        inputs = tokenizer(prompt, return_tensors="pt")
        return remote.generate(**inputs, max_new_tokens=16, do_sample=False).tolist()

    before = merged()
    with ThreadPoolExecutor(len(prompts)) as pool:
        ours = list(pool.map(generate, prompts))
    after = merged()
    for prompt, tokens in zip(prompts, ours, strict=True):
        inputs = tokenizer(prompt, return_tensors="pt")
        assert tokens == reference.generate(**inputs, max_new_tokens=16, do_sample=False).tolist(), prompt
    steps, sessions = after[0] - before[0], after[1] - before[1]
    assert sessions > steps  # some decode steps ran merged


def test_cli_generate_prints_the_same_text_as_transformers(swarm, models, capsys):
    local, paths = swarm
    _, reference, tokenizer = models["llama"]
    args = ["generate", str(paths["llama"]), "--initial-peers", *local.initial_peers, "--prompt", PROMPTS[0]]
    assert main([*args, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    want = reference.generate(**tokenizer(PROMPTS[0], return_tensors="pt"), max_new_tokens=6, do_sample=False)
    assert printed == tokenizer.decode(want[0], skip_special_tokens=True)
    assert main([*args, "--max-new-tokens", "6", "--num-beams", "3"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    want = reference.generate(**tokenizer(PROMPTS[0], return_tensors="pt"), max_new_tokens=6, num_beams=3)
    assert printed == tokenizer.decode(want[0], skip_special_tokens=True)


def test_compiled_decode_gives_transformers_tokens(swarm, checkpoints, monkeypatch):
    """A CPU server of small blocks compiles its decode step by default (ahead of time with AOTInductor;
    mistral: sliding window of 4, which the compiled steps pass) and gives transformers' greedy tokens, for a
    plain prompt and for a left-padded batch, whose steps run eagerly: nothing is compiled once it serves (torch
    logs every recompilation)."""
    local, _ = swarm
    path = checkpoints("mistral", num_layers=2)
    monkeypatch.delenv("SWARMLLM_COMPILE", raising=False)  # the suite's servers skip compiling (conftest)
    monkeypatch.setenv("TORCH_LOGS", "recompiles")
    local.add_server(str(path), (0, 2))
    log = local.servers[-1].log
    compiled_at_start = sum("Recompiling" in line for line in log)
    remote = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=local.initial_peers)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    try:
        for batch in (
            tokenizer(PROMPTS[:1], return_tensors="pt"),
            tokenizer(PROMPTS, return_tensors="pt", padding=True),
        ):
            ours = remote.generate(**batch, max_new_tokens=10, do_sample=False)
            assert ours.tolist() == reference.generate(**batch, max_new_tokens=10, do_sample=False).tolist()
        assert any("decode steps run compiled ahead of time" in line for line in log)
        assert sum("Recompiling" in line for line in log) == compiled_at_start, log[-20:]
    finally:
        remote.shutdown()


def test_a_server_with_a_cache_arena_and_chunked_prefills_gives_transformers_tokens(swarm, checkpoints):
    """Sessions whose caches are rows of a server's cache arena (`--arena-length`, CUDA's default, forced here on
    the CPU; mistral: sliding window of 4), lone and merged, beside sessions too long for a row, and a
    left-padded batch taking three rows, their prompts prefilled in chunks of 6 tokens (`--prefill-chunk-tokens`:
    2 positions a chunk for the batch, across the window) by two servers, the first pushing each chunk's output
    on as a part of the step: every session gets transformers' greedy tokens."""
    from concurrent.futures import ThreadPoolExecutor

    local, _ = swarm
    path = checkpoints("mistral", num_layers=3)
    flags = ["--arena-length", "24", "--prefill-chunk-tokens", "6"]
    local.add_servers([(str(path), (0, 2)), (str(path), (2, 3))], extra=flags)
    for server in local.servers[-2:]:
        assert any("cache arena: " in line and "rows of 24 slots" in line for line in server.log)
    # the pushes' deadline raised from 1 s: under a loaded machine's CI, a push that took longer was sent again by
    # the client (correct, but not what this test counts)
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        str(path), initial_peers=local.initial_peers, push_timeout_s=30.0
    )
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"

    def generate(prompts, new_tokens):
        if isinstance(prompts, torch.Tensor):  # token ids
            batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}
        else:
            batch = tokenizer(prompts, return_tensors="pt", padding=True)
        ours = remote.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
        return ours.tolist(), reference.generate(**batch, max_new_tokens=new_tokens, do_sample=False).tolist()

    # a row holds 24 slots: 8 new tokens fit, 30 do not (a cache of its own); a prompt of 2 x 130 tokens is long
    # enough for the client to let the first server push it on in parts (`PUSH_UNANSWERED_TOKENS`)
    long = torch.randint(3, reference.config.vocab_size, (2, 130), generator=torch.Generator().manual_seed(0))
    jobs = [([prompt], 8) for prompt in PROMPTS] + [
        ([PROMPTS[0]], 30),
        (PROMPTS, 8),
        ([" ".join(PROMPTS)], 4),
    ]
    try:
        with ThreadPoolExecutor(len(jobs)) as pool:
            for ours, theirs in pool.map(lambda job: generate(*job), jobs):
                assert ours == theirs
        with remote.inference_session(max_length=134) as session:
            ours, theirs = generate(long, 4)
            assert ours == theirs
            # the second hop's input of every step came from the first server, the prompt's in parts
            assert session.session.pushed_hops == 4 and not remote.swarm.failovers
    finally:
        remote.shutdown()
