"""The benchmark scripts (benchmarks/*.py) are deliverables the README cites, but they run for minutes: here each
one's `--help` runs (its imports and its argument parser), all in one interpreter that imports torch once."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
# common.py is the scripts' library; petals_client.py imports Petals, so it runs only inside Petals' own venv
NOT_SCRIPTS = {"common.py", "petals_client.py"}
SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("*.py") if p.name not in NOT_SCRIPTS)

RUNNER = textwrap.dedent(
    """
    import contextlib, io, json, runpy, sys, traceback
    bench, out_path, names = sys.argv[1], sys.argv[2], sys.argv[3:]
    sys.path.insert(0, bench)
    results = {}
    for name in names:
        text = io.StringIO()
        sys.argv = [f"{bench}/{name}", "--help"]
        try:
            with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text):
                runpy.run_path(sys.argv[0], run_name="__main__")
            code = "returned without exiting"
        except SystemExit as e:
            code = e.code or 0
        except BaseException:
            code = traceback.format_exc()
        results[name] = {"code": code, "out": text.getvalue()}
    with open(out_path, "w") as f:
        json.dump(results, f)
    """
)


@pytest.fixture(scope="module")
def help_runs(tmp_path_factory) -> dict[str, dict]:
    out = tmp_path_factory.mktemp("bench-help") / "help.json"
    subprocess.run(
        [sys.executable, "-c", RUNNER, str(BENCHMARKS), str(out), *SCRIPTS],
        cwd=BENCHMARKS.parent,
        timeout=300,
        check=True,
    )
    return json.loads(out.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0(help_runs, script):
    run = help_runs[script]
    assert run["code"] == 0, run["code"]
    assert script in run["out"], run["out"]  # its usage line


def test_chain_passes_server_flags():
    # `--server-args ...` takes `swarmllm serve` flags; a lone chain length stops right after parsing
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "chain.py"), "--servers", "1", "--server-args", "--no-compile"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "--servers needs at least two chain lengths" in out.stderr, out.stderr


def test_ladder_tp_one_repeat():
    # the smallest run: one sample per variant (its "IQR" is that sample), the table printed, nothing recorded
    results = (BENCHMARKS / "RESULTS.md").read_bytes()
    args = ["--latencies-ms", "0", "--hidden", "128", "--layers", "1", "--tokens", "1"]
    args += ["--repeats", "1", "--calls", "1", "--warmup", "0", "--no-record"]
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "ladder_tp.py"), *args], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = [line for line in out.stdout.splitlines() if line.startswith("| 0 |")]
    standard_ms, ladder_ms, no_comm_ms = (float(cell.split()[0]) for cell in row.split("|")[2:5])
    assert min(standard_ms, ladder_ms, no_comm_ms) > 0, row
    assert (BENCHMARKS / "RESULTS.md").read_bytes() == results


def test_ladder_tp_refuses_a_width_that_does_not_split_before_starting_ranks():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "ladder_tp.py"), "--hidden", "64", "--no-record"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--hidden 64: num_heads=1 does not split over 2 tensor-parallel ranks" in out.stderr
    assert "Traceback" not in out.stderr
