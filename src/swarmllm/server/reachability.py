"""Whether others can reach a server at the direct address it announces, as its peers find by dialling it back.

Why: a volunteer's server behind a NAT or a firewall, or one given a wrong `--announce-host`, announces an address
nobody can dial, and every client and every server pushing to it then waits there for its connect timeout (5 s
where packets are dropped) before falling back to libp2p, again on each new connection. Petals asks a central
service whether a server is reachable; here the swarm answers. Before it announces itself online, a server asks
up to `PEERS` of its peers (the unary `reach`) to dial it at that address and have it prove its peer id there. The
first that reached it settles it: reachable. If every peer that answered failed, the server never announces the
address (clients and servers go straight to libp2p) and says what to do; that costs its start `ANSWER_S`. If none
answered (the first server of a swarm, peers of an older version), it announces the address and asks again each
announce period, or as soon as a peer asks it the same (a server joining), dropping it once peers answer that
they cannot dial it. A verdict is asked again every `RECHECK_S`, and the address announced or dropped at once
where it changed: a home connection's address changes, a forwarded port is opened or closed. A peer that lies
costs at most the direct path, and only if every peer asked lies. A server that does not know its address
(`--announce-host auto`, the default with a wildcard `--host`) asks by port instead: each peer dials that port at
the address it sees the server's connection come from, and the server announces the best one reached (a public
one settles it).

The dialling side is bounded so that no one can use it against others: it dials only on behalf of a proven peer
id, expects that id to answer (so only a peer that listens there itself can get a yes), runs one check per peer
and `MAX_CHECKS` in all at once, and answers a failure only `ANSWER_S` after the query, whatever went wrong: a
refused connection and a silent address read the same, so the answer tells nothing about an address but whether
the asking peer listens there.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Sequence

from swarmllm.wire import Connection, Identity, RequestError, WireError, proves_at
from swarmllm.wire.messages import ReachQuery, ReachReply
from swarmllm.wire.swarm_key import SwarmKey
from swarmllm.wire.validation import bad_request

logger = logging.getLogger(__name__)

ANSWER_S = 5.0  # how long a check dials; a failure is answered only then
PEERS = 3  # peers asked at once
RECHECK_S = 600.0  # a server asks again this long after its last verdict
MAX_CHECKS = 4  # checks a server runs for others at once


class DialBacks:
    """The checks a server runs for its peers: dial the asking peer back at an address and see it prove its id."""

    def __init__(
        self,
        identity: Identity,
        swarm_key: SwarmKey | None = None,
        *,
        answer_s: float = ANSWER_S,
        max_checks: int = MAX_CHECKS,
        asked: Callable[[str], None] | None = None,
    ):
        self.identity, self.swarm_key = identity, swarm_key
        self.answer_s, self.max_checks = answer_s, max_checks
        # told the peer id of each check run: a peer that asks is a peer this server can ask in turn (the first
        # server of a swarm, which had nobody to ask, then need not wait for its next announce period)
        self.asked = asked
        self._checking: set[str] = set()  # peers whose check runs now

    def refusal(self, peer_id: str | None) -> tuple[str, str] | None:
        """(code, message) where a check for `peer_id` is not run now, else None."""
        if peer_id is None:
            return "bad_request", "a reach check is run only for a peer that proved its id"
        if peer_id in self._checking:
            return "quota", "a reach check for this peer is running: one at a time"
        if len(self._checking) >= self.max_checks:
            return "busy", f"{self.max_checks} reach checks are running"
        return None

    async def check(self, peer_id: str, addr: str) -> bool:
        """Whether `peer_id` answers at `addr` and proves its id there; False comes `answer_s` after the call."""
        if (refused := self.refusal(peer_id)) is not None:
            raise RequestError(*refused)
        self._checking.add(peer_id)
        if self.asked is not None:
            self.asked(peer_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.answer_s
        try:
            if await proves_at(addr, self.identity, peer_id, timeout=self.answer_s, swarm_key=self.swarm_key):
                return True
            await asyncio.sleep(max(0.0, deadline - loop.time()))  # the same answer time, whatever failed
            return False
        finally:
            self._checking.discard(peer_id)


def dial_address(query: ReachQuery, remote_host: str | None) -> str:
    """The address a query asks to be dialled at: its own, or its port at the host its connection came from
    (`CallContext.remote_host`: unknown through a libp2p relay)."""
    if query.addr is not None:
        return query.addr
    if remote_host is None:
        raise bad_request(
            "a reach query by port needs a connection whose address is known (not through a relay)"
        )
    return f"{remote_host}:{query.port}"


def _rank(addr: str) -> int:
    """How widely an address (host:port) can be dialled: 0 public, 1 a private network's, 2 loopback, 3 a name."""
    try:
        ip = ipaddress.ip_address(addr.rpartition(":")[0])
    except ValueError:
        return 3
    return 0 if ip.is_global else 2 if ip.is_loopback else 1


def best_address(addrs: Sequence[str]) -> str | None:
    """Of the addresses peers reached us at (each the host they see us from), the one most peers can dial: a
    public one before a private network's, a loopback one last."""
    return min(addrs, key=_rank, default=None)


def verdict(answers: Sequence[bool | None]) -> bool | None:
    """Reachable if one peer reached us, unreachable if every peer that answered failed, unknown (None) if none
    answered."""
    known = [answer for answer in answers if answer is not None]
    if any(known):
        return True
    return False if known else None


async def ask_peers(
    connect: Callable[[str], Awaitable[Connection]],
    peer_ids: Sequence[str],
    query: ReachQuery,
    settles: Callable[[ReachReply], bool],
) -> list[ReachReply | None]:
    """Ask the first `PEERS` of `peer_ids` `query` at once; their answers (None: no answer, or a refusal) until one
    `settles` it, whose answer is the last (the others are not waited for: a failure comes only at `ANSWER_S`)."""

    async def ask(peer_id: str) -> ReachReply | None:
        try:
            async with asyncio.timeout(2 * ANSWER_S):
                conn = await connect(peer_id)
                return ReachReply.parse(await conn.call("reach", query.to_message()))
        except (TimeoutError, WireError, OSError, RequestError) as e:
            logger.debug("no reach answer from %s: %r", peer_id, e)
            return None

    asked = [asyncio.ensure_future(ask(peer_id)) for peer_id in peer_ids[:PEERS]]
    answers: list[ReachReply | None] = []
    try:
        for answer in asyncio.as_completed(asked):
            answers.append(await answer)
            if answers[-1] is not None and settles(answers[-1]):
                break
    finally:
        for task in asked:
            task.cancel()
    return answers


async def ask_reachable(
    connect: Callable[[str], Awaitable[Connection]], peer_ids: Sequence[str], addr: str
) -> bool | None:
    """Whether peers reach us at `addr` (`verdict`; the first that does settles it)."""
    answers = await ask_peers(connect, peer_ids, ReachQuery(addr=addr), lambda reply: reply.reached)
    return verdict([None if answer is None else answer.reached for answer in answers])


async def ask_address(
    connect: Callable[[str], Awaitable[Connection]], peer_ids: Sequence[str], port: int
) -> tuple[bool | None, str | None]:
    """Where peers reach us at `port`: (`verdict`, the `best_address` they reached us at); a public address
    settles it."""

    answers = await ask_peers(
        connect, peer_ids, ReachQuery(port=port), lambda reply: reply.reached and _rank(reply.addr) == 0
    )
    reached = [answer.addr for answer in answers if answer is not None and answer.reached]
    return verdict([None if answer is None else answer.reached for answer in answers]), best_address(reached)
