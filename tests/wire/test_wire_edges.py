"""Edge cases of the wire layer: codecs at extreme magnitudes, peer input the handshake and messages must refuse
cleanly, and connections a pool must not lose track of."""

import asyncio
import math
import os

import pytest
import torch

from swarmllm.wire import (
    ConnectionPool,
    DirectServer,
    Frame,
    FrameError,
    Handlers,
    Identity,
    Kind,
    Message,
    RequestError,
    WireLimits,
    connect_direct,
    encode_frame,
    read_frame,
)
from swarmllm.wire.compression import BLOCK, compress, decompress
from swarmllm.wire.identity import public_key_from_bytes, verify
from swarmllm.wire.messages import PushTarget, Step
from swarmllm.wire.tls import client_context

BOUND = 10  # seconds; only to fail a test instead of hanging


@pytest.mark.parametrize("magnitude", [1e-29, 1e-33, 1e-36])
def test_blockwise8_round_trips_tiny_values(magnitude):
    """Tiny states (gradients far down a chain) keep blockwise8's precision: each value within half a code step
    (absmax / 254) plus the bfloat16 scale's rounding, like values of ordinary size."""
    x = torch.randn(2, 3, 2 * BLOCK, generator=torch.Generator().manual_seed(0)) * magnitude
    y = decompress(*compress(x, "blockwise8"))
    absmax = x.unflatten(-1, (-1, BLOCK)).abs().amax(-1, keepdim=True)
    error = (y - x).unflatten(-1, (-1, BLOCK)).abs()
    assert (error <= absmax * (1 / 254 + 2**-8)).all(), (error / absmax).max()


def test_blockwise8_recompressing_tiny_values_gives_the_same_codes():
    """The module's promise: compressing what decompress returned gives the same codes (a client resending a
    server's output after a failed push sends exactly what the push carried)."""
    x = torch.randn(2, 3, 2 * BLOCK, generator=torch.Generator().manual_seed(1)) * 1e-30
    codes, scales = compress(x, "blockwise8")
    again, again_scales = compress(decompress(codes, scales), "blockwise8")
    assert torch.equal(again, codes) and torch.equal(again_scales, scales)


def test_step_refuses_a_nan_push_timeout():
    """A NaN timeout would reach asyncio as a NaN deadline (a timer that fires at once and breaks the order
    of the loop's timer heap); like any non-finite value from a peer, it is refused at the edge."""
    push = [PushTarget(Identity.generate().peer_id, "s" * 16)]
    step = Step(0, torch.zeros(1, 1, 8), push=push, push_timeout_s=math.nan)
    with pytest.raises(RequestError) as refusal:
        Step.parse(step.to_message())
    assert refusal.value.code == "bad_request"


def test_a_key_of_unknown_type_is_not_an_rsa_key():
    """public_key_from_bytes promises ValueError for anything but an RSA key, and verify False on malformed
    input; cryptography raises UnsupportedAlgorithm (no ValueError) for an unknown OpenSSH key type."""
    with pytest.raises(ValueError):
        public_key_from_bytes(b"ssh-foo AAAA")
    assert verify(b"ssh-foo AAAA", b"data", Identity.generate().sign(b"data")) is False


@pytest.fixture(scope="module")
def server_identity() -> Identity:
    return Identity.generate()


@pytest.fixture
async def direct_server(server_identity):
    server = DirectServer(Handlers(), server_identity, handshake_timeout=BOUND)
    await server.start()
    yield server
    await server.stop()


async def test_a_hello_with_a_key_of_unknown_type_is_refused(direct_server):
    """The server answers a malformed hello with bad_handshake (not a dropped connection and a traceback)."""
    reader, writer = await asyncio.open_connection(
        *direct_server.address, ssl=client_context(), server_hostname=""
    )
    try:
        hello = {"key": b"ssh-foo AAAA", "nonce": os.urandom(32)}
        writer.writelines(encode_frame(Frame(Kind.MESSAGE, 0, Message(hello))))
        refusal = await asyncio.wait_for(read_frame(reader, WireLimits(max_payload_bytes=0)), BOUND)
        assert refusal.kind is Kind.ERROR and refusal.message.meta["code"] == "bad_handshake"
    finally:
        writer.close()


async def test_a_caller_that_gives_up_does_not_leak_the_connection(direct_server, server_identity):
    """A get() cancelled (its caller's timeout) while the connection is being made: the connection, once made,
    is the pool's, reused by the next get() and closed with the pool, not a second one left open."""
    pool = ConnectionPool(Identity.generate(), None)
    peer, addrs = server_identity.peer_id, [f"{direct_server.address[0]}:{direct_server.address[1]}"]
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0):  # fires once get() waits for the connection
                await pool.get(peer, addrs)
        made = await asyncio.wait_for(pool._connecting[peer], BOUND)
        assert await pool.get(peer, addrs) is made
        assert direct_server.slots.total == 1
    finally:
        await pool.close()
    assert made.is_closed


async def test_closing_a_pool_closes_the_connection_it_is_making(direct_server, server_identity):
    pool = ConnectionPool(Identity.generate(), None)
    peer, addrs = server_identity.peer_id, [f"{direct_server.address[0]}:{direct_server.address[1]}"]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0):
            await pool.get(peer, addrs)
    connecting = pool._connecting[peer]
    await pool.close()
    await asyncio.wait([connecting], timeout=BOUND)
    assert connecting.done()
    assert connecting.cancelled() or connecting.result().is_closed


class StuckPeer:
    """A real server whose connection stops reading (a stream's full inbox: backpressure) until `release`d, and a
    client connected to it whose send buffer has been filled, so that its next send waits for a drain."""

    def __init__(self, identity: Identity):
        self.release, self.probe_done = asyncio.Event(), asyncio.Event()
        handlers = Handlers()

        async def sink(opening, incoming, context):
            await self.release.wait()
            async for _ in incoming:
                pass
            yield Message()

        async def probe(opening, incoming, context):
            try:
                async for _ in incoming:
                    pass
            finally:
                self.probe_done.set()
            yield Message()

        handlers.add_stream("sink", sink)
        handlers.add_stream("probe", probe)
        self.identity = identity
        self.server = DirectServer(handlers, identity, limits=WireLimits(max_inbox_bytes=1 << 20))

    async def __aenter__(self):
        await self.server.start()
        self.client = await connect_direct(
            *self.server.address, Identity.generate(), expected_peer_id=self.identity.peer_id
        )
        self.sink = await self.client.open_stream("sink", Message(), timeout=BOUND)
        return self

    async def fill(self) -> None:
        """Send 128 KiB messages into the sink until a send times out (the kernel's and transport's buffers are
        full); the send that timed out raises. (Frames this small are written whole, then waited for: a bigger
        one goes in pieces, each written once there is room, so a send that timed out leaves less behind.)"""
        chunk = Message(tensors=[torch.zeros(1 << 15)])
        for _ in range(1024):
            await self.sink.send(chunk, timeout=0.5)

    async def __aexit__(self, *exc_info):
        self.release.set()
        await self.client.close()
        await self.server.stop()


async def test_a_send_that_times_out_raises_timeout_and_keeps_the_connection(server_identity):
    """Stream.send (like call and notify) waits up to `timeout` for a full send buffer and then raises
    TimeoutError, as documented: the connection is alive, only slow, and must not be reported lost."""
    async with StuckPeer(server_identity) as peer:
        with pytest.raises(TimeoutError):
            await peer.fill()
        assert not peer.client.is_closed
        with pytest.raises(TimeoutError):
            await peer.client.call("probe", Message(), timeout=0.1)


async def test_an_open_stream_that_times_out_is_ended_at_the_server(server_identity):
    """open_stream writes its REQUEST, then waits for a full send buffer to drain; when that wait times out the
    server still gets the REQUEST and starts the handler (an inference session holds cache), so the caller must
    end the stream it gave up on, as a unary call does."""
    async with StuckPeer(server_identity) as peer:
        with pytest.raises(TimeoutError):
            await peer.fill()
        with pytest.raises(TimeoutError):
            await peer.client.open_stream("probe", Message(), timeout=0.1)
        peer.release.set()
        await asyncio.wait_for(peer.probe_done.wait(), BOUND)


def test_an_empty_tensor_too_wide_for_any_frame_fails_its_send_not_the_connection():
    """The reader refuses an empty tensor whose other dimensions could not fit a frame (and closes the connection
    over it); the sender applies the same rule, so that only the call fails."""
    limits = WireLimits()
    wide = torch.empty(0, limits.max_payload_bytes // 2)  # no bytes, but 2 GiB a row of floats
    with pytest.raises(FrameError, match="larger than any frame"):
        encode_frame(Frame(Kind.MESSAGE, 0, Message({}, [wide])), limits)
    fits = torch.empty(0, 16)
    assert encode_frame(Frame(Kind.MESSAGE, 0, Message({}, [fits])), limits)
