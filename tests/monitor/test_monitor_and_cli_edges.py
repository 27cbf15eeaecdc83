"""Edges of the monitor's state document and of the command line's flags: what a server shows while it loads,
and flag values that must end in one line (argparse's, or `swarmllm CMD: ...` with exit status 1), never a
traceback. In-process where the command fails before anything starts; `swarmllm serve` runs as a process (it
sets the environment and imports torch)."""

import os

import pytest
from server_infos import online_server

from swarmllm.cli import build_parser, main
from swarmllm.dht import ModelInfo, ServerState
from swarmllm.forking import forked
from swarmllm.monitor.state import swarm_state

MODEL = ModelInfo(dht_prefix="m", num_blocks=4)


def test_a_joining_server_that_does_not_answer_yet_shows_as_joining():
    """A server starts answering only once its blocks are loaded: until then it is joining, not unreachable."""
    servers = [online_server("a", 0, 4), online_server("j", 0, 4, state=ServerState.JOINING)]
    state = swarm_state([MODEL], {"m": servers}, {"a": 0.01, "j": None}, updated_at=1.0)
    (model,) = state["models"]
    assert model["servers"] == {"online": 1, "joining": 1, "offline": 0, "unreachable": 0}
    assert {s["peer_id"]: s["state"] for s in model["blocks"][0]["servers"]} == {
        "a": "online",
        "j": "joining",
    }
    assert {r["peer_id"]: r["state"] for r in state["servers"]} == {"a": "online", "j": "joining"}


def one_line(err: str, command: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(f"swarmllm {command}: ")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["monitor", "--port", "-1"], "--port"),
        (["monitor", "--port", "70000"], "--port"),
        (["dht", "--port", "65536"], "--port"),
        (["monitor", "--refresh", "0"], "--refresh"),
        (["monitor", "--refresh", "-5"], "--refresh"),
        (["serve", "m", "--blocks", "5:3"], "--blocks"),
        (["serve", "m", "--blocks=-1:3"], "--blocks"),
        (["serve", "m", "--num-blocks", "0"], "--num-blocks"),
        (["serve", "m", "--metrics-port", "99999"], "--metrics-port"),
        (["demo", "--servers", "0"], "--servers"),
        (["serve", "m", "--bandwidth", "-5"], "--bandwidth"),
        (["serve", "m", "--bandwidth", "0"], "--bandwidth"),  # not "measure it", as it was
        (["serve", "m", "--throughput", "inf"], "--throughput"),  # a record others cannot use
        (["serve", "m", "--throughput", "nan"], "--throughput"),
        (["serve", "m", "--update-period", "0"], "--update-period"),
        (["api", "m", "--keep-sessions-s", "-1"], "--keep-sessions-s"),
    ],
)
def test_flag_values_out_of_range_are_refused_when_parsed(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit:
        build_parser().parse_args(argv)
    assert exit.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err


def test_a_host_that_is_not_an_address_is_one_line_with_any_port(capsys):
    assert main(["monitor", "--host", "no.such.host.invalid", "--port", "0"]) == 1
    assert "cannot listen on no.such.host.invalid:0" in one_line(capsys.readouterr().err, "monitor")


def test_a_missing_or_short_swarm_key_is_one_line(tmp_path, capsys):
    assert main(["dht", "--swarm-key", str(tmp_path / "absent.key")]) == 1
    line = one_line(capsys.readouterr().err, "dht")
    assert f"cannot read the swarm key {tmp_path / 'absent.key'}: No such file or directory" in line
    short = tmp_path / "short.key"
    short.write_bytes(b"secret")
    assert main(["dht", "--swarm-key", str(short)]) == 1
    assert "a swarm key needs at least 16 secret bytes, got 6" in one_line(capsys.readouterr().err, "dht")


def test_serve_values_known_wrong_only_beside_the_model_are_one_line(tmp_path, llama_checkpoint):
    """A size parsed where torch is imported, and a span checked against the model's config once it is read."""
    (tmp_path / "config.json").write_text("{}")  # a folder that passes the model check; nothing loads it
    runs = [
        (tmp_path, ["--max-memory", "lots"], "--max-memory: expected a size like 4GiB or 512MB, got 'lots'"),
        (llama_checkpoint, ["--blocks", "0:100"], "--blocks 0:100 is outside the model's 4 blocks"),
        (
            llama_checkpoint,
            ["--blocks", "0:4", "--tp", "4"],
            "--tp 4: num_kv_heads=2 does not split over 4 tensor-parallel ranks",
        ),
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # forked from a warm interpreter: one pipe for both streams
    procs = [forked(["serve", str(model), "--new-swarm", *flags], env) for model, flags, _ in runs]
    try:
        for proc, (_, _, expected) in zip(procs, runs, strict=True):
            code = proc.wait(120)
            output = proc.stdout.read()
            assert code == 1, output
            assert expected in one_line(output, "serve")
    finally:
        for proc in procs:
            proc.kill()
