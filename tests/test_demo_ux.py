"""The first ten minutes of a new user: `swarmllm fetch`, `demo`, `generate` and `chat` run as real processes, as
a user starts them, and their output checked as a shell would use it (the answer alone on stdout)."""

import os
import subprocess
import sys
from pathlib import Path

from ports import free_port


def cli(
    *args: str, env: dict[str, str] | None = None, timeout_s: float = 60, **kwargs
) -> subprocess.CompletedProcess:
    """`swarmllm ARGS` from the venv, stdout and stderr apart (a shell's `> out.txt` takes stdout only)."""
    return subprocess.run(
        [str(Path(sys.executable).with_name("swarmllm")), *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def test_fetch_smollm2_keeps_stdout_for_the_folder(tmp_path):
    """Where the download fails (here: an index that does not answer), stdout holds nothing: no progress line
    that a script would take for the folder."""
    index = f"http://127.0.0.1:{free_port()}/simple"
    env = {
        "HOME": str(tmp_path / "home"),
        "PIP_INDEX_URL": index,
        "PIP_RETRIES": "0",
        "PIP_NO_CACHE_DIR": "1",
    }
    done = cli("fetch", "smollm2", "--dir", str(tmp_path / "smollm2"), env=env)
    assert done.returncode == 1, done
    assert done.stdout == ""
    assert "preparing SmolLM2-135M-Instruct" in done.stderr
    assert "swarmllm fetch: pip could not download" in done.stderr


def _processes_tagged(tag: str) -> list:
    """Live processes started with `UX_TAG=tag` in their environment (children inherit it, forked ones too)."""
    import psutil

    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("UX_TAG") == tag and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
        except psutil.Error:
            pass
    return found


def test_ctrl_c_while_the_demo_starts_its_monitor_leaves_no_process(tmp_path):
    """A Ctrl-C (SIGINT to the demo's process group) once the servers are up, while the monitor starts: exit
    status 130, no traceback, and nothing of the swarm left running (the monitor's DHT process and its p2pd
    outlived the demo)."""
    import signal

    tag = f"demo-ux-{os.getpid()}-{tmp_path.name}"
    demo = subprocess.Popen(
        [str(Path(sys.executable).with_name("swarmllm")), "demo"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "UX_TAG": tag, "PYTHONUNBUFFERED": "1"},
        start_new_session=True,
    )
    try:
        servers = 0
        for line in demo.stdout:
            servers += line.startswith("server ")
            if servers == 2:  # both online: the monitor starts next
                break
        assert servers == 2, demo.stderr.read()
        os.killpg(demo.pid, signal.SIGINT)
        _, err = demo.communicate(timeout=50)
        left = [(p.pid, p.name()) for p in _processes_tagged(tag)]
        assert demo.returncode == 130, err
        assert "Traceback" not in err, err
        assert left == []
    finally:
        demo.kill()
        for process in _processes_tagged(tag):  # (what the demo left, so that no other test meets it)
            process.kill()


def test_the_demo_runs_both_acts_and_leaves_no_process(tmp_path):
    """The quick start's `swarmllm demo`, whole, as a user runs it: exit status 0, tokens identical to
    transformers' before and after act 2 kills the first server of the route mid-generation, and nothing of the
    swarm left running. Its output (stdout and the logs on stderr, in the order written) says the kill before any
    log line of the failure the client then meets, and the failover after them."""
    tag = f"demo-ux-{os.getpid()}-{tmp_path.name}"
    try:
        done = subprocess.run(
            [str(Path(sys.executable).with_name("swarmllm")), "demo"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=600,
            env={**os.environ, "UX_TAG": tag, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        left = [(p.pid, p.name()) for p in _processes_tagged(tag)]
    finally:
        for process in _processes_tagged(tag):
            process.kill()
    out = done.stdout
    assert done.returncode == 0, out
    assert left == [], out
    lines = out.splitlines()
    assert "tokens identical to local transformers: True" in lines, out
    assert "tokens identical to local transformers after the kill: True" in lines, out
    (kill,) = [i for i, line in enumerate(lines) if line.startswith("killed server ")]
    assert lines[kill].endswith("with SIGKILL after token 3"), lines[kill]
    short_id = lines[kill].split()[2]
    act2 = lines.index("act 2: a spare server joins, and a server of the route is killed mid-generation")
    (failover,) = [i for i, line in enumerate(lines) if line.startswith("  failover: blocks [0, ")]
    assert [i for i, line in enumerate(lines[act2:], act2) if short_id in line][0] == kill, out
    assert kill < failover, out
