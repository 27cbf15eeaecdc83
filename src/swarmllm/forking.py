"""Start `swarmllm` processes by forking an interpreter that has imported torch, transformers and hivemind once.

Each `swarmllm` process spends ~3 s of CPU importing those before it does anything; a demo, a benchmark or the
test suite that starts dozens of servers on a 2-core machine spends minutes on imports alone. A `Forker` is one
such warm process: for each command it forks a child, which is then a process like any other (its own session
and process group, stdout and stderr on a pipe to the caller) that runs `swarmllm.cli.main(args)` with the
caller's environment and exits with its status. The forker is the children's parent: it reaps them and writes
each one's exit status to the caller, so `ForkedProcess` answers `poll`, `wait` and `returncode` as
`subprocess.Popen` does. The caller also holds a pidfd of each child (from the forker, which opens it before the
child can be reaped: it names that process and no other), so a child whose forker died (the OOM killer, a kill of
its pid) is still signalled and waited for: it lives on in its own session, `poll` answers None while it runs,
and once it has ended `LOST_STATUS` (its status went with the forker; Popen answers 0 too for a child that
someone else reaped).

A variable read while torch or transformers import (`GOMP_SPINCOUNT`, `TORCH_LOGS`, `OMP_NUM_THREADS`, ...)
takes effect in the forker, not in its child; so a forker serves one environment only, and `forked` starts
another for a different one. Each command gets its OpenMP spin count in its environment, as `swarmllm` sets it
before torch loads (`spin`): a server's differs from a client's, so `serve` commands get a forker of their own.

The forker runs no torch op and starts no Python thread before it forks: torch's OpenMP pool (started by the
first parallel op) and a lock held by another thread do not survive a fork. (numpy's and scipy's OpenBLAS start
native threads at import; OpenBLAS stops and restarts them around a fork itself.) `forked` falls back to a plain
`subprocess.Popen` of `python -m swarmllm.cli` if the forker finds a second Python thread, finds no pidfds
(Linux < 5.3), or cannot start.
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Sequence
from typing import IO

from swarmllm import spin

READY = b"ready\n"
START_TIMEOUT_S = 120.0
# what every swarmllm command imports; the faces' web modules are imported in the child that needs them. The
# multiaddr codecs, idna and _strptime are imported lazily by each child's first peer address and log line:
# ~40 ms of CPU a child, preloaded once here instead
PRELOAD = (
    "torch",
    "transformers",
    "hivemind",
    "swarmllm.server.server",
    "swarmllm.client",
    "swarmllm.dht",
    "hivemind.utils.multiaddr.codecs.cid",
    "hivemind.utils.multiaddr.codecs.ip4",
    "hivemind.utils.multiaddr.codecs.ip6",
    "hivemind.utils.multiaddr.codecs.uint16be",
    "encodings.idna",
    "_strptime",
)
_PID = struct.Struct("<q")
# a child's exit status once its forker died first: as Popen's for a child that someone else reaped
LOST_STATUS = 0


class ForkedProcess:
    """A child of a `Forker`, with the part of `subprocess.Popen`'s interface a local swarm uses."""

    def __init__(
        self, args: list[str], pid: int, stdout: IO[str], status_fd: int, pidfd: int, forker_pid: int
    ) -> None:
        self.args = args
        self.pid = pid
        self.forker_pid = forker_pid  # its parent
        self.stdout = stdout
        self.returncode: int | None = None
        self._status_fd: int | None = status_fd  # None once the forker closed it without a status: it died
        self._pidfd = pidfd
        self._status = b""
        self._reading = threading.Lock()
        self._fds = threading.Lock()  # a signal never goes through a pidfd that another thread closed

    def poll(self) -> int | None:
        return self._read_status(0.0)

    def wait(self, timeout: float | None = None) -> int:
        code = self._read_status(timeout)
        if code is None:
            raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        return code

    def send_signal(self, sig: int) -> None:
        """As Popen's: nothing for a process known to have ended, and none to another process that took its pid."""
        self.poll()
        with self._fds:
            if self.returncode is None:
                try:
                    signal.pidfd_send_signal(self._pidfd, sig)
                except ProcessLookupError:  # it ended since the poll
                    pass

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def _read_status(self, timeout: float | None) -> int | None:
        """The forker writes "<exit code>\\n" once it has reaped the child, then closes the pipe. One thread
        reads at a time; a poll while another thread waits answers from what has been read."""
        if not self._reading.acquire(timeout=-1 if timeout is None else timeout):
            return self.returncode
        try:
            return self._read_status_locked(timeout)
        finally:
            self._reading.release()

    def _read_status_locked(self, timeout: float | None) -> int | None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.returncode is None:
            # the status pipe while the forker lives; after it died without a status, the child's pidfd, which
            # turns readable once the child has ended
            watched = self._pidfd if self._status_fd is None else self._status_fd
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([watched], [], [], left)
            if not readable:
                return None
            if watched == self._pidfd:
                self._finish(LOST_STATUS)
                break
            chunk = os.read(self._status_fd, 64)
            self._status += chunk
            if self._status.endswith(b"\n"):
                self._finish(int(self._status))
            elif not chunk:
                os.close(self._status_fd)
                self._status_fd = None
        return self.returncode

    def _finish(self, code: int) -> None:
        with self._fds:
            self.returncode = code
            for fd in (self._status_fd, self._pidfd):
                if fd is not None:
                    os.close(fd)
            self._status_fd = None


class Forker:
    """The caller's end of one warm process (`python -m swarmllm.forking`) that forks `swarmllm` commands."""

    def __init__(self, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "swarmllm.forking", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env={**env, "PYTHONUNBUFFERED": "1"},
        )
        theirs.close()
        self.sock = ours
        self.lock = threading.Lock()
        self.children: list[ForkedProcess] = []
        self.sock.settimeout(START_TIMEOUT_S)
        try:
            ready = self.sock.recv(len(READY))
        except TimeoutError:
            ready = b""
        if ready != READY:
            self.close()
            raise RuntimeError("the forker did not start")
        self.sock.settimeout(None)

    def spawn(self, args: Sequence[str], env: dict[str, str]) -> ForkedProcess:
        """The forked child of `swarmllm ARGS`. A Ctrl-C (SIGINT) while the forker forks is held until its answer is
        read, then the child is killed and the interrupt goes on: raised in the middle, the child ran on in its own
        session with a pid nobody knew (a demo interrupted while its monitor started left it running for good),
        and the answer left unread broke the forker."""
        if threading.current_thread() is not threading.main_thread():
            return self._spawn(args, env)  # (only the main thread is interrupted)
        interrupts: list = []
        previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupts.append(frame))
        child = None
        try:
            child = self._spawn(args, env)
        finally:
            signal.signal(signal.SIGINT, previous)
            if interrupts:
                if child is not None:
                    child.kill()
                    child.wait()
                    child.stdout.close()
                if callable(previous):
                    previous(signal.SIGINT, interrupts[0])
                elif previous == signal.SIG_DFL:
                    raise KeyboardInterrupt
        return child

    def _spawn(self, args: Sequence[str], env: dict[str, str]) -> ForkedProcess:
        out_r, out_w = os.pipe()
        status_r, status_w = os.pipe()
        request = json.dumps({"args": list(args), "env": env}).encode()
        pidfds: list[int] = []
        try:
            with self.lock:
                socket.send_fds(self.sock, [struct.pack("<I", len(request)) + request], [out_w, status_w])
                # the child's pidfd rides on the answer's first bytes
                first, pidfds, _, _ = socket.recv_fds(self.sock, _PID.size, 1)
                if not first:
                    raise RuntimeError("the forker closed its socket")
                pid = _PID.unpack(first + _recv_exactly(self.sock, _PID.size - len(first)))[0]
            if pid < 0 or len(pidfds) != 1:
                raise RuntimeError("the forker could not fork")
        except BaseException:  # the forker died or could not fork: no child holds the other ends
            for fd in (out_r, status_r, *pidfds):
                os.close(fd)
            raise
        finally:
            os.close(out_w)
            os.close(status_w)
        stdout = open(out_r, encoding="utf-8", errors="replace")  # noqa: SIM115 - the process object owns it
        child = ForkedProcess(
            [sys.executable, "-m", "swarmllm.cli", *args], pid, stdout, status_r, pidfds[0], self.proc.pid
        )
        self.children.append(child)
        return child

    def alive(self) -> bool:
        return self.proc.poll() is None

    def idle(self) -> bool:
        """Whether every child it forked has exited (closing it then leaves none without its exit status)."""
        self.children = [child for child in self.children if child.poll() is None]
        return not self.children

    def close(self) -> None:
        """The forker exits when its socket closes; its children (own sessions) live on, as with Popen."""
        self.sock.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# variables that change while their caller runs and that nothing reads as it imports (pytest names the running
# test in one): a change of them needs no forker of its own
RUNTIME_VARIABLES = frozenset({"PYTEST_CURRENT_TEST"})
MAX_IDLE_FORKERS = 2  # beyond these, the least recently used forker whose children have all exited is closed
_forkers: OrderedDict[frozenset, Forker] = OrderedDict()
_forkers_lock = threading.Lock()


def forked(args: Sequence[str], env: dict[str, str]) -> ForkedProcess | subprocess.Popen:
    """`python -m swarmllm.cli ARGS` under `env`: forked from a warm forker for that environment (started on first
    use, closed at exit), or a plain `subprocess.Popen` where no forker can run."""
    env = spin.for_command(args[0] if args else "", env)  # as the command sets it before torch loads
    key = frozenset((name, value) for name, value in env.items() if name not in RUNTIME_VARIABLES)
    with _forkers_lock:
        forker = _forkers.pop(key, None)
        if forker is None or not forker.alive():
            try:
                forker = Forker(env)
            except (OSError, RuntimeError):
                forker = None
        if forker is not None:
            _forkers[key] = forker  # the most recently used last
        for other in [other for other, dead in _forkers.items() if not dead.alive()]:
            _forkers.pop(other).close()  # (its children's exit statuses went with it)
        idle = [other for other in list(_forkers)[:-1] if _forkers[other].idle()]
        for other in idle[: max(0, len(idle) - MAX_IDLE_FORKERS)]:
            _forkers.pop(other).close()
    if forker is not None:
        try:
            return forker.spawn(args, env)
        except (OSError, RuntimeError):
            pass
    return popen_cli(args, env)


def popen_cli(args: Sequence[str], env: dict[str, str]) -> subprocess.Popen:
    """`python -m swarmllm.cli ARGS` as a new interpreter, as `forked` gives it: its own session and process
    group (so a kill reaches its DHT process and daemons too), stdout and stderr on one text pipe."""
    return subprocess.Popen(
        [sys.executable, "-m", "swarmllm.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=spin.for_command(args[0] if args else "", env),
        start_new_session=True,
    )


@atexit.register
def _close_forkers() -> None:
    for forker in _forkers.values():
        forker.close()
    _forkers.clear()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise RuntimeError("the forker closed its socket")
        data += chunk
    return data


# ---- the forker process -------------------------------------------------------------------------------------


def _serve_forks(sock: socket.socket) -> None:
    """Fork a child per request until the caller closes the socket; reap children as they exit."""
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select() through the wakeup fd
    status_fds: dict[int, int] = {}  # pid -> the write end of its status pipe
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
        _reap(status_fds)
        if sock in readable:
            # the two pipes' fds ride on the request's first bytes: they must be taken by this first receive
            first, fds, _, _ = socket.recv_fds(sock, 1 << 16, 2)
            if not first:
                return
            first += _recv_exactly(sock, max(0, 4 - len(first)))
            size = struct.unpack("<I", first[:4])[0]
            message = first[4:] + _recv_exactly(sock, size - len(first) + 4)
            request = json.loads(message)
            out_w, status_w = fds
            try:
                pid = os.fork()
            except OSError:  # out of processes or memory: the caller starts it afresh, the forker goes on
                os.close(status_w)
                pid = -1
            if pid == 0:
                _run_child(request, out_w, sock, [wake_r, wake_w, status_w, *status_fds.values()])
            os.close(out_w)
            pidfds = []
            if pid > 0:
                try:  # opened before this loop can reap the child: it names that process, whatever takes its pid
                    pidfds.append(os.pidfd_open(pid))
                    status_fds[pid] = status_w
                except OSError:  # out of descriptors: the child goes; the caller starts afresh
                    os.kill(pid, signal.SIGKILL)
                    os.close(status_w)
                    pid = -1
            socket.send_fds(sock, [_PID.pack(pid)], pidfds)
            for fd in pidfds:
                os.close(fd)


def _reap(status_fds: dict[int, int]) -> None:
    while status_fds:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            return
        fd = status_fds.pop(pid, None)
        if fd is not None:
            os.write(fd, f"{os.waitstatus_to_exitcode(status)}\n".encode())
            os.close(fd)


def _run_child(request: dict, out_w: int, sock: socket.socket, forker_fds: list[int]) -> None:
    """In the forked child: become a process of its own, run the command and exit; never returns.

    It exits as `python -m swarmllm.cli` would, waiting for its non-daemon threads, then running the atexit
    handlers (hivemind's, multiprocessing's, logging's) and flushing its output, but without tearing down every
    module one by one: with torch loaded that teardown alone takes ~1 s (multiprocessing's children end so too).
    """
    os.setsid()
    take_own_locks()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.dup2(out_w, 1)
    os.dup2(out_w, 2)
    for fd in {out_w, sock.detach(), *forker_fds}:
        os.close(fd)
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = ["swarmllm", *request["args"]]
    code = 1
    try:
        from swarmllm.cli import main

        code = main(request["args"])
    except SystemExit as e:  # as the interpreter reads one: None is 0, a message is printed and is 1
        code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - whatever happens, the child must not go back into the forker's loop
        traceback.print_exc()
    finally:
        try:
            threading._shutdown()  # type: ignore[attr-defined] - as multiprocessing's children do
            atexit._run_exitfuncs()
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        finally:
            os._exit(code)


def take_own_locks() -> None:
    """Give this forked child cross-process locks of its own, as a process started afresh has. hivemind makes
    its locks (`MPFuture`'s and `SharedBytes`') as it is imported, so every child of a forker would share one set
    with all its siblings and their DHT processes. A sibling killed or stopped while it held one (a server
    killed as a crash kills it, a frozen peer) left every later sibling waiting for ever as its DHT started or
    answered (a CI run's `generate` hung so). A child has no MPFuture yet: nothing of it is lost."""
    from hivemind.utils.mpfuture import MPFuture

    MPFuture.reset_backend()


def _main(fd: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C at the terminal is the caller's to handle
    sock = socket.socket(fileno=fd)
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    if threading.active_count() > 1:
        return  # forking now could copy a lock another thread holds: the caller falls back to Popen
    try:
        os.close(os.pidfd_open(os.getpid()))
    except (AttributeError, OSError):
        return  # no pidfds (Linux < 5.3): the caller falls back to Popen
    sock.sendall(READY)
    try:
        _serve_forks(sock)
    except ConnectionError:
        pass  # its caller went away mid-request (killed): the children live on, as they would


if __name__ == "__main__":
    _main(int(sys.argv[1]))
