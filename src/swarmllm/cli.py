"""The `swarmllm` command: `dht` (bootstrap peer), `serve` (donate blocks), `generate` (use a swarm), `demo`."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected START:END, got {text!r}") from None
    return start, end


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("swarmllm").setLevel(logging.DEBUG if verbose else logging.INFO)
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass


def _peers(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--initial-peers",
        nargs="*",
        default=[],
        metavar="MULTIADDR",
        help="multiaddrs of peers already in the swarm (printed by `swarmllm dht`)",
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
]


def _limits(serve: argparse.ArgumentParser) -> None:
    group = serve.add_argument_group(
        "limits per peer (a peer = an authenticated peer id; defaults in README)"
    )
    for flag, dest, kind, help in _LIMIT_FLAGS:
        group.add_argument(flag, dest=dest, type=kind, help=help)


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
    commands = parser.add_subparsers(dest="command", required=True)

    dht = commands.add_parser("dht", help="run a bootstrap DHT peer and print its multiaddrs")
    _peers(dht)
    dht.add_argument("--host", default="127.0.0.1", help="address to listen on")
    dht.add_argument("--port", type=int, default=0, help="TCP port (0 = any free port)")
    dht.add_argument("--identity", help="key file: keeps the peer id (and so the multiaddrs) across restarts")
    _swarm_key(dht)

    serve = commands.add_parser("serve", help="serve a range of a model's blocks to the swarm")
    serve.add_argument("model", help="Hugging Face hub id or local checkpoint folder")
    which = serve.add_mutually_exclusive_group()
    which.add_argument("--blocks", type=_blocks, metavar="START:END", help="serve blocks [START, END)")
    which.add_argument(
        "--num-blocks", type=int, help="serve this many blocks where the swarm needs them most"
    )
    _peers(serve)
    serve.add_argument("--new-swarm", action="store_true", help="start a new swarm (no --initial-peers)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=0, help="libp2p TCP port (0 = any free port)")
    serve.add_argument("--direct-port", type=int, default=0, help="direct tensor path TCP port (0 = any)")
    serve.add_argument("--announce-host", help="address others should dial, if not --host")
    serve.add_argument(
        "--announce-direct-port",
        type=int,
        help="direct path port others should dial, if not the one listened on (a port forward or proxy)",
    )
    serve.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    serve.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    serve.add_argument(
        "--max-cache-tokens",
        type=int,
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
        "--num-threads", type=int, help="torch CPU threads (set it when servers share a machine)"
    )
    serve.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step: about 2x faster steps on a CPU, after a compilation at start",
    )
    serve.add_argument(
        "--no-cuda-graphs", action="store_true", help="on CUDA, run decode steps eagerly instead of as graphs"
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=float,
        default=10.0,
        help="how long a decode step may wait for other sessions' steps to be merged with it (continuous "
        "batching; never longer than a step takes, and not at all when no other session is decoding)",
    )
    serve.add_argument(
        "--throughput", type=float, help="announced decode steps/s per block instead of measuring it"
    )
    serve.add_argument(
        "--bandwidth", type=float, help="uplink in Mbit/s instead of measuring it with pings to a few peers"
    )
    serve.add_argument("--update-period", type=float, default=30.0, help="seconds between re-announcements")
    serve.add_argument(
        "--balance-period",
        type=float,
        default=15.0,
        help="seconds between checks whether to move to other blocks (also soon after a peer's connection "
        "breaks); servers started with --blocks never move",
    )
    # for tests of the client's spot checks only (server/corrupt.py): every Nth output is made wrong
    serve.add_argument("--corrupt-every", type=int, default=0, help=argparse.SUPPRESS)

    # defaults live in WireLimits / ServerConfig (not imported here: `swarmllm --help` stays light)
    serve.add_argument(
        "--max-connections",
        type=int,
        help="connections this server holds at most, direct and libp2p together (default 1024); more are refused",
    )
    serve.add_argument(
        "--max-connections-per-peer",
        type=int,
        help="connections this server holds at most from one peer id (default 8); more are refused",
    )
    serve.add_argument(
        "--frame-timeout",
        type=float,
        help="seconds a started frame may take (default 30), plus its size at --min-frame-rate; a peer that "
        "stalls mid-frame is disconnected (idle connections between frames are kept)",
    )
    serve.add_argument(
        "--min-frame-rate",
        type=float,
        help="bytes/s a started frame must arrive at, on top of --frame-timeout (default 262144)",
    )
    serve.add_argument(
        "--handshake-timeout",
        type=float,
        help="seconds a direct connection may take to prove its peer id before it is dropped (default 10)",
    )
    _limits(serve)

    gen = commands.add_parser("generate", help="generate text with a model served by a swarm")
    gen.add_argument("model", help="hub id or local folder (the client loads only embeddings and LM head)")
    _peers(gen)
    _swarm_key(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=50)
    gen.add_argument("--seed", type=int, default=0)

    demo = commands.add_parser(
        "demo", help="start a local swarm with a small bundled model and generate through it"
    )
    demo.add_argument("--servers", type=int, default=2, help="number of server processes")
    demo.add_argument("--max-new-tokens", type=int, default=24)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    if args.command == "dht":
        from swarmllm.bootstrap import run_bootstrap

        return run_bootstrap(
            args.initial_peers,
            host=args.host,
            port=args.port,
            identity_path=args.identity,
            swarm_key_path=args.swarm_key,
        )
    if args.command == "serve":
        return _serve(args)
    if args.command == "generate":
        return _generate(args)
    if args.command == "demo":
        from swarmllm.demo import run_demo

        return run_demo(num_servers=args.servers, max_new_tokens=args.max_new_tokens)
    return 2


# After each parallel region torch's OpenMP workers spin before they sleep: 300,000 rounds by default, which on a
# host shared with clients and other servers burns a core doing nothing (a server answering a flood of small calls
# used 61% of a core instead of 20%). 30,000 rounds cost no measured speed (benchmarks/RESULTS.md).
SERVER_OMP_SPINCOUNT = "30000"


def _serve(args: argparse.Namespace) -> int:
    if "torch" not in sys.modules:  # read once, when torch loads its OpenMP runtime; an operator's value wins
        os.environ.setdefault("GOMP_SPINCOUNT", SERVER_OMP_SPINCOUNT)
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

    if not args.initial_peers and not args.new_swarm:
        print(
            "swarmllm serve: give --initial-peers (join a swarm) or --new-swarm (start one)", file=sys.stderr
        )
        return 2
    run_server(
        ServerConfig(
            model=args.model,
            blocks=args.blocks,
            num_blocks=args.num_blocks,
            initial_peers=args.initial_peers,
            host=args.host,
            port=args.port,
            direct_port=args.direct_port,
            announce_host=args.announce_host,
            announce_direct_port=args.announce_direct_port,
            dtype=args.dtype,
            device=args.device,
            compile=args.compile,
            cuda_graphs=not args.no_cuda_graphs,
            batch_wait_s=args.batch_wait_ms / 1e3,
            max_cache_tokens=args.max_cache_tokens,
            max_memory=parse_size(args.max_memory) if args.max_memory else None,
            public_name=args.public_name,
            adapters=args.adapters,
            dht_prefix=args.dht_prefix,
            identity_path=args.identity,
            swarm_key_path=args.swarm_key,
            num_threads=args.num_threads,
            throughput=args.throughput,
            bandwidth=parse_bandwidth(args.bandwidth) if args.bandwidth else None,
            update_period_s=args.update_period,
            balance_period_s=args.balance_period,
            wire=WireLimits(**{name: value for name, value in wire_options.items() if value is not None}),
            **({} if args.handshake_timeout is None else {"handshake_timeout_s": args.handshake_timeout}),
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
    import torch
    from transformers import AutoTokenizer

    from swarmllm import AutoDistributedModelForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args.model, initial_peers=args.initial_peers, swarm_key=args.swarm_key
    )
    inputs = tokenizer(args.prompt, return_tensors="pt")
    torch.manual_seed(args.seed)
    sampling = {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    out = model.generate(
        **inputs,
        max_new_tokens=args.max_new_tokens,
        **(sampling if args.temperature > 0 else {"do_sample": False}),
    )
    print(tokenizer.decode(out[0], skip_special_tokens=True))
    model.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
