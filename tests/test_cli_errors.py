"""The command line's common mistakes, tried as a new user would (real `swarmllm` processes): each ends with one
clear line on stderr and exit status 1, with no traceback unless `-v` asks for it."""

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from ports import free_port

from swarmllm.forking import forked
from swarmllm.local import LocalSwarm
from swarmllm.models import load_config
from swarmllm.models.lora import LoraSettings, lora_shapes, write_peft_adapter

UNREACHABLE_PEER = "/ip4/127.0.0.1/tcp/{port}/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


def swarmllm(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess:
    (done,) = swarmllms(list(args), timeout_s=timeout_s)
    return done


def swarmllms(*commands: list[str], timeout_s: float = 120) -> list[subprocess.CompletedProcess]:
    """Several `swarmllm` runs at once, forked from a warm interpreter (`swarmllm.forking`: a cold one spends
    seconds importing). A forked process has one pipe for stdout and stderr: both fields hold it."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    procs = [forked(args, env) for args in commands]
    done = []
    for args, proc in zip(commands, procs, strict=True):
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            stacks = stacks_of(proc)
            for other in procs:
                other.kill()
            pytest.fail(
                f"`swarmllm {' '.join(args)}` did not end in {timeout_s} s; its output, then its stacks:\n{stacks}"
            )
        output = proc.stdout.read()
        done.append(subprocess.CompletedProcess(args, proc.returncode, output, output))
    return done


def read_output(proc, timeout_s: float, done=lambda text: False) -> str:
    """proc's output from now on, until done(output) holds, it ends, or `timeout_s` has passed."""
    fd, text = proc.stdout.fileno(), ""
    os.set_blocking(fd, False)
    deadline = time.monotonic() + timeout_s
    while (
        not done(text) and (left := deadline - time.monotonic()) > 0 and select.select([fd], [], [], left)[0]
    ):
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        text += chunk.decode(errors="replace")
    return text


def stacks_of(proc, wait_s: float = 5.0) -> str:
    """What a hung `swarmllm` process printed, then every thread's stack of it and of its DHT process (a SIGUSR1
    to its group: `cli.main`), as much as comes within `wait_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGUSR1)
    return read_output(proc, wait_s)[-20000:]


def said(done: subprocess.CompletedProcess, command: str) -> str:
    """The one line of explanation (asserting the run failed without a traceback)."""
    assert done.returncode == 1, done
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith(f"swarmllm {command}: ")]
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_missing_model_folder_api_flags_and_verbose_traceback(checkpoints):
    model, other = checkpoints("llama"), checkpoints("llama", vocab_size=300)
    plain, verbose, keyless, prefixes, draft, device, draft_device, gen_device, chat_draft = swarmllms(
        ["generate", "/nonexistent", "--prompt", "hi"],
        ["-v", "generate", "/nonexistent", "--prompt", "hi"],
        ["api", "/nonexistent", "--api-key", " "],
        ["api", "/a", "/b", "--dht-prefix", "a"],
        ["chat", str(model), "--draft-model", str(other)],
        ["api", str(model), "--device", "cuda:63"],
        ["api", str(model), "--device", "cuda", "--draft-model", str(other)],
        ["generate", str(model), "--prompt", "hi", "--device", "cuda:63"],
        ["chat", str(model), "--device", "cuda", "--draft-model", str(other)],
    )
    assert "model folder /nonexistent does not exist" in said(plain, "generate")
    assert "an API key must not be empty" in said(keyless, "api")
    assert "--dht-prefix was given 1 times for 2 models: once per model" in said(prefixes, "api")
    assert f"the draft model {other} has a vocabulary of 300 tokens" in said(draft, "chat")
    assert "--device cuda:63: " in said(device, "api")  # no CUDA here, or fewer than 64 devices
    assert "--draft-model runs its draft on the CPU" in said(draft_device, "api")
    assert "--device cuda:63: " in said(gen_device, "generate")
    assert "--draft-model runs its draft on the CPU" in said(chat_draft, "chat")
    assert verbose.returncode == 1 and "Traceback" in verbose.stderr
    assert "model folder /nonexistent does not exist" in verbose.stderr.splitlines()[-1]


def test_lora_modules_that_cannot_be_served_are_one_line(checkpoints, tmp_path):
    """`swarmllm api --lora-modules NAME=DIR`: each mistake is named before anything loads."""
    model, other = checkpoints("llama"), checkpoints("llama", vocab_size=300)
    settings = LoraSettings(rank=2, alpha=4, modules=("q_proj",))
    _, config = load_config(model)
    tensors = {n: torch.zeros(s) for n, s in lora_shapes(config, settings, range(config.num_layers)).items()}
    write_peft_adapter(tmp_path / "ours", settings, tensors, str(model))
    write_peft_adapter(tmp_path / "theirs", settings, tensors, "/elsewhere/some-model")
    pairs, taken, empty, unknown = swarmllms(
        ["api", str(model), "--lora-modules", "styled"],
        ["api", str(model), "--name", "m", "--lora-modules", f"m={tmp_path / 'ours'}"],
        ["api", str(model), "--lora-modules", f"styled={tmp_path}"],
        ["api", str(model), str(other), "--lora-modules", f"styled={tmp_path / 'theirs'}"],
    )
    assert "--lora-modules takes NAME=DIR pairs, not 'styled'" in said(pairs, "api")
    assert "--lora-modules m: another model of this API has that name" in said(taken, "api")
    assert f"--lora-modules styled: {tmp_path} holds no adapter_config.json" in said(empty, "api")
    line = said(unknown, "api")
    assert "names the base model '/elsewhere/some-model', which is none of the models served" in line


def test_malformed_peer_address():
    monitor, dht = swarmllms(
        ["monitor", "--initial-peers", "garbage"], ["dht", "--initial-peers", "/ip4/127.0.0.1/tcp/31337"]
    )
    line = said(monitor, "monitor")
    assert "malformed peer address 'garbage'" in line and "/p2p/PEER_ID" in line
    assert "malformed peer address" in said(dht, "dht")


def test_unreachable_peer():
    peer = UNREACHABLE_PEER.format(port=free_port())
    line = said(swarmllm("dht", "--initial-peers", peer), "dht")
    assert "none of the initial peers answered" in line and peer in line


def test_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        dht, monitor = swarmllms(["dht", "--port", str(port)], ["monitor", "--port", str(port)])
        assert f"port {port} on 127.0.0.1 is already in use" in said(dht, "dht")
        assert f"port {port} on 127.0.0.1 is already in use" in said(monitor, "monitor")


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


def test_chat_waits_for_blocks_as_long_as_told(half_swarm, llama_checkpoint):
    """`swarmllm chat` takes `--wait-for-blocks` as generate does (it had no such flag, and waited the client's
    60 s before its one line)."""
    done = subprocess.run(
        [sys.executable, "-m", "swarmllm.cli", "chat", str(llama_checkpoint), "--initial-peers"]
        + [*half_swarm.initial_peers, "--wait-for-blocks", "1"],
        input="hello\n",
        capture_output=True,
        text=True,
        timeout=50,  # well under the 60 s the client waits by default
    )
    assert "no online server holds blocks 2..3 of 4" in said(done, "chat")


@pytest.mark.parametrize(
    "args",
    [
        ["api", "m", "--max-concurrent", "0"],  # a pool of no workers: a traceback at start
        ["api", "m", "--keep-sessions", "-1"],
        ["api", "m", "--context-length", "0"],
        ["serve", "m", "--batch-wait-ms", "nan"],
        ["serve", "m", "--batch-wait-ms", "-5"],
        ["serve", "m", "--arena-length", "-1"],
        ["generate", "m", "--prompt", "x", "--temperature", "-1"],
        ["generate", "m", "--prompt", "x", "--wait-for-blocks", "nan"],
        ["chat", "m", "--temperature", "inf"],
    ],
)
def test_values_no_run_can_use_are_refused_when_parsed(args, capsys):
    """Counts, waits and temperatures outside what they can mean are argparse's one line (exit 2), not a
    traceback, a hang or a silent default later."""
    from swarmllm.cli import build_parser

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(args)
    assert done.value.code == 2
    assert f"argument {args[-2]}" in capsys.readouterr().err
