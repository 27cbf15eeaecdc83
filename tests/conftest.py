"""Shared fixtures: tiny checkpoints built once per test session."""

import pytest

from swarmllm.models.tiny import make_tiny_checkpoint


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
