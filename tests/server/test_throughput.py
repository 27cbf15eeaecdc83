"""Throughput is measured once per block shape and kernels, device, dtype and thread count, then read from the
cache."""

import json

from swarmllm.models import load_span
from swarmllm.server.throughput import cached_threads, cached_throughput


def test_measured_once_then_cached(llama_checkpoint, tmp_path):
    span = load_span(str(llama_checkpoint), 0, 2)
    path = tmp_path / "throughput.json"
    first = cached_throughput(span, "cpu", "float32", 1, path=path)
    assert all(x > 0 for x in first)
    (key,) = json.loads(path.read_text())
    assert key.endswith("/cpu/float32/1")
    path.write_text(json.dumps({key: [123.0, 456.0]}))  # what a cached measurement looks like
    assert cached_throughput(span, "cpu", "float32", 1, path=path) == (123.0, 456.0)
    other = cached_throughput(span, "cpu", "float32", 2, path=path)  # another thread count: measured
    assert other != (123.0, 456.0) and len(json.loads(path.read_text())) == 2
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
    keys = json.loads(path.read_text())
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
