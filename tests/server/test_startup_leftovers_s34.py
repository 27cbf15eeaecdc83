"""Start-up leftovers of `swarmllm serve`: a server whose own DHT process fails while it chooses its blocks, and
what a server announces while it loads (others choose their blocks by it)."""

import contextlib
import errno
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from test_cli_errors import said
from test_dht_resilience import dht_process

from swarmllm.balancing import choose_blocks
from swarmllm.client.directory import Directory
from swarmllm.client.loop import run_sync
from swarmllm.forking import forked
from swarmllm.local import LocalSwarm
from swarmllm.models import load_span
from swarmllm.server.throughput import cached_throughput

BOUND_S = 90  # seconds; only to fail a test instead of hanging


@contextlib.contextmanager
def held_server(args: list[str], env: dict[str, str] | None = None):
    """`swarmllm ARGS` (a serve) that stops the first time it counts the host's servers (`server.host`): its
    registry, under a TMPDIR of its own, holds a FIFO as an entry, which it reads once we open and close it
    (`open_gate`). Without --num-blocks or --blocks that is inside `_choose_span`, after its DHT started and
    before it looks the swarm up; with --num-blocks or --blocks, after it announced itself joining and loaded its
    blocks.
    `env`: more environment variables for it."""
    with tempfile.TemporaryDirectory(prefix="s34-") as tmp:  # (short: p2pd's unix sockets live under TMPDIR)
        registry = Path(tmp) / f"swarmllm-servers-{os.getuid()}" / "cpu"
        registry.mkdir(parents=True)
        fifo = registry / str(os.getpid())  # a live process's entry: its start time is read from it
        os.mkfifo(fifo)
        proc = forked(args, {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", "TMPDIR": tmp})
        try:
            yield proc, fifo
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def open_gate(fifo: Path, proc) -> int:
    """Our write end of `fifo`, once the server opened it to read (it waits there until we close it). The FIFO is
    gone then: later counts of the host's servers do not wait."""
    began = time.monotonic()
    while True:
        try:
            gate = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            fifo.unlink()
            return gate
        except OSError as e:  # ENXIO: no reader yet
            assert e.errno == errno.ENXIO, e
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() - began < BOUND_S, "the server never counted the host's servers"
        time.sleep(0.05)


@pytest.mark.parametrize(
    ("fault", "said_why"), [("suspend", "did not answer a look-up of the swarm in 4 s"), ("kill", "exited")]
)
def test_a_dht_that_fails_while_the_server_chooses_its_blocks_is_one_line(llama_checkpoint, fault, said_why):
    """A server that chooses its span looks the swarm up through its own DHT process. Frozen right then
    (SIGSTOPped: a wedged event loop alike), the look-up has no answer within --dht-timeout; killed, none ever comes: `serve`
    says which in one line, exits 1 in a bounded time, and leaves no process behind (before: a TimeoutError or
    DhtGone traceback, "unexpected error"). --num-blocks takes the same look-up; here the span's length comes
    from --max-memory, which counts the host's servers first (where `held_server` holds it)."""
    args = ["serve", str(llama_checkpoint), "--new-swarm", "--max-memory", "64MiB", "--throughput", "100"]
    args += ["--dht-timeout", "4"]
    with held_server(args) as (proc, fifo):
        gate = open_gate(fifo, proc)
        children = psutil.Process(proc.pid).children(recursive=True)
        getattr(dht_process(proc.pid), fault)()
        began = time.monotonic()
        os.close(gate)  # an empty entry: the server goes on to look the swarm up
        try:
            proc.wait(BOUND_S)
        except subprocess.TimeoutExpired:
            raise AssertionError("the server did not exit") from None
        output = proc.stdout.read()
        line = said(subprocess.CompletedProcess(args, proc.returncode, output, output), "serve")
        assert "choose" in line and "DHT process" in line and said_why in line, line
        assert time.monotonic() - began < BOUND_S
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == [], alive


async def planned_spans(initial_peers: list[str], dht_prefix: str) -> dict[str, tuple[int, int, float, str]]:
    """Each server's (start, end, throughput, state) as one choosing its blocks reads them (`found_servers`)."""
    found = await found_servers(initial_peers, dht_prefix)
    return {s.peer_id: (s.start_block, s.end_block, s.throughput, s.state.value) for s in found}


def test_a_server_joining_after_another_counts_the_loading_one_at_a_likely_throughput(llama_checkpoint):
    """Pinned servers hold blocks [0, 2) at 10 steps/s and [2, 4) at 20. A joins with --num-blocks 2 and takes
    [0, 2), the weakest; while it loads, B joins with --num-blocks 2. B should take [2, 4), as it would by A's
    measured throughput (a tiny block runs far above 10 steps/s): A counted at the placeholder of 1.0 it announced
    while loading left [0, 2) at 11 < 20, and B piled onto A's blocks (the bottleneck stayed at 20 until a move)."""
    model, prefix = str(llama_checkpoint), llama_checkpoint.name
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers([(model, (0, 2), ["--throughput", "10"]), (model, (2, 4), ["--throughput", "20"])])
        joiner = ["serve", model, "--initial-peers", *local.initial_peers, "--num-blocks", "2"]
        with held_server(joiner) as (proc, fifo):
            gate = open_gate(fifo, proc)  # A announced itself joining and loaded its blocks; it waits here
            (a_id, (a_start, a_end, _, a_state)), *_ = [
                (peer, span)
                for peer, span in run_sync(planned_spans(local.initial_peers, prefix)).items()
                if span[3] == "joining"
            ]
            assert (a_start, a_end, a_state) == (0, 2, "joining")
            b = local.add_server(model, extra=["--num-blocks", "2", "--throughput", "15"])
            os.close(gate)
            for line in proc.stdout:
                if '"server_online"' in line:
                    break
            spans = run_sync(planned_spans(local.initial_peers, prefix))
            a_measured = spans[a_id][2]
            others = [(s, e, t) for peer, (s, e, t, _) in spans.items() if peer not in (b["peer_id"],)]
            assert a_measured > 10, others  # measured: far above the pinned ones
            expected = choose_blocks(4, 2, others, throughput=15.0)
            assert (b["start"], b["end"]) == expected, (others, b)


@pytest.mark.parametrize("flags", [["--num-blocks", "2"], ["--blocks", "0:2"]])
def test_a_server_starting_again_announces_what_it_measured_last_while_it_loads(
    llama_checkpoint, tmp_path, flags
):
    """A server that measured these blocks here before (its cache under $XDG_CACHE_HOME) announces those figures
    while it loads, not the median of the servers it finds (pinned at 10 and 20 steps/s: 15, where a tiny block
    runs thousands) nor, with its blocks given, a placeholder of 1.0: joiners choosing meanwhile count it at what
    it will measure again. Held joining by the FIFO."""
    model, prefix = str(llama_checkpoint), llama_checkpoint.name
    cache = tmp_path / "cache"
    span = load_span(model, 0, 2)
    seeded = cached_throughput(span, "cpu", "float32", 1, path=cache / "swarmllm" / "throughput.json")
    assert seeded not in ((15.0, 15.0), (1.0, 1.0))  # (the median of the pinned ones; the placeholder)
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers([(model, (0, 2), ["--throughput", "10"]), (model, (2, 4), ["--throughput", "20"])])
        joiner = ["serve", model, "--initial-peers", *local.initial_peers, *flags]
        with held_server(joiner, {"XDG_CACHE_HOME": str(cache)}) as (proc, fifo):
            gate = open_gate(fifo, proc)  # it announced itself joining and loaded its blocks; it waits here
            try:
                (joining,) = [
                    s for s in run_sync(found_servers(local.initial_peers, prefix)) if s.state == "joining"
                ]
            finally:
                os.close(gate)
            assert (joining.inference_rps, joining.forward_rps) == seeded


async def found_servers(initial_peers: list[str], dht_prefix: str) -> list:
    """The servers' records (`ServerInfo`) as one choosing its blocks reads them (`planned`)."""
    from swarmllm.dht import find_servers

    directory = Directory(initial_peers)
    await directory.start()
    try:
        return await find_servers(directory.dht, dht_prefix, 4, planned=True)
    finally:
        await directory.shutdown()
