"""The README's concrete claims hold: the files it cites exist, the flags it names exist for their commands, and
the defaults and limits it states are the code's.

Each stated number is a row of (a snippet the README must contain, the value in the code, the value it says), so
changing either side without the other fails here. No server processes: the CLI's parser is built in-process.
"""

from __future__ import annotations

import argparse
import inspect
import re
import shlex
from pathlib import Path

import pytest

from swarmllm.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "swarmllm"
README = (ROOT / "README.md").read_text()

# files the README names that a user or a run makes, not files of this repository
NOT_REPO_FILES = {
    "adapter_config.json",
    "adapter_model.safetensors",
    "model.safetensors",
    "config.json",
    "ladder_conversion.json",
    "throughput.json",
    "bootstrap.key",
    "swarm.key",
    "corpus.txt",
    "llama.cpp",  # the project, not a file
}
# flags of scripts (benchmarks, the chaos harness) and of other tools the README names, by the file that has them
SCRIPT_FLAGS = {
    "--a-commit": "benchmarks/ab.py",
    "--b-args": "benchmarks/ab.py",
    "--swarms": "benchmarks/ab.py",
    "--workload": "benchmarks/ab.py",
    "--rows": "benchmarks/ab.py",
    "--prompt-tokens": "benchmarks/ab.py",
    "--server-src": "benchmarks/abuse.py",
    "--decode": "benchmarks/hotpath.py",
    "--models": "benchmarks/hotpath.py",
    "--faces": "benchmarks/multiclient.py",
    "--checkpoint": "benchmarks/head_matmul.py",
    "--arrive-every": "benchmarks/room_queue.py",
    "--schedules": "tests/chaos.py",
    "--record": "tests/chaos.py",
}
OTHER_TOOLS = {"--build", "--build-arg", "--dist", "--speculative-config"}  # docker compose, pytest, vLLM


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def _commands() -> dict[str, argparse.ArgumentParser]:
    """Every command by its words after `swarmllm` ("serve", "ladder convert", ...)."""
    found = {}
    for name, sub in _subparsers(build_parser()).items():
        found[name] = sub
        for inner, leaf in _subparsers(sub).items():
            found[f"{name} {inner}"] = leaf
    return found


def _readme_commands() -> list[str]:
    """The `swarmllm ...` command lines of the README's shell blocks and inline code."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", README, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if "swarmllm " in line and not line.startswith("#"):
                lines.append("swarmllm " + line.split("swarmllm ", 1)[1])
    lines += re.findall(r"`(swarmllm [a-z][^`]*)`", README)
    return lines


def test_cited_files_exist():
    cited = set(re.findall(r"(?<![\w./~-])([\w-]+(?:/[\w.-]+)*\.(?:py|cpp|html|yaml|sh|md|png|json|safetensors))\b",
                           README))  # fmt: skip
    everywhere = {p.name for p in ROOT.rglob("*") if ".venv" not in p.parts and ".git" not in p.parts}
    missing = []
    for path in sorted(cited):
        if path in NOT_REPO_FILES or path.startswith(
            "shared/"
        ):  # shared/: the project's folder beside the repo
            continue
        if "/" in path:
            # from the root, or from a package folder (the architecture table names `kernels/...` under `models/`)
            ok = (ROOT / path).exists() or any(PACKAGE.rglob(path)) or (ROOT / "src" / path).exists()
        else:
            ok = path in everywhere
        if not ok:
            missing.append(path)
    assert not missing, f"the README cites files that do not exist: {missing}"


def test_cited_test_and_benchmark_files_exist():
    cited = set(re.findall(r"\b((?:tests|benchmarks|examples|docker|docs)/[\w./-]*\w)", README))
    assert len(cited) > 30  # the README cites many; this test would pass vacuously if the pattern broke
    missing = sorted(path for path in cited if not (ROOT / path).exists())
    assert not missing, f"the README cites files that do not exist: {missing}"


def test_every_flag_named_exists():
    commands = _commands()
    ours = set().union(
        _flags(build_parser()), *(_flags(parser) for parser in commands.values())
    )  # (--version)
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README))
    unknown = sorted(named - ours - set(SCRIPT_FLAGS) - OTHER_TOOLS)
    assert not unknown, f"the README names flags no command has: {unknown}"
    for flag, script in SCRIPT_FLAGS.items():
        assert f'"{flag}"' in (ROOT / script).read_text(), f"{script} has no {flag}"


def test_command_lines_use_their_commands_flags():
    commands = _commands()
    lines = _readme_commands()
    assert len(lines) > 15
    for line in lines:
        cleaned = re.sub(r"[\[\]|]", " ", line.replace("...", "X"))
        words = shlex.split(cleaned)[1:]
        two = " ".join(words[:2])
        name = two if two in commands else (words[0] if words else "")
        assert name in commands, f"README: {line!r} is not a swarmllm command"
        flags = {word.split("=")[0] for word in words if word.startswith("--")}
        unknown = flags - _flags(commands[name])
        assert not unknown, f"README: `swarmllm {name}` has no {sorted(unknown)} ({line!r})"


def test_complete_command_lines_parse():
    """The README's full examples parse as written (placeholders `...` given a value)."""
    parser = build_parser()
    examples = [
        "swarmllm dht --host 0.0.0.0 --port 31337 --identity bootstrap.key",
        "swarmllm serve meta-llama/Llama-3.1-8B --initial-peers ... --num-blocks 16",
        "swarmllm monitor --initial-peers /ip4/203.0.113.7/tcp/31337/p2p/QmBootstrap... --host 127.0.0.1 --port 8000",
        "swarmllm api MODEL_A MODEL_B --name a --name b",
        "swarmllm generate MODEL --swarm-key swarm.key --initial-peers ... --prompt x",
        "swarmllm ladder convert meta-llama/Llama-3.1-8B ./llama-ladder --layers 16:32",
        "swarmllm ladder retrain ./llama-ladder --data corpus.txt --steps 500 --seq-len 64 --batch-size 8 --lr 3e-4",
        "swarmllm demo --model smollm2",
        "swarmllm fetch smollm2 --dir DIR",
    ]
    for example in examples:
        parser.parse_args(shlex.split(example)[1:])
    args = parser.parse_args(
        shlex.split(
            "serve meta-llama/Llama-3.1-8B --initial-peers /ip4/203.0.113.7/tcp/31337/p2p/QmBootstrap... "
            "--blocks 0:16 --dtype bfloat16 --device cuda:0 --host 0.0.0.0 --announce-host 198.51.100.4"
        )
    )
    assert args.blocks == (0, 16)


def _default(command: str, flag: str):
    parser = _commands()[command]
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return action.default


def _claims():
    """(snippet the README contains, value in the code, value the README states)."""
    from swarmllm.api import json_mode, ollama, responses, schemas
    from swarmllm.api.app import MAX_EMBED_TOKENS
    from swarmllm.balancing import memory as balancing_memory
    from swarmllm.client.health import DEADLINE_SLACK, Bans
    from swarmllm.client.model import DEFAULT_DRAFT_TOKENS
    from swarmllm.client.session import PUSH_UNANSWERED_TOKENS
    from swarmllm.client.swarm import SwarmClient
    from swarmllm.client.verify import TOLERANCE
    from swarmllm.server import memory as server_memory
    from swarmllm.server.arena import ARENA_LENGTH, MAX_ARENA_ROWS
    from swarmllm.server.backend import PREFILL_CHUNK_TOKENS
    from swarmllm.server.handler import ServerLimits
    from swarmllm.server.network import PING_MAX_BYTES
    from swarmllm.server.server import ServerConfig
    from swarmllm.wire.connection import STREAM_QUEUE_SIZE
    from swarmllm.wire.framing import HEADER_SIZE, WireLimits

    wire, limits, config = WireLimits(), ServerLimits(), ServerConfig(model="m")
    client = {k: p.default for k, p in inspect.signature(SwarmClient).parameters.items()}
    fields = schemas.CompletionRequest.model_fields
    chat_fields = schemas.ChatRequest.model_fields

    def le(field) -> float:
        return next(m.le for m in field.metadata if getattr(m, "le", None) is not None)

    def most_stops() -> int:
        for count in range(1, 100):
            try:
                schemas.CompletionRequest(model="m", prompt="x", stop=[str(i) for i in range(count)])
            except ValueError:
                return count - 1
        return 100

    return [
        # the wire and what a peer can make a server hold
        ("a 30-byte frame header", HEADER_SIZE, 30),
        ("`max_payload_bytes`, 1 GiB per frame", wire.max_payload_bytes, 1 << 30),
        ("`--frame-timeout` (30 s)", wire.frame_timeout_s, 30),
        ("`--min-frame-rate` (256 KiB/s)", wire.min_frame_rate, 256 * 1024),
        ("`--handshake-timeout` (10 s)", config.handshake_timeout_s, 10),
        ("`--max-connections` (1,024", wire.max_connections, 1024),
        ("`--max-connections-per-peer` (8)", wire.max_connections_per_peer, 8),
        ("bounded by count (64)", STREAM_QUEUE_SIZE, 64),
        ("`max_inbox_bytes` (64 MiB)", wire.max_inbox_bytes, 64 << 20),
        ("`ping` 4 MiB", PING_MAX_BYTES, 4 << 20),
        ("`max_prompt_tokens` (4,096)", limits.max_prompt_tokens, 4096),
        # per peer
        ("`--max-sessions-per-peer`\n(16 open sessions)", limits.max_sessions_per_peer, 16),
        ("`--max-cache-share-per-peer` (0.5", limits.max_cache_share_per_peer, 0.5),
        ("`--max-queued-per-peer` (8 forward calls", limits.max_queued_per_peer, 8),
        ("`--max-queued-total` (64 over all peers)", limits.max_queued_total, 64),
        ("a token bucket\nof 50 calls", limits.peer_rate_per_s, 50),
        ("bursts of 100", limits.peer_burst, 100),
        ("`--reply-timeout` (30 s", limits.reply_timeout_s, 30),
        ("`--max-room-wait` (2 s", limits.max_room_wait_s, 2),
        ("ended, `room`; 4 such waits per peer", limits.max_room_waits_per_peer, 4),
        ("or after 2 s, `ServerLimits.max_room_wait_s`", limits.max_room_wait_s, 2),
        ("its for 1 s (`ServerLimits.room_promise_s`", limits.room_promise_s, 1),
        ("keeps a client's adapters (at most 4,", limits.max_adapters_per_peer, 4),
        ("(at most 4, 256 MiB, per client:", limits.max_adapter_bytes_per_peer, 256 << 20),
        ("go unused for 10 min", limits.adapter_idle_timeout_s, 600),
        ("the session idle timeout (300 s)", limits.session_idle_timeout_s, 300),
        ("`leave_timeout_s=5`", config.leave_timeout_s, 5),
        # serve
        ("`--update-period` (re-announce every 30 s)", _default("serve", "--update-period"), 30),
        ("`--update-period` (re-announce every 30 s)", config.update_period_s, 30),
        ("`--balance-period` (check whether to move every 15 s)", _default("serve", "--balance-period"), 15),
        ("`--balance-period` (check whether to move every 15 s)", config.balance_period_s, 15),
        ("`--batch-wait-ms`\n(default 10)", _default("serve", "--batch-wait-ms"), 10),
        ("cache arena, whose graphs serve any mix of sessions; default 1024", ARENA_LENGTH, 1024),
        ("by up to 64 rows", MAX_ARENA_ROWS, 64),
        ("them; default 512, 0 for one piece", PREFILL_CHUNK_TOKENS, 512),
        ("(default: 80% of the\ndevice's memory", server_memory.DEFAULT_MEMORY_FRACTION, 0.8),
        ("10% of the budget, at least 256 MiB", balancing_memory.HEADROOM_FRACTION, 0.1),
        ("10% of the budget, at least 256 MiB", balancing_memory.MIN_HEADROOM_BYTES, 256 << 20),
        # the client
        ("`spot_check_fraction=0.05`", client["spot_check_fraction"], 0.05),
        ("`step_timeout_s=5`", client["step_timeout_s"], 5),
        ("`push_timeout_s=1`", client["push_timeout_s"], 1),
        ("`replay_timeout_s=30`", client["replay_timeout_s"], 30),
        ("`connect_timeout_s=5`", client["connect_timeout_s"], 5),
        ("`request_timeout_s=600`", client["request_timeout_s"], 600),
        ("`ban_s=15`", client["ban_s"], 15),
        ("`missing_blocks_timeout_s=60`", client["missing_blocks_timeout_s"], 60),
        ("`room_wait_s=60`", client["room_wait_s"], 60),
        ("`--room-wait` (60 s", _default("api", "--room-wait"), 60),
        ("`max_replay_bytes=2**30`", client["max_replay_bytes"], 2**30),
        ("(up to 4, at least ~20 ms of work", client["max_micro_batches"], 4),
        ("(up to 4, at least ~20 ms of work", client["min_chunk_s"], 0.02),
        ("doubling with each further failure, up to 5 min", Bans().max_s, 300),
        ("by its announced speed (x4)", DEADLINE_SLACK, 4),
        ("(`PUSH_UNANSWERED_TOKENS`)", PUSH_UNANSWERED_TOKENS, 256),
        ("(float32 1e-3, float16 2e-2, bfloat16 0.1)", TOLERANCE["float32"], 1e-3),
        ("(float32 1e-3, float16 2e-2, bfloat16 0.1)", TOLERANCE["float16"], 2e-2),
        ("(float32 1e-3, float16 2e-2, bfloat16 0.1)", TOLERANCE["bfloat16"], 0.1),
        ("`--num-draft-tokens`, 5", DEFAULT_DRAFT_TOKENS, 5),
        # the faces' flags
        ("[--port 8000]", _default("monitor", "--port"), 8000),
        ("every `--refresh` seconds (5)", _default("monitor", "--refresh"), 5),
        ("[--port 8001]", _default("api", "--port"), 8001),
        ("(`--max-concurrent`, 16)", _default("api", "--max-concurrent"), 16),
        ("(`--keep-sessions`, 4,", _default("api", "--keep-sessions"), 4),
        ("`--keep-sessions-s`, 120 s", _default("api", "--keep-sessions-s"), 120),
        ("60 s by default", _default("generate", "--wait-for-blocks"), 60),
        ("a bootstrap peer and two servers", _default("demo", "--servers"), 2),
        ("[--seq-len 64 --batch-size 8 --lr 3e-4]", _default("ladder retrain", "--seq-len"), 64),
        ("[--seq-len 64 --batch-size 8 --lr 3e-4]", _default("ladder retrain", "--batch-size"), 8),
        ("[--seq-len 64 --batch-size 8 --lr 3e-4]", _default("ladder retrain", "--lr"), 3e-4),
        ("(the file's last 10%)", _default("ladder retrain", "--held-out"), 0.1),
        # the API's limits
        ("`stop` (up to 16 strings", most_stops(), 16),
        ("as\nis anything below 1e-5", schemas.GREEDY_BELOW, 1e-5),
        ("`temperature` > 2", le(fields["temperature"]), 2),
        ("`n` (up to 16)", le(fields["n"]), 16),
        ("`best_of` (completions, up to 16", le(fields["best_of"]), 16),
        ("completions: `logprobs` up to 5", le(fields["logprobs"]), 5),
        ("`top_logprobs` up to 20", le(chat_fields["top_logprobs"]), 20),
        ("a batch of up to 64 prompts", schemas.MAX_PROMPTS, 64),
        ("up to 2,048 inputs", schemas.MAX_EMBED_INPUTS, 2048),
        ("65,536 tokens a\nrequest", MAX_EMBED_TOKENS, 65536),
        ("(the last\n256, unless `store: false`)", responses.KEPT_RESPONSES, 256),
        ("blank space runs are capped at 24 bytes", json_mode.MAX_WHITESPACE, 24),
        ("and nesting at\n32", json_mode.MAX_DEPTH, 32),
        (
            "(0.8, 0.9, 40)",
            (ollama.DEFAULTS["temperature"], ollama.DEFAULTS["top_p"], ollama.DEFAULTS["top_k"]),
            (0.8, 0.9, 40),
        ),  # fmt: skip
    ]


def test_stated_defaults_and_limits_are_the_codes():
    text = README
    wrong = []
    for snippet, actual, stated in _claims():
        if snippet not in text:
            wrong.append(f"the README no longer says {snippet!r}")
        elif actual != pytest.approx(stated) if isinstance(stated, float) else actual != stated:
            wrong.append(f"README {snippet!r}: the code has {actual!r}, not {stated!r}")
    assert not wrong, "\n".join(wrong)


def test_api_routes_are_the_readmes():
    """Every route the README names is served, by the API's gateway or the monitor."""
    from swarmllm.api.app import Api
    from swarmllm.api.messages import MessagesApi
    from swarmllm.api.ollama import OllamaApi
    from swarmllm.api.responses import ResponsesApi

    # the routes a gateway serves for a model: its own table's paths and the gateway's listing routes
    source = inspect.getsource(Api.routes) + inspect.getsource(OllamaApi.routes)
    source += inspect.getsource(ResponsesApi.routes) + inspect.getsource(MessagesApi.routes)
    source += (PACKAGE / "api" / "gateway.py").read_text()
    source += (PACKAGE / "monitor" / "app.py").read_text()
    named = set(re.findall(r"`(?:(?:GET|POST|DELETE) )?(/(?:v1|api|health|metrics|tokenize|detokenize|tokenizer_info)"
                           r"[\w/{}.-]*)`", README))  # fmt: skip
    named |= {"/v1/responses/{id}"}
    assert {"/v1/models", "/v1/chat/completions", "/api/chat", "/health", "/tokenize"} <= named
    missing = sorted(path for path in named if f'"{path}"' not in source and f'"{path.replace("{model}", "{model:.+}")}"'
                     not in source)  # fmt: skip
    assert not missing, f"the README names routes nothing serves: {missing}"
