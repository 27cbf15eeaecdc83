"""The demo model is built once, and whoever asks for it meanwhile (a second demo, the fine-tuning example, a
test fetching it) gets the trained model, never the folder half-way: real processes, as a user starts them."""

import hashlib
import subprocess
import sys

ASK = """
import hashlib, sys
from pathlib import Path
from swarmllm.demo import demo_checkpoint
path = demo_checkpoint(Path(sys.argv[1]))
print("weights", hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest(), flush=True)
"""


def test_a_process_asking_while_the_model_is_built_gets_the_trained_model(tmp_path):
    path = tmp_path / "demo"
    ask = [sys.executable, "-c", ASK, str(path)]
    first = subprocess.Popen(ask, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "building the demo model" in first.stderr.readline()  # it has begun: a second one asks now
        second = subprocess.run(ask, capture_output=True, text=True, timeout=600)
        out, _ = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0 and second.returncode == 0, second.stderr
    built = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    # its progress went to stderr: stdout holds what it printed alone (`swarmllm fetch tiny` prints the folder so,
    # where its build and training lines came first)
    assert out.splitlines() == [f"weights {built}"]
    assert second.stdout.splitlines() == [f"weights {built}"]  # it waited, and built nothing itself
    assert [p.name for p in tmp_path.iterdir() if p.name != ".demo.lock"] == ["demo"]  # no build left over
