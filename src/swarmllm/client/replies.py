"""Checks on what servers answer, in one place: a reply is hidden states of the shape that was sent, finite, for
the step that was asked; anything else is the server's fault (`BadReplyError`), except an in-band refusal of the
client's own input (`SessionError`)."""

from __future__ import annotations

import torch

from swarmllm.wire import Message
from swarmllm.wire.messages import StepReply
from swarmllm.wire.validation import all_finite


class BadReplyError(RuntimeError):
    """A server answered with something that is not the hidden states it was asked for."""

    def __init__(self, peer_id: str, problem: str):
        self.peer_id = peer_id
        super().__init__(f"server {peer_id} sent a bad reply: {problem}")


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
    if not hidden.is_floating_point() or hidden.shape != sent.shape:
        raise BadReplyError(peer_id, f"{hidden.dtype} {tuple(hidden.shape)}, expected {tuple(sent.shape)}")
    if not all_finite(hidden):
        raise BadReplyError(peer_id, "NaN or infinity")
    return hidden


def step_reply(message: Message, peer_id: str, sent: torch.Tensor) -> StepReply:
    """A session's reply to a step that sent `sent`; raises SessionError for an in-band refusal."""
    meta = message.meta
    if "error" in meta:
        error = meta["error"] if isinstance(meta["error"], dict) else {}
        raise SessionError(peer_id, str(error.get("code")), str(error.get("message")))
    step, position = meta.get("step"), meta.get("position")
    if not isinstance(step, int) or not isinstance(position, int):
        raise BadReplyError(peer_id, f"no step number or position in {sorted(meta)}")
    compute_s = meta.get("compute_s", 0.0)
    return StepReply(
        position,
        step,
        checked_hidden(message.tensors, peer_id, sent),
        float(compute_s) if isinstance(compute_s, int | float) else 0.0,
        meta.get("pushed") is True,
    )
