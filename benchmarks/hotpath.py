"""The hot path in one run: transport round trips, where a decode step's time goes, and single-session steps/s
and batch-forward tokens/s for the tiny and medium models through 2 servers, beside local transformers and
Petals 2.2 (its own venv, the recipe in shared/petals-peer).

    python benchmarks/hotpath.py [--models tiny medium] [--petals-venv /tmp/pvenv] [--no-record]
    python benchmarks/hotpath.py --models llama7b --device cuda --dtype float16 [--quant none nf4]
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from common import PETALS_ON_GPU, append_results, markdown_table, measure_swarm
from transformers.utils import logging as hf_logging
from wire_roundtrip import format_table, run_roundtrips

from swarmllm.wire import Frame, Kind, Message, encode_frame

PETALS_PEER = Path(__file__).resolve().parents[1].parent / "shared" / "petals-peer"
# how servers run decode steps (server/decode.py) -> their `swarmllm serve` flags
DECODE_MODES = {"eager": ["--no-cuda-graphs", "--no-compile"], "compiled": ["--compile"], "cuda-graphs": []}
NEW_TOKENS = {"tiny": 64, "medium": 32, "llama7b": 64}
BLOCKS = {"tiny": 6, "medium": 16, "llama7b": 32}


def serialization_s(hidden_size: int, repeats: int = 2000) -> float:
    """Encode + decode of one decode step's hidden state (what each end of a hop does once)."""
    import asyncio

    from swarmllm.wire import DEFAULT_LIMITS, read_frame

    frame = Frame(Kind.MESSAGE, 1, Message({"position": 7}, [torch.randn(1, 1, hidden_size)]))

    async def run() -> float:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            data = b"".join(bytes(part) for part in encode_frame(frame))
            reader = asyncio.StreamReader()
            reader.feed_data(data)
            reader.feed_eof()
            await read_frame(reader, DEFAULT_LIMITS)
            times.append(time.perf_counter() - began)
        return statistics.median(times)

    return asyncio.run(run())


def breakdown(label: str, name: str, run) -> list[list[object]]:
    """Rows of ms per token, all from one instrumented generate: the client's share, each server's compute,
    serialization, and the rest of the step (network, process wake-ups, handlers)."""
    from common import SHAPES

    hops = len(run.hop_timings[0])
    compute = [statistics.median(step[hop].compute_s for step in run.hop_timings) for hop in range(hops)]
    serial = 2 * hops * serialization_s(SHAPES[name]["hidden_size"])
    rows = [
        [label, "whole token (generate)", f"{run.token_s * 1e3:.3f}"],
        [
            label,
            "client: HF generate logic, embed, LM head, thread hand-off",
            f"{(run.token_s - run.step_s) * 1e3:.3f}",
        ],
    ]
    rows += [[label, f"server {hop + 1}: compute", f"{c * 1e3:.3f}"] for hop, c in enumerate(compute)]
    rows += [
        [label, f"serialization (encode+decode at both ends of {hops} hops)", f"{serial * 1e3:.3f}"],
        [label, "network, process wake-ups, handlers", f"{(run.step_s - sum(compute) - serial) * 1e3:.3f}"],
    ]
    return rows


@contextmanager
def petals_swarm(venv: Path, name: str, workdir: Path, timeout_s: float = 900):
    """A Petals swarm of 2 servers of `name` (the shared/petals-peer recipe); yields the environment its
    clients run in, or a string saying why it could not start."""
    python = venv / "bin" / "python"
    if not python.exists():
        yield f"no Petals venv at {venv} (see shared/petals-peer/README.md)"
        return
    if not (PETALS_PEER / "swarm_petals.sh").exists():
        yield f"no Petals recipe at {PETALS_PEER}"
        return
    workdir.mkdir(parents=True, exist_ok=True)
    half = BLOCKS[name] // 2
    env = {
        **os.environ,
        "W": str(workdir),
        "CKPT": str(workdir / name),
        "HALF": str(half),
        "ALL": str(BLOCKS[name]),
        "NEW": str(NEW_TOKENS[name]),
        "PYTHONPATH": str(PETALS_PEER),
        "HF_HUB_OFFLINE": "1",
        "PATH": f"{venv / 'bin'}:{os.environ['PATH']}",
    }
    # the recipe starts its processes in the background: a session of their own lets us stop all of them
    # (their p2pd daemons included) with one signal to the group
    starter = subprocess.Popen(
        ["bash", str(PETALS_PEER / "swarm_petals.sh")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        starter.wait(timeout_s)
        deadline = time.monotonic() + timeout_s
        for log in ("s0.log", "s1.log"):
            while "Started" not in _read(workdir / log):
                if time.monotonic() > deadline:
                    yield f"Petals servers not ready in {timeout_s} s: {_read(workdir / log)[-300:]}"
                    return
                time.sleep(1)  # polling a log file written by another venv's process
        yield env
    finally:
        try:
            os.killpg(starter.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def run_petals(
    venv: Path, name: str, workdir: Path, timeout_s: float = 900
) -> tuple[float, float, bool] | str:
    """(petals steps/s, its local transformers 4.34 steps/s, tokens equal), or why it could not run."""
    with petals_swarm(venv, name, workdir, timeout_s) as env:
        if isinstance(env, str):
            return env
        client = Path(__file__).with_name("petals_client.py")  # bench_petals.py with a fix for a client hang
        try:
            out = subprocess.run(
                [str(venv / "bin" / "python"), str(client), str(PETALS_PEER / "bench_petals.py")],
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout_s,
            )
        except (subprocess.SubprocessError, OSError) as e:
            return f"Petals run failed: {e}"
        match = re.search(
            r"petals single-session: ([\d.]+) steps/s; local transformers: ([\d.]+)", out.stdout
        )
        if not match:
            return f"Petals benchmark failed: {(out.stdout + out.stderr)[-300:]}"
        return float(match[1]), float(match[2]), "tokens equal to transformers: True" in out.stdout


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--models", nargs="+", default=["tiny", "medium"], choices=["tiny", "medium", "llama7b"]
    )
    parser.add_argument(
        "--device", default="cpu", help="cuda: servers and client share the GPU (use llama7b)"
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument(
        "--decode",
        nargs="+",
        choices=list(DECODE_MODES),
        help="server decode modes to measure (default: eager compiled on CPU, cuda-graphs eager on CUDA)",
    )
    parser.add_argument(
        "--quant",
        nargs="+",
        default=["none"],
        choices=["none", "int8", "nf4"],
        help="servers' weights, each a run",
    )
    parser.add_argument("--forward-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--calls", type=int, default=500, help="round trips per transport row")
    parser.add_argument("--petals-venv", type=Path, default=Path("/tmp/pvenv"))
    parser.add_argument("--petals-dir", type=Path, default=Path("/tmp/pbench"))
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()

    print("round trips, 1x1x4096 fp32 ...", file=sys.stderr)
    trips = format_table(run_roundtrips(calls=args.calls, warmup=50, loop="uvloop", shape=(1, 1, 4096)))
    print(trips)

    modes = args.decode or (
        ["cuda-graphs", "eager"] if args.device.startswith("cuda") else ["eager", "compiled"]
    )
    speed_rows, step_rows = [], []
    for name in args.models:
        runs = []
        for mode in modes:
            for quant in args.quant:
                label = mode if quant == "none" else f"{mode}, {quant}"
                print(f"{name}: swarm ({label} decode) and local ...", file=sys.stderr)
                run = measure_swarm(
                    name,
                    new_tokens=NEW_TOKENS[name],
                    forward_tokens=args.forward_tokens,
                    repeats=args.repeats,
                    device=args.device,
                    dtype=args.dtype,
                    server_args=[*DECODE_MODES[mode], "--quant", quant],
                )
                runs.append((label, run))
                print(  # as it comes, so that a run stopped later still leaves it in the log
                    f"{name} ({label}): swarm {run.swarm_steps:.1f} steps/s, local {run.local_steps:.1f}, "
                    f"tokens equal: {run.tokens_equal}, logits within {run.logits_diff:.1e} (relative)",
                    *run.server_notes,
                    sep="\n  ",
                    file=sys.stderr,
                )
        if name == "llama7b":
            petals = PETALS_ON_GPU
        else:
            print(f"{name}: Petals ...", file=sys.stderr)
            petals = run_petals(args.petals_venv, name, args.petals_dir)
        for mode, run in runs:
            speed_rows.append([name, mode, *_speed_cols(run, petals)])
            step_rows += breakdown(f"{name} ({mode})", name, run)
    speed = markdown_table(
        [
            "model",
            "server decode",
            "swarm steps/s",
            "local steps/s (5.x)",
            "swarm/local",
            "Petals 2.2 steps/s",
            "swarm/Petals",
            "Petals/its local",
            f"swarm fwd tok/s (1x{args.forward_tokens})",
            "local fwd tok/s",
            "fwd ratio",
            "tokens equal",
            "logits vs local (max, relative)",
        ],
        speed_rows,
    )
    steps = markdown_table(["model", "part of one decode step", "ms (median)"], step_rows)
    print(speed)
    print(steps)
    if not args.no_record:
        append_results(
            "Hot path: transports, step breakdown, swarm vs local vs Petals (2 servers)",
            f"Round trips, 1x1x4096 fp32, uvloop, {args.calls} calls:\n\n{trips}\n\n{speed}\n\n{steps}",
            f"Single session, batch 1, 6-token prompt, greedy, new tokens {', '.join(f'{k} {v}' for k, v in NEW_TOKENS.items())}; medians of "
            f"{args.repeats}, swarm and local runs alternating (a fresh swarm and local run per decode mode). "
            "Server decode: eager = BlockSpan.decode as is; compiled = `swarmllm serve --compile`; cuda-graphs = "
            "the CUDA default; int8 / nf4 = `swarmllm serve --quant`. Petals: shared/petals-peer recipe in its own venv (transformers 4.34), median of 3, "
            "run right after ours.",
        )


def _speed_cols(run, petals: tuple[float, float, bool] | str) -> list[object]:
    if isinstance(petals, str):
        petals_cols = [petals, "", ""]
    else:
        petals_cols = [
            f"{petals[0]:.1f} (its local 4.34: {petals[1]:.1f}, tokens equal: {petals[2]})",
            f"{run.swarm_steps / petals[0]:.1f}x",
            f"{petals[0] / petals[1]:.2f}",
        ]
    return [
        f"{run.swarm_steps:.1f}",
        f"{run.local_steps:.1f}",
        f"{run.swarm_steps / run.local_steps:.2f}",
        *petals_cols,
        f"{run.swarm_fwd_tps:,.0f}",
        f"{run.local_fwd_tps:,.0f}",
        f"{run.swarm_fwd_tps / run.local_fwd_tps:.2f}",
        run.tokens_equal,
        f"{run.logits_diff:.1e}",
    ]


if __name__ == "__main__":
    main()
