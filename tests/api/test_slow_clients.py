"""Every HTTP face of the project (the API with its OpenAI and Ollama faces, the monitor, a server's
`--metrics-port` page; all served by `web.serve_app`) against slow or hostile requesters over raw sockets, each a
real process of a local swarm of a tiny Llama: connections that send nothing, half a request line, headers
without end (one more line every second, slowloris), a body that never completes, or that idle after an answer,
are closed within the README's bound (a stalled body answered 408 first), the processes' file descriptors go
back to what they were and honest requests are served meanwhile; a body, a header line, a URL or headers past
the limits get a 4xx at once (a body declared too large before it is read), and none of it leaves a traceback in
a log."""

import json
import os
import selectors
import socket
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from swarmllm.local import LocalSwarm

NAME = "tiny"
BOUND_S = 10.0  # the README's: a request's head within 10 s of its connection (or last answer), its body then
SLACK_S = 5.0  # for timers and a busy machine (2 shared cores)
PROMPT = "the river"


@dataclass
class Face:
    name: str
    host: str
    port: int
    pid: int
    log: list[str]
    get_path: str  # a GET it answers
    post_path: str  # a path whose handler reads a JSON body (or a GET route, for pages that take none)


@pytest.fixture(scope="module")
def faces(llama_checkpoint):
    with LocalSwarm() as local:
        local.start_bootstrap()
        (record,) = local.add_servers(
            [(str(llama_checkpoint), None)],
            extra=["--throughput", "50", "--bandwidth", "1000", "--metrics-port", "0"],
        )
        api = urlsplit(local.start_api(str(llama_checkpoint), extra=["--name", NAME]))
        monitor = urlsplit(local.start_monitor())
        metrics = urlsplit(record["metrics"])
        yield {
            "api": Face("api", api.hostname, api.port, local.api.proc.pid, local.api.log, "/v1/models",
                        "/v1/completions"),
            "monitor": Face("monitor", monitor.hostname, monitor.port, local.monitor.proc.pid, local.monitor.log,
                            "/api/v1/state", "/api/v1/state"),
            "metrics": Face("metrics", metrics.hostname, metrics.port, local.servers[0].proc.pid,
                            local.servers[0].log, "/metrics", "/metrics"),
        }  # fmt: skip


def connect(face: Face) -> socket.socket:
    return socket.create_connection((face.host, face.port), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole HTTP/1.1 response with a Content-Length (what every face answers but a stream)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", 0)):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed inside a response"
        body += chunk
    return int(status_line.split()[1]), headers, body


def ask(face: Face, method: str, path: str, body: bytes = b"", extra_head: bytes = b"") -> tuple[int, bytes]:
    """A request on a connection of its own: its status and body."""
    with connect(face) as sock:
        sock.sendall(
            f"{method} {path} HTTP/1.1\r\nHost: {face.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n".encode()
            + extra_head
            + b"\r\n"
            + body
        )
        status, _, answer = read_response(sock)
        return status, answer


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def tracebacks(log: list[str], since: int) -> str:
    lines = log[since:]
    return "".join(lines[-60:]) if any("Traceback" in line for line in lines) else ""


def honest(faces: dict[str, Face], tokenizer) -> None:
    """Each face answers an honest request within a few seconds, the API's a right one (its tokens are the
    tokenizer's own), through both of its faces."""
    started = time.monotonic()
    api = faces["api"]
    status, body = ask(api, "POST", "/tokenize", json.dumps({"model": NAME, "prompt": PROMPT}).encode())
    assert status == 200 and json.loads(body)["tokens"] == tokenizer(PROMPT)["input_ids"], body
    status, body = ask(api, "GET", "/api/tags")
    assert status == 200 and [m["name"] for m in json.loads(body)["models"]] == [NAME], body
    status, body = ask(faces["monitor"], "GET", "/api/v1/state")
    assert status == 200 and json.loads(body)["schema"] == "swarmllm.monitor.state/1"
    status, body = ask(faces["metrics"], "GET", "/metrics")
    assert status == 200 and any(
        f.name.startswith("swarmllm_") for f in text_string_to_metric_families(body.decode())
    )
    assert time.monotonic() - started < SLACK_S


@dataclass
class Held:
    face: str
    kind: str
    sock: socket.socket
    opened: float
    got: bytes = b""
    closed_after_s: float | None = None


def hold(face: Face, count: int) -> list[Held]:
    """`count` connections to `face`, a fifth of each kind of stalled requester."""
    head = f"POST {face.post_path} HTTP/1.1\r\nHost: {face.host}\r\nContent-Type: application/json\r\n"
    stalled = {
        "silent": b"",
        "half a request line": f"GET {face.get_path} HT".encode(),
        "slowloris": f"GET {face.get_path} HTTP/1.1\r\nHost: {face.host}\r\nX-Slow-0: 0\r\n".encode(),
        "stalled body": (head + "Content-Length: 100\r\n\r\n").encode() + b'{"model": "tiny", "pro',
    }
    held = []
    for i in range(count):
        kind = [*stalled, "idle after an answer"][i % 5]
        sock = connect(face)
        if kind == "idle after an answer":
            sock.sendall(f"GET {face.get_path} HTTP/1.1\r\nHost: {face.host}\r\n\r\n".encode())
            status, headers, _ = read_response(sock)
            assert status == 200 and headers.get("connection", "").lower() != "close"  # kept alive
        else:
            sock.sendall(stalled[kind])
        held.append(Held(face.name, kind, sock, time.monotonic()))
    return held


def wait_released(held: list[Held], deadline_s: float) -> None:
    """Until the other end closes every held connection, or `deadline_s` after the last one opened; a slowloris
    sends one more header line a second meanwhile."""
    selector = selectors.DefaultSelector()
    for h in held:
        h.sock.setblocking(False)
        selector.register(h.sock, selectors.EVENT_READ, h)
    end = max(h.opened for h in held) + deadline_s
    line = 0
    while selector.get_map() and time.monotonic() < end:
        for key, _ in selector.select(timeout=1.0):
            h = key.data
            try:
                data = h.sock.recv(65536)
            except ConnectionError:
                data = b""
            h.got += data
            if not data:
                h.closed_after_s = time.monotonic() - h.opened
                selector.unregister(h.sock)
        line += 1
        for key in list(selector.get_map().values()):
            if key.data.kind == "slowloris":
                try:
                    key.data.sock.send(f"X-Slow-{line}: {line}\r\n".encode())
                except (BlockingIOError, ConnectionError):
                    pass  # a full buffer, or the server closed it: the read above sees which
    selector.close()


def test_stalled_and_idle_connections_are_closed_in_bounded_time_and_honest_ones_served(
    faces, llama_checkpoint
):
    tokenizer = AutoTokenizer.from_pretrained(str(llama_checkpoint))
    honest(faces, tokenizer)
    baseline = {name: open_fds(face.pid) for name, face in faces.items()}
    logs = {name: len(face.log) for name, face in faces.items()}
    held = hold(faces["api"], 200) + hold(faces["monitor"], 50) + hold(faces["metrics"], 50)
    try:
        assert all(open_fds(face.pid) >= baseline[name] + 40 for name, face in faces.items())  # they are held
        honest(faces, tokenizer)  # served while 300 connections stall
        wait_released(held, BOUND_S + SLACK_S)
    finally:
        for h in held:
            h.sock.close()
    late = {}
    for h in held:
        if h.closed_after_s is None or h.closed_after_s > BOUND_S + SLACK_S:
            late[(h.face, h.kind)] = late.get((h.face, h.kind), 0) + 1
    assert not late, f"connections still open {BOUND_S + SLACK_S} s after they stalled: {late}"
    for h in held:
        if h.kind == "stalled body":  # told why before it is closed
            assert h.got.startswith(b"HTTP/1.1 408"), (h.face, h.got[:200])
    deadline = time.monotonic() + SLACK_S
    while any(open_fds(f.pid) > baseline[n] + 2 for n, f in faces.items()) and time.monotonic() < deadline:
        time.sleep(0.2)  # polling interval of a condition with a deadline
    assert {n: open_fds(f.pid) - baseline[n] <= 2 for n, f in faces.items()} == dict.fromkeys(faces, True)
    honest(faces, tokenizer)
    for name, face in faces.items():
        assert not tracebacks(face.log, logs[name]), tracebacks(face.log, logs[name])


def test_past_the_limits_a_4xx_at_once_without_a_traceback(faces):
    """A body declared past the API's 1 MiB is refused before it is read (no waiting for 100 MiB), one sent
    whole too; a header line, a URL or headers past aiohttp's limits get a 4xx on every face; no log says more
    than a line of it."""
    logs = {name: len(face.log) for name, face in faces.items()}
    api = faces["api"]
    for path in ("/v1/completions", "/api/generate"):  # OpenAI's face and Ollama's
        with connect(api) as sock:
            sock.sendall(
                f"POST {path} HTTP/1.1\r\nHost: {api.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {100 * 2**20}\r\n\r\n".encode()
                + b'{"model": "tiny", "prompt": "'
            )
            sock.settimeout(SLACK_S)
            assert read_response(sock)[0] == 413, path
    big = b'{"model": "tiny", "prompt": "' + b"a" * (2 * 2**20) + b'"}'
    assert ask(api, "POST", "/v1/completions", big)[0] == 413
    for face in faces.values():
        hostile = {
            "a long header line": ask(face, "GET", face.get_path, extra_head=b"X-Long: " + b"a" * 20_000 + b"\r\n"),
            "a long URL": ask(face, "GET", face.get_path + "?" + "a" * 20_000),
            "many headers": ask(face, "GET", face.get_path, extra_head=b"".join(b"X-%d: a\r\n" % i for i in range(300))),
        }  # fmt: skip
        assert {what: 400 <= status < 500 for what, (status, _) in hostile.items()} == dict.fromkeys(
            hostile, True
        )
    for name, face in faces.items():
        assert not tracebacks(face.log, logs[name]), tracebacks(face.log, logs[name])
