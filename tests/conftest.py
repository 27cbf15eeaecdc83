"""Shared fixtures: tiny checkpoints built once per test session."""

import os
import tempfile
from pathlib import Path

import pytest

from swarmllm import spin

# A test process is a client of the swarms it starts (and runs transformers' oracles beside them): as a client, its
# OpenMP workers sleep at once after a parallel region instead of spinning on a core its servers need
# (swarmllm/spin.py). libgomp reads the count once, as torch loads; the variable goes again after that, so the
# servers the tests start take a server's count.
_client_spin = "GOMP_SPINCOUNT" not in os.environ
spin.choose(spin.CLIENT)
import torch  # noqa: E402
from torch._inductor.runtime.cache_dir_utils import default_cache_dir  # noqa: E402

if _client_spin:
    os.environ.pop("GOMP_SPINCOUNT", None)

# Under pytest-xdist (the README's `-n 3`) each worker is a host of its own: its servers register in their own
# folder (server/host.py reads the temp dir), so one worker's servers never count another's when they split the
# cores, and its own torch takes its share of the cores. torch.compile's disk cache stays the one they share.
if worker := os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    own = Path(tempfile.gettempdir()) / f"swarmllm-tests-{worker}"
    own.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(own)
    tempfile.tempdir = None
    torch.set_num_threads(max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

from swarmllm.models.tiny import make_tiny_checkpoint  # noqa: E402 - after the temp dir is the worker's

# Servers of the tiny test models would torch.compile their decode step by default (server/decode.py), seconds
# per start; the suite's servers run eagerly, and the tests of compiling ask for it.
os.environ.setdefault("SWARMLLM_COMPILE", "0")

# The files that take longest (seconds of test time in a 3-worker run; CI prints its 30 slowest tests), collected
# first: with `--dist loadfile` each file goes whole to the next free worker in collection order, and the longest
# ones, collected near the end (tests/test_*.py), kept one worker busy alone after the others had finished.
LONGEST_FIRST = (
    "tests/test_api.py",  # 404
    "tests/test_swarm.py",  # 128
    "tests/server/test_decode.py",  # 114
    "tests/server/test_startup_leftovers_s34.py",  # 109
    "tests/test_slow_network.py",  # 87
    "tests/test_chaos.py",  # 83
    "tests/server/test_frozen_tp_rank.py",  # 80
    "tests/test_failover.py",  # 78
    "tests/client/test_failover_with_rewrites.py",  # 74
    "tests/fuzz/test_fuzz_handlers.py",  # 74
    "tests/test_finetune_faults.py",  # 68
    "tests/client/test_long_lived_client.py",  # 63
    "tests/models/test_panels.py",  # 58
    "tests/test_feature_crossings_two.py",  # 57
    "tests/server/test_tp.py",  # 56
    "tests/test_cli_faces_review.py",  # 50
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if gone := [path for path in LONGEST_FIRST if not (config.rootpath / path).is_file()]:
        raise pytest.UsageError(f"tests/conftest.py's LONGEST_FIRST names files that are gone: {gone}")
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    # (a stable sort: each file's tests, and the other files, stay in the order collected)
    items.sort(key=lambda item: rank.get(item.nodeid.split("::")[0], len(rank)))


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


@pytest.fixture(scope="module")
def local():
    """A bootstrap peer for a module's tests, which add their servers (`LocalSwarm`: real processes on 127.0.0.1)."""
    from swarmllm.local import LocalSwarm

    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        yield swarm


@pytest.fixture(scope="module")
def one_torch_thread():
    """For files of hundreds of tiny forwards (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): a
    second torch thread costs only its handoffs, and on a loaded machine waits for a core. (Under the README's
    xdist command each worker already has one.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def browser():
    """A headless Chromium page (tests/browser.py); the test is skipped where none is installed."""
    from browser import Browser, find_chromium

    executable = find_chromium()
    if executable is None:
        pytest.skip("no chromium (apt-get install chromium)")
    page = Browser(executable)
    yield page
    page.close()
