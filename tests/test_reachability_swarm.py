"""Servers behind a NAT, on 127.0.0.1: a server that announces a direct address nobody can dial (as a volunteer's
behind a router with no port forwarded: here, a port nothing listens on) learns it from its peers' dial-backs
(`server.reachability`) and stops announcing it, so clients reach it through libp2p without first waiting at the
dead address; a server whose address works keeps it."""

from __future__ import annotations

import logging
import socket
import time

import torch
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.local import LocalSwarm
from swarmllm.wire import Message

DEADLINE_S = 60.0


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def until(condition, what: str):
    """Poll `condition()` until it returns something truthy (returned), failing after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {DEADLINE_S} s: {what}"
        time.sleep(0.2)
    return value


def test_an_address_no_peer_can_dial_is_no_longer_announced(llama_checkpoint, caplog):
    caplog.set_level(logging.INFO, logger="swarmllm.wire.pool")
    reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([[1, 30, 40, 50, 60]])
    want = reference.generate(prompt, max_new_tokens=8, do_sample=False).tolist()
    with LocalSwarm() as local:
        local.start_bootstrap()
        # a period of 3 s: the first server, alone when it came online, asks again soon once the second is there
        fast = ["--update-period", "3"]
        reachable = local.add_server(str(llama_checkpoint), (0, 2), extra=fast)
        dead = closed_port()
        behind_nat = local.add_server(
            str(llama_checkpoint), (2, 4), extra=[*fast, "--announce-direct-port", str(dead)]
        )
        assert behind_nat["direct"] == f"127.0.0.1:{dead}"  # what it announced at first
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(llama_checkpoint), initial_peers=local.initial_peers
        )
        swarm = model.swarm

        def announced() -> dict:
            return {s.peer_id: s.direct_addrs for s in run_sync(swarm.servers(refresh=True))}

        def verdict(peer_id: str, addrs=()) -> bool | None:
            conn = run_sync(swarm.directory.connection(peer_id, addrs))
            return run_sync(conn.call("info", Message(), timeout=10)).meta["direct_reachable"]

        try:
            until(lambda: announced().get(behind_nat["peer_id"]) == (), "the dead address dropped")
            assert model.generate(prompt, max_new_tokens=8, do_sample=False).tolist() == want
            assert run_sync(swarm.connection(behind_nat["peer_id"])).transport == "libp2p"
            assert run_sync(swarm.connection(reachable["peer_id"])).transport == "direct"
            # straight to libp2p: the client never waited at the dead address
            assert not [r for r in caplog.records if f":{dead}" in r.getMessage()]
            assert verdict(behind_nat["peer_id"]) is False
            # the other one was reached by its peer at the address it announces, and still announces it
            until(
                lambda: verdict(reachable["peer_id"], announced()[reachable["peer_id"]]),
                "the first one reached",
            )
            assert announced()[reachable["peer_id"]] == (reachable["direct"],)
        finally:
            model.shutdown()
