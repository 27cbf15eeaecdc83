"""GGUF files (llama.cpp's and Ollama's format) as checkpoints: `swarmllm serve ./model.Q4_K_M.gguf`, and a client
of the same file, as with a checkpoint folder.

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


def gguf_checkpoint(gguf: str | PathLike) -> Path:
    """The checkpoint folder of GGUF file `gguf`, converted on first use (by one process at a time: `built_once`)."""
    path = Path(gguf).expanduser().resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:16]

    def convert(folder: Path) -> None:
        logger.warning("converting %s (GGUF) into a float32 checkpoint in %s, once", path, gguf_dir())
        convert_gguf(path, folder)

    return built_once(gguf_dir() / key / path.name, convert)


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
