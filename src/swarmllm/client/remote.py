"""The swarm's blocks as one differentiable function, and the trainable parameters a client holds for them.

`PromptTuning` holds prompts (Petals' conventions: `ptune` prepends N trainable vectors to the input embeddings;
`deep_ptune` also adds N trainable vectors per block to the first N positions before each block). `RemoteLora`
holds a LoRA adapter's A/B matrices for every block, named as PEFT names them; a plain `optimizer.step()` is
enough: the next request finds the changed tensors and uploads the new weights once per server (`PeftLora`:
the same for an adapter PEFT injected, `client.layers`). `run_blocks`
sends hidden states through the swarm with them, through `RemoteBlocks` (a `torch.autograd.Function` whose
backward asks the same servers for the gradients) when gradients are needed.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn

from swarmllm.client.loop import run_sync
from swarmllm.client.swarm import SwarmClient
from swarmllm.client.tuning import AdapterWeights, Tuning
from swarmllm.models import BlockConfig
from swarmllm.models.lora import LoraSettings, lora_shapes
from swarmllm.wire.messages import NAME_RULE, valid_name

_names = itertools.count()


class PromptTuning(nn.Module):
    """N trainable prompt vectors (and with `deep`, N more per block, starting at zero, as Petals does)."""

    def __init__(self, config: BlockConfig, pre_seq_len: int, deep: bool, init_std: float = 0.02):
        super().__init__()
        if pre_seq_len < 1:
            raise ValueError(f"prompt tuning needs pre_seq_len >= 1, got {pre_seq_len}")
        self.prompts = nn.Parameter(torch.randn(pre_seq_len, config.hidden_size) * init_std)
        self.deep = (
            nn.Parameter(torch.zeros(config.num_layers, pre_seq_len, config.hidden_size)) if deep else None
        )

    @property
    def length(self) -> int:
        return self.prompts.shape[0]

    def prepend(self, embeds: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> [B, N + T, H]: the prompts take positions 0..N-1."""
        prompts = self.prompts.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
        return torch.cat([prompts, embeds], dim=1)


class RemoteLora(nn.Module):
    """A LoRA adapter for every remote block, held (and trained) by the client; PEFT's initialisation (A
    Kaiming-uniform, B zero, so the adapter starts as a no-op)."""

    def __init__(self, config: BlockConfig, settings: LoraSettings, name: str | None = None):
        super().__init__()
        if name is not None and not valid_name(name):  # servers would refuse it
            raise ValueError(f"adapter name {name!r}: an adapter's name is {NAME_RULE}")
        self.settings = settings
        self.name = name or f"lora{next(_names)}"
        shapes = lora_shapes(config, settings, range(config.num_layers))
        self.names = list(shapes)
        self.weights = nn.ParameterList(nn.Parameter(torch.empty(shape)) for shape in shapes.values())
        for name, weight in zip(self.names, self.weights, strict=True):
            if name.endswith("lora_A"):
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
            else:
                nn.init.zeros_(weight)
        self.versions = AdapterVersions(self.name, settings)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.weights, strict=True))

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if set(tensors) != set(self.names):
            raise ValueError("the adapter's tensors do not match its settings")
        with torch.no_grad():
            for name, weight in zip(self.names, self.weights, strict=True):
                weight.copy_(tensors[name])

    def snapshot(self) -> AdapterWeights:
        return self.versions.snapshot(self.tensors())


class AdapterVersions:
    """The versions of one adapter's weights that servers are sent: a new one whenever any weight changed."""

    def __init__(self, name: str, settings: LoraSettings):
        self.name, self.settings = name, settings
        self._snapshot: AdapterWeights | None = None
        self._version = 0

    def snapshot(self, weights: dict[str, torch.Tensor]) -> AdapterWeights:
        """The weights as they are now, with a version that changes whenever any of them changed. The contents
        are compared, not the tensors' version counters: a fused optimizer (transformers' Trainer's default,
        `adamw_torch_fused`) and updates through `.data` change weights without bumping them, and servers kept
        computing with the first version (comparing costs ~4 ms for a rank-8 q/v adapter of Llama-8B's shape on
        a CPU core)."""
        current = {name: w.detach().float() for name, w in weights.items()}
        old = self._snapshot
        if old is None or any(not torch.equal(old.tensors[name], t) for name, t in current.items()):
            self._version += 1
            tensors = {name: t.clone() for name, t in current.items()}
            self._snapshot = AdapterWeights(self.name, self._version, self.settings, tensors)
        return self._snapshot


class PeftLora:
    """An adapter PEFT injected into the model's placeholder layers (`client.layers`), as `run_blocks`
    takes one: its A/B are PEFT's own parameters, which receive the servers' gradients."""

    def __init__(self, settings: LoraSettings, tensors: dict[str, torch.Tensor]):
        self.settings = settings
        self.names = list(tensors)
        self.weights = list(tensors.values())
        self.versions = AdapterVersions(f"lora{next(_names)}", settings)

    def holds(self, settings: LoraSettings, tensors: dict[str, torch.Tensor]) -> bool:
        """Whether this is the adapter of these settings and parameters (PEFT may replace an adapter by name)."""
        same = len(tensors) == len(self.weights)
        return (
            same and settings == self.settings and all(a is b for a, b in zip(tensors.values(), self.weights))
        )

    def snapshot(self) -> AdapterWeights:
        return self.versions.snapshot(dict(zip(self.names, self.weights, strict=True)))


class RemoteBlocks(torch.autograd.Function):
    """Hidden states through the swarm's blocks (all, or a range), differentiable in the hidden states, the deep prompts
    and the adapter's tensors. Gradients come from the servers that computed the forward (or others of the same
    blocks if they fail), exact in float32."""

    @staticmethod
    def forward(ctx, swarm, key_mask, tuning, blocks, names, hidden, prompts, *lora):
        out, kept = run_sync(swarm.train_forward(hidden.detach(), key_mask, tuning, blocks))
        ctx.swarm, ctx.key_mask, ctx.tuning, ctx.names, ctx.kept = swarm, key_mask, tuning, names, kept
        ctx.hidden_dtype = hidden.dtype
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad):
        grad_hidden, grad_prompts, grad_lora = run_sync(
            ctx.swarm.train_backward(ctx.kept, grad.float().contiguous(), ctx.key_mask, ctx.tuning)
        )
        grads = [grad_hidden.to(ctx.hidden_dtype), grad_prompts]
        grads += [grad_lora.get(name) for name in ctx.names]
        return None, None, None, None, None, *grads


def run_blocks(
    swarm: SwarmClient,
    hidden: torch.Tensor,
    key_mask: torch.Tensor | None,
    ptune: PromptTuning | None,
    lora: RemoteLora | PeftLora | None,
    training: bool,
    blocks: tuple[int, int] | None = None,
    prompts: torch.Tensor | None = None,
) -> torch.Tensor:
    """`hidden` (prompts already prepended) through the swarm's blocks (those of `blocks`, [start, end), or all)
    with the client's deep prompts (or `prompts` [all blocks, B or 1, P, H] instead) and adapter: differentiably
    when gradients are wanted and anything requires them, else plainly (pipelined).
    In training mode the adapter's dropout applies, with gradients or without (as PEFT's), with a fresh seed per
    call (from torch's generator).
    An empty input is refused here: servers refuse it too, and the client would ban them for the caller's error."""
    if hidden.shape[0] == 0 or hidden.shape[1] == 0:
        raise ValueError(f"the input is empty ({hidden.shape[0]} sequences of {hidden.shape[1]} tokens)")
    deep = prompts  # [L, B or 1, N, H]: the caller's, else the model's own
    if deep is None and ptune is not None and ptune.deep is not None:
        deep = ptune.deep[:, None]
    params = [] if lora is None else list(lora.weights)
    trainable = [t for t in (hidden, deep, *params) if t is not None and t.requires_grad]
    needs_grad = torch.is_grad_enabled() and bool(trainable)
    weights = None if lora is None else lora.snapshot()
    seed = None
    if training and weights is not None and weights.settings.dropout > 0:  # (under no_grad too, as in PEFT)
        seed = int(torch.randint(0, 2**62, ()).item())
    tuning = Tuning(
        prompts=None if deep is None else deep.detach().float(),
        hosted_adapter=swarm.active_adapter,
        weights=weights,
        dropout_seed=seed,
        lora_grads=needs_grad and any(p.requires_grad for p in params),
    )
    if not needs_grad and seed is not None:  # the masks a training forward draws, micro-batches and all
        return run_sync(swarm.train_forward(hidden.detach(), key_mask, tuning, blocks))[0]
    if not needs_grad:
        return run_sync(swarm.forward(hidden.detach(), key_mask, tuning, blocks))
    names = [] if lora is None else lora.names
    prompts = deep if deep is not None else torch.zeros(0)  # autograd.Function inputs must be tensors
    return RemoteBlocks.apply(swarm, key_mask, tuning, blocks, names, hidden, prompts, *params)
