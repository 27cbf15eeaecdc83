"""GGUF files (llama.cpp's and Ollama's format) as checkpoints: `swarmllm serve ./model.Q4_K_M.gguf`, and a client
of the same file, as with a checkpoint folder; a file on the hub as `owner/repo/file.gguf` (transformers'
`from_pretrained("owner/repo", gguf_file="file.gguf")`), downloaded once into the hub's cache.

A GGUF file is dequantized once, by `transformers` (with the `gguf` package), into a float32 checkpoint folder with
its tokenizer, kept under `SWARMLLM_GGUF_DIR` (default `~/.cache/swarmllm/gguf`), in a folder of its own per file
(by path, size and modification time) named as the file: a model's DHT prefix is its folder's or file's last name,
so servers and clients of one GGUF file name the same model whichever of the two they were given.
"""

from __future__ import annotations

import hashlib
import logging
import os
from os import PathLike
from pathlib import Path

from swarmllm.models.built import built_once

logger = logging.getLogger(__name__)


def gguf_dir() -> Path:
    """Where converted GGUF files are kept: `SWARMLLM_GGUF_DIR`, else ~/.cache/swarmllm/gguf."""
    return Path(os.environ.get("SWARMLLM_GGUF_DIR", Path.home() / ".cache" / "swarmllm" / "gguf"))


def is_gguf(name_or_path: str | PathLike) -> bool:
    path = Path(name_or_path).expanduser()
    return path.suffix.lower() == ".gguf" and path.is_file()


def hub_gguf(name: str) -> tuple[str, str] | None:
    """(repo id, file) of a GGUF file on the hub named `owner/repo/file.gguf` (a name that is no local path)."""
    parts = name.split("/")
    local = name.startswith(("/", ".", "~")) or Path(name).expanduser().exists()
    if local or len(parts) < 3 or not name.lower().endswith(".gguf") or not all(parts):
        return None
    return "/".join(parts[:2]), "/".join(parts[2:])


def local_gguf(
    name_or_path: str | PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | PathLike | None = None,
    token: str | bool | None = None,
) -> Path | None:
    """The GGUF file a model name gives: a local file, or a hub one (`hub_gguf`) fetched into the hub's cache;
    None for any other name."""
    if is_gguf(name_or_path):
        return Path(name_or_path).expanduser()
    if (hub := hub_gguf(str(name_or_path))) is None:
        return None
    from huggingface_hub import hf_hub_download

    repo, file = hub
    return Path(hf_hub_download(repo, file, revision=revision, cache_dir=cache_dir, token=token))


def gguf_checkpoint(gguf: str | PathLike) -> Path:
    """The checkpoint folder of GGUF file `gguf`, converted on first use (by one process at a time: `built_once`).
    Named as the file is, not as the file a link leads to (the hub's cache links names to blobs)."""
    source = Path(gguf).expanduser().absolute()
    path = source.resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]

    def convert(folder: Path) -> None:
        logger.warning("converting %s (GGUF) into a float32 checkpoint in %s, once", source, gguf_dir())
        convert_gguf(source, folder)

    return built_once(gguf_dir() / key / source.name, convert)


def convert_gguf(gguf: Path, out: Path) -> None:
    """A GGUF file dequantized by `transformers` into a float32 `save_pretrained` folder with its tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.utils.logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are plain float32 tensors now; only the GGUF marker keeps transformers from saving them
    del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
