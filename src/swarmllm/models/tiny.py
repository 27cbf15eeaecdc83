"""Tiny random Hugging Face checkpoints for tests and the demo, built in-process (no hub access needed).

Each is a real `save_pretrained` directory (config, safetensors weights, optionally sharded, and a small
word-level tokenizer) that transformers' AutoModelForCausalLM and our loaders both read. Random weights:
good for checking that two implementations agree, useless for generating sensible text.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

FAMILIES = ("llama", "llama3", "mistral", "qwen2", "qwen3")
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
WORDS = """
hello world sat ran
the a an and or but if then of to in on at by for with from as is are was were be been it this that
these those i you he she we they me him her us them my your his its our their what which who when where
why how all any some no not yes one two three many more most other such only own same so than too very
can will just do does did have has had say said go went get make made know think see come take want look
use find give tell work call try ask need feel become leave put mean keep let begin seem help show hear
play run move live believe hold bring happen write sit stand lose pay meet cat dog sun moon tree sea
""".split()
MAX_SHARD_SIZE = "100KB"  # a tiny block is ~150 KB in float32, so each block spans several shards


def make_tiny_checkpoint(
    path: str | Path,
    family: str,
    *,
    num_layers: int = 4,
    shard: bool = False,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **overrides,
) -> Path:
    """Save a random model of `family` ("llama", "llama3", "mistral", "qwen2", "qwen3") plus a tokenizer to `path`.

    Every parameter, biases and norm weights included, is drawn at random so that a wrong bias, norm or
    rotary detail changes the output. Mistral gets sliding_window=4 so short test sequences exercise it.
    `overrides` go to the transformers config constructor.
    """
    path = Path(path)
    tokenizer = tiny_tokenizer()
    common = dict(
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    if family == "llama":
        config = LlamaConfig(**{**common, **overrides})
    elif family == "llama3":
        rope = dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            # small, so that head_dim 16 has frequencies in all three llama3 bands (kept, smoothed, divided)
            original_max_position_embeddings=32,
        )
        config = LlamaConfig(**{**common, "rope_parameters": rope, **overrides})
    elif family == "mistral":
        config = MistralConfig(**{**common, "sliding_window": 4, **overrides})
    elif family == "qwen2":
        config = Qwen2Config(**{**common, "tie_word_embeddings": True, **overrides})
    elif family == "qwen3":
        # as Qwen3's own: head_dim apart from hidden_size / heads (here 32, not 16), tied embeddings
        config = Qwen3Config(**{**common, "head_dim": 32, "tie_word_embeddings": True, **overrides})
    else:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
            else:
                param.normal_(0.0, 0.1)
    model.to(dtype).save_pretrained(path, max_shard_size=MAX_SHARD_SIZE if shard else "10GB")
    tokenizer.save_pretrained(path)
    return path


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lower-casing word-level tokenizer over a fixed list of ~160 words, characters and punctuation."""
    vocab_list = [*SPECIAL_TOKENS, *string.ascii_lowercase, *string.digits, *".,!?'-", *WORDS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
