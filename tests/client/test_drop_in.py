"""The client as a drop-in `transformers` model: what a transformers user does with a causal LM (pipelines,
streamers, losses, tuple outputs, scores, padded batches, resizing the vocabulary), against transformers' own
`AutoModelForCausalLM` on the same checkpoint. Each runs against a real server in this process (no DHT)."""

from __future__ import annotations

import logging
import threading

import pytest
import torch
from in_process import beside_transformers, model_over_one_server
from transformers import (
    AutoModelForCausalLM,
    TextIteratorStreamer,
    TextStreamer,
    pipeline,
)

PROMPTS = ["the cat and the dog sat", "hello", "a b c"]


@pytest.fixture(scope="module")
def models(llama_checkpoint):
    """(the model over one in-process server of every block, the local transformers model, its tokenizer)."""
    with beside_transformers(str(llama_checkpoint), "drop-in") as (model, local, tokenizer):
        yield model, local, tokenizer


def test_text_generation_pipeline_equals_transformers(models, caplog):
    """Its outputs are transformers', and it makes no error record (transformers' pipeline logs one, of a few KB,
    for a class outside its list: that ours is "not supported")."""
    model, local, tokenizer = models
    with caplog.at_level(logging.ERROR):
        ours = pipeline("text-generation", model=model, tokenizer=tokenizer)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    theirs = pipeline("text-generation", model=local, tokenizer=tokenizer)
    for options in [{}, {"return_full_text": False}]:
        want = theirs(PROMPTS[0], max_new_tokens=8, do_sample=False, **options)
        assert ours(PROMPTS[0], max_new_tokens=8, do_sample=False, **options) == want
    # a padded batch of prompts of different lengths
    options = dict(max_new_tokens=6, do_sample=False, batch_size=len(PROMPTS), return_full_text=False)
    assert ours(PROMPTS, **options) == theirs(PROMPTS, **options)


def test_streamers_stream_the_returned_text(models, capsys):
    model, local, tokenizer = models
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    want = local.generate(ids, max_new_tokens=8, do_sample=False)
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True)
    out = {}
    thread = threading.Thread(
        target=lambda: out.update(
            ids=model.generate(ids, max_new_tokens=8, do_sample=False, streamer=streamer)
        )
    )
    thread.start()
    streamed = "".join(streamer)
    thread.join()
    assert out["ids"].tolist() == want.tolist()
    assert streamed == tokenizer.decode(want[0, ids.shape[1] :])
    capsys.readouterr()
    model.generate(ids, max_new_tokens=8, do_sample=False, streamer=TextStreamer(tokenizer))
    assert capsys.readouterr().out.strip() == tokenizer.decode(want[0]).strip()


def test_loss_and_logits_equal_transformers(models):
    """`labels` with -100 on the pads of a right-padded batch (as transformers' collators pad for training)."""
    model, local, tokenizer = models
    tokenizer.padding_side = "right"
    try:
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = "left"
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        for inputs in [dict(input_ids=batch["input_ids"][:1, :6]), dict(batch)]:
            lab = labels[: inputs["input_ids"].shape[0], : inputs["input_ids"].shape[1]]
            ours, theirs = model(**inputs, labels=lab), local(**inputs, labels=lab)
            real = inputs.get("attention_mask", torch.ones_like(inputs["input_ids"])).bool()
            assert torch.allclose(ours.logits[real], theirs.logits[real], atol=1e-5)
            assert torch.allclose(ours.loss, theirs.loss, atol=1e-5)


def test_return_dict_false_gives_a_tuple_as_transformers(models):
    model, local, tokenizer = models
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        theirs = local(ids, labels=ids, return_dict=False, use_cache=False)
        ours = model(ids, labels=ids, return_dict=False, use_cache=False)
        assert isinstance(ours, tuple) and len(ours) == len(theirs) == 2
        loss, logits = ours
        assert torch.allclose(loss, theirs[0], atol=1e-5)
        assert torch.allclose(logits, theirs[1], atol=1e-5)
        (logits,) = model(ids, return_dict=False)
        assert torch.allclose(logits, theirs[1], atol=1e-5)
        assert model(ids, return_dict=True).logits.shape == logits.shape


def test_every_layers_hidden_states_are_transformers_also_when_the_config_asks(models):
    """`output_hidden_states` (the call's, else the config's, as transformers reads it): the input embeddings, the
    states after each block and the last through the final norm, transformers' own; in a tuple output too."""
    model, local, tokenizer = models
    batch = tokenizer(PROMPTS[:2], return_tensors="pt", padding=True)
    real = batch["attention_mask"].bool()
    with torch.no_grad():
        want = local(**batch, output_hidden_states=True)
        got = model(**batch, output_hidden_states=True)
        assert len(got.hidden_states) == len(want.hidden_states) == local.config.num_hidden_layers + 1
        for i, (mine, theirs) in enumerate(zip(got.hidden_states, want.hidden_states, strict=True)):
            torch.testing.assert_close(
                mine[real], theirs[real], rtol=1e-4, atol=1e-5, msg=f"hidden_states[{i}]"
            )
        torch.testing.assert_close(got.logits[real], want.logits[real], rtol=1e-4, atol=1e-5)
        model.config.output_hidden_states = True
        try:
            assert len(model(**batch).hidden_states) == len(want.hidden_states)
            assert model(**batch, output_hidden_states=False).hidden_states is None  # the call's word wins
            logits, states = model(**batch, return_dict=False)
            torch.testing.assert_close(states[2][real], want.hidden_states[2][real], rtol=1e-4, atol=1e-5)
        finally:
            model.config.output_hidden_states = False


def test_attentions_are_refused_also_when_the_config_asks(models):
    """The servers return no attention weights: asking for them is refused rather than answered with None."""
    model, _, tokenizer = models
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with pytest.raises(NotImplementedError, match="output_attentions"):
        model(ids, output_attentions=True)
    model.config.output_attentions = True
    try:
        with pytest.raises(NotImplementedError, match="output_attentions"):
            model(ids)
        assert model(ids, output_attentions=False).logits.shape[1] == ids.shape[1]  # the call's word wins
    finally:
        model.config.output_attentions = False


def test_model_attributes_and_modes(models):
    model, local, tokenizer = models
    assert model.config.vocab_size == local.config.vocab_size
    assert model.device == local.device and model.dtype == local.dtype
    assert model.generation_config.eos_token_id == local.generation_config.eos_token_id
    assert torch.equal(model.get_input_embeddings().weight, local.get_input_embeddings().weight)
    assert model.num_parameters() > 0
    assert model.train().training and not model.eval().training
    assert model.to("cpu") is model
    ids = tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    want = local.generate(ids, max_new_tokens=5, do_sample=False).tolist()
    with torch.no_grad():
        assert model.generate(ids, max_new_tokens=5, do_sample=False).tolist() == want
    with torch.inference_mode():
        assert model.generate(ids, max_new_tokens=5, do_sample=False).tolist() == want


def test_scores_and_transition_scores_equal_transformers(models):
    model, local, tokenizer = models
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    for options in [dict(), dict(num_beams=2)]:
        options.update(max_new_tokens=4, do_sample=False, return_dict_in_generate=True, output_scores=True)
        ours, theirs = model.generate(**batch, **options), local.generate(**batch, **options)
        assert ours.sequences.tolist() == theirs.sequences.tolist()
        assert len(ours.scores) == len(theirs.scores)
        for a, b in zip(ours.scores, theirs.scores):
            assert a.shape == b.shape and torch.allclose(a, b, atol=1e-4)
        beams = getattr(theirs, "beam_indices", None)
        ours_t = model.compute_transition_scores(ours.sequences, ours.scores, beams, normalize_logits=True)
        theirs_t = local.compute_transition_scores(
            theirs.sequences, theirs.scores, beams, normalize_logits=True
        )
        assert torch.allclose(ours_t, theirs_t, atol=1e-4)


def test_padded_batch_without_pad_token_id_equals_transformers(models):
    """With the generation config's `pad_token_id` unset, transformers pads finished rows with EOS."""
    model, local, tokenizer = models
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    pads = model.generation_config.pad_token_id, local.generation_config.pad_token_id
    model.generation_config.pad_token_id = local.generation_config.pad_token_id = None
    try:
        want = local.generate(**batch, max_new_tokens=8, do_sample=False)
        assert model.generate(**batch, max_new_tokens=8, do_sample=False).tolist() == want.tolist()
    finally:
        model.generation_config.pad_token_id, local.generation_config.pad_token_id = pads


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_resize_token_embeddings_resizes_the_client_head_as_transformers(checkpoints, family):
    """The client holds the embeddings and the LM head, so resizing the vocabulary (new tokens for a tokenizer)
    is the client's: its logits then equal transformers' resized model's, new tokens included; a tied checkpoint
    (Qwen2) stays tied."""
    path = str(checkpoints(family))
    local = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    vocab = local.config.vocab_size
    with model_over_one_server(path, f"drop-in-resize-{family}") as model:
        ids = torch.tensor([[1, 5, 9, 13, 17]])
        with torch.no_grad():
            before = model(ids).logits
        embeddings = model.resize_token_embeddings(vocab + 7)
        local.resize_token_embeddings(vocab + 7)
        assert embeddings is model.get_input_embeddings()
        assert embeddings.weight.shape[0] == model.config.vocab_size == vocab + 7
        head = model.get_output_embeddings()
        assert head.weight.shape[0] == vocab + 7
        tied = bool(local.config.tie_word_embeddings)
        assert (head.weight is embeddings.weight) == tied
        with torch.no_grad():  # the same new rows on both sides
            local.get_input_embeddings().weight.copy_(embeddings.weight)
            local.get_output_embeddings().weight.copy_(head.weight)
            after = model(ids).logits
            assert torch.allclose(after[..., :vocab], before, atol=1e-5) or tied
            new_ids = torch.tensor([[1, 5, vocab + 3, 9, vocab + 6]])
            want = local(new_ids).logits
            assert torch.allclose(model(new_ids).logits, want, atol=1e-5)
            want = local.generate(new_ids, max_new_tokens=4, do_sample=False)
            assert model.generate(new_ids, max_new_tokens=4, do_sample=False).tolist() == want.tolist()


def test_trained_new_token_rows_are_saved_and_load_once_the_vocabulary_is_resized_alike(
    llama_checkpoint, tmp_path
):
    """New tokens' embeddings trained (unfrozen after `resize_token_embeddings`) are saved by `save_pretrained`;
    a model of the base vocabulary is told to resize first, to what size, and once resized loads them and
    computes the trained model's logits."""
    from swarmllm.models import load_client_head

    path = str(llama_checkpoint)
    with model_over_one_server(path, "drop-in-resize-save") as model:
        vocab = model.config.vocab_size
        model.resize_token_embeddings(vocab + 3)
        model.get_input_embeddings().weight.requires_grad_(True)
        with torch.no_grad():
            model.get_input_embeddings().weight[vocab:] += 1.0  # as training would have moved them
        model.save_pretrained(tmp_path)
        ids = torch.tensor([[1, vocab + 1, 9, vocab + 2]])
        with torch.no_grad():
            want = model(ids).logits
        config, head = load_client_head(path)
        fresh = type(model)(config, head, model.swarm).eval()
        with pytest.raises(ValueError, match=rf"resize_token_embeddings\({vocab + 3}\) first"):
            fresh.load_adapter(tmp_path)
        fresh.resize_token_embeddings(vocab + 3)
        fresh.load_adapter(tmp_path)
        with torch.no_grad():
            # (over the base vocabulary: the untied head's new rows, not trained here, are each model's own draw)
            assert torch.allclose(fresh(ids).logits[..., :vocab], want[..., :vocab], atol=1e-6)
