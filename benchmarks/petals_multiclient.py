"""Petals' side of multiclient.py, run inside Petals' own venv against a swarm started by shared/petals-peer's
swarm_petals.sh: aggregate tokens/s of 1, 4 and 8 concurrent client processes (each its own prompt, greedy), and
whether each client's tokens equal its own solo run. Prints one JSON line: {"clients": {N: tokens/s}, "equal": bool}.

    python petals_multiclient.py NEW_TOKENS REPEATS N [N ...]      (env: W, CKPT as for bench_petals.py)
"""

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

PROMPT_LENGTH = 6  # as multiclient.py


def prompt(seed, vocab_size):
    generator = torch.Generator().manual_seed(1000 + seed)
    return torch.randint(3, vocab_size, (PROMPT_LENGTH,), generator=generator).tolist()


def worker():
    # the fix of petals_client.py: a finalizer on hivemind's loop thread must not wait on that loop
    from hivemind.moe.client.remote_expert_worker import RemoteExpertWorker
    from petals import AutoDistributedModelForCausalLM
    from petals.client.inference_session import _ServerInferenceSession

    finalize = _ServerInferenceSession.__del__

    def finalize_without_deadlock(session):
        if threading.current_thread() is RemoteExpertWorker._event_thread:
            if getattr(session, "_outputs_stream", None) is not None:
                asyncio.get_event_loop().create_task(session._aclose_stream())
            return
        finalize(session)

    _ServerInferenceSession.__del__ = finalize_without_deadlock
    torch.set_num_threads(1)
    w = os.environ.get("W", "/tmp/pbench")
    ckpt = os.environ.get("CKPT", f"{w}/tiny")
    addr = open(f"{w}/addr").read().strip()
    model = AutoDistributedModelForCausalLM.from_pretrained(
        ckpt, initial_peers=[addr], dht_prefix="tiny-llama-hf"
    )
    vocab = model.config.vocab_size
    with torch.no_grad():
        model.generate(torch.tensor([prompt(0, vocab)]), max_new_tokens=2)
        print("ready", flush=True)
        for line in sys.stdin:
            seed, new = (int(x) for x in line.split())
            began = time.monotonic()
            out = model.generate(torch.tensor([prompt(seed, vocab)]), max_new_tokens=new, do_sample=False)
            print(
                json.dumps({"tokens": out[0].tolist(), "began": began, "ended": time.monotonic()}), flush=True
            )


def main():
    if sys.argv[1] == "--worker":
        worker()
        return
    new, repeats, counts = int(sys.argv[1]), int(sys.argv[2]), [int(n) for n in sys.argv[3:]]
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(max(counts))
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"

    def run(seeds):
        for proc, seed in zip(procs, seeds):
            proc.stdin.write(f"{seed} {new}\n")
            proc.stdin.flush()
        return [json.loads(proc.stdout.readline()) for proc in procs[: len(seeds)]]

    solo = {seed: run([seed])[0]["tokens"] for seed in range(max(counts))}
    result, equal = {}, True
    for count in counts:
        rates = []
        for _ in range(repeats):
            runs = run(list(range(count)))
            equal &= all(r["tokens"] == solo[i] for i, r in enumerate(runs))
            rates.append(count * new / (max(r["ended"] for r in runs) - min(r["began"] for r in runs)))
        result[count] = statistics.median(rates)
    for proc in procs:
        proc.stdin.close()
    for proc in procs:
        proc.wait(60)
    print(json.dumps({"clients": result, "equal": equal}), flush=True)


if __name__ == "__main__":
    main()
