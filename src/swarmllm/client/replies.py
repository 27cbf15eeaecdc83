"""Checks on what servers answer, in one place: a reply is hidden states of the shape that was sent, finite, for
the step and position that were asked (with a ladder checkpoint's pending output p exactly where the hop's last
boundary carries the pair (r, p), of the same shape); anything else is the server's fault (`BadReplyError`),
except an in-band refusal of the client's own input (`SessionError`). Every field a server sends is checked here
before the client reads it, and every error names the server, so nothing a server sends makes the client fail
with anything else.
"""

from __future__ import annotations

import math

import torch

from swarmllm.wire import Message, RequestError
from swarmllm.wire.messages import PUSH_FAILED, BackwardReply, ForwardReply, StepReply
from swarmllm.wire.validation import FLOAT_DTYPES, all_finite


class BadReplyError(RuntimeError):
    """A server answered with something that is not the hidden states it was asked for."""

    def __init__(self, peer_id: str, problem: str):
        self.peer_id = peer_id
        super().__init__(f"server {peer_id} sent a bad reply: {problem}")


class CorruptOutputError(BadReplyError):
    """A spot check found a server's output wrong: other servers computing the same blocks on the same inputs
    disagree with it beyond the tolerance of their dtypes (see `client.verify`)."""


class SessionError(RuntimeError):
    """A server refused a step of a session (answered in-band); the session is still usable."""

    def __init__(self, peer_id: str, code: str, message: str):
        self.peer_id, self.code = peer_id, code
        super().__init__(f"server {peer_id} refused the step ({code}): {message}")


def checked_hidden(tensors: list[torch.Tensor], peer_id: str, sent: torch.Tensor) -> torch.Tensor:
    """The hidden states in a server's reply: one floating tensor of the shape that was sent, all finite."""
    if not tensors:
        raise BadReplyError(peer_id, "no tensor")
    hidden = tensors[0]
    if hidden.dtype not in FLOAT_DTYPES or hidden.shape != sent.shape:
        raise BadReplyError(peer_id, f"{hidden.dtype} {tuple(hidden.shape)}, expected {tuple(sent.shape)}")
    if not all_finite(hidden):
        raise BadReplyError(peer_id, "NaN or infinity")
    return hidden


def checked_pending(
    pending: torch.Tensor | None, peer_id: str, sent: torch.Tensor, expected: bool, name: str = "pending"
) -> torch.Tensor | None:
    """A reply's `name` (a ladder pair's p, or its gradient): present exactly when `expected`, then of the shape
    of `sent`, finite."""
    if (pending is not None) != expected:
        state = "the pair (r, p)" if expected else "r alone"
        raise BadReplyError(peer_id, f"{name} {'missing' if expected else 'sent'} where the state is {state}")
    return None if pending is None else checked_hidden([pending], peer_id, sent)


def checked_forward(message: Message, peer_id: str, sent: torch.Tensor, pending: bool) -> ForwardReply:
    """A forward's reply: hidden states of the shape sent, and p exactly when `pending` (the hop's last boundary
    carries the ladder pair)."""
    try:
        reply = ForwardReply.parse(message)
    except RequestError as e:
        raise BadReplyError(peer_id, e.message) from None
    return ForwardReply(
        checked_hidden([reply.hidden], peer_id, sent), checked_pending(reply.pending, peer_id, sent, pending)
    )


def checked_gradients(
    message: Message,
    peer_id: str,
    hidden: torch.Tensor,
    prompts: torch.Tensor | None,
    lora_shapes: dict[str, tuple[int, ...]] | None,
    pending: torch.Tensor | None = None,
) -> BackwardReply:
    """A backward's reply: gradients of the shapes sent, finite (of p too where `pending`, the input p, was
    sent), and, when `lora_shapes` asks for them, of exactly those adapter tensors."""
    try:
        reply = BackwardReply.parse(message)
    except RequestError as e:
        raise BadReplyError(peer_id, e.message) from None
    checked_hidden([reply.grad_hidden], peer_id, hidden)
    checked_pending(reply.grad_pending, peer_id, hidden, pending is not None, "grad_pending")
    if (prompts is None) != (reply.grad_prompts is None):
        raise BadReplyError(peer_id, "prompt gradients do not match the prompts sent")
    if prompts is not None:
        checked_hidden([reply.grad_prompts], peer_id, prompts)
    got = {name: tuple(t.shape) for name, t in reply.grad_lora.items()}
    if got != (lora_shapes or {}):
        raise BadReplyError(peer_id, f"adapter gradients {sorted(got)[:3]} are not those asked for")
    if any(t.dtype not in FLOAT_DTYPES or not all_finite(t) for t in reply.grad_lora.values()):
        raise BadReplyError(peer_id, "adapter gradients with NaN, infinity or no float dtype")
    return reply


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def reply_step(message: Message, peer_id: str) -> int | None:
    """The step number a session's reply answers (None: an in-band refusal, which answers the current step)."""
    meta = message.meta
    if "error" in meta:
        return None
    step = meta.get("step")
    if not _is_int(step):
        raise BadReplyError(peer_id, f"a step reply without a step number ({_short(step)})")
    return step


def push_failure(message: Message) -> int | None:
    """The step whose push failed, when a session's message is a `PushFailed` notice (else None)."""
    meta = message.meta
    if meta.get("kind") != PUSH_FAILED:
        return None
    return meta.get("step") if _is_int(meta.get("step")) else -1


def step_reply(
    message: Message, peer_id: str, sent: torch.Tensor, position: int | None = None, pending: bool = False
) -> StepReply:
    """A session's reply to a step that sent `sent` (at `position`, when given), with p exactly when `pending`
    (the hop's last boundary carries the ladder pair); raises SessionError for an in-band refusal."""
    meta = message.meta
    if "error" in meta:
        error = meta["error"]
        if not isinstance(error, dict) or not all(isinstance(error.get(k), str) for k in ("code", "message")):
            raise BadReplyError(peer_id, f"a malformed error: {_short(error)}")
        raise SessionError(peer_id, error["code"][:100], error["message"][:1000])
    step, replied_at = reply_step(message, peer_id), meta.get("position")
    if not _is_int(replied_at) or (position is not None and replied_at != position):
        raise BadReplyError(peer_id, f"a reply for position {_short(replied_at)}, expected {position}")
    compute_s = meta.get("compute_s", 0.0)
    if isinstance(compute_s, bool) or not isinstance(compute_s, int | float) or not 0 <= compute_s < math.inf:
        raise BadReplyError(peer_id, f"compute_s {_short(compute_s)} is not a duration")
    copied = meta.get("copied", 0)
    if not _is_int(copied) or not 0 <= copied <= sent.shape[1]:
        raise BadReplyError(peer_id, f"copied {_short(copied)} is not a count of the step's positions")
    try:
        hidden, p = StepReply.states(message)  # float32 again, when the session compresses activations
    except RequestError as e:
        raise BadReplyError(peer_id, e.message) from None
    return StepReply(
        replied_at,
        step,
        checked_hidden([hidden], peer_id, sent),
        float(compute_s),
        meta.get("pushed") is True,
        pending=checked_pending(p, peer_id, sent, pending),
        copied=copied,
    )


def _short(value: object) -> str:
    """A peer's value, cut short for an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
