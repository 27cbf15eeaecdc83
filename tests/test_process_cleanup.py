"""Every process of a local swarm (bootstrap, server, monitor, API) takes its own children with it when it is
stopped with SIGTERM: hivemind runs each DHT in a child process with a p2pd daemon, and a face that died without
its cleanup left both running for ever."""

import os
import signal
import subprocess
import sys

from swarmllm.local import LocalSwarm


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stopping_a_local_swarm_leaves_no_process_behind(llama_checkpoint):
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_server(str(llama_checkpoint), (0, 4))
        local.start_monitor()
        local.start_api(str(llama_checkpoint))
        processes = {
            "bootstrap": local.bootstrap,
            "server": local.servers[0],
            "monitor": local.monitor,
            "api": local.api,
        }
        groups = {name: os.getpgid(process.proc.pid) for name, process in processes.items()}
        assert all(_group_alive(pgid) for pgid in groups.values())
    # each stop() waited for its process; its children exit during its cleanup, before it does
    assert {name for name, pgid in groups.items() if _group_alive(pgid)} == set()
    # and the pipes their output came through are closed (they stayed open: 2 fds per replaced server)
    assert [name for name, process in processes.items() if not process.proc.stdout.closed] == []


def test_children_that_outlive_a_process_of_the_swarm_are_stopped_with_it():
    """A bootstrap peer killed alone (its pid, not its group: as if it had died without stopping its DHT) leaves
    its DHT process and p2pd waiting for ever; closing the swarm kills what is left of its group, and its output
    pipe, which they held open, is closed."""
    with LocalSwarm() as local:
        local.start_bootstrap()
        bootstrap = local.bootstrap
        group = os.getpgid(bootstrap.proc.pid)
        os.kill(bootstrap.proc.pid, signal.SIGKILL)
        bootstrap.proc.wait(30)
        assert _group_alive(group)  # its children, orphaned
    assert not _group_alive(group)
    assert bootstrap.proc.stdout.closed


OWNER = """
import sys, threading
from swarmllm.local import LocalSwarm
with LocalSwarm() as local:
    local.start_bootstrap()
    print(local.bootstrap.proc.pid, flush=True)
    threading.Event().wait()  # until terminated
"""


def test_a_terminated_owner_of_a_local_swarm_stops_its_processes():
    """A SIGTERM to the process that holds a LocalSwarm (a supervisor, `timeout`, a killed benchmark or demo)
    ends it as Ctrl-C does: its swarm's processes, each in a session of its own, stop with it."""
    owner = subprocess.Popen([sys.executable, "-c", OWNER], stdout=subprocess.PIPE, text=True)
    try:
        group = os.getpgid(int(owner.stdout.readline()))
        assert _group_alive(group)
        owner.terminate()
        assert owner.wait(timeout=60) == 128 + signal.SIGTERM
        assert not _group_alive(group)
    finally:
        owner.kill()
        owner.wait()
