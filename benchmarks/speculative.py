"""Speculative decoding through a local swarm of 2 servers under an emulated round trip: single-session tokens/s
of plain greedy `generate` against `generate(assistant_model=draft)`, same tokens asserted; then the same through
`swarmllm api` (one API serving the model twice: without a draft, and with `--draft-model`), greedy completions
of `--new-tokens` tokens each (`ignore_eos`), the same texts asserted.

The round trip is emulated here, in this script: each server announces its direct address on 127.0.0.2 (the
same port), where a small asyncio TCP proxy running in this process forwards to the server on 127.0.0.1 after
holding every chunk for half the round trip, each way (order kept). Everything that crosses to a server (the
client's steps, its replies, server-to-server pushes) pays it; DHT traffic does not. No bandwidth cap.

The draft is the target checkpoint with Gaussian noise on every weight, the noise picked (among a few levels,
measured locally before the run) as the largest whose drafts the target accepts >= 70% of the time; its acceptance
in the run is reported. It runs locally beside the client, as a real draft would.

    python benchmarks/speculative.py [--model tiny] [--rtt-ms 50] [--draft-tokens 4] [--new-tokens 48]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPT, append_results, checkpoint, markdown_table, with_tokenizer  # noqa: E402

PROXY_HOST = "127.0.0.2"
NOISE_LEVELS = (0.2, 0.1, 0.05, 0.03, 0.02, 0.01, 0.005, 0.002)


class DelayProxy:
    """TCP proxies (listen host:port -> 127.0.0.1:port), each chunk held `delay_s` each way, on their own loop."""

    def __init__(self, delay_s: float):
        self.delay_s = delay_s
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.servers = []

    def add(self, port: int) -> None:
        async def start():
            return await asyncio.start_server(lambda r, w: self._connection(r, w, port), PROXY_HOST, port)

        self.servers.append(asyncio.run_coroutine_threadsafe(start(), self.loop).result())

    async def _connection(self, client_r, client_w, port):
        server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
        for sock_writer in (client_w, server_w):
            sock = sock_writer.get_extra_info("socket")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))

    async def _pipe(self, reader, writer):
        queue: asyncio.Queue = asyncio.Queue()

        async def deliver():
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if data is None:
                    writer.close()
                    return
                writer.write(data)

        sender = asyncio.create_task(deliver())
        try:
            while data := await reader.read(1 << 16):
                queue.put_nowait((time.monotonic() + self.delay_s, data))
        except OSError:
            pass
        queue.put_nowait((time.monotonic() + self.delay_s, None))
        await sender

    def close(self):
        for server in self.servers:
            self.loop.call_soon_threadsafe(server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


def free_port() -> int:
    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
        with socket.socket() as b:
            try:
                b.bind((PROXY_HOST, port))
                return port
            except OSError:
                continue


def perturbed(path, noise: float, seed: int = 0):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * noise * param.std())
    return model


def prompts(vocab_size: int, count: int = 3) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    extra = [torch.randint(4, vocab_size, (1, 6), generator=generator) for _ in range(count - 1)]
    return [torch.tensor(PROMPT), *extra]


def pick_draft(path, k: int, new_tokens: int):
    """The noisiest draft whose drafts a local copy of the target accepts >= 70% of the time on the prompts."""
    from swarmllm.client.speculative import SpeculationStats, speculative_generate
    from swarmllm.models import KVCache, load_client_head, load_span

    _, head = load_client_head(path)
    span = load_span(path, 0, head.config.num_layers)
    for noise in NOISE_LEVELS:
        draft, stats = perturbed(path, noise), SpeculationStats()
        for seed in range(3):
            prompt = torch.randint(
                4, head.config.vocab_size, (1, 6), generator=torch.Generator().manual_seed(seed)
            )
            cache = KVCache(len(span.blocks), 1, 6 + new_tokens, span.config, torch.float32, "cpu")

            @torch.no_grad()
            def verify(tokens, position, cache=cache):
                return head.logits(span(head.embed(tokens), pos=position, cache=cache))

            speculative_generate(
                verify, draft, prompt, max_new_tokens=new_tokens, num_draft_tokens=k, stats=stats
            )
        print(f"draft noise {noise}: local acceptance {stats.acceptance:.0%}", flush=True)
        if stats.acceptance >= 0.7:
            return noise, draft, stats.acceptance
    raise RuntimeError("no noise level gives a draft that agrees >= 70% of the time")


def complete(
    api: str, model: str, prompt: list[int], max_tokens: int, logprobs: int | None = None
) -> tuple[str, float]:
    """A greedy completion of exactly `max_tokens` tokens through the API (with each token's `logprobs` top
    alternatives, if given), and the seconds it took."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if logprobs is not None:
        body["logprobs"] = logprobs
    request = urllib.request.Request(
        api + "/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    began = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as reply:
        answer = json.load(reply)
    seconds = time.perf_counter() - began
    assert answer["usage"]["completion_tokens"] == max_tokens, answer["usage"]
    if logprobs is not None:
        assert len(answer["choices"][0]["logprobs"]["token_logprobs"]) == max_tokens
    return answer["choices"][0]["text"], seconds


def api_rates(swarm, path, draft, args, inputs) -> tuple[float, float]:
    """Median tokens/s of greedy completions through one `swarmllm api` serving the model without a draft
    ("plain") and with it ("spec"), paired request by request."""
    from swarmllm.dht.records import dht_prefix_for

    with tempfile.TemporaryDirectory() as folder:
        draft.save_pretrained(Path(folder) / "draft")
        model = str(with_tokenizer(path, Path(folder) / "model"))
        names = ["--name", "plain", "--name", "spec"]
        prefixes = ["--dht-prefix", dht_prefix_for(str(path))] * 2
        drafts = ["--draft-model", "none", "--draft-model", str(Path(folder) / "draft")]
        k = ["--num-draft-tokens", str(args.draft_tokens)]
        api = swarm.start_api([model, model], extra=[*names, *prefixes, *drafts, *k])
        texts: dict[str, list[str]] = {"plain": [], "spec": []}
        seconds: dict[str, list[float]] = {"plain": [], "spec": []}
        for repeat in range(args.repeats + 1):  # the first: a warm-up
            for prompt in inputs:
                for model in ("plain", "spec"):
                    text, took = complete(api, model, prompt[0].tolist(), args.new_tokens, args.logprobs)
                    if repeat:
                        texts[model].append(text)
                        seconds[model].append(took)
        assert texts["plain"] == texts["spec"], "the API's speculative greedy texts differ"
    return tuple(args.new_tokens / statistics.median(seconds[m]) for m in ("plain", "spec"))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--rtt-ms", type=float, default=50.0)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--logprobs", type=int, help="the API's requests ask for log-probabilities (top N)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.local import LocalSwarm

    torch.set_num_threads(1)
    path = checkpoint(args.model)
    noise, draft, local_acceptance = pick_draft(path, args.draft_tokens, args.new_tokens)
    inputs = prompts(draft.config.vocab_size)
    num_blocks = draft.config.num_hidden_layers
    proxy = DelayProxy(args.rtt_ms / 2e3)
    rows = []
    try:
        with LocalSwarm() as swarm:
            swarm.start_bootstrap()
            for span in ((0, num_blocks // 2), (num_blocks // 2, num_blocks)):
                port = free_port()
                proxy.add(port)
                extra = ["--direct-port", str(port), "--announce-host", PROXY_HOST, "--num-threads", "1"]
                swarm.add_server(str(path), span, extra=extra)
            remote = AutoDistributedModelForCausalLM.from_pretrained(
                str(path), initial_peers=swarm.initial_peers
            )
            try:
                options = dict(max_new_tokens=args.new_tokens, do_sample=False)
                speculative = dict(options, assistant_model=draft, num_assistant_tokens=args.draft_tokens)
                with torch.no_grad():
                    for prompt in inputs:  # also the warm-up
                        plain_ids = remote.generate(prompt, **options)
                        spec_ids = remote.generate(prompt, **speculative)
                        assert spec_ids.tolist() == plain_ids.tolist(), "speculative greedy tokens differ"
                    plain_s, spec_s, stats = [], [], []
                    for _ in range(args.repeats):
                        for prompt in inputs:
                            began = time.perf_counter()
                            remote.generate(prompt, **options)
                            plain_s.append(time.perf_counter() - began)
                            began = time.perf_counter()
                            remote.generate(prompt, **speculative)
                            spec_s.append(time.perf_counter() - began)
                            stats.append(remote.last_speculation)
            finally:
                remote.shutdown()
            api_plain, api_spec = api_rates(swarm, path, draft, args, inputs)
    finally:
        proxy.close()
    plain, spec = args.new_tokens / statistics.median(plain_s), args.new_tokens / statistics.median(spec_s)
    acceptance = sum(s.accepted for s in stats) / sum(s.drafted for s in stats)
    rounds = statistics.median(s.rounds for s in stats)
    rows.append(
        [
            args.model,
            f"{args.rtt_ms:.0f} ms",
            args.draft_tokens,
            f"{noise} ({local_acceptance:.0%})",
            f"{plain:.2f}",
            f"{spec:.2f}",
            f"{spec / plain:.2f}x",
            f"{acceptance:.0%}",
            f"{rounds:.0f}",
            "yes",
            f"{api_plain:.2f} / {api_spec:.2f} ({api_spec / api_plain:.2f}x)",
        ]
    )
    table = markdown_table(
        [
            "model",
            "emulated RTT",
            "k",
            "draft noise (local acceptance)",
            "plain tokens/s",
            "speculative tokens/s",
            "speedup",
            "acceptance",
            f"rounds per {args.new_tokens} tokens",
            "greedy tokens equal",
            "swarmllm api: plain / --draft-model tokens/s"
            + ("" if args.logprobs is None else f" (logprobs {args.logprobs})"),
        ],
        rows,
    )
    print(table)
    if not args.no_save:
        append_results(
            "Speculative decoding through 2 servers under an emulated round trip",
            table,
            f"Single session, greedy, batch 1, {len(inputs)} prompts x {args.repeats} repeats; medians of paired "
            "runs. Delay: this script's asyncio TCP proxy on "
            f"{PROXY_HOST} holds every chunk RTT/2 each way before the server on 127.0.0.1 (the servers announce "
            "the proxy's address), so client->server, server->server pushes and replies each cross one delayed "
            "link. The draft is the target with Gaussian weight noise (relative std in the table), run locally. "
            "The API column: greedy completions of the same prompts (as token ids, `ignore_eos`) through one "
            "`swarmllm api` process serving the model without and with `--draft-model` (the same draft, saved), "
            "texts asserted equal; wall time of each HTTP request"
            + ("." if args.logprobs is None else f", each asking for `logprobs: {args.logprobs}`."),
        )


if __name__ == "__main__":
    main()
