"""`generate()` through a real swarm (a bootstrap peer and two server processes on 127.0.0.1) against
transformers' own `generate` on the same checkpoint, over generation options and their combinations drawn at
random from fixed seeds: greedy, seeded sampling, beam search and beam sampling with their warpers and processors,
EOS lists, padded batches, several sequences, `max_length` or `max_new_tokens`, GenerationConfig objects, a
session held across the call or not, and the scores and logits of `return_dict_in_generate`. Tokens must be
equal (seeded sampling too: the same draws from the same logits) and scores and logits within float tolerance."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from swarmllm import AutoDistributedModelForCausalLM
from swarmllm.local import LocalSwarm

SPLIT = [(0, 2), (2, 4)]
CACHE_TOKENS = 2048  # each server's; a client may hold half of it (`--max-cache-share-per-peer`)
TEXTS = [
    "the cat and the dog sat",
    "hello",
    "a b c",
    "the moon and the sea",
    "cat",
    "the sun is",
    "b c d e f g h",
]
# tokens the tiny model often generates: EOS candidates that do stop it
LIKELY = [50, 98, 143, 91, 9, 88, 4, 5]


@pytest.fixture(scope="module")
def models(llama_checkpoint):
    """(the model through a swarm of 2 servers, the local transformers model, its tokenizer, left-padding)."""
    path = str(llama_checkpoint)
    with LocalSwarm() as local:
        local.start_bootstrap()
        local.add_servers([(path, span) for span in SPLIT], extra=["--max-cache-tokens", str(CACHE_TOKENS)])
        # a server lost would fail a test at once rather than after a minute's wait for another one
        remote = AutoDistributedModelForCausalLM.from_pretrained(
            path, initial_peers=local.initial_peers, missing_blocks_timeout_s=5
        )
        reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(path)
        tokenizer.padding_side = "left"
        try:
            yield remote, reference, tokenizer
        finally:
            remote.shutdown()


def _random_options(rng: random.Random, vocab: int) -> dict:
    """A random combination of generation options, each as transformers takes it."""
    options: dict = {"max_new_tokens" if rng.random() < 0.7 else "max_length": rng.randint(1, 10)}
    mode = rng.choice(["greedy", "sample", "beam", "beam_sample"])
    options["do_sample"] = mode in ("sample", "beam_sample")
    if options["do_sample"]:
        if rng.random() < 0.5:
            options["temperature"] = rng.choice([0.5, 0.9, 1.5])
        if rng.random() < 0.5:
            options["top_k"] = rng.choice([0, 1, 3, 20])
        if rng.random() < 0.4:
            options["top_p"] = rng.choice([0.3, 0.8, 0.95])
        if rng.random() < 0.3:
            options["min_p"] = rng.choice([0.05, 0.2])
        if rng.random() < 0.2:
            options["typical_p"] = rng.choice([0.5, 0.9])
    if mode.startswith("beam"):
        options["num_beams"] = rng.randint(2, 4)
        if rng.random() < 0.5:
            options["length_penalty"] = rng.choice([-1.0, 0.0, 0.5, 2.0])
        if rng.random() < 0.5:
            options["early_stopping"] = rng.choice([True, False, "never"])
        if rng.random() < 0.5:
            options["num_return_sequences"] = rng.randint(1, options["num_beams"])
    elif mode == "sample" and rng.random() < 0.4:
        options["num_return_sequences"] = rng.randint(1, 3)
    if rng.random() < 0.3:
        options["repetition_penalty"] = rng.choice([0.8, 1.2, 2.0])
    if rng.random() < 0.3:
        options["no_repeat_ngram_size"] = rng.choice([1, 2, 3])
    if rng.random() < 0.2:
        options["bad_words_ids"] = [
            [rng.randrange(3, vocab)],
            [rng.randrange(3, vocab), rng.randrange(3, vocab)],
        ]
    if rng.random() < 0.2:
        options["suppress_tokens"] = rng.sample(range(3, vocab), 3)
    if rng.random() < 0.2:
        options["begin_suppress_tokens"] = rng.sample(range(3, vocab), 3)
    if rng.random() < 0.4:
        options["eos_token_id"] = [2, *rng.sample(LIKELY, rng.randint(1, 3))]
    if rng.random() < 0.3:
        options["pad_token_id"] = rng.choice([0, 7])
    if rng.random() < 0.3:
        if rng.random() < 0.5:
            options["min_new_tokens"] = rng.randint(1, 6)
        else:
            options["min_length"] = rng.randint(3, 12)
    if rng.random() < 0.5:
        options["return_dict_in_generate"] = True
        options["output_scores"] = rng.random() < 0.7
        options["output_logits"] = rng.random() < 0.7
    return options


def _assert_same_output(got, want) -> None:
    """Equal sequences; equal scores, logits, beam scores and indices within float tolerance."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor)
        assert got.tolist() == want.tolist()
        return
    assert got.sequences.tolist() == want.sequences.tolist()
    for key in ("scores", "logits", "sequences_scores", "beam_indices"):
        ours, theirs = getattr(got, key, None), getattr(want, key, None)
        assert (ours is None) == (theirs is None), key
        if theirs is None:
            continue
        if isinstance(theirs, tuple):
            assert len(ours) == len(theirs), key
            for a, b in zip(ours, theirs):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=key)
        else:
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.parametrize("seed", range(4))
def test_random_option_combinations_equal_transformers(models, seed):
    remote, reference, tokenizer = models
    rng = random.Random(seed)
    for case in range(6):
        options = _random_options(rng, reference.config.vocab_size)
        batch = tokenizer(rng.sample(TEXTS, rng.randint(1, 3)), return_tensors="pt", padding=True)
        if "max_length" in options:
            options["max_length"] += batch["input_ids"].shape[1]
        as_config = rng.random() < 0.25
        in_session = rng.random() < 0.3
        kwargs = {"generation_config": GenerationConfig(**options)} if as_config else options
        where = (
            f"seed {seed} case {case}: {options}, as a GenerationConfig: {as_config}, session: {in_session}"
        )
        torch.manual_seed(1000 * seed + case)
        want = reference.generate(**batch, **kwargs)
        torch.manual_seed(1000 * seed + case)
        if in_session:
            with remote.inference_session(max_length=64):
                got = remote.generate(**batch, **kwargs)
        else:
            got = remote.generate(**batch, **kwargs)
        try:
            _assert_same_output(got, want)
        except AssertionError as e:
            raise AssertionError(f"{where}: {e}") from None


def test_generation_config_object_takes_the_models_max_new_tokens(models):
    """transformers fills what a GenerationConfig passed to `generate` leaves unset from the model's own
    generation config, so the model's `max_new_tokens` (30 here) counts: the swarm's session must be long
    enough for it (it was sized for 20 tokens and the generate failed with 'max_length 26 is too small')."""
    remote, reference, tokenizer = models
    batch = tokenizer(TEXTS[:3], return_tensors="pt", padding=True)
    try:
        for model in (remote, reference):
            model.generation_config.max_new_tokens = 30
        for config in (GenerationConfig(do_sample=False), GenerationConfig(do_sample=False, max_length=12)):
            want = reference.generate(**batch, generation_config=config)
            assert want.shape[1] == batch["input_ids"].shape[1] + 30
            assert remote.generate(**batch, generation_config=config).tolist() == want.tolist()
    finally:
        for model in (remote, reference):
            model.generation_config.max_new_tokens = None


def test_speculative_generate_with_a_generation_config_takes_the_models_eos_and_length(models):
    """With `assistant_model` too, a GenerationConfig passed to `generate` is completed from the model's own:
    its EOS ends the answer (the speculative loop went on past it) and its `max_new_tokens` counts (it made
    20 tokens, transformers' default, instead of the model's 12). Greedy: the tokens of transformers' plain
    generate."""
    remote, reference, tokenizer = models
    ids = torch.tensor([[1, 30, 40, 50]])  # greedily: one token, then EOS (2)
    config = GenerationConfig(do_sample=False, max_new_tokens=8)
    want = reference.generate(ids, generation_config=config)
    assert want[0, -1] == reference.generation_config.eos_token_id and want.shape[1] < ids.shape[1] + 8
    got = remote.generate(ids, generation_config=config, assistant_model=reference, num_assistant_tokens=3)
    assert got.tolist() == want.tolist()
    ids = tokenizer(TEXTS[:1], return_tensors="pt")["input_ids"]
    try:
        for model in (remote, reference):
            model.generation_config.max_new_tokens = 12
        want = reference.generate(ids, generation_config=GenerationConfig(do_sample=False))
        assert want.shape[1] == ids.shape[1] + 12
        got = remote.generate(
            ids, generation_config=GenerationConfig(do_sample=False), assistant_model=reference
        )
        assert got.tolist() == want.tolist()
    finally:
        for model in (remote, reference):
            model.generation_config.max_new_tokens = None


def test_speculative_generate_refuses_pad_tokens_that_transformers_would_mask(models):
    """Without an attention_mask, transformers takes the pad token's occurrences in the prompt for padding
    (unless it is an EOS) and masks them; the speculative loop, which takes one unpadded sequence, must refuse
    such a prompt as it refuses a mask with zeros, not decode the pads as text (other tokens than transformers')."""
    remote, reference, _ = models
    pad = reference.generation_config.pad_token_id
    for ids, options in (
        (torch.tensor([[pad, pad, 5, 6, 7]]), {}),  # left-padded, the model's pad token
        (torch.tensor([[5, 6, 7, 8, 9]]), {"pad_token_id": 7}),
    ):
        masked = reference.generate(ids, max_new_tokens=6, do_sample=False, **options)
        unmasked = reference.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False, **options
        )
        assert masked.tolist() != unmasked.tolist()  # transformers did mask them
        with pytest.raises(ValueError, match="unpadded"):
            remote.generate(ids, max_new_tokens=6, assistant_model=reference, **options)
    eos = torch.tensor([[5, 6, 2, 7]])  # the pad token equal to an EOS: not taken for padding
    want = reference.generate(eos, max_new_tokens=6, do_sample=False, pad_token_id=2)
    assert remote.generate(eos, max_new_tokens=6, assistant_model=reference, pad_token_id=2).tolist() == (
        want.tolist()
    )


def test_generate_from_unpadded_inputs_embeds_equals_transformers(models):
    """transformers drops an attention mask of all ones and then sends each token after `inputs_embeds`
    alone: it continues what the session holds (the second token was computed from the first alone, as if
    the prompt were not there). One row and a batch, with and without `input_ids` beside the embeddings, the
    mask given or not, greedy, seeded sampling of several sequences, inside a session or not."""
    remote, reference, tokenizer = models
    for texts in (TEXTS[:1], TEXTS[3:4] * 2):
        ids = tokenizer(texts, return_tensors="pt")["input_ids"]
        embeds = reference.get_input_embeddings()(ids).detach()
        cases = [
            dict(inputs_embeds=embeds),
            dict(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)),
            dict(input_ids=ids, inputs_embeds=embeds),
        ]
        for inputs in cases:
            want = reference.generate(**inputs, max_new_tokens=6, do_sample=False)
            assert remote.generate(**inputs, max_new_tokens=6, do_sample=False).tolist() == want.tolist()
            with remote.inference_session(max_length=32):
                got = remote.generate(**inputs, max_new_tokens=6, do_sample=False)
            assert got.tolist() == want.tolist()
        sampling = dict(
            inputs_embeds=embeds, max_new_tokens=6, do_sample=True, top_k=20, num_return_sequences=2
        )
        torch.manual_seed(7)
        want = reference.generate(**sampling)
        torch.manual_seed(7)
        assert remote.generate(**sampling).tolist() == want.tolist()
