"""The LoRA adapters a server applies: its own (hosted, loaded from PEFT folders with `--adapters`, announced by
name) and its clients' (uploaded on each client's `adapters` stream, once per version).

A client's adapters belong to that client (its peer id) and are found only by its own requests, so one client's
adapter never touches another's outputs. They are bounded per peer (count and bytes), replaced by a newer version
of the same name, and dropped when the stream that uploaded them ends (the client closed it or vanished) or when
neither it nor any request used them for `idle_timeout_s`.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from swarmllm.models import BlockConfig
from swarmllm.models.lora import LoraSettings, lora_shapes, read_peft_adapter
from swarmllm.wire import RequestError
from swarmllm.wire.messages import NAME_RULE, AdapterRef, AdapterUpload, valid_name


@dataclass
class Adapter:
    """One adapter's settings and tensors over layers [start, end), on the server's device and dtype."""

    settings: LoraSettings
    tensors: dict[str, torch.Tensor]
    start: int
    end: int
    version: int | None = None  # None: hosted by the server
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def covers(self, start: int, end: int) -> bool:
        return self.start <= start and end <= self.end

    @cached_property
    def fingerprint(self) -> bytes:
        """A digest of what the adapter computes (settings, layers, tensors), equal for equal adapters whoever
        uploaded them and under whatever name or version: the prefix cache keys its sessions with it
        (`server.prefix`). Made once, when a session first opens with it."""
        digest = hashlib.blake2b(repr((self.settings, self.start, self.end)).encode(), digest_size=16)
        for name in sorted(self.tensors):
            tensor = self.tensors[name].detach().cpu().contiguous()
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().data)
        return digest.digest()


def unknown_adapter(message: str) -> RequestError:
    """The client should upload (again) or choose other servers; clients recognise the code."""
    return RequestError("unknown_adapter", message)


class AdapterStore:
    def __init__(
        self,
        config: BlockConfig,
        dtype: torch.dtype,
        device: torch.device | str,
        *,
        max_adapters_per_peer: int = 4,
        max_bytes_per_peer: int = 256 << 20,
        idle_timeout_s: float = 600.0,
    ):
        self.config, self.dtype, self.device = config, dtype, torch.device(device)
        self.max_adapters_per_peer = max_adapters_per_peer
        self.max_bytes_per_peer = max_bytes_per_peer
        self.idle_timeout_s = idle_timeout_s
        self.hosted: dict[str, Adapter] = {}
        self._uploaded: dict[str, dict[str, Adapter]] = {}  # peer -> name -> adapter

    def host(self, path: str | Path) -> str:
        """Load a PEFT LoRA folder (all layers: LoRA weights are small, and a server may move); its name is the
        folder's name."""
        name = Path(path).resolve().name
        if not valid_name(name):  # clients could not name it
            raise ValueError(f"{path}: a hosted adapter is named by its folder, and a name is {NAME_RULE}")
        if name in self.hosted:  # announced by name: a second one would silently replace the first
            raise ValueError(f"{path}: an adapter named {name!r} is hosted already (they go by folder name)")
        settings, tensors = read_peft_adapter(path, self.config)
        tensors = {k: t.to(self.device, self.dtype) for k, t in tensors.items()}
        self.hosted[name] = Adapter(settings, tensors, 0, self.config.num_layers)
        return name

    def upload(self, peer: str, upload: AdapterUpload, span: tuple[int, int]) -> Adapter:
        """Validate and keep a client's adapter (replacing older versions of its name)."""
        try:
            settings = LoraSettings(
                rank=upload.rank,
                alpha=upload.alpha,
                modules=upload.modules,
                dropout=upload.dropout,
                rslora=upload.rslora,
            )
        except ValueError as e:
            raise RequestError("bad_request", f"adapter {upload.name}: {e}") from None
        if not span[0] <= upload.start < upload.end <= span[1]:
            raise RequestError(
                "bad_request", f"adapter layers [{upload.start}, {upload.end}) are not in {span}"
            )
        expected = lora_shapes(self.config, settings, range(upload.start, upload.end))
        got = {name: tuple(t.shape) for name, t in upload.tensors.items()}
        if got != expected:
            raise RequestError(
                "bad_request",
                f"adapter {upload.name}: tensors {sorted(got)[:4]}... do not match rank {settings.rank}, modules "
                f"{list(settings.modules)} over layers [{upload.start}, {upload.end}) of this model",
            )
        for name, t in upload.tensors.items():
            if t.dtype not in (torch.float32, torch.float16, torch.bfloat16) or not torch.isfinite(t).all():
                raise RequestError(
                    "bad_request", f"adapter {upload.name}: {name} is not finite floating point"
                )
        tensors = {k: t.to(self.device, self.dtype) for k, t in upload.tensors.items()}
        adapter = Adapter(settings, tensors, upload.start, upload.end, upload.version)
        if adapter.nbytes > self.max_bytes_per_peer:
            raise RequestError(
                "quota", f"adapters of one peer may take {self.max_bytes_per_peer >> 20} MiB on this server"
            )
        mine = self._uploaded.setdefault(peer, {})
        mine.pop(upload.name, None)  # (an older version)
        # the peer's least recently used adapters give way (a client trying adapter after adapter, or serving
        # several in turn, was refused its fifth and waited); a session open with one keeps it, and a request
        # naming one dropped is answered `unknown_adapter`, which has the client upload it again
        while mine and (
            len(mine) >= self.max_adapters_per_peer
            or sum(a.nbytes for a in mine.values()) + adapter.nbytes > self.max_bytes_per_peer
        ):
            del mine[min(mine, key=lambda name: mine[name].last_used)]
        mine[upload.name] = adapter
        return adapter

    def find(self, peer: str, ref: AdapterRef, start: int, end: int) -> Adapter:
        """The adapter a request names, covering blocks [start, end); `unknown_adapter` otherwise."""
        if ref.version is None:
            adapter = self.hosted.get(ref.name)
            if adapter is None:
                raise unknown_adapter(
                    f"this server hosts no adapter {ref.name!r} (it has {sorted(self.hosted)})"
                )
        else:
            adapter = self._uploaded.get(peer, {}).get(ref.name)
            if adapter is None or adapter.version != ref.version:
                held = None if adapter is None else adapter.version
                raise unknown_adapter(
                    f"adapter {ref.name!r} version {ref.version} was not uploaded here (held: {held})"
                )
        if not adapter.covers(start, end):
            raise unknown_adapter(
                f"adapter {ref.name!r} covers layers [{adapter.start}, {adapter.end}), not [{start}, {end})"
            )
        adapter.last_used = time.monotonic()
        return adapter

    def drop(self, peer: str, adapters: dict[str, Adapter]) -> None:
        """Forget these adapters of `peer` (those its ending stream uploaded), unless replaced since."""
        mine = self._uploaded.get(peer, {})
        for name, adapter in adapters.items():
            if mine.get(name) is adapter:
                del mine[name]
        if not mine:
            self._uploaded.pop(peer, None)

    def idle(self, adapters: dict[str, Adapter]) -> bool:
        """Whether none of these adapters was used within `idle_timeout_s`."""
        now = time.monotonic()
        return all(now - a.last_used > self.idle_timeout_s for a in adapters.values())

    def held(self, peer: str) -> list[str]:
        return sorted(self._uploaded.get(peer, {}))
