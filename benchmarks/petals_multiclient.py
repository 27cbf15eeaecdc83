"""Petals' side of multiclient.py, run inside Petals' own venv against a swarm started by shared/petals-peer's
swarm_petals.sh: aggregate tokens/s of 1, 4 and 8 concurrent client processes (each its own prompt, greedy), and
whether each client's tokens equal its own solo run. Prints one JSON line: {"clients": {N: tokens/s}, "equal": bool},
or {"error": why} when a client fails or does not answer in time.

    python petals_multiclient.py NEW_TOKENS REPEATS N [N ...]      (env: W, CKPT as for bench_petals.py)
"""

import asyncio
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import threading
import time

import torch

PROMPT_LENGTH = 6  # as multiclient.py
ANSWER_TIMEOUT_S = 600.0  # for one client's answer: loading the model, or one generation


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
    # Skip the interpreter's shutdown. Server sessions that are still unclosed get finalized by its last garbage
    # collection on the main thread, after hivemind's event-loop thread (a daemon thread) has stopped; Petals'
    # finalizer then waits forever for a coroutine on that loop, and the process never exits. Everything this
    # client had to say is printed; the coordinator stops what it leaves behind (its DHT process, p2pd).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Worker:
    """One client process in a session of its own (with its DHT process and p2pd daemons), and its answers."""

    def __init__(self, index):
        self.index = index
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)  # end of output

    def answer(self, what):
        try:
            line = self.lines.get(timeout=ANSWER_TIMEOUT_S)
        except queue.Empty:
            raise RuntimeError(
                f"Petals client {self.index} gave no {what} in {ANSWER_TIMEOUT_S:.0f} s"
            ) from None
        if line is None:
            raise RuntimeError(f"Petals client {self.index} exited with {self.proc.wait()} before its {what}")
        return line.strip()

    def stop(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:  # the client's DHT process and p2pd daemons outlive it otherwise
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)


def measure(workers, new, repeats, counts):
    for worker_ in workers:
        if (line := worker_.answer("ready line")) != "ready":
            raise RuntimeError(f"Petals client {worker_.index} said {line[:200]!r} instead of ready")

    def run(seeds):
        for worker_, seed in zip(workers, seeds):
            worker_.proc.stdin.write(f"{seed} {new}\n")
            worker_.proc.stdin.flush()
        return [json.loads(worker_.answer("result")) for worker_ in workers[: len(seeds)]]

    solo = {seed: run([seed])[0]["tokens"] for seed in range(max(counts))}
    result, equal = {}, True
    for count in counts:
        run(list(range(count)))  # warm-up at this count, not timed (as multiclient.py does for ours)
        rates = []
        for _ in range(repeats):
            runs = run(list(range(count)))
            equal &= all(r["tokens"] == solo[i] for i, r in enumerate(runs))
            rates.append(count * new / (max(r["ended"] for r in runs) - min(r["began"] for r in runs)))
        result[count] = statistics.median(rates)
    return {"clients": result, "equal": equal}


def main():
    if sys.argv[1:2] == ["--worker"]:
        worker()
        return
    if len(sys.argv) < 4 or not all(arg.isdigit() for arg in sys.argv[1:]):
        print(__doc__)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    new, repeats, counts = int(sys.argv[1]), int(sys.argv[2]), [int(n) for n in sys.argv[3:]]
    workers = []
    try:
        workers = [Worker(i) for i in range(max(counts))]
        result = measure(workers, new, repeats, counts)
    except (RuntimeError, OSError, ValueError) as e:
        result = {"error": str(e)}
    finally:
        for worker_ in workers:
            worker_.stop()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
