"""`swarmllm generate`, `chat`, `demo` and `fetch` run as a user runs them (real processes against a real swarm
on 127.0.0.1): answers equal transformers' on the same checkpoint, and odd input ends in one clear line, never a
traceback."""

import json
import os
import socket
import subprocess
import sys
import urllib.request

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmllm.api.generation import chat_prompt
from swarmllm.forking import forked
from swarmllm.local import LocalSwarm

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def run_forked(*commands: list[str], timeout_s: float = 240) -> list[tuple[int, str]]:
    """Several `swarmllm` runs at once, each (exit status, stdout and stderr together)."""
    procs = [forked(args, ENV) for args in commands]
    done = []
    try:
        for proc in procs:
            proc.wait(timeout_s)
            done.append((proc.returncode, proc.stdout.read()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return done


def chat_process(*args: str) -> subprocess.Popen:
    """`swarmllm chat ARGS` with its stdin, stdout and stderr on pipes of their own (bytes)."""
    return subprocess.Popen(
        [sys.executable, "-m", "swarmllm.cli", "chat", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
        start_new_session=True,
    )


def one_line(code: int, output: str, command: str, status: int = 1) -> str:
    assert code == status, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.startswith(f"swarmllm {command}: ")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture(scope="module")
def model(llama_checkpoint):
    path = str(llama_checkpoint)
    return path, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def swarm(model):
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(model[0], (0, 2)), (model[0], (2, 4))])
        yield swarm


def expected_chat(model, messages: list[str], max_new_tokens: int, context: int) -> list[str]:
    """transformers' greedy answers, turn after turn, as `swarmllm chat` lays out the conversation (None for a
    message that leaves no room, which the conversation then leaves out)."""
    _, tokenizer, reference = model
    history, answers = [], []
    for message in messages:
        ids = tokenizer(
            chat_prompt(tokenizer, [*history, {"role": "user", "content": message}]), add_special_tokens=False
        )["input_ids"]
        if len(ids) >= context:
            answers.append(None)
            continue
        steps = min(max_new_tokens, context - len(ids))
        out = reference.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)[0, len(ids) :]
        answers.append(tokenizer.decode(out, skip_special_tokens=True))
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": answers[-1]}]
    return answers


def test_generate_and_bad_numbers(swarm, model):
    """`generate` prints transformers' greedy text; a prompt of no tokens is one line; a count or a sampling
    option out of its range is refused by the parser (status 2, its usage line), not a traceback mid-answer."""
    path, tokenizer, reference = model
    peers = ["--initial-peers", *swarm.initial_peers]
    refused = [
        ("generate", "--max-new-tokens", "0"),
        ("generate", "--top-p", "-1"),
        ("generate", "--top-k", "-1"),
        ("chat", "--max-new-tokens", "0"),
        ("chat", "--top-p", "0"),
        ("chat", "--context-length", "-5"),
        ("chat", "--num-draft-tokens", "0", "--draft-model", path),
        ("demo", "--max-new-tokens", "-1"),
    ]
    (ok, ok_out), empty, *bad = run_forked(
        ["generate", path, *peers, "--prompt", "hello world", "--max-new-tokens", "8"],
        ["generate", path, *peers, "--prompt", ""],
        *(
            [command, *([] if command == "demo" else [path, *peers, "--temperature", "1"]), *flags]
            + (["--prompt", "hi"] if command == "generate" else [])
            for command, *flags in refused
        ),
    )
    inputs = tokenizer("hello world", return_tensors="pt")
    out = reference.generate(**inputs, max_new_tokens=8, do_sample=False)
    assert ok == 0 and ok_out.splitlines()[-1] == tokenizer.decode(out[0], skip_special_tokens=True), ok_out
    assert "--prompt gives no tokens" in one_line(*empty, "generate")
    for (code, output), (command, flag, *_) in zip(bad, refused, strict=True):
        assert code == 2 and "Traceback" not in output, output  # argparse's usage error
        assert output.splitlines()[-1].startswith(f"swarmllm {command}: error: argument {flag}"), output


def test_generate_with_a_dht_prefix_and_a_draft(swarm, model):
    """`generate --dht-prefix` finds a model its servers announce under a key of their own (a fine-tune's);
    `--draft-model ngram` decodes speculatively with transformers' greedy text (greedy and seeded sampling
    alike through `--draft-model`, which chat and api took already); with `--num-beams`, one line."""
    path, tokenizer, reference = model
    swarm.add_server(path, (0, 4), extra=["--dht-prefix", "tiny-tuned"])
    peers = ["--initial-peers", *swarm.initial_peers, "--dht-prefix", "tiny-tuned"]
    prompt = "the cat and the moon . the cat and the moon . the cat"
    base = ["generate", path, *peers, "--prompt", prompt, "--max-new-tokens", "12"]
    (code, out), beams = run_forked(
        [*base, "--draft-model", "ngram"], [*base, "--draft-model", "ngram", "--num-beams", "2"]
    )
    want = reference.generate(**tokenizer(prompt, return_tensors="pt"), max_new_tokens=12, do_sample=False)
    assert code == 0 and out.splitlines()[-1] == tokenizer.decode(want[0], skip_special_tokens=True), out
    assert "does not go with --num-beams" in one_line(*beams, "generate")


def test_chat_of_odd_lines_answers_as_transformers(swarm, model):
    """Empty and blank lines are skipped, emoji and accents go through, bytes that are not UTF-8 read as U+FFFD,
    a message longer than the context is refused and the conversation goes on, and the end of the input (no
    newline on the last line) ends it with status 0: each answer transformers' for the conversation so far."""
    path = model[0]
    lines = [
        "hello world",
        "",
        "   ",
        "the cat \U0001f600 \u00fcn\u00ef",
        "hello \ufffd world",
        "hello " * 300,
        "the cat",
    ]
    raw = "\n".join(lines).encode().replace("\ufffd".encode(), b"\xff")
    chat = chat_process(
        path,
        "--initial-peers",
        *swarm.initial_peers,
        "--temperature",
        "0",
        "--max-new-tokens",
        "6",
        "--stats",
    )
    out, err = chat.communicate(raw, timeout=120)
    messages = [line.strip() for line in lines if line.strip()]
    answers = expected_chat(model, messages, 6, 256)
    assert chat.returncode == 0, err.decode()
    assert b"Traceback" not in err, err.decode()
    assert out.decode() == "".join(f"{a}\n" for a in answers if a is not None)
    stderr = err.decode().splitlines()
    assert sum("tokens/s" in line for line in stderr) == len([a for a in answers if a is not None])
    assert sum("fills the context (256 tokens)" in line for line in stderr) == answers.count(None) == 1


def test_a_chat_template_of_the_users_lays_out_chat_and_api_conversations(swarm, model, tmp_path):
    """`chat --chat-template` and `api --chat-template` (vLLM's flag: the template itself, or a file) lay out
    conversations with it: the answers are transformers' over that layout. A path naming no file, and a template
    that does not parse, are one line each before anything starts."""
    path, _, reference = model
    template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    (tmp_path / "chat.jinja").write_text(template)
    custom = AutoTokenizer.from_pretrained(path)
    custom.chat_template = template
    peers = ["--initial-peers", *swarm.initial_peers]
    flags = [*peers, "--temperature", "0", "--max-new-tokens", "6", "--chat-template"]
    chat = chat_process(path, *flags, template)
    out, err = chat.communicate(b"hello world\nthe cat\n", timeout=120)
    answers = expected_chat((path, custom, reference), ["hello world", "the cat"], 6, 256)
    assert chat.returncode == 0, err.decode()
    assert out.decode() == "".join(f"{a}\n" for a in answers)
    assert answers != expected_chat(model, ["hello world", "the cat"], 6, 256)  # (the default layout's)

    missing, broken = run_forked(
        ["chat", path, *peers, "--chat-template", str(tmp_path / "missing.jinja")],
        ["api", path, *peers, "--chat-template", "{% for m in %}"],
    )
    assert "missing.jinja: no such file" in one_line(*missing, "chat")
    assert "--chat-template {% for m in %}: " in one_line(*broken, "api")

    api = swarm.start_api(path, extra=["--chat-template", str(tmp_path / "chat.jinja")])
    body = {"model": os.path.basename(path), "messages": [{"role": "user", "content": "hello world"}]}
    request = urllib.request.Request(
        api + "/chat/completions",
        data=json.dumps({**body, "max_tokens": 6, "temperature": 0}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as reply:
        # (the API's text reads as in the sequence: the space before its first word stays)
        assert json.load(reply)["choices"][0]["message"]["content"].strip() == answers[0]


def test_demo_with_few_tokens_or_many_servers_and_fetch_into_a_file(tmp_path):
    """`demo --max-new-tokens 2` ends before the token its act 2 kills at, and still reports; more servers than
    the model has blocks, a monitor port in use, and `fetch --dir` a file, are one line each."""
    (afile := tmp_path / "afile").write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        short, many, monitor_port, into_file, into_folder = run_forked(
            ["demo", "--max-new-tokens", "2", "--servers", "1"],
            ["demo", "--servers", "7"],
            ["demo", "--monitor-port", str(port)],
            ["fetch", "tiny", "--dir", str(afile)],
            ["fetch", "tiny", "--dir", str(tmp_path / "tiny")],
        )
    assert f"port {port} on 127.0.0.1 is already in use" in one_line(*monitor_port, "demo")
    assert short[0] == 0 and "Traceback" not in short[1], short[1]
    assert "tokens identical to local transformers: True" in short[1]
    assert "6 blocks" in one_line(*many, "demo")
    assert str(afile) in one_line(*into_file, "fetch")
    assert into_folder[0] == 0 and into_folder[1].splitlines()[-1] == str(tmp_path / "tiny"), into_folder[1]
    assert (tmp_path / "tiny" / "config.json").exists()
