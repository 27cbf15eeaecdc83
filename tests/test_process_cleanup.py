"""Every process of a local swarm (bootstrap, server, monitor, API) takes its own children with it when it is
stopped with SIGTERM: hivemind runs each DHT in a child process with a p2pd daemon, and a face that died without
its cleanup left both running for ever."""

import os
import signal
import subprocess
import sys

import psutil

from swarmllm.local import LocalSwarm


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _hivemind_sockets(pid: int) -> set[str]:
    """The socket files in /tmp that a process and its children listen on for hivemind (p2pd and its clients)."""
    processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {
        conn.laddr
        for process in processes
        for conn in process.net_connections(kind="unix")
        if conn.laddr.startswith("/tmp/hivemind-")
    }


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
        sockets = {path for process in processes.values() for path in _hivemind_sockets(process.proc.pid)}
        assert len(sockets) >= 5  # the four p2pds, and the server's own client of its p2pd
    # each stop() waited for its process; its children exit during its cleanup, before it does
    assert {name for name, pgid in groups.items() if _group_alive(pgid)} == set()
    # and the pipes their output came through are closed (they stayed open: 2 fds per replaced server)
    assert [name for name, process in processes.items() if not process.proc.stdout.closed] == []
    # and their socket files are removed (a server's own client of its p2pd left one behind at every stop)
    assert [path for path in sockets if os.path.exists(path)] == []


def test_children_that_outlive_a_process_of_the_swarm_are_stopped_with_it():
    """A bootstrap peer killed alone (its pid, not its group) whose DHT process is frozen (SIGSTOP: it cannot see
    its owner die and end itself) leaves that process and its p2pd behind; closing the swarm kills what is left of
    its group, and its output pipe, which they held open, is closed."""
    with LocalSwarm() as local:
        local.start_bootstrap()
        bootstrap = local.bootstrap
        group = os.getpgid(bootstrap.proc.pid)
        (dht,) = [
            child for child in psutil.Process(bootstrap.proc.pid).children() if child.name() == "python"
        ]
        dht.suspend()
        os.kill(bootstrap.proc.pid, signal.SIGKILL)
        bootstrap.proc.wait(30)
        assert _group_alive(group)  # its children, orphaned
    assert not _group_alive(group)
    assert bootstrap.proc.stdout.closed


def test_a_dht_process_ends_with_its_owner_killed_outright():
    """hivemind's DHT process never saw its owner die (it holds both ends of its pipe): a peer killed by SIGKILL
    (the OOM killer, a Jupyter kernel's restart) left its DHT process and p2pd running, in the swarm, for ever.
    Now they end by themselves, without the local swarm's cleanup (which runs only when the swarm is closed)."""
    with LocalSwarm() as local:
        local.start_bootstrap()
        pid = local.bootstrap.proc.pid
        children = psutil.Process(pid).children(recursive=True)
        assert {"python", "p2pd"} <= {child.name() for child in children}  # the DHT process and its daemon
        (daemon_socket,) = _hivemind_sockets(pid)  # (a bootstrap peer holds no client of its p2pd)
        os.kill(pid, signal.SIGKILL)
        local.bootstrap.proc.wait(30)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == []
        assert not os.path.exists(daemon_socket)


NO_PIDFD = """
import os, sys, threading
def no_pidfd(pid, flags=0):
    raise OSError(38, "Function not implemented")
os.pidfd_open = no_pidfd
from swarmllm.dht import start_dht
from swarmllm.wire.identity import Identity
dht, _ = start_dht(Identity.generate())
print(dht.pid, flush=True)
threading.Event().wait()
"""


def test_without_pidfds_a_dht_process_still_ends_with_its_owner():
    """On a kernel without pidfds (Linux < 5.3) the DHT process watches its parent's pid instead."""
    owner = subprocess.Popen([sys.executable, "-c", NO_PIDFD], stdout=subprocess.PIPE, text=True)
    try:
        dht = psutil.Process(int(owner.stdout.readline()))
        children = [dht, *dht.children(recursive=True)]
        assert len(children) == 2
        owner.kill()
        owner.wait(30)
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == []
    finally:
        owner.kill()
        owner.wait()


OWNER = """
import sys, threading
from swarmllm.local import LocalSwarm
with LocalSwarm() as local:
    local.start_bootstrap()
    print(local.bootstrap.proc.pid, flush=True)
    if len(sys.argv) > 1:
        local.add_server(sys.argv[1], (0, 4))
        print(local.servers[0].proc.pid, flush=True)
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


def test_the_processes_of_a_local_swarm_stop_when_its_owner_is_killed_outright(llama_checkpoint):
    """The owner of a LocalSwarm killed without a word (SIGKILL, the OOM killer, a test worker killed at its
    timeout): its bootstrap peer and server, each in a session of its own, ran on for ever. They stop by themselves
    now, with their DHT processes and p2pd."""
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER, str(llama_checkpoint)], stdout=subprocess.PIPE, text=True
    )
    try:
        pids = [int(owner.stdout.readline()), int(owner.stdout.readline())]
        processes = [psutil.Process(pid) for pid in pids]
        processes += [child for p in processes for child in p.children(recursive=True)]
        assert len(processes) >= 5  # the two, their DHT processes, p2pd
        owner.kill()
        owner.wait(timeout=30)
        _, alive = psutil.wait_procs(processes, timeout=60)
        assert not alive, [p.cmdline()[:3] for p in alive]
    finally:
        owner.kill()
        owner.wait()


CLIENT_LEFT_RUNNING = """
import sys
from swarmllm import AutoDistributedModelForCausalLM
model = AutoDistributedModelForCausalLM.from_pretrained(sys.argv[1], initial_peers=sys.argv[2:])
if sys.stdin.readline().strip() == "drop":
    del model  # (its finalizer's shutdown starts on the client loop, and the interpreter exits at once)
print("ready", flush=True)
sys.stdin.read()
"""


def test_a_client_left_running_at_exit_removes_its_socket_files(llama_checkpoint):
    """A script that ends without `model.shutdown()` (as most do) left its DHT process's p2pd socket file in
    /tmp at every run (thousands on a machine that runs many): at exit, the client's DHT peer and libp2p
    replica are shut down as `shutdown()` would."""
    with LocalSwarm() as local:
        peers = local.start_bootstrap()
        clients = {}
        for how in ("left", "drop"):  # (at once: each spends seconds importing torch)
            clients[how] = subprocess.Popen(
                [sys.executable, "-c", CLIENT_LEFT_RUNNING, str(llama_checkpoint), *peers],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            clients[how].stdin.write(how + "\n")
            clients[how].stdin.flush()
        for how, client in clients.items():
            assert client.stdout.readline().strip() == "ready"
            sockets = _hivemind_sockets(client.pid)
            assert sockets  # its DHT process's p2pd
            client.stdin.close()
            assert client.wait(60) == 0
            assert [path for path in sockets if os.path.exists(path)] == [], how
