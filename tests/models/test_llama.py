"""Our Llama-family blocks against transformers' own models on tiny random checkpoints, in float32."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from swarmllm.models import (
    BlockConfig,
    BlockSpan,
    ClientHead,
    KVCache,
    LlamaBlock,
    RotaryEmbedding,
    load_client_head,
    load_span,
)
from swarmllm.models.llama import _rotate_decode, attention_mask, position_ids
from swarmllm.models.tiny import FAMILIES

BLOCK_ATOL = 1e-5
LOGITS_ATOL = 1e-4
SEQ_LEN = 10  # longer than mistral's tiny sliding window (4)


@dataclass
class Pair:
    """One tiny checkpoint loaded both ways: transformers' reference model and our client head + span."""

    path: Path
    hf: torch.nn.Module
    head: ClientHead
    span: BlockSpan


def load_pair(path: Path) -> Pair:
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype=torch.float32).eval()
    _, head = load_client_head(path)
    span = load_span(path, 0, hf.config.num_hidden_layers)
    return Pair(path, hf, head, span)


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, checkpoints) -> Pair:
    return load_pair(checkpoints(request.param))


@pytest.fixture(scope="module")
def qwen2_sliding(checkpoints) -> Pair:
    """Qwen2 with sliding attention on layers 2 and 3 only: the per-layer mix real Qwen2 configs allow."""
    return load_pair(checkpoints("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2))


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def random_ids(pair: Pair, batch: int = 2, length: int = SEQ_LEN, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, pair.hf.config.vocab_size, (batch, length), generator=generator)


def hf_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as transformers' generate derives them for left-padded prompts."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 1)


def test_each_block_matches_hf_decoder_layer(pair):
    captured = []
    hooks = [
        layer.register_forward_hook(lambda _, args, out: captured.append((args[0], out)))
        for layer in pair.hf.model.layers
    ]
    try:
        pair.hf(random_ids(pair))
    finally:
        for hook in hooks:
            hook.remove()
    assert len(captured) == pair.hf.config.num_hidden_layers
    for i, (hf_in, hf_out) in enumerate(captured):
        block = load_span(pair.path, i, i + 1)
        torch.testing.assert_close(block(hf_in), hf_out, atol=BLOCK_ATOL, rtol=0)


@pytest.mark.parametrize("split", [None, 1, 3])
def test_split_spans_give_hf_logits_and_greedy_tokens(pair, split):
    ids = random_ids(pair)
    expected = pair.hf(ids).logits
    hidden = pair.head.embed(ids)
    if split is None:
        hidden = pair.span(hidden)
    else:
        n = pair.span.config.num_layers
        hidden = load_span(pair.path, split, n)(load_span(pair.path, 0, split)(hidden))
    logits = pair.head.logits(hidden)
    torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL, rtol=0)
    assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("chunks", [[6, 1, 1, 1, 1], [4, 3, 3], [1] * SEQ_LEN])
def test_cached_decoding_equals_full_forward(pair, chunks):
    ids = random_ids(pair)
    hidden = pair.head.embed(ids)
    full = pair.span(hidden)
    cache = KVCache(pair.span.config.num_layers, 2, SEQ_LEN + 2, pair.span.config, torch.float32, "cpu")
    pos, outputs = 0, []
    for size in chunks:
        outputs.append(pair.span(hidden[:, pos : pos + size], pos=pos, cache=cache))
        pos += size
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, atol=BLOCK_ATOL, rtol=0)
    torch.testing.assert_close(
        pair.head.logits(torch.cat(outputs, dim=1)), pair.hf(ids).logits, atol=LOGITS_ATOL, rtol=0
    )


def decode_steps(span: BlockSpan, hidden, cache, start: int, key_mask=None, static_length=None):
    """Tokens [start, T) of hidden [B, T, H] one at a time through span.decode, the servers' hot path.

    static_length: attend to that many cache slots every step (what a CUDA graph does) instead of exactly
    the slots so far; the key mask then covers them all and masks the future ones."""
    outputs = []
    batch = hidden.shape[0]
    for pos in range(start, hidden.shape[1]):
        length = static_length or pos + 1
        mask = None
        if key_mask is not None or static_length:
            mask = torch.ones(batch, length, dtype=torch.bool)
            if key_mask is not None:
                mask[:, : pos + 1] = key_mask[:, : pos + 1]
        positions = torch.full((batch,), pos) if key_mask is None else hf_positions(key_mask)[:, pos]
        out = span.decode(
            hidden[:, pos],
            positions,
            torch.tensor([pos]),
            cache.keys[:, :, :, :length],
            cache.values[:, :, :, :length],
            mask,
        )
        outputs.append(out[:, None])
    return torch.cat(outputs, dim=1)


@pytest.mark.parametrize("static_length", [None, SEQ_LEN + 6], ids=["exact", "static"])
def test_decode_path_equals_full_forward(pair, static_length):
    """span.decode after a prefill gives forward()'s outputs (mistral's window of 4 < SEQ_LEN is exercised),
    attending to exactly the slots so far or to a fixed number of them with the future masked out."""
    ids = random_ids(pair)
    hidden = pair.head.embed(ids)
    full = pair.span(hidden)
    cache = KVCache(pair.span.config.num_layers, 2, SEQ_LEN + 6, pair.span.config, torch.float32, "cpu")
    cache.keys.fill_(1e4)  # garbage in the unused slots must never leak into attention
    cache.values.fill_(1e4)
    prefill = pair.span(hidden[:, :3], cache=cache)
    decoded = decode_steps(pair.span, hidden, cache, 3, static_length=static_length)
    torch.testing.assert_close(torch.cat([prefill, decoded], dim=1), full, atol=BLOCK_ATOL, rtol=0)


@pytest.mark.parametrize("static_length", [None, SEQ_LEN + 3], ids=["exact", "static"])
def test_decode_path_with_left_padding_matches_hf(pair, static_length):
    ids = random_ids(pair, length=SEQ_LEN)
    key_mask = torch.ones(2, SEQ_LEN, dtype=torch.bool)
    key_mask[1, :4] = False
    ids[1, :4] = pair.hf.config.pad_token_id
    expected = pair.hf(ids, attention_mask=key_mask.long(), position_ids=hf_positions(key_mask)).logits
    cache = KVCache(pair.span.config.num_layers, 2, SEQ_LEN + 3, pair.span.config, torch.float32, "cpu")
    hidden = pair.head.embed(ids)
    prefill = pair.span(hidden[:, :5], key_mask=key_mask[:, :5], cache=cache)
    decoded = decode_steps(pair.span, hidden, cache, 5, key_mask, static_length)
    logits = pair.head.logits(torch.cat([prefill, decoded], dim=1))
    torch.testing.assert_close(logits[key_mask], expected[key_mask], atol=LOGITS_ATOL, rtol=0)
    assert torch.isfinite(logits).all()


def test_left_padded_batch_matches_hf_with_attention_mask(pair):
    ids = random_ids(pair, length=SEQ_LEN + 1)
    short = 6
    key_mask = torch.ones(2, SEQ_LEN + 1, dtype=torch.bool)
    key_mask[1, : SEQ_LEN - short] = False  # row 1 is a 6-token prompt left-padded to SEQ_LEN
    ids[1, : SEQ_LEN - short] = pair.hf.config.pad_token_id
    expected = pair.hf(ids, attention_mask=key_mask.long(), position_ids=hf_positions(key_mask)).logits

    cache = KVCache(pair.span.config.num_layers, 2, SEQ_LEN + 1, pair.span.config, torch.float32, "cpu")
    hidden = pair.head.embed(ids)
    prefill = pair.head.logits(pair.span(hidden[:, :SEQ_LEN], key_mask=key_mask[:, :SEQ_LEN], cache=cache))
    step = pair.head.logits(pair.span(hidden[:, SEQ_LEN:], pos=SEQ_LEN, key_mask=key_mask, cache=cache))
    logits = torch.cat([prefill, step], dim=1)

    real = key_mask
    torch.testing.assert_close(logits[real], expected[real], atol=LOGITS_ATOL, rtol=0)
    assert torch.isfinite(logits).all(), "pad rows must stay finite"
    # the padded prompt must give what the same prompt gives alone, unpadded
    alone = pair.hf(ids[1:, SEQ_LEN - short :]).logits[0]
    torch.testing.assert_close(logits[1, SEQ_LEN - short :], alone, atol=LOGITS_ATOL, rtol=0)


def test_position_ids_count_real_tokens_like_hf_generate():
    key_mask = torch.tensor([[True] * 6, [False, False, False, True, True, True]])
    assert torch.equal(position_ids(key_mask, 2, 6, 0, torch.device("cpu")), hf_positions(key_mask))
    assert position_ids(key_mask, 2, 2, 4, torch.device("cpu")).tolist() == [[4, 5], [1, 2]]
    assert position_ids(None, 2, 2, 4, torch.device("cpu")).tolist() == [[4, 5], [4, 5]]


def test_attention_mask_keeps_pad_rows_finite_and_windows_by_slot():
    key_mask = torch.tensor([[True] * 5, [False, False, True, True, True]])
    mask = attention_mask(key_mask, 5, 0, 2, torch.device("cpu"))  # [2, 1, 5, 5]
    assert mask.shape == (2, 1, 5, 5)
    assert mask[1, 0, :2].tolist() == [[True, False, False, False, False], [False, True, False, False, False]]
    assert mask[1, 0, 2].tolist() == [False, False, True, False, False]  # a real query never sees a pad key
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True]  # window of 2 slots, itself included
    # plain causal needs no mask: SDPA's is_causal is exact
    assert attention_mask(None, 5, 0, 8, torch.device("cpu")) is None
    assert attention_mask(None, 1, 7, None, torch.device("cpu")) is None


def test_block_without_mask_continues_a_cached_prefix_causally(pair):
    """mask=None means causal even for a multi-token step after a cached prefix (SDPA aligns is_causal top-left)."""
    config = pair.span.config
    block: LlamaBlock = pair.span.blocks[0]
    hidden = pair.head.embed(random_ids(pair))
    cos, sin = pair.span.rotary(torch.arange(SEQ_LEN).expand(2, SEQ_LEN), torch.float32)
    full = block(hidden, cos, sin, None, None, 0)
    keys = torch.zeros(2, config.num_kv_heads, SEQ_LEN, config.head_dim)
    cache = (keys, torch.zeros_like(keys))
    first = block(hidden[:, :4], cos[:, :4], sin[:, :4], None, cache, 0)
    rest = block(hidden[:, 4:], cos[:, 4:], sin[:, 4:], None, cache, 4)
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=BLOCK_ATOL, rtol=0)


def test_sub_range_of_a_span_with_its_own_cache(pair):
    """A server holding [0, n) can serve a session that starts at block 1."""
    ids = random_ids(pair)
    hidden = pair.head.embed(ids)
    after_first = pair.span(hidden, blocks=slice(0, 1))
    n = pair.span.config.num_layers
    cache = KVCache(n - 1, 2, SEQ_LEN, pair.span.config, torch.float32, "cpu")
    prefill = pair.span(after_first[:, :-1], cache=cache, blocks=slice(1, n))
    step = pair.span(after_first[:, -1:], pos=SEQ_LEN - 1, cache=cache, blocks=slice(1, n))
    torch.testing.assert_close(torch.cat([prefill, step], dim=1), pair.span(hidden), atol=BLOCK_ATOL, rtol=0)


def test_sliding_window_is_honoured_and_matters(checkpoints):
    """Mistral's window (4) shapes attention over 10 tokens: matching HF here is not a coincidence."""
    pair = load_pair(checkpoints("mistral"))
    assert pair.span.config.sliding_window == pair.hf.config.sliding_window == 4
    hidden = pair.head.embed(random_ids(pair))
    windowless = BlockSpan(replace(pair.span.config, sliding_window=None), 0, pair.span.config.num_layers)
    windowless.load_state_dict(pair.span.state_dict())
    with_window, without = pair.span(hidden), windowless(hidden)
    assert torch.equal(with_window[:, :4], without[:, :4])  # the first 4 tokens fit in the window
    assert not torch.allclose(with_window[:, 4:], without[:, 4:], atol=1e-3)
    ids = random_ids(pair)
    torch.testing.assert_close(
        pair.head.logits(pair.span(pair.head.embed(ids))), pair.hf(ids).logits, atol=LOGITS_ATOL, rtol=0
    )


def test_qwen2_sliding_on_some_layers_only(qwen2_sliding):
    config = qwen2_sliding.span.config
    assert config.sliding_layers == (2, 3) and config.sliding_window == 4
    assert [config.window(i) for i in range(4)] == [None, None, 4, 4]
    ids = random_ids(qwen2_sliding)
    expected = qwen2_sliding.hf(ids).logits
    logits = qwen2_sliding.head.logits(qwen2_sliding.span(qwen2_sliding.head.embed(ids)))
    torch.testing.assert_close(logits, expected, atol=LOGITS_ATOL, rtol=0)
    cache = KVCache(config.num_layers, 2, SEQ_LEN, config, torch.float32, "cpu")
    hidden = qwen2_sliding.head.embed(ids)
    prefill = qwen2_sliding.span(hidden[:, :2], cache=cache)
    decoded = decode_steps(qwen2_sliding.span, hidden, cache, 2)
    torch.testing.assert_close(
        qwen2_sliding.head.logits(torch.cat([prefill, decoded], dim=1)), expected, atol=LOGITS_ATOL, rtol=0
    )


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
        {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64},
    ],
    ids=lambda rope: rope["rope_type"],
)
def test_rotary_embedding_matches_hf(rope):
    hf_config = LlamaConfig(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_parameters=rope,
    )
    positions = torch.arange(0, 256, 7)[None]
    expected = LlamaRotaryEmbedding(hf_config)(torch.zeros(1, dtype=torch.float32), positions)
    rotary = RotaryEmbedding(BlockConfig.from_hf(hf_config))
    ours = rotary(positions, torch.float32)
    for got, want in zip(ours, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # the decode path's sign-folded tables rotate like HF's rotate_half formula
    x = torch.randn(positions.shape[1], 3, 16)  # [B, heads, hd], one token per sequence
    cos, sin = (t[0, :, None] for t in expected)  # [B, 1, hd]
    want = x * cos + torch.cat((-x[..., 8:], x[..., :8]), dim=-1) * sin
    torch.testing.assert_close(_rotate_decode(x, *rotary.for_decode(positions[0], torch.float32)), want)


def test_config_reads_hf_fields(pair):
    hf_config, config = pair.hf.config, pair.span.config
    assert config.family == hf_config.model_type
    assert (config.num_heads, config.num_kv_heads) == (4, 2)
    assert config.head_dim == (32 if config.family == "qwen3" else 16)  # Qwen3's is its own
    assert config.tie_word_embeddings == (config.family in ("qwen2", "qwen3"))
    assert config.attention_bias == (config.family == "qwen2") and not config.attention_out_bias
    assert config.qk_norm == (config.family == "qwen3")
    assert (pair.head.lm_head.weight is pair.head.embed_tokens.weight) == config.tie_word_embeddings


def test_unsupported_models_are_refused():
    with pytest.raises(ValueError, match="model_type"):
        BlockConfig.from_hf(GPT2Config())
    with pytest.raises(ValueError, match="rope_type"):
        BlockConfig.from_hf(
            LlamaConfig(rope_parameters={"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0})
        )


def test_kv_cache_layout_and_budget():
    config = BlockConfig.from_hf(LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    cache = KVCache(3, 2, 32, config, torch.bfloat16, "cpu")
    assert cache.keys.shape == cache.values.shape == (3, 2, 2, 32, 16)
    assert KVCache.bytes_per_token(3, config, torch.bfloat16) == 2 * 3 * 2 * 16 * 2
    assert (
        cache.keys.nbytes + cache.values.nbytes == KVCache.bytes_per_token(3, config, torch.bfloat16) * 2 * 32
    )


def test_span_refuses_inputs_it_cannot_hold(pair):
    config = pair.span.config
    hidden = torch.zeros(2, 4, config.hidden_size)
    cache = KVCache(config.num_layers, 2, 6, config, torch.float32, "cpu")
    with pytest.raises(ValueError, match="cache"):
        pair.span(hidden, pos=4, cache=cache)
    with pytest.raises(ValueError, match="key_mask"):
        pair.span(hidden, key_mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="pos"):
        pair.span(hidden, pos=2)
    with pytest.raises(ValueError, match="inside"):
        BlockSpan(config, 2, config.num_layers + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 1024, 4096])
def test_rms_norm_equals_transformers_to_the_bit(dtype, hidden):
    """Our norm (decode path and forward alike) gives transformers' LlamaRMSNorm to the bit, bf16 included."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from swarmllm.models.llama import _rms_norm

    torch.manual_seed(hidden)
    theirs = LlamaRMSNorm(hidden, eps=1e-5).to(dtype)
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(hidden))
    x = (torch.randn(3, 5, hidden) * 4).to(dtype)
    assert torch.equal(_rms_norm(x, theirs.weight, 1e-5), theirs(x))
