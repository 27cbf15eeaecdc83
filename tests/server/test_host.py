"""Servers sharing a host split its cores: the registry of CPU servers, two real servers started with default
flags, and OpenMP workers that sleep soon (a server's) or at once (a client's) instead of spinning on a shared core."""

import os
import re
import subprocess
import sys
import time

from swarmllm import spin
from swarmllm.local import LocalSwarm
from swarmllm.server.host import HostShare, host_cores, threads_per_server

SPLIT = re.compile(r"using (\d+) CPU threads \((\d+) CPU servers")
MEASURED = re.compile(r"throughput per block: .* \((\d+) threads\)")


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
    """Each server ends up using its share of the cores, whichever of them finished loading first, and the
    throughput it announces is the one measured with that share."""
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(llama_checkpoint), (0, 2)), (str(llama_checkpoint), (2, 4))])
        deadline = time.monotonic() + 30
        for server in swarm.servers:
            while True:  # the latest split each server logged, until it counts both servers
                splits = [SPLIT.search(line) for line in server.log]
                threads, servers = map(int, [m for m in splits if m][-1].groups())
                if servers >= 2 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert servers >= 2  # it saw the other one
            assert threads == threads_per_server(host_cores(), servers)
            while True:  # measured (or looked up) again for the new share
                measured = [m for m in map(MEASURED.search, server.log) if m]
                if (measured and int(measured[-1].group(1)) == threads) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert int(measured[-1].group(1)) == threads


def _spincount_seen_by(argv: list[str], env: dict[str, str]) -> str:
    """GOMP_SPINCOUNT as a `swarmllm` command leaves it, in a fresh interpreter (it fails early: no peers given, or
    no such model and the hub offline)."""
    code = (
        "import os, sys\n"
        "from swarmllm import cli\n"
        f"assert cli.main({argv!r}) != 0\n"
        "import torch\n"  # what the command's torch would read
        "print(os.environ.get('GOMP_SPINCOUNT'))\n"
    )
    env = {**env, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_servers_spin_briefly_clients_not_at_all_unless_the_operator_chose():
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    serve, generate = ["serve", "some-model"], ["generate", "some-model", "--prompt", "hello"]
    assert _spincount_seen_by(serve, env) == spin.SERVER
    assert _spincount_seen_by(generate, env) == spin.CLIENT
    assert spin.SERVER != spin.CLIENT
    assert _spincount_seen_by(serve, {**env, "GOMP_SPINCOUNT": "5"}) == "5"
    assert _spincount_seen_by(generate, {**env, "GOMP_SPINCOUNT": "5"}) == "5"


def test_a_client_starts_servers_with_a_servers_count():
    """The demo's process is a client (`choose` gave it a client's count) that starts servers with its
    environment: each child command gets its own count, unless the operator set one."""
    code = (
        "import os\n"
        "from swarmllm import spin\n"
        "spin.choose(spin.CLIENT)\n"
        "print(os.environ['GOMP_SPINCOUNT'], *(spin.for_command(c, os.environ)['GOMP_SPINCOUNT'] "
        "for c in ('serve', 'api', 'dht')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}

    def counts(env: dict[str, str]) -> list[str]:
        return subprocess.run(
            [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
        ).stdout.split()

    assert counts(env) == [spin.CLIENT, spin.SERVER, spin.SERVER, spin.CLIENT]
    assert counts({**env, "GOMP_SPINCOUNT": "5"}) == ["5"] * 4
