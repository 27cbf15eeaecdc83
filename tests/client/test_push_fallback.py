"""A server replies as soon as its push to the next server is sent; when that push then fails, it says so on the
session's stream and the client sends the input itself. Two real servers in this process, the second one refusing
every other push: the session's outputs still equal the blocks computed locally."""

import torch
from server_infos import online_server

from swarmllm.client.session import InferenceSession
from swarmllm.client.swarm import SwarmClient
from swarmllm.models import load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler
from swarmllm.wire import CallContext, DirectServer, Identity, Message, RequestError, connect_direct


async def test_a_failed_push_is_reported_and_the_client_sends_the_input_itself(llama_checkpoint):
    first_id, second_id = Identity.generate(), Identity.generate()
    pushes = {"tried": 0, "broken": 0}

    class Flaky(RequestHandler):
        def rpc_push(self, request: Message, context: CallContext) -> None:
            pushes["tried"] += 1
            if pushes["tried"] % 2 == 0:  # every other push is refused
                pushes["broken"] += 1
                raise RequestError("busy", "injected: refused")
            super().rpc_push(request, context)

    second = DirectServer(
        Flaky(Backend(load_span(str(llama_checkpoint), 2, 4), cache_tokens=64), dict).handlers(), second_id
    )
    await second.start()
    links = []

    async def connect(peer_id: str):
        links.append(await connect_direct(*second.address, first_id, expected_peer_id=peer_id))
        return links[-1]

    first = DirectServer(
        RequestHandler(
            Backend(load_span(str(llama_checkpoint), 0, 2), cache_tokens=64),
            dict,
            connect=connect,
            peer_id=first_id.peer_id,
        ).handlers(),
        first_id,
    )
    await first.start()
    swarm = SwarmClient([], "push-fallback", 4, missing_blocks_timeout_s=0)
    swarm.use_servers(
        [
            online_server(first_id.peer_id, 0, 2, address=first.address),
            online_server(second_id.peer_id, 2, 4, address=second.address),
        ]
    )
    try:
        hidden = torch.randn(1, 9, 64)
        session = InferenceSession(swarm, max_length=16)
        outputs = [
            await session.step(hidden[:, :3])
        ]  # the prompt: not pushed (the next hop has not answered)
        for t in range(3, 9):
            outputs.append(await session.step(hidden[:, t : t + 1]))
        await session.close()

        span = load_span(str(llama_checkpoint), 0, 4)
        with torch.inference_mode():
            want = span(hidden)
        torch.testing.assert_close(torch.cat(outputs, dim=1), want, rtol=1e-5, atol=1e-5)
        assert pushes["tried"] == 6 and pushes["broken"] == 3 and len(links) == 1  # one connection for all
        assert session.pushed_hops == 3  # the other 3 inputs the client sent itself, after the notices
        assert not session.failovers  # a failed push is no reason to replace anyone
    finally:
        await swarm.shutdown()
        for link in links:
            await link.close()
        await first.stop()
        await second.stop()
