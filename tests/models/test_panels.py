"""Panel projections (our CPU kernel): x W^T within float32 rounding of a float64 product for any shape, split
over threads or not; a row's result the same bit for bit whatever rows share its call; bias, adapters and the
input gradient; which weights a span stores as panels; the build, its cache and a failing compiler; bad input."""

from __future__ import annotations

import os

import pytest
import torch

from swarmllm.models import load_span
from swarmllm.models import panels as panels_module
from swarmllm.models.llama import Lora, Projection
from swarmllm.models.packed import PackedCopy, packed_projections
from swarmllm.models.panels import (
    MIN_PANEL_ELEMENTS,
    PANEL,
    PANEL_DTYPES,
    PanelProjection,
    _compiler,
    build,
    dense_weight,
    from_panels,
    host_isa,
    kernel,
    nf4_matmul,
    panel_linear,
    panel_matmul,
    panel_outputs,
    to_nf4_panels,
    to_panels,
)

pytestmark = pytest.mark.skipif(
    kernel() is None, reason="no AVX2 and FMA, or no C++ compiler, on this machine"
)

WIDE = dict(
    hidden_size=1024, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=4, num_layers=2
)


def near(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Within float32 rounding of a float64 product (each output is a float32 FMA chain)."""
    if want.numel() == 0:
        return got.shape == want.shape
    scale = float(want.abs().max())
    return bool((got.double() - want.double()).abs().max() <= 2e-6 * scale * want.shape[-1] ** 0.5 + 1e-30)


@pytest.fixture
def threads():
    """Runs the body at 1 torch thread and again at 2 (a call then splits its panels over two threads)."""
    before = torch.get_num_threads()
    yield lambda n: torch.set_num_threads(n)
    torch.set_num_threads(before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("out_features", "in_features"),
    [(1536, 1024), (1000, 72), (17, 5), (64, 3), (16 * 40, 33)],  # padded last panels, odd inputs
)
def test_the_product_of_any_shape_equals_float64s_on_one_thread_or_two(
    out_features, in_features, dtype, threads
):
    """Half-precision weights too: widened to float32 in registers, so the product is the float64 one of the
    weight's own values within float32 rounding."""
    generator = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=generator).to(dtype)
    panels = to_panels(weight)
    assert panels.shape == (-(-out_features // PANEL), in_features, PANEL)
    assert torch.equal(from_panels(panels, out_features), weight)
    for rows in (1, 2, 5, 6, 7, 8, 13, 300):
        x = torch.randn(rows, in_features, generator=generator)
        want = x.double() @ weight.double().T
        results = []
        for count in (1, 2):
            threads(count)
            results.append(panel_matmul(x, panels, out_features))
            assert near(results[-1], want), (rows, count)
        assert torch.equal(results[0], results[1])  # the split computes each output the same way


def test_int8_panels_give_their_dense_weights_product_on_one_thread_or_two(threads):
    """int8 codes as panels, each output scaled (`Int8PanelProjection`'s storage): within float32 rounding of the
    dequantized weight's float64 product, the same bits split over two threads, and its gradient through
    `panel_linear`; scales that do not match the panels are refused."""
    generator = torch.Generator().manual_seed(5)
    codes = torch.randint(-127, 128, (1000, 72), generator=generator, dtype=torch.int8)
    panels = to_panels(codes)
    scales = torch.zeros(panels.shape[0] * PANEL)
    scales[:1000] = torch.rand(1000, generator=generator) * 1e-3
    weight = dense_weight(panels, 1000, scales)
    assert torch.equal(weight, codes.float() * scales[:1000, None])
    for rows in (1, 2, 4, 5, 8, 300):
        x = torch.randn(rows, 72, generator=generator)
        results = []
        for count in (1, 2):  # 63 panels: split over 2 threads
            threads(count)
            results.append(panel_matmul(x, panels, 1000, scales))
            assert near(results[-1], x.double() @ weight.double().T), (rows, count)
        assert torch.equal(results[0], results[1])
    x = torch.randn(3, 72, generator=generator, requires_grad=True)
    panel_linear(x, panels, 1000, scales).sum().backward()
    torch.testing.assert_close(x.grad, weight.sum(0).expand(3, -1), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="float32 scales"):
        panel_matmul(x.detach(), panels, 1000, scales[:1000])


def test_a_row_gives_the_same_bits_alone_as_among_others(threads):
    """A merged step, a lone step and a failover's replay of the same row agree exactly."""
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(2816, 1024, generator=generator)
    panels = to_panels(weight)
    rows = torch.randn(300, 1024, generator=generator)
    for count in (1, 2):
        threads(count)
        together = panel_matmul(rows, panels, 2816)
        for i in (0, 5, 7, 299):
            assert torch.equal(panel_matmul(rows[i : i + 1], panels, 2816), together[i : i + 1])
        assert torch.equal(panel_matmul(rows[3:11], panels, 2816), together[3:11])


def test_a_panel_projection_adds_its_bias_and_adapter_and_takes_any_leading_shape():
    torch.manual_seed(0)
    plain = Projection(1024, 1536, bias=True)
    panel = PanelProjection.from_projection(plain)
    assert torch.equal(panel.weight, plain.weight)
    lora = Lora(torch.randn(4, 1024) * 0.1, torch.randn(1536, 4) * 0.1, (4,))
    with torch.inference_mode():
        for shape in [(1, 1024), (8, 1024), (2, 5, 1024), (0, 1024)]:
            x = torch.randn(shape)
            assert panel(x).shape == (*shape[:-1], 1536)
            assert near(panel(x), plain(x).double())
            assert near(panel(x, lora), plain(x, lora).double())


def test_the_input_gradient_goes_through_a_panel_projection():
    torch.manual_seed(1)
    plain = Projection(1024, 1000, bias=False).requires_grad_(False)
    panel = PanelProjection.from_projection(plain)
    x = torch.randn(3, 1024, requires_grad=True)
    (panel(x) ** 2).sum().backward()
    got, x.grad = x.grad, None
    (plain(x) ** 2).sum().backward()
    assert torch.allclose(got, x.grad, rtol=1e-4, atol=1e-4 * float(x.grad.abs().max()))


def test_bad_inputs_get_a_clear_error():
    panels = to_panels(torch.randn(64, 32))
    for x in (
        torch.randn(2, 32, dtype=torch.float64),
        torch.randn(2, 32, dtype=torch.bfloat16),
        torch.randn(2, 31),
    ):
        with pytest.raises(ValueError, match="float32 CPU inputs of 32 features"):
            panel_matmul(x, panels, 64)


def test_large_float32_projections_of_a_span_are_stored_as_panels(checkpoints):
    wide_checkpoint = checkpoints("qwen2", **WIDE)  # q/k/v biases
    wide = load_span(wide_checkpoint, 0, 2, pack=True)
    stored = [m for m in wide.modules() if isinstance(m, PanelProjection)]
    assert len(stored) == 8 and packed_projections(wide) == []  # 4 projections a block, each large enough
    assert all(p.out_features * p.in_features >= MIN_PANEL_ELEMENTS for p in stored)
    plain = load_span(wide_checkpoint, 0, 2)
    hidden = torch.randn(2, 7, 1024, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = plain(hidden)
        assert torch.allclose(wide(hidden), want, rtol=1e-4, atol=3e-5 * float(want.abs().max()))
    small = load_span(checkpoints("llama"), 0, 2, pack=True)  # hidden size 64: a call would cost more
    assert not any(isinstance(m, PanelProjection) for m in small.modules())
    for dtype in (torch.bfloat16, torch.float16):  # half the bytes, summed in float32
        half, plain = (load_span(wide_checkpoint, 0, 1, dtype=dtype, pack=pack) for pack in (True, False))
        stored = [m for m in half.modules() if isinstance(m, PanelProjection)]
        assert len(stored) == 4 and {p.panels.dtype for p in stored} == {dtype}
        with torch.inference_mode():
            got, want = half(hidden.to(dtype)), plain(hidden.to(dtype))
        assert got.dtype == dtype and float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2


def test_a_merged_chunk_has_the_bits_of_a_lone_prefill_through_panels(checkpoints):
    """A prefill's chunk merged into a decode step (`server.decode`, `Member.tokens`) gives its rows and cache
    the very bits of the same prefill through `BlockSpan.forward` alone: each panel output is one FMA chain
    whatever rows share the call, and the chunk's attention is `forward`'s call. (Plain weights' matmuls round
    by the rows beside them, so there the two agree within float tolerance only.)"""
    from swarmllm.models import KVCache
    from swarmllm.server.decode import DecodeRunner, Member

    span = load_span(checkpoints("qwen2", **WIDE), 0, 2, pack=True)
    config, generator = span.config, torch.Generator().manual_seed(4)
    prompt, other = torch.randn(1, 5, 1024, generator=generator), torch.randn(2, 1024, generator=generator)
    caches = [KVCache(2, b, 16, config, torch.float32, "cpu") for b in (1, 2, 1)]
    with torch.inference_mode():
        want = span(prompt, cache=caches[2])
        members = [
            Member(other, 4, torch.ones(2, 16, dtype=torch.bool), False, caches[1], None),
            Member(prompt[0], 0, torch.ones(1, 16, dtype=torch.bool), False, caches[0], None, tokens=5),
        ]
        got, _ = DecodeRunner(span, torch.device("cpu")).step_many(members, None, None)
    assert torch.equal(got[2:].view(1, 5, 1024), want)
    assert torch.equal(caches[0].keys, caches[2].keys) and torch.equal(caches[0].values, caches[2].values)


def test_the_kernel_is_built_once_per_source_and_a_failing_compiler_leaves_none(tmp_path, caplog):
    compiler = _compiler()
    library = build(tmp_path, compiler)
    assert library is not None and library.parent == tmp_path
    built = os.stat(library).st_mtime_ns
    assert build(tmp_path, compiler) == library and os.stat(library).st_mtime_ns == built
    assert build(tmp_path, compiler, "avx512") not in (None, library)  # a library per instruction set
    assert build(tmp_path / "other", "false") is None  # a compiler that fails: nothing half-built is left
    assert list((tmp_path / "other").iterdir()) == []
    assert "did not compile" in caplog.text


@pytest.mark.skipif(host_isa() != "avx512", reason="this CPU has no AVX-512")
def test_the_avx2_and_the_avx512_library_give_the_same_bits(threads, monkeypatch):
    """A server built for AVX-512 and one built for AVX2 compute a row the same, bit for bit (each output is one
    FMA chain over the input in order in both): float32, bfloat16, float16, int8 and nf4 panels, padded last
    panels, every row count a block takes (1-8) and more, on 1 thread and 2."""
    libraries = {"avx2": kernel("avx2"), "avx512": kernel("avx512")}
    assert {isa: library.isa for isa, library in libraries.items()} == {"avx2": "avx2", "avx512": "avx512"}
    assert kernel().isa == "avx512"  # what a server here uses
    generator = torch.Generator().manual_seed(11)
    panels = {
        str(dtype): to_panels(torch.randn(200, 128, generator=generator).to(dtype)) for dtype in PANEL_DTYPES
    }
    int8 = to_panels(torch.randint(-127, 128, (200, 128), generator=generator, dtype=torch.int8))
    scales = torch.rand(panel_outputs(200), generator=generator)
    codes = torch.randint(0, 16, (200, 128), generator=generator, dtype=torch.uint8)
    nf4 = (
        *to_nf4_panels(codes, torch.rand(200, 2, generator=generator)),
        torch.randn(16, generator=generator),
    )

    def products(x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {name: panel_matmul(x, weight, 200) for name, weight in panels.items()}
        return {**out, "int8": panel_matmul(x, int8, 200, scales), "nf4": nf4_matmul(x, *nf4, 200)}

    for count in (1, 2):
        threads(count)
        for rows in (*range(1, 10), 13, 16, 300):
            x = torch.randn(rows, 128, generator=generator)
            got = {}
            for isa, library in libraries.items():
                monkeypatch.setattr(panels_module, "kernel", lambda library=library: library)
                got[isa] = products(x)
            for name, want in got["avx2"].items():
                assert torch.equal(got["avx512"][name], want), (name, rows, count)


@pytest.mark.skipif(host_isa() != "avx512", reason="this CPU has no AVX-512")
def test_an_avx512_build_that_fails_falls_back_to_the_avx2_one(tmp_path, monkeypatch):
    """A compiler that cannot build for AVX-512 (here: one that refuses -mavx512f) leaves the AVX2 library, not
    none: the server keeps its panels."""
    compiler = tmp_path / "cxx"
    compiler.write_text(f'#!/bin/sh\ncase "$*" in *-mavx512f*) exit 1;; esac\nexec {_compiler()} "$@"\n')
    compiler.chmod(0o755)
    monkeypatch.setenv("CXX", str(compiler))
    monkeypatch.setenv("SWARMLLM_KERNEL_DIR", str(tmp_path / "kernels"))
    assert kernel.__wrapped__("avx512") is None  # asked for by name: none
    fallback = kernel.__wrapped__()
    assert fallback is not None and fallback.isa == "avx2"
    assert [p.name.split("-")[1] for p in (tmp_path / "kernels").glob("*.so")] == ["avx2"]
    x, weight = torch.randn(3, 64), torch.randn(40, 64)
    panels, y = to_panels(weight), torch.empty(3, 40)
    fallback.by_dtype[torch.float32](x.data_ptr(), 3, 64, panels.data_ptr(), 40, y.data_ptr(), 1)
    assert near(y, x.double() @ weight.double().T)


def test_a_clients_head_copy_is_panels_and_follows_its_weight():
    """`PackedCopy` (a CPU client's LM head) copies a float32 head as panels: the plain product for any rows, and
    the new product once the weight changes in place."""
    torch.manual_seed(0)
    head = torch.nn.Linear(1024, 4096, bias=False).requires_grad_(False)  # (frozen: a client's head)
    copy = PackedCopy()
    with torch.no_grad():
        for rows in (1, 8, 3):
            x = torch.randn(rows, 1024)
            assert near(copy(head, x), x.double() @ head.weight.double().T)
        assert isinstance(copy._copy, PanelProjection) and copy.rows is None
        head.weight.mul_(-2)
        assert near(copy(head, x), x.double() @ head.weight.double().T)
