"""Throughput is measured once per block shape and kernels, device, dtype and thread count, then read from the
cache."""

import json

from swarmllm.models import load_span
from swarmllm.server.throughput import cached_threads, cached_throughput, last_measured


def measured(path):
    """The cache's measurements by block shape, kernels and thread count (not the last one of each model)."""
    return [key for key in json.loads(path.read_text()) if not key.startswith("last/")]


def test_measured_once_then_cached(llama_checkpoint, tmp_path):
    span = load_span(str(llama_checkpoint), 0, 2)
    path = tmp_path / "throughput.json"
    first = cached_throughput(span, "cpu", "float32", 1, path=path)
    assert all(x > 0 for x in first)
    (key,) = measured(path)
    assert key.endswith("/cpu/float32/1")
    path.write_text(json.dumps({key: [123.0, 456.0]}))  # what a cached measurement looks like
    assert cached_throughput(span, "cpu", "float32", 1, path=path) == (123.0, 456.0)
    other = cached_throughput(span, "cpu", "float32", 2, path=path)  # another thread count: measured
    assert other != (123.0, 456.0) and len(measured(path)) == 2
    path.write_text("garbage")  # a broken cache is measured over, never an error
    assert all(x > 0 for x in cached_throughput(span, "cpu", "float32", 1, path=path))


def test_a_span_computed_by_other_modules_is_measured_again(llama_checkpoint, tmp_path):
    """The same blocks under the same name through other modules (here int8 projections where the caller says
    "float32"; in use, an int8 kernel that an upgrade replaced) have a speed of their own: the cache does not
    answer for them."""
    path = tmp_path / "throughput.json"
    path.write_text(json.dumps({}))
    cached_throughput(load_span(str(llama_checkpoint), 0, 2), "cpu", "float32", 1, path=path)
    cached_throughput(load_span(str(llama_checkpoint), 0, 2, quant="int8"), "cpu", "float32", 1, path=path)
    keys = measured(path)
    assert len(keys) == 2 and all(key.endswith("/cpu/float32/1") for key in keys)


def test_the_threads_that_pay_are_measured_once_then_cached(llama_checkpoint, tmp_path):
    span = load_span(str(llama_checkpoint), 0, 2)
    path = tmp_path / "throughput.json"
    assert cached_threads(span, "cpu", "float32", 1, path=path) == 1  # nothing to choose
    chosen = cached_threads(span, "cpu", "float32", 4, path=path)
    assert chosen in (1, 4)
    (key,) = [k for k in json.loads(path.read_text()) if k.endswith("/cpu/float32/4/threads")]
    path.write_text(json.dumps({key: 5 - chosen}))  # the other answer, as if measured before
    assert cached_threads(span, "cpu", "float32", 4, path=path) == 5 - chosen
    path.write_text(json.dumps({key: 3}))  # neither 1 nor 4: not a measurement of ours, measured again
    assert cached_threads(span, "cpu", "float32", 4, path=path) in (1, 4)


def test_the_last_measurement_of_a_model_device_and_dtype_is_known_before_loading(llama_checkpoint, tmp_path):
    """What a restarting server announces while it loads: the figures its blocks gave last on this device and
    dtype, whatever the thread count, looked up by the model's config alone (the span is not loaded yet)."""
    path = tmp_path / "throughput.json"
    span = load_span(str(llama_checkpoint), 0, 2)
    assert last_measured(span.config, "cpu", "float32", path=path) is None  # never measured here
    first = cached_throughput(span, "cpu", "float32", 1, path=path)
    assert last_measured(span.config, "cpu", "float32", path=path) == first
    assert last_measured(span.config, "cpu", "bfloat16", path=path) is None  # another dtype: not known
    (key,) = measured(path)
    cache = json.loads(path.read_text())
    cache[key.rsplit("/", 1)[0] + "/2"] = [7.0, 8.0]  # as if measured at 2 threads since
    path.write_text(json.dumps(cache))
    assert cached_throughput(span, "cpu", "float32", 2, path=path) == (7.0, 8.0)
    assert last_measured(span.config, "cpu", "float32", path=path) == (7.0, 8.0)  # the last one
    other = load_span(str(llama_checkpoint), 2, 4)  # other blocks of the same model: the same config
    assert last_measured(other.config, "cpu", "float32", path=path) == (7.0, 8.0)
    cache = json.loads(path.read_text())
    (last,) = [k for k in cache if k.startswith("last/")]
    for garbage in ([0, 1.0], ["1", 2.0], 5.0):
        path.write_text(json.dumps({**cache, last: garbage}))
        assert last_measured(span.config, "cpu", "float32", path=path) is None
