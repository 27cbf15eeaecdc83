"""Packed (oneDNN) projection weights: the same products as the plain layout in every layout, with adapters and
input gradients; which weights get packed; the layout policy; and a backend that re-lays its weights out as its
decode steps go from one session to several and back; a client head's packed copy."""

from __future__ import annotations

import pytest
import torch

from swarmllm.models import load_span
from swarmllm.models import packed as packed_module
from swarmllm.models.llama import Lora, Projection
from swarmllm.models.packed import (
    MANY_ROWS,
    MAX_COPY_BYTES,
    MIN_PACKED_ELEMENTS,
    ONE_ROW,
    PackedCopy,
    PackedProjection,
    can_pack,
    layout_for,
    pack_block,
    packed_projections,
)
from swarmllm.server.backend import LAYOUT_WINDOW, Backend, _Decode

pytestmark = pytest.mark.skipif(not can_pack("cpu", torch.float32), reason="this torch build has no oneDNN")


@pytest.fixture(autouse=True)
def without_panels(monkeypatch):
    """Float32 spans as where the panel kernel cannot run (no compiler; `models.panels` is preferred where it
    can), so that these tests load oneDNN's layout."""
    monkeypatch.setattr(packed_module, "kernel", lambda: None)


# 2 layers at hidden size 1024 (every projection >= MIN_PACKED_ELEMENTS); qwen2 has q/k/v biases
WIDE = dict(
    hidden_size=1024, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, num_layers=2
)


@pytest.fixture(scope="module")
def wide_checkpoint(checkpoints):
    return checkpoints("qwen2", **WIDE)


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding: oneDNN sums the products in another order than MKL (on an AVX2-only CPU,
    through two blocks, up to 1.6e-5 of the largest value, measured)."""
    return torch.allclose(a, b, rtol=1e-4, atol=3e-5 * float(b.abs().max()))


@pytest.mark.parametrize("rows", [ONE_ROW, MANY_ROWS])
def test_a_packed_projection_computes_the_plain_product(rows):
    torch.manual_seed(0)
    plain = Projection(1024, 1536, bias=True)
    packed = PackedProjection.from_projection(plain, rows)
    assert torch.equal(packed.weight, plain.weight)
    lora = Lora(torch.randn(4, 1024) * 0.1, torch.randn(1536, 4) * 0.1, (4,))
    with torch.inference_mode():
        for shape in [(1, 1024), (3, 1024), (8, 1024), (2, 5, 1024)]:
            x = torch.randn(shape)
            assert close(packed(x), plain(x))
            assert close(packed(x, lora), plain(x, lora))
        x = torch.randn(8, 1024)
        before = packed(x)
        packed.repack(ONE_ROW if rows == MANY_ROWS else MANY_ROWS)
        assert packed.rows != rows
        assert close(packed(x), before)


def test_the_input_gradient_goes_through_a_packed_projection():
    torch.manual_seed(1)
    plain = Projection(1024, 1024, bias=False).requires_grad_(False)
    packed = PackedProjection.from_projection(plain, ONE_ROW)
    x = torch.randn(3, 1024, requires_grad=True)
    (packed(x) ** 2).sum().backward()
    got, x.grad = x.grad, None
    (plain(x) ** 2).sum().backward()
    assert close(got, x.grad)


def test_only_large_plain_weights_are_packed(checkpoints, wide_checkpoint):
    small = load_span(checkpoints("llama"), 0, 2, pack=True)  # hidden size 64: oneDNN's call would cost more
    assert packed_projections(small) == []
    wide = load_span(wide_checkpoint, 0, 2, pack=True)
    assert len(packed_projections(wide)) == 8  # 4 projections a block, each >= MIN_PACKED_ELEMENTS
    assert all(p.rows == ONE_ROW for p in packed_projections(wide))
    assert all(p.packed.numel() >= MIN_PACKED_ELEMENTS for p in packed_projections(wide))
    half = load_span(wide_checkpoint, 0, 1, dtype=torch.bfloat16, pack=True)
    if can_pack("cpu", torch.bfloat16):
        assert {p.rows for p in packed_projections(half)} == {MANY_ROWS}  # as fast for one row in bfloat16
    else:  # a CPU without oneDNN's bfloat16 instructions (AVX2 only) keeps the plain layout, and still serves
        assert (
            packed_projections(half) == []
            and half(torch.ones(1, 2, 1024, dtype=torch.bfloat16)).isfinite().all()
        )
    assert (
        packed_projections(pack_block(load_span(wide_checkpoint, 0, 1, dtype=torch.float16).blocks[0])) == []
    )


def test_a_packed_span_computes_what_the_plain_one_does(wide_checkpoint):
    plain, packed = load_span(wide_checkpoint, 0, 2), load_span(wide_checkpoint, 0, 2, pack=True)
    hidden = torch.randn(2, 7, 1024, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        assert close(packed(hidden), plain(hidden))


@pytest.mark.parametrize(
    ("recent", "current", "want"),
    [
        ([], ONE_ROW, ONE_ROW),
        ([1] * 32, MANY_ROWS, ONE_ROW),
        ([2] * 16 + [1] * 16, ONE_ROW, MANY_ROWS),  # half the steps merged
        ([3] * 10 + [1] * 22, ONE_ROW, ONE_ROW),  # between the thresholds: no change either way
        ([3] * 10 + [1] * 22, MANY_ROWS, MANY_ROWS),
        ([8] * 6 + [1] * 26, MANY_ROWS, ONE_ROW),  # a fifth or less
    ],
)
def test_layout_follows_the_share_of_merged_steps(recent, current, want):
    assert layout_for(recent, current) == want


def test_a_backend_relays_its_weights_out_as_sessions_come_and_go(wide_checkpoint):
    plain = Backend(load_span(wide_checkpoint, 0, 2), cache_tokens=4096)
    packed = Backend(load_span(wide_checkpoint, 0, 2, pack=True), cache_tokens=4096)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, 3, 1024, generator=generator) for _ in range(2)]
    pairs = []
    for backend in (plain, packed):
        sessions = [backend.open_session(0, 2, 1, 2 * LAYOUT_WINDOW + 8) for _ in prompts]
        for session, prompt in zip(sessions, prompts, strict=True):
            backend._step(session, prompt, 0, None)
        pairs.append((backend, sessions))

    def step(position: int, merged: bool) -> None:
        hidden = [torch.randn(1, 1, 1024, generator=generator) for _ in prompts]
        outputs = []
        for backend, sessions in pairs:
            active = sessions if merged else sessions[:1]
            steps = [_Decode(s, h, position, None, None) for s, h in zip(active, hidden, strict=False)]
            outputs.append([out for out, _ in backend._decode_many(steps)])
        for got, want in zip(outputs[1], outputs[0], strict=True):
            assert close(got, want)

    assert packed.layout_rows == ONE_ROW
    for position in range(3, 3 + LAYOUT_WINDOW):
        step(position, merged=True)
    packed._relayout.result(timeout=60)
    assert packed.layout_rows == MANY_ROWS
    assert {p.rows for p in packed_projections(packed.span)} == {MANY_ROWS}
    for position in range(3 + LAYOUT_WINDOW, 3 + 2 * LAYOUT_WINDOW):
        step(position, merged=False)  # the other session stopped decoding
    packed._relayout.result(timeout=60)
    assert {p.rows for p in packed_projections(packed.span)} == {ONE_ROW}
    step(3 + 2 * LAYOUT_WINDOW, merged=True)
    for backend in (plain, packed):
        backend.shutdown()


def test_a_packed_copy_of_a_head_computes_its_product_and_follows_its_weight_and_rows():
    """A client's LM head through `PackedCopy`: the plain product for any number of rows, laid out for one row or
    many as its recent calls go, the new product once the weight changes in place, is replaced or is given other
    data (transformers' `resize_token_embeddings` swaps `.data`), and the plain
    call itself where the head is small, too large to copy, trained, or a gradient is wanted."""
    torch.manual_seed(0)
    head = torch.nn.Linear(1024, 4096, bias=False).requires_grad_(False)  # 4M values: packed
    packed = PackedCopy(history=4)
    with torch.no_grad():
        x = torch.randn(4, 1, 1024)
        assert close(packed(head, x), head(x))
        assert packed.rows == ONE_ROW  # float32 starts laid out for one row, whatever the first call
        for _ in range(4):  # concurrent generates' merged rows
            assert close(packed(head, x), head(x))
        assert packed.rows == MANY_ROWS
        one = torch.randn(1, 1, 1024)
        for _ in range(4):  # a lone generate
            assert close(packed(head, one), head(one))
        assert packed.rows == ONE_ROW
        before = packed(head, one)
        head.weight.mul_(-2.0)  # in place: the copy is re-made
        assert close(packed(head, one), head(one)) and close(packed(head, one), -2.0 * before)
        head.weight = torch.nn.Parameter(torch.randn(4096, 1024), requires_grad=False)  # replaced
        assert close(packed(head, one), head(one))
        for rows in (4100, 4096):  # given other data, rows added and taken: as a resized vocabulary's
            head.weight.data = torch.randn(rows, 1024)
            assert packed(head, one).shape[-1] == rows and close(packed(head, one), head(one))
        small = torch.nn.Linear(64, 128)
        y = torch.randn(3, 64)
        assert torch.equal(packed(small, y), small(y))  # too small to pay: the plain call
        packed.max_copy_bytes = 4096 * 1024 * 4 - 1
        assert torch.equal(packed(head, one), head(one))  # too large to copy: the plain call
        packed.max_copy_bytes = MAX_COPY_BYTES
        before = packed(head, one)
    # unfrozen and trained by a fused optimizer (transformers' Trainer's), which bumps no version counter
    head.weight.requires_grad_(True)
    head.weight.grad = torch.randn(4096, 1024)
    torch.optim.AdamW([head.weight], lr=0.1, fused=True).step()
    with torch.no_grad():
        assert torch.equal(packed(head, one), head(one)) and not close(packed(head, one), before)
    x = torch.randn(2, 1024, requires_grad=True)
    head.weight.requires_grad_(False)
    out = packed(head, x)
    assert torch.equal(out, head(x))  # the plain call, so the gradient reaches x
    out.sum().backward()
    assert x.grad is not None
