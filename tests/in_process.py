"""In-process servers for client tests that need no DHT: a model over one real server (a `RequestHandler` behind a
`DirectServer` on 127.0.0.1) holding every block, and what a server's metrics counted."""

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from server_infos import online_server
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmllm.client.loop import run_sync
from swarmllm.client.model import DistributedModelForCausalLM
from swarmllm.client.swarm import SwarmClient
from swarmllm.models import load_client_head, load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.server.metrics import ServerMetrics
from swarmllm.wire import DirectServer, Identity


def start_server(
    path: str,
    end: int,
    identity: Identity,
    cache_tokens: int = 4096,
    limits: ServerLimits | None = None,
    metrics: ServerMetrics | None = None,
    start_block: int = 0,
    methods: dict[str, Callable | None] | None = None,
) -> DirectServer:
    """A real server of blocks [start_block, end) of checkpoint `path` (a `RequestHandler` behind a
    `DirectServer` on 127.0.0.1), started on the client's event loop; `run_sync(server.stop())` stops it.
    `methods`: unary methods it answers otherwise (None: not at all, as an older server would not)."""

    async def start() -> DirectServer:
        backend = Backend(load_span(path, start_block, end), cache_tokens=cache_tokens)
        handler = RequestHandler(backend, dict, limits or ServerLimits(), metrics=metrics)
        handlers = handler.handlers()
        for method, fn in (methods or {}).items():
            if fn is None:
                del handlers.unary[method]
            else:
                handlers.unary[method] = fn
        server = DirectServer(handlers, identity)
        await server.start()
        return server

    return run_sync(start())


@contextmanager
def model_over_one_server(
    path: str,
    dht_prefix: str,
    cache_tokens: int = 4096,
    limits: ServerLimits | None = None,
    metrics: ServerMetrics | None = None,
    **client: float,
) -> Iterator[DistributedModelForCausalLM]:
    """The model of checkpoint `path` (in eval mode) over one in-process server of all its blocks (with the
    server's `limits` and `metrics` where given, and `client` options of SwarmClient)."""
    config, head = load_client_head(path)
    blocks = config.num_hidden_layers
    identity = Identity.generate()
    server = start_server(path, blocks, identity, cache_tokens, limits, metrics)
    swarm = SwarmClient([], dht_prefix, blocks, missing_blocks_timeout_s=0, **client)
    swarm.use_servers([online_server(identity.peer_id, 0, blocks, address=server.address)])
    try:
        yield DistributedModelForCausalLM(config, head, swarm).eval()
    finally:
        run_sync(swarm.shutdown())
        run_sync(server.stop())


@contextmanager
def beside_transformers(path: str, prefix: str) -> Iterator[tuple]:
    """(the model over one in-process server of every block, transformers' own model of `path`, its tokenizer
    padding on the left): what tests comparing the client with transformers start from."""
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.padding_side = "left"
    with model_over_one_server(path, prefix) as model:
        yield model, local, tokenizer


def refusals(metrics: ServerMetrics, reason: str) -> float:
    """What `swarmllm_server_refusals_total{reason=...}` counted."""
    value = metrics.registry.get_sample_value("swarmllm_server_refusals_total", {"reason": reason})
    return 0.0 if value is None else value


def perturbed(path, noise: float = 0.05, seed: int = 0):
    """A draft that agrees with the checkpoint often but not always: its weights with noise added (more noise,
    less agreement)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise * param.std())
    return model
