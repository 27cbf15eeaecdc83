"""The frame reader under generated garbage: random bytes, damaged frames of every RPC, hand-made headers with
huge declared sizes and dims, nested msgpack. `read_frame` must return a well-formed Frame within the limits or
raise FrameError / ConnectionLost (PayloadTooLarge when a per-call cap refuses the payload), nothing else, and a
declared size must cost memory only as bytes arrive."""

import asyncio
import tracemalloc

import pytest
from fuzz_strategies import DTYPES, damaged, frame_bytes, handmade_frames, seed_frames
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from swarmllm.wire import ConnectionLost, FrameError, Kind, PayloadTooLarge, WireLimits, read_frame
from swarmllm.wire.framing import FrameClock

FUZZ = settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
    phases=[
        Phase.explicit,
        Phase.generate,
    ],  # no shrinking: a failure is reported at once, CI never stalls on it
)
LIMITS = WireLimits()
SMALL = WireLimits(max_meta_bytes=256, max_payload_bytes=4096, max_tensors=3, max_dims=3)
SEEDS = [frame_bytes(frame) for frame in seed_frames()]


@pytest.fixture(scope="module")
def runner():
    with asyncio.Runner() as runner:
        yield runner


async def read_all(data: bytes, limits: WireLimits, cap: int | None) -> int:
    """Read frames from `data` until it fails or ends; checks each frame against `limits`. Returns how many."""
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    late = []
    clock = FrameClock(limits, lambda: late.append(True))
    frames = 0
    try:
        for _ in range(len(data) + 1):  # a frame is at least a header: this bounds the loop
            try:
                frame = await read_frame(reader, limits, clock, None if cap is None else lambda k, i, m: cap)
            except (FrameError, ConnectionLost, PayloadTooLarge):
                return frames
            frames += 1
            assert isinstance(frame.kind, Kind) and isinstance(frame.message.meta, dict)
            assert len(frame.message.tensors) <= limits.max_tensors
            nbytes = sum(t.numel() * t.element_size() for t in frame.message.tensors)
            assert nbytes <= min(limits.max_payload_bytes, len(data))
            assert nbytes <= (limits.max_payload_bytes if cap is None else cap)
            for tensor in frame.message.tensors:
                assert tensor.dtype in DTYPES and tensor.ndim <= limits.max_dims
        raise AssertionError("read_frame kept returning frames past the end of the data")
    finally:
        clock.stop()
        assert not late


limits_and_caps = st.sampled_from([LIMITS, SMALL]), st.none() | st.integers(0, 4096)


@FUZZ
@given(st.binary(max_size=300), *limits_and_caps)
def test_random_bytes(runner, data, limits, cap):
    runner.run(read_all(data, limits, cap))


@FUZZ
@given(st.sampled_from(SEEDS).flatmap(damaged), *limits_and_caps)
def test_damaged_frames_of_every_rpc(runner, data, limits, cap):
    runner.run(read_all(data, limits, cap))


@FUZZ
@given(handmade_frames(), *limits_and_caps)
def test_handmade_headers(runner, data, limits, cap):
    runner.run(read_all(data, limits, cap))


@settings(FUZZ, max_examples=1000)
@given(st.lists(st.sampled_from(SEEDS) | st.sampled_from(SEEDS).flatmap(damaged), min_size=2, max_size=6))
def test_frames_back_to_back(runner, parts):
    """Valid frames then a damaged one: the valid ones before it all come through."""
    data = b"".join(parts)
    valid = 0
    for part in parts:
        if part not in SEEDS:
            break
        valid += 1
    assert runner.run(read_all(data, LIMITS, None)) >= valid


@settings(FUZZ, max_examples=200)
@given(handmade_frames())
def test_declared_sizes_cost_only_what_arrives(runner, data):
    """A frame may declare up to 1 GiB: while reading it, Python memory grows by about what was sent, not by
    what was declared (torch is not traced, but the reader makes no tensor before its payload is complete)."""
    tracemalloc.start()
    try:
        runner.run(read_all(data, LIMITS, None))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(data) + (1 << 20), f"{peak} bytes traced for a {len(data)}-byte frame"
