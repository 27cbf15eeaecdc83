"""A stateful test of inference sessions against a real RequestHandler over real direct connections: clients
open sessions, step, replay (rewind to an earlier position with new tokens), close, disconnect and flood, in any
order hypothesis picks. After every action, once the server has caught up (waited for, not slept on):

- the cache budget in use equals the sum over live sessions of their reservations (batch x max_length), and
  the server's sessions are exactly the clients' live ones (a dropped connection frees its sessions);
- each peer's quota accounting (sessions, cache tokens) equals what it holds;
- every output equals the span's own forward over the session's tokens so far.
"""

import asyncio

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    invariant,
    rule,
    run_state_machine_as_test,
)

from swarmllm.models import load_span
from swarmllm.server.backend import Backend
from swarmllm.server.handler import RequestHandler, ServerLimits
from swarmllm.wire import DirectServer, Identity, Message, RemoteError, connect_direct
from swarmllm.wire.messages import OpenSession, Step

HIDDEN = 64
CLIENTS = 3
CACHE_TOKENS = 96
LIMITS = ServerLimits(
    max_batch_size=2,
    max_session_length=16,
    max_sessions_per_peer=3,
    max_cache_share_per_peer=0.5,  # 48 tokens a peer: some openings are refused with `quota`, some `cache_full`
    peer_rate_per_s=1e9,
    peer_burst=10**9,
)
ANSWER_WITHIN_S = 5.0  # a bound to fail on instead of hanging (the 1 s answers are test_fuzz_handlers')


class Session:
    def __init__(self, client: int, stream, batch: int, max_length: int):
        self.client, self.stream, self.batch, self.max_length = client, stream, batch, max_length
        self.inputs = torch.zeros(batch, 0, HIDDEN)
        self.live = True


class Sessions(RuleBasedStateMachine):
    runner: asyncio.Runner
    span = None

    sessions = Bundle("sessions")

    def __init__(self):
        super().__init__()
        self.backend = Backend(self.span, cache_tokens=CACHE_TOKENS)
        self.handler = RequestHandler(self.backend, dict, LIMITS)
        self.server = DirectServer(self.handler.handlers(), Identity.generate())
        self.identities = [Identity.generate() for _ in range(CLIENTS)]
        self.live: list[Session] = []
        self.generator = torch.Generator().manual_seed(0)
        self.run(self.server.start())
        self.conns = [self.run(self.connect(i)) for i in range(CLIENTS)]

    def run(self, coro):
        return self.runner.run(coro)

    async def connect(self, client: int):
        return await connect_direct(*self.server.address, self.identities[client], expected_peer_id=None)

    def teardown(self):
        async def stop():
            for conn in self.conns:
                await conn.close()
            await self.server.stop()

        self.run(stop())
        self.backend.shutdown()

    def tokens(self, batch: int, n: int) -> torch.Tensor:
        return torch.randn(batch, n, HIDDEN, generator=self.generator)

    async def answer(self, session: Session) -> Message:
        async with asyncio.timeout(ANSWER_WITHIN_S):
            return await session.stream.recv()

    def check_output(self, session: Session, reply: Message, n: int) -> None:
        assert "error" not in reply.meta, reply.meta
        with torch.inference_mode():
            want = self.span(session.inputs)[:, -n:]
        torch.testing.assert_close(reply.tensors[0], want, rtol=1e-5, atol=1e-5)

    async def send_step(self, session: Session, position: int, hidden: torch.Tensor) -> Message:
        await session.stream.send(Step(position, hidden).to_message())
        return await self.answer(session)

    @rule(
        target=sessions,
        client=st.integers(0, CLIENTS - 1),
        batch=st.integers(1, 2),
        max_length=st.integers(1, 16),
    )
    def open_session(self, client, batch, max_length):
        async def go():
            stream = await self.conns[client].open_stream(
                "inference", OpenSession(0, 4, batch, max_length).to_message()
            )
            session = Session(client, stream, batch, max_length)
            hidden = self.tokens(batch, 1)
            try:
                reply = await self.send_step(session, 0, hidden)
            except RemoteError as e:
                assert e.code in ("cache_full", "quota"), e
                await stream.close()
                session.live = False
                return session
            session.inputs = hidden
            self.check_output(session, reply, 1)
            self.live.append(session)
            return session

        return self.run(go())

    @rule(session=sessions, n=st.integers(1, 3))
    def step(self, session, n):
        if not session.live:
            return

        async def go():
            hidden = self.tokens(session.batch, n)
            reply = await self.send_step(session, session.inputs.shape[1], hidden)
            if session.inputs.shape[1] + n > session.max_length:
                assert reply.meta["error"]["code"] == "too_long", reply.meta
                return
            session.inputs = torch.cat([session.inputs, hidden], 1)
            self.check_output(session, reply, n)

        self.run(go())

    @rule(session=sessions, data=st.data())
    def replay(self, session, data):
        """Rewind to an earlier position with new tokens (as a client does after a failover or a retry)."""
        if not session.live:
            return
        position = data.draw(st.integers(0, min(session.inputs.shape[1], session.max_length - 1)))
        n = data.draw(st.integers(1, max(1, session.max_length - position)))

        async def go():
            hidden = self.tokens(session.batch, n)
            reply = await self.send_step(session, position, hidden)
            session.inputs = torch.cat([session.inputs[:, :position], hidden], 1)
            self.check_output(session, reply, n)

        self.run(go())

    @rule(session=consumes(sessions))
    def close(self, session):
        if session.live:
            session.live = False
            self.live.remove(session)
            self.run(session.stream.close())

    @rule(client=st.integers(0, CLIENTS - 1))
    def disconnect(self, client):
        """Drop the connection without closing its sessions; the client comes back on a new one."""
        for session in [s for s in self.live if s.client == client]:
            session.live = False
            self.live.remove(session)
        self.run(self.conns[client].close())
        self.conns[client] = self.run(self.connect(client))

    @rule(session=sessions, k=st.integers(2, 40), bad=st.lists(st.sampled_from(["nan", "position", "shape"])))
    def flood(self, session, k, bad):
        """Many calls queued at once: replays of the last token (state unchanged) and bad steps; every one is
        answered, in order, and the session is intact afterwards."""
        if not session.live or session.inputs.shape[1] == 0:
            return
        last = session.inputs.shape[1] - 1
        kinds = (bad * k)[:k] if bad else []
        kinds += ["replay"] * (k - len(kinds))

        async def go():
            for kind in kinds:
                hidden = session.inputs[:, last:]
                if kind == "nan":
                    hidden = torch.full_like(hidden, float("nan"))
                elif kind == "shape":
                    hidden = torch.zeros(session.batch + 1, 1, HIDDEN)
                position = last + 2 if kind == "position" else last
                await session.stream.send(Step(position, hidden).to_message())
            for kind in kinds:
                reply = await self.answer(session)
                if kind == "replay":
                    self.check_output(session, reply, 1)
                else:
                    assert reply.meta["error"]["code"] == "bad_request", reply.meta

        self.run(go())

    @rule(client=st.integers(0, CLIENTS - 1), k=st.integers(2, 30))
    def flood_forwards(self, client, k):
        """Batch work queued at once by one peer: answered, or refused with `quota`/`busy`; sessions untouched."""

        async def go():
            hidden = self.tokens(1, 40)  # above the backend's inline limit: these go to the compute thread
            calls = [
                self.conns[client].call("forward", Message({"start": 0, "end": 4}, [hidden]))
                for _ in range(k)
            ]
            async with asyncio.timeout(ANSWER_WITHIN_S * 4):
                results = await asyncio.gather(*calls, return_exceptions=True)
            for result in results:
                assert isinstance(result, Message) or (
                    isinstance(result, RemoteError) and result.code in ("quota", "busy")
                ), result

        self.run(go())

    @invariant()
    def cache_in_use_is_the_sum_over_live_sessions(self):
        async def settled():
            async with asyncio.timeout(ANSWER_WITHIN_S):
                while not len(self.backend.sessions) == len(self.live) == len(self.handler._open):
                    await asyncio.sleep(0.005)

        self.run(settled())
        reserved = sum(s.batch * s.max_length for s in self.live)
        assert self.backend.budget.used_tokens == reserved
        assert sum(s.batch_size * s.max_length for s in self.backend.sessions.values()) == reserved
        for client, identity in enumerate(self.identities):
            mine = [s for s in self.live if s.client == client]
            held = self.handler.quotas.held(identity.peer_id)
            assert held[:2] == (len(mine), sum(s.batch * s.max_length for s in mine)), (client, held)
            assert held[2] == 0  # no forward is queued between actions


@pytest.fixture(scope="module")
def runner():
    with asyncio.Runner() as runner:
        yield runner


def test_sessions(llama_checkpoint, runner):
    Sessions.runner = runner
    Sessions.span = load_span(str(llama_checkpoint), 0, 4)
    run_state_machine_as_test(
        Sessions,
        settings=settings(
            max_examples=15,
            stateful_step_count=20,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
            phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure is reported at once
        ),
    )
