"""The swarm over a slow, far network: real server processes on 127.0.0.1 behind `benchmarks/netem.py` (a proxy
adding half a round trip each way and a bandwidth cap per direction), at what a volunteer swarm really has (100-200
ms round trip, 10-100 Mbit/s). A healthy server that is merely far away must never be taken for a failed one: no
time-out, no ban, no failover, the same tokens as on loopback; a dead one behind the same link is still noticed in
bounded time."""

from __future__ import annotations

import logging
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.generation.streamers import BaseStreamer

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.local import LocalSwarm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from netem import Emulator  # noqa: E402 - benchmarks/ is not a package

# a tiny-depth model with a real model's width: a 2,048-token prompt is 8 MiB of float32 activations per hop
WIDE = dict(
    num_layers=2, hidden_size=1024, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4
)
PROMPT_TOKENS = 2048


def in_thread(fn, timeout_s: float):
    """`fn()`'s result, or a failure if it takes longer than `timeout_s` (the swarm hangs or loops)."""
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        pytest.fail(f"still running after {timeout_s} s")
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.fixture(scope="module")
def wide(checkpoints):
    return checkpoints("llama", max_position_embeddings=4096, **WIDE)


@pytest.fixture(scope="module")
def prompt(wide):
    generator = torch.Generator().manual_seed(0)
    vocab = AutoModelForCausalLM.from_pretrained(wide).config.vocab_size
    return torch.randint(4, vocab, (1, PROMPT_TOKENS), generator=generator)


def test_long_prefill_over_10_mbit_is_not_a_timeout(wide, prompt, caplog):
    """A 2,048-token prompt through a healthy server 100 ms and 10 Mbit/s away: 8 MiB go each way (6.7 s each at
    10 Mbit/s), more than the 5 s step floor, yet the server is only slow to reach, not hung."""
    caplog.set_level(logging.INFO, logger="swarmllm")
    local = AutoModelForCausalLM.from_pretrained(wide, dtype=torch.float32).eval()
    with torch.no_grad():
        want = local.generate(prompt, max_new_tokens=2, do_sample=False).tolist()
    with Emulator(rtt_ms=100, mbit=10) as emulator, LocalSwarm() as swarm:
        emulator.start(1)
        swarm.start_bootstrap()
        swarm.add_server(str(wide), (0, 2), extra=[*emulator.server_args(0), "--bandwidth", "10"])
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(wide), initial_peers=swarm.initial_peers, spot_check_fraction=0, missing_blocks_timeout_s=5
        )
        try:
            began = time.monotonic()
            with torch.no_grad():
                got = in_thread(lambda: model.generate(prompt, max_new_tokens=2, do_sample=False), 50)
            took = time.monotonic() - began
            bans = dict(model.swarm.bans._strikes)
        finally:
            model.shutdown()
    assert got.tolist() == want
    assert bans == {}, [r.getMessage() for r in caplog.records if "banning" in r.getMessage()]
    assert took > 2 * 8 * 2**20 / (10e6 / 8)  # the emulated link did carry the 8 MiB each way


class AtToken(BaseStreamer):
    """Notes when each new token came; calls `actions[k]()` right after the k-th (from 1)."""

    def __init__(self, actions):
        self.actions, self.tokens, self.times = actions, -1, []

    def put(self, value):
        self.tokens += 1  # the first call carries the prompt
        self.times.append(time.monotonic())
        if self.tokens in self.actions:
            self.actions[self.tokens]()

    def end(self):
        pass


def test_decode_at_200_ms_rtt_bans_no_one_and_a_hang_is_still_noticed(llama_checkpoint):
    """Decode steps through [0, 2) -> [2, 4) with every server 200 ms away (50 Mbit/s): each step is pushed from
    the first server to the second (no fallback sends: no doubled load), no healthy server is banned, and when
    the second hop's server hangs (SIGSTOP) mid-generation the wait for that token stays within the step deadline
    (5 s + the 1 s push allowance) plus a few round trips (the client's route does not wait out the DHT look-up
    that the hung server's DHT peer slows), after which the spare takes over with the same tokens as
    transformers."""
    prompt, new_tokens, hang_at = torch.tensor([[1, 30, 40, 50, 7]]), 24, 12
    local = AutoModelForCausalLM.from_pretrained(llama_checkpoint, dtype=torch.float32).eval()
    with torch.no_grad():
        want = local.generate(
            prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
        ).tolist()
    with Emulator(rtt_ms=200, mbit=50) as emulator, LocalSwarm() as swarm:
        emulator.start(3)
        swarm.start_bootstrap()
        spans = [(0, 2), (2, 4), (2, 4)]
        infos = swarm.add_servers(
            [(str(llama_checkpoint), span, emulator.server_args(i)) for i, span in enumerate(spans)],
            extra=["--bandwidth", "50"],
        )
        index = {info["peer_id"]: i for i, info in enumerate(infos)}
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(llama_checkpoint), initial_peers=swarm.initial_peers, spot_check_fraction=0
        )
        try:
            with model.inference_session(max_length=prompt.shape[1] + 2 * new_tokens) as remote:
                healthy = model.generate(
                    prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False
                ).tolist()
                steps, pushed, bans = (
                    remote.session._steps,
                    remote.session.pushed_hops,
                    dict(model.swarm.bans._strikes),
                )
            with model.inference_session(max_length=prompt.shape[1] + new_tokens) as remote:
                hung = []

                def hang():
                    hung.append(remote.session.hops[1].peer_id)
                    swarm.servers[index[hung[0]]].pause()

                streamer = AtToken({hang_at: hang})
                with torch.no_grad():
                    after_hang = model.generate(
                        prompt,
                        max_new_tokens=new_tokens,
                        min_new_tokens=new_tokens,
                        do_sample=False,
                        streamer=streamer,
                    ).tolist()
            bans_after_hang = dict(model.swarm.bans._strikes)
        finally:
            for server in swarm.servers:
                server.resume()
            model.shutdown()
    assert healthy == want
    assert bans == {}
    assert pushed == steps - 1  # every step but the prompt's went on by push
    assert after_hang == want
    assert set(bans_after_hang) == set(hung)
    wait = streamer.times[hang_at + 1] - streamer.times[hang_at]
    # (the route does not wait out a look-up that the hung server's own DHT peer holds up, hivemind's 3 s: it
    # took the wait to ~9.7 s on this box before, ~7.2 s since)
    assert wait < 5 + 1 + 10 * 0.2 + 0.5, wait


def test_training_batch_over_10_mbit_is_not_a_timeout(wide, caplog):
    """A fine-tuning step (forward, then backward) of a batch of 4 x 256 tokens through a healthy server 100 ms
    away from a client of 5 Mbit/s uplink (20 Mbit/s down): 4 MiB of float32 activations go up in the forward
    (6.7 s, the micro-batches sharing the link), twice that in the backward. The loss and the input gradients
    are local transformers' and no server is banned or computed again."""
    caplog.set_level(logging.INFO, logger="swarmllm")
    x = torch.randint(4, 150, (4, 256), generator=torch.Generator().manual_seed(1))
    local = AutoModelForCausalLM.from_pretrained(wide, dtype=torch.float32).eval()
    with Emulator(rtt_ms=100, mbit=20, mbit_in=5) as emulator, LocalSwarm() as swarm:
        emulator.start(1)
        swarm.start_bootstrap()
        swarm.add_server(str(wide), (0, 2), extra=[*emulator.server_args(0), "--bandwidth", "20"])
        model = AutoDistributedModelForCausalLM.from_pretrained(
            str(wide), initial_peers=swarm.initial_peers, spot_check_fraction=0, missing_blocks_timeout_s=5
        )
        try:
            embeds = model.head.embed(x).detach().requires_grad_()

            def step():
                out = model(inputs_embeds=embeds, labels=x)
                out.loss.backward()
                return out.loss.detach()

            loss = in_thread(step, 50)
            bans = dict(model.swarm.bans._strikes)
        finally:
            model.shutdown()
    local_embeds = embeds.detach().clone().requires_grad_()
    their_loss = local(inputs_embeds=local_embeds, labels=x).loss
    their_loss.backward()
    assert bans == {}, [r.getMessage() for r in caplog.records if "banning" in r.getMessage()]
    torch.testing.assert_close(loss, their_loss.detach(), rtol=1e-4, atol=1e-5)
    # float32 sums in another order over a width of 1,024: within a thousandth of the largest gradient
    scale = float(local_embeds.grad.abs().max())
    torch.testing.assert_close(embeds.grad, local_embeds.grad, rtol=1e-3, atol=1e-3 * scale)


def test_deadline_budget_is_the_readmes():
    """README: a hop's deadline adds its hidden states there and back at 256 KiB/s, the wire's own floor: 64 s
    more for a 2,048-token prompt of hidden size 1,024, 0.03 s for a decode step."""
    from swarmllm.client.health import MIN_TRANSFER_RATE, step_deadline_s
    from swarmllm.wire.framing import WireLimits

    assert MIN_TRANSFER_RATE == WireLimits().min_frame_rate == 256 * 1024

    def extra(tokens: int) -> float:
        with_bytes = step_deadline_s(tokens, 2, 1e3, floor_s=5, transfer_bytes=2 * tokens * 1024 * 4)
        return with_bytes - step_deadline_s(tokens, 2, 1e3, floor_s=5)

    assert extra(2048) == pytest.approx(64)
    assert extra(1) == pytest.approx(0.03, abs=0.005)
