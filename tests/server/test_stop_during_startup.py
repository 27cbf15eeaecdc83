"""A server told to stop (SIGTERM, or Ctrl-C's SIGINT) while it is still starting stops then, not once it is
online: loading blocks and compiling the decode step run in a worker thread that nothing can interrupt, and the
server used to read its stop event only once start-up was done (minutes for a large span)."""

import os
import signal

import psutil
import pytest

from swarmllm.forking import forked


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_start_up_stops_the_server_there(llama_checkpoint, sig):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "SWARMLLM_COMPILE": "1"}  # compiling: seconds of start-up
    args = ["serve", str(llama_checkpoint), "--new-swarm", "--blocks", "0:2", "--host", "127.0.0.1"]
    proc = forked([*args, "--throughput", "100", "--bandwidth", "100"], env)
    try:
        seen = []
        for line in proc.stdout:  # past its signal handlers and its DHT start: it loads its blocks now
            seen.append(line)
            if "loading blocks [0, 2)" in line:
                break
        assert "loading blocks" in seen[-1], "".join(seen)
        children = psutil.Process(proc.pid).children(recursive=True)  # hivemind's DHT process and its p2pd
        assert children
        proc.send_signal(sig)
        code = proc.wait(60)
        output = "".join(seen) + proc.stdout.read()
        assert code == 128 + sig, output
        assert "stopped during start-up" in output
        assert "server_online" not in output  # it did not finish starting first
        _, alive = psutil.wait_procs(children, timeout=30)
        assert alive == []
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
