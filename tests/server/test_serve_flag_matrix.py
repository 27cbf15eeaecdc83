"""`swarmllm serve` flag combinations an operator would try: each either works or is refused at start-up with one
line (and no traceback, no server that starts and then fails its first request, no flag silently ignored).
Combinations that work (tokens equal transformers' within the README's tolerance) are tested elsewhere; the ones
here were refused with a traceback, or started a server that ignored them."""

import pytest
import torch
from test_cli_errors import said, swarmllms

from swarmllm.cli import build_parser


@pytest.mark.parametrize(
    "flags, flag",
    [
        (["--max-cache-tokens", "-5"], "--max-cache-tokens"),  # was a pydantic traceback when announcing
        (["--num-threads", "-1"], "--num-threads"),  # was torch's RuntimeError traceback
        (["--num-threads", "0"], "--num-threads"),  # was silently "not given"
        (["--max-connections", "0"], "--max-connections"),  # started a server that refused every connection
        (["--max-connections-per-peer", "0"], "--max-connections-per-peer"),
    ],
)
def test_flag_values_no_server_can_run_with_are_refused_when_parsed(flags, flag, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(["serve", "m", "--new-swarm", "--blocks", "0:4", *flags])
    assert exit.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_a_device_adapters_or_block_count_the_server_cannot_use_is_one_line(checkpoints, tmp_path):
    model = str(checkpoints("llama"))  # 4 blocks
    missing_gpu = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU (cuda:0 on a machine with none)
    adapter = tmp_path / "styled"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    serve = ["serve", model, "--new-swarm", "--throughput", "50", "--bandwidth", "1000"]
    gpu, bogus, absent, not_lora, too_many, uncompiled = swarmllms(
        [*serve, "--blocks", "0:4", "--device", missing_gpu],
        [*serve, "--blocks", "0:4", "--device", "gpu0"],
        [*serve, "--blocks", "0:4", "--adapters", str(tmp_path / "absent")],
        [*serve, "--blocks", "0:4", "--adapters", str(adapter)],
        [*serve, "--num-blocks", "10"],  # was silently 4
        [*serve, "--blocks", "0:4", "--no-compile", "--aot-step"],  # nothing to build ahead of time
    )
    assert f"--device {missing_gpu}" in said(gpu, "serve")
    assert "--device gpu0" in said(bogus, "serve")
    line = said(absent, "serve")
    assert "--adapters" in line and str(tmp_path / "absent") in line
    line = said(not_lora, "serve")
    assert "--adapters" in line and "not a LoRA adapter" in line
    assert "--num-blocks 10 is more than the model's 4 blocks" in said(too_many, "serve")
    assert "--aot-step" in said(uncompiled, "serve") and "--compile" in said(uncompiled, "serve")
