"""Embeddings' pooling and batching (`api.embeddings`) without a swarm: batches against a brute-force check of
their rules, the last real token under either padding, base64 as the official client decodes it, and batched
inputs through a real transformers model equal to each input alone."""

import base64
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from swarmllm.api.app import MAX_EMBED_TOKENS, Api
from swarmllm.api.embeddings import batches, embed, encoded, unit
from swarmllm.api.schemas import ApiError, EmbeddingRequest
from swarmllm.client.model import last_tokens


@pytest.mark.parametrize("seed", range(60))
def test_batches_hold_every_input_once_within_their_budget_in_length_order(seed):
    rng = random.Random(seed)
    lengths = [rng.choice([1, 2, 5, 30, 200, 900, 5000]) for _ in range(rng.randrange(0, 40))]
    max_tokens, max_rows = rng.choice([64, 1000, 4096]), rng.choice([1, 3, 16])
    out = batches(lengths, max_tokens, max_rows)
    assert sorted(i for batch in out for i in batch) == list(range(len(lengths)))
    order = [lengths[i] for batch in out for i in batch]
    assert order == sorted(order)
    for batch in out:
        assert len(batch) <= max_rows
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= max_tokens
    # greedy: no batch could have taken the next one's first input
    for a, b in zip(out, out[1:], strict=False):
        longest = lengths[b[0]]
        assert len(a) == max_rows or (len(a) + 1) * longest > max_tokens


def test_the_last_real_token_under_right_or_left_padding():
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]])
    assert torch.equal(last_tokens(hidden, right), torch.stack([hidden[0, 1], hidden[1, 3]]))
    assert torch.equal(last_tokens(hidden, left), torch.stack([hidden[0, 3], hidden[1, 3]]))


def test_unit_vectors_and_their_first_dimensions():
    vectors = torch.randn(5, 16, dtype=torch.float64)
    whole, cut = unit(vectors), unit(vectors, 4)
    assert whole.dtype == torch.float32 and cut.shape == (5, 4)
    torch.testing.assert_close(whole.norm(dim=-1), torch.ones(5))
    torch.testing.assert_close(cut, unit(vectors[:, :4]))
    torch.testing.assert_close(
        cut * vectors[:, :4].norm(dim=-1, keepdim=True).float(), vectors[:, :4].float()
    )


def test_base64_is_what_the_official_client_decodes():
    vector = torch.randn(37)
    text = encoded(vector, "base64")
    decoded = np.frombuffer(base64.b64decode(text), dtype="float32")  # (openai's client does this)
    assert np.array_equal(decoded, vector.numpy())
    assert encoded(vector, "float") == vector.tolist()


class Reference:
    """A distributed model's `hidden_states` as transformers computes them in one process."""

    def __init__(self, model: LlamaForCausalLM):
        self.model, self.config, self.calls = model, model.config, []
        self.device = model.device

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.calls.append(tuple(input_ids.shape))
        return self.model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def test_batched_inputs_embed_as_each_alone_in_the_order_given():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    model = Reference(LlamaForCausalLM(config).eval())
    rng = random.Random(1)
    ids = [[rng.randrange(1, 64) for _ in range(rng.choice([1, 3, 9, 40]))] for _ in range(23)]
    together = embed(model, ids, pad_id=0)
    assert len(model.calls) == 2 and model.calls[0][0] == 16  # sorted and padded into BATCH_ROWS rows
    model.calls.clear()
    alone = torch.cat([embed(model, [one], pad_id=0) for one in ids])
    assert all(shape[0] == 1 for shape in model.calls)
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        want = model.model.model(input_ids=torch.tensor([ids[5]])).last_hidden_state[0, -1]
    torch.testing.assert_close(together[5], want)


def test_inputs_are_cut_at_the_context_or_refused_and_bounded_in_all():
    config = SimpleNamespace(hidden_size=8, vocab_size=100)
    api = Api(
        SimpleNamespace(name="m", model=SimpleNamespace(config=config), context_length=5, tokenizer=None)
    )
    body = EmbeddingRequest(model="m", input=[[1] * 7, [2] * 3])
    assert api.embedding_ids(body, truncate=True) == [[1] * 5, [2] * 3]
    with pytest.raises(ApiError) as refused:
        api.embedding_ids(body)
    assert refused.value.body["error"]["code"] == "context_length_exceeded"
    api.engine.context_length = MAX_EMBED_TOKENS
    many = EmbeddingRequest(model="m", input=[[1] * (MAX_EMBED_TOKENS // 2)] * 2)
    assert sum(map(len, api.embedding_ids(many))) == MAX_EMBED_TOKENS
    with pytest.raises(ApiError) as refused:
        api.embedding_ids(EmbeddingRequest(model="m", input=[*many.input, [1]]))
    assert refused.value.body["error"]["param"] == "input"
    with pytest.raises(ApiError) as refused:
        api.embedding_ids(EmbeddingRequest(model="m", input=[1], dimensions=9))
    assert refused.value.body["error"]["param"] == "dimensions"
