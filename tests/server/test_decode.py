"""The decode runner's pure parts and its eager path against the span's general forward."""

import dataclasses

import pytest
import torch

from swarmllm.models import KVCache, load_config, load_span
from swarmllm.server import decode as decode_module
from swarmllm.server.decode import (
    MIN_BUCKET,
    DecodeRunner,
    _package_key,
    block_weights,
    bucket,
    compiles_by_default,
    export_step,
)


def test_buckets_are_powers_of_two_capped_at_the_cache():
    assert bucket(1, 4096) == MIN_BUCKET
    assert bucket(MIN_BUCKET, 4096) == MIN_BUCKET
    assert bucket(MIN_BUCKET + 1, 4096) == 2 * MIN_BUCKET
    assert bucket(1000, 4096) == 1024
    assert bucket(3000, 3000) == 3000  # never past the session's cache
    assert bucket(10, 32) == 32
    assert bucket(1, 70) == bucket(64, 70) == 70  # a short session: one graph for its whole cache
    assert bucket(65, 255) == 255 and bucket(65, 256) == 128
    sizes = {bucket(n, 8192) for n in range(1, 8193)}
    assert sizes == {64, 128, 256, 512, 1024, 2048, 4096, 8192}  # a long session needs few graphs


@pytest.mark.parametrize("padded", [False, True])
def test_eager_runner_steps_equal_the_span_forward(checkpoints, padded):
    span = load_span(checkpoints("llama"), 0, 4)
    runner = DecodeRunner(span, torch.device("cpu"))
    assert runner.mode == "eager"  # no CUDA here: graphs are for CUDA only
    hidden = torch.randn(2, 8, span.config.hidden_size, generator=torch.Generator().manual_seed(0))
    key_mask = torch.ones(2, 16, dtype=torch.bool)
    if padded:
        key_mask[1, :3] = False
    with torch.inference_mode():
        want = span(hidden, key_mask=key_mask[:, :8] if padded else None)
        cache = KVCache(4, 2, 16, span.config, torch.float32, "cpu")
        prefill = span(hidden[:, :5], key_mask=key_mask[:, :5] if padded else None, cache=cache)
        steps = [runner.step(hidden[:, t], t, key_mask, padded, cache, None) for t in range(5, 8)]
    got = torch.cat([prefill, torch.stack(steps, dim=1)], dim=1)
    real = key_mask[:, :8]
    torch.testing.assert_close(got[real], want[real], atol=1e-5, rtol=0)


def steps_equal_eager(runner: DecodeRunner, span, lengths: tuple[int, ...]) -> None:
    """Every slot of a session of each cache length, stepped by `runner` and eagerly: equal outputs and caches
    (caches of different lengths lay their slices out with different strides)."""
    eager = DecodeRunner(span, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    for max_length in lengths:
        caches = [
            KVCache(len(span.blocks), 1, max_length, span.config, torch.float32, "cpu") for _ in range(2)
        ]
        key_mask = torch.ones(1, max_length, dtype=torch.bool)
        for slot in range(max_length):
            hidden = torch.randn(1, span.config.hidden_size, generator=generator)
            with torch.inference_mode():
                got = runner.step(hidden, slot, key_mask, False, caches[0], None)
                want = eager.step(hidden, slot, key_mask, False, caches[1], None)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(caches[0].keys, caches[1].keys, atol=1e-5, rtol=1e-5)


def test_small_cpu_blocks_compile_by_default(checkpoints):
    """Compiling pays where a step's fixed per-op costs dominate: small blocks on a CPU; larger blocks (reading
    weights dominates), quantized ones and other devices decode eagerly."""
    _, config = load_config(checkpoints("llama"))
    assert compiles_by_default(config, "cpu", quantized=False)
    assert not compiles_by_default(config, "cpu", quantized=True)
    assert not compiles_by_default(config, "cuda", quantized=False)
    small = dataclasses.replace(config, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=4)
    assert block_weights(small) < 2**20 and compiles_by_default(small, "cpu", quantized=False)
    smollm2 = dataclasses.replace(
        config, hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3, head_dim=64
    )
    assert block_weights(smollm2) == 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536  # q o, k v, gate up down
    assert not compiles_by_default(smollm2, "cpu", quantized=False)


def test_compiled_steps_need_no_compilation_after_the_warm_up(checkpoints):
    """Once warmed up, the compiled step serves sessions of any cache length (1, 2, 6, 17 here), up to the step that
    fills the cache (its keys are contiguous, which torch guards apart), without compiling again (the cache views
    are marked dynamic only at the warm-up), and equals eager; with mistral's sliding window (4), past it too (the
    window's branch is the only difference from a plain Llama block's step; each compile costs CI ~25 s)."""
    from torch._dynamo.utils import counters

    span = load_span(checkpoints("mistral"), 0, 2)
    assert span.config.sliding_window == 4
    compiled = DecodeRunner(span, torch.device("cpu"), compile=True)
    compiled.warm_up()
    assert compiled.mode == "compiled"
    graphs = counters["stats"]["unique_graphs"]
    compiled_step, compiled_steps = compiled._decode, []
    compiled._decode = lambda *args: compiled_steps.append(args[3].shape[3]) or compiled_step(*args)
    steps_equal_eager(compiled, span, (1, 2, 6, 17))
    assert compiled_steps == [slot + 1 for length in (1, 2, 6, 17) for slot in range(length)]  # none eagerly
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_failed_ahead_of_time_build_leaves_torch_compiles_step_to_serve(checkpoints, monkeypatch, caplog):
    """Where the step cannot be built ahead of time (an export or compiler failure, injected here), the runner
    compiles torch.compile's step instead, as it warms up, and that serves every slot of a session's steps, equal
    to eager, without compiling again."""
    from torch._dynamo.utils import counters

    def fails(*args, **kwargs):
        raise RuntimeError("no exporter today")

    monkeypatch.setattr(decode_module, "export_step", fails)
    span = load_span(checkpoints("mistral"), 0, 2)
    runner = DecodeRunner(span, torch.device("cpu"), compile=True, aot=True)
    with caplog.at_level("WARNING", logger="swarmllm.server.decode"):
        runner.warm_up()
    assert runner.mode == "compiled" and not runner._aot
    assert "the ahead-of-time step failed (RuntimeError: no exporter today)" in caplog.text
    graphs = counters["stats"]["unique_graphs"]
    compiled_step, compiled_steps = runner._decode, []
    runner._decode = lambda *args: compiled_steps.append(args[3].shape[3]) or compiled_step(*args)
    steps_equal_eager(runner, span, (2, 6))
    assert compiled_steps == [slot + 1 for length in (2, 6) for slot in range(length)]
    assert counters["stats"]["unique_graphs"] == graphs


def test_a_runner_compiles_for_each_thread_count_it_meets(checkpoints):
    """A server compiles again whenever its CPU thread count changes (servers join and leave its host); torch's
    default cap of 8 graphs per function made the third count fail to compile and serve eagerly from then on.
    The cap is lowered to 4 here (one count's graphs), so the second count meets it: two compiles, not three."""
    span = load_span(checkpoints("llama"), 0, 2)
    runner = DecodeRunner(span, torch.device("cpu"), compile=True)
    cache, key_mask = KVCache(2, 1, 5, span.config, torch.float32, "cpu"), torch.ones(1, 5, dtype=torch.bool)
    compiled_step, compiled_steps = runner._decode, []
    runner._decode = lambda *args: compiled_steps.append(torch.get_num_threads()) or compiled_step(*args)
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            with torch._dynamo.config.patch(recompile_limit=4):
                runner.warm_up()
            assert runner.mode == "compiled", count
            compiled_steps.clear()
            hidden = torch.zeros(
                1, span.config.hidden_size
            )  # (made as a session's are: outside inference mode)
            with torch.inference_mode():
                runner.step(hidden, count, key_mask, False, cache, None)
            assert compiled_steps == [count]
    finally:
        torch.set_num_threads(threads)


def test_the_ahead_of_time_step_serves_caches_of_any_length_and_equals_eager(
    checkpoints, tmp_path, monkeypatch
):
    """`--aot-step`: the step exported and compiled by AOTInductor serves every compiled step from the second slot
    on (the first attends to one slot, below its export's range, and runs eagerly), for sessions whose caches
    differ in length, and equals eager (mistral's sliding window of 4 included). A graph built from a slice of
    one cache read other sessions' slices at its own strides: wrong slots, 2.5 off after one step. Its package
    holds no weights and is kept on disk: another span of the same shape, other weights, loads it without a
    build and equals eager with its own weights; a kept package that does not load is built again."""
    monkeypatch.setenv("SWARMLLM_AOT_DIR", str(tmp_path))
    path = checkpoints("mistral")
    span = load_span(path, 0, 2)
    runner = DecodeRunner(span, torch.device("cpu"), compile=True, aot=True)
    runner.warm_up()
    assert runner.mode == "compiled ahead of time"
    aot = runner._aot[torch.get_num_threads()]
    packages = list(tmp_path.glob("*.pt2"))
    assert aot.built and len(packages) == 1
    inner, attended = aot._run, []
    aot._run = lambda inputs: attended.append(inputs[5].shape[0]) or inner(inputs)
    steps_equal_eager(runner, span, (2, 6, 17))
    assert attended == [slot + 1 for length in (2, 6, 17) for slot in range(1, length)]

    other = load_span(path, 2, 4)
    assert not torch.equal(other.blocks[0].mlp.down_proj.weight, span.blocks[0].mlp.down_proj.weight)
    again = DecodeRunner(other, torch.device("cpu"), compile=True, aot=True)
    again.warm_up()
    assert not again._aot[torch.get_num_threads()].built and list(tmp_path.glob("*.pt2")) == packages
    steps_equal_eager(again, other, (6,))

    # damaged: built again, and the step it then serves equals eager
    packages[0].write_bytes(b"not a package")
    rebuilt = DecodeRunner(other, torch.device("cpu"), compile=True, aot=True)
    rebuilt.warm_up()
    assert rebuilt.mode == "compiled ahead of time" and rebuilt._aot[torch.get_num_threads()].built
    steps_equal_eager(rebuilt, other, (4,))


def test_an_ahead_of_time_package_is_keyed_on_the_graph_and_not_on_where_the_source_lies(checkpoints):
    """The exported graph notes, for each op, the file and line of the code that made it. A key holding those made
    an install at another path (a reinstall, another venv, `ab.py --a-commit`'s folder) build packages of its
    own, and steps ran eagerly while it did. Moved source keeps the key; another graph gets another."""
    span = load_span(checkpoints("llama"), 0, 2)
    _, program = export_step(span, torch.device("cpu"))
    key = _package_key(program)
    traced = [node for node in program.graph.nodes if node.meta.get("stack_trace")]
    assert traced and "decode.py" in program.graph_module.print_readable(print_output=False)
    for node in traced:
        node.meta["stack_trace"] = (
            node.meta["stack_trace"].replace("/", "/elsewhere/").replace(", line ", ", line 9")
        )
    program.graph_module.recompile()
    assert "/elsewhere/" in program.graph_module.print_readable(print_output=False)
    assert _package_key(program) == key

    _, shorter = export_step(load_span(checkpoints("llama"), 0, 1), torch.device("cpu"))
    assert _package_key(shorter) != key


def test_a_compiled_step_takes_no_bound_from_the_disk_cache(checkpoints, tmp_path, monkeypatch):
    """torch's on-disk cache hands a compilation the guards of an identical graph compiled before; one compiled
    with the attended length bounded at 4 (as a sliding window's branch once did) would make the runner recompile
    at every longer length. The runner's graphs are keyed apart, so it serves 6 and 17 slots as compiled."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    span = load_span(checkpoints("llama", num_layers=2), 0, 2)
    bounded = torch.compile(span.decode, fullgraph=True, options={"cpp_wrapper": True})
    cache = KVCache(2, 1, 4, span.config, torch.float32, "cpu")
    hidden = torch.zeros(1, span.config.hidden_size)
    torch._dynamo.reset()
    with torch.inference_mode():
        for slot in (1, 3):  # the runner's warm-up steps, under a bound
            keys, values = cache.keys[:, :, :, : slot + 1], cache.values[:, :, :, : slot + 1]
            torch._dynamo.mark_dynamic(keys, 3, min=2, max=4)
            torch._dynamo.mark_dynamic(values, 3, min=2, max=4)
            bounded(hidden, torch.full((1,), slot), torch.full((1,), slot), keys, values, None, None)
    assert any(path.is_file() for path in tmp_path.rglob("*")), "nothing was cached on disk"
    torch._dynamo.reset()
    runner = DecodeRunner(span, torch.device("cpu"), compile=True)
    runner.warm_up()
    assert runner.mode == "compiled"
    graphs = counters["stats"]["unique_graphs"]
    for max_length in (6, 17):
        cache = KVCache(2, 1, max_length, span.config, torch.float32, "cpu")
        key_mask = torch.ones(1, max_length, dtype=torch.bool)
        for slot in range(max_length):
            hidden = torch.randn(1, span.config.hidden_size)
            with torch.inference_mode():
                runner.step(hidden, slot, key_mask, False, cache, None)
    assert counters["stats"]["unique_graphs"] == graphs
