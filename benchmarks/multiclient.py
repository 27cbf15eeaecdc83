"""Many users at once: aggregate decode tokens/s of 1, 4 and 8 concurrent clients (each its own process, its own
prompt, greedy) through a local swarm of 2 servers, on loopback and under an emulated WAN (`netem.py`), against
our single-session rate and local transformers generating the same prompts as one batch. Every client's tokens
are checked against its own solo run through the same swarm, and the solo runs against local transformers.

    python benchmarks/multiclient.py [--models tiny medium] [--clients 1 4 8] [--rtt-ms 100 --mbit 100]
        [--networks loopback wan] [--faces process api] [--batch-wait-ms 10] [--no-record]
    python benchmarks/multiclient.py --models llama7b --device cuda --dtype float16 --networks loopback

Servers continuously batch the sessions' decode steps (server/batching.py); `--server-args=--batch-wait-ms=0`
shows what merging without waiting gives. `--faces api` has the clients be concurrent requests to one
`swarmllm api` process instead (greedy completions of the same prompts, as token ids, `ignore_eos`), whose
generates share one LM head (`client/heads.py`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import torch
from common import (
    PETALS_ON_GPU,
    append_results,
    checkpoint,
    markdown_table,
    server_notes,
    with_tokenizer,
)
from netem import Emulator
from transformers.utils import logging as hf_logging

NEW_TOKENS = {"tiny": 64, "medium": 32, "llama7b": 64}
PROMPT_LENGTH = 6


def prompt(seed: int, vocab_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, vocab_size, (PROMPT_LENGTH,), generator=generator).tolist()


def worker(path: str, peers: list[str], device: str, dtype: str) -> None:
    """A client process: on each stdin line `SEED NEW_TOKENS`, one greedy generate of that seed's prompt,
    answered with its tokens and its start and end (CLOCK_MONOTONIC, comparable across processes)."""
    from swarmllm import AutoDistributedModelForCausalLM

    torch.set_num_threads(1)  # many clients share the machine's cores with the servers
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=peers, device=device, dtype=getattr(torch, dtype)
    )
    vocab = remote.config.vocab_size

    def ids(seed: int) -> torch.Tensor:
        return torch.tensor([prompt(seed, vocab)], device=device)

    with torch.no_grad():
        remote.generate(ids(0), max_new_tokens=2, do_sample=False)  # warm-up
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() == "stats":
                print(json.dumps(batching_stats(remote.swarm)), flush=True)
                continue
            seed, new = (int(x) for x in line.split())
            began = time.monotonic()
            out = remote.generate(ids(seed), max_new_tokens=new, do_sample=False)
            ended = time.monotonic()
            print(json.dumps({"tokens": out[0].tolist(), "began": began, "ended": ended}), flush=True)
    remote.shutdown()


def batching_stats(swarm) -> list[tuple[int, int]]:
    """Each server's (merged decode steps, session steps in them) so far, from its `info`."""
    from swarmllm.client.loop import run_sync
    from swarmllm.wire import Message

    async def ask() -> list[tuple[int, int]]:
        stats = []
        for info in sorted(await swarm.servers(refresh=True), key=lambda s: s.start_block):
            record = (await (await swarm.connection(info.peer_id)).call("info", Message({}))).meta
            stats.append((record["decode_steps"], record["decode_session_steps"]))
        return stats

    return run_sync(ask())


class Clients:
    """Client processes, started once per swarm and reused by every run."""

    def __init__(self, count: int, path: Path, peers: list[str], device: str, dtype: str):
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        command = [sys.executable, __file__, "--worker", str(path), "--device", device, "--dtype", dtype]
        command += ["--peers", *peers]
        self.procs = [
            subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            for _ in range(count)
        ]
        for proc in self.procs:
            line = proc.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a client did not start: {line!r}")

    def run(self, seeds: list[int], new_tokens: int) -> list[dict]:
        """One generate on each of the first len(seeds) clients at once."""
        procs = self.procs[: len(seeds)]
        for proc, seed in zip(procs, seeds, strict=True):
            proc.stdin.write(f"{seed} {new_tokens}\n")
            proc.stdin.flush()
        return [json.loads(proc.stdout.readline()) for proc in procs]

    def stats(self) -> list[tuple[int, int]]:
        self.procs[0].stdin.write("stats\n")
        self.procs[0].stdin.flush()
        return json.loads(self.procs[0].stdout.readline())

    def close(self) -> None:
        for proc in self.procs:
            proc.stdin.close()
        for proc in self.procs:
            proc.wait(30)


class ApiClients:
    """The clients as concurrent requests to one `swarmllm api` process (the same interface as `Clients`); its
    model folder links the checkpoint beside a word-level tokenizer of one word per id, so the answers' texts
    give their token ids back."""

    def __init__(self, swarm, path: Path, folder: Path, vocab: int, device: str, dtype: str):
        from swarmllm import AutoDistributedModelForCausalLM
        from swarmllm.dht.records import dht_prefix_for

        model = with_tokenizer(path, folder / "model")
        flags = ["--name", "bench", "--dht-prefix", dht_prefix_for(str(path)), "--max-concurrent", "64"]
        flags += ["--device", device, "--dtype", dtype]
        self.api, self.vocab = swarm.start_api(str(model), extra=flags), vocab
        self.pool = ThreadPoolExecutor(64)
        # a client of this process only to ask the servers for their batching counts
        self.observer = AutoDistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers
        )
        self._one(0, 2)  # warm-up

    def _one(self, seed: int, new_tokens: int) -> dict:
        ids = prompt(seed, self.vocab)
        body = {
            "model": "bench",
            "prompt": ids,
            "max_tokens": new_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "skip_special_tokens": False,  # (the word-level tokenizer's "t0" is its unk token: special)
        }
        request = urllib.request.Request(
            self.api + "/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        began = time.monotonic()
        with urllib.request.urlopen(request, timeout=600) as reply:
            text = json.load(reply)["choices"][0]["text"]
        ended = time.monotonic()
        return {"tokens": ids + [int(word[1:]) for word in text.split()], "began": began, "ended": ended}

    def run(self, seeds: list[int], new_tokens: int) -> list[dict]:
        return list(self.pool.map(lambda seed: self._one(seed, new_tokens), seeds))

    def stats(self) -> list[tuple[int, int]]:
        return batching_stats(self.observer.swarm)

    def close(self) -> None:
        self.observer.shutdown()
        self.pool.shutdown()


def aggregate_tps(results: list[dict], new_tokens: int) -> float:
    span_s = max(r["ended"] for r in results) - min(r["began"] for r in results)
    return len(results) * new_tokens / span_s


def local_batch_tps(model, vocab: int, clients: int, new_tokens: int, repeats: int) -> tuple[float, list]:
    ids = torch.tensor([prompt(seed, vocab) for seed in range(clients)], device=model.device)
    times, out = [], None
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
        for _ in range(repeats):
            began = time.perf_counter()
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - began)
    return clients * new_tokens / statistics.median(times), out.tolist()


def petals_rates(name: str, args: argparse.Namespace) -> tuple[dict[int, float], bool] | str:
    """Petals 2.2's aggregate tokens/s per client count (loopback; its own venv and recipe, as hotpath.py runs
    it), and whether every client's tokens equal its solo run; or why it could not run."""
    from hotpath import petals_swarm

    with petals_swarm(args.petals_venv, name, args.petals_dir) as env:
        if isinstance(env, str):
            return env
        script = Path(__file__).with_name("petals_multiclient.py")
        command = [
            str(args.petals_venv / "bin" / "python"),
            str(script),
            str(NEW_TOKENS[name]),
            str(args.repeats),
        ]
        try:
            out = subprocess.run(
                [*command, *map(str, args.clients)], env=env, capture_output=True, text=True, timeout=1800
            )
            result = json.loads(out.stdout.strip().splitlines()[-1])
        except (subprocess.SubprocessError, OSError, ValueError, IndexError) as e:
            return f"Petals run failed: {e!r}"
        if "error" in result:
            return f"Petals run failed: {result['error']}"
        return {int(k): v for k, v in result["clients"].items()}, result["equal"]


def bench(name: str, network: str, args: argparse.Namespace, local, petals) -> list[list[object]]:
    from swarmllm.local import LocalSwarm

    path = checkpoint(name)
    blocks = local.config.num_hidden_layers
    rows = []
    with ExitStack() as stack:
        per_server: list[list[str]] = [[], []]
        if network == "wan":
            emulator = stack.enter_context(Emulator(args.rtt_ms, args.mbit))
            emulator.start(2)
            per_server = [emulator.server_args(i) for i in range(2)]
        swarm = stack.enter_context(LocalSwarm())
        swarm.start_bootstrap()
        half = blocks // 2
        extra = ["--batch-wait-ms", str(args.batch_wait_ms), "--device", args.device, "--dtype", args.dtype]
        extra += args.server_args
        for span, own in zip([(0, half), (half, blocks)], per_server, strict=True):
            swarm.add_server(str(path), span, extra=[*extra, *own])
        for face in args.faces:
            if face == "api":
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                clients = ApiClients(swarm, path, folder, local.config.vocab_size, args.device, args.dtype)
            else:
                clients = Clients(max(args.clients), path, swarm.initial_peers, args.device, args.dtype)
            try:
                rows += runs_of(clients, face, name, network, args, local, petals)
            finally:
                clients.close()
        print(*server_notes(swarm), sep="\n", file=sys.stderr)
    return rows


def runs_of(
    clients, face: str, name: str, network: str, args: argparse.Namespace, local, petals
) -> list[list[object]]:
    """The table's rows of one swarm reached by one kind of clients, each client count in turn."""
    vocab, new, most = local.config.vocab_size, NEW_TOKENS[name], max(args.clients)
    print(f"{name} {network} {face}: solo runs ...", file=sys.stderr)
    solo = {seed: clients.run([seed], new)[0] for seed in range(most)}
    local_tokens = local_batch_tps(local, vocab, most, new, 1)[1]
    solo_equal_local = all(solo[seed]["tokens"] == local_tokens[seed] for seed in range(most))
    single, rows = None, []
    for count in args.clients:
        print(f"{name} {network} {face}: {count} concurrent clients ...", file=sys.stderr)
        # an untimed run at this count first: the servers re-lay their weights out for merged steps
        clients.run(list(range(count)), new)
        before = clients.stats()
        runs = [clients.run(list(range(count)), new) for _ in range(args.repeats)]
        after = clients.stats()
        merged = " / ".join(
            f"{(m1 - m0) / max(s1 - s0, 1):.1f}" for (s0, m0), (s1, m1) in zip(before, after, strict=True)
        )
        tps = statistics.median(aggregate_tps(r, new) for r in runs)
        equal = all(r[i]["tokens"] == solo[i]["tokens"] for r in runs for i in range(count))
        single = single or (tps if count == 1 else None)
        local_tps = local_batch_tps(local, vocab, count, new, args.repeats)[0]
        rows.append(
            [
                name,
                network,
                face,
                count,
                f"{tps:.1f}",
                f"{tps / single:.2f}x" if single else "",
                merged,
                f"{local_tps:.1f}",
                f"{tps / local_tps:.2f}",
                _petals_cell(petals, count, network),
                equal,
                solo_equal_local,
            ]
        )
        print(
            f"{name} {network} {face}: {count} clients, {tps:.1f} tokens/s, tokens = solo: {equal}",
            file=sys.stderr,
        )
    return rows


def _petals_cell(petals, count: int, network: str) -> str:
    if network != "loopback":
        return "not run (Petals' traffic goes over libp2p, which the emulator does not carry)"
    if isinstance(petals, str):
        return petals
    rates, equal = petals
    return f"{rates[count]:.1f} (tokens = solo: {equal})" if count in rates else ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--peers", nargs="+", help=argparse.SUPPRESS)
    parser.add_argument(
        "--device", default="cpu", help="cuda: servers and clients share the GPU (use llama7b)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--models", nargs="+", default=["tiny", "medium"], choices=list(NEW_TOKENS))
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8])
    parser.add_argument("--networks", nargs="+", default=["loopback", "wan"], choices=["loopback", "wan"])
    parser.add_argument(
        "--faces",
        nargs="+",
        default=["process"],
        choices=["process", "api"],
        help="the clients: each its own process, or concurrent requests to one `swarmllm api`",
    )
    parser.add_argument("--rtt-ms", type=float, default=100.0)
    parser.add_argument("--mbit", type=float, default=100.0)
    parser.add_argument("--batch-wait-ms", type=float, default=10.0)
    parser.add_argument(
        "--server-args",
        nargs="*",
        action="extend",
        default=[],
        help="more `swarmllm serve` flags (may repeat)",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--petals-venv", type=Path, default=Path("/tmp/pvenv"))
    parser.add_argument("--petals-dir", type=Path, default=Path("/tmp/pbench-multi"))
    parser.add_argument("--no-petals", action="store_true")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.peers, args.device, args.dtype)
        return
    if args.clients[0] != 1:
        parser.error("--clients must start with 1 (the single-session rate the others are compared with)")
    hf_logging.disable_progress_bar()
    from transformers import AutoModelForCausalLM

    rows = []
    for name in args.models:
        dtype = getattr(torch, args.dtype)
        local = AutoModelForCausalLM.from_pretrained(checkpoint(name), dtype=dtype).to(args.device).eval()
        petals = "not run (--no-petals)"
        if name == "llama7b":
            petals = f"{PETALS_ON_GPU} (AGG=1)"
        elif not args.no_petals and "loopback" in args.networks:
            print(f"{name}: Petals ...", file=sys.stderr)
            petals = petals_rates(name, args)
        for network in args.networks:
            rows += bench(name, network, args, local, petals)
        del local
    table = markdown_table(
        [
            "model",
            "network",
            "clients are",
            "clients",
            "swarm tokens/s (all clients)",
            "vs 1 client",
            "sessions per server step (server 1 / 2)",
            "local transformers, same batch, tokens/s",
            "swarm/local",
            "Petals 2.2 tokens/s (all clients)",
            "every client's tokens = its solo run",
            "solo runs = local transformers",
        ],
        rows,
    )
    print(table)
    if not args.no_record:
        wan = f"{args.rtt_ms:.0f} ms round trip, {args.mbit:.0f} Mbit/s per direction (benchmarks/netem.py)"
        append_results(
            "Many clients at once: continuous batching through 2 servers, loopback and emulated WAN",
            table,
            f"Each client is its own process (1 torch thread), or a request to one `swarmllm api` (`api`: "
            "default torch threads, its generates sharing one LM head), with its own 6-token prompt, greedy, new tokens "
            f"{', '.join(f'{k} {v}' for k, v in NEW_TOKENS.items())}; aggregate = all clients' new tokens / "
            f"(last end - first start), median of {args.repeats} after an untimed run at each client count. Emulated WAN: {wan}, on every direct "
            f"connection to a server (client to server and the push between servers). Servers: "
            f"--batch-wait-ms {args.batch_wait_ms:g} --device {args.device} --dtype {args.dtype} "
            f"{' '.join(args.server_args)}. Local transformers: one "
            "generate of the same prompts as one batch (default torch threads), no network.",
        )


if __name__ == "__main__":
    main()
