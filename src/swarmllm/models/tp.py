"""Tensor parallelism for a built BlockSpan: a transform that keeps one rank's shard of every block's weights
(Megatron-style) and hands the span a `Comm` that sums sub-layer outputs over the ranks with torch.distributed:
`TensorParallelComm` (dist.all_reduce, async_op=True in ladder layers; eager) or `FunctionalComm` (functional
collectives, for torch.compile and CUDA graphs).

Column-parallel: q/k/v (whole heads; rank i keeps q heads and kv heads [i*n/N, (i+1)*n/N), so every q head stays
with the kv head it shares under GQA) and gate/up (the same columns of both). Row-parallel: o_proj and down_proj
(the matching input columns); their bias is kept on rank 0 only, so the all-reduce adds it once. Norms and the
rotary embedding are replicated. Each rank's KV cache holds its own kv heads (`local_config`).

Standard layers all-reduce each sub-layer's output before it joins the stream; ladder layers start the all-reduce
and wait for it only where the stream needs it, one sub-layer later (models/ladder.py). It does not start
processes or move inputs between ranks: server/tp.py does.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn

from swarmllm.models.ladder import Comm
from swarmllm.models.llama import Attention, BlockConfig, BlockSpan


class TensorParallelComm(Comm):
    """Sums over a torch.distributed process group (gloo on CPU, NCCL on GPU), in place. `start` launches the
    all-reduce with async_op=True and returns (tensor, work); `wait` waits on the work."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group

    def start(self, x: Tensor) -> tuple[Tensor, dist.Work]:
        return x, dist.all_reduce(x, group=self.group, async_op=True)

    def wait(self, handle: tuple[Tensor, dist.Work | None]) -> Tensor:
        x, work = handle
        if work is not None:
            work.wait()
        return x

    def ready(self, x: Tensor) -> tuple[Tensor, None]:
        return x, None

    def all_reduce(self, x: Tensor) -> Tensor:
        dist.all_reduce(x, group=self.group)
        return x


class FunctionalComm(Comm):
    """The same sums through functional collectives (torch.distributed._functional_collectives): out of place,
    traceable by torch.compile (fullgraph) and capturable in CUDA graphs, where Inductor can reorder compute
    around the launched all-reduce. `start` returns the not-yet-waited result tensor; `wait` waits on it."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group if group is not None else dist.group.WORLD

    def start(self, x: Tensor) -> Tensor:
        return funcol.all_reduce(x, "sum", self.group)

    def wait(self, handle: Tensor) -> Tensor:
        return funcol.wait_tensor(handle)

    def all_reduce(self, x: Tensor) -> Tensor:
        return funcol.wait_tensor(funcol.all_reduce(x, "sum", self.group))


def check_shardable(config: BlockConfig, world: int) -> None:
    """Raise ValueError unless heads, kv heads and the MLP width all split evenly over `world` ranks."""
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        if getattr(config, name) % world:
            raise ValueError(
                f"{name}={getattr(config, name)} does not split over {world} tensor-parallel ranks"
            )


def local_config(config: BlockConfig, world: int) -> BlockConfig:
    """The shapes one rank's shard works with: its heads, kv heads (what its KV cache holds) and MLP width."""
    check_shardable(config, world)
    return replace(
        config,
        num_heads=config.num_heads // world,
        num_kv_heads=config.num_kv_heads // world,
        intermediate_size=config.intermediate_size // world,
    )


def shard_span(span: BlockSpan, rank: int, world: int, comm: Comm) -> BlockSpan:
    """Keep rank `rank`'s shard of every block of `span` (in place) and sum through `comm`; returns the span."""
    config = span.config
    check_shardable(config, world)
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    inner = config.intermediate_size
    for block in span.blocks:
        attn, mlp = block.self_attn, block.mlp
        qkv_rows = (
            _rows(q, rank, world) + _rows(kv, rank, world, offset=q) + _rows(kv, rank, world, offset=q + kv)
        )
        _keep_rows(attn.qkv_proj, qkv_rows)
        _keep_columns(attn.o_proj, _rows(q, rank, world), rank)
        _set_heads(attn, config.num_heads // world, config.num_kv_heads // world, config.head_dim)
        _keep_rows(mlp.gate_up_proj, _rows(inner, rank, world) + _rows(inner, rank, world, offset=inner))
        _keep_columns(mlp.down_proj, _rows(inner, rank, world), rank)
    span.comm = comm
    return span


def _rows(size: int, rank: int, world: int, offset: int = 0) -> list[int]:
    """Rank `rank`'s contiguous share of `size` rows starting at `offset`."""
    share = size // world
    return list(range(offset + rank * share, offset + (rank + 1) * share))


def _keep_rows(linear: nn.Linear, rows: list[int]) -> None:
    """Column parallel: keep these output features (weight rows, bias entries)."""
    index = torch.tensor(rows, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach().index_select(0, index), requires_grad=False)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index), requires_grad=False)
    linear.out_features = len(rows)


def _keep_columns(linear: nn.Linear, columns: list[int], rank: int) -> None:
    """Row parallel: keep these input features; the bias only on rank 0, as the sum over ranks adds it once."""
    index = torch.tensor(columns, device=linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach().index_select(1, index), requires_grad=False)
    if linear.bias is not None and rank != 0:
        linear.bias = None
    linear.in_features = len(columns)


def _set_heads(attn: Attention, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
    attn.num_heads, attn.num_kv_heads = num_heads, num_kv_heads
    attn.sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
