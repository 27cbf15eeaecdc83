"""`docker/compose.yaml`: valid for `docker compose config` (where docker compose exists), and its services'
commands, run as plain processes on 127.0.0.1 with the tiny model (volumes as folders, 0.0.0.0 and
announced hosts as 127.0.0.1, ports as free ones), make a private swarm that the monitor sees healthy and the API
answers from."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from ports import free_port
from transformers import AutoModelForCausalLM, AutoTokenizer

from swarmllm.local import ManagedProcess

COMPOSE = Path(__file__).parent.parent / "docker" / "compose.yaml"
SWARMLLM = [sys.executable, "-m", "swarmllm.cli"]


def docker_compose() -> list[str] | None:
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]):
            probe = subprocess.run([*command, "version"], capture_output=True)
            if probe.returncode == 0:
                return command
    return None


def test_compose_file_is_valid():
    command = docker_compose()
    if command is None:
        pytest.skip("docker compose is not installed")
    done = subprocess.run([*command, "-f", str(COMPOSE), "config", "--quiet"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def localize(text: str, tmp: Path, ports: dict[str, str]) -> str:
    """A compose command as it runs here: MODEL=tiny, volumes under tmp, 0.0.0.0 and ports local."""
    text = re.sub(r"\$\{MODEL:-[^}]*\}", "tiny", text)
    text = text.replace("/swarm/", f"{tmp}/swarm/").replace("/models/", f"{tmp}/models/")
    text = text.replace("0.0.0.0", "127.0.0.1")
    for port, local in ports.items():
        text = re.sub(rf"\b{port}\b", local, text)
    return text


def test_compose_services_run_as_plain_processes(tmp_path):
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    (tmp_path / "swarm").mkdir()
    (tmp_path / "models").mkdir()
    started: list[ManagedProcess] = []

    def start(name: str) -> ManagedProcess:
        ports = {p: str(free_port()) for p in ("31337", "31340", "9100", "8000", "8001")}
        args = [localize(arg, tmp_path, ports) for arg in services[name]["command"]]
        # the address others dial: the container's name there, this machine here
        args = ["127.0.0.1" if before == "--announce-host" else arg for before, arg in zip(["", *args], args)]
        assert args[0] in {"dht", "serve", "monitor", "api"}, args
        proc = subprocess.Popen(
            [*SWARMLLM, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,
        )
        started.append(ManagedProcess(name, proc))
        return started[-1]

    # the one-shot service: the swarm key and the model, with the compose file's own shell line
    (script,) = services["model"]["command"]
    script = localize(script, tmp_path, {}).replace("swarmllm fetch", " ".join(SWARMLLM) + " fetch")
    done = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    model_dir = tmp_path / "models" / "tiny"
    assert (model_dir / "config.json").exists() and (tmp_path / "swarm" / "swarm.key").stat().st_size == 32
    try:
        start("bootstrap").wait_for(lambda line: "--initial-peers" in line, 60)
        assert (tmp_path / "swarm" / "peers.txt").read_text().strip()
        # all at once, as compose starts them once the bootstrap is healthy (the API waits for the blocks)
        servers = [start("server1"), start("server2")]
        monitor_proc, api_proc = start("monitor"), start("api")
        records = [json.loads(s.wait_for(lambda line: '"server_online"' in line, 180)) for s in servers]
        monitor = monitor_proc.wait_for(lambda line: line.startswith("Monitor: "), 120).split()[1]
        api = api_proc.wait_for(lambda line: line.startswith("OpenAI-compatible API: "), 180).split()[2]

        deadline = time.monotonic() + 60
        while True:
            with urllib.request.urlopen(monitor + "api/v1/state") as reply:
                state = json.load(reply)
            model = state["models"][0] if state["models"] else None
            if model is not None and model["verdict"] == "healthy" and model["servers"]["online"] == 2:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.2)  # the poll interval of a condition with a deadline
        names = sorted(row["public_name"] for row in state["servers"])
        assert names == ["server1", "server2"], state["servers"]
        assert {r["peer_id"] for r in records} == {row["peer_id"] for row in state["servers"]}

        body = {"model": "tiny", "prompt": "the cat", "max_tokens": 8, "temperature": 0}
        request = urllib.request.Request(
            api + "/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=120) as reply:
            text = json.load(reply)["choices"][0]["text"]
        # the API's health check, as compose runs it
        (check,) = [arg for arg in services["api"]["healthcheck"]["test"] if "urlopen" in arg]
        port = api.split(":")[2].split("/")[0]
        done = subprocess.run(
            [sys.executable, "-c", check.replace("8001", port)], capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
        out = local.generate(ids, max_new_tokens=8, do_sample=False)
        # the text after the prompt's, as the API answers: the word-level tokens keep the space before them
        prompt = tokenizer.decode(ids[0], skip_special_tokens=True)
        assert text == tokenizer.decode(out[0], skip_special_tokens=True)[len(prompt) :]
    finally:
        for proc in reversed(started):
            proc.stop()
