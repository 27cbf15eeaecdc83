"""A hop's kept inputs against a brute-force oracle: a dict from position to the last input sent there, with
a step at position p forgetting everything from p on."""

import random

import torch

from swarmllm.client.hop import History, KeptInput


def test_history_matches_the_oracle_under_random_steps_and_rewinds():
    rng = random.Random(0)
    for _ in range(200):
        history, oracle, length = History(), {}, 0
        for _ in range(rng.randrange(1, 12)):
            position = rng.randrange(0, length + 1)  # at the end, or a rewind
            tokens = rng.choice([1, 1, 1, 2, 5])
            hidden = torch.randn(2, tokens, 3)
            mask = torch.rand(2, tokens) > 0.3 if rng.random() < 0.5 else None
            history.add(KeptInput(position, hidden, mask))
            oracle = {p: v for p, v in oracle.items() if p < position}
            for t in range(tokens):
                oracle[position + t] = (hidden[:, t], None if mask is None else mask[:, t])
            length = position + tokens
        assert history.length == length == len(oracle)
        positions = [p for e in history.entries for p in range(e.position, e.end)]
        assert positions == list(range(length))  # in order, no gap, no overlap
        for e in history.entries:
            for t in range(e.hidden.shape[1]):
                want_hidden, want_mask = oracle[e.position + t]
                assert torch.equal(e.hidden[:, t], want_hidden)
                assert (e.key_mask is None and want_mask is None) or torch.equal(e.key_mask[:, t], want_mask)
        assert history.nbytes == 2 * length * 3 * 4


def test_steps_are_kept_with_their_original_shapes():
    history = History()
    history.add(KeptInput(0, torch.randn(1, 5, 4), None))
    for p in range(5, 8):
        history.add(KeptInput(p, torch.randn(1, 1, 4), None))
    assert [(e.position, e.hidden.shape[1]) for e in history.entries] == [(0, 5), (5, 1), (6, 1), (7, 1)]
