"""What a request carries besides hidden states when a client fine-tunes or uses an adapter: deep prompts, a LoRA
adapter (the client's own, uploaded once per version, or one the servers host) and the seed of its dropout masks.

`Tuning` is per request and plain data; each hop takes its slice (`hop_prompts`). `AdapterUploads` keeps one
`adapters` stream per server and uploads a client adapter's weights to a server the first time a request with
that version goes there (after every optimizer step, once per server); the server drops them when the stream ends.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from swarmllm.client.replies import BadReplyError, SessionError
from swarmllm.models.lora import LoraSettings
from swarmllm.wire import Message, Stream, WireError
from swarmllm.wire.messages import AdapterRef, AdapterUpload

if TYPE_CHECKING:
    from swarmllm.client.swarm import SwarmClient

# the slowest link an upload is given time for: its deadline is a step's floor plus its size at this rate, so a
# server that hangs is left as soon as it would be for a step (not after `request_timeout_s`)
UPLOAD_BYTES_PER_S = 1e6


@dataclass(frozen=True)
class AdapterWeights:
    """One version of a client's LoRA adapter: settings and every layer's A/B (detached; our tensor names)."""

    name: str
    version: int
    settings: LoraSettings
    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        # servers refuse such an adapter, and a server's refusal counts as its failure: the client would ban
        # healthy servers for its own training's divergence
        if bad := [name for name, t in self.tensors.items() if not bool(torch.isfinite(t).all())]:
            raise ValueError(
                f"adapter {self.name!r}: {bad[0]}{f' and {len(bad) - 1} more' if len(bad) > 1 else ''} hold NaN "
                "or infinite values (has training diverged? in float16, e.g., AdamW's eps of 1e-8 is 0: keep "
                "trainable weights in float32)"
            )

    def layers(self, start: int, end: int) -> dict[str, torch.Tensor]:
        prefixes = tuple(f"{layer}." for layer in range(start, end))
        return {name: t for name, t in self.tensors.items() if name.startswith(prefixes)}


@dataclass(frozen=True)
class Tuning:
    """Per request: deep prompts over the whole model [num_blocks, 1, N, H] for positions 0..N-1, the adapter
    (a hosted one's name, or the client's own `weights`), and, for a training forward and its backward, the
    dropout seed and whether to return the adapter's gradients."""

    prompts: torch.Tensor | None = None
    hosted_adapter: str | None = None
    weights: AdapterWeights | None = None
    dropout_seed: int | None = None
    lora_grads: bool = False

    def __post_init__(self) -> None:
        if self.prompts is not None and not bool(torch.isfinite(self.prompts).all()):  # (as an adapter's)
            raise ValueError("the deep prompts hold NaN or infinite values (has training diverged?)")

    @property
    def needs_tunable(self) -> bool:
        """Whether only servers that announce `tunable` can take this request (deep prompts, a client's
        adapter, a training forward)."""
        return self.prompts is not None or self.weights is not None or self.dropout_seed is not None

    @property
    def adapter(self) -> AdapterRef | None:
        if self.weights is not None:
            return AdapterRef(self.weights.name, self.weights.version)
        return None if self.hosted_adapter is None else AdapterRef(self.hosted_adapter)

    def hop_prompts(
        self, start: int, end: int, position: int = 0, length: int | None = None
    ) -> torch.Tensor | None:
        """The deep prompts of blocks [start, end) for tokens [position, position + length): those of prompt
        positions among them, to be added to the first positions of what is sent (None when there are none)."""
        if self.prompts is None or position >= self.prompts.shape[2]:
            return None
        stop = self.prompts.shape[2] if length is None else min(self.prompts.shape[2], position + length)
        return self.prompts[start:end, :, position:stop]

    def for_rows(self, rows: slice) -> Tuning:
        """The tuning of the micro-batch of a training batch's `rows`: a dropout seed of its own, or its rows
        would draw the masks of the other micro-batches' rows."""
        if self.dropout_seed is None or not rows.start:
            return self
        return replace(self, dropout_seed=self.dropout_seed + rows.start)

    def for_inference(self) -> Tuning:
        """The same prompts and adapter, without training-only fields."""
        return replace(self, dropout_seed=None, lora_grads=False)


NO_TUNING = Tuning()


class AdapterUploads:
    """A client's adapter uploads: per server, one `adapters` stream and the versions it holds."""

    def __init__(self, swarm: SwarmClient):
        self.swarm = swarm
        self._streams: dict[str, Stream] = {}
        self._held: dict[str, dict[str, int]] = {}  # peer -> adapter name -> version uploaded
        self._locks: dict[str, asyncio.Lock] = {}
        self.uploads = 0  # how many uploads were made (one per version per server, plus re-uploads)

    async def ensure(self, peer_id: str, weights: AdapterWeights) -> None:
        """Upload `weights` to the server unless it holds this version already (over its span's layers)."""
        if self._held.get(peer_id, {}).get(weights.name) == weights.version:
            return
        async with self._locks.setdefault(peer_id, asyncio.Lock()):
            if self._held.get(peer_id, {}).get(weights.name) == weights.version:
                return
            info = self.swarm.info(peer_id)
            start, end = (0, self.swarm.num_blocks) if info is None else (info.start_block, info.end_block)
            s = weights.settings
            tensors = {k: t.float() for k, t in weights.layers(start, end).items()}
            upload = AdapterUpload(
                weights.name,
                weights.version,
                s.rank,
                s.alpha,
                s.dropout,
                s.modules,
                s.rslora,
                start,
                end,
                tensors,
            ).to_message()
            size = sum(t.numel() * t.element_size() for t in tensors.values())
            timeout = min(self.swarm.request_timeout_s, self.swarm.step_timeout_s + size / UPLOAD_BYTES_PER_S)
            try:
                try:
                    reply = await self._send(peer_id, upload, timeout)
                except WireError:  # the stream ended (the server closed it when unused): a new one
                    self.forget(peer_id)
                    reply = await self._send(peer_id, upload, timeout)
            except BaseException:
                # no answer (yet): one coming later must not be read as the next upload's, so a new stream
                self.forget(peer_id)
                raise
            error = reply.meta.get("error")
            if isinstance(error, dict):
                raise SessionError(peer_id, str(error.get("code"))[:100], str(error.get("message"))[:1000])
            if reply.meta != {"name": weights.name, "version": weights.version}:
                raise BadReplyError(peer_id, f"an adapter upload was answered with {str(reply.meta)[:80]}")
            self._held.setdefault(peer_id, {})[weights.name] = weights.version
            self.uploads += 1

    async def _send(self, peer_id: str, upload, timeout: float):
        stream = self._streams.get(peer_id)
        if stream is None:
            conn = await self.swarm.connection(peer_id)
            stream = await conn.open_stream("adapters", Message(), timeout=self.swarm.connect_timeout_s)
            self._streams[peer_id] = stream
        await stream.send(upload, timeout=timeout)
        return await stream.recv(timeout=timeout)

    def forget(self, peer_id: str) -> None:
        """The server does not hold what we uploaded (it said so, or the stream broke): upload again."""
        self._held.pop(peer_id, None)
        stream = self._streams.pop(peer_id, None)
        if stream is not None:
            asyncio.ensure_future(_quiet_close(stream))

    async def close(self) -> None:
        streams, self._streams = list(self._streams.values()), {}
        self._held.clear()
        for stream in streams:
            await _quiet_close(stream)


async def _quiet_close(stream: Stream) -> None:
    try:
        await stream.close()
    except WireError:
        pass  # the connection is gone, and the server dropped the adapters with it
