"""Start-up edges of `swarmllm serve` and its clients, tried as real `swarmllm` processes: an initial peer whose
DHT is frozen (its libp2p daemon still answers, the DHT behind it never does), and `--tp N` refusals. Each ends
with one clear line and the exit status the command line gives such a mistake (`tests/test_cli_errors.py`)."""

import os
import signal

import psutil
import pytest
from test_cli_errors import said, swarmllms

from swarmllm.dht.info import MAX_PREFIX_CHARS, MAX_RECORD_BYTES
from swarmllm.forking import forked
from swarmllm.local import LocalSwarm


@pytest.fixture
def frozen_bootstrap():
    """A bootstrap peer (`swarmllm dht`) whose DHT process is stopped: its p2pd accepts connections and streams,
    and no DHT request is ever answered."""
    with LocalSwarm() as local:
        local.start_bootstrap()
        dht_processes = [  # (its other children: the p2pd daemon, torch's shared-memory manager)
            child
            for child in psutil.Process(local.bootstrap.proc.pid).children(recursive=True)
            if "python" in child.name() and "p2pd" not in " ".join(child.cmdline())
        ]
        assert dht_processes, "the bootstrap peer has no DHT process"
        for process in dht_processes:
            process.send_signal(signal.SIGSTOP)
        try:
            yield local.initial_peers
        finally:
            for process in dht_processes:
                process.send_signal(signal.SIGCONT)


def test_a_frozen_initial_peer_is_one_line_for_serve_and_clients(frozen_bootstrap, llama_checkpoint):
    """The DHT's bootstrap gives up on the frozen peer (hivemind's RuntimeError 'DHTNode bootstrap failed'):
    `serve`, `generate` and `chat` each say the initial peers did not answer, exit 1, no traceback."""
    peers = ["--initial-peers", *frozen_bootstrap]
    model = str(llama_checkpoint)
    serve, generate, chat = swarmllms(
        ["serve", model, "--blocks", "0:2", *peers],
        ["generate", model, "--prompt", "hi", *peers],
        ["chat", model, *peers],
        timeout_s=60,
    )
    for done, command in ((serve, "serve"), (generate, "generate"), (chat, "chat")):
        line = said(done, command)
        assert "none of the initial peers answered" in line and frozen_bootstrap[0] in line, line


def test_tp_refused_for_the_compile_the_environment_asks_for(llama_checkpoint):
    """SWARMLLM_COMPILE=1 sets --compile's default: a --tp refusal names the variable, not a flag never given."""
    env = {**os.environ, "SWARMLLM_COMPILE": "1"}
    proc = forked(["serve", str(llama_checkpoint), "--new-swarm", "--blocks", "0:4", "--tp", "2"], env)
    code, output = proc.wait(60), proc.stdout.read()
    assert code == 2, output
    assert "Traceback" not in output, output
    (line,) = [line for line in output.splitlines() if line.startswith("swarmllm serve: ")]
    assert "SWARMLLM_COMPILE=1" in line and "--no-compile" in line, line


@pytest.mark.parametrize("tp", ["0", "-2"])
def test_a_tp_of_no_processes_is_refused_as_other_counts_are(tp):
    """--tp 0 or below is argparse's one line about --tp (exit 2), as --num-blocks 0 is, before the model or
    the peers are looked at."""
    (done,) = swarmllms(["serve", "/nonexistent", "--tp", tp])
    assert done.returncode == 2, done.stdout
    assert "argument --tp: expected" in done.stdout, done.stdout


def test_a_record_too_big_for_peers_is_refused_at_start(llama_checkpoint):
    """Peers store records of at most MAX_RECORD_BYTES and prefixes of at most MAX_PREFIX_CHARS (`dht.membership`,
    `dht.info`): a server whose own record would be bigger (a long --public-name, many --adapters) would load its
    blocks and serve unseen. It stops at start with one line, as one given too long a --dht-prefix does."""
    model, blocks = str(llama_checkpoint), ["--new-swarm", "--blocks", "0:2"]
    big, long_prefix = swarmllms(
        ["serve", model, *blocks, "--public-name", "x" * MAX_RECORD_BYTES],
        ["serve", model, *blocks, "--dht-prefix", "x" * (MAX_PREFIX_CHARS + 1)],
    )
    line = said(big, "serve")
    assert "--public-name" in line and f"at most {MAX_RECORD_BYTES}" in line, line
    line = said(long_prefix, "serve")
    assert "--dht-prefix" in line and f"at most {MAX_PREFIX_CHARS}" in line, line
