"""The first ten minutes of a new user: `swarmllm fetch`, `demo`, `generate` and `chat` run as real processes, as
a user starts them, and their output checked as a shell would use it (the answer alone on stdout)."""

import os
import socket
import subprocess
import sys
from pathlib import Path


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


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fetch_smollm2_keeps_stdout_for_the_folder(tmp_path):
    """Where the download fails (here: an index that does not answer), stdout holds nothing: no progress line
    that a script would take for the folder."""
    index = f"http://127.0.0.1:{closed_port()}/simple"
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
