"""Llama-family decoder blocks: Llama 2/3.x, Mistral, Qwen2/2.5 and Qwen3 (dense), written to match
transformers' numerics.

Owns the block math: the config, rotary embedding, attention over an explicit KV cache, the span of blocks a
server runs, and the embeddings + final norm + LM head a client holds. It knows nothing about files
(checkpoint.py loads weights), sessions, memory budgets or the network.

Parameter names mirror Hugging Face's decoder layer (`self_attn.o_proj`, `input_layernorm`, ...), except that
q/k/v and gate/up are stacked into one matmul each (`qkv_proj`, `gate_up_proj`): a checkpoint's
`model.layers.{i}.*` tensors load into `BlockSpan.blocks[i - start]` through `block_state_from_hf`.

Every linear layer of a block is a `Projection`: the one entry point that the full forward, the lean decode path
and CUDA graph capture all go through, so a request's LoRA adapter (`Lora`, per block a `BlockLora`) hooks in
there once. Per-request trainable inputs (deep prompts, adapters) are arguments of `BlockSpan.forward` and
`BlockSpan.decode`, never state of the modules: one span serves many clients at once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from swarmllm.models.ladder import (
    LOCAL,
    Comm,
    carries_pending,
    ladder_decode,
    ladder_decode_batch,
    ladder_forward,
    standard_decode,
    standard_forward,
)

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# transformers recomputes these frequencies from the sequence length at run time; we only do static RoPE.
_DYNAMIC_ROPE_TYPES = ("dynamic", "longrope")


@dataclass(frozen=True)
class BlockConfig:
    """Shapes and options of one Llama-family model, as plain data (comparable, easy to send or log)."""

    family: str  # Hugging Face model_type: "llama" | "mistral" | "qwen2" | "qwen3"
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    vocab_size: int
    # q/k/v bias and o_proj bias: Llama's attention_bias sets both, Qwen2 has q/k/v bias only
    attention_bias: bool = False
    attention_out_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: each head's q and k RMS-normalised (weights [head_dim]) before rotary
    sliding_window: int | None = None  # tokens a query sees, itself included; None = full causal attention
    sliding_layers: tuple[int, ...] | None = None  # layers using the window (Qwen2 mixes); None = all
    tie_word_embeddings: bool = False
    rope_parameters: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 4096  # read by scaled RoPE variants (yarn) only
    ladder_layers: tuple[int, ...] = ()  # Ladder Residual layers (models/ladder.py); () = the standard model

    @classmethod
    def from_hf(cls, hf_config) -> BlockConfig:
        """Read a transformers config; raises ValueError for anything this module would compute differently."""
        family = hf_config.model_type
        if family not in FAMILIES:
            raise ValueError(f"unsupported model_type {family!r}; supported: {', '.join(FAMILIES)}")
        if hf_config.hidden_act not in ("silu", "swish"):  # transformers' names for one function
            raise ValueError(f"unsupported hidden_act {hf_config.hidden_act!r}; only 'silu' is implemented")
        if (quantized := getattr(hf_config, "quantization_config", None)) is not None:
            method = quantized.get("quant_method") if isinstance(quantized, dict) else quantized
            raise ValueError(
                f"pre-quantized checkpoints ({method}) are not supported: serve the full-precision checkpoint, "
                "with --quant int8 or nf4 to quantize it on load"
            )
        rope = dict(hf_config.rope_parameters)
        rope_type = rope.get("rope_type", "default")
        if rope_type in _DYNAMIC_ROPE_TYPES or (
            rope_type != "default" and rope_type not in ROPE_INIT_FUNCTIONS
        ):
            raise ValueError(f"unsupported rope_type {rope_type!r}")
        if rope_type in ("llama3", "yarn") and getattr(hf_config, "original_max_position_embeddings", None):
            # transformers' RoPE init lets a top-level value (Phi-3 style exports) override the nested one
            rope["original_max_position_embeddings"] = hf_config.original_max_position_embeddings
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError("partial rotary embeddings are not supported")
        # transformers' Llama reads no window, though converted configs may carry one (Mistral's)
        sliding_window = None if family == "llama" else getattr(hf_config, "sliding_window", None)
        sliding_layers = None
        if family in ("qwen2", "qwen3") and sliding_window is not None:
            sliding_layers = tuple(
                i for i, kind in enumerate(hf_config.layer_types) if kind == "sliding_attention"
            )
        # the families whose transformers modules read attention_bias / mlp_bias (the others hard-code theirs)
        bias = family in ("llama", "qwen3") and bool(getattr(hf_config, "attention_bias", False))
        ladder_layers = tuple(getattr(hf_config, "ladder_layers", None) or ())
        if list(ladder_layers) != sorted(set(ladder_layers)) or not all(
            isinstance(i, int) and 0 <= i < hf_config.num_hidden_layers for i in ladder_layers
        ):
            raise ValueError(
                f"ladder_layers must be sorted distinct layer indices in [0, {hf_config.num_hidden_layers}), "
                f"got {list(ladder_layers)}"
            )
        return cls(
            family=family,
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=hf_config.num_key_value_heads or hf_config.num_attention_heads,
            head_dim=getattr(hf_config, "head_dim", None)
            or hf_config.hidden_size // hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            rms_norm_eps=hf_config.rms_norm_eps,
            vocab_size=hf_config.vocab_size,
            attention_bias=bias or family == "qwen2",
            attention_out_bias=bias,
            mlp_bias=family == "llama" and bool(getattr(hf_config, "mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            rope_parameters=rope,
            max_position_embeddings=hf_config.max_position_embeddings,
            ladder_layers=ladder_layers,
        )

    def window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (absolute index), or None when it attends to the whole prefix."""
        if self.sliding_layers is not None and layer not in self.sliding_layers:
            return None
        return self.sliding_window

    def carries_pending(self, boundary: int) -> bool:
        """Whether the state crossing the boundary before layer `boundary` is the pair (r, p) rather than r alone
        (`models.ladder.carries_pending`)."""
        return carries_pending(self.ladder_layers, boundary)


class KVCache:
    """Preallocated keys/values for one session over a span of blocks."""

    def __init__(
        self,
        num_blocks: int,
        batch_size: int,
        max_length: int,
        config: BlockConfig,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (num_blocks, batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def over(cls, keys: Tensor, values: Tensor) -> KVCache:
        """A cache over existing tensors [n, B, kv, S, hd]: a session's rows of a server's shared cache arena."""
        cache = cls.__new__(cls)
        cache.keys, cache.values = keys, values
        return cache

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    def reorder(self, rows: Tensor, length: int) -> None:
        """Row i of slots [0, length) becomes what row rows[i] held (beam search keeps some beams, some twice),
        in place: a CUDA graph or compiled step over this cache still reads the same memory."""
        for t in (self.keys, self.values):
            t[:, :, :, :length] = t[:, rows, :, :length]

    @staticmethod
    def bytes_per_token(num_blocks: int, config: BlockConfig, dtype: torch.dtype) -> int:
        """Cache bytes one token of one sequence costs over `num_blocks` blocks, for memory budgeting."""
        return 2 * num_blocks * config.num_kv_heads * config.head_dim * dtype.itemsize


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return _rms_norm(x, self.weight, self.eps)


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    # Normalise in float32 and scale after casting back, exactly as transformers does, so bf16 matches too.
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embedding; scaled variants (linear, llama3, yarn) use transformers' init."""

    def __init__(self, config: BlockConfig, device: torch.device | str | None = None):
        super().__init__()
        rope_type = config.rope_parameters.get("rope_type", "default")
        # An explicit device (CPU by default) keeps the frequencies real when a span is built on the meta device.
        with torch.device(device or "cpu"):
            if rope_type == "default":
                exponents = torch.arange(0, config.head_dim, 2, dtype=torch.float) / config.head_dim
                inv_freq, self.attention_scaling = (
                    1.0 / (config.rope_parameters["rope_theta"] ** exponents),
                    1.0,
                )
            else:
                inv_freq, self.attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](_rope_hf_config(config))
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)  # [head_dim / 2]

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float()  # [B, T, head_dim / 2]
        angles = torch.cat((freqs, freqs), dim=-1)  # [B, T, head_dim]
        return (angles.cos() * self.attention_scaling).to(dtype), (angles.sin() * self.attention_scaling).to(
            dtype
        )

    def for_decode(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos [B, 1, hd] and sign-folded sin for one token per sequence at `positions` [B]: with these,
        RoPE is `x * cos + x.roll(hd / 2, -1) * sin` (see `_rotate_decode`)."""
        freqs = positions[:, None].float() * self.inv_freq  # [B, hd / 2]
        cos = torch.cat((freqs, freqs), dim=-1).cos() * self.attention_scaling
        sin = freqs.sin() * self.attention_scaling
        return cos.to(dtype)[:, None], torch.cat((-sin, sin), dim=-1).to(dtype)[:, None]


def _rope_hf_config(config: BlockConfig) -> LlamaConfig:
    """The fields transformers' RoPE init functions read, in the config object they expect."""
    return LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters=dict(config.rope_parameters),
    )


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Apply RoPE to x [B, heads, T, head_dim] with cos/sin [B, T, head_dim] (half-split layout, as in HF)."""
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def _rotate_decode(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """`_rotate` for x [B, heads, hd] with RotaryEmbedding.for_decode's tables: roll(x) * [-sin, sin] equals
    cat(-x2, x1) * [sin, sin]. Two products and a sum, each rounded as `_rotate` (and transformers) round them:
    a fused `addcmul` rounds once, which in half precision made a decode step differ from a forward."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


def attention_mask(
    key_mask: Tensor | None, length: int, pos: int, window: int | None, device: torch.device
) -> Tensor | None:
    """Bool [B or 1, 1, T, pos+T], True = may attend; None when SDPA's own causal handling is exact.

    Indices are cache slots, so a sliding window counts left pads like transformers does. Every query may
    attend to its own slot, which keeps pad rows finite (a fully masked row would softmax to NaN).
    """
    total = pos + length
    if key_mask is None and (window is None or total <= window) and (pos == 0 or length == 1):
        return None
    q = torch.arange(pos, total, device=device)[:, None]  # [T, 1]
    kv = torch.arange(total, device=device)[None, :]  # [1, pos+T]
    allowed = kv <= q
    if window is not None:
        allowed = allowed & (kv > q - window)
    allowed = allowed[None]  # [1, T, pos+T]
    if key_mask is not None:
        allowed = (allowed & key_mask[:, None, :]) | (kv == q)  # [B, T, pos+T]
    return allowed[:, None]


def position_ids(
    key_mask: Tensor | None, batch_size: int, length: int, pos: int, device: torch.device
) -> Tensor:
    """[B, T] positions of the new tokens: counted over real tokens only, like transformers' generate with left pads."""
    if key_mask is None:
        return torch.arange(pos, pos + length, device=device).expand(batch_size, length)
    ids = key_mask.long().cumsum(-1) - 1
    return ids.masked_fill(~key_mask, 1)[:, pos:]


@dataclass(frozen=True)
class Lora:
    """A low-rank update of one projection for one request: y += up @ (down @ dropout(x)).

    A stacked projection (q/k/v, gate/up) gets one `Lora` for all its adapted parts: `down` stacks their A
    matrices [R, in] (R = the sum of their ranks), `up` [out, R] holds each part's B, times its scale, at the
    part's output rows and zeros elsewhere. Dropout (training only) draws from `generator`, so that a server
    recomputing a forward for its backward draws the same masks; one mask per part, as PEFT does.
    """

    down: Tensor
    up: Tensor
    ranks: tuple[int, ...]
    dropout: float = 0.0
    generator: torch.Generator | None = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.generator is None or self.dropout == 0.0:
            return F.linear(F.linear(x, self.down), self.up)
        keep = 1.0 - self.dropout
        parts = [
            F.linear(x * (torch.rand(x.shape, generator=self.generator, device=x.device) < keep) / keep, a)
            for a in self.down.split(self.ranks)
        ]
        return F.linear(torch.cat(parts, dim=-1), self.up)


@dataclass(frozen=True)
class BlockLora:
    """One block's adapter, by projection (None: that projection is not adapted)."""

    qkv_proj: Lora | RowLoras | None = None
    o_proj: Lora | RowLoras | None = None
    gate_up_proj: Lora | RowLoras | None = None
    down_proj: Lora | RowLoras | None = None


NO_LORA = BlockLora()


@dataclass(frozen=True)
class RowLoras:
    """Several requests' adapters of one projection in a batch that merges them: each applies to its own rows
    (`parts`: (rows, Lora) pairs; rows of no part are not adapted). Projection applies it as it does a `Lora`."""

    parts: tuple[tuple[slice, Lora], ...]

    def __call__(self, x: Tensor) -> Tensor:
        out = x.new_zeros(*x.shape[:-1], self.parts[0][1].up.shape[0])
        for rows, lora in self.parts:
            out[rows] = lora(x[rows])
        return out


def batch_lora(loras: Sequence[BlockLora | None], rows: Sequence[slice]) -> BlockLora:
    """One block's adapters of the requests of a merged batch (request i owns `rows[i]`) as one BlockLora."""
    fields = {}
    for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
        parts = tuple(
            (r, getattr(lora, name))
            for r, lora in zip(rows, loras, strict=True)
            if lora is not None and getattr(lora, name) is not None
        )
        fields[name] = RowLoras(parts) if parts else None
    return BlockLora(**fields)


@dataclass(frozen=True)
class DecodeSegment:
    """One session's part of a batched decode step (`BlockSpan.decode_batch`): its rows of the batch, the cache
    slot its tokens take, the attended slots of its cache, its key mask and its adapter (as `BlockSpan.decode`
    takes them for one session).

    A segment of `tokens` > 1 is a chunk of a prefill merged into the step: its rows are B x tokens, in [B, T]
    order, and its tokens take the last `tokens` of the S slots given (S = the chunk's end); `slot` is unused and
    key_mask [B, S] or None (no pads), as `BlockSpan.forward` takes them."""

    rows: slice
    slot: Tensor  # [1] long
    keys: Tensor  # [n, B, kv, S, hd]
    values: Tensor
    key_mask: Tensor | None = None  # [B, S]; None: S == slot + 1 and no pads
    lora: Sequence[BlockLora] | None = None
    tokens: int = 1


class Projection(nn.Linear):
    """A block's linear layer, and the one place where a request's adapter changes it."""

    def forward(self, x: Tensor, lora: Lora | RowLoras | None = None) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        return y if lora is None else y + lora(x)


class Attention(nn.Module):
    def __init__(self, config: BlockConfig):
        super().__init__()
        self.head_dim, self.num_heads, self.num_kv_heads = (
            config.head_dim,
            config.num_heads,
            config.num_kv_heads,
        )
        q_size, kv_size = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.sizes = [q_size, kv_size, kv_size]
        # q, k and v projections as one matmul (HF's q_proj, k_proj, v_proj stacked; see block_state_from_hf)
        self.qkv_proj = Projection(config.hidden_size, q_size + 2 * kv_size, bias=config.attention_bias)
        self.o_proj = Projection(q_size, config.hidden_size, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: tuple[Tensor, Tensor] | None,
        pos: int,
        lora: BlockLora = NO_LORA,
    ) -> Tensor:
        batch, length, _ = x.shape
        q, k, v = (
            t.view(batch, length, -1, self.head_dim).transpose(1, 2)
            for t in self.qkv_proj(x, lora.qkv_proj).split(self.sizes, -1)
        )  # q [B, heads, T, hd], k and v [B, kv_heads, T, hd]
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        if cache is not None:
            keys, values = cache
            keys[:, :, pos : pos + length] = k
            values[:, :, pos : pos + length] = v
            k, v = keys[:, :, : pos + length], values[:, :, : pos + length]  # [B, kv_heads, pos+T, hd]
            if mask is None and length > 1 and pos > 0:
                # SDPA's is_causal aligns to the top-left corner, which is wrong once the cache holds a prefix.
                mask = attention_mask(None, length, pos, None, x.device)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and length > 1, enable_gqa=True
        )  # [B, heads, T, hd]
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, -1), lora.o_proj)

    def decode(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        slot: Tensor,
        keys: Tensor,
        values: Tensor,
        mask: Tensor | None,
        lora: BlockLora = NO_LORA,
    ) -> Tensor:
        """One token per sequence: x [B, H]; writes cache slot `slot` ([1] long) of keys/values [B, kv, S, hd]
        and attends to their S slots (all of them when mask is None)."""
        qkv, qk = self._qkv_decode(x, cos, sin, lora)
        y = self._attend_cache(qkv, qk, slot, keys, values, mask)
        return self.o_proj.forward(y, lora.o_proj)

    def decode_batch(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        segments: Sequence[DecodeSegment],
        block: int,
        masks: Sequence[Tensor | None],
        lora: BlockLora,
    ) -> Tensor:
        """`decode` for several sessions at once: the projections run over all rows of x [N, H] in one matmul
        each (the weights are read once), attention per session over its own cache (block `block` of each
        segment's keys/values, with its mask of `masks`)."""
        qkv, qk = self._qkv_decode(x, cos, sin, lora)
        y = torch.cat(
            [
                self._attend_cache(qkv[s.rows], qk[s.rows], s.slot, s.keys[block], s.values[block], mask)
                if s.tokens == 1
                else self._attend_chunk(
                    qkv[s.rows], qk[s.rows], s.tokens, s.keys[block], s.values[block], mask
                )
                for s, mask in zip(segments, masks, strict=True)
            ]
        )
        return self.o_proj.forward(y, lora.o_proj)

    def _qkv_decode(self, x: Tensor, cos: Tensor, sin: Tensor, lora: BlockLora) -> tuple[Tensor, Tensor]:
        """q/k/v of one token per row [B, heads + 2 kv, hd], and q and k rotated (they rotate as one)."""
        qkv = self.qkv_proj.forward(x, lora.qkv_proj).view(x.shape[0], -1, self.head_dim)
        qk = qkv[:, : self.num_heads + self.num_kv_heads]
        if self.qk_norm:
            heads = self.num_heads
            qk = torch.cat([self.q_norm(qk[:, :heads]), self.k_norm(qk[:, heads:])], dim=1)
        return qkv, _rotate_decode(qk, cos, sin)

    def _attend_cache(
        self, qkv: Tensor, qk: Tensor, slot: Tensor, keys: Tensor, values: Tensor, mask: Tensor | None
    ) -> Tensor:
        """Write the rows' k/v into cache slot `slot` of keys/values [B, kv, S, hd] (slot [1]: one for all rows;
        [B]: each row's own); their attention [B, q]."""
        heads = self.num_heads
        k, v = qk[:, heads:, None], qkv[:, heads + self.num_kv_heads :, None]
        if slot.numel() == 1:
            keys.index_copy_(2, slot, k)
            values.index_copy_(2, slot, v)
        else:
            index = slot.view(-1, 1, 1, 1).expand_as(k)
            keys.scatter_(2, index, k)
            values.scatter_(2, index, v)
        y = F.scaled_dot_product_attention(
            qk[:, :heads, None], keys, values, attn_mask=mask, enable_gqa=True
        )  # [B, heads, 1, hd]
        return y.view(qk.shape[0], -1)

    def _attend_chunk(
        self, qkv: Tensor, qk: Tensor, tokens: int, keys: Tensor, values: Tensor, mask: Tensor | None
    ) -> Tensor:
        """A chunk of `tokens` tokens per sequence (rows [B x T] in [B, T] order): write its k/v into the last T
        slots of keys/values [B, kv, S, hd] and attend causally to all S, with `forward`'s call; [B x T, q]."""
        heads, kv = self.num_heads, self.num_kv_heads
        batch, start = qk.shape[0] // tokens, keys.shape[2] - tokens
        q = qk[:, :heads].view(batch, tokens, heads, self.head_dim).transpose(1, 2)
        keys[:, :, start:] = qk[:, heads:].view(batch, tokens, kv, self.head_dim).transpose(1, 2)
        values[:, :, start:] = qkv[:, heads + kv :].view(batch, tokens, kv, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=mask, is_causal=mask is None, enable_gqa=True
        )  # [B, heads, T, hd]
        return y.transpose(1, 2).reshape(batch * tokens, -1)


class MLP(nn.Module):
    def __init__(self, config: BlockConfig):
        super().__init__()
        # HF's gate_proj and up_proj stacked, one matmul
        self.gate_up_proj = Projection(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = Projection(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)

    def forward(self, x: Tensor, lora: BlockLora = NO_LORA) -> Tensor:
        gate, up = self.gate_up_proj.forward(x, lora.gate_up_proj).chunk(2, dim=-1)
        return self.down_proj.forward(F.silu(gate) * up, lora.down_proj)


# Tensors of a Hugging Face decoder layer that LlamaBlock keeps stacked: ours -> HF's parts, in order.
FUSED_PARAMETERS = {
    "self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
}


def block_state_from_hf(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A HF decoder layer's tensors (names relative to the layer) as a LlamaBlock state dict: the fused
    projections' weights (and biases) are their parts concatenated along the output dimension."""
    state = dict(state)
    for fused, parts in FUSED_PARAMETERS.items():
        for kind in ("weight", "bias"):
            names = [f"{part}.{kind}" for part in parts]
            if names[0] in state:
                state[f"{fused}.{kind}"] = torch.cat([state.pop(name) for name in names])
    return state


class LlamaBlock(nn.Module):
    """One decoder layer.

    `cache` is this block's (keys, values) [B, kv_heads, max_length, hd]: the new keys/values go to slots
    [pos, pos+T) and attention reads slots [0, pos+T). `mask` is bool [B, 1, T, pos+T] (True = may attend);
    None means plain causal attention.
    """

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        cache: tuple[Tensor, Tensor] | None,
        pos: int,
        lora: BlockLora = NO_LORA,
    ) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, pos, lora)
        return h + self.mlp(self.post_attention_layernorm(h), lora)

    def decode(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        slot: Tensor,
        keys: Tensor,
        values: Tensor,
        mask: Tensor | None,
        lora: BlockLora = NO_LORA,
    ) -> Tensor:
        """`forward` for one token per sequence, x [B, H], with module calls and reshapes cut to the minimum:
        a decode step is a few dozen small ops, so their fixed costs are most of its time on a CPU."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h = x + self.self_attn.decode(
            _rms_norm(x, norm1.weight, norm1.eps), cos, sin, slot, keys, values, mask, lora
        )
        return h + self.mlp.forward(_rms_norm(h, norm2.weight, norm2.eps), lora)

    def decode_batch(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        segments: Sequence[DecodeSegment],
        block: int,
        masks: Sequence[Tensor | None],
        lora: BlockLora,
    ) -> Tensor:
        """`decode` for several sessions' rows at once (see `Attention.decode_batch`)."""
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        h = x + self.self_attn.decode_batch(
            _rms_norm(x, norm1.weight, norm1.eps), cos, sin, segments, block, masks, lora
        )
        return h + self.mlp.forward(_rms_norm(h, norm2.weight, norm2.eps), lora)


def add_prompt(hidden: Tensor, prompt: Tensor) -> Tensor:
    """hidden [B, T, H] with prompt [B or 1, P, H] (P <= T) added to its first P positions, out of place (so
    that autograd reaches both)."""
    length = prompt.shape[1]
    return torch.cat([hidden[:, :length] + prompt.to(hidden.dtype), hidden[:, length:]], dim=1)


class BlockSpan(nn.Module):
    """Blocks [start, end) of a model plus their rotary embedding: what a server runs.

    The state entering and leaving a span is the residual stream r, plus the pending sub-layer output p where
    the boundary lies inside a ladder region (`BlockConfig.carries_pending`; never in a standard model).
    `forward` / `decode` take and return r alone and are what a standard model uses; `forward_pair` /
    `decode_pair` take and return (r, p). `comm` sums sub-layer outputs over tensor-parallel ranks once
    models/tp.py has sharded the span; by default there is nothing to sum.
    """

    def __init__(self, config: BlockConfig, start: int, end: int):
        super().__init__()
        if not 0 <= start < end <= config.num_layers:
            raise ValueError(f"span [{start}, {end}) is not inside the model's {config.num_layers} blocks")
        self.config, self.start, self.end = config, start, end
        self.rotary = RotaryEmbedding(config)
        self.blocks = nn.ModuleList(LlamaBlock(config) for _ in range(start, end))
        self.ladder = [i in config.ladder_layers for i in range(start, end)]  # per block: a ladder layer?
        self.comm: Comm = LOCAL

    def forward(
        self,
        hidden: Tensor,
        *,
        pos: int = 0,
        key_mask: Tensor | None = None,
        cache: KVCache | None = None,
        blocks: slice | None = None,
        prompts: Tensor | None = None,
        lora: Sequence[BlockLora] | None = None,
    ) -> Tensor:
        """Run hidden [B, T, H] at cache slots [pos, pos+T) through the span, or through its sub-range `blocks`.

        key_mask: bool [B, pos+T], False at (left) pad slots, like transformers' attention_mask.
        cache: one entry per block run; the caller owns it and advances `pos` between calls.
        prompts: [n, B or 1, P, H], one per block run, added to the first P positions of the hidden states
        before that block (deep prompt tuning). lora: one `BlockLora` per block run.
        Neither edge may lie inside a ladder region (use forward_pair there).
        """
        indices = self._indices(blocks, pair=False)
        return self.forward_pair(
            hidden, None, pos=pos, key_mask=key_mask, cache=cache, blocks=indices, prompts=prompts, lora=lora
        )[0]

    def forward_pair(
        self,
        r: Tensor,
        p: Tensor | None,
        *,
        pos: int = 0,
        key_mask: Tensor | None = None,
        cache: KVCache | None = None,
        blocks: slice | range | None = None,
        prompts: Tensor | None = None,
        lora: Sequence[BlockLora] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """`forward` for the pair (r, p): r [B, T, H] the residual stream, p [B, T, H] the pending output of the
        sub-layer before the span, None where the first layer's boundary carries r alone. Returns (r, p), with p
        None where the boundary after the last layer carries r alone (the span then has settled r = r + p). Deep
        prompts are added to r (p joins it later: the sum is the same); prompts and lora as in `forward`."""
        batch, length, _ = r.shape
        indices = self._indices(blocks, pair=True)
        self._check_pending(indices, p)
        if cache is None and pos != 0:
            raise ValueError("without a cache there is no prefix to continue from: pos must be 0")
        if cache is not None and (
            cache.keys.shape[:2] != (len(indices), batch) or pos + length > cache.max_length
        ):
            raise ValueError(
                f"cache of {cache.keys.shape[0]} blocks x {cache.keys.shape[1]} sequences x {cache.max_length} "
                f"slots cannot hold {len(indices)} blocks x {batch} sequences x {pos + length} slots"
            )
        if key_mask is not None:
            if key_mask.shape != (batch, pos + length):
                raise ValueError(f"key_mask shape {tuple(key_mask.shape)} != {(batch, pos + length)}")
            key_mask = key_mask.to(device=r.device, dtype=torch.bool)

        ids = position_ids(key_mask, batch, length, pos, r.device)
        cos, sin = self.rotary(ids, r.dtype)
        windows = [self.config.window(self.start + i) for i in indices]
        masks = {w: attention_mask(key_mask, length, pos, w, r.device) for w in set(windows)}
        comm = self.comm
        p = None if p is None else comm.ready(p)
        for slot, (i, window) in enumerate(zip(indices, windows, strict=True)):
            block = self.blocks[i]
            block_cache = None if cache is None else (cache.keys[slot], cache.values[slot])
            if prompts is not None:  # added to the stream; p joins it later, and addition commutes
                r = add_prompt(r, prompts[slot])
            block_lora = NO_LORA if lora is None else lora[slot]
            if self.ladder[i]:
                r, p = ladder_forward(
                    block, r, p, comm, cos, sin, masks[window], block_cache, pos, block_lora
                )
                continue
            if p is not None:  # a standard layer reads the whole stream
                r, p = r + comm.wait(p), None
            if comm is LOCAL:
                r = block(r, cos, sin, masks[window], block_cache, pos, block_lora)
            else:
                r = standard_forward(block, r, comm, cos, sin, masks[window], block_cache, pos, block_lora)
        return self._settle(indices, r, p)

    def decode(
        self,
        hidden: Tensor,
        positions: Tensor,
        slot: Tensor,
        keys: Tensor,
        values: Tensor,
        key_mask: Tensor | None = None,
        blocks: slice | None = None,
        lora: Sequence[BlockLora] | None = None,
    ) -> Tensor:
        """One token per sequence through the span (or its sub-range `blocks`): the decode hot path.

        hidden [B, H]; positions [B] long: the tokens' rotary positions; slot [1] long: the cache slot they
        take (or [B]: each row its own, rows of different sessions in one shared cache); keys/values [n, B, kv,
        S, hd]: the first S slots of a cache (S > slot), all attended to. With key_mask None, S must be slot + 1
        and no slot a pad; otherwise key_mask [B, S] marks the real tokens and slots after `slot` are masked
        out, so S may be any fixed size: every shape depends on (B, S) only and `slot` is a tensor, which is
        what lets a CUDA graph captured once replay for every step.
        lora: one `BlockLora` per block run (a session's adapter; a captured graph holds its tensors).
        Neither edge may lie inside a ladder region (use decode_pair there).
        """
        indices = self._indices(blocks, pair=False)
        return self.decode_pair(hidden, None, positions, slot, keys, values, key_mask, indices, lora)[0]

    def decode_pair(
        self,
        r: Tensor,
        p: Tensor | None,
        positions: Tensor,
        slot: Tensor,
        keys: Tensor,
        values: Tensor,
        key_mask: Tensor | None = None,
        blocks: slice | range | None = None,
        lora: Sequence[BlockLora] | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """`decode` for the pair (r [B, H], p [B, H] or None), with `forward_pair`'s contract on p. Which layers
        take p, settle it or return it depends on the config only, so a captured CUDA graph stays valid."""
        indices = self._indices(blocks, pair=True)
        self._check_pending(indices, p)
        length = keys.shape[3]
        cos, sin = self.rotary.for_decode(positions, r.dtype)
        windows = [self.config.window(self.start + i) for i in indices]
        masks = {w: self._decode_mask(key_mask, slot, length, w) for w in set(windows)}
        comm = self.comm
        p = None if p is None else comm.ready(p)
        for n, (i, window) in enumerate(zip(indices, windows, strict=True)):
            block, block_lora = self.blocks[i], NO_LORA if lora is None else lora[n]
            args = (cos, sin, slot, keys[n], values[n], masks[window], block_lora)
            if self.ladder[i]:
                r, p = ladder_decode(block, r, p, comm, *args)
                continue
            if p is not None:
                r, p = r + comm.wait(p), None
            r = block.decode(r, *args) if comm is LOCAL else standard_decode(block, r, comm, *args)
        return self._settle(indices, r, p)

    def _indices(self, blocks: slice | range | None, *, pair: bool) -> range:
        """The block indices to run; for the single-tensor API, refuses edges inside a ladder region."""
        indices = blocks if isinstance(blocks, range) else range(len(self.blocks))[blocks or slice(None)]
        if not indices or indices.step != 1:
            raise ValueError(f"blocks must be a non-empty contiguous sub-range, got {blocks}")
        if not pair:
            for edge in (self.start + indices[0], self.start + indices[-1] + 1):
                if self.config.carries_pending(edge):
                    raise ValueError(
                        f"the state at layer boundary {edge} is the ladder pair (r, p): use forward_pair/decode_pair"
                    )
        return indices

    def _check_pending(self, indices: range, p: Tensor | None) -> None:
        wanted = self.config.carries_pending(self.start + indices[0])
        if wanted != (p is not None):
            raise ValueError(
                f"layer boundary {self.start + indices[0]} carries "
                + ("(r, p): p is required" if wanted else "r alone: p must be None")
            )

    def _settle(self, indices: range, r: Tensor, p) -> tuple[Tensor, Tensor | None]:
        """(r, p) leaving the span: p handed on where the next boundary carries it, else settled into r."""
        if p is None:
            return r, None
        p = self.comm.wait(p)
        if self.config.carries_pending(self.start + indices[-1] + 1):
            return r, p
        return r + p, None

    def decode_batch(
        self,
        hidden: Tensor,
        positions: Tensor,
        segments: Sequence[DecodeSegment],
        blocks: slice | None = None,
    ) -> Tensor:
        """One token per sequence of several sessions through the span (or its sub-range `blocks`) in one pass:
        hidden [N, H] and positions [N] hold every session's rows, each `DecodeSegment` says which rows are
        whose and brings that session's cache, mask and adapter. Row for row the same math as `decode` per
        session (as `forward` for a segment that is a prefill's chunk); the projections read the weights once for
        all of them (continuous batching). Neither edge may lie inside a ladder region (use decode_batch_pair
        there)."""
        indices = self._indices(blocks, pair=False)
        return self.decode_batch_pair(hidden, None, positions, segments, indices)[0]

    def decode_batch_pair(
        self,
        r: Tensor,
        p: Tensor | None,
        positions: Tensor,
        segments: Sequence[DecodeSegment],
        blocks: slice | range | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """`decode_batch` for the pair (r [N, H], p [N, H] or None), with `forward_pair`'s contract on p: the
        sessions merged share their blocks, so all of them carry p or none does."""
        indices = self._indices(blocks, pair=True)
        self._check_pending(indices, p)
        cos, sin = self.rotary.for_decode(positions, r.dtype)
        windows = [self.config.window(self.start + i) for i in indices]
        masks = {w: [self._segment_mask(s, w) for s in segments] for w in set(windows)}
        rows = [s.rows for s in segments]
        adapted = any(s.lora is not None for s in segments)
        for n, (i, window) in enumerate(zip(indices, windows, strict=True)):
            lora = NO_LORA
            if adapted:
                lora = batch_lora([None if s.lora is None else s.lora[n] for s in segments], rows)
            block = self.blocks[i]
            if self.ladder[i]:
                r, p = ladder_decode_batch(block, r, p, cos, sin, segments, n, masks[window], lora)
                continue
            if p is not None:
                r, p = r + p, None
            r = block.decode_batch(r, cos, sin, segments, n, masks[window], lora)
        return self._settle(indices, r, p)

    def _segment_mask(self, segment: DecodeSegment, window: int | None) -> Tensor | None:
        """A merged step's mask of one segment: `_decode_mask`'s for a decode step, `forward`'s for a chunk."""
        length = segment.keys.shape[3]
        if segment.tokens == 1:
            return self._decode_mask(segment.key_mask, segment.slot, length, window)
        start = length - segment.tokens
        return attention_mask(segment.key_mask, segment.tokens, start, window, segment.keys.device)

    @staticmethod
    def _decode_mask(key_mask: Tensor | None, slot: Tensor, length: int, window: int | None) -> Tensor | None:
        """Bool [B or 1, 1, 1, S] for decode, slot [1] or [B] (each row's own); the token's own slot is always
        allowed (pad rows stay finite). A sliding window always gets its mask, even while S <= window: a branch
        on S would make torch.compile guard S <= window, and hand that bound, through its on-disk cache, to a
        model without a window whose step then compiles the same graph."""
        if key_mask is None and window is None:
            return None
        kv, slot = torch.arange(length, device=slot.device), slot.view(-1, 1)
        allowed = kv <= slot
        if window is not None:
            allowed = allowed & (kv > slot - window)
        if key_mask is not None:
            allowed = (allowed & key_mask) | (kv == slot)  # [B, S]
        return allowed.view(-1, 1, 1, length)


class ClientHead(nn.Module):
    """What a client holds: token embeddings, final norm and LM head (tied when the checkpoint ties them)."""

    def __init__(self, config: BlockConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)  # [B, T, H]

    def logits(self, hidden: Tensor, matmul: Callable[[nn.Linear, Tensor], Tensor] | None = None) -> Tensor:
        """`matmul(lm_head, x)`: the head's matmul done another way (a client's packed copy, `models/packed.py`)."""
        hidden = self.norm(hidden)
        return self.lm_head(hidden) if matmul is None else matmul(self.lm_head, hidden)  # [B, T, vocab]
