"""Edges of tensor parallelism and of the ladder commands: a span whose shapes do not split over the ranks, a rank
that dies under a running span (SIGKILL, a real fault), and `swarmllm ladder` given a user's mistakes."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal

import pytest
import torch
import torch.distributed as dist

from swarmllm.cli import main
from swarmllm.models import load_span
from swarmllm.models.convert import convert_to_ladder
from swarmllm.server.tp import TensorParallelSpan
from swarmllm.server.tp_backend import TensorParallelBackend

ATOL = 1e-5


def _spawned() -> set:
    return {p for p in multiprocessing.active_children() if p.name.startswith("SpawnProcess")}


def test_a_span_whose_heads_do_not_split_is_refused_and_leaves_nothing_behind(checkpoints):
    """The tiny llama has 2 kv heads: --tp 4 is refused, and the process can still run a --tp 2 span after it
    (the refusal left no process group joined and no rank running)."""
    path = checkpoints("llama")
    before = _spawned()
    with pytest.raises(ValueError, match="num_kv_heads=2 does not split over 4"):
        TensorParallelSpan(path, 0, 4, world=4, threads=1)
    assert not dist.is_initialized()
    assert _spawned() == before
    whole = load_span(path, 0, 4)
    hidden = torch.randn(2, 5, whole.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with TensorParallelSpan(path, 0, 4, world=2, threads=1) as sharded, torch.no_grad():
        torch.testing.assert_close(sharded.forward(hidden), whole(hidden), atol=ATOL, rtol=0)


def test_a_backend_whose_rank_died_fails_its_steps_and_still_shuts_down(checkpoints):
    """SIGKILL of rank 1 under a serving backend: the next step fails at once (no hang), and the backend's
    shutdown returns, leaving no process group and no rank behind, so the server can leave cleanly."""
    path = checkpoints("llama")
    before = _spawned()
    sharded = TensorParallelSpan(path, 0, 4, world=2, threads=1)
    backend = TensorParallelBackend(sharded, cache_tokens=100)
    hidden = torch.randn(1, 4, sharded.config.hidden_size, generator=torch.Generator().manual_seed(1))

    async def steps():
        session = backend.open_session(0, 4, 1, 16)
        want = load_span(path, 0, 4)(hidden)
        got, _ = await backend.step(session, hidden[:, :3], 0, None)
        torch.testing.assert_close(got, want[:, :3], atol=ATOL, rtol=0)
        (worker,) = sharded._workers
        os.kill(worker.pid, signal.SIGKILL)
        worker.join()
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(backend.step(session, hidden[:, 3:], 3, None), timeout=60)

    try:
        with torch.no_grad():
            asyncio.run(steps())
    finally:
        backend.shutdown()
    assert not dist.is_initialized()
    assert _spawned() == before


@pytest.fixture
def ladder_folder(checkpoints, tmp_path):
    path = convert_to_ladder(checkpoints("llama"), tmp_path / "ladder", 2, 4)
    data = tmp_path / "data.txt"
    words = "the cat sat on the mat and the dog ran to the sun . ".split()
    data.write_text(" ".join(words[(i * 7) % len(words)] for i in range(400)))
    return path, data


@pytest.mark.parametrize(
    "mistake, needle",
    [
        ("convert into a folder that is not empty", "not empty"),
        ("retrain a folder no conversion wrote, without --source", "--source"),
        ("retrain on a data file that does not exist", "missing.txt"),
        ("retrain on sequences of 1 token", "--seq-len"),
        ("retrain on sequences of 0 tokens", "--seq-len"),
        ("retrain with batches of 0 sequences", "--batch-size"),
        ("retrain keeping all of the data for perplexity", "--held-out"),
        ("retrain for a negative number of steps", "--steps"),
    ],
)
def test_ladder_commands_refuse_a_mistake_in_one_line(
    ladder_folder, checkpoints, tmp_path, capsys, mistake, needle
):
    """Like a layer range outside the model: exit status 2 and one line naming the problem, no traceback, and the
    checkpoint's files as they were."""
    path, data = ladder_folder
    source = checkpoints("llama")
    retrain = ["ladder", "retrain", str(path), "--data", str(data), "--steps", "1", "--seq-len", "8"]
    argv = {
        "convert into a folder that is not empty": [
            "ladder",
            "convert",
            str(source),
            str(path),
            "--layers",
            "0:2",
        ],
        "retrain a folder no conversion wrote, without --source": [
            "ladder",
            "retrain",
            str(source),
            "--data",
            str(data),
            "--steps",
            "1",
        ],
        "retrain on a data file that does not exist": [
            *retrain[:4],
            str(tmp_path / "missing.txt"),
            *retrain[5:],
        ],
        "retrain on sequences of 1 token": [*retrain[:-1], "1"],
        "retrain on sequences of 0 tokens": [*retrain[:-1], "0"],
        "retrain with batches of 0 sequences": [*retrain, "--batch-size", "0"],
        "retrain keeping all of the data for perplexity": [*retrain, "--held-out", "1"],
        "retrain for a negative number of steps": [*retrain[:6], "-1", *retrain[7:]],
    }[mistake]
    files = {f.name: f.read_bytes() for d in (path, source) for f in d.iterdir() if f.is_file()}
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and needle in err
    assert err.strip().count("\n") == 0, err
    assert {f.name: f.read_bytes() for d in (path, source) for f in d.iterdir() if f.is_file()} == files
