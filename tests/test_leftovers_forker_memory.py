"""A forked process whose forker died answers `poll`, `wait` and `kill` as `subprocess.Popen` does; the memory plan
counts a block's weights as the server stores them (panels padded to whole panels of 16 outputs)."""

import os
import signal
import subprocess

import psutil
import pytest
import torch

from swarmllm.forking import LOST_STATUS, Forker


def _env(mark: str) -> dict[str, str]:
    # a forker of its own (the variable is not one of forking.RUNTIME_VARIABLES)
    return {**os.environ, "PYTHONUNBUFFERED": "1", "SWARMLLM_LEFTOVERS_TEST": mark}


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def child_of_a_dead_forker():
    """A running `swarmllm dht` whose forker was killed with SIGKILL (the OOM killer, a kill of its pid); the child
    lives on in its own session. Killed with its group at the end, whatever the test did."""
    before = _open_fds()
    env = _env("dead-forker")
    forker = Forker(env)
    child = forker.spawn(["dht"], env)
    try:
        assert "Bootstrap peer" in child.stdout.readline()
        os.kill(forker.proc.pid, signal.SIGKILL)
        assert forker.proc.wait(30) == -signal.SIGKILL
        yield child
    finally:
        try:
            os.killpg(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        child.stdout.close()
        forker.close()
    assert child.returncode is not None
    assert _open_fds() == before  # the child's status pipe and handle were closed once its end was known


def test_a_child_of_a_dead_forker_is_polled_waited_for_and_killed_as_a_popen(child_of_a_dead_forker):
    child = child_of_a_dead_forker
    assert psutil.Process(child.pid).is_running()
    assert child.poll() is None  # still running: its forker's death says nothing about it
    with pytest.raises(subprocess.TimeoutExpired):
        child.wait(0.2)
    child.terminate()  # reaches the child: a DHT peer leaves on SIGTERM
    code = child.wait(60)
    # its exit status went with its forker: Popen's answer for a child someone else reaped is 0
    assert code == LOST_STATUS == 0 and child.poll() == 0 and child.returncode == 0
    child.kill()  # a process known to have ended is not signalled again, as Popen's kill


def test_a_child_of_a_dead_forker_that_ended_unseen_is_killed_and_waited_for_without_an_error(
    child_of_a_dead_forker,
):
    child = child_of_a_dead_forker
    process = psutil.Process(child.pid)
    os.killpg(child.pid, signal.SIGKILL)  # as LocalSwarm kills a server: the whole group
    gone, _ = psutil.wait_procs([process], timeout=30)  # until init, its parent now, has reaped it
    assert gone
    child.kill()  # no ProcessLookupError for a process that ended (Popen's kill swallows it)
    assert child.wait(30) == LOST_STATUS and child.poll() == LOST_STATUS


# ---- the memory plan against the bytes a server's loaded block holds -----------------------------------------

# the nf4 lookup table (16 float32 values) that each nf4 weight keeps beside its codes and absmaxes (bitsandbytes'
# quant_state.code, our panels' `table`): the plan leaves it out (quantized_weight_bytes: codes and scales), 64 B a
# projection against a block's MiBs and the plan's >= 256 MiB headroom. Nothing else may differ.
NF4_TABLE_BYTES = 16 * 4


@pytest.fixture(scope="module")
def unaligned_checkpoint(tmp_path_factory):
    """One block whose projections have output sizes that are not multiples of 16 (qkv 6 x 130 = 780, gate_up
    2 x 1004 = 2008) and large enough to be stored as panels in every dtype (>= MIN_PANEL_ELEMENTS); o_proj's and
    down_proj's inputs (520, 1004) are not in nf4's blocks of 64 (bitsandbytes' layout, not panels)."""
    from swarmllm.models.tiny import make_tiny_checkpoint

    shape = dict(hidden_size=512, head_dim=130, num_attention_heads=4, num_key_value_heads=1)
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("unaligned") / "llama", "llama", num_layers=1, intermediate_size=1004, **shape
    )


def _held_bytes(block) -> tuple[int, int]:
    """(bytes of every tensor the block holds, its nf4 projections): parameters, buffers, and the quant state that
    bitsandbytes keeps on its nf4 weights (absmaxes and lookup table: real memory, though no module buffer)."""
    from swarmllm.models.quant import BitsAndBytesProjection, QuantizedProjection

    tensors = {id(t): t for t in [*block.parameters(), *block.buffers()]}
    for module in block.modules():
        if isinstance(module, BitsAndBytesProjection):
            state = module.linear.weight.quant_state
            tensors |= {id(state.absmax): state.absmax, id(state.code): state.code}
    nf4 = sum(isinstance(m, QuantizedProjection) and m.mode == "nf4" for m in block.modules())
    return sum(t.numel() * t.element_size() for t in tensors.values()), nf4


@pytest.mark.parametrize("quant", ["none", "int8", "nf4"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_the_memory_plan_counts_a_cpu_block_as_the_server_stores_it(unaligned_checkpoint, dtype, quant):
    from swarmllm.models import load_config, load_span
    from swarmllm.models.panels import kernel
    from swarmllm.server.memory import block_bytes

    if kernel() is None:
        pytest.skip("no panel kernel here: nothing is padded")
    dtype = getattr(torch, dtype)
    _, config = load_config(str(unaligned_checkpoint))
    # as the server loads its span on a CPU (packed weights, server.py `_pack`) and sizes it (`_blocks_that_fit`)
    span = load_span(str(unaligned_checkpoint), 0, 1, dtype=dtype, device="cpu", quant=quant, pack=True)
    held, nf4 = _held_bytes(span.blocks[0])
    planned = block_bytes(config, dtype, quant, device="cpu", pack=True)
    assert held - NF4_TABLE_BYTES * nf4 == planned, (held, planned)
    # unpacked float blocks are stored as they are built
    plain = load_span(str(unaligned_checkpoint), 0, 1, dtype=dtype, device="cpu", quant=quant, pack=False)
    held, nf4 = _held_bytes(plain.blocks[0])
    assert held - NF4_TABLE_BYTES * nf4 == block_bytes(config, dtype, quant, device="cpu", pack=False)


@pytest.mark.parametrize("text", ["inf", "1e400", "infk", "nan", "0.4", "0.0001k"])
def test_a_size_that_is_no_whole_positive_number_of_bytes_is_refused_with_the_usual_message(text):
    """`--max-memory inf` crashed `swarmllm serve` with an OverflowError (the CLI turns ValueErrors into one-line
    errors); a size under one byte parsed as 0, which the server reads as "not given" (`max_memory or ...`) and
    silently replaced by its default share of the machine."""
    from swarmllm.server.memory import parse_size

    with pytest.raises(ValueError, match="expected a size like 4GiB or 512MB"):
        parse_size(text)
    assert parse_size("1") == 1 and parse_size("0.5k") == 512  # the smallest sizes still parse
