"""Servers behind a NAT, on 127.0.0.1: a server given a direct address nobody can dial (as a volunteer's behind a
router with no port forwarded: here, a port nothing listens on) learns it from its peers' dial-backs
(`server.reachability`) and does not announce it, so clients reach it through libp2p without first waiting at the
dead address; a server whose address works keeps it."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

import torch
from ports import free_port
from transformers import AutoModelForCausalLM

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.client.loop import run_sync
from swarmllm.local import LocalSwarm
from swarmllm.wire import Message

DEADLINE_S = 60.0


def until(condition, what: str):
    """Poll `condition()` until it returns something truthy (returned), failing after DEADLINE_S."""
    deadline = time.monotonic() + DEADLINE_S
    while not (value := condition()):
        assert time.monotonic() < deadline, f"not within {DEADLINE_S} s: {what}"
        time.sleep(0.2)
    return value


def test_an_address_no_peer_can_dial_is_never_announced_or_dropped(llama_checkpoint, caplog):
    """A server with peers asks them before it comes online, and never announces an address none can dial; the
    first server of a swarm, with nobody to ask, announces it and drops it once a later peer answers (it asks the
    first peer that asks it, not only at its next announce period)."""
    caplog.set_level(logging.INFO, logger="swarmllm.wire.pool")
    reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([[1, 30, 40, 50, 60]])
    want = reference.generate(prompt, max_new_tokens=8, do_sample=False).tolist()
    ckpt = str(llama_checkpoint)
    fast = ["--update-period", "3"]
    # the first one would ask again only in 120 s: it asks the peer that asks it first (a server joining)
    slow = ["--update-period", "120"]
    with LocalSwarm() as local:
        local.start_bootstrap()
        first_dead, later_dead = free_port(), free_port()
        first = local.add_server(ckpt, (0, 2), extra=[*slow, "--announce-direct-port", str(first_dead)])
        model = AutoDistributedModelForCausalLM.from_pretrained(ckpt, initial_peers=local.initial_peers)
        swarm = model.swarm

        def announced() -> dict:
            return {s.peer_id: s.direct_addrs for s in run_sync(swarm.servers(refresh=True))}

        def verdict(peer_id: str, addrs=()) -> bool | None:
            conn = run_sync(swarm.directory.connection(peer_id, addrs))
            return run_sync(conn.call("info", Message(), timeout=10)).meta["direct_reachable"]

        try:
            # alone: nobody to ask, so it announces the address it was given
            assert until(lambda: announced().get(first["peer_id"]), "the first one announced") == (
                f"127.0.0.1:{first_dead}",
            )
            good = local.add_server(ckpt, (2, 4), extra=fast)
            # the later one asks its peers before it comes online: no record of it ever has its dead address
            seen: set[str] = set()
            starting = threading.Event()
            starting.set()

            def watch() -> None:
                while starting.is_set():
                    seen.update(a for addrs in announced().values() for a in addrs)
                    time.sleep(0.1)

            watcher = threading.Thread(target=watch)
            watcher.start()
            try:
                later = local.add_server(
                    ckpt, (0, 2), extra=[*fast, "--announce-direct-port", str(later_dead)]
                )
                until(lambda: later["peer_id"] in announced(), "the later one announced")
            finally:
                starting.clear()
                watcher.join()
            assert good["direct"] in seen and f"127.0.0.1:{later_dead}" not in seen
            assert announced()[later["peer_id"]] == ()
            until(lambda: announced().get(first["peer_id"]) == (), "the first one's dead address dropped")
            # the good one was reached at its address, before it came online, and announces it
            assert announced()[good["peer_id"]] == (good["direct"],)
            assert verdict(good["peer_id"], announced()[good["peer_id"]]) is True

            caplog.clear()
            assert model.generate(prompt, max_new_tokens=8, do_sample=False).tolist() == want
            for peer in (first, later):
                assert run_sync(swarm.connection(peer["peer_id"])).transport == "libp2p"
                assert verdict(peer["peer_id"]) is False
            assert run_sync(swarm.connection(good["peer_id"])).transport == "direct"
            # straight to libp2p: the client never waited at a dead address
            assert not [r for r in caplog.records if f":{first_dead}" in r.getMessage()]
        finally:
            model.shutdown()


def test_auto_learns_the_address_peers_see(llama_checkpoint):
    """`--announce-host auto` (the default with --host 0.0.0.0, which no peer can dial): a server announces the
    address its peers see its connections come from, once one of them reached it there; with no peer yet, none
    (until a peer asks it the same: the first one learns its address then, not at its next period, 120 s)."""
    reference = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    prompt = torch.tensor([[1, 30, 40, 50, 60]])
    want = reference.generate(prompt, max_new_tokens=8, do_sample=False).tolist()
    ckpt, auto = str(llama_checkpoint), ["--announce-host", "auto", "--update-period", "3"]
    with LocalSwarm() as local:
        local.start_bootstrap()
        first = local.add_server(ckpt, (0, 2), extra=["--announce-host", "auto", "--update-period", "120"])
        assert first["direct"] is None  # alone: nobody to ask where it is
        second = local.add_server(ckpt, (2, 4), extra=auto)
        assert second["direct"].startswith("127.0.0.1:")  # its peer saw it there, and reached it
        model = AutoDistributedModelForCausalLM.from_pretrained(ckpt, initial_peers=local.initial_peers)
        swarm = model.swarm
        try:
            announced = until(
                lambda: (
                    (found := {s.peer_id: s.direct_addrs for s in run_sync(swarm.servers(refresh=True))})
                    and all(found.get(s["peer_id"]) for s in (first, second))
                    and found
                ),
                "both announce a direct address",
            )
            assert announced[second["peer_id"]] == (second["direct"],)
            assert announced[first["peer_id"]][0].startswith("127.0.0.1:")
            assert model.generate(prompt, max_new_tokens=8, do_sample=False).tolist() == want
            assert {run_sync(swarm.connection(s["peer_id"])).transport for s in (first, second)} == {"direct"}
        finally:
            model.shutdown()


class PortForward:
    """A router's port forward on 127.0.0.1: connections to `port` are relayed to `target` while it is open."""

    def __init__(self, port: int, target: int):
        self.port, self.target = port, target
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    def open(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self._listener,), daemon=True).start()

    def close(self) -> None:
        for sock in [s for s in (self._listener, *self._sockets) if s is not None]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self._listener, self._sockets = None, []

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                inside, _ = listener.accept()
                outside = socket.create_connection(("127.0.0.1", self.target))
            except OSError:
                return  # closed
            self._sockets += [inside, outside]
            for a, b in ((inside, outside), (outside, inside)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)


def test_a_port_forward_opened_or_closed_later_is_found_at_the_next_recheck(llama_checkpoint):
    """A server announcing a forwarded port (`--announce-direct-port`) asks its peers again every
    `--reach-recheck` (2 s here; 10 min by default): with the forward closed it announces no direct address; once
    the forward is opened, it announces it; closed again, it drops it (as when a home connection's address
    changes: its peers then no longer reach it where it announces)."""
    ckpt = str(llama_checkpoint)
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_server(ckpt, (0, 2), extra=["--update-period", "3"])
        inside, outside = free_port(), free_port()
        forward = PortForward(outside, inside)
        flags = ["--direct-port", str(inside), "--announce-direct-port", str(outside), "--reach-recheck", "2"]
        server = local.add_server(ckpt, (2, 4), extra=[*flags, "--update-period", "2"])
        model = AutoDistributedModelForCausalLM.from_pretrained(ckpt, initial_peers=local.initial_peers)
        try:

            def announced() -> tuple[str, ...] | None:
                found = {s.peer_id: s.direct_addrs for s in run_sync(model.swarm.servers(refresh=True))}
                return found.get(server["peer_id"])

            assert server["direct"] is None or announced() == ()  # (closed: its peer could not dial it)
            forward.open()
            until(lambda: announced() == (f"127.0.0.1:{outside}",), "the forwarded port announced")
            forward.close()
            until(lambda: announced() == (), "the closed port dropped")
        finally:
            forward.close()
            model.shutdown()
