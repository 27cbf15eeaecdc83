"""Logs and metrics under abuse: a real `swarmllm serve` process flooded with bad connections or malformed
HTTP requests by one hostile peer keeps its log bounded, a hostile peer's words reach our log lines escaped (no
forged lines, no terminal escapes), and the server's metrics count what it did, its gauges back to idle after
sessions end or their clients vanish."""

import asyncio
import json
import logging
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from swarmllm.local import LocalSwarm
from swarmllm.wire import Identity, Message, WireError, connect_direct, peer_log
from swarmllm.wire.connection import refuse_connection
from swarmllm.wire.direct import _client_handshake, _server_handshake, read_handshake_message
from swarmllm.wire.pool import ConnectionPool
from swarmllm.wire.tls import client_context, server_context

BAD_CONNECTIONS = 300
LOG_LINES_BOUND = 30  # what an operator can read: a few lines and a summary, not one per bad connection


@pytest.fixture(scope="module")
def server(llama_checkpoint):
    with LocalSwarm() as swarm:
        record = swarm.add_server(
            str(llama_checkpoint),
            (0, 2),
            extra=["--new-swarm", "--throughput", "100", "--bandwidth", "1000", "--metrics-port", "0"],
        )
        host, port = record["direct"].rsplit(":", 1)
        yield swarm.servers[0], (host, int(port))


@pytest.fixture(scope="module")
def metrics_port(server) -> int:
    process, _ = server
    line = next(line for line in process.log if "/metrics" in line and "metrics at http://" in line)
    return int(line.rsplit(":", 1)[1].split("/")[0])


async def _bad_frame_connection(host: str, port: int, identity: Identity) -> bytes:
    reader, writer = await asyncio.open_connection(host, port, ssl=client_context(), server_hostname="")
    await _client_handshake(reader, writer, identity, None, None)
    writer.write(b"XX" + bytes(62))  # not the wire's magic: the server closes the connection
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def _bad_handshake_connection(host: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(host, port, ssl=client_context(), server_hostname="")
    writer.write(b"garbage, not a handshake" * 4)
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


@pytest.mark.parametrize("kind", ["bad_frame", "bad_handshake"])
async def test_a_flood_of_bad_connections_logs_a_bounded_number_of_lines(server, kind):
    process, (host, port) = server
    identity = Identity.generate()
    before = len(process.log)
    for _ in range(BAD_CONNECTIONS):
        if kind == "bad_frame":
            answer = await _bad_frame_connection(host, port, identity)
        else:
            answer = await _bad_handshake_connection(host, port)
        assert kind.encode() in answer  # the peer is told why, every time
    flood = process.log[before:]
    assert len(flood) <= LOG_LINES_BOUND, (
        f"{len(flood)} log lines for {BAD_CONNECTIONS} bad connections:\n" + ("".join(flood[:5]))
    )
    assert flood, "the bad connections left no trace at all"


async def test_a_hostile_servers_refusal_cannot_forge_log_lines(caplog):
    evil = "go away\n2026-01-01 00:00:00 ERROR swarmllm.server: forged line \x1b[31mred\x1b[0m\r"
    identity = Identity.generate()

    async def refuse(reader, writer):
        await _server_handshake(reader, writer, identity, None)
        refuse_connection(writer, "nope\nERROR", evil)

    server = await asyncio.start_server(refuse, "127.0.0.1", 0, ssl=server_context(identity))
    port = server.sockets[0].getsockname()[1]
    try:
        with caplog.at_level(logging.INFO, logger="swarmllm"):
            connection = await connect_direct("127.0.0.1", port, Identity.generate(), expected_peer_id=None)
            try:
                await asyncio.wait_for(connection._read_task, 10)  # ends with the refusal read
                with pytest.raises(WireError, match="forged line"):
                    await connection.call("info", Message(), timeout=10)
            finally:
                await connection.close()
    finally:
        server.close()
        await server.wait_closed()
    logged = [record.getMessage() for record in caplog.records if record.name.startswith("swarmllm")]
    assert any("forged line" in line for line in logged), logged  # the refusal is logged ...
    for line in logged:  # ... as one line, its control characters escaped
        assert not any(c in line for c in "\n\r\x1b"), repr(line)


def test_faults_past_the_burst_are_counted_and_told_when_the_period_ends(caplog, monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(peer_log.time, "monotonic", lambda: now[0])  # the clock, not the log, is faked
    log = peer_log.PeerFaultLog(logging.getLogger("swarmllm.test_peer_log"), burst=3, period_s=60.0)
    with caplog.at_level(logging.INFO, logger="swarmllm.test_peer_log"):
        for i in range(50):
            log.log(logging.INFO, "bad frame", f"bad frame {i}")
        log.log(logging.INFO, "handshake", "a handshake failed")  # another kind has its own burst
        assert [r.getMessage() for r in caplog.records] == [
            "bad frame 0",
            "bad frame 1",
            "bad frame 2",
            "a handshake failed",
        ]
        caplog.clear()
        now[0] += 60.0
        log.log(logging.INFO, "bad frame", "bad frame 50")
    assert [r.getMessage() for r in caplog.records] == [
        "47 more lines like these (bad frame) in 60 s, not logged",
        "bad frame 50",
    ]


async def _malformed_http_request(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nBad Header Without Colon\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


async def test_a_flood_of_malformed_http_requests_logs_a_bounded_number_of_lines(server, metrics_port):
    process, _ = server
    before = len(process.log)
    for _ in range(BAD_CONNECTIONS):
        assert b" 400 " in await _malformed_http_request(metrics_port)
    flood = process.log[before:]
    assert len(flood) <= LOG_LINES_BOUND, f"{len(flood)} log lines for {BAD_CONNECTIONS} bad requests:\n" + (
        "".join(flood[:5])
    )


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_server_metrics_count_what_was_done_and_gauges_return_to_idle(
    server, metrics_port, llama_checkpoint
):
    process, (host, port) = server
    logged = len(process.log)
    hidden_size = json.loads((llama_checkpoint / "config.json").read_text())["hidden_size"]
    before = await asyncio.to_thread(_scrape, metrics_port)
    connections, streams = [], []
    for _ in range(4):
        connection = await connect_direct(host, port, Identity.generate(), expected_peer_id=None)
        connections.append(connection)
        opening = {"start": 0, "end": 2, "batch_size": 1, "max_length": 8}
        streams.append(await connection.open_stream("inference", Message(opening)))
    for stream in streams:  # a prefill of 3 positions, then 2 decode steps each
        await stream.send(Message({"position": 0}, [torch.randn(1, 3, hidden_size)]))
        await stream.recv()
        for position in (3, 4):
            await stream.send(Message({"position": position}, [torch.randn(1, 1, hidden_size)]))
            await stream.recv()
    await streams[0].send(Message({"position": 99}, [torch.randn(1, 1, hidden_size)]))  # refused in-band
    assert "error" in (await streams[0].recv()).meta
    during = await asyncio.to_thread(_scrape, metrics_port)
    assert during[("swarmllm_server_sessions_open", ())] - before[("swarmllm_server_sessions_open", ())] == 4
    assert (
        during[("swarmllm_server_cache_used_tokens", ())] - before[("swarmllm_server_cache_used_tokens", ())]
        > 0
    )
    await streams[0].close()  # one ends its session, the others leave without a word (their connection drops)
    for connection in connections[1:]:
        connection._writer.transport.abort()
    for connection in connections:
        await connection.close()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:  # the server notices the dropped connections in its own time
        after = await asyncio.to_thread(_scrape, metrics_port)
        if after[("swarmllm_server_sessions_open", ())] == before[("swarmllm_server_sessions_open", ())]:
            break
        assert loop.time() < deadline, "sessions_open never came back to idle"
        await asyncio.sleep(0.05)  # (a poll's pace)
    assert (
        after[("swarmllm_server_cache_used_tokens", ())] == before[("swarmllm_server_cache_used_tokens", ())]
    )

    def grew(name: str, **labels) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert grew("swarmllm_server_sessions_opened_total") == 4
    assert grew("swarmllm_server_inference_steps_total", kind="prefill") == 4
    assert grew("swarmllm_server_inference_steps_total", kind="decode") == 8
    assert grew("swarmllm_server_tokens_total", kind="prefill") == 12
    assert grew("swarmllm_server_tokens_total", kind="decode") == 8
    assert grew("swarmllm_server_step_duration_seconds_count", kind="prefill") == 4
    assert grew("swarmllm_server_step_duration_seconds_count", kind="decode") == 8
    quiet = [line for line in process.log[logged:] if "Traceback" in line or " DEBUG " in line]
    assert not quiet, "".join(process.log[logged:])  # clients that leave are a swarm's everyday life


async def test_a_hostile_peers_handshake_refusal_cannot_forge_log_lines_of_a_pool(caplog):
    evil = "go away\n2026-01-01 00:00:00 ERROR swarmllm.server: forged line \x1b[31mred\x1b[0m\r"
    identity = Identity.generate()

    async def refuse(reader, writer):
        await read_handshake_message(reader, (("key", bytes, None),))
        refuse_connection(writer, "nope\nERROR", evil)

    server = await asyncio.start_server(refuse, "127.0.0.1", 0, ssl=server_context(identity))
    port = server.sockets[0].getsockname()[1]
    pool = ConnectionPool(Identity.generate(), None)
    try:
        with caplog.at_level(logging.INFO, logger="swarmllm"), pytest.raises(WireError):
            await pool.get(identity.peer_id, [f"127.0.0.1:{port}"])
    finally:
        await pool.close()
        server.close()
        await server.wait_closed()
    logged = [record.getMessage() for record in caplog.records if record.name.startswith("swarmllm")]
    assert any("forged line" in line for line in logged), logged  # the refusal is logged ...
    for line in logged:  # ... as one line, its control characters escaped
        assert not any(c in line for c in "\n\r\x1b"), repr(line)


def test_a_servers_error_text_is_one_escaped_line_in_what_the_client_logs():
    """`describe` is how the client logs (bans, failovers) and words its errors about a server's failure: the text
    is the peer's, and its newlines and terminal escapes forged whole lines in the client's or the API's log."""
    from swarmllm.client.swarm import describe
    from swarmllm.wire import RemoteError

    evil = "boom\n2026-01-01 00:00:00 ERROR swarmllm.client: forged \x1b[31mred\x1b[0m\r"
    text = describe(RemoteError("bad_request", evil))
    assert all(c.isprintable() for c in text), text
    assert "forged" in text and "\\n2026" in text and "\\x1b[31m" in text  # escaped, not dropped
    assert describe(RemoteError("busy", "à bientôt")) == "RemoteError: busy: à bientôt"
