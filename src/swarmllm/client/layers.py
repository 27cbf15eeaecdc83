"""The swarm's blocks as the client's model holds them: a placeholder decoder layer per block, named as
transformers names a model's layers (`model.layers.3.self_attn.q_proj`, whatever a family calls its own).

For PEFT, so that `peft.get_peft_model(swarm_model, LoraConfig(...))` and `peft.PeftModel.from_pretrained(
swarm_model, DIR)` work as on a local model: PEFT finds the modules to adapt by name, and a client holds no block.
Each projection is a `RemoteLinear`, of its shape and without weights. PEFT wraps them in its LoRA layers, whose
A/B are then the client's trainable parameters, saved under transformers' key names. The projections never run:
each request reads the active adapter from the wrapped layers (`injected_lora`) and sends it to the servers as
`add_adapter`'s own.

For research, as Petals' `RemoteSequential`: the layers (`RemoteLayers`), a slice of them or one layer, called on
hidden states, run them through those blocks on the servers (differentiably), and `inference_session` steps them
through those blocks with the servers' caches: intermediate states, custom paths, a logit lens.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from swarmllm.client.loop import run_sync
from swarmllm.models import BlockConfig
from swarmllm.models.lora import MODULES, LoraSettings, lora_shapes, module_features, tensor_name

if TYPE_CHECKING:
    from swarmllm.client.model import DistributedModel
    from swarmllm.client.session import InferenceSession


class _ServerWeight(torch.Tensor):
    """A placeholder's weight: what PEFT reads of a weight (shape, device, dtype) and nothing it could change, so
    that merging an adapter into it fails clearly, not with an error about memory layout, nor (PEFT's
    `safe_merge` swaps `.data`) by dropping the adapter in silence."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        in_place = name.endswith("_") and not name.startswith("__") and name != "requires_grad_"
        if name == "__set__" or in_place:
            raise RuntimeError(
                "the swarm's servers hold this model's weights: an adapter cannot be merged into them "
                "(merge_and_unload, merge_adapter); unmerged, the servers apply it to each request"
            )
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        # what is computed from it is a plain tensor; its `.data` is the weight still
        return out.as_subclass(cls) if name == "__get__" and isinstance(out, Tensor) else out


class RemoteLinear(nn.Linear):
    """A projection a server computes: its shape, for PEFT, and no weight of its own."""

    def __init__(self, in_features: int, out_features: int):
        nn.Module.__init__(self)  # (not nn.Linear's: it would allocate the weight)
        self.in_features, self.out_features = in_features, out_features
        self.register_parameter("bias", None)

    @property
    def weight(self) -> Tensor:
        """A float32 stand-in taking no memory: PEFT creates the adapter with its device and dtype."""
        return (
            torch.zeros((), dtype=torch.float32)
            .expand(self.out_features, self.in_features)
            .as_subclass(_ServerWeight)
        )

    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("this projection is computed by the swarm's servers, not by the client")


class LayersSession:
    """An inference session through some blocks (`RemoteLayers.inference_session`), as Petals' `step`s it: each
    step takes the hidden states of the next positions and returns theirs after the blocks, whose keys and values
    stay on the servers."""

    def __init__(self, session: InferenceSession):
        self.session = session

    @property
    def position(self) -> int:
        """How many positions the servers hold."""
        return self.session.position

    def step(
        self,
        hidden: Tensor,
        attention_mask: Tensor | None = None,
        *,
        position: int | None = None,
        reorder: Sequence[int] | None = None,
    ) -> Tensor:
        """[B, T, H] of the next T positions -> [B, T, H]; `attention_mask` [B, T], 0 at padding (held for
        the later steps). `position`: where these positions start (default: after those held; an earlier one
        rewinds); `reorder` (Petals' `hypo_ids`, a one-position step): first, row i of what the servers hold
        becomes what row reorder[i] held (`InferenceSession.step`)."""
        mask = None if attention_mask is None else attention_mask.bool()
        step = self.session.step(hidden.detach(), mask, position=position, reorder=reorder)
        return run_sync(step).to(hidden.dtype)


class _Layers(nn.Module):
    """Calls through the swarm for a run of blocks: those of `RemoteLayers` and of each `RemoteLayer`."""

    def __init__(self, owner: weakref.ref[DistributedModel]):
        super().__init__()
        # (weakly: the model holds these layers, and is dropped as transformers' models are)
        self._owner = owner

    @property
    def blocks(self) -> tuple[int, int]:
        raise NotImplementedError

    def _model(self) -> DistributedModel:
        model = self._owner()
        if model is None:
            raise RuntimeError("the model these layers belong to is gone")
        return model

    def forward(
        self, hidden_states: Tensor, attention_mask: Tensor | None = None, prompts: Tensor | None = None
    ) -> Tensor:
        """[B, T, H] -> [B, T, H]: the hidden states after these blocks, differentiable as the model's forward
        is, with the model's adapter and deep prompts. `attention_mask` [B, T]: 0 at padding. `prompts`
        [blocks, B or 1, P, H] (Petals' `RemoteSequential(x, prompts=...)`): deep prompts of these blocks in
        place of the model's, block i's added to the first P positions of its input; differentiable too."""
        if not hidden_states.is_floating_point():
            raise TypeError(
                f"the layers take hidden states (floats, [batch, tokens, hidden]), got {hidden_states.dtype}: "
                "token ids go through the model's embeddings first (`model.get_input_embeddings()(ids)`)"
            )
        model, (start, end) = self._model(), self.blocks
        if prompts is not None:
            batch, length, hidden = hidden_states.shape
            if (
                prompts.ndim != 4
                or prompts.shape[0] != end - start
                or prompts.shape[1] not in (1, batch)
                or not 0 < prompts.shape[2] <= length
                or prompts.shape[3] != hidden
                or not prompts.is_floating_point()
            ):
                raise ValueError(
                    f"prompts must be [blocks={end - start}, batch={batch} or 1, positions <= {length}, "
                    f"hidden={hidden}] floats, got {tuple(prompts.shape)} {prompts.dtype}"
                )
            # (the other blocks' are zeros: the request covers only these)
            none = prompts.new_zeros(1, *prompts.shape[1:])
            after = model.block_config.num_layers - end
            prompts = torch.cat([none.expand(start, -1, -1, -1), prompts, none.expand(after, -1, -1, -1)])
        return model.run_layers(hidden_states, attention_mask, self.blocks, prompts)

    @contextlib.contextmanager
    def inference_session(self, max_length: int, compression: str | None = None) -> Iterator[LayersSession]:
        """A session through these blocks, closed at the end of the block (see `LayersSession`)."""
        session = self._model().open_layers_session(max_length, compression, self.blocks)
        try:
            yield LayersSession(session)
        finally:
            run_sync(session.close())


class RemoteLayer(_Layers):
    """One block's placeholder: its projections (`self_attn.q_proj`, ...) for PEFT; called, the block itself."""

    def __init__(self, config: BlockConfig, index: int, owner: weakref.ref[DistributedModel]):
        super().__init__(owner)
        self.index = index
        for module, (path, _, _) in MODULES.items():
            group, name = path.split(".")
            if not hasattr(self, group):
                self.add_module(group, nn.Module())
            getattr(self, group).add_module(name, RemoteLinear(*module_features(config, module)))

    @property
    def blocks(self) -> tuple[int, int]:
        return self.index, self.index + 1


class RemoteLayers(_Layers, nn.ModuleList):
    """The model's decoder layers, an `nn.ModuleList` of them; called, their blocks in turn. A slice (of step 1)
    is the layers of its blocks, called likewise."""

    def __init__(self, layers: list[RemoteLayer], owner: weakref.ref[DistributedModel]):
        super().__init__(owner)
        self.extend(layers)

    @classmethod
    def build(cls, config: BlockConfig, owner: DistributedModel) -> RemoteLayers:
        ref = weakref.ref(owner)
        return cls([RemoteLayer(config, i, ref) for i in range(config.num_layers)], ref)

    @property
    def blocks(self) -> tuple[int, int]:
        layers = list(self)
        return layers[0].index, layers[-1].index + 1

    def __getitem__(self, index: int | slice) -> RemoteLayer | RemoteLayers:
        if not isinstance(index, slice):
            return super().__getitem__(index)
        start, stop, step = index.indices(len(self))
        if step != 1 or stop <= start:
            raise IndexError(
                f"layers[{index.start}:{index.stop}:{index.step}]: a run of blocks through the swarm is a "
                "non-empty slice of step 1"
            )
        return RemoteLayers(list(self)[start:stop], self._owner)


def injected_lora(
    layers: nn.ModuleList, config: BlockConfig
) -> tuple[str, LoraSettings, dict[str, Tensor]] | None:
    """The adapter PEFT injected into `layers` and has active: its name, settings and every A/B (PEFT's own
    parameters, under our tensor names); None when it injected none, or its adapters are disabled. What the
    servers cannot apply as PEFT would is refused: another method than LoRA, a merged adapter, several active at
    once, or modules that differ in rank, scale or dropout, or from layer to layer."""
    wrapped = {}
    for index, layer in enumerate(layers):
        for module, (path, _, _) in MODULES.items():
            found = layer.get_submodule(path)
            if not isinstance(found, RemoteLinear):
                wrapped[index, module] = found
    if not wrapped:
        return None
    for (index, module), found in wrapped.items():
        if not (isinstance(getattr(found, "lora_A", None), nn.ModuleDict) and hasattr(found, "scaling")):
            method = type(found).__module__.removeprefix("peft.tuners.").split(".")[0]
            raise ValueError(
                f"layer {index}'s {module} holds a {type(found).__name__} of {method!r}: only LoRA adapters run "
                "through the swarm"
            )
        if getattr(found, "merged", False):
            raise ValueError(
                "a LoRA adapter cannot be merged into the swarm's weights: the servers hold them"
            )
    first = next(iter(wrapped.values()))
    if getattr(first, "disable_adapters", False):
        return None
    active = list(first.active_adapters)
    if len(active) > 1:
        raise ValueError(f"adapters {active} are active at once: the swarm applies one adapter per request")
    name = active[0]
    adapted = {key: found for key, found in wrapped.items() if name in found.lora_A}
    if not adapted:
        return None
    described = set()
    for found in adapted.values():
        dropout = found.lora_dropout[name]
        described.add(
            (
                found.r[name],
                found.lora_alpha[name],
                bool(found.use_rslora.get(name, False)),
                dropout.p if isinstance(dropout, nn.Dropout) else 0.0,
                found.scaling[name],
                name in getattr(found, "lora_variant", {}) or bool(found.use_dora.get(name, False)),
                bool(getattr(found, "lora_bias", {}).get(name, False)),
            )
        )
    if len(described) > 1:
        raise ValueError(
            f"adapter {name!r}: its modules differ in rank, alpha or dropout, which the swarm cannot apply"
        )
    rank, alpha, rslora, dropout, scaling, variant, bias = described.pop()
    if variant or bias:
        raise ValueError(f"adapter {name!r}: LoRA variants (DoRA, ...) and lora_bias are not supported")
    settings = LoraSettings(
        rank, float(alpha), tuple(sorted({m for _, m in adapted}, key=list(MODULES).index)), dropout, rslora
    )
    if scaling != settings.scale:
        raise ValueError(
            f"adapter {name!r} is scaled by {scaling} (set_scale?), not by its alpha: not supported"
        )
    expected = lora_shapes(config, settings, range(config.num_layers))
    tensors = {}
    for (index, module), found in adapted.items():
        tensors[tensor_name(index, module, "A")] = found.lora_A[name].weight
        tensors[tensor_name(index, module, "B")] = found.lora_B[name].weight
    if set(tensors) != set(expected):
        raise ValueError(f"adapter {name!r} adapts some layers only (layers_to_transform?): not supported")
    return name, settings, {key: tensors[key] for key in expected}


def refuse_wrapped_head(head: nn.Module) -> None:
    """PEFT's `modules_to_save` or `trainable_token_indices` on the client's embeddings, norm or LM head: they
    would train, and PEFT would save them under this model's names (`head.lm_head`), which a local model's
    PEFT does not load (it drops them with a warning) and a hub adapter's do not match. Refused; unfrozen
    (`requires_grad_`), they train and `save_pretrained` of this model saves them."""
    for name, module in head.named_children():
        if hasattr(module, "original_module"):  # (PEFT's AuxiliaryTrainingWrapper)
            raise ValueError(
                f"PEFT's modules_to_save or trainable_token_indices on the client's {name}: not supported "
                "(PEFT would save it under a name a local model does not have); unfreeze it instead, and the "
                "swarm model's save_pretrained saves it"
            )
