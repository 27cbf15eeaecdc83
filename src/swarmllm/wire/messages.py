"""The session and forward messages, typed and defined once, for the client, the server and server-to-server
pushes.

Each message is a dataclass with named fields and named tensors; `to_message()` lays it out as a wire `Message`
(msgpack metadata + a list of tensors: the positions of the tensors are fixed here and nowhere else), and
`parse()` reads it back, checking the structure (types, presence) and raising `RequestError("bad_request")`.
Range checks that depend on the receiver (its span, its limits, the session) stay with the receiver.

An inference stream carries: `OpenSession` (the opening), then `Step` and `Repoint` from the client (and `Step`
pushed by the previous server), answered by one `StepReply` per step, or an in-band `StepError`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from swarmllm.wire.connection import RequestError
from swarmllm.wire.framing import Message
from swarmllm.wire.validation import bad_request, check_count, get_int

STEP, REPOINT = "step", "repoint"


def _int(meta: dict[str, Any], name: str, default: int | None = None) -> int:
    if default is not None and name not in meta:
        return default
    return get_int(meta, name)


def _optional_str(meta: dict[str, Any], name: str) -> str | None:
    value = meta.get(name)
    if value is not None and not isinstance(value, str):
        raise bad_request(f"{name} must be a string, got {type(value).__name__}")
    return value


def _session_id(meta: dict[str, Any]) -> str | None:
    token = _optional_str(meta, "session_id")
    if token is not None and not 16 <= len(token) <= 128:
        raise bad_request("session_id must be a string of 16 to 128 characters")
    return token


@dataclass(frozen=True)
class OpenSession:
    """Opens an inference session over blocks [start, end): the server reserves batch_size x max_length cache
    tokens. `session_id` is the client's secret name for it (what a push must quote), `accept_push_from` the one
    peer allowed to push into it. `replay`: the session takes over a failed server's blocks, and its first steps
    replay what that server had computed (the server only counts these, for its metrics)."""

    start: int
    end: int
    batch_size: int
    max_length: int
    session_id: str | None = None
    accept_push_from: str | None = None
    replay: bool = False

    def to_message(self) -> Message:
        meta = {
            "start": self.start,
            "end": self.end,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
        }
        if self.session_id is not None:
            meta["session_id"] = self.session_id
        if self.accept_push_from is not None:
            meta["accept_push_from"] = self.accept_push_from
        if self.replay:
            meta["replay"] = True
        return Message(meta)

    @classmethod
    def parse(cls, message: Message) -> OpenSession:
        meta = message.meta
        return cls(
            _int(meta, "start"),
            _int(meta, "end"),
            _int(meta, "batch_size"),
            _int(meta, "max_length"),
            _session_id(meta),
            _optional_str(meta, "accept_push_from"),
            meta.get("replay") is True,
        )


@dataclass(frozen=True)
class PushTarget:
    """A later hop of the client's chain: the server to push to and the session's secret there."""

    peer_id: str
    session_id: str

    def to_meta(self) -> dict[str, str]:
        return {"peer_id": self.peer_id, "session_id": self.session_id}


@dataclass
class Step:
    """Tokens [position, position + T) of a session: their hidden states (and, with left padding, which of
    them are real tokens). `push` lists the hops after the receiver, for server-to-server pushes;
    `push_timeout_s` bounds the receiver's push so that its reply to the client is never later than that."""

    position: int
    hidden: torch.Tensor
    key_mask: torch.Tensor | None = None
    step: int = 0
    push: list[PushTarget] = field(default_factory=list)
    push_timeout_s: float | None = None
    session_id: str | None = None  # set in a push: which of the receiver's sessions it is for

    def to_message(self) -> Message:
        meta: dict[str, Any] = {"kind": STEP, "position": self.position, "step": self.step}
        if self.push:
            meta["push"] = [target.to_meta() for target in self.push]
            if self.push_timeout_s is not None:
                meta["push_timeout_s"] = self.push_timeout_s
        if self.session_id is not None:
            meta["session_id"] = self.session_id
        tensors = [self.hidden] if self.key_mask is None else [self.hidden, self.key_mask]
        return Message(meta, tensors)

    @classmethod
    def parse(cls, message: Message) -> Step:
        meta = message.meta
        check_count(message.tensors, 1, 2, "an inference step")
        push = meta.get("push") or []
        if not isinstance(push, list) or not all(
            isinstance(h, dict) and isinstance(h.get("peer_id"), str) and isinstance(h.get("session_id"), str)
            for h in push
        ):
            raise bad_request("push must be a list of {peer_id, session_id} strings")
        timeout = meta.get("push_timeout_s")
        if timeout is not None and (not isinstance(timeout, int | float) or isinstance(timeout, bool)):
            raise bad_request("push_timeout_s must be a number")
        return cls(
            position=_int(meta, "position"),
            hidden=message.tensors[0],
            key_mask=message.tensors[1] if len(message.tensors) > 1 else None,
            step=_int(meta, "step", 0),
            push=[PushTarget(h["peer_id"], h["session_id"]) for h in push],
            push_timeout_s=None if timeout is None else float(timeout),
            session_id=_session_id(meta),
        )


@dataclass(frozen=True)
class Repoint:
    """From now on, the session accepts pushes from this peer instead (the previous hop was replaced)."""

    accept_push_from: str

    def to_message(self) -> Message:
        return Message({"kind": REPOINT, "accept_push_from": self.accept_push_from})

    @classmethod
    def parse(cls, message: Message) -> Repoint:
        peer = _optional_str(message.meta, "accept_push_from")
        if peer is None:
            raise bad_request("a repoint needs accept_push_from")
        return cls(peer)


def parse_session_input(message: Message) -> Step | Repoint:
    """What a client (or the previous server) sent into a session."""
    kind = message.meta.get("kind", STEP)
    if kind == STEP:
        return Step.parse(message)
    if kind == REPOINT:
        return Repoint.parse(message)
    raise bad_request(f"unknown session message kind {kind!r}")


@dataclass(frozen=True)
class StepReply:
    """A session's answer to one step: the output hidden states, the server's compute time (so a hop's time can
    be split into network and compute), and whether it pushed the output on to the next hop itself."""

    position: int
    step: int
    hidden: torch.Tensor
    compute_s: float = 0.0
    pushed: bool = False

    def to_message(self) -> Message:
        meta = {
            "position": self.position,
            "step": self.step,
            "compute_s": self.compute_s,
            "pushed": self.pushed,
        }
        return Message(meta, [self.hidden])


@dataclass(frozen=True)
class StepError:
    """An in-band refusal of one step (bad input); the session stays usable."""

    code: str
    message: str

    def to_message(self) -> Message:
        return Message({"error": {"code": self.code, "message": self.message}})

    @classmethod
    def from_request_error(cls, error: RequestError) -> StepError:
        return cls(error.code, error.message)


@dataclass(frozen=True)
class ForwardRequest:
    """A plain forward over blocks [start, end), no cache."""

    start: int
    end: int
    hidden: torch.Tensor
    key_mask: torch.Tensor | None = None

    def to_message(self) -> Message:
        tensors = [self.hidden] if self.key_mask is None else [self.hidden, self.key_mask]
        return Message({"start": self.start, "end": self.end}, tensors)

    @classmethod
    def parse(cls, message: Message) -> ForwardRequest:
        check_count(message.tensors, 1, 2, "forward")
        return cls(
            _int(message.meta, "start"),
            _int(message.meta, "end"),
            message.tensors[0],
            message.tensors[1] if len(message.tensors) > 1 else None,
        )
