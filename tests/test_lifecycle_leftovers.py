"""What processes and files leave behind when several start at once or one is interrupted: an identity file made by
servers started together, a bundled model copied by a fetch that died, the host's registry of servers."""

import multiprocessing
import subprocess
import sys
from pathlib import Path

import pytest

from swarmllm.server.host import HostShare
from swarmllm.wire.identity import Identity


def _start_with_identity(path: Path, barrier, results) -> None:
    barrier.wait()
    try:
        results.put(Identity.load_or_create(path).peer_id)
    except Exception as e:  # noqa: BLE001 - the parent reports what went wrong
        results.put(f"{type(e).__name__}: {e}")


def test_processes_started_at_once_with_one_new_identity_file_share_its_key(tmp_path):
    """Servers started together with the same new --identity file each run under the key that the file holds
    (each made its own key and the last one's replaced the others', or a reader found the file half-made)."""
    ctx = multiprocessing.get_context("fork")
    starters = 4
    for round_ in range(2):
        path = tmp_path / f"round{round_}" / "identity.key"
        path.parent.mkdir()
        barrier, results = ctx.Barrier(starters), ctx.Queue()
        processes = [
            ctx.Process(target=_start_with_identity, args=(path, barrier, results)) for _ in range(starters)
        ]
        for process in processes:
            process.start()
        peer_ids = [results.get(timeout=60) for _ in range(starters)]
        for process in processes:
            process.join(timeout=60)
        assert peer_ids == [Identity.load(path).peer_id] * starters
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left beside it


def test_an_identity_is_made_where_the_filesystem_has_no_hard_links(tmp_path, monkeypatch):
    """Where `os.link` is refused (a filesystem without hard links), the new key is renamed into place as `save`
    does: the file holds the returned key and no temporary file is left."""

    def no_links(src, dst):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr("os.link", no_links)
    path = tmp_path / "peer.key"
    made = Identity.load_or_create(path)
    assert Identity.load(path).peer_id == made.peer_id
    assert [p.name for p in tmp_path.iterdir()] == ["peer.key"]


def test_a_dead_servers_entry_whose_pid_was_reused_is_not_counted(tmp_path):
    """A server killed without leaving keeps its entry (its pid) in the host's registry; once the kernel gives that
    pid to an unrelated process, the entry must not count as a server (it took a share of the cores for ever)."""
    me = HostShare(tmp_path)
    me.join()
    joined = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pathlib import Path; from swarmllm.server.host import HostShare; "
            "share = HostShare(Path(sys.argv[1])); share.join(); print(share.pid)",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        check=True,
    )  # a server that joined and died without leaving
    dead_entry = tmp_path / joined.stdout.strip()
    unrelated = subprocess.Popen(["sleep", "60"])
    try:
        dead_entry.rename(tmp_path / str(unrelated.pid))  # its pid, now the unrelated process's
        assert me.servers() == 1
        assert sorted(p.name for p in tmp_path.iterdir()) == [str(me.pid)]
        HostShare(tmp_path, pid=unrelated.pid).join()  # an entry made while that process runs: a live server
        assert me.servers() == 2
    finally:
        unrelated.kill()
        unrelated.wait()


def _folder_in_place_of(path: Path) -> None:
    path.mkdir(parents=True)


def _dangling_link_in_place_of(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.symlink_to(path.parent / "gone" / path.name)


@pytest.mark.parametrize("obstacle", [_folder_in_place_of, _dangling_link_in_place_of])
def test_a_fetch_never_leaves_an_incomplete_model_that_looks_complete(tmp_path, capsys, obstacle):
    """`fetch tiny --dir D` whose weights file cannot simply be written where it goes (as a full disk or a kill
    mid-copy would leave things): each fetch either prints D with the whole model there, or fails leaving no
    config.json, which is what the next fetch, or a server, takes for a complete model folder."""
    from swarmllm.bundled import bundled_model
    from swarmllm.cli import main

    built = {p.name: p.read_bytes() for p in bundled_model("tiny").iterdir()}
    folder = tmp_path / "tiny"
    obstacle(folder / "model.safetensors")
    for _ in range(2):
        capsys.readouterr()
        if main(["fetch", "tiny", "--dir", str(folder)]) == 0:
            assert capsys.readouterr().out.splitlines()[-1] == str(folder)
            assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == built
        else:
            assert not (folder / "config.json").exists()
