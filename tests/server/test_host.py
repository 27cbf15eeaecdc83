"""Servers sharing a host split its cores: the registry of CPU servers, and two real servers started with
default flags."""

import re
import subprocess

from swarmllm.local import LocalSwarm
from swarmllm.server.host import HostShare, host_cores, threads_per_server


def test_threads_split_the_cores_and_never_drop_to_zero():
    assert threads_per_server(8, 1) == 8
    assert threads_per_server(8, 3) == 2
    assert threads_per_server(2, 5) == 1
    assert threads_per_server(4, 0) == 4


def test_the_registry_counts_live_servers_and_forgets_dead_ones(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()
    me, dead = HostShare(tmp_path), HostShare(tmp_path, pid=finished.pid)
    me.join()
    dead.join()
    assert me.servers() == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [str(me.pid)]  # the dead entry was removed
    HostShare(tmp_path, pid=1).join()  # init: alive
    assert me.servers() == 2
    me.leave()
    assert me.servers() == 1


def test_servers_started_with_default_flags_share_the_cores(llama_checkpoint):
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(llama_checkpoint), (0, 2)), (str(llama_checkpoint), (2, 4))])
        for server in swarm.servers:
            line = next(line for line in server.log if "CPU threads" in line)
            threads, servers = map(int, re.search(r"using (\d+) CPU threads \((\d+) CPU servers", line).groups())
            assert servers >= 2  # it saw the other one
            assert threads == threads_per_server(host_cores(), servers)
