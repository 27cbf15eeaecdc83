"""The Ladder Residual recurrence exactly as issue 20 states it, over transformers' own sub-layers: the reference
that tests/models/test_ladder.py and tests/server/test_tp.py compare our blocks (local and sharded) with."""

from __future__ import annotations

import torch


def reference_logits(hf, ids: torch.Tensor, ladder_layers: set[int]) -> torch.Tensor:
    """The issue's recurrence over transformers' modules: r the stream, p the pending sub-layer output."""
    model = hf.model
    length = ids.shape[1]
    positions = torch.arange(length)[None]
    rope = model.rotary_emb(model.embed_tokens(ids), position_ids=positions)
    q, kv = torch.arange(length)[:, None], torch.arange(length)[None]
    allowed = kv <= q
    window = getattr(hf.config, "sliding_window", None)
    if window is not None and hf.config.model_type == "mistral":
        allowed &= kv > q - window
    mask = torch.zeros(length, length).masked_fill(~allowed, float("-inf"))[None, None]

    r, p = model.embed_tokens(ids), torch.zeros(())
    for i, layer in enumerate(model.layers):

        def attn(x, layer=layer):
            return layer.self_attn(hidden_states=x, position_embeddings=rope, attention_mask=mask)[0]

        if i in ladder_layers:
            a = attn(layer.input_layernorm(r))
            r = r + p
            p = a
            m = layer.mlp(layer.post_attention_layernorm(r))
            r = r + p
            p = m
        else:
            r = r + p
            p = torch.zeros(())
            r = r + attn(layer.input_layernorm(r))
            r = r + layer.mlp(layer.post_attention_layernorm(r))
    r = r + p
    return hf.lm_head(model.norm(r))
