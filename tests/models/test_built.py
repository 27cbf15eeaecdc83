"""`built_once`: a checkpoint folder this project makes is built whole, once, and where the file system has no
locks (an NFS mount without its lock service) it is still built rather than the build failing."""

import errno
import fcntl

from swarmllm.models.built import built_once


def write_config(folder):
    (folder / "weights").write_text("w")
    (folder / "config.json").write_text("{}")


def test_a_folder_is_built_once_and_whole(tmp_path):
    calls = []
    path = tmp_path / "model"
    for _ in range(2):
        assert built_once(path, lambda f: (calls.append(f), write_config(f))) == path
    assert len(calls) == 1 and sorted(p.name for p in path.iterdir()) == ["config.json", "weights"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]  # no partial build left


def test_a_file_system_without_locks_still_builds(tmp_path, monkeypatch):
    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    path = built_once(tmp_path / "model", write_config)
    assert (path / "config.json").exists()
