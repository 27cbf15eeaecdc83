"""Converting a checkpoint to Ladder Residual, and the short distillation that recovers what conversion costs.

`convert_to_ladder` writes a new folder: every file of the source copied byte for byte (so the tensors are
unchanged) except config.json, which gains `"ladder_layers"`, plus `ladder_conversion.json` recording the source
and the layers (the teacher `swarmllm ladder retrain` distils from). `distill` trains a ladder model to match the
source model's next-token distributions; `save_weights` writes trained weights back into a checkpoint's own
safetensors files, under the same names and dtypes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from os import PathLike
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.nn import functional as F

from swarmllm.models.causal_lm import CausalLM
from swarmllm.models.checkpoint import (
    HEAD_TENSORS,
    STALE_SUFFIX,
    load_config,
    our_names,
    resolve_checkpoint,
)
from swarmllm.models.llama import FUSED_PARAMETERS

CONVERSION_FILE = "ladder_conversion.json"
# what a hub checkpoint's conversion fetches and copies: config, weights, tokenizer (not e.g. original/*.pth)
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]


def convert_to_ladder(src: str | PathLike, dst: str | PathLike, start: int, end: int) -> Path:
    """Copy checkpoint `src` (a folder or hub id) to the new folder `dst` with layers [start, end) made ladder
    layers (added to any it already has). Refuses layers outside the model and an existing non-empty `dst`."""
    root = resolve_checkpoint(src, allow_patterns=CHECKPOINT_FILES)
    _, config = load_config(root)
    if not 0 <= start < end <= config.num_layers:
        raise ValueError(
            f"layers {start}:{end} are not a non-empty range inside the model's {config.num_layers}"
        )
    if not any(root.glob("*.safetensors")):
        raise ValueError(f"{src}: no safetensors weights to convert")
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)
    for path in root.iterdir():
        if path.is_file() and path.name != "config.json":
            shutil.copyfile(path, dst / path.name)  # resolves hub-cache symlinks to their contents
    hf_json = json.loads((root / "config.json").read_text())
    hf_json["ladder_layers"] = sorted(set(hf_json.get("ladder_layers") or ()) | set(range(start, end)))
    (dst / "config.json").write_text(json.dumps(hf_json, indent=2) + "\n")
    record = {"source": str(root.resolve()), "layers": [start, end]}
    (dst / CONVERSION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return dst


def conversion_source(path: str | PathLike) -> Path:
    """The checkpoint a converted folder was made from (its `ladder_conversion.json`)."""
    record = Path(path) / CONVERSION_FILE
    if not record.is_file():
        raise FileNotFoundError(
            f"{record} not found: not written by `swarmllm ladder convert` (pass --source)"
        )
    return Path(json.loads(record.read_text())["source"])


def distill(
    student: CausalLM,
    teacher: CausalLM,
    batches: Iterator[Tensor],
    steps: int,
    *,
    lr: float = 3e-4,
    on_step: Callable[[int, float], None] | None = None,
) -> None:
    """Train `student` for `steps` batches of token ids [B, T] to match the teacher's next-token distributions
    (KL(teacher || student) per token), with AdamW and gradient clipping; on_step(step, loss) after each."""
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for step in range(1, steps + 1):
        ids = next(batches)
        with torch.no_grad():
            target = teacher(ids).float().log_softmax(-1).flatten(0, 1)
        log_probs = student(ids).float().log_softmax(-1).flatten(0, 1)
        loss = F.kl_div(log_probs, target, log_target=True, reduction="batchmean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if on_step is not None:
            on_step(step, loss.item())
    student.eval()


def hf_state(model: CausalLM) -> dict[str, Tensor]:
    """The model's tensors under Hugging Face names, the stacked projections split back into their parts."""
    head = dict(model.head.state_dict())
    state = {hf: head[ours] for hf, ours in HEAD_TENSORS.items()}
    config = model.config
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    split_sizes = {"self_attn.qkv_proj": [q, kv, kv], "mlp.gate_up_proj": [config.intermediate_size] * 2}
    for i, block in enumerate(model.span.blocks):
        for name, tensor in block.state_dict().items():
            fused, kind = name.rsplit(".", 1)
            if fused in FUSED_PARAMETERS:
                for part, piece in zip(
                    FUSED_PARAMETERS[fused], tensor.split(split_sizes[fused]), strict=True
                ):
                    state[f"model.layers.{i}.{part}.{kind}"] = piece
            else:
                state[f"model.layers.{i}.{name}"] = tensor
    return state


def save_weights(model: CausalLM, path: str | PathLike) -> None:
    """Overwrite the tensors of the checkpoint folder `path` with the model's, file by file, keeping every
    file's names, dtypes and metadata (so index files stay valid). Tensors the model lacks are refused."""
    files = sorted(Path(path).glob("*.safetensors"))
    names = []
    for file in files:
        with safe_open(file, framework="pt") as f:
            names.extend(f.keys())
    # a base model's checkpoint stores its tensors without `model.` (`checkpoint.our_names`)
    ours = hf_state(model)
    state = {stored: ours.get(name) for name, stored in our_names(names).items()}
    for file in files:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata()
            tensors = {}
            for name in f.keys():
                saved = f.get_tensor(name)
                if name.endswith(STALE_SUFFIX):  # recomputed, never loaded: keep as it was
                    tensors[name] = saved
                elif state[name] is not None:
                    tensors[name] = state[name].detach().to(saved.dtype).contiguous()
                else:
                    raise KeyError(f"{file.name}: tensor {name} has no counterpart in the model")
        save_file(tensors, file, metadata=metadata)
