"""The OpenAI-compatible API under load, as a vLLM or Ollama user drives it: many requests at once over a real
aiohttp server, an engine over a local transformers model standing in for the swarm (each generate runs as
`swarmllm api` runs it, in its worker thread, with a stand-in session). A request refused with a 400 leaves
nothing running behind it; what the metrics say runs is what runs."""

import asyncio
import random
import threading
from concurrent.futures import ThreadPoolExecutor

import anthropic
import openai
import pytest
import torch
from test_request_edges import local_engine
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmllm.local import LocalSwarm

CONTEXT = 64
MAX_CONCURRENT = 2


@pytest.fixture
def engine():
    engine = local_engine(CONTEXT, max_concurrent=MAX_CONCURRENT)
    yield engine
    engine.model.gate.set()
    engine.shutdown()


def running(engine) -> float:
    return engine.counted.generations_running._value.get()


async def test_a_batch_refused_for_one_prompt_starts_no_generation_for_the_others(client, engine):
    """A completions batch whose second prompt cannot fit its max_tokens is a 400: its first prompt's
    generations must not run on behind the refusal, for nobody (holding a slot each)."""
    tokenizer = engine.tokenizer
    short, long = "the river", " ".join(["river"] * 40)
    assert len(tokenizer(long)["input_ids"]) + 30 > CONTEXT >= len(tokenizer(short)["input_ids"]) + 30
    for prompt in ([short, long], [short, ""]):
        reply = await client.post(
            "/v1/completions",
            json={"model": "m", "prompt": prompt, "max_tokens": 30, "n": 2, "ignore_eos": True},
        )
        assert reply.status == 400, await reply.text()
        assert running(engine) == 0, f"{prompt!r}: generations left running behind a 400"
    assert engine.model.started == 0


async def until(check, what: str, timeout_s: float = 20.0) -> None:
    """Wait for `check()` to hold (polled, with a deadline)."""
    async with asyncio.timeout(timeout_s):
        while not check():
            await asyncio.sleep(0.01)  # polling interval of a condition with a deadline
    assert check(), what


async def test_requests_past_the_limit_wait_are_counted_waiting_and_answer_as_one_alone(client, engine):
    """Twice `--max-concurrent` greedy requests at once: MAX_CONCURRENT run, the others wait (the README's
    queue, no 429), /metrics says so (running is what runs), and each answer is a lone request's."""
    body = {"model": "m", "prompt": "the river", "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    alone = await (await client.post("/v1/completions", json=body)).json()
    engine.model.started = 0
    engine.model.gate.clear()
    asks = [asyncio.create_task(client.post("/v1/completions", json=body)) for _ in range(2 * MAX_CONCURRENT)]
    await until(lambda: engine.model.started == MAX_CONCURRENT, "the first requests started")
    page = await (await client.get("/metrics")).text()
    assert running(engine) == MAX_CONCURRENT, f"{running(engine)} generations counted running"
    waiting = [line for line in page.splitlines() if line.startswith("swarmllm_api_generations_waiting{")]
    assert waiting and float(waiting[0].split()[-1]) == MAX_CONCURRENT, waiting
    engine.model.gate.set()
    replies = await asyncio.gather(*asks)
    assert [r.status for r in replies] == [200] * len(asks)
    for reply in replies:
        answer = await reply.json()
        assert answer["choices"][0]["text"] == alone["choices"][0]["text"]
        assert answer["usage"] == alone["usage"]
    page = await (await client.get("/metrics")).text()
    assert running(engine) == 0
    assert 'swarmllm_api_generations_waiting{model="m"} 0.0' in page


@pytest.fixture(scope="module")
def keeping_swarm(checkpoints):
    """A real swarm of two servers of a tiny llama, and an API in front of it that keeps sessions (4) and runs
    4 generations at once."""
    checkpoint = checkpoints("llama")
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers([(str(checkpoint), (0, 2)), (str(checkpoint), (2, 4))])
        base = local.start_api(
            str(checkpoint), extra=["--name", "tiny", "--max-concurrent", "4", "--context-length", "256"]
        )
        yield local, base, checkpoint


def greedy_text(model, tokenizer, prompt: list[int], tokens: int) -> tuple[str, list[int]]:
    """transformers' greedy answer to `prompt` (ignoring EOS): its text as the API gives it, and its tokens."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False
    )[0, len(prompt) :].tolist()
    before = tokenizer.decode(prompt, skip_special_tokens=True)
    return tokenizer.decode([*prompt, *out], skip_special_tokens=True)[len(before) :], out


def test_concurrent_conversations_sharing_a_prefix_answer_as_alone(keeping_swarm):
    """Six conversations at once, four sharing a long system prefix, over an API that keeps 4 sessions: each
    turn's greedy answer is transformers' own for that conversation (no tokens of another's), also on the
    second turn, where kept sessions send the servers only the new tokens."""
    local, base, checkpoint = keeping_swarm
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    rng = random.Random(7)
    words = lambda k: [rng.randrange(4, len(tokenizer)) for _ in range(k)]  # noqa: E731
    system = words(40)
    prompts = [system + words(5) for _ in range(4)] + [words(30) for _ in range(2)]
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)

    def ask(prompt: list[int]):
        return client.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )

    with ThreadPoolExecutor(len(prompts)) as pool:
        for turn in range(2):
            replies = list(pool.map(ask, prompts))
            cached = 0
            for i, (prompt, reply) in enumerate(zip(prompts, replies, strict=True)):
                want, tokens = greedy_text(model, tokenizer, prompt, 12)
                assert reply.choices[0].text == want, f"turn {turn}, conversation {i}"
                assert reply.usage.completion_tokens == 12
                cached += reply.usage.prompt_tokens_details.cached_tokens
                prompts[i] = prompt + tokens + words(3)
            if turn == 1:
                assert cached > 0, "no kept session reused on a conversation's next turn"
    assert not any("Traceback" in line for line in local.api.log), "".join(local.api.log[-60:])


CACHE_BUDGET = 1024  # --max-cache-tokens of each server: a peer (the API) may hold half, 2 whole contexts
SMALL_CONTEXT = 256


@pytest.fixture(scope="module")
def tight_swarm(checkpoints):
    """A swarm whose servers hold room for 2 whole contexts of one peer, and an API that keeps no sessions."""
    checkpoint = checkpoints("llama")
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers(
            [(str(checkpoint), (0, 2)), (str(checkpoint), (2, 4))],
            extra=["--max-cache-tokens", str(CACHE_BUDGET)],
        )
        base = local.start_api(
            str(checkpoint),
            extra=["--name", "tiny", "--keep-sessions", "0", "--context-length", str(SMALL_CONTEXT)],
        )
        yield local, base


def outcomes_of(ask, count: int) -> list[tuple]:
    """`ask(i)` of `count` requesters at once: (200, what it returned) or (status, Retry-After, message)."""

    def one(i: int) -> tuple:
        try:
            return 200, ask(i)
        except openai.APIStatusError as e:
            return e.status_code, e.response.headers.get("retry-after"), e.message

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_an_api_that_keeps_no_sessions_reserves_no_room_for_a_next_turn(tight_swarm):
    """With --keep-sessions 0 no session serves a next turn: each request's session holds the cache its prompt
    and answer need, not a next turn's headroom too, so short requests from more users than 2 whole contexts
    all run at once."""
    local, base = tight_swarm
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)

    def ask(i: int):
        reply = client.completions.create(model="tiny", prompt="the river", max_tokens=16, temperature=0)
        return reply.usage.completion_tokens <= 16, reply.choices[0].finish_reason in ("stop", "length")

    assert outcomes_of(ask, 6) == [(200, (True, True))] * 6
    assert not any("Traceback" in line for line in local.api.log), "".join(local.api.log[-60:])


def test_a_prompt_sent_again_counts_what_the_servers_copied_as_cached(tight_swarm):
    """Without kept sessions, a prompt sent again opens new sessions, whose servers copy its whole blocks from
    their prefix caches (`server.prefix`): usage's cached_tokens counts them (2 blocks of 16 of a 40-token
    prompt, on both servers), and the answer is the first one's."""
    local, base = tight_swarm
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
    prompt = [random.Random(11).randrange(4, 200) for _ in range(40)]
    replies = [
        client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0) for _ in range(2)
    ]
    assert [r.usage.prompt_tokens_details.cached_tokens for r in replies] == [0, 32]
    assert replies[0].choices[0].text == replies[1].choices[0].text


def test_a_message_asking_past_the_context_ends_at_it_as_anthropics(tight_swarm):
    """What Claude Code sends (max_tokens 32,000) to a model of a small context: Anthropic's Messages API bounds
    the answer by max_tokens and ends it at the context, `model_context_window_exceeded`, not a 400 (chat's);
    a prompt that leaves no room is a 400."""
    local, base = tight_swarm
    client = anthropic.Anthropic(
        base_url=base.removesuffix("/v1"), api_key="unused", max_retries=0, timeout=60
    )
    ask = [{"role": "user", "content": "tell me a story"}]
    reply = client.messages.create(
        model="tiny", max_tokens=32000, messages=ask, extra_body={"ignore_eos": True}
    )
    assert reply.stop_reason == "model_context_window_exceeded"
    assert (
        reply.usage.input_tokens + reply.usage.cache_read_input_tokens + reply.usage.output_tokens
        == SMALL_CONTEXT
    )
    short = client.messages.create(model="tiny", max_tokens=5, messages=ask, extra_body={"ignore_eos": True})
    assert (short.stop_reason, short.usage.output_tokens) == ("max_tokens", 5)
    with pytest.raises(anthropic.BadRequestError) as refused:
        client.messages.create(
            model="tiny", max_tokens=8, messages=[{"role": "user", "content": "river " * 300}]
        )
    assert refused.value.body["error"]["type"] == "invalid_request_error"
    assert not any("Traceback" in line for line in local.api.log), "".join(local.api.log[-60:])


def test_requests_past_the_servers_room_wait_for_it_rather_than_fail(tight_swarm):
    """What the official client sends by default (no max_tokens: up to the context), from more users at once than
    the servers have cache room for: the extra ones wait for room, as requests past --max-concurrent do,
    rather than fail; every answer is whole."""
    local, base = tight_swarm
    client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "the river"}]

    def ask(i: int):
        reply = client.chat.completions.create(
            model="tiny", messages=messages, temperature=0, extra_body={"ignore_eos": True}
        )
        usage = reply.usage
        return usage.prompt_tokens + usage.completion_tokens, reply.choices[0].finish_reason

    outcomes = outcomes_of(ask, 4)
    assert outcomes == [(200, (SMALL_CONTEXT, "length"))] * 4, outcomes
    assert not any("Traceback" in line for line in local.api.log), "".join(local.api.log[-60:])


def test_streams_moved_off_a_killed_server_to_one_with_less_room_all_finish_as_alone(checkpoints):
    """Four streams run on the only server of every block, which is killed once each has sent 3 pieces; a server
    with room for two of the API's sessions at a time (its cache share) then starts. Every stream moves to it,
    two at once, the others waiting for room rather than failing (a request past its first token cannot be
    asked again): each answer is transformers' greedy one. The API keeps sessions for next turns (4, the
    default): the first two, kept once done, give their room way to the others. (tests/client/
    test_rate_limit_waits.py has the wait without kept sessions.)"""
    checkpoint = checkpoints("llama")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    rng = random.Random(3)
    prompts = [[rng.randrange(4, len(tokenizer)) for _ in range(6)] for _ in range(4)]
    new = 200  # (long enough to be mid-stream at the kill)
    wants = [greedy_text(model, tokenizer, p, new)[0] for p in prompts]
    session = 256  # (a kept one reserves a next turn's room too, up to the context)
    room = 2 * 2 * session + 50  # a peer's share (half) holds 2 sessions, not 3
    started = threading.Barrier(len(prompts) + 1, timeout=60)
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_server(str(checkpoint), (0, 4))
        base = local.start_api(
            str(checkpoint), extra=["--name", "tiny", "--keep-sessions", "4", "--context-length", "256"]
        )
        client = openai.OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=120)

        def ask(i: int) -> str:
            pieces = []
            stream = client.completions.create(
                model="tiny", prompt=prompts[i], max_tokens=new, temperature=0, stream=True,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            for chunk in stream:
                pieces += [c.text for c in chunk.choices]
                if len(pieces) == 3:
                    started.wait()
            return "".join(pieces)

        with ThreadPoolExecutor(len(prompts)) as pool:
            asks = [pool.submit(ask, i) for i in range(len(prompts))]
            started.wait()
            local.servers[0].kill()
            local.add_server(str(checkpoint), (0, 4), extra=["--max-cache-tokens", str(room)])
            answers = [a.result(timeout=180) for a in asks]
        log = "".join(local.api.log)
    assert answers == wants
    assert "cache share limit" in log, "no stream had to wait for room: the test did not test it"
    assert "no cache room for a generation: closed" in log  # the kept sessions gave way
    assert "Traceback" not in log
