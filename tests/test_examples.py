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
