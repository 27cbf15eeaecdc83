"""The command line's common mistakes, tried as a new user would (real `swarmllm` processes): each ends with one
clear line on stderr and exit status 1, with no traceback unless `-v` asks for it."""

import socket
import subprocess
import sys

import pytest

from swarmllm.local import LocalSwarm

UNREACHABLE_PEER = "/ip4/127.0.0.1/tcp/{port}/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def swarmllm(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "swarmllm.cli", *args], capture_output=True, text=True, timeout=timeout_s
    )


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens on it once the socket is closed


def said(done: subprocess.CompletedProcess, command: str) -> str:
    """The one line of explanation (asserting the run failed without a traceback)."""
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"swarmllm {command}: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_missing_model_folder_and_verbose_traceback():
    line = said(swarmllm("generate", "/nonexistent", "--prompt", "hi"), "generate")
    assert "model folder /nonexistent does not exist" in line
    verbose = swarmllm("-v", "generate", "/nonexistent", "--prompt", "hi")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert "model folder /nonexistent does not exist" in verbose.stderr.splitlines()[-1]


def test_malformed_peer_address():
    line = said(swarmllm("monitor", "--initial-peers", "garbage"), "monitor")
    assert "malformed peer address 'garbage'" in line and "/p2p/PEER_ID" in line
    line = said(swarmllm("dht", "--initial-peers", "/ip4/127.0.0.1/tcp/31337"), "dht")
    assert "malformed peer address" in line


def test_unreachable_peer():
    peer = UNREACHABLE_PEER.format(port=closed_port())
    line = said(swarmllm("dht", "--initial-peers", peer), "dht")
    assert "none of the initial peers answered" in line and peer in line


def test_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = said(swarmllm("dht", "--port", str(port)), "dht")
        assert f"port {port} on 127.0.0.1 is already in use" in line
        line = said(swarmllm("monitor", "--port", str(port)), "monitor")
        assert f"port {port} on 127.0.0.1 is already in use" in line


@pytest.fixture(scope="module")
def half_swarm(llama_checkpoint):
    """A swarm whose only server holds blocks 0..1 of the model's 4."""
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_server(str(llama_checkpoint), (0, 2), extra=["--throughput", "50", "--bandwidth", "1000"])
        yield swarm


def test_no_server_for_some_blocks(half_swarm, llama_checkpoint):
    done = swarmllm(
        "generate",
        str(llama_checkpoint),
        "--initial-peers",
        *half_swarm.initial_peers,
        "--prompt",
        "hello world",
        "--wait-for-blocks",
        "1",
    )
    line = said(done, "generate")
    assert "no online server holds blocks 2..3 of 4" in line and "swarmllm serve" in line
