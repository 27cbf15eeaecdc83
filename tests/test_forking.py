"""Processes forked from a warm interpreter behave as `python -m swarmllm.cli` processes started afresh: their
output, exit status, own process group, signals, and environment."""

import contextlib
import os
import re
import signal
import subprocess
import sys
import time

import psutil
import pytest
from test_cli_errors import read_output

from swarmllm.cli import main
from swarmllm.forking import ForkedProcess, forked


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1", **extra}


def _in_group(process: psutil.Process, leader: ForkedProcess) -> bool:
    try:
        return os.getpgid(process.pid) == leader.pid
    except ProcessLookupError:
        return False


def test_a_command_gives_its_output_and_exit_status():
    ok = forked(["dht", "--help"], _env())
    bad = forked(["no-such-command"], _env())
    assert isinstance(ok, ForkedProcess) and isinstance(bad, ForkedProcess)
    assert ok.wait(60) == 0 and "--initial-peers" in ok.stdout.read()
    assert bad.wait(60) == 2  # argparse's status for a usage error, its message on the same pipe
    assert "invalid choice: 'no-such-command'" in bad.stdout.read()
    assert ok.poll() == 0 and ok.returncode == 0
    # pytest names the running test in the environment: no reason for a forker of its own
    other_test = forked(["dht", "--help"], _env(PYTEST_CURRENT_TEST="another test"))
    assert other_test.wait(60) == 0 and other_test.forker_pid == ok.forker_pid


@pytest.fixture
def started():
    """The processes a test starts; when it ends, what is left of each one's group is killed (one still running
    after a failed assertion, or a bootstrap's DHT process and p2pd, which outlive a kill of its pid alone for
    ever)."""
    processes: list = []
    yield processes
    for proc in processes:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_running_process_has_its_own_group_takes_signals_and_reports_how_it_ended(started):
    env = _env()
    bootstraps = [forked(["dht"], env) for _ in range(2)]
    started.extend(bootstraps)
    for proc in bootstraps:
        assert "Bootstrap peer" in proc.stdout.readline()  # it is up: its DHT process and p2pd run beside it
        assert os.getpgid(proc.pid) == proc.pid  # a group of its own, for killpg of the whole process tree
        assert proc.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            proc.wait(0.05)
    # forked from one warm process, which is their parent and reaps them
    assert {psutil.Process(proc.pid).ppid() for proc in bootstraps} == {bootstraps[0].forker_pid}
    assert bootstraps[0].forker_pid != os.getpid()

    graceful, killed = bootstraps
    group = [
        child for child in psutil.Process(graceful.pid).children(recursive=True) if _in_group(child, graceful)
    ]
    assert {child.name() for child in group} >= {"p2pd", "python"}  # hivemind's DHT process and its daemon
    graceful.send_signal(signal.SIGTERM)
    assert graceful.wait(60) == 0
    with pytest.raises(ProcessLookupError):  # it took its whole group with it
        os.killpg(graceful.pid, 0)

    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait(60) == -signal.SIGKILL


def test_each_environment_gets_its_own_forker_and_the_child_runs_in_it(started, monkeypatch, capsys):
    # a variable read while torch imports (TORCH_LOGS, GOMP_SPINCOUNT) takes effect only in a forker started
    # under it; COLUMNS is read when the help is printed, in the child: argparse wraps its help to that width
    narrow = [forked(["serve", "--help"], _env(COLUMNS="50")) for _ in range(2)]
    usual = forked(["serve", "--help"], _env())  # (no COLUMNS: 80, as for any output that is not a terminal)
    started.extend([*narrow, usual])
    parents = [proc.forker_pid for proc in (*narrow, usual)]
    outputs = [proc.stdout.read() for proc in (*narrow, usual)]
    assert all(proc.wait(60) == 0 for proc in (*narrow, usual))
    assert parents[0] == parents[1] != parents[2]
    assert outputs[0] == outputs[1] != outputs[2]
    # and it is what the command prints run here, under the same environment
    monkeypatch.setenv("COLUMNS", "50")
    with pytest.raises(SystemExit) as done:
        main(["serve", "--help"])
    assert done.value.code == 0 and outputs[0] == capsys.readouterr().out


# hivemind's cross-process locks held for good, as a process killed or stopped while it held them leaves them; then
# a fork of that process starts a DHT peer (its readiness crosses an MPFuture) and asks it for its addresses
_HELD_LOCKS_SCRIPT = """
import os, sys
import hivemind
from hivemind.utils.mpfuture import MPFuture, SharedBytes
from swarmllm.forking import take_own_locks

for lock in (SharedBytes._lock, MPFuture._initialization_lock, MPFuture._update_lock):
    lock.acquire()
pid = os.fork()
if pid == 0:
    take_own_locks()
    dht = hivemind.DHT(start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"])
    code = 0 if dht.get_visible_maddrs() else 3
    dht.shutdown()
    os._exit(code)
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""


def test_a_forked_child_starts_its_dht_while_a_dead_sibling_holds_the_forkers_locks():
    """A forker's children each take hivemind's cross-process locks afresh (`take_own_locks`): made as hivemind was
    imported, in the forker, they were one set for every child, and one killed while holding one hung every later
    child's DHT start."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HELD_LOCKS_SCRIPT],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"the child's DHT never started: {output}")
    assert proc.returncode == 0, output


def _read_until(proc, done, timeout_s: float) -> str:
    """proc's output from now until done(output) holds (failing after `timeout_s` or at its end)."""
    text = read_output(proc, timeout_s, done)
    assert done(text), f"not there in {timeout_s} s: {text}"
    return text


def test_usr1_prints_every_threads_stack_and_the_command_runs_on(started):
    """`kill -USR1` makes a running `swarmllm` command print where each of its threads is (`cli.main`), as the
    tests' helper for a hung command asks (`test_cli_errors.stacks_of`); the command runs on and answers the next
    one too."""
    proc = forked(["dht"], _env())
    started.append(proc)
    _read_until(proc, lambda text: "--initial-peers" in text, 60)
    # a dump ends with the main thread's stack (the oldest thread comes last), down to runpy's frame of
    # `python -m`
    dumps = re.compile(r'cli\.py", line \d+ in main\n(  File .*\n)*  File .* in _run_module_as_main\n')
    proc.send_signal(signal.SIGUSR1)
    first = _read_until(proc, lambda text: dumps.search(text), 30)
    assert proc.poll() is None
    # faulthandler drops a signal that another thread takes while a dump is still being written, and its last
    # line is out before it is done: the next signal is sent again, each second, until a second dump comes
    both, deadline = first, time.monotonic() + 30
    while len(dumps.findall(both)) < 2 and time.monotonic() < deadline:
        proc.send_signal(signal.SIGUSR1)
        both += read_output(proc, 1.0, lambda text, before=both: len(dumps.findall(before + text)) >= 2)
    assert len(dumps.findall(both)) >= 2, both
    assert "(most recent call first):\n  File " in both and 'bootstrap.py", line' in both, both
    assert proc.poll() is None
