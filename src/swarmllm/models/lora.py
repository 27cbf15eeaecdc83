"""LoRA adapters in our block layout, under PEFT's names.

An adapter is plain data: `LoraSettings` (rank, alpha, dropout, target modules) and a flat dict of tensors named
`"{layer}.{module}.lora_A"` / `".lora_B"`, with `module` as in a Hugging Face decoder layer (`self_attn.q_proj`,
`mlp.down_proj`, ...) and A [r, in], B [out, r] as PEFT shapes them. `block_lora` turns one layer's tensors into
the `BlockLora` our stacked projections apply; `read_peft_adapter` / `write_peft_adapter` move adapters to and
from a standard PEFT folder (`adapter_config.json`, `adapter_model.safetensors`, PEFT's key names).
Client (training, saving) and server (serving hosted adapters, applying uploaded ones) share this module.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from swarmllm.models.llama import BlockConfig, BlockLora, Lora

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# a module a LoRA may target (PEFT's short name) -> (its path in the layer, our projection, its part in it)
MODULES = {
    "q_proj": ("self_attn.q_proj", "qkv_proj", 0),
    "k_proj": ("self_attn.k_proj", "qkv_proj", 1),
    "v_proj": ("self_attn.v_proj", "qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", "o_proj", 0),
    "gate_proj": ("mlp.gate_proj", "gate_up_proj", 0),
    "up_proj": ("mlp.up_proj", "gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", "down_proj", 0),
}
_LAYER_SEED_STRIDE = 0x9E3779B97F4A7C15  # odd, so (seed + layer * stride) mod 2**64 differs for every layer
# a causal LM's or classifier's layers are under `model.`, a base model's (PEFT's FEATURE_EXTRACTION) are its own
_PEFT_KEY = re.compile(r"base_model\.model\.(?:model\.)?layers\.(\d+)\.(\w+\.\w+)\.(lora_[AB])\.weight")
# a sequence classifier's adapter (PEFT's task_type SEQ_CLS) also trains and saves the model's head, whichever
# of these names it has (Llama-style models call it `score`); the client holds it, servers never use it
CLASSIFIER_HEADS = ("classifier", "score")
# what PEFT lists as a SEQ_CLS adapter's modules_to_save by default (0.22 adds DistilBERT's pre_classifier, which
# a decoder model has not): any of them may be named, the head saved is one of CLASSIFIER_HEADS
SEQ_CLS_MODULES = (*CLASSIFIER_HEADS, "pre_classifier")
_HEAD_KEY = re.compile(r"base_model\.model\.(classifier|score)\.weight")


@dataclass(frozen=True)
class LoraSettings:
    """What shapes and scales an adapter: rank r, alpha (scale alpha / r, or alpha / sqrt(r) with rsLoRA),
    dropout on each adapted projection's input (training only), and the target modules (PEFT's short names)."""

    rank: int
    alpha: float
    modules: tuple[str, ...]
    dropout: float = 0.0
    rslora: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.modules if m not in MODULES]
        if unknown or not self.modules:
            raise ValueError(f"LoRA target modules must be some of {list(MODULES)}, got {list(self.modules)}")
        if self.rank < 1 or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA needs rank >= 1 and 0 <= dropout < 1, got r={self.rank}, {self.dropout}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_peft(cls, config) -> LoraSettings:
        """From a `peft.LoraConfig` (or its JSON as a dict); refuses what it would compute differently."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        targets = get("target_modules")
        if isinstance(targets, str):
            raise ValueError(f"target_modules must be a list of module names, got {targets!r}")
        # PEFT matches a target by its full name's suffix: only a module's short name or its path in the layer
        # names it in every layer ("model.layers.0.self_attn.q_proj" is layer 0's alone, "mlp.q_proj" nothing)
        short = {path: name for name, (path, _, _) in MODULES.items()}
        odd = [t for t in targets or () if t not in MODULES and t not in short]
        if odd:
            raise ValueError(
                f"target_modules must name modules of every layer ({list(MODULES)}, or their paths as "
                f"'self_attn.q_proj'), got {odd}"
            )
        modules = tuple(sorted({short.get(t, t) for t in targets or ()}, key=list(MODULES).index))
        for option, neutral in (
            ("use_dora", False),
            ("bias", "none"),
            ("lora_bias", False),
            ("layers_to_transform", None),
        ):
            if get(option, neutral) != neutral:
                raise ValueError(f"LoRA option {option}={get(option)!r} is not supported")
        # PEFT would also train copies of modules_to_save (the LM head, ...), and leave exclude_modules unadapted;
        # a classifier's head is the one it may save, held by the client
        if get("exclude_modules"):
            raise ValueError(f"LoRA option exclude_modules={get('exclude_modules')!r} is not supported")
        to_save = get("modules_to_save")
        if to_save and not (get("task_type") == "SEQ_CLS" and set(to_save) <= set(SEQ_CLS_MODULES)):
            raise ValueError(f"LoRA option modules_to_save={to_save!r} is not supported")
        if get("rank_pattern") or get("alpha_pattern"):
            raise ValueError("per-module ranks or alphas (rank_pattern, alpha_pattern) are not supported")
        init = get("init_lora_weights", True)
        if isinstance(init, str) and init.startswith(("pissa", "olora", "corda", "loftq")):
            # PEFT subtracts such an adapter's initial value from the base weights, which servers keep as they are
            raise ValueError(f"LoRA option init_lora_weights={init!r} is not supported")
        # what PEFT would train or compute besides the targets' A/B: embedding rows, aLoRA's invocation, a
        # deeper model, adapted parameters; or LoRA variants that compute or train A/B otherwise
        for option in (
            "trainable_token_indices",
            "alora_invocation_tokens",
            "layer_replication",
            "target_parameters",
            "arrow_config",
            "use_bdlora",
            "velora_config",
            "monteclora_config",
            "kasa_config",
        ):
            if get(option):
                raise ValueError(f"LoRA option {option}={get(option)!r} is not supported")
        return cls(
            rank=int(get("r")),
            alpha=float(get("lora_alpha")),
            modules=modules,
            dropout=float(get("lora_dropout", 0.0) or 0.0),
            rslora=bool(get("use_rslora", False)),
        )

    def to_peft_dict(self) -> dict:
        return {
            "r": self.rank,
            "lora_alpha": self.alpha,
            "lora_dropout": self.dropout,
            "target_modules": list(self.modules),
            "use_rslora": self.rslora,
        }


def module_features(config: BlockConfig, module: str) -> tuple[int, int]:
    """(in, out) features of a target module (PEFT's short name) in a layer of this model."""
    hidden, q, kv = (
        config.hidden_size,
        config.num_heads * config.head_dim,
        config.num_kv_heads * config.head_dim,
    )
    return {
        "q_proj": (hidden, q),
        "k_proj": (hidden, kv),
        "v_proj": (hidden, kv),
        "o_proj": (q, hidden),
        "gate_proj": (hidden, config.intermediate_size),
        "up_proj": (hidden, config.intermediate_size),
        "down_proj": (config.intermediate_size, hidden),
    }[module]


def tensor_name(layer: int, module: str, matrix: str) -> str:
    """Our name of a LoRA matrix: `"{layer}.self_attn.q_proj.lora_A"`; `matrix` is "A" or "B"."""
    return f"{layer}.{MODULES[module][0]}.lora_{matrix}"


def lora_shapes(config: BlockConfig, settings: LoraSettings, layers: range) -> dict[str, tuple[int, int]]:
    """Every tensor of an adapter over `layers`, in a fixed order, with its shape."""
    shapes = {}
    for layer in layers:
        for module in settings.modules:
            fan_in, fan_out = module_features(config, module)
            shapes[tensor_name(layer, module, "A")] = (settings.rank, fan_in)
            shapes[tensor_name(layer, module, "B")] = (fan_out, settings.rank)
    return shapes


def block_lora(
    config: BlockConfig,
    settings: LoraSettings,
    tensors: dict[str, Tensor],
    layer: int,
    generator: torch.Generator | None = None,
) -> BlockLora:
    """Layer `layer`'s adapter as our stacked projections apply it (differentiable in every A and B).

    `generator` turns dropout on (a training forward); without it the adapter is applied deterministically.
    """
    parts_of = {
        "qkv_proj": (
            ["q_proj", "k_proj", "v_proj"],
            [config.num_heads, config.num_kv_heads, config.num_kv_heads],
        ),
        "o_proj": (["o_proj"], [1]),
        "gate_up_proj": (["gate_proj", "up_proj"], [1, 1]),
        "down_proj": (["down_proj"], [1]),
    }
    projections = {}
    for projection, (modules, _) in parts_of.items():
        targeted = [m for m in modules if m in settings.modules]
        if not targeted:
            continue
        outputs = [module_features(config, m)[1] for m in modules]
        downs, columns = [], []
        for module in targeted:
            a, b = tensors[tensor_name(layer, module, "A")], tensors[tensor_name(layer, module, "B")]
            offset = sum(outputs[: modules.index(module)])
            before = b.new_zeros(offset, b.shape[1])
            after = b.new_zeros(sum(outputs) - offset - b.shape[0], b.shape[1])
            downs.append(a)
            columns.append(torch.cat([before, b * settings.scale, after]))
        projections[projection] = Lora(
            torch.cat(downs),
            torch.cat(columns, dim=1),
            tuple(a.shape[0] for a in downs),
            settings.dropout,
            generator,
        )
    return BlockLora(**projections)


def span_lora(
    config: BlockConfig,
    settings: LoraSettings,
    tensors: dict[str, Tensor],
    layers: range,
    generator: torch.Generator | None = None,
) -> list[BlockLora]:
    """`block_lora` for each layer of `layers` (one per block a span runs). With `generator` (seeded by the
    request), each layer draws its dropout masks from its own generator, seeded by that seed and the layer: one
    generator along the span would make the next server, seeded alike, repeat this one's masks layer for layer,
    and a layer's masks would depend on how the route splits the blocks."""
    return [
        block_lora(config, settings, tensors, layer, _layer_generator(generator, layer)) for layer in layers
    ]


def _layer_generator(generator: torch.Generator | None, layer: int) -> torch.Generator | None:
    if generator is None:
        return None
    seed = (generator.initial_seed() + (layer + 1) * _LAYER_SEED_STRIDE) % 2**64
    return torch.Generator(generator.device).manual_seed(seed)


def peft_key(name: str, base_model: bool = False) -> str:
    """Our tensor name -> PEFT's key in adapter_model.safetensors (what `PeftModel.from_pretrained` loads;
    PEFT skips keys it does not know silently, leaving B at zero, so this must be exact). `base_model`: the
    key in an adapter of transformers' `AutoModel` (no LM head, the layers at its top)."""
    layer, rest = name.split(".", 1)
    return f"base_model.model.{'' if base_model else 'model.'}layers.{layer}.{rest}.weight"


def write_peft_adapter(
    path: str | Path,
    settings: LoraSettings,
    tensors: dict[str, Tensor],
    base_model: str,
    score: Tensor | None = None,
    *,
    base_model_only: bool = False,
) -> None:
    """A standard PEFT LoRA folder: `adapter_config.json` and `adapter_model.safetensors`; with a sequence
    classifier's `score` head, PEFT's SEQ_CLS adapter, which holds the trained head too; `base_model_only`,
    PEFT's FEATURE_EXTRACTION adapter of transformers' `AutoModel`."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    task = {"task_type": "FEATURE_EXTRACTION" if base_model_only else "CAUSAL_LM"}
    if score is not None:
        task = {"task_type": "SEQ_CLS", "modules_to_save": list(CLASSIFIER_HEADS)}
    config = {
        "peft_type": "LORA",
        **task,
        "base_model_name_or_path": base_model,
        "bias": "none",
        "inference_mode": True,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        **settings.to_peft_dict(),
    }
    (path / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    state = {
        peft_key(name, base_model_only): t.detach().to("cpu").contiguous() for name, t in tensors.items()
    }
    if score is not None:
        state["base_model.model.score.weight"] = score.detach().to("cpu").contiguous()
    save_file(state, path / WEIGHTS_FILE, metadata={"format": "pt"})


def read_peft_adapter(path: str | Path, config: BlockConfig) -> tuple[LoraSettings, dict[str, Tensor]]:
    """A PEFT LoRA folder as (settings, our tensors), checked against the model: every layer, every target
    module, the right shapes, no unknown keys."""
    path = Path(path)
    raw = json.loads((path / CONFIG_FILE).read_text())
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: not a LoRA adapter (peft_type {raw.get('peft_type')!r})")
    settings = LoraSettings.from_peft(raw)
    tensors, saves_head = {}, _saves_head(raw)
    for key, tensor in load_file(path / WEIGHTS_FILE).items():
        if saves_head and _HEAD_KEY.fullmatch(key):
            continue  # the classifier's head: `read_peft_head`
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            raise ValueError(
                f"{path}: unexpected tensor {key!r} (only LoRA A/B of decoder layers are supported)"
            )
        layer, module, matrix = match.groups()
        tensors[f"{layer}.{module}.{matrix}"] = tensor
    expected = lora_shapes(config, settings, range(config.num_layers))
    got = {name: tuple(t.shape) for name, t in tensors.items()}
    if got != expected:
        missing = sorted(expected.keys() - got.keys())[:3]
        extra = sorted(got.keys() - expected.keys())[:3]
        wrong = [n for n in expected.keys() & got.keys() if expected[n] != got[n]][:3]
        raise ValueError(
            f"{path}: adapter does not fit the model (missing {missing}, extra {extra}, shape of {wrong})"
        )
    return settings, tensors


def _saves_head(raw: dict) -> bool:
    """Whether an adapter's config (`adapter_config.json`) says it saved a classifier's head."""
    return raw.get("task_type") == "SEQ_CLS" and bool(raw.get("modules_to_save"))


def read_peft_head(path: str | Path) -> Tensor | None:
    """A SEQ_CLS adapter's classifier head (its weight), or None when the folder holds none."""
    path = Path(path)
    if not _saves_head(json.loads((path / CONFIG_FILE).read_text())):
        return None
    heads = [t for key, t in load_file(path / WEIGHTS_FILE).items() if _HEAD_KEY.fullmatch(key)]
    if len(heads) != 1:
        raise ValueError(f"{path}: a classifier's adapter must hold one head, found {len(heads)}")
    return heads[0]
