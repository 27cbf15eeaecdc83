"""Shared fixtures: tiny checkpoints built once per test session."""

import os

import pytest

from swarmllm.models.tiny import make_tiny_checkpoint

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
