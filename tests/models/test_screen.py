"""`models.screen`: the int8 screen of a CPU LM head finds every output that can be a row's largest, and its
logits' argmax is the full float32 panel product's, ties included, with the kept outputs' values bit for bit the
full product's; where it cannot decide it gives the full product."""

from __future__ import annotations

import pytest
import torch

from swarmllm.models.packed import PackedCopy
from swarmllm.models.panels import dense_weight, kernel, panel_matmul, to_panels
from swarmllm.models.screen import Screen, argmax_logits, candidates

pytestmark = pytest.mark.skipif(kernel() is None, reason="the panel kernel does not run here")


def full_and_screened(weight: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    panels, screen = to_panels(weight), Screen.of(weight)
    return panel_matmul(x, panels, weight.shape[0]), argmax_logits(x, panels, screen)


def assert_same_argmax(full: torch.Tensor, screened: torch.Tensor) -> None:
    assert torch.equal(screened.argmax(-1), full.argmax(-1))
    kept = torch.isfinite(screened)
    assert torch.equal(screened[kept], full[kept])  # the same bits where computed
    assert bool((screened[~kept] == float("-inf")).all())


@pytest.mark.parametrize(
    ("out_features", "in_features"), [(4096, 1024), (4099, 576), (2000, 100), (3000, 64)]
)
def test_the_screened_argmax_is_the_full_products(out_features, in_features):
    generator = torch.Generator().manual_seed(out_features)
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    weight[::7, : in_features // 3] *= 20  # rows and inputs of very different scales
    screen, panels = Screen.of(weight), to_panels(weight)
    for scale in (1e-3, 1.0, 300.0):
        x = torch.randn(9, in_features, generator=generator) * scale
        x[:, 3] *= 100  # an outlier feature, as trained models have
        full, screened = panel_matmul(x, panels, out_features), argmax_logits(x, panels, screen)
        assert_same_argmax(full, screened)
        estimates = panel_matmul(x, screen.codes, out_features, screen.scales)
        assert bool(((full - estimates).abs() <= screen.bounds(x)).all())
        kept = candidates(estimates, screen.bounds(x)).sum(-1)
        assert int(kept.max()) < out_features // 20  # it screens: few outputs left


def test_the_bound_holds_where_the_input_lines_up_with_the_residual():
    """Cauchy-Schwarz is tight for an input along an output's residual: the bound still holds, with no room to
    spare beyond its rounding terms."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(512, 256, generator=generator)
    screen = Screen.of(weight)
    residual = (
        weight.double() - dense_weight(screen.codes, 512, screen.scales).double()
    )  # what the codes miss
    x = (residual[5] / residual[5].norm() * 40).float()[None]
    full = panel_matmul(x, to_panels(weight), 512)
    estimates = panel_matmul(x, screen.codes, 512, screen.scales)
    gap, bound = float((full - estimates).abs()[0, 5]), float(screen.bounds(x)[0, 5])
    assert gap <= bound < gap * 1.02


def test_ties_and_near_ties_pick_the_full_products_index():
    """Equal rows give equal logits (the first index wins); rows a bit apart give logits an ulp apart. The screen
    keeps all of them and the full product's argmax stays."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(4096, 256, generator=generator) * 0.02
    x = torch.randn(4, 256, generator=generator)
    top = int((x[0] @ weight.T).argmax())
    weight[3000], weight[17] = weight[top], weight[top]  # two copies of the top row, one before it
    weight[2500] = weight[top] * (1 + 2**-23)  # and one an ulp or so larger
    full, screened = full_and_screened(weight, x)
    assert_same_argmax(full, screened)
    assert int(screened[0].argmax()) in (17, 2500)


def test_candidates_are_the_outputs_that_can_be_largest():
    """Against a brute-force oracle: output i can be largest iff, at the top of its interval, it reaches every
    other output at the bottom of theirs."""
    generator = torch.Generator().manual_seed(3)
    for _ in range(50):
        estimates = torch.randn(3, 40, generator=generator)
        bounds = torch.rand(3, 40, generator=generator) * 0.5
        want = torch.zeros(3, 40, dtype=torch.bool)
        for r in range(3):
            for i in range(40):
                others = [estimates[r, k] - bounds[r, k] for k in range(40) if k != i]
                want[r, i] = bool(estimates[r, i] + bounds[r, i] >= max(others))
        assert torch.equal(candidates(estimates, bounds), want)


def test_what_the_screen_cannot_decide_gets_the_full_product():
    generator = torch.Generator().manual_seed(4)
    weight = torch.randn(2048, 128, generator=generator)
    panels, screen = to_panels(weight), Screen.of(weight)
    for x in (
        torch.full((2, 128), float("nan")),
        torch.full((1, 128), float("inf")),
        torch.full((1, 128), 3e37),  # sums overflow
        torch.empty(0, 128),
    ):
        full, screened = panel_matmul(x, panels, 2048), argmax_logits(x, panels, screen)
        assert torch.equal(full.isnan(), screened.isnan())
        assert torch.equal(full.nan_to_num(), screened.nan_to_num())
    # every row the same: every output can be largest, more than MAX_SHARE of the panels
    same = weight[:1].expand(2048, 128).contiguous()
    x = torch.randn(1, 128, generator=generator)
    full, screened = full_and_screened(same, x)
    assert torch.equal(full, screened)  # every logit, none -inf
    assert Screen.of(torch.full((64, 32), float("nan"))) is None


def test_a_clients_head_copy_screens_greedy_steps_and_follows_its_weight():
    """`PackedCopy.argmax_logits`: through the screen for a float32 head, the screen made anew when the weight
    changes in place; a bfloat16 head (no panel copy) and a head with non-finite weights get full logits."""
    torch.manual_seed(5)
    head = torch.nn.Linear(256, 8192, bias=False).requires_grad_(False)  # (frozen: a client's head)
    copy = PackedCopy()
    with torch.no_grad():
        x = torch.randn(3, 256)
        assert_same_argmax(copy(head, x), copy.argmax_logits(head, x))
        assert copy.screened_calls == 1
        head.weight.mul_(-1)
        flipped = copy.argmax_logits(head, x)
        assert_same_argmax(panel_matmul(x, to_panels(head.weight), 8192), flipped)
        assert copy.screened_calls == 2
        head.weight[0, 0] = float("nan")
        assert torch.equal(copy.argmax_logits(head, x).isnan(), copy(head, x).isnan())
        assert copy.screened_calls == 2
        half = torch.nn.Linear(256, 8192, bias=False).to(torch.bfloat16).requires_grad_(False)
        xb = x.to(torch.bfloat16)
        assert torch.equal(copy.argmax_logits(half, xb), copy(half, xb))
        assert copy.screened_calls == 2


def test_a_screen_made_in_chunks_is_the_whole_ones():
    generator = torch.Generator().manual_seed(6)
    weight = torch.randn(1000, 300, generator=generator) * 0.1
    whole, chunked = Screen.of(weight), Screen.of(weight, chunk_outputs=48)
    assert torch.equal(whole.codes, chunked.codes)
    assert torch.equal(whole.scales, chunked.scales)
    assert torch.equal(whole.terms, chunked.terms)
    weight[999, 7] = float("inf")  # in the last chunk only
    assert Screen.of(weight, chunk_outputs=48) is None
    with pytest.raises(ValueError, match="whole panels"):
        Screen.of(weight, chunk_outputs=40)


def test_a_head_too_large_to_copy_is_screened_from_its_plain_weight():
    """`PackedCopy.argmax_logits` for a float32 head over `max_copy_bytes`: no copy is kept, the screen's codes
    are, and the outputs it leaves are computed from the plain weight with the full panel product's bits; the
    screen follows the weight, and what it cannot decide gets the plain product."""
    torch.manual_seed(7)
    head = torch.nn.Linear(256, 8191, bias=False).requires_grad_(False)  # (8191: the last panel is padded)
    copy = PackedCopy(max_copy_bytes=4 << 20)  # the head is 8 MB: too large to copy, its 2 MB of codes fit
    with torch.no_grad():
        x = torch.randn(5, 256)
        x[:, 3] *= 50
        screened = copy.argmax_logits(head, x)
        assert copy.screened_calls == 1 and copy._copy is None
        assert_same_argmax(panel_matmul(x, to_panels(head.weight), 8191), screened)
        assert torch.equal(screened.argmax(-1), head(x).argmax(-1))
        assert int(torch.isfinite(screened).sum()) < 8191 * 5 // 20  # it screens: few outputs left
        head.weight.mul_(-1)
        assert_same_argmax(panel_matmul(x, to_panels(head.weight), 8191), copy.argmax_logits(head, x))
        assert copy.screened_calls == 2
        nan = torch.full((1, 256), float("nan"))
        assert bool(copy.argmax_logits(head, nan).isnan().all())  # the plain product's
        assert torch.equal(copy(head, x), head(x))  # full logits: plain, no copy either
        assert copy._copy is None
        huge = PackedCopy(max_copy_bytes=1 << 20)  # codes over the limit too: the plain product
        assert torch.equal(huge.argmax_logits(head, x), head(x))
        assert huge.screened_calls == 0
