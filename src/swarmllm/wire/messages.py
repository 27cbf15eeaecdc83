"""The session and forward messages, typed and defined once, for the client, the server and server-to-server
pushes.

Each message is a dataclass with named fields and named tensors; `to_message()` lays it out as a wire `Message`
(msgpack metadata + a list of tensors: the positions of the tensors are fixed here and nowhere else), and
`parse()` reads it back, checking the structure (types, presence) and raising `RequestError("bad_request")`.
Range checks that depend on the receiver (its span, its limits, the session) stay with the receiver.

An inference stream carries: `OpenSession` (the opening), then `Step` and `Repoint` from the client (and `Step`
pushed by the previous server, whole or, where it prefilled a long step in chunks, in parts that name the whole
step's positions; a one-token step may first reorder the session's rows, for beam search), answered by one
`StepReply` per step, or an in-band `StepError`, and, rarely, a
`PushFailed` after a reply that said its output was pushed on. The opening
names the session's activation compression (`wire.compression`): every step, push and reply of the session carries
its hidden states in that form (blockwise8: int8 codes as `hidden`, plus `hidden_scales`); `parse` gives them back
as float32.
A client whose opening was refused room asks the unary `room` (`RoomQuery`, answered by a `RoomReply` once there
is room or the wait is up) before it opens again. A server asks its peers the unary `reach` (`ReachQuery`, answered
by a `ReachReply`) to learn whether its announced direct address can be dialled.

Ladder Residual (`models.ladder`): where a hop's boundary lies inside a ladder region, the state crossing it is the
pair (r, p). The forward-side messages and their replies then carry `pending` (p, [B, T, H] like `hidden`, and
compressed like it in a session: `pending_scales`) beside `hidden` (r), and a backward `grad_pending` with its
gradient; a standard model's messages never carry it, and their layout is unchanged. Which boundaries carry p
depends on the checkpoint only: the receiver checks presence against its own config.

Fine-tuning adds: `BackwardRequest` / `BackwardReply` (a unary `backward` over a span), an `adapters` stream whose
messages are `AdapterUpload`s (a client's LoRA weights, once per version) answered by `AdapterAck`, and on the
forward-side messages an `AdapterRef` (which adapter applies), deep `prompts` and a `dropout_seed`. Tensors beyond
the hidden states and key mask travel by name (the meta's `tensors` list); many small tensors (an adapter's A/B
matrices, their gradients) travel as one flat tensor plus a manifest of names and shapes (`pack_tensors`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from swarmllm.wire.compression import CODECS, compress, decompress, scale_blocks
from swarmllm.wire.connection import RequestError
from swarmllm.wire.framing import Message
from swarmllm.wire.validation import bad_request, check_count, get_int

STEP, REPOINT, PUSH_FAILED = "step", "repoint", "push_failed"
STEP_TENSORS = ("hidden", "key_mask", "prompts", "hidden_scales", "pending", "pending_scales")
FORWARD_TENSORS = ("hidden", "key_mask", "prompts", "pending", "hidden_scales", "pending_scales")
BACKWARD_TENSORS = (
    *("hidden", "grad", "key_mask", "prompts", "pending", "grad_pending"),
    *("hidden_scales", "grad_scales", "pending_scales", "grad_pending_scales"),
)
MAX_PACKED_TENSORS = 4096  # named tensors in one flat tensor (an adapter: layers x modules x 2)
_NAME = r"[A-Za-z0-9_.-]{1,128}"  # an adapter's (a folder's, as `save_pretrained("my-adapter")` names it) or a tensor's
NAME_RULE = "1 to 128 letters, digits, '_', '-' or '.'"


def valid_name(name: object) -> bool:
    """Whether `name` may name an adapter (or a packed tensor) on the wire: what clients and servers check
    before one travels, so that no peer refuses it."""
    return isinstance(name, str) and re.fullmatch(_NAME, name) is not None


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


def _optional_int(meta: dict[str, Any], name: str) -> int | None:
    return None if meta.get(name) is None else get_int(meta, name)


def _codec(meta: dict[str, Any]) -> str:
    codec = meta.get("compression", "none")
    if codec not in CODECS:
        raise bad_request(f"compression must be one of {list(CODECS)}, got {str(codec)[:40]!r}")
    return codec


def _hidden(
    values: torch.Tensor, scales: torch.Tensor | None, what: str, name: str = "hidden"
) -> torch.Tensor:
    """Hidden states as float32 from their wire form: as sent, or blockwise8 codes [..., H] (int8) with their
    bfloat16 scales [..., ceil(H / BLOCK)]. Checks that the two fit each other; the receiver checks the shape."""
    if scales is None:
        if values.dtype == torch.int8:
            raise bad_request(f"{what}: int8 {name} states need {name}_scales")
        return values
    if values.dtype != torch.int8 or scales.dtype != torch.bfloat16 or values.ndim != 3:
        raise bad_request(f"{what}: blockwise8 {name} states are int8 [B, T, H] with bfloat16 scales")
    if scales.shape != (*values.shape[:-1], scale_blocks(values.shape[-1])):
        raise bad_request(f"{what}: scales of shape {tuple(scales.shape)} do not fit {tuple(values.shape)}")
    return decompress(values, scales)


def _state(tensors: dict[str, torch.Tensor], what: str, name: str) -> torch.Tensor | None:
    """A message's optional state `name` (a ladder pair's p, a gradient) from its wire form, like `_hidden`."""
    if name not in tensors:
        if f"{name}_scales" in tensors:
            raise bad_request(f"{what}: {name}_scales without {name}")
        return None
    return _hidden(tensors[name], tensors.get(f"{name}_scales"), what, name)


def _pending(tensors: dict[str, torch.Tensor], what: str) -> torch.Tensor | None:
    """A ladder message's pending output p (as float32, like `_hidden`), or None when it carries r alone."""
    return _state(tensors, what, "pending")


def _wire(states: dict[str, torch.Tensor | None], codec: str) -> dict[str, torch.Tensor | None]:
    """Named states (None = absent) in a codec's wire form: each as its values, then all the scales (blockwise8),
    each named `<name>_scales`."""
    values: dict[str, torch.Tensor | None] = {}
    scales: dict[str, torch.Tensor | None] = {}
    for name, state in states.items():
        values[name], scales[f"{name}_scales"] = (None, None) if state is None else compress(state, codec)
    return {**values, **scales}


def _compressed(
    hidden: torch.Tensor, pending: torch.Tensor | None, codec: str
) -> dict[str, torch.Tensor | None]:
    """hidden (and p, when the message carries one) in the session's wire form, named."""
    wire = _wire({"hidden": hidden, "pending": pending}, codec)
    return {name: wire[name] for name in ("hidden", "hidden_scales", "pending", "pending_scales")}


def _codec_meta(codec: str) -> dict[str, str]:
    """What a request says of its codec (nothing for "none", the layout older peers send)."""
    return {} if codec == "none" else {"compression": codec}


def _tensors(message: Message, allowed: tuple[str, ...], what: str) -> dict[str, torch.Tensor]:
    """A message's tensors by name: the meta's `tensors` list names them in order; without it they are
    positional, the first names of `allowed` (the layout older messages had)."""
    names = message.meta.get("tensors")
    if names is None:
        names = list(allowed[: len(message.tensors)])
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise bad_request(f"{what}: tensors must be a list of names")
    if len(set(names)) != len(names) or not set(names) <= set(allowed) or len(names) != len(message.tensors):
        raise bad_request(f"{what}: tensor names {names[:8]} do not match its {len(message.tensors)} tensors")
    return dict(zip(names, message.tensors, strict=True))


def _message(meta: dict[str, Any], named: dict[str, torch.Tensor | None], positional: int = 2) -> Message:
    """Lay out named tensors (None = absent); positional when only the first `positional` may be present."""
    present = {name: t for name, t in named.items() if t is not None}
    if not set(present) <= set(list(named)[:positional]) or list(present) != list(named)[: len(present)]:
        meta = {**meta, "tensors": list(present)}
    return Message(meta, list(present.values()))


def pack_tensors(named: dict[str, torch.Tensor]) -> tuple[list[list], torch.Tensor]:
    """Many named tensors of one dtype as (manifest [[name, shape], ...], one flat tensor), for the wire."""
    manifest = [[name, list(t.shape)] for name, t in named.items()]
    flat = torch.cat([t.detach().reshape(-1) for t in named.values()]) if named else torch.zeros(0)
    return manifest, flat


def unpack_tensors(manifest: Any, flat: torch.Tensor, what: str) -> dict[str, torch.Tensor]:
    """`pack_tensors` undone, checking the manifest's structure and that its sizes add up to the tensor's."""
    if not isinstance(manifest, list) or len(manifest) > MAX_PACKED_TENSORS:
        raise bad_request(f"{what}: the manifest must be a list of at most {MAX_PACKED_TENSORS} entries")
    if flat.ndim != 1:
        raise bad_request(f"{what}: packed tensors must be one flat tensor, got shape {tuple(flat.shape)}")
    shapes, names = [], set()
    for entry in manifest:
        ok = (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and isinstance(entry[1], list)
        )
        if not ok or not valid_name(entry[0]) or entry[0] in names:
            raise bad_request(f"{what}: bad manifest entry {str(entry)[:80]}")
        if len(entry[1]) > 4 or not all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in entry[1]
        ):
            raise bad_request(f"{what}: bad shape for {entry[0]}: {str(entry[1])[:80]}")
        names.add(entry[0])
        shapes.append(entry[1])
    sizes = [math.prod(shape) for shape in shapes]
    if sum(sizes) != flat.numel():
        raise bad_request(
            f"{what}: the manifest describes {sum(sizes)} values, the tensor holds {flat.numel()}"
        )
    return {
        entry[0]: part.view(shape)
        for entry, part, shape in zip(manifest, flat.split(sizes), shapes, strict=True)
    }


@dataclass(frozen=True)
class AdapterRef:
    """Which adapter applies to a request: a client's own (by the name it chose and the version it uploaded on
    its `adapters` stream) or, with no version, one the server hosts (`--adapters`)."""

    name: str
    version: int | None = None

    def to_meta(self) -> dict[str, Any]:
        return {"name": self.name} if self.version is None else {"name": self.name, "version": self.version}

    @classmethod
    def parse(cls, meta: dict[str, Any]) -> AdapterRef | None:
        value = meta.get("adapter")
        if value is None:
            return None
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            raise bad_request("adapter must be {name, version?}")
        if not valid_name(value["name"]):
            raise bad_request(f"an adapter's name is {NAME_RULE}")
        return cls(value["name"], _optional_int(value, "version"))


def _adapter_meta(adapter: AdapterRef | None) -> dict[str, Any]:
    return {} if adapter is None else {"adapter": adapter.to_meta()}


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
    adapter: AdapterRef | None = None  # applies to every step of the session
    replay: bool = False
    compression: str = "none"  # how the session's hidden states travel (wire.compression.CODECS)

    def to_message(self) -> Message:
        meta = {
            "start": self.start,
            "end": self.end,
            "batch_size": self.batch_size,
            "max_length": self.max_length,
            **_adapter_meta(self.adapter),
        }
        if self.compression != "none":
            meta["compression"] = self.compression
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
            AdapterRef.parse(meta),
            meta.get("replay") is True,
            _codec(meta),
        )


@dataclass(frozen=True)
class RoomQuery:
    """Whether the server would open a session like this one (`OpenSession`'s span and size) for the asking peer
    now, waiting up to `wait_s` (capped by the server) for room to come free: what a client that was refused room
    asks instead of pausing, so that it asks again as soon as any session there ends."""

    start: int
    end: int
    batch_size: int
    max_length: int
    wait_s: float = 0.0

    def to_message(self) -> Message:
        return Message(
            {
                "start": self.start,
                "end": self.end,
                "batch_size": self.batch_size,
                "max_length": self.max_length,
                "wait_s": self.wait_s,
            }
        )

    @classmethod
    def parse(cls, message: Message) -> RoomQuery:
        meta = message.meta
        wait_s = meta.get("wait_s", 0.0)
        if not isinstance(wait_s, int | float) or isinstance(wait_s, bool) or not math.isfinite(wait_s):
            raise bad_request("wait_s must be a finite number")
        return cls(
            _int(meta, "start"), _int(meta, "end"), _int(meta, "batch_size"), _int(meta, "max_length"), wait_s
        )


@dataclass(frozen=True)
class RoomReply:
    """The answer to a `RoomQuery`: whether there is room now, else the refusal an opening would get."""

    room: bool
    why: str = ""

    def to_message(self) -> Message:
        return Message({"room": self.room, "why": self.why[:200]})

    @classmethod
    def parse(cls, message: Message) -> RoomReply:
        room, why = message.meta.get("room"), message.meta.get("why", "")
        if not isinstance(room, bool) or not isinstance(why, str):
            raise bad_request("a room reply needs room (a bool) and why (a string)")
        return cls(room, why)


@dataclass(frozen=True)
class ReachQuery:
    """Asks a server to dial the asking peer back at `addr`, the direct address it would announce, or, with
    `port` instead, at that port of the address the server sees the asking peer's connection come from (a server
    that does not know its public address): whether others can reach it there (`server.reachability`)."""

    addr: str | None = None
    port: int | None = None

    def to_message(self) -> Message:
        return Message({"addr": self.addr} if self.addr is not None else {"port": self.port})

    @classmethod
    def parse(cls, message: Message) -> ReachQuery:
        addr, port = message.meta.get("addr"), message.meta.get("port")
        if (addr is None) == (port is None):
            raise bad_request("a reach query names an address (addr) or a port, one of them")
        if addr is not None and (not isinstance(addr, str) or not _host_port(addr)):
            raise bad_request(
                "addr must be host:port, a host of at most 253 characters and a port in 1-65535"
            )
        if port is not None and (not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536):
            raise bad_request("port must be a port number, 1-65535")
        return cls(addr, port)


@dataclass(frozen=True)
class ReachReply:
    """The answer to a `ReachQuery`: whether the asking peer answered at `addr` (the address dialled) and proved its
    id there."""

    reached: bool
    addr: str

    def to_message(self) -> Message:
        return Message({"reached": self.reached, "addr": self.addr})

    @classmethod
    def parse(cls, message: Message) -> ReachReply:
        reached, addr = message.meta.get("reached"), message.meta.get("addr")
        if not isinstance(reached, bool) or not isinstance(addr, str) or not _host_port(addr):
            raise bad_request("a reach reply needs reached (a bool) and addr (host:port)")
        return cls(reached, addr)


def _host_port(addr: str) -> bool:
    host, _, port = addr.rpartition(":")
    return (
        0 < len(host) <= 253
        and 0 < len(port) <= 5
        and port.isascii()
        and port.isdigit()
        and 0 < int(port) < 65536
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
    prompts: torch.Tensor | None = None  # [blocks, B or 1, P, H]: deep prompts for the first P positions
    compression: str = "none"  # how `hidden` travels (the session's codec); parse gives it back as float32
    pending: torch.Tensor | None = None  # [B, T, H]: p, where the receiver's first boundary carries (r, p)
    # set in a push that carries part of a step (the previous server prefilled it in chunks): the whole step's
    # positions [start, end); the receiver replies to the client once it has computed the part that ends it
    whole: tuple[int, int] | None = None
    # beam search: before this one-token step, row i of the session's cache becomes what row reorder[i] held (the
    # beams kept, each continuing one of the previous step's); pushed on with the step, so every hop applies it once
    reorder: tuple[int, ...] | None = None

    def to_message(self) -> Message:
        meta: dict[str, Any] = {"kind": STEP, "position": self.position, "step": self.step}
        if self.whole is not None:
            meta["whole"] = list(self.whole)
        if self.reorder is not None:
            meta["reorder"] = list(self.reorder)
        if self.push:
            meta["push"] = [target.to_meta() for target in self.push]
            if self.push_timeout_s is not None:
                meta["push_timeout_s"] = self.push_timeout_s
        if self.session_id is not None:
            meta["session_id"] = self.session_id
        wire = _compressed(self.hidden, self.pending, self.compression)
        named = {
            "hidden": wire["hidden"],
            "key_mask": self.key_mask,
            "prompts": self.prompts,
            "hidden_scales": wire["hidden_scales"],
            "pending": wire["pending"],
            "pending_scales": wire["pending_scales"],
        }
        return _message(meta, named)

    @classmethod
    def parse(cls, message: Message) -> Step:
        meta = message.meta
        check_count(message.tensors, 1, len(STEP_TENSORS), "an inference step")
        tensors = _tensors(message, STEP_TENSORS, "an inference step")
        if "hidden" not in tensors:
            raise bad_request("an inference step needs hidden states")
        push = meta.get("push") or []
        if not isinstance(push, list) or not all(
            isinstance(h, dict) and isinstance(h.get("peer_id"), str) and isinstance(h.get("session_id"), str)
            for h in push
        ):
            raise bad_request("push must be a list of {peer_id, session_id} strings")
        timeout = meta.get("push_timeout_s")
        if timeout is not None and (
            not isinstance(timeout, int | float) or isinstance(timeout, bool) or math.isnan(timeout)
        ):
            raise bad_request("push_timeout_s must be a number")
        step = _int(meta, "step", 0)
        if step < 0:
            raise bad_request(f"step must be >= 0, got {step}")
        position = _int(meta, "position")
        hidden = _hidden(tensors["hidden"], tensors.get("hidden_scales"), "an inference step")
        whole, reorder = meta.get("whole"), meta.get("reorder")
        if (whole is not None or reorder is not None) and hidden.ndim != 3:
            raise bad_request(
                f"an inference step's hidden states are [batch, tokens, hidden], got {hidden.ndim}-d"
            )
        if whole is not None:
            if not (isinstance(whole, list) and len(whole) == 2 and all(type(x) is int for x in whole)):
                raise bad_request("whole must be [start, end], two integers")
            if not whole[0] <= position < position + hidden.shape[1] <= whole[1]:
                raise bad_request(
                    f"a part at positions {position}+{hidden.shape[1]} lies outside its step {whole}"
                )
            whole = (whole[0], whole[1])
        if reorder is not None:
            batch = hidden.shape[0]
            if not (isinstance(reorder, list) and all(type(x) is int and 0 <= x < batch for x in reorder)):
                raise bad_request(f"reorder must be a list of row numbers in [0, {batch})")
            if len(reorder) != batch or hidden.shape[1] != 1 or whole is not None:
                raise bad_request("reorder comes with a one-token step, a row number for each of its rows")
            reorder = tuple(reorder)
        return cls(
            position=position,
            hidden=hidden,
            key_mask=tensors.get("key_mask"),
            step=step,
            push=[PushTarget(h["peer_id"], h["session_id"]) for h in push],
            push_timeout_s=None if timeout is None else float(timeout),
            session_id=_session_id(meta),
            prompts=tensors.get("prompts"),
            pending=_pending(tensors, "an inference step"),
            whole=whole,
            reorder=reorder,
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


@dataclass(frozen=True)
class PushFailed:
    """Server -> client, on the session's stream, after the reply to `step` (which said `pushed`): the push of
    that step's output to the next hop failed, so the client must send it there itself. A server replies as
    soon as its push is sent, and a push is never acked (`Connection.notify`); this notice is the rare way back."""

    step: int
    reason: str = ""

    def to_message(self) -> Message:
        return Message({"kind": PUSH_FAILED, "step": self.step, "reason": self.reason[:200]})


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
    """A session's answer to one step: the output hidden states (and p where the span's last boundary carries
    the ladder pair), the server's compute time (so a hop's time can be split into network and compute),
    whether it pushed the output on to the next hop itself, and how many of the step's positions it copied from
    its prefix cache instead of computing them (`server.prefix`)."""

    position: int
    step: int
    hidden: torch.Tensor
    compute_s: float = 0.0
    pushed: bool = False
    compression: str = "none"  # how `hidden` travels (the session's codec)
    pending: torch.Tensor | None = None
    copied: int = 0

    def to_message(self) -> Message:
        meta = {
            "position": self.position,
            "step": self.step,
            "compute_s": self.compute_s,
            "pushed": self.pushed,
        }
        if self.copied:  # (absent from decode steps: they copy nothing)
            meta["copied"] = self.copied
        return _message(meta, _compressed(self.hidden, self.pending, self.compression), positional=1)

    @staticmethod
    def states(message: Message) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A reply's hidden states and p (None if absent) as float32 (from blockwise8) or as sent; raises
        RequestError("bad_request") for a malformed layout (the client turns it into a BadReplyError)."""
        names = ("hidden", "hidden_scales", "pending", "pending_scales")
        tensors = _tensors(message, names, "a step reply")
        if "hidden" not in tensors:
            raise bad_request("a step reply needs hidden states")
        hidden = _hidden(tensors["hidden"], tensors.get("hidden_scales"), "a step reply")
        return hidden, _pending(tensors, "a step reply")


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
    """A plain forward over blocks [start, end), no cache; optionally with deep prompts for the first P positions
    ([blocks, B or 1, P, H]), an adapter, and (a training forward) the seed of the adapter's dropout masks.
    `pending`: p, where boundary `start` carries the ladder pair."""

    start: int
    end: int
    hidden: torch.Tensor
    key_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    adapter: AdapterRef | None = None
    dropout_seed: int | None = None
    pending: torch.Tensor | None = None
    compression: str = "none"  # how the states travel, both ways (wire.compression)

    def to_message(self) -> Message:
        meta = {
            "start": self.start,
            "end": self.end,
            **_adapter_meta(self.adapter),
            **_codec_meta(self.compression),
        }
        if self.dropout_seed is not None:
            meta["dropout_seed"] = self.dropout_seed
        wire = _wire({"hidden": self.hidden, "pending": self.pending}, self.compression)
        named = {"hidden": wire["hidden"], "key_mask": self.key_mask, "prompts": self.prompts, **wire}
        return _message(meta, named)

    @classmethod
    def parse(cls, message: Message) -> ForwardRequest:
        check_count(message.tensors, 1, len(FORWARD_TENSORS), "forward")
        tensors = _tensors(message, FORWARD_TENSORS, "forward")
        if "hidden" not in tensors:
            raise bad_request("forward needs hidden states")
        meta = message.meta
        return cls(
            _int(meta, "start"),
            _int(meta, "end"),
            _state(tensors, "forward", "hidden"),
            tensors.get("key_mask"),
            tensors.get("prompts"),
            AdapterRef.parse(meta),
            _optional_int(meta, "dropout_seed"),
            _state(tensors, "forward", "pending"),
            _codec(meta),
        )


@dataclass(frozen=True)
class ForwardReply:
    """A forward's output: the hidden states, and p where boundary `end` carries the ladder pair."""

    hidden: torch.Tensor
    pending: torch.Tensor | None = None
    compression: str = "none"  # the request's codec

    def to_message(self) -> Message:
        return _message(
            {}, _wire({"hidden": self.hidden, "pending": self.pending}, self.compression), positional=1
        )

    @classmethod
    def parse(cls, message: Message) -> ForwardReply:
        """Raises RequestError("bad_request") for a malformed reply (the client turns it into a BadReplyError)."""
        tensors = _tensors(
            message, ("hidden", "pending", "hidden_scales", "pending_scales"), "a forward reply"
        )
        if "hidden" not in tensors:
            raise bad_request("a forward reply needs hidden states")
        return cls(
            _state(tensors, "a forward reply", "hidden"), _state(tensors, "a forward reply", "pending")
        )


@dataclass(frozen=True)
class BackwardRequest:
    """The gradient of a span's inputs given its inputs `hidden` and the gradient `grad` of its outputs: the
    server recomputes the forward (with the same prompts, adapter and dropout seed as the forward it answers)
    with autograd. `lora_grads`: also return the gradients of the client's adapter's A/B matrices. Inside a
    ladder region, `pending` is the input p (boundary `start` carries the pair) and `grad_pending` the gradient
    of the output p (boundary `end` does)."""

    start: int
    end: int
    hidden: torch.Tensor
    grad: torch.Tensor
    key_mask: torch.Tensor | None = None
    prompts: torch.Tensor | None = None
    adapter: AdapterRef | None = None
    dropout_seed: int | None = None
    lora_grads: bool = False
    pending: torch.Tensor | None = None
    grad_pending: torch.Tensor | None = None
    compression: str = "none"  # how the states and their gradients travel, both ways (wire.compression)

    def to_message(self) -> Message:
        meta = {
            "start": self.start,
            "end": self.end,
            "lora_grads": self.lora_grads,
            **_adapter_meta(self.adapter),
            **_codec_meta(self.compression),
        }
        if self.dropout_seed is not None:
            meta["dropout_seed"] = self.dropout_seed
        states = {
            "hidden": self.hidden,
            "grad": self.grad,
            "pending": self.pending,
            "grad_pending": self.grad_pending,
        }
        wire = _wire(states, self.compression)
        named = {
            "hidden": wire["hidden"],
            "grad": wire["grad"],
            "key_mask": self.key_mask,
            "prompts": self.prompts,
            **wire,
        }
        return _message(meta, named)

    @classmethod
    def parse(cls, message: Message) -> BackwardRequest:
        check_count(message.tensors, 2, len(BACKWARD_TENSORS), "backward")
        tensors = _tensors(message, BACKWARD_TENSORS, "backward")
        if "hidden" not in tensors or "grad" not in tensors:
            raise bad_request("backward needs hidden states and their gradient")
        meta = message.meta
        lora_grads = meta.get("lora_grads", False)
        if not isinstance(lora_grads, bool):
            raise bad_request("lora_grads must be true or false")
        return cls(
            _int(meta, "start"),
            _int(meta, "end"),
            _state(tensors, "backward", "hidden"),
            _state(tensors, "backward", "grad"),
            tensors.get("key_mask"),
            tensors.get("prompts"),
            AdapterRef.parse(meta),
            _optional_int(meta, "dropout_seed"),
            lora_grads,
            _state(tensors, "backward", "pending"),
            _state(tensors, "backward", "grad_pending"),
            _codec(meta),
        )


@dataclass(frozen=True)
class BackwardReply:
    """Gradients: of the span's inputs (r, and p where the request sent one), of the deep prompts sent (if any),
    of the adapter's A/B (if asked)."""

    grad_hidden: torch.Tensor
    grad_prompts: torch.Tensor | None = None
    grad_lora: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_pending: torch.Tensor | None = None
    compression: str = (
        "none"  # the request's codec, for the inputs' gradients (prompts' and A/B's travel as computed)
    )

    def to_message(self) -> Message:
        meta: dict[str, Any] = {}
        wire = _wire({"grad_hidden": self.grad_hidden, "grad_pending": self.grad_pending}, self.compression)
        named = {
            "grad_hidden": wire["grad_hidden"],
            "grad_prompts": self.grad_prompts,
            "grad_lora": None,
            **wire,
        }
        if self.grad_lora:
            meta["lora"], named["grad_lora"] = pack_tensors(self.grad_lora)
        return _message(meta, named, positional=1)

    @classmethod
    def parse(cls, message: Message) -> BackwardReply:
        """Raises RequestError("bad_request") for a malformed reply (the client turns it into a BadReplyError)."""
        names = (
            "grad_hidden",
            "grad_prompts",
            "grad_lora",
            "grad_pending",
            "grad_hidden_scales",
            "grad_pending_scales",
        )
        what = "a backward reply"
        tensors = _tensors(message, names, what)
        if "grad_hidden" not in tensors:
            raise bad_request("a backward reply needs grad_hidden")
        lora = {}
        if "grad_lora" in tensors:
            lora = unpack_tensors(message.meta.get("lora"), tensors["grad_lora"], what)
        return cls(
            _state(tensors, what, "grad_hidden"),
            tensors.get("grad_prompts"),
            lora,
            _state(tensors, what, "grad_pending"),
        )


@dataclass(frozen=True)
class AdapterUpload:
    """A client's LoRA adapter (its `name`, `version` and settings) over layers [start, end) of the receiving
    server, on the client's `adapters` stream; the server keeps it (the latest version of each name) for that
    client until the stream ends or the adapter goes unused. Tensors: A [rank, in] and B [out, rank] per layer
    and target module, named as in `models.lora` (`"3.self_attn.q_proj.lora_A"`), packed into one."""

    name: str
    version: int
    rank: int
    alpha: float
    dropout: float
    modules: tuple[str, ...]
    rslora: bool
    start: int
    end: int
    tensors: dict[str, torch.Tensor]

    def to_message(self) -> Message:
        manifest, flat = pack_tensors(self.tensors)
        meta = {
            "name": self.name,
            "version": self.version,
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "modules": list(self.modules),
            "rslora": self.rslora,
            "start": self.start,
            "end": self.end,
            "manifest": manifest,
        }
        return Message(meta, [flat])

    @classmethod
    def parse(cls, message: Message) -> AdapterUpload:
        meta = message.meta
        check_count(message.tensors, 1, 1, "an adapter upload")
        ref = AdapterRef.parse({"adapter": {"name": meta.get("name"), "version": meta.get("version")}})
        if ref is None or ref.version is None:
            raise bad_request("an adapter upload needs a name and a version")
        modules = meta.get("modules")
        if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules) or len(modules) > 16:
            raise bad_request("modules must be a list of module names")
        numbers = {}
        for name in ("alpha", "dropout"):
            value = meta.get(name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                raise bad_request(f"{name} must be a number")
            numbers[name] = float(value)
        if not isinstance(meta.get("rslora", False), bool):
            raise bad_request("rslora must be true or false")
        return cls(
            ref.name,
            ref.version,
            _int(meta, "rank"),
            numbers["alpha"],
            numbers["dropout"],
            tuple(modules),
            meta.get("rslora", False),
            _int(meta, "start"),
            _int(meta, "end"),
            unpack_tensors(meta.get("manifest"), message.tensors[0], "an adapter upload"),
        )


@dataclass(frozen=True)
class AdapterAck:
    """The server holds this version of the adapter now."""

    name: str
    version: int

    def to_message(self) -> Message:
        return Message({"name": self.name, "version": self.version})
