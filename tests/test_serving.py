"""End to end through server processes: quantized servers, int8 and nf4 (announced, computing what
`models.quant` computes), sessions whose activations travel compressed, and speculative decoding whose rejected
drafts the servers' caches forget."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.dht import find_servers
from swarmllm.local import LocalSwarm
from swarmllm.models import load_client_head, load_span
from swarmllm.models.panels import host_isa
from swarmllm.wire.compression import CODECS

pytest.importorskip("bitsandbytes")

PROMPT = torch.tensor([[1, 17, 42, 99, 5, 23, 8]])
# per-token relative L2 distance of logits from an uncompressed session's, through 2 servers (3 crossings)
WIDE = dict(
    hidden_size=1024, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, num_layers=2
)
MAX_LOGIT_ERROR = {"none": 0.0, "float16": 2e-3, "bfloat16": 1e-2, "blockwise8": 5e-2}


def two_servers(path, first_flags: list[str]):
    """A client of blocks [0, 2) (on a server started with `first_flags`) and [2, 4)."""
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_server(str(path), (0, 2), extra=first_flags)
        local.add_server(str(path), (2, 4))
        model = AutoDistributedModelForCausalLM.from_pretrained(str(path), initial_peers=local.initial_peers)
        yield model
        model.shutdown()


@pytest.fixture(scope="module")
def swarm(llama_checkpoint):
    yield from two_servers(llama_checkpoint, ["--quant", "int8"])


@pytest.fixture(scope="module")
def nf4_swarm(llama_checkpoint):
    yield from two_servers(llama_checkpoint, ["--quant", "nf4"])


@pytest.fixture(scope="module")
def plain_swarm(llama_checkpoint):
    """Two full-precision servers: a codec's error alone (an int8 server on a CPU without our panel kernel rounds
    its inputs to bfloat16, which would add its own). The first admits 5 sessions of a peer."""
    yield from two_servers(llama_checkpoint, ["--max-sessions-per-peer", "5"])


def test_servers_announce_the_sessions_they_admit_from_one_peer(plain_swarm):
    """What a client queues its own sessions by (`client.room.SessionPlaces`): the flag's value, or the default."""
    servers = run_sync(find_servers(plain_swarm.swarm.dht, plain_swarm.swarm.dht_prefix, 4))
    assert {(s.start_block, s.max_sessions_per_peer) for s in servers} == {(0, 5), (2, 16)}


def rel_l2(a, b):
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max())


def check_quantized_server(model, path, mode: str, tolerance: float) -> None:
    """The first server announces `mode` and computes what `load_span(quant=mode)` computes, within `mode`'s
    stated tolerance of float32 (tests/models/test_quant.py)."""
    servers = run_sync(find_servers(model.swarm.dht, model.swarm.dht_prefix, 4))
    assert {(s.start_block, s.quantization) for s in servers} == {(0, mode), (2, "none")}
    _, head = load_client_head(path)
    with torch.no_grad():
        hidden = load_span(path, 0, 2, quant=mode)(head.embed(PROMPT))
        want = head.logits(load_span(path, 2, 4)(hidden))
        got = model(PROMPT).logits
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)(PROMPT).logits
    assert 1e-4 < rel_l2(got, full) < tolerance


def test_a_quantized_server_announces_it_and_computes_quantized_blocks(swarm, llama_checkpoint):
    check_quantized_server(swarm, llama_checkpoint, "int8", 0.08)


def test_an_nf4_server_computes_its_quantized_blocks(nf4_swarm, llama_checkpoint):
    """On a CPU through our panel kernel where it runs (else bitsandbytes' CPU kernels)."""
    check_quantized_server(nf4_swarm, llama_checkpoint, "nf4", 0.9)


def test_compressed_sessions_stay_within_their_codec_error(plain_swarm):
    logits = {}
    for codec in CODECS:
        with plain_swarm.inference_session(max_length=32, compression=codec) as session:
            with torch.no_grad():
                logits[codec] = plain_swarm(PROMPT).logits
                step = plain_swarm(torch.cat([PROMPT, torch.tensor([[9]])], dim=1)).logits  # a decode step
            assert step.shape[1] == 1 and session.session.compression == codec
    for codec in CODECS:
        assert rel_l2(logits[codec], logits["none"]) <= MAX_LOGIT_ERROR[codec], codec
    assert rel_l2(logits["blockwise8"], logits["none"]) > 0  # it really went compressed


def test_speculative_decoding_through_the_swarm(swarm, llama_checkpoint):
    draft = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05 * param.std())
    want = swarm.generate(PROMPT, max_new_tokens=16, do_sample=False)
    got = swarm.generate(
        PROMPT, max_new_tokens=16, do_sample=False, assistant_model=draft, num_assistant_tokens=3
    )
    assert got.tolist() == want.tolist()
    stats = swarm.last_speculation
    assert 0 < stats.accepted < stats.drafted and stats.rounds < 16  # servers rewound past rejected drafts
    sampled = swarm.generate(
        PROMPT, max_new_tokens=10, do_sample=True, temperature=0.8, assistant_model=draft, generator=generator
    )
    assert sampled.shape == (1, PROMPT.shape[1] + 10) and torch.equal(sampled[:, : PROMPT.shape[1]], PROMPT)


def test_prompt_lookup_decoding_through_the_swarm(plain_swarm, llama_checkpoint):
    """`generate(prompt_lookup_num_tokens=K)`: drafts copied from the sequence (no draft model), checked by the
    swarm several at a time: transformers' greedy tokens (its own prompt lookup gives them too) in fewer
    rounds than tokens, drafts rejected on the way (the servers' caches rewound); sampled, a seeded run
    repeats."""
    reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    prompt = torch.cat([PROMPT, PROMPT[:, 1:]], dim=1)  # a text that repeats itself
    want = reference.generate(prompt, max_new_tokens=20, do_sample=False)
    assert reference.generate(
        prompt, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4
    ).tolist() == (want.tolist())
    got = plain_swarm.generate(prompt, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4)
    assert got.tolist() == want.tolist()
    stats = plain_swarm.last_speculation
    assert 0 < stats.accepted < stats.drafted and stats.rounds < 20
    constant = dict(prompt_lookup_num_tokens=2, num_assistant_tokens_schedule="constant")
    assert (
        plain_swarm.generate(prompt, max_new_tokens=20, do_sample=False, **constant).tolist() == want.tolist()
    )
    assert plain_swarm.last_speculation.drafted <= 2 * plain_swarm.last_speculation.rounds  # K stayed 2
    sampled = [
        plain_swarm.generate(
            prompt,
            max_new_tokens=10,
            do_sample=True,
            temperature=0.8,
            prompt_lookup_num_tokens=3,
            max_matching_ngram_size=1,
            generator=torch.Generator().manual_seed(5),
        ).tolist()
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1] and len(sampled[0][0]) == prompt.shape[1] + 10
    with pytest.raises(ValueError, match="not both"):
        plain_swarm.generate(prompt, max_new_tokens=4, assistant_model=reference, prompt_lookup_num_tokens=3)


def test_servers_with_panel_weights_generate_transformers_tokens(checkpoints):
    """A server whose projections are stored as panels for our CPU kernel (the float32 default at hidden size 1024)
    and one with --no-packed-weights: one session and concurrent ones (merged steps) give transformers' greedy
    tokens."""
    from concurrent.futures import ThreadPoolExecutor

    from swarmllm.client.loop import run_sync
    from swarmllm.wire import Message

    path = str(checkpoints("qwen2", **WIDE))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [PROMPT, PROMPT[:, :4], PROMPT.flip(1)]
    with LocalSwarm() as local, torch.no_grad():
        local.start_bootstrap()
        local.add_server(path, (0, 1))
        local.add_server(path, (1, 2), extra=["--no-packed-weights"])
        model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=local.initial_peers)

        def layouts() -> dict[int, str]:
            async def ask():
                servers = await model.swarm.servers(refresh=True)
                records = [
                    (await (await model.swarm.connection(s.peer_id)).call("info", Message({}))).meta
                    for s in servers
                ]
                return {r["start_block"]: r["weights_layout"] for r in records}

            return run_sync(ask())

        try:
            assert layouts() == {0: f"panels ({host_isa()})", 1: "plain"}  # the host's widest build
            want = [reference.generate(p, max_new_tokens=40, do_sample=False).tolist() for p in prompts]
            assert model.generate(prompts[0], max_new_tokens=40, do_sample=False).tolist() == want[0]
            with ThreadPoolExecutor(len(prompts)) as pool:
                got = list(
                    pool.map(
                        lambda p: model.generate(p, max_new_tokens=40, do_sample=False).tolist(), prompts
                    )
                )
            assert got == want
        finally:
            model.shutdown()
