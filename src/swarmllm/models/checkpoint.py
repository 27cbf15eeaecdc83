"""Loading parts of a Hugging Face checkpoint: a server's span of blocks, or a client's embeddings and LM head.

Owns finding a checkpoint (local directory or hub repo), reading only the tensors asked for from safetensors
files, and mapping Hugging Face tensor names to ours. From the hub it fetches the JSON files first, then only
the shards that hold the wanted tensors. It does not decide which blocks to serve or how much memory to use.

Name mapping (the rest of each name is identical on both sides):
    model.layers.{i}.*      -> BlockSpan.blocks[i - start].*   (q/k/v and gate/up stacked: block_state_from_hf)
    model.embed_tokens.*    -> ClientHead.embed_tokens.*
    model.norm.*            -> ClientHead.norm.*
    lm_head.*               -> ClientHead.lm_head.*   (absent in tied checkpoints: tied to embed_tokens)
A base model's checkpoint (`AutoModel`'s, as embedding models ship) stores its tensors without the `model.`
prefix; they are read under it, as transformers' causal LM reads them.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from os import PathLike
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from swarmllm.models.gguf import gguf_checkpoint, local_gguf
from swarmllm.models.llama import BlockConfig, BlockSpan, ClientHead, block_state_from_hf
from swarmllm.models.packed import pack_block
from swarmllm.models.quant import check_quant, quantize_block

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# PyTorch's pickled weights, which older hub repositories hold instead (read only where no safetensors are)
BIN_FILE = "pytorch_model.bin"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
HEAD_TENSORS = {
    "model.embed_tokens.weight": "embed_tokens.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "lm_head.weight",
}
BASE_PREFIX = "model."
_BLOCK_TENSOR = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Some older Llama 2 conversions saved the RoPE frequencies per layer; they are recomputed, never loaded.
STALE_SUFFIX = "rotary_emb.inv_freq"


def resolve_checkpoint(
    name_or_path: str | PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | PathLike | None = None,
    token: str | bool | None = None,
    allow_patterns: list[str] | None = None,
) -> Path:
    """A local directory as is; a GGUF file's checkpoint folder (`models.gguf`: a local file, or `owner/repo/file.gguf`
    on the hub); otherwise the local snapshot of a hub repo, fetching the files `allow_patterns` match.

    Calling again with other patterns adds files to the same snapshot directory, which is how loaders fetch
    the index first and then only the shards they need.
    """
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        return local
    if (gguf := local_gguf(name_or_path, revision=revision, cache_dir=cache_dir, token=token)) is not None:
        return gguf_checkpoint(gguf)
    return Path(
        snapshot_download(
            str(name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            token=token,
            allow_patterns=allow_patterns,
        )
    )


def hub_commit(
    name_or_path: str | PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | PathLike | None = None,
    token: str | bool | None = None,
) -> str | None:
    """The hub commit a checkpoint is read at: its snapshot folder's name (named by hub id or by its path in the
    hub's cache), or None for another local folder. Loading at that commit afterwards reads what it names, even
    if the branch moves meanwhile."""
    root = resolve_checkpoint(
        name_or_path, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=["*.json"]
    )
    return root.name if root.parent.name == "snapshots" and re.fullmatch("[0-9a-f]{40}", root.name) else None


def load_config(
    name_or_path: str | PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | PathLike | None = None,
    token: str | bool | None = None,
) -> tuple[PretrainedConfig, BlockConfig]:
    root = resolve_checkpoint(
        name_or_path, revision=revision, cache_dir=cache_dir, token=token, allow_patterns=["*.json"]
    )
    hf_config = AutoConfig.from_pretrained(root)
    return hf_config, BlockConfig.from_hf(hf_config)


def tensor_names_for_blocks(index_or_names: Mapping | Iterable[str], start: int, end: int) -> list[str]:
    """Names of the tensors of blocks [start, end), ordered by block then name.

    Takes a parsed index file, its weight_map, or any iterable of tensor names.
    """
    if isinstance(index_or_names, Mapping) and "weight_map" in index_or_names:
        index_or_names = index_or_names["weight_map"]
    selected = []
    for name in index_or_names:
        match = _BLOCK_TENSOR.fullmatch(name)
        if match and start <= int(match[1]) < end and not name.endswith(STALE_SUFFIX):
            selected.append((int(match[1]), name))
    return [name for _, name in sorted(selected)]


def files_for_tensors(weight_map: Mapping[str, str], names: Iterable[str]) -> dict[str, list[str]]:
    """Group the wanted tensor names by the file holding them: exactly the files a loader opens."""
    files: dict[str, list[str]] = {}
    for name in names:
        files.setdefault(weight_map[name], []).append(name)
    return files


def load_span(
    name_or_path: str | PathLike,
    start: int,
    end: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    cache_dir: str | PathLike | None = None,
    reuse: BlockSpan | None = None,
    quant: str = "none",
    pack: bool = False,
) -> BlockSpan:
    """Blocks [start, end) with their weights, reading no other block's tensors; with `quant` ("int8", "nf4")
    their projections are quantized (`models.quant`) as each block loads; with `pack`, large projections of a CPU
    span are stored in oneDNN's layout (`models.packed`: a server's decode steps, merged or not, run faster).

    Modules are built on the meta device and take the loaded tensors as their parameters, so peak memory
    is about the span's weights plus one tensor. Blocks that `reuse` (a span of the same model, dtype and device
    already loaded) holds are shared with it, not read again: a server moving its span loads only what is new.
    `reuse` must be quantized alike.
    """
    _check_dtype(dtype)
    check_quant(quant)
    _, config = load_config(name_or_path, revision=revision, cache_dir=cache_dir)
    with torch.device("meta"):
        span = BlockSpan(config, start, end)
    span.rotary.to(device)
    held = set(range(reuse.start, reuse.end)) if reuse is not None else set()
    for i in held & set(range(start, end)):
        span.blocks[i - start] = reuse.blocks[i - reuse.start]
    missing = [i for i in range(start, end) if i not in held]
    if not missing:
        return span
    root, files, stored = _locate(
        name_or_path,
        lambda names: tensor_names_for_blocks(names, missing[0], missing[-1] + 1),
        revision=revision,
        cache_dir=cache_dir,
    )
    names = [name for file_names in files.values() for name in file_names]
    with _tensor_reader(root, files, dtype, device, stored) as read:
        for i in missing:
            prefix = f"model.layers.{i}."
            state = {name.removeprefix(prefix): read(name) for name in names if name.startswith(prefix)}
            span.blocks[i - start].load_state_dict(block_state_from_hf(state), strict=True, assign=True)
            quantize_block(span.blocks[i - start], quant)
            if pack:
                pack_block(span.blocks[i - start])
            logger.info("loaded block %d (%d of %d in [%d, %d))", i, i - start + 1, end - start, start, end)
    return span


def load_client_head(
    name_or_path: str | PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    revision: str | None = None,
    cache_dir: str | PathLike | None = None,
    token: str | bool | None = None,
) -> tuple[PretrainedConfig, ClientHead]:
    """The embeddings, final norm and LM head; the LM head is tied to the embeddings when the checkpoint has none,
    or has one equal to them where the config ties them (a stored head that differs is kept, as transformers does)."""
    _check_dtype(dtype)
    hub = dict(revision=revision, cache_dir=cache_dir, token=token)
    hf_config, config = load_config(name_or_path, **hub)
    root, files, stored = _locate(name_or_path, lambda names: [n for n in HEAD_TENSORS if n in names], **hub)
    with _tensor_reader(root, files, dtype, device, stored) as read:
        state = {HEAD_TENSORS[name]: read(name) for file_names in files.values() for name in file_names}
    tied = "lm_head.weight" not in state or (
        config.tie_word_embeddings and torch.equal(state["lm_head.weight"], state["embed_tokens.weight"])
    )
    with torch.device("meta"):
        head = ClientHead(replace(config, tie_word_embeddings=tied))
    if tied:
        state["lm_head.weight"] = state["embed_tokens.weight"]
    head.load_state_dict(state, strict=True, assign=True)
    if tied:
        head.lm_head.weight = head.embed_tokens.weight  # assign=True loaded two Parameters; share one again
    return hf_config, head


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"unsupported dtype {dtype}; use one of {SUPPORTED_DTYPES}")


def _locate(
    name_or_path: str | PathLike,
    select: Callable[[Iterable[str]], list[str]],
    **hub,
) -> tuple[Path, dict[str, list[str]], dict[str, str]]:
    """The checkpoint root, {file: tensor names} for the tensors `select` picks (by our names, `our_names`) and
    {our name: stored name}; fetches only those files (`hub`: `resolve_checkpoint`'s revision, cache_dir,
    token)."""
    root = resolve_checkpoint(name_or_path, allow_patterns=["*.json"], **hub)
    if (root / INDEX_FILE).is_file():
        weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
    elif (root / BIN_INDEX_FILE).is_file():
        weight_map = json.loads((root / BIN_INDEX_FILE).read_text())["weight_map"]
    else:
        root = resolve_checkpoint(name_or_path, allow_patterns=[SINGLE_FILE, BIN_FILE], **hub)
        if (root / SINGLE_FILE).is_file():
            with safe_open(root / SINGLE_FILE, framework="pt") as f:
                weight_map = dict.fromkeys(f.keys(), SINGLE_FILE)
        elif (root / BIN_FILE).is_file():
            weight_map = dict.fromkeys(_load_bin(root / BIN_FILE), BIN_FILE)
        else:
            raise FileNotFoundError(
                f"{name_or_path}: none of {INDEX_FILE}, {SINGLE_FILE}, {BIN_INDEX_FILE}, {BIN_FILE} found"
            )
    stored = our_names(weight_map)
    weight_map = {ours: weight_map[name] for ours, name in stored.items()}
    files = files_for_tensors(weight_map, select(weight_map))
    root = resolve_checkpoint(name_or_path, allow_patterns=sorted(files), **hub)
    return root, files, stored


def our_names(names: Iterable[str]) -> dict[str, str]:
    """{our name: stored name}: a checkpoint with no `model.`-prefixed tensor is a base model's, whose names
    gain the prefix (its `lm_head`, if any, stays), as transformers' causal LM loads it."""
    names = list(names)
    if any(name.startswith(BASE_PREFIX) for name in names):
        return {name: name for name in names}
    return {name if name.startswith("lm_head.") else BASE_PREFIX + name: name for name in names}


@contextmanager
def _tensor_reader(
    root: Path,
    files: dict[str, list[str]],
    dtype: torch.dtype,
    device: torch.device | str,
    stored: Mapping[str, str],
) -> Iterator[Callable[[str], torch.Tensor]]:
    """A function reading one tensor by our name (`stored` gives its name in the file), cast to `dtype` on
    `device`; each file is opened once."""
    file_of = {name: file for file, names in files.items() for name in names}
    with ExitStack() as stack:
        handles = {
            file: _load_bin(root / file)
            if file.endswith(".bin")
            else stack.enter_context(safe_open(root / file, framework="pt", device=str(device)))
            for file in files
        }

        def read(name: str) -> torch.Tensor:
            handle, key = handles[file_of[name]], stored[name]
            if isinstance(handle, dict):  # a .bin file's tensors, on the CPU
                return handle[key].to(device=device, dtype=dtype)
            return handle.get_tensor(key).to(dtype)

        yield read


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A `pytorch_model.bin` file's tensors: memory-mapped (only what is read is paged in) and unpickled with
    `weights_only` (a checkpoint from a stranger runs no code)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # the legacy (pre-zip) format cannot be memory-mapped: read it whole
        return torch.load(path, map_location="cpu", weights_only=True)
