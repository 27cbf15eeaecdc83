"""A greedy generate's LM head through the int8 screen (`models.screen`): tokens equal to transformers', the
screen used at every step of a generate with no logits processors and no scores, and not where either asks for
the full logits; a prompt's logits only where generate reads them (`logits_to_keep`). The head here is large
enough for the client to copy (8,192 x 128 values); against one in-process server of every block."""

from __future__ import annotations

import pytest
import torch
from in_process import beside_transformers, perturbed

from swarmllm.models.panels import kernel

pytestmark = pytest.mark.skipif(kernel() is None, reason="the panel kernel does not run here")
PROMPTS = ["the cat and the dog sat", "hello", "a b c d e f"]


@pytest.fixture(scope="module")
def models(checkpoints):
    path = checkpoints("llama", hidden_size=128, vocab_size=8192)
    with beside_transformers(str(path), "screen") as (model, local, tokenizer):
        yield model, local, tokenizer


def test_greedy_generates_go_through_the_screen_with_transformers_tokens(models):
    model, local, tokenizer = models
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        before = model.head_copy.screened_calls
        ours = model.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        assert (
            ours.tolist()
            == local.generate(ids, max_new_tokens=10, do_sample=False, min_new_tokens=10).tolist()
        )
        assert model.head_copy.screened_calls == before  # min_new_tokens: a processor, so full logits
        ours = model.generate(ids, max_new_tokens=10, do_sample=False)
        assert ours.tolist() == local.generate(ids, max_new_tokens=10, do_sample=False).tolist()
        assert model.head_copy.screened_calls == before + ours.shape[1] - ids.shape[1]  # every step's head
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    ours = model.generate(**batch, max_new_tokens=8, do_sample=False)
    assert ours.tolist() == local.generate(**batch, max_new_tokens=8, do_sample=False).tolist()


def test_generates_that_read_logits_get_them_in_full(models):
    """Scores, raw logits and processors (a repetition penalty) see every logit: no screen."""
    model, local, tokenizer = models
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    before = model.head_copy.screened_calls
    options = dict(max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
    for extra in ({"output_scores": True}, {"output_logits": True}, {"repetition_penalty": 1.5}):
        ours, want = model.generate(ids, **options, **extra), local.generate(ids, **options, **extra)
        assert ours.sequences.tolist() == want.sequences.tolist()
        for got, expected in zip(
            ours.scores or ours.logits or (), want.scores or want.logits or (), strict=True
        ):
            assert bool(torch.isfinite(got).all())
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert model.head_copy.screened_calls == before


def test_logits_to_keep_keeps_the_last_positions(models):
    model, local, tokenizer = models
    ids = tokenizer(PROMPTS[2], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        every = model(ids).logits
        torch.testing.assert_close(every, local(ids).logits, rtol=1e-4, atol=1e-4)
        assert torch.equal(model(ids, logits_to_keep=1).logits, every[:, -1:])
        assert torch.equal(model(ids, logits_to_keep=3).logits, every[:, -3:])
        assert torch.equal(model(ids, logits_to_keep=torch.tensor([0, 2])).logits, every[:, [0, 2]])


def test_greedy_speculative_decoding_screens_its_verify_steps(models, checkpoints):
    """With a draft (`assistant_model`), greedy and nothing reading the logits: each round's verify step goes
    through the screen, and the tokens stay plain greedy decoding's; a `record_logits` callback turns it off."""
    model, local, tokenizer = models
    draft = perturbed(checkpoints("llama", hidden_size=128, vocab_size=8192), noise=0.02)
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    want = local.generate(ids, max_new_tokens=12, do_sample=False)
    before = model.head_copy.screened_calls
    assert (
        model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=draft).tolist()
        == want.tolist()
    )
    assert model.head_copy.screened_calls > before
    before, recorded = model.head_copy.screened_calls, []
    out = model.generate(
        ids, max_new_tokens=12, do_sample=False, assistant_model=draft, record_logits=recorded.append
    )
    assert out.tolist() == want.tolist() and recorded
    assert all(bool(torch.isfinite(logits).all()) for logits in recorded)
    assert model.head_copy.screened_calls == before
