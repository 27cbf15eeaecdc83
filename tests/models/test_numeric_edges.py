"""Numerics at the edges, against transformers on the same tiny checkpoint: positions far from 0 under each RoPE
variant, merged decode rows thousands of positions apart, and hidden states beyond a half-precision codec's range
on the wire (an honest server's reply must not turn into infinities that get it banned)."""

from __future__ import annotations

import pytest
import torch
from in_process import model_over_one_server
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from swarmllm.models import KVCache, load_client_head, load_span
from swarmllm.models.tiny import make_tiny_checkpoint
from swarmllm.server.decode import DecodeRunner, Member
from swarmllm.wire.compression import compress, decompress

MASSIVE_DIM = 5  # the hidden dimension the massive checkpoint blows up
LONG = 2100  # a prompt reaching far past the tiny configs' usual positions and yarn's original context
ROPES = {
    "llama": ("llama", {}),
    "llama3": ("llama3", {}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "linear": ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}}),
    "yarn": (
        "qwen2",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 1024,
            }
        },
    ),
}


@pytest.mark.parametrize("rope", ROPES)
def test_long_positions_and_merged_rows_far_apart_equal_transformers(rope, tmp_path):
    """A prefill of LONG tokens and decode steps past it, merged (as a server's continuous batching merges two
    sessions) with a session decoding near position 0: each row's logits are transformers' on its own sequence."""
    family, overrides = ROPES[rope]
    path = make_tiny_checkpoint(
        tmp_path / rope, family, num_layers=2, max_position_embeddings=4096, **overrides
    )
    local = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    _, head = load_client_head(path)
    span = load_span(path, 0, 2)
    steps, generator = 3, torch.Generator().manual_seed(0)
    sequences = [torch.randint(3, 150, (1, n + steps), generator=generator) for n in (2, LONG)]
    with torch.no_grad():
        want = [local(ids).logits[0] for ids in sequences]
        caches = [KVCache(2, 1, ids.shape[1], span.config, torch.float32, "cpu") for ids in sequences]
        for ids, cache, ref in zip(sequences, caches, want, strict=True):
            prefill = head.logits(span(head.embed(ids[:, :-steps]), cache=cache))[0]
            torch.testing.assert_close(prefill, ref[:-steps], rtol=0, atol=1e-4)
        runner = DecodeRunner(span, torch.device("cpu"))
        for step in range(steps):
            members = []
            for ids, cache in zip(sequences, caches, strict=True):
                slot = ids.shape[1] - steps + step
                mask = torch.ones(1, ids.shape[1], dtype=torch.bool)
                members.append(Member(head.embed(ids[:, slot]), slot, mask, False, cache, None))
            merged, _ = runner.step_many(members, None, None)
            for row, (ids, ref) in enumerate(zip(sequences, want, strict=True)):
                slot = ids.shape[1] - steps + step
                torch.testing.assert_close(head.logits(merged[row]), ref[slot], rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def massive_checkpoint(tmp_path_factory):
    """A 2-block llama whose last block writes values of ~1e5 (beyond float16's 65504) into one dimension of its
    output, which the final norm then ignores (weight 0): like the massive activations of trained LLMs, which
    matter to the model through the norm's denominator only. Greedy tokens are unchanged by any positive scale
    of that dimension, so a codec that keeps it finite keeps transformers' tokens."""
    path = make_tiny_checkpoint(tmp_path_factory.mktemp("massive") / "llama", "llama", num_layers=2)
    weights = path / "model.safetensors"
    state = load_file(weights)
    state["model.layers.1.mlp.down_proj.weight"][MASSIVE_DIM] *= 1e6
    state["model.norm.weight"][MASSIVE_DIM] = 0.0
    save_file(state, weights, metadata={"format": "pt"})
    return path


@pytest.mark.parametrize("codec", ["float16", "bfloat16"])
def test_cast_codecs_saturate_finite_values_beyond_their_range(codec):
    """hivemind's Float16Compression clamps to the codec's range before the cast: a finite float32 value never
    travels as an infinity (which every receiver refuses as non-finite); NaN and inf stay what they were."""
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[codec]
    top = torch.finfo(dtype).max
    f32_max = torch.finfo(torch.float32).max
    x = torch.tensor([[[7e4, -1e5, 3.3999e38, -f32_max, 1.5, -0.0, 1e-30]]])
    got = decompress(*compress(x, codec))
    want = x.clamp(-top, top).to(dtype).float()
    assert torch.isfinite(got).all()
    assert torch.equal(got, want)
    assert torch.equal(decompress(*compress(got, codec)), got)  # resending what was received sends the same
    special = torch.tensor([[[float("inf"), float("-inf"), float("nan"), 2.0]]])
    back = decompress(*compress(special, codec))
    assert back[0, 0, 0] == float("inf") and back[0, 0, 1] == float("-inf") and back[0, 0, 2].isnan()
    # a bfloat16 state (a bfloat16 server's output) sent as float16 saturates too, not at bfloat16's 65536
    assert torch.isfinite(decompress(*compress(x.clamp(-1e5, 1e5).bfloat16(), "float16"))).all()


def test_float16_session_over_massive_activations_keeps_transformers_tokens(massive_checkpoint):
    """A float32 server's output of ~1e5 sent in a float16 session: the reply arrived as inf, the client took
    the honest server for a faulty one, banned it and failed with MissingBlocksError."""
    path = str(massive_checkpoint)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 40, 50, 60, 70]])
    captured = []
    hook = local.model.layers[1].register_forward_hook(lambda _, __, out: captured.append(out))
    with torch.no_grad():
        want = local.generate(ids, max_new_tokens=6, do_sample=False)
    hook.remove()
    assert captured[0].abs().max() > 2 * torch.finfo(torch.float16).max  # the checkpoint does what it should
    with model_over_one_server(path, "numeric-edges-massive") as model, torch.no_grad():
        for codec in ("float16", "bfloat16"):
            with model.inference_session(max_length=32, compression=codec):
                got = model.generate(ids, max_new_tokens=6, do_sample=False)
            assert got.tolist() == want.tolist(), codec
