"""`swarmllm api` when its HTTP requesters go away or misbehave at the connection level, over real sockets to a
real API process in front of a real local swarm of a tiny Llama: a requester that leaves, streamed or not,
through each face, stops its generation (no tokens for nobody up to `max_tokens`), its inference session is
closed on the servers (their free cache back to the whole budget: the API keeps no sessions here) and the
API's own counts of what runs go back to 0; requests beyond `--max-concurrent` wait and are answered; a body that
never completes holds no generation; and after all of it a greedy answer is still transformers' own."""

import json
import re
import socket
import threading
import time
import urllib.request
from urllib.parse import urlsplit

import httpx
import ollama
import openai
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.local import LocalSwarm
from swarmllm.wire import Identity, Message, connect_direct

NAME = "tiny"
BUDGET = 65536  # --max-cache-tokens of each server
CONTEXT = 8000  # --context-length of the API: room for answers far longer than any test waits for
LONG = 7000  # max_tokens of the requests that are left: minutes of tokens, were they all generated
FEW = 1000  # more tokens than a left request may generate in all (it asked for LONG a choice)
# more tokens than a request's generations may make between its requester leaving and their stop (a next token
# each, the API's metrics read meanwhile), however fast the machine
AFTER_LEAVING = 200
MAX_CONCURRENT = 2
SERVER_ARGS = [
    "--throughput",
    "50",
    "--bandwidth",
    "1000",
    "--max-cache-tokens",
    str(BUDGET),
    "--metrics-port",
    "0",
]
MESSAGES = [{"role": "user", "content": "tell me a story about the river"}]


@pytest.fixture(scope="module")
def checkpoint(checkpoints):
    return checkpoints("llama", max_position_embeddings=8192)


@pytest.fixture(scope="module")
def swarm(checkpoint):
    """A swarm of two servers and an API that keeps no sessions (so every session of a request ended is closed)
    and runs MAX_CONCURRENT generations at once; with a client of its own that asks the servers for their free
    cache."""
    with LocalSwarm() as local:
        local.start_bootstrap()
        records = local.add_servers([(str(checkpoint), (0, 2)), (str(checkpoint), (2, 4))], extra=SERVER_ARGS)
        base = local.start_api(
            str(checkpoint),
            extra=["--name", NAME, "--keep-sessions", "0", "--max-concurrent", str(MAX_CONCURRENT),
                   "--context-length", str(CONTEXT)],
        )  # fmt: skip
        observer = AutoDistributedModelForCausalLM.from_pretrained(
            str(checkpoint), initial_peers=local.initial_peers
        )
        run_sync(observer.swarm.servers(refresh=True))  # the servers' addresses, for their info calls
        try:
            yield local, base, observer, [r["peer_id"] for r in records]
        finally:
            observer.shutdown()


def free_cache(observer, peer_ids) -> list[int]:
    free = []
    for peer_id in peer_ids:
        conn = run_sync(observer.swarm.connection(peer_id))
        reply = run_sync(conn.call("info", Message(), timeout=5))
        free.append(int(reply.meta["cache_tokens_left"]))
    return free


def api_metrics(base: str) -> dict[str, float]:
    """The API's Prometheus series (labels dropped: one model), by sample name."""
    root = base.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as page:
        text = page.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples}


def wait_until(check, timeout_s: float, what: str):
    """Poll `check()` (returning (done, detail)) until done or the deadline; the detail on failure."""
    deadline = time.monotonic() + timeout_s
    while True:
        done, detail = check()
        if done:
            return detail
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout_s} s: {detail}")
        time.sleep(0.2)  # polling interval of a condition with a deadline


def settled(swarm, timeout_s: float = 45.0) -> dict[str, float]:
    """Wait until nothing runs in the API (its /metrics request aside) and every server's cache is free again,
    with no traceback in the API's log; returns the API's metrics then."""
    _, base, observer, peer_ids = swarm

    def check():
        m = api_metrics(base)
        free = free_cache(observer, peer_ids)
        idle = m["swarmllm_api_generations_running"] == 0 and m["swarmllm_api_requests_running"] == 1
        return idle and free == [BUDGET] * len(peer_ids), (m["swarmllm_api_generations_running"],
                                                            m["swarmllm_api_requests_running"], free)  # fmt: skip

    wait_until(check, timeout_s, "the API idle and the servers' caches free")
    log = swarm[0].api.log
    assert not any("Traceback" in line for line in log), "".join(log[-60:])
    return api_metrics(base)


def server_errors(base: str) -> float:
    """Requests the API counts as answered with a 5xx: its own failures, which a requester leaving is not."""
    root = base.removesuffix("/v1")
    with urllib.request.urlopen(f"{root}/metrics", timeout=10) as page:
        text = page.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "swarmllm_api_requests_total" and s.labels["status"].startswith("5")
    )


def generated(base: str) -> float:
    return api_metrics(base)["swarmllm_api_generation_tokens_total"]


class RawRequest:
    """A POST over a socket of its own, read as far as the test likes, then dropped."""

    def __init__(self, base: str, path: str, body: dict | bytes, *, content_length: int | None = None):
        url = urlsplit(base)
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        length = len(data) if content_length is None else content_length
        self.sock = socket.create_connection((url.hostname, url.port), timeout=60)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + data)
        self.buffer = b""

    def read_until(self, count: int, marker: bytes) -> bytes:
        """Read until the body holds `count` of `marker` (SSE events: b"\\n\\n", NDJSON lines: b"\\n")."""
        while self.buffer.partition(b"\r\n\r\n")[2].count(marker) < count:
            data = self.sock.recv(65536)
            assert data, f"the API closed the connection: {self.buffer!r}"
            self.buffer += data
        assert self.buffer.startswith(b"HTTP/1.1 200"), self.buffer
        return self.buffer

    def drop(self) -> None:
        self.sock.close()


def left_stream(swarm, path: str, body: dict, marker: bytes, chunks: int = 4) -> None:
    """Start a long streamed request, read a few chunks, leave; then the generation must stop after a few
    tokens, its session be closed on the servers and the API be idle again, with no traceback in its log."""
    _, base, _, _ = swarm
    before, errors = settled(swarm)["swarmllm_api_generation_tokens_total"], server_errors(base)
    request = RawRequest(base, path, body)
    request.read_until(chunks, marker)
    request.drop()
    after = settled(swarm)["swarmllm_api_generation_tokens_total"]  # (and no traceback in the API's log)
    assert after - before < FEW, f"{after - before} tokens generated for a requester that left"
    assert server_errors(base) == errors, "a requester that left counted as the API's own failure"


def test_a_streamed_chat_left_stops_and_closes_its_session(swarm):
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    left_stream(swarm, "/v1/chat/completions", body, b"\n\n")


def test_a_streamed_completion_with_several_choices_left_stops_them_all(swarm):
    body = {"model": NAME, "prompt": "the river", "max_tokens": LONG, "ignore_eos": True, "stream": True,
            "n": 2, "temperature": 1.0, "seed": 3}  # fmt: skip
    left_stream(swarm, "/v1/completions", body, b"\n\n", chunks=6)


def test_ollamas_streams_left_stop_and_close_their_sessions(swarm):
    options = {"num_predict": LONG, "temperature": 0}
    body = {"model": NAME, "messages": MESSAGES, "options": options}
    left_stream(swarm, "/api/chat", body, b"\n")
    left_stream(swarm, "/api/generate", {"model": NAME, "prompt": "the river", "options": options}, b"\n")


def test_a_streamed_message_left_stops_and_closes_its_session(swarm):
    body = {"model": NAME, "messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True, "stream": True}
    left_stream(swarm, "/v1/messages", body, b"\n\n", chunks=6)


def test_a_streamed_response_left_stops_and_closes_its_session(swarm):
    body = {
        "model": NAME,
        "input": "the river",
        "max_output_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
    }
    left_stream(swarm, "/v1/responses", body, b"\n\n", chunks=8)


def test_the_official_clients_leaving_a_stream_stop_it(swarm):
    _, base, _, _ = swarm
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
    for api_call in (
        lambda: client.chat.completions.create(
            model=NAME, messages=MESSAGES, max_tokens=LONG, stream=True, extra_body={"ignore_eos": True}
        ),
        lambda: client.completions.create(
            model=NAME, prompt="the river", max_tokens=LONG, stream=True, extra_body={"ignore_eos": True}
        ),
    ):
        settled(swarm)
        before = generated(base)
        stream = api_call()
        for _, _chunk in zip(range(3), stream, strict=False):
            pass
        stream.close()
        after = settled(swarm)["swarmllm_api_generation_tokens_total"]
        assert after - before < FEW
    settled(swarm)
    before = generated(base)
    parts = ollama.Client(host=base.removesuffix("/v1"), timeout=60).generate(
        model=NAME, prompt="the river", stream=True, options={"num_predict": LONG}
    )
    for _, _part in zip(range(3), parts, strict=False):
        pass
    parts.close()
    assert settled(swarm)["swarmllm_api_generation_tokens_total"] - before < FEW


def test_a_whole_answer_whose_requester_left_stops(swarm):
    """Not streamed: the requester times out (or goes away) before the answer; its generation must not run on
    to `max_tokens` for nobody."""
    _, base, _, _ = swarm
    bodies = [
        ("/v1/chat/completions", {"model": NAME, "messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True}),
        ("/v1/completions", {"model": NAME, "prompt": "the river", "max_tokens": LONG, "ignore_eos": True,
                             "n": 2, "temperature": 1.0}),
        # (greedy: Ollama's face has no ignore_eos, and a sampled answer may end within the 2 s waited)
        ("/api/generate", {"model": NAME, "prompt": "the river", "stream": False,
                           "options": {"num_predict": LONG, "temperature": 0}}),
        ("/v1/responses", {"model": NAME, "input": "the river", "max_output_tokens": LONG, "ignore_eos": True}),
        ("/v1/messages", {"model": NAME, "messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True}),
    ]  # fmt: skip
    for path, body in bodies:
        settled(swarm)
        before = generated(base)
        with pytest.raises(httpx.TimeoutException):
            httpx.post(base.removesuffix("/v1") + path, json=body, timeout=2.0)
        left = generated(base)  # (counted as they come: what a fast machine made in the 2 s waited)
        after = settled(swarm)["swarmllm_api_generation_tokens_total"]
        assert after - left < AFTER_LEAVING, f"{path}: {after - left} tokens after leaving"
        assert after - before < LONG  # (and the answer never ran to its end)


def test_requests_queued_past_the_limit_and_left_generate_nothing(swarm, checkpoint):
    """MAX_CONCURRENT streams hold every generation slot; requests that wait behind them and are left before
    their turn must not start (a session opened, a prompt sent) for nobody once a slot frees."""
    _, base, _, _ = swarm
    before = settled(swarm)
    body = {"model": NAME, "prompt": "the river", "max_tokens": LONG, "ignore_eos": True, "stream": True}
    holding = [RawRequest(base, "/v1/completions", body) for _ in range(MAX_CONCURRENT)]
    for request in holding:
        request.read_until(3, b"\n\n")
    queued = {**body, "stream": False, "prompt": "the old bridge over the river"}
    for _ in range(3):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(f"{base}/completions", json=queued, timeout=1.0)
    for request in holding:
        request.drop()
    after = settled(swarm)
    prompt_tokens = after["swarmllm_api_prompt_tokens_total"] - before["swarmllm_api_prompt_tokens_total"]
    # each holding stream's prompt, none of the queued requests'
    assert prompt_tokens == MAX_CONCURRENT * len(
        AutoTokenizer.from_pretrained(checkpoint)("the river")["input_ids"]
    )


def test_more_requests_than_slots_wait_and_are_answered(swarm):
    """Past `--max-concurrent` requests wait (the README's "more wait"), each answered in the end, and a body
    that never completes (its headers sent, part of it) holds no generation meanwhile."""
    _, base, _, _ = swarm
    settled(swarm)
    slow = RawRequest(base, "/v1/completions", b'{"model": "tiny", "prompt": "the', content_length=4096)
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
    answers, errors = {}, []

    def ask(i: int) -> None:
        try:
            reply = client.completions.create(
                model=NAME, prompt="the river", max_tokens=24, temperature=0, n=1 + i % 3,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            answers[i] = [c.text for c in reply.choices]
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3 * MAX_CONCURRENT)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors and len(answers) == len(threads), errors
    texts = {text for choices in answers.values() for text in choices}
    assert len(texts) == 1  # greedy: every choice of every request the same answer
    assert api_metrics(base)["swarmllm_api_generations_running"] == 0  # the partial body holds none
    slow.drop()
    settled(swarm)


def test_a_stop_string_reached_while_streaming_closes_the_session(swarm):
    _, base, _, _ = swarm
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
    greedy = {"model": NAME, "prompt": "the river", "temperature": 0, "extra_body": {"ignore_eos": True}}
    text = client.completions.create(max_tokens=40, **greedy).choices[0].text
    words = text.split()
    stop = words[len(words) // 2]
    settled(swarm)
    chunks = list(client.completions.create(max_tokens=LONG, stop=[stop], stream=True, **greedy))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == text[: text.index(stop)] and chunks[-1].choices[0].finish_reason == "stop"
    settled(swarm)


def test_after_all_of_it_a_greedy_answer_is_transformers_own(swarm, checkpoint):
    _, base, _, _ = swarm
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = tokenizer("the old bridge over the river")["input_ids"]
    out = model.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)[
        0, len(prompt) :
    ].tolist()
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    want = tokenizer.decode([*prompt, *out], skip_special_tokens=True)[len(before) :]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)
    reply = client.completions.create(model=NAME, prompt=prompt, max_tokens=32, temperature=0)
    assert reply.choices[0].text == want
    settled(swarm)


@pytest.fixture
def keeping_api(swarm, checkpoint):
    """A second API on the same swarm that keeps sessions between requests (the default, 4), stopped after its
    test (closing them)."""
    local = swarm[0]
    first = local.api
    base = local.start_api(str(checkpoint), extra=["--name", NAME, "--context-length", str(CONTEXT)])
    process, local.api = local.api, first
    try:
        yield base
    finally:
        process.stop()


def test_a_session_kept_from_a_left_request_answers_the_next_one_as_transformers(
    swarm, keeping_api, checkpoint
):
    """A left request's session is kept (it holds its prompt and the tokens generated before it stopped); a
    next prompt that extends it reuses it and still gets transformers' greedy tokens."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = tokenizer("the old bridge over the river")["input_ids"]
    new = model.generate(torch.tensor([prompt]), max_new_tokens=40, do_sample=False)[
        0, len(prompt) :
    ].tolist()
    client = openai.OpenAI(base_url=keeping_api, api_key="unused", max_retries=0, timeout=120)
    greedy = {"model": NAME, "temperature": 0, "extra_body": {"ignore_eos": True}}
    for stream in (True, False):
        body = {"model": NAME, "prompt": prompt, "max_tokens": LONG, "ignore_eos": True, "temperature": 0}
        if stream:
            request = RawRequest(keeping_api, "/v1/completions", {**body, "stream": True})
            request.read_until(6, b"\n\n")
            request.drop()
        else:
            with pytest.raises(httpx.TimeoutException):
                httpx.post(f"{keeping_api}/completions", json=body, timeout=1.0)
        wait_until(
            lambda: (api_metrics(keeping_api)["swarmllm_api_generations_running"] == 0, None), 45, "stopped"
        )
        asked = prompt + new[:8]
        reply = client.completions.create(prompt=asked, max_tokens=16, **greedy)
        before = tokenizer.decode(asked, skip_special_tokens=True)
        want = tokenizer.decode([*asked, *new[8:24]], skip_special_tokens=True)[len(before) :]
        assert reply.choices[0].text == want
        assert reply.usage.prompt_tokens_details.cached_tokens >= len(prompt)


def test_a_stream_left_before_its_first_byte_stops(swarm):
    """The requester sends its request and leaves at once, before the response has started."""
    _, base, _, _ = swarm
    bodies = [
        ("/v1/chat/completions", {"model": NAME, "messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True,
                                  "stream": True}),
        ("/api/generate", {"model": NAME, "prompt": "the river", "options": {"num_predict": LONG}}),
        ("/v1/responses", {"model": NAME, "input": "the river", "max_output_tokens": LONG, "ignore_eos": True,
                           "stream": True}),
        ("/v1/messages", {"model": NAME, "messages": MESSAGES, "max_tokens": LONG, "ignore_eos": True,
                          "stream": True}),
    ]  # fmt: skip
    for path, body in bodies:
        before = settled(swarm)["swarmllm_api_generation_tokens_total"]
        for _ in range(4):
            RawRequest(base, path, body).drop()
        after = settled(swarm)["swarmllm_api_generation_tokens_total"]
        assert after - before < FEW, f"{path}: {after - before} tokens generated for requesters that left"


def server_metric(server, name: str) -> float:
    """A series of a server process's `--metrics-port` page."""
    line = next(line for line in server.log if "metrics at http://" in line)
    with urllib.request.urlopen(re.search(r"http://\S+/metrics", line)[0], timeout=10) as page:
        text = page.read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


async def fill(observer, peer_id: str) -> list:
    """Two other peers (identities and connections of their own) each open a session of a whole share (half the
    budget) on `peer_id`: its cache is full. Returns their connections."""
    info = observer.swarm.info(peer_id)
    host, port = info.direct_addrs[0].rsplit(":", 1)
    held = []
    for _ in range(2):
        conn = await connect_direct(host, int(port), Identity.generate(), expected_peer_id=peer_id)
        opening = {
            "start": info.start_block,
            "end": info.end_block,
            "batch_size": 4,
            "max_length": BUDGET // 8,
        }
        stream = await conn.open_stream("inference", Message(opening))
        await stream.send(Message({"position": 0}, [torch.zeros(4, 1, observer.config.hidden_size)]))
        await stream.recv()  # open, its room taken
        held.append(conn)
    return held


def test_a_request_left_while_it_waits_for_room_stops_waiting(swarm):
    """The first server's cache is full of two other peers' sessions: a streamed request waits for room there (for
    up to --room-wait, 60 s), its `room` query waiting on the server. Its requester leaves: the wait ends with it
    (its session closed), well before the 60 s, and nothing is generated for nobody."""
    local, base, observer, peer_ids = swarm
    before, errors = settled(swarm)["swarmllm_api_generation_tokens_total"], server_errors(base)
    held = run_sync(fill(observer, peer_ids[0]))
    try:
        body = {"model": NAME, "messages": MESSAGES, "max_tokens": 16, "stream": True}
        request = RawRequest(base, "/v1/chat/completions", body)
        waiting = lambda: server_metric(local.servers[0], "swarmllm_server_room_waits")  # noqa: E731
        wait_until(lambda: (waiting() >= 1, waiting()), 30, "the request's room query waiting on the server")
        request.drop()
        running = lambda: api_metrics(base)["swarmllm_api_generations_running"]  # noqa: E731
        wait_until(lambda: (running() == 0, running()), 15, "the generation's end once its requester left")
        assert waiting() == 0
    finally:
        for conn in held:
            run_sync(conn.close())
    after = settled(swarm)["swarmllm_api_generation_tokens_total"]  # (and no traceback in the API's log)
    assert after == before, f"{after - before} tokens generated for a requester that left"
    assert server_errors(base) == errors, "a requester that left counted as the API's own failure"
