"""A streamed answer (`api.streams.stream`, both faces' one way to stream) over a real aiohttp server and client:
its chunks then its trailer; a generation that fails once the stream has started puts the failure in the
stream and stops the others; a requester that leaves stops them all."""

import asyncio

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from swarmllm.api.generation import Piece
from swarmllm.api.streams import stream


class Generation:
    """A generation as the stream sees it: pieces that come when the test releases them, `cancelled`, and no
    `abort` (it has no session to close)."""

    abort = None

    def __init__(self, texts: list[str], fails: bool = False):
        self.texts, self.fails = texts, fails
        self.release = asyncio.Event()
        self.stopped = asyncio.Event()

    @property
    def cancelled(self) -> bool:
        return self.stopped.is_set()

    @cancelled.setter
    def cancelled(self, value: bool) -> None:
        if value:
            self.stopped.set()

    async def text(self):
        for i, text in enumerate(self.texts):
            if i:
                await self.release.wait()
            yield Piece(text, [])
        if self.fails:
            raise RuntimeError("a server vanished")


async def _serve(gens: list[Generation]) -> TestClient:
    async def handler(request: web.Request) -> web.StreamResponse:
        async def chunks():
            for gen in gens:
                async for piece in gen.text():
                    yield piece.text.encode() + b"\n"

        return await stream(
            request, gens, {"Content-Type": "text/plain"}, chunks(),
            lambda e: f"error: {e.body['error']['message']}\n".encode(), lambda: b"end\n",
        )  # fmt: skip

    app = web.Application()
    app.router.add_get("/", handler)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


async def test_chunks_then_the_trailer_or_the_failure_in_the_stream():
    whole = Generation(["a", "b"])
    whole.release.set()
    client = await _serve([whole])
    try:
        assert await (await client.get("/")).text() == "a\nb\nend\n"
        assert not whole.cancelled
        failing, other = Generation(["x"], fails=True), Generation(["y"])
    finally:
        await client.close()
    client = await _serve([failing, other])
    try:
        body = await (await client.get("/")).text()
        assert body == "x\nerror: the swarm could not serve this request: a server vanished\n"
        assert failing.cancelled and other.cancelled
    finally:
        await client.close()


async def test_a_requester_that_leaves_stops_the_generations():
    gen = Generation(["first", *["more"] * 1000])
    client = await _serve([gen])
    try:
        response = await client.get("/")
        assert await response.content.readline() == b"first\n"
        response.close()  # the requester leaves mid-stream
        gen.release.set()
        await asyncio.wait_for(gen.stopped.wait(), timeout=30)
    finally:
        await client.close()
