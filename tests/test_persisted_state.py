"""What swarmllm keeps on disk and reads back at the next start: identity key files, the throughput cache, the
peers file of `swarmllm dht`. A file that is missing, broken or unwritable ends in a clear error or a safe
fallback, never a traceback at the next start."""

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys

import pytest

from swarmllm.cli import main
from swarmllm.forking import forked
from swarmllm.models import load_span
from swarmllm.server.throughput import cached_threads
from swarmllm.wire import Identity


def one_line_error(capsys, command: str) -> str:
    """The one line `swarmllm COMMAND` printed for a mistake a user can fix (no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"swarmllm {command}: ")]
    assert len(lines) == 1, err
    assert "unexpected error" not in lines[0], err
    return lines[0]


@pytest.mark.parametrize(
    "content",
    [b"", b"\x08\x00\x12\x05hello", bytes(range(64)), b"-----BEGIN PRIVATE KEY-----\n"],
    ids=["empty", "truncated", "garbage", "pem"],
)
@pytest.mark.parametrize("command", ["dht", "serve"])
def test_an_identity_file_that_is_not_a_key_is_a_clear_error(
    tmp_path, capsys, llama_checkpoint, content, command
):
    """An empty, truncated, random or PEM file given as --identity: one line naming the file, not a traceback
    (and the file is left as it was: it may be the operator's only copy of a key)."""
    key = tmp_path / "server.key"
    key.write_bytes(content)
    args = ["--identity", str(key)]
    if command == "serve":
        args = [str(llama_checkpoint), "--new-swarm", "--blocks", "0:1", *args]
    assert main([command, *args]) == 1
    assert str(key) in one_line_error(capsys, command)
    assert key.read_bytes() == content


def test_an_identity_file_that_cannot_be_written_is_a_clear_error(tmp_path, capsys):
    key = tmp_path / "no-such-folder" / "bootstrap.key"
    assert main(["dht", "--identity", str(key)]) == 1
    assert str(key) in one_line_error(capsys, "dht")


def test_an_identity_file_is_read_back_at_the_next_start(tmp_path):
    """The key file written at the first start is read back at the next: the same peer id."""
    key = tmp_path / "server.key"
    first = Identity.load_or_create(key)
    assert Identity.load_or_create(key).peer_id == first.peer_id
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in tmp_path.iterdir()] == ["server.key"]  # no temporary file left beside it


def test_a_peers_file_that_cannot_be_written_is_a_clear_error_before_the_peer_starts(tmp_path):
    """`swarmllm dht --peers-file` into a folder that is not there: one line naming the file, exit status 1."""
    peers_file = tmp_path / "no-such-folder" / "peers.txt"
    proc = forked(["dht", "--peers-file", str(peers_file)], {**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = proc.stdout.read()
    assert proc.returncode == 1, output
    assert "Traceback" not in output and "unexpected error" not in output, output
    assert "Bootstrap peer" not in output, output  # refused before it started
    (line,) = [line for line in output.splitlines() if line.startswith("swarmllm dht: ")]
    assert str(peers_file) in line


def test_the_throughput_cache_ignores_an_empty_or_relative_xdg_cache_home(tmp_path, llama_checkpoint):
    """The XDG base directory spec: an empty $XDG_CACHE_HOME means ~/.cache, and a relative one is invalid and
    ignored; the cache never lands in whatever folder the server was started from."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cases = {"": tmp_path / "home-empty", "relative/cache": tmp_path / "home-relative"}
    script = (
        "import importlib, os, sys\n"
        "from swarmllm.models import load_span\n"
        "from swarmllm.server import throughput\n"
        "span = load_span(sys.argv[1], 0, 1)\n"
        "for xdg, home in zip(sys.argv[2::2], sys.argv[3::2]):\n"
        "    os.environ.update(XDG_CACHE_HOME=xdg, HOME=home)\n"
        "    importlib.reload(throughput).cached_threads(span, 'cpu', 'float32', 1)\n"
    )
    args = [str(llama_checkpoint), *(str(x) for pair in cases.items() for x in pair)]
    subprocess.run([sys.executable, "-c", script, *args], cwd=cwd, check=True, timeout=120)
    assert list(cwd.iterdir()) == []
    for home in cases.values():
        assert json.loads((home / ".cache" / "swarmllm" / "throughput.json").read_text())


def _store_entries(span, path, index: int, rounds: int, barrier) -> None:
    for r in range(rounds):
        barrier.wait()  # every writer at once, as servers starting together on one host
        cached_threads(span, "cpu", f"float32-writer{index}-round{r}", 1, path=path)


def test_servers_storing_into_the_throughput_cache_at_once_keep_each_others_entries(
    tmp_path, llama_checkpoint
):
    """Each server adds its measurement to what the others stored (`_store` reads the file again for that): of
    writers storing at the same moment, none drops another's entry, and the file stays whole JSON."""
    span = load_span(str(llama_checkpoint), 0, 1)
    path = tmp_path / "throughput.json"
    writers, rounds = 4, 10
    context = multiprocessing.get_context("fork")  # (the span is loaded once, before the fork)
    barrier = context.Barrier(writers)
    procs = [
        context.Process(target=_store_entries, args=(span, path, i, rounds, barrier)) for i in range(writers)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(120)
    assert [proc.exitcode for proc in procs] == [0] * writers
    stored = json.loads(path.read_text())
    assert len(stored) == writers * rounds
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")) == []


def test_a_peers_file_that_is_a_folder_is_a_clear_error(tmp_path, capsys):
    """A folder where the peers file should be (what `docker run -v peers.txt:...` makes of a file not there yet):
    the reader (`--initial-peers-file`) and the writer (`dht --peers-file`) each end in one line naming it."""
    folder = tmp_path / "peers.txt"
    folder.mkdir()
    assert main(["monitor", "--initial-peers-file", str(folder)]) == 1
    assert str(folder) in one_line_error(capsys, "monitor")
    assert main(["dht", "--peers-file", str(folder)]) == 1
    assert str(folder) in one_line_error(capsys, "dht")


def test_a_second_bootstrap_peer_with_a_running_ones_identity_is_refused_naming_the_file(tmp_path, capsys):
    """`swarmllm dht --identity KEY` where a peer runs with KEY: on the same host, refused at once, whether it
    joins that peer or starts a swarm of its own (which nothing else would notice: two swarms under one peer
    id); with a copy of the key (another machine's), refused by the swarm as it joins. One line naming the user's
    file each time (the swarm's refusal named a temporary copy of the key)."""
    from swarmllm.local import LocalSwarm

    key, copy = str(tmp_path / "bootstrap.key"), str(tmp_path / "copied.key")
    with LocalSwarm() as local:
        peers = local.start_bootstrap(extra=["--identity", key])
        for initial in (["--initial-peers", *peers], []):
            assert main(["dht", "--host", "127.0.0.1", "--identity", key, *initial]) == 1
            assert f"another swarmllm process on this host runs with this identity ({key})" in one_line_error(
                capsys, "dht"
            )
        shutil.copy(key, copy)
        assert main(["dht", "--host", "127.0.0.1", "--identity", copy, "--initial-peers", *peers]) == 1
    err = capsys.readouterr().err
    assert f"another peer of the swarm runs with this identity ({copy})" in err
    assert "swarmllm-id-" not in err


def test_a_second_server_with_a_running_servers_identity_is_refused_and_a_restart_is_not(
    tmp_path, llama_checkpoint
):
    """Two servers under one --identity (the same file started twice, or copied to another machine) would
    overwrite each other's records: the second is refused with one line, while the first runs. Once the first
    is gone (killed: its records still say online), the same identity starts again: a record of ours that no
    server answers for is our own, from before the restart."""
    from swarmllm.local import LocalSwarm, ProcessFailed

    key = tmp_path / "server.key"
    identity = ["--identity", str(key)]
    with LocalSwarm() as local:
        local.start_bootstrap()
        first = local.add_server(str(llama_checkpoint), (0, 4), extra=identity)
        with pytest.raises(ProcessFailed) as refused:  # the same file on this host
            local.add_server(str(llama_checkpoint), (0, 4), extra=identity)
        assert f"another swarmllm process on this host runs with this identity ({key})" in str(refused.value)
        copy = tmp_path / "copied.key"  # another machine's copy of it
        shutil.copy(key, copy)
        with pytest.raises(ProcessFailed) as refused:
            local.add_server(str(llama_checkpoint), (0, 4), extra=["--identity", str(copy)])
        assert "exited with 1" in str(refused.value)
        assert (
            f"another server is running with this identity ({first['peer_id']}, at {first['direct']})"
            in str(refused.value)
        )
        local.servers[0].kill()
        again = local.add_server(str(llama_checkpoint), None, extra=identity)
        assert again["peer_id"] == first["peer_id"]


def test_an_identity_file_that_cannot_be_locked_is_no_reason_to_refuse(tmp_path, monkeypatch):
    """The lock on an --identity file is refused to a second process only where another holds it: a file system
    without locks (ENOLCK: an NFS mount without its lock service) starts the peer as before, unchecked."""
    import errno
    import fcntl

    from swarmllm import cli
    from swarmllm.cli import UserError

    key = tmp_path / "nfs.key"

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    cli._check_identity(str(key))  # no error
    assert str(key.resolve()) not in cli._identities

    def taken(fd, operation):
        raise BlockingIOError(errno.EWOULDBLOCK, "Resource temporarily unavailable")

    monkeypatch.setattr(fcntl, "flock", taken)
    with pytest.raises(UserError, match="another swarmllm process on this host runs with this identity"):
        cli._check_identity(str(key))
