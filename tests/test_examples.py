"""The examples run as a user runs them (shortened), as real processes."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"


def test_finetune_example_learns_the_pattern_and_peft_reproduces_it(tmp_path):
    # 24 optimizer steps instead of 45, so the stated threshold is looser than the full run's 0.9
    args = ["--epochs", "2", "--steps", "12", "--max-loss", "1.2", "--out", str(tmp_path / "adapter")]
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "finetune.py"), *args], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "reproduces the swarm's greedy output" in done.stdout
    assert "tokens_per_s" in done.stderr  # the progress bar, per epoch
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_logit_lens_example_reads_every_layer_through_the_swarm():
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "logit_lens.py"), "--every", "10"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["10", "20", "30"]
    assert "' Paris'" in lines[3].split(",")[0]  # SmolLM2's answer, at its last layer only
    assert "last layer's guess is the model's own: True" in lines[4]
