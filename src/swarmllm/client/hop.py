"""One hop of an inference session: a span of blocks on one server, its stream, its push secret, and the inputs
it has received (kept so that a replacement server can be brought to the same state by replaying them).

The kept inputs are the hop's own inputs, step by step, as sent (or as pushed: the client receives every hop's
output, so it knows every hop's input without extra traffic). They cost batch x tokens x hidden values per hop
(twice that where the hop's first boundary lies inside a Ladder Residual region: the input is the pair (r, p)).
Replaying them step by step, with the shapes of the original steps, makes the replacement compute exactly what
the lost server had computed (the same kernels on the same inputs), so no logit of the session changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import secrets
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch

from swarmllm.client.replies import BadReplyError, push_failure, reply_step, step_reply
from swarmllm.client.routing import Hop
from swarmllm.client.tuning import NO_TUNING, Tuning
from swarmllm.wire import Connection, Stream, WireError
from swarmllm.wire.connection import Watcher
from swarmllm.wire.messages import OpenSession, Repoint, Step, StepReply


def _on_loop(loop: asyncio.AbstractEventLoop, fn: Callable[[], None]) -> None:
    """Call `fn` on `loop` (from whichever thread the garbage collector runs in), unless the loop is closed."""
    with contextlib.suppress(RuntimeError):  # (closed meanwhile)
        loop.call_soon_threadsafe(fn)


class HopTimeoutError(TimeoutError):
    """A server did not answer within its deadline (it may be hung); names the server and the hop."""


@dataclass(frozen=True)
class KeptInput:
    """One step's input to a hop: tokens [position, position + T), of which the session still holds those before
    `held` (a later step at an earlier position cut it: speculative decoding's rejected drafts, an edited
    history). The step is kept whole, so that a replay sends it with its original shape (another shape computes
    other roundings) and the next step's earlier position rewinds the replacement as it did the lost server."""

    position: int
    hidden: torch.Tensor  # [batch, T, hidden]
    key_mask: torch.Tensor | None  # [batch, T] bool, with left padding
    pending: torch.Tensor | None = None  # [batch, T, hidden]: p, where the input is a ladder pair (r, p)
    held: int | None = None  # the positions the session still holds end here (None: at the step's end)

    @property
    def end(self) -> int:
        return self.position + self.hidden.shape[1] if self.held is None else self.held

    def rows(self, index: torch.Tensor) -> KeptInput:
        """This input with row i taken from row index[i]."""
        mask = None if self.key_mask is None else self.key_mask[index]
        pending = None if self.pending is None else self.pending[index]
        return KeptInput(self.position, self.hidden[index], mask, pending, self.held)

    def cut(self) -> KeptInput:
        """Only the positions the session still holds."""
        if self.held is None:
            return self
        n = self.held - self.position
        mask = None if self.key_mask is None else self.key_mask[:, :n]
        pending = None if self.pending is None else self.pending[:, :n]
        return KeptInput(self.position, self.hidden[:, :n], mask, pending)


class History:
    """A hop's kept inputs, in order, covering positions [0, length), with its rows as the session's now are.

    Beam search reorders the rows at every step (`reorder`); copying every kept input each time would cost the
    whole history per token, so a reorder is only noted, and `entries` applies the reorders noted since an input
    was kept when someone needs the inputs (a replay, a spot check)."""

    def __init__(self, entries: list[KeptInput] | None = None, reordered_at: int = -1):
        self.reordered_at = reordered_at  # the session's step whose reorder its rows took last
        self._since: list[torch.Tensor] = []  # the reorders noted since `entries` last applied them
        # each input with how many of those were noted before it was kept
        self._kept: list[tuple[KeptInput, int]] = [(e, 0) for e in entries or []]

    @property
    def entries(self) -> list[KeptInput]:
        """The inputs of positions [0, length), in order, each cut to what the session still holds."""
        return [e.cut() for e in self.steps]

    @property
    def steps(self) -> list[KeptInput]:
        """The steps as they were sent (whole, `held` saying where a later rewind cut them): what a replay sends."""
        if self._since:
            index, applied = {}, None  # k -> the rows, before the k-th noted reorder, that make today's
            for k in range(len(self._since) - 1, -1, -1):
                applied = self._since[k] if applied is None else self._since[k][applied]
                index[k] = applied
            self._kept = [(e if k == len(self._since) else e.rows(index[k]), 0) for e, k in self._kept]
            self._since = []
        return [e for e, _ in self._kept]

    @property
    def length(self) -> int:
        return self._kept[-1][0].end if self._kept else 0

    @property
    def nbytes(self) -> int:
        return sum(
            sum(t.nelement() * t.element_size() for t in (e.hidden, e.pending) if t is not None)
            for e in (e.cut() for e, _ in self._kept)
        )

    def add(self, entry: KeptInput) -> None:
        """Record a step; a step at an earlier position rewinds (the session forgets what came after it)."""
        if entry.position != self.length:  # the common case, the next step, needs no truncation
            self.truncate(entry.position)
        self._kept.append((entry, len(self._since)))

    def reorder(self, rows: torch.Tensor, step: int) -> None:
        """Row i becomes what row rows[i] was, as the session's step `step` asked (beam search: the server's
        cache rows moved likewise)."""
        self._since.append(rows)
        self.reordered_at = step

    def truncate(self, position: int) -> None:
        kept = []
        for e, k in self._kept:
            if e.end <= position:
                kept.append((e, k))
            elif e.position < position:
                kept.append((dataclasses.replace(e, held=position), k))
        self._kept = kept


class HopSession:
    """Blocks [start, end) of one session on one server. `returns_pending`: the boundary after its blocks lies
    inside a ladder region, so its replies carry p beside r."""

    def __init__(
        self,
        hop: Hop,
        batch_size: int,
        max_length: int,
        accept_push_from: str | None,
        tuning: Tuning = NO_TUNING,
        compression: str = "none",
        returns_pending: bool = False,
        release: Callable[[], None] | None = None,
    ):
        self.hop = hop
        # gives back its client's place on the server (`client.room.SessionPlaces`) when it closes, or when a
        # session its user never closed is collected (then soon after, on the client's loop, as the places are)
        self._release = release
        self._collected = (
            None if release is None else weakref.finalize(self, _on_loop, asyncio.get_running_loop(), release)
        )
        self.returns_pending = returns_pending
        self.compression = compression  # how the session's hidden states travel (wire.compression)
        self.tuning = tuning  # the session's adapter and deep prompts (this hop sends its blocks' share)
        self.batch_size = batch_size
        self.max_length = max_length
        self.accept_push_from = accept_push_from
        self.session_id = secrets.token_urlsafe(24)  # what the previous server must quote to push to us
        self.history = History()
        self.answered = False  # the server has answered a step: its session is open, pushes into it can land
        # why it failed, while it is closed and awaits a replacement (its replacement failed; see InferenceSession)
        self.failure: BaseException | None = None
        self._stream: Stream | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<hop [{self.start}, {self.end}) on {self.peer_id}>"

    @property
    def peer_id(self) -> str:
        return self.hop.peer_id

    @property
    def start(self) -> int:
        return self.hop.start

    @property
    def end(self) -> int:
        return self.hop.end

    async def open(self, conn: Connection, timeout_s: float, *, replay: bool = False) -> None:
        """Open the server's session (`replay`: it replaces a lost hop, and kept inputs will be replayed)."""
        opening = OpenSession(
            self.start,
            self.end,
            self.batch_size,
            self.max_length,
            self.session_id,
            self.accept_push_from,
            self.tuning.adapter,
            replay,
            self.compression,
        )
        self._stream = await conn.open_stream("inference", opening.to_message(), timeout=timeout_s)

    async def send(self, step: Step, timeout_s: float) -> None:
        step = dataclasses.replace(step, compression=self.compression)
        await self._stream.send(step.to_message(), timeout=timeout_s)

    async def recv(self, step: int, sent: torch.Tensor, timeout_s: float, position: int) -> StepReply:
        """This hop's reply to step number `step` (at `position`); replies to earlier steps (a push that arrived
        after the client had sent the input itself) are dropped."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    message = await self._stream.recv()
                    if push_failure(message) is not None:
                        continue  # about an earlier step, whose next hop replied after all
                    replied = reply_step(message, self.peer_id)
                    if replied is not None and replied > step:
                        raise BadReplyError(self.peer_id, f"a reply to step {replied}, expected step {step}")
                    if replied is None or replied == step:  # an in-band refusal carries no step number
                        reply = step_reply(message, self.peer_id, sent, position, self.returns_pending)
                        self.answered = True
                        return reply
        except TimeoutError:
            raise HopTimeoutError(
                f"server {self.peer_id} (blocks [{self.start}, {self.end})) did not answer step {step} "
                f"within {timeout_s:.1f} s"
            ) from None

    def watch(self, watcher: Watcher | None) -> None:
        """Show `watcher` what this hop's stream receives (`Stream.watch`) while the client waits on another hop."""
        self._stream.watch(watcher)

    async def replay(
        self, entries: list[KeptInput], timeout_s: float, reordered_at: int = -1
    ) -> list[KeptInput]:
        """Bring a fresh session to the state of the lost one: send every kept input as the step it was (all at
        once, so the replay costs the server's compute and one round trip), check every reply, keep the
        inputs (their rows as the session's step `reordered_at` reordered them last), and return this hop's
        outputs as the next hop's inputs."""
        try:
            async with asyncio.timeout(timeout_s):
                for e in entries:
                    prompts = self.prompts(e.position, e.hidden.shape[1])
                    step = Step(e.position, e.hidden, e.key_mask, step=0, prompts=prompts, pending=e.pending)
                    await self.send(step, timeout_s)
                outputs = []
                for e in entries:
                    reply = await self.recv(0, e.hidden, timeout_s, e.position)
                    outputs.append(KeptInput(e.position, reply.hidden, e.key_mask, reply.pending, e.held))
        except TimeoutError:
            raise HopTimeoutError(
                f"server {self.peer_id} (blocks [{self.start}, {self.end})) did not finish replaying "
                f"{len(entries)} steps within {timeout_s:.1f} s"
            ) from None
        self.history = History(entries, reordered_at)
        return outputs

    def prompts(self, position: int, length: int) -> torch.Tensor | None:
        """This hop's deep prompts for tokens [position, position + length), if any are prompt positions."""
        return self.tuning.hop_prompts(self.start, self.end, position, length)

    async def repoint(self, accept_push_from: str, timeout_s: float) -> None:
        """The previous hop was replaced: accept pushes from its replacement."""
        self.accept_push_from = accept_push_from
        await self._stream.send(Repoint(accept_push_from).to_message(), timeout=timeout_s)

    @property
    def is_open(self) -> bool:
        return self._stream is not None and not self._closed

    async def close(self) -> bool:
        """Close the server's session; whether it was open (its server frees its room). The client's place there
        goes back once the closing is sent (or at once, for a hop never opened)."""
        try:
            if not self.is_open:
                return False
            self._closed = True
            try:
                await self._stream.close()
            except WireError:
                pass  # the connection is already gone, and the server frees the session with it
            return True
        finally:
            if self._collected is not None and self._collected.detach() is not None:  # (once)
                self._release()
