"""What a server announces about itself, and what a swarm announces about its models.

`ServerInfo` is defined here and nowhere else: servers write it to the DHT, clients, the router and the monitor
read it. Values travel as plain dicts (msgpack-able); `parse_server_info` is the only way back, and it drops
anything malformed instead of letting one bad peer break a look-up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from enum import StrEnum
from typing import TYPE_CHECKING, Annotated, Any

from hivemind.utils import MSGPackSerializer
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

if TYPE_CHECKING:
    from swarmllm.models.llama import BlockConfig

# Bounds on what one peer's record may claim. Rates above MAX_RATE count as MAX_RATE: 1e308 from two servers
# summed to inf (the monitor's document then was not JSON). A model of more than MAX_BLOCKS blocks is garbage:
# one of 100,000 made each of the monitor's look-ups ask for 100,000 keys and time out.
MAX_RATE = 1e30  # far above any server, far below where a sum over any number of them overflows
MAX_BLOCKS = 4096
FINGERPRINT_CHARS = 16  # hex digits of a model fingerprint: 64 bits, no accidental collision in any swarm
# The largest value of one record that peers store (`dht.membership.OwnedRecordsValidator`); a server's is ~0.4 KB.
# Unbounded, a peer's megabytes under a block key made each look-up of that block take seconds.
MAX_RECORD_BYTES = 16 * 1024
MAX_BUSY_ROWS = 1 << 20  # rows a server may claim to step (more would only push clients away from it)
# A model's DHT prefix: a repository's or folder's name is far shorter. Look-ups carry the prefix into hivemind's
# DHT process through a pipe that takes no long message whole (`records.py`).
MAX_PREFIX_CHARS = 256


def record_bytes(record: dict[str, Any]) -> int:
    """The size of a record's value as peers store and bound it (msgpack, before signing)."""
    return len(MSGPackSerializer.dumps(record))


def model_fingerprint(config: BlockConfig) -> str:
    """What a server announces (`ServerInfo.fingerprint`) and a client compares, so that two checkpoints under
    one DHT prefix are never chained: the prefix is only the repository's or folder's last name ("alice/Llama-2-7b"
    and "bob/Llama-2-7b", or "/a/model" and "/b/model", share one), and a server of another model whose hidden
    states have the same shape would compute garbage without an error.

    A hash of the fields that define the model's math (`models.llama.BlockConfig`: family, sizes, layers, heads,
    KV heads, head size, RoPE, norm epsilon, biases, sliding window, vocabulary, tied embeddings; not the dtype,
    which servers choose). Ladder layers are left out: they are announced and compared on their own
    (`ServerInfo.ladder`). Two checkpoints of the same config but other weights (a fine-tune) get the same
    fingerprint: telling them apart would take hashing the weights, too slow at load; serve those under a
    `--dht-prefix` of their own."""
    fields = dataclasses.asdict(config)
    fields.pop("ladder_layers")
    # 10000 and 10000.0 (two ways configs write a rope_theta) are one model
    fields["rope_parameters"] = {
        k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
        for k, v in fields["rope_parameters"].items()
    }
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:FINGERPRINT_CHARS]


class ServerState(StrEnum):
    JOINING = "joining"
    ONLINE = "online"
    OFFLINE = "offline"


def _rate(description: str, **kwargs: Any) -> Any:
    """A speed field: at least 0 and finite (one peer announcing inf made every server's rebalancing compute
    inf - inf and fail)."""
    return Field(ge=0, allow_inf_nan=False, description=description, **kwargs)


def _host_port(addr: str) -> str:
    """A direct address must be host:port with a port a socket takes (a port out of range raised OverflowError
    where connecting expects only connection errors, and one such record stopped every server's balancing)."""
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"not host:port: {addr!r}")
    return addr


class ServerInfo(BaseModel):
    """A server's announcement for the blocks [start_block, end_block) of one model."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    peer_id: str
    state: ServerState
    start_block: int = Field(ge=0)
    end_block: int = Field(gt=0, le=MAX_BLOCKS)
    throughput: float = _rate(
        "what block balancing adds to each block of the span for this server: the smaller of inference_rps and "
        "network_rps (inference_rps alone until the network is measured)"
    )
    inference_rps: float = _rate("single-token decode steps/s through one block, batch 1")
    forward_rps: float = _rate("batch-forward tokens/s through one block")
    network_rps: float | None = _rate(
        "hidden states/s this server's uplink carries (measured bandwidth to a few peers, or --bandwidth, over "
        "one token's activations); None until measured",
        default=None,
    )
    cache_tokens_left: int = Field(ge=0)
    busy_rows: int = Field(
        default=0,
        ge=0,
        le=MAX_BUSY_ROWS,
        description="rows of the inference sessions that stepped in the last 30 s: its load, by which other "
        "clients spread sessions over the servers of the same blocks (0 in records of older servers)",
    )
    max_sessions_per_peer: int | None = Field(
        default=None,
        ge=1,
        description="inference sessions one peer may hold open here at once: a client with more waits its turn "
        "locally rather than ask again and again (None in records of older servers)",
    )
    version: str
    dtype: str
    quantization: str = "none"
    public_name: str | None = None
    adapters: tuple[str, ...] = ()
    using_relay: bool = False
    direct_addrs: tuple[Annotated[str, AfterValidator(_host_port)], ...] = Field(
        default=(), description="host:port of the direct tensor path"
    )
    movable: bool = Field(
        default=True,
        description="False when its operator pinned its blocks (--blocks), or while it backs off after a failed move",
    )
    tunable: bool = Field(
        default=True,
        description="takes deep prompts, client adapters and backward; False where it runs its blocks "
        "tensor-parallel (--tp), which has none of them yet: clients that need them route around it",
    )
    ladder: tuple[tuple[int, int], ...] = Field(
        default=(),
        description="the checkpoint's Ladder Residual layers as half-open [start, end) ranges "
        "(models.ladder.layer_ranges); () for a standard model. Clients chain only servers that announce "
        "the ladder layers of their own config",
    )
    fingerprint: str | None = Field(
        default=None,
        pattern=f"^[0-9a-f]{{{FINGERPRINT_CHARS}}}$",
        description="model_fingerprint of the checkpoint it serves; clients chain only servers that announce "
        "their own (records without it, from older servers, are read and used as before)",
    )
    commit: str | None = Field(
        default=None,
        pattern="^[0-9a-f]{40}$",
        description="the hub commit its checkpoint was read at (None: a local folder); a client that knows its "
        "own chains only servers of the same (two commits of one repository often share a fingerprint)",
    )

    @field_validator("throughput", "inference_rps", "forward_rps", "network_rps")
    @classmethod
    def _at_most_max_rate(cls, rate: float | None) -> float | None:
        return rate if rate is None else min(rate, MAX_RATE)

    @model_validator(mode="after")
    def _span_not_empty(self) -> ServerInfo:
        if self.end_block <= self.start_block:
            raise ValueError(f"empty span [{self.start_block}, {self.end_block})")
        return self

    @property
    def num_blocks(self) -> int:
        return self.end_block - self.start_block

    def to_record(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


class ModelInfo(BaseModel):
    """One entry of the swarm's model registry."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    dht_prefix: str = Field(min_length=1, max_length=MAX_PREFIX_CHARS)
    num_blocks: int = Field(gt=0, le=MAX_BLOCKS)
    repository: str | None = None

    def to_record(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def same_checkpoint(
    server: ServerInfo,
    ladder: tuple[tuple[int, int], ...],
    fingerprint: str | None,
    commit: str | None = None,
) -> bool:
    """Whether `server` serves the checkpoint of these ladder layers, `model_fingerprint` and hub `commit`: the
    one test by which clients route, servers choose their blocks and balance, so the three agree. A fingerprint
    or commit unknown on either side (an older server's record, a client built without a config, a checkpoint
    read from a local folder) does not exclude."""
    if server.ladder != ladder:
        return False
    if server.commit is not None and commit is not None and server.commit != commit:
        return False
    return server.fingerprint is None or fingerprint is None or server.fingerprint == fingerprint


def parse_server_info(value: Any) -> ServerInfo | None:
    """A ServerInfo from a DHT value, or None for garbage (never raises)."""
    try:
        return ServerInfo.model_validate(value)
    except (ValidationError, TypeError, ValueError):
        return None


def parse_model_info(value: Any) -> ModelInfo | None:
    try:
        return ModelInfo.model_validate(value)
    except (ValidationError, TypeError, ValueError):
        return None
