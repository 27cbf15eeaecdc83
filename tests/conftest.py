"""Shared fixtures: tiny checkpoints built once per test session."""

import getpass
import os
import tempfile
from pathlib import Path

# Under pytest-xdist (the README's `-n 2`) each worker is a host of its own: its servers register in their own
# folder (server/host.py reads the temp dir), so one worker's servers never count another's when they split the
# cores, and its own torch takes its share of the cores. torch.compile's disk cache stays the one they share.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    shared = Path(tempfile.gettempdir())
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(shared / f"torchinductor_{getpass.getuser()}"))
    own = shared / f"swarmllm-tests-{worker}"
    own.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(own)
    tempfile.tempdir = None

import pytest  # noqa: E402
import torch  # noqa: E402

from swarmllm.models.tiny import make_tiny_checkpoint  # noqa: E402

if worker:
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Servers of the tiny test models would torch.compile their decode step by default (server/decode.py), seconds
# per start; the suite's servers run eagerly, and the tests of compiling ask for it.
os.environ.setdefault("SWARMLLM_COMPILE", "0")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    built = {}

    def get(family: str, **kwargs):
        key = (family, tuple(sorted(kwargs.items())))
        if key not in built:
            name = "-".join([family, *(f"{k}{v}" for k, v in sorted(kwargs.items()))])
            built[key] = make_tiny_checkpoint(root / name, family, **kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session")
def llama_checkpoint(checkpoints):
    return checkpoints("llama")
