"""A swarm of real processes on this machine (bootstrap peer + servers on 127.0.0.1), for the demo,
the tests and the benchmarks. Each process reports readiness on stdout; we wait for that line, never a sleep."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil

from swarmllm.forking import ForkedProcess, forked, popen_cli
from swarmllm.lifetime import OWNER_ENV


class ProcessFailed(RuntimeError):
    pass


@dataclass
class ManagedProcess:
    name: str
    proc: ForkedProcess | subprocess.Popen
    lines: queue.Queue = field(default_factory=queue.Queue)
    log: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._pumping = threading.Thread(target=self._pump, daemon=True)
        self._pumping.start()

    def _pump(self) -> None:
        with self.proc.stdout:  # (closed at its end: a stopped process's pipe otherwise stays open for ever)
            for line in self.proc.stdout:
                self.log.append(line)
                self.lines.put(line)
        self.lines.put(None)

    def _exited(self, status: int, strays: list[psutil.Process]) -> int:
        """`status`, once the last of the process's output is read (its children hold the pipe until they exit).
        What is left of its group is killed first: a child that outlived it (a frozen DHT process cannot see its
        owner die and end itself, `dht.OwnedDHT`; its p2pd lives as long), and `strays`, its children outside
        the group."""
        self._signal_group(signal.SIGKILL)
        for stray in strays:
            with contextlib.suppress(psutil.Error):
                stray.kill()
        self._pumping.join(5.0)
        return status

    def wait_for(self, predicate, timeout_s: float) -> str:
        """The first stdout line for which predicate(line) is true, within `timeout_s` in all."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise ProcessFailed(
                    f"{self.name} was not ready in {timeout_s} s:\n{''.join(self.log[-40:])}"
                ) from None
            if line is None:
                raise ProcessFailed(f"{self.name} exited with {self.proc.wait()}:\n{''.join(self.log[-40:])}")
            if predicate(line):
                return line

    def stop(self, timeout_s: float = 20.0) -> int:
        """SIGTERM (a server announces it is leaving and exits); SIGKILL to the whole group if that hangs."""
        strays = self.strays()
        self.terminate()
        return self.wait_or_kill(timeout_s, strays)

    def wait_or_kill(self, timeout_s: float, strays: list[psutil.Process] | None = None) -> int:
        """Its exit status once it exits, or SIGKILL to the whole group after `timeout_s`."""
        strays = self.strays() if strays is None else strays
        try:
            return self._exited(self.proc.wait(timeout_s), strays)
        except subprocess.TimeoutExpired:
            return self.kill()

    def pause(self) -> None:
        """SIGSTOP the process group: the server hangs with its sockets open, as a frozen machine would."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def terminate(self) -> None:
        """SIGTERM without waiting: a server announces offline, hands back its sessions and exits."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> int:
        """Die at once, as a crashed machine would: the process and its children (DHT process, p2pd daemons)."""
        strays = self.strays()
        self._signal_group(signal.SIGKILL)
        return self._exited(self.proc.wait(), strays)

    def strays(self) -> list[psutil.Process]:
        """The process's children outside its group (torch's shm manager): they outlive it by seconds, holding
        its output pipe, unless killed once it is gone."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            return []
        return [c for c in children if _group(c) not in (None, self.proc.pid)]


def _group(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except ProcessLookupError:
        return None  # gone already


def _spawn(name: str, args: Sequence[str], *, fork: bool) -> ManagedProcess:
    """`swarmllm ARGS` as a process of its own (its own process group, so kill() reaches its DHT process and
    daemons too): forked from a warm interpreter rather than importing torch again (see `forking`), or not."""
    # it stops by itself if this process dies without stopping it (SIGKILL, the OOM killer, a crash)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", OWNER_ENV: str(os.getpid())}
    return ManagedProcess(name, forked(args, env) if fork else popen_cli(args, env))


def _online_record(server: ManagedProcess, timeout_s: float) -> dict:
    line = server.wait_for(lambda s: s.startswith("{") and '"server_online"' in s, timeout_s)
    return json.loads(line)


class LocalSwarm:
    """Bootstrap peer plus servers, each a real `swarmllm` process on 127.0.0.1."""

    def __init__(self, *, fork: bool = True) -> None:
        """`fork`: start the processes from warm interpreters (`forking`), or each as a new interpreter."""
        self.fork = fork
        self.bootstrap: ManagedProcess | None = None
        self.servers: list[ManagedProcess] = []
        self.server_args: list[list[str]] = []  # each server's command line, to restart it
        self.initial_peers: list[str] = []
        self.monitor: ManagedProcess | None = None
        self.api: ManagedProcess | None = None
        self._sigterm = None  # the SIGTERM handler before `__enter__` put its own, to put back

    def start_bootstrap(self, timeout_s: float = 60.0, *, extra: Sequence[str] = ()) -> list[str]:
        self.bootstrap = _spawn("bootstrap", ["dht", *extra], fork=self.fork)
        line = self.bootstrap.wait_for(lambda s: s.strip().startswith("--initial-peers"), timeout_s)
        self.initial_peers = line.split()[1:]
        return self.initial_peers

    def add_server(
        self,
        model: str,
        blocks: tuple[int, int] | None = None,
        *,
        extra: Sequence[str] = (),
        timeout_s: float = 180.0,
    ) -> dict:
        """Start a server and return its readiness record (peer_id, start, end, direct address)."""
        return self.add_servers([(model, blocks)], extra=extra, timeout_s=timeout_s)[0]

    def add_servers(
        self,
        specs: Sequence[
            tuple[str, tuple[int, int] | None] | tuple[str, tuple[int, int] | None, Sequence[str]]
        ],
        *,
        extra: Sequence[str] = (),
        timeout_s: float = 180.0,
    ) -> list[dict]:
        """Start several servers at once (they load in parallel) and wait until each is online; a spec is
        (model, blocks) or (model, blocks, flags of that server's own besides `extra`)."""
        started = []
        for model, blocks, *own in specs:
            args = ["serve", model, "--initial-peers", *self.initial_peers, *extra, *(own[0] if own else ())]
            if blocks is not None:
                args += ["--blocks", f"{blocks[0]}:{blocks[1]}"]
            started.append(
                _spawn(f"server {len(self.servers) + len(started)} ({model} {blocks})", args, fork=self.fork)
            )
            self.server_args.append(args)
        self.servers.extend(started)
        return [_online_record(server, timeout_s) for server in started]

    def start_monitor(self, *, port: int = 0, extra: Sequence[str] = (), timeout_s: float = 60.0) -> str:
        """Start `swarmllm monitor` on 127.0.0.1; returns its URL (ends with "/")."""
        self.monitor = _spawn(
            "monitor",
            ["monitor", "--initial-peers", *self.initial_peers, "--port", str(port), *extra],
            fork=self.fork,
        )
        line = self.monitor.wait_for(lambda s: s.startswith("Monitor: "), timeout_s)
        return line.split()[1]

    def start_api(
        self,
        model: str | Sequence[str],
        *,
        port: int = 0,
        extra: Sequence[str] = (),
        timeout_s: float = 120.0,
    ) -> str:
        """Start `swarmllm api MODEL [MODEL ...]` on 127.0.0.1; returns its base URL (ends with "/v1")."""
        models = [model] if isinstance(model, str) else list(model)
        self.api = _spawn(
            "api",
            ["api", *models, "--initial-peers", *self.initial_peers, "--port", str(port), *extra],
            fork=self.fork,
        )
        line = self.api.wait_for(lambda s: s.startswith("OpenAI-compatible API: "), timeout_s)
        return line.split()[2]

    def restart_server(self, index: int, timeout_s: float = 180.0) -> dict:
        """Start server `index` again with the same command line (after it was killed or stopped)."""
        old = self.servers[index]
        old.kill()
        self.servers[index] = _spawn(old.name, self.server_args[index], fork=self.fork)
        return _online_record(self.servers[index], timeout_s)

    def stop_server(self, index: int) -> int:
        return self.servers[index].stop()

    def close(self, timeout_s: float = 20.0) -> None:
        """Stop every process: the faces and servers all at once (each server announces that it leaves and
        exits), then the bootstrap peer they announce through; SIGKILL to any that hangs past `timeout_s`."""
        leaving = [face for face in (self.api, self.monitor) if face is not None] + self.servers
        strays = [process.strays() for process in leaving]
        for process in leaving:
            process.resume()  # a paused server could not handle SIGTERM
            process.terminate()
        deadline = time.monotonic() + timeout_s
        for process, its_strays in zip(leaving, strays, strict=True):
            process.wait_or_kill(max(0.0, deadline - time.monotonic()), its_strays)
        if self.bootstrap is not None:
            self.bootstrap.stop(timeout_s)

    def __enter__(self) -> LocalSwarm:
        # the processes live in sessions of their own, so a SIGTERM to their owner (a supervisor, `timeout`) would
        # leave them running: while the swarm is up, it ends the owner as Ctrl-C does, through `close`
        if threading.current_thread() is threading.main_thread():
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                self._sigterm = signal.signal(signal.SIGTERM, _terminated)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.close()
        finally:
            if self._sigterm is not None:
                signal.signal(signal.SIGTERM, self._sigterm)


def _terminated(signum: int, frame) -> None:
    raise SystemExit(128 + signum)
