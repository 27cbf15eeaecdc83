"""The API over a module's `engine` (an `Engine` the module builds), served by a real aiohttp test server."""

import pytest
from aiohttp.test_utils import TestClient, TestServer

from swarmllm.api.app import Api
from swarmllm.api.gateway import Gateway


@pytest.fixture
async def client(engine):
    client = TestClient(TestServer(Gateway([Api(engine)]).app()))
    await client.start_server()
    yield client
    await client.close()
