"""`generate()` at its edges, against transformers' own `generate` on the same checkpoint: inputs_embeds, options
of speculative decoding (transformers' defaults, options it cannot apply, stopping criteria as a list). Each runs
against a real server in this process (no DHT)."""

from __future__ import annotations

import pytest
import torch
from in_process import beside_transformers
from transformers import StoppingCriteria, StoppingCriteriaList

PROMPTS = ["the cat and the dog sat", "hello", "a b c"]


@pytest.fixture(scope="module")
def models(llama_checkpoint):
    """(the model over one in-process server of every block, the local transformers model, its tokenizer)."""
    with beside_transformers(str(llama_checkpoint), "generate-edges") as (model, local, tokenizer):
        model.generation_config.use_cache = False
        yield model, local, tokenizer


def test_generate_from_inputs_embeds_equals_transformers(models):
    """transformers generates from `inputs_embeds` alone (returning the new tokens only) or with the
    `input_ids` beside them (returning them too); a padded batch, with and without an open session."""
    model, local, tokenizer = models
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    embeds = local.get_input_embeddings()(batch["input_ids"]).detach()
    mask = batch["attention_mask"]
    cases = [
        dict(inputs_embeds=embeds, attention_mask=mask),
        dict(input_ids=batch["input_ids"], inputs_embeds=embeds, attention_mask=mask),
    ]
    for inputs in cases:
        want = local.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert model.generate(**inputs, max_new_tokens=6, do_sample=False).tolist() == want.tolist()
        with model.inference_session(max_length=32):
            got = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert got.tolist() == want.tolist()
    sampling = dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=0.8, **cases[0])
    torch.manual_seed(3)
    want = local.generate(**sampling)
    torch.manual_seed(3)
    assert model.generate(**sampling).tolist() == want.tolist()
    with pytest.raises(NotImplementedError):  # each beam's new token comes without the beam it continues
        model.generate(**cases[0], max_new_tokens=6, num_beams=2)


def test_speculative_sampling_keeps_transformers_default_top_k(models):
    """transformers samples from the 50 likeliest tokens when neither the call nor the model's generation
    config sets top_k; so must the speculative loop (its tokens follow the target's warped distribution)."""
    model, local, tokenizer = models
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = local(ids).logits[0, -1]
    allowed = set(logits.topk(50).indices.tolist())
    outside = 1 - torch.softmax(logits, -1)[sorted(allowed)].sum()
    assert outside > 0.2  # a flat tiny model: 40 draws leave the top 50 unless truncated
    generator = torch.Generator().manual_seed(0)
    firsts = [
        int(
            model.generate(ids, max_new_tokens=1, do_sample=True, assistant_model=local, generator=generator)[
                0, -1
            ]
        )
        for _ in range(40)
    ]
    assert set(firsts) <= allowed


@pytest.mark.parametrize(
    "options",
    [
        {"suppress_tokens": [7]},
        {"sequence_bias": {(7,): -5.0}},
        {"forced_eos_token_id": 2},
        {"exponential_decay_length_penalty": (1, 3.0)},
        {"begin_suppress_tokens": [7]},
        {"typical_p": 0.5, "do_sample": True},
        {"epsilon_cutoff": 0.01, "do_sample": True},
        {"eta_cutoff": 0.01, "do_sample": True},
        {"num_return_sequences": 2, "do_sample": True},
    ],
    ids=lambda options: next(iter(options)),
)
def test_speculative_generate_refuses_options_it_would_ignore(models, options):
    """Options that change transformers' tokens (or their number) and that the speculative loop does not
    apply are refused, as its docstring promises, not ignored."""
    model, local, tokenizer = models
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    with pytest.raises(NotImplementedError):
        model.generate(ids, max_new_tokens=6, assistant_model=local, **options)


class _StopAfter(StoppingCriteria):
    def __init__(self, length: int):
        self.length = length

    def __call__(self, input_ids, scores, **kwargs):
        return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)


def test_speculative_generate_takes_stopping_criteria_as_a_list(models):
    """transformers' generate takes `stopping_criteria` as a plain list of criteria; the speculative path too,
    with the same result as a StoppingCriteriaList."""
    model, local, tokenizer = models
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    options = dict(max_new_tokens=12, assistant_model=local, num_assistant_tokens=2)
    want = model.generate(
        ids, stopping_criteria=StoppingCriteriaList([_StopAfter(ids.shape[1] + 2)]), **options
    )
    assert want.shape[1] < ids.shape[1] + 12
    assert model.generate(ids, stopping_criteria=[_StopAfter(ids.shape[1] + 2)], **options).tolist() == (
        want.tolist()
    )


def test_speculative_generate_stops_at_max_time(models):
    """`max_time` bounds a speculative generate too (checked after each round, as its stopping criteria)."""
    model, local, tokenizer = models
    ids = tokenizer("the cat", return_tensors="pt")["input_ids"]
    options = dict(max_new_tokens=12, assistant_model=local, num_assistant_tokens=2)
    assert model.generate(ids, **options).shape[1] == ids.shape[1] + 12
    assert model.generate(ids, max_time=0.0, **options).shape[1] <= ids.shape[1] + 3  # one round


def test_generates_of_other_batch_sizes_in_one_session_equal_transformers(models):
    """Inside one inference session, a generate may expand the batch (beams, several sequences) or shrink it
    (a speculative one) after another: each gives transformers' tokens."""
    model, local, tokenizer = models
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    first = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with model.inference_session(max_length=64):
        got = [model.generate(first, max_new_tokens=4, do_sample=False)]
        got.append(model.generate(got[0], max_new_tokens=4, num_beams=3, do_sample=False))
        got.append(model.generate(**batch, max_new_tokens=4, do_sample=False))
        got.append(model.generate(got[0], max_new_tokens=4, assistant_model=local))
        torch.manual_seed(5)
        got.append(model.generate(got[0], max_new_tokens=4, do_sample=True, num_return_sequences=2))
    want = [local.generate(first, max_new_tokens=4, do_sample=False)]
    want.append(local.generate(want[0], max_new_tokens=4, num_beams=3, do_sample=False))
    want.append(local.generate(**batch, max_new_tokens=4, do_sample=False))
    want.append(local.generate(want[0], max_new_tokens=4, do_sample=False))
    torch.manual_seed(5)
    want.append(local.generate(want[0], max_new_tokens=4, do_sample=True, num_return_sequences=2))
    assert [g.tolist() for g in got] == [w.tolist() for w in want]


def test_petals_style_generates_continue_the_session(models):
    """Petals' chat loop: `generate(new_ids, session=s)`, then `generate(None, session=s)` for each token after,
    each continuing what the session's latest generate returned and returning only its input and new tokens
    (transformers' own tokens over the concatenation), the servers sent only what they do not hold. A padded
    batch continues with its mask; no input inside a `with` block continues too. `session=` was refused as an
    unknown model option, and `generate(None)` started again from BOS."""
    model, local, tokenizer = models
    prompt = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    follow = tokenizer(" and the", return_tensors="pt", add_special_tokens=False)["input_ids"]
    want = local.generate(prompt, max_new_tokens=6, do_sample=False)
    more = local.generate(torch.cat([want, follow], 1), max_new_tokens=3, do_sample=False)
    with model.inference_session(max_length=64) as session:
        got = [model.generate(prompt, max_new_tokens=1, do_sample=False, session=session)]
        got += [model.generate(None, max_new_tokens=1, do_sample=False, session=session) for _ in range(3)]
        got.append(model.generate(max_new_tokens=2, do_sample=False))  # (the active session: the same)
        assert session.position == want.shape[1] - 1  # each call sent its new token alone
        last = model.generate(
            follow, max_new_tokens=3, do_sample=False, session=session, return_dict_in_generate=True
        )
        with pytest.raises(ValueError, match="cannot continue"):
            model.generate(torch.cat([follow, follow]), max_new_tokens=1, session=session)
    assert [g.shape[1] for g in got] == [prompt.shape[1] + 1, 1, 1, 1, 2]
    assert torch.cat(got, 1).tolist() == want.tolist()
    assert last.sequences.tolist() == more[:, want.shape[1] :].tolist()

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    tokenizer.padding_side = side
    want = local.generate(**batch, max_new_tokens=5, do_sample=False)
    with model.inference_session(max_length=64) as session:
        first = model.generate(**batch, max_new_tokens=2, do_sample=False, session=session)
        rest = model.generate(None, max_new_tokens=3, do_sample=False, session=session)
    assert torch.cat([first, rest], 1).tolist() == want.tolist()


def test_per_layer_outputs_are_refused_not_answered_with_none(models):
    """A session's servers return only their last block's hidden states: asking generate for every layer's, or
    for attentions, is an error, as a silent None would only fail later, in the caller's code (a forward outside
    a session gives every layer's states: `test_drop_in.py`)."""
    model, _, tokenizer = models
    ids = tokenizer(PROMPTS[:1], return_tensors="pt")["input_ids"]
    for option in ("output_hidden_states", "output_attentions"):
        with pytest.raises(NotImplementedError, match=option):
            model.generate(
                ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, **{option: True}
            )
    with pytest.raises(NotImplementedError, match="output_attentions"), torch.no_grad():
        model(ids, output_attentions=True)
    out = model.generate(
        ids, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, output_scores=True
    )
    assert out.sequences.shape == (1, ids.shape[1] + 2) and len(out.scores) == 2
