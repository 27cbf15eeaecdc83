"""Shared by the benchmarks: the checkpoints (the same shapes as the Petals peer recipe in shared/petals-peer),
timing with medians, and appending a result table to benchmarks/RESULTS.md."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
PROMPT = [[1, 17, 42, 99, 5, 23]]
# the Petals cell of a llama7b row: Petals' GPU recipe lives in shared/petals-peer/gpu/ and runs on its own
PETALS_ON_GPU = "run shared/petals-peer/gpu/ on the same machine"

SHAPES = {
    # hidden 64, 6 layers, vocab 160 (Petals peer "tiny")
    "tiny": dict(
        vocab_size=160,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.1,
    ),
    # 246M params: hidden 1024, 16 layers, GQA 16/4, vocab 32000 (Petals peer "medium")
    "medium": dict(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=16,
        num_attention_heads=16,
        num_key_value_heads=4,
        max_position_embeddings=2048,
    ),
    # Llama-2-7B's shape, random weights (the Petals GPU peer's, shared/petals-peer/gpu/gpu_anchor.py)
    "llama7b": dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
    ),
}


def checkpoint(name: str, root: Path | None = None) -> Path:
    """A random Llama checkpoint of a named shape, built once (seed 7, no EOS so generation never stops early)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    path = (
        root or Path(os.environ.get("SWARMLLM_BENCH_DIR", Path.home() / ".cache" / "swarmllm" / "bench"))
    ) / name
    if not (path / "config.json").exists():
        torch.manual_seed(7)
        config = LlamaConfig(**SHAPES[name], eos_token_id=None)
        if name == "llama7b":  # 7B parameters: initialise on the GPU in float16, CPU init would take minutes
            with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
                model = LlamaForCausalLM(config).half()
        else:
            model = LlamaForCausalLM(config)
        model.save_pretrained(path)
    return path


def commit_src(commit: str, folder: str | Path) -> Path:
    """The `src` folder of the repository's `commit`, extracted into `folder` (`git archive`): an older tree for
    a paired A/B (`ab.py`, `burst.py`), run through `PYTHONPATH`."""
    root = Path(__file__).resolve().parents[1]
    archive = subprocess.run(["git", "archive", commit], cwd=root, capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return Path(folder) / "src"


def rounds_of(swarm: int, swarms: int, rounds: int) -> int:
    """How many of `rounds` the `swarm`-th of `swarms` swarms (or pairs, or sets of them) started in turn runs."""
    return rounds // swarms + (swarm < rounds % swarms)


def paired_swarms(
    start: Callable[[int], subprocess.Popen], swarms: int, rounds: int
) -> Iterator[tuple[int, list[tuple[int, subprocess.Popen]]]]:
    """The turns of a paired A/B of two swarm processes (side 0 is A, side 1 is B): `rounds` rounds split over
    `swarms` pairs of them started afresh (`start(side)`), one pair after another, each round as (the pair's
    number, its two (side, process) in the order they go). Which side starts first, and goes first in a round,
    alternates. One pair is not enough: a swarm keeps a speed of its own for its life (null runs of one pair gave
    B/A from 0.87 to 1.17; RESULTS.md, session 53), so a verdict needs the pairs to agree."""
    for pair in range(swarms):
        first = [0, 1] if pair % 2 == 0 else [1, 0]
        procs: dict[int, subprocess.Popen] = {}
        try:
            for side in first:
                procs[side] = start(side)
            for round_ in range(rounds_of(pair, swarms, rounds)):
                yield pair, [(side, procs[side]) for side in (first if round_ % 2 == 0 else first[::-1])]
        finally:
            for proc in procs.values():
                proc.stdin.close()
                proc.wait(120)


def paired_median_times(
    first: Callable[[], object], second: Callable[[], object], repeats: int
) -> tuple[float, float]:
    """Median seconds of two workloads timed alternately (noise on a shared machine hits both alike)."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), times):
            began = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            out.append(time.perf_counter() - began)
    return statistics.median(times[0]), statistics.median(times[1])


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all its threads) process `pid` has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (
        f"{os.cpu_count()} cores ({cpu}){gpu}, torch {torch.__version__}, Python {platform.python_version()}"
    )


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def append_results(title: str, table: str, notes: str = "") -> None:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    command = " ".join(["python", *sys.argv])
    block = (
        f"\n## {title} ({stamp}, commit {commit})\nMachine: {machine()}. Command: `{command}`\n\n{table}\n"
    )
    if notes:
        block += f"\n{notes}\n"
    with RESULTS.open("a") as f:
        f.write(block)


@dataclass
class SwarmRun:
    swarm_steps: float  # single-session decode steps/s through the swarm
    local_steps: float  # the same generate with local transformers
    swarm_fwd_tps: float  # batch forward tokens/s
    local_fwd_tps: float
    tokens_equal: bool
    # from one more generate, instrumented: per-step HopTimings of its decode steps, median step, time per token
    hop_timings: list = field(default_factory=list)
    step_s: float = 0.0
    token_s: float = 0.0
    logits_diff: float = 0.0  # max |swarm - local| over a forward's logits, over max |local| (relative)
    server_notes: list[str] = field(default_factory=list)  # what the servers logged of note (`server_notes`)


NOTE_WORDS = ("decode steps run", "captur", "eager", "warn", "error", "traceback")


def server_notes(swarm) -> list[str]:
    """The lines of a local swarm's server logs that say how steps ran (CUDA graphs or eager) or that something
    went wrong: on a GPU a failed capture falls back to eager steps, which the speed alone would not say."""
    return [
        f"{server.name}: {line.strip()}"
        for server in swarm.servers
        for line in server.log
        if any(word in line.lower() for word in NOTE_WORDS)
    ]


def measure_swarm(
    name: str,
    *,
    new_tokens: int,
    forward_tokens: int,
    repeats: int,
    servers: int = 2,
    threads: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    server_args: Sequence[str] = (),
) -> SwarmRun:
    """One model through a fresh local swarm of `servers` processes, beside local transformers, in one run.
    On a GPU (`device="cuda"`) all servers share it, and the client keeps its embeddings and head there too.
    `server_args` go to every `swarmllm serve` (e.g. --compile)."""
    from transformers import AutoModelForCausalLM

    from swarmllm import AutoDistributedModelForCausalLM
    from swarmllm.client import session as session_module
    from swarmllm.local import LocalSwarm

    path = checkpoint(name)
    torch_dtype = getattr(torch, dtype)
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(device).eval()
    num_blocks = local.config.num_hidden_layers
    prompt = torch.tensor(PROMPT, device=device)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, local.config.vocab_size, (1, forward_tokens), generator=generator).to(device)
    cuts = [round(i * num_blocks / servers) for i in range(servers + 1)]
    extra = ["--device", device, "--dtype", dtype, *server_args]
    extra += ["--num-threads", str(threads)] if threads else []
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(path), span) for span in zip(cuts, cuts[1:])], extra=extra)
        remote = AutoDistributedModelForCausalLM.from_pretrained(
            str(path), initial_peers=swarm.initial_peers, device=device, dtype=torch_dtype
        )
        try:
            with torch.no_grad():
                want = local.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
                got = remote.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
                ours, theirs = remote(batch).logits.float(), local(batch).logits.float()
                logits_diff = ((ours - theirs).abs().max() / theirs.abs().max()).item()
                swarm_gen, local_gen = paired_median_times(
                    lambda: remote.generate(prompt, max_new_tokens=new_tokens, do_sample=False),
                    lambda: local.generate(prompt, max_new_tokens=new_tokens, do_sample=False),
                    repeats,
                )
                swarm_fwd, local_fwd = paired_median_times(
                    lambda: remote(batch), lambda: local(batch), repeats
                )
                hop_timings, step_times = [], []
                original_step = session_module.InferenceSession.step

                async def timed_step(self, *args, **kwargs):
                    began = time.perf_counter()
                    out = await original_step(self, *args, **kwargs)
                    step_times.append(time.perf_counter() - began)
                    hop_timings.append(self.last_timings)
                    return out

                session_module.InferenceSession.step = timed_step
                try:
                    began = time.perf_counter()
                    remote.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
                    instrumented_s = time.perf_counter() - began
                finally:
                    session_module.InferenceSession.step = original_step
        finally:
            remote.shutdown()
        notes = server_notes(swarm)
    return SwarmRun(
        swarm_steps=new_tokens / swarm_gen,
        local_steps=new_tokens / local_gen,
        swarm_fwd_tps=forward_tokens / swarm_fwd,
        local_fwd_tps=forward_tokens / local_fwd,
        tokens_equal=got.tolist() == want.tolist(),
        hop_timings=hop_timings[1:],  # the first step is the prefill
        step_s=statistics.median(step_times[1:]),
        token_s=instrumented_s / new_tokens,
        logits_diff=logits_diff,
        server_notes=notes,
    )


def start_worker(command: Sequence[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A benchmark's worker process (stdin and stdout piped, text), once it has printed its line starting with
    `ready`; that line is returned too (a worker may add what it checked while starting)."""
    proc = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    while (line := proc.stdout.readline()) and not line.startswith("ready"):
        pass
    if not line:
        raise RuntimeError(f"a worker exited before it was ready: {' '.join(command)}")
    return proc, line.strip()


@contextmanager
def smollm2_api(name: str = "smollm2") -> Iterator[tuple[object, Path, str]]:
    """A local swarm of SmolLM2-135M-Instruct (bootstrap and 2 servers of 15 blocks, default flags) and
    `swarmllm api` over it: (the LocalSwarm, the checkpoint, the API's base URL)."""
    from swarmllm.bundled import smollm2_checkpoint
    from swarmllm.local import LocalSwarm

    path = smollm2_checkpoint()
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        swarm.add_servers([(str(path), (0, 15)), (str(path), (15, 30))])
        yield swarm, path, swarm.start_api(str(path), extra=["--name", name])


def with_tokenizer(path: Path, folder: Path) -> Path:
    """`folder`: the checkpoint at `path` (linked) and a word-level tokenizer of one word per id ("t0", "t1",
    ...), since the benchmarks' random checkpoints have none and the API needs one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    vocab_size = AutoConfig.from_pretrained(path).vocab_size
    backend = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder.mkdir()
    for file in path.iterdir():
        (folder / file.name).symlink_to(file)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0").save_pretrained(folder)
    return folder
