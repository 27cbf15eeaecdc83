"""A hop's kept inputs against a brute-force oracle: a dict from position to the last input sent there, with
a step at position p forgetting everything from p on."""

import random

import torch

from swarmllm.client.hop import History, KeptInput


def _add(history: History, oracle: dict, position: int, tokens: int, batch: int, rng: random.Random) -> dict:
    """A random step at `position` into `history`; the oracle after it."""
    hidden = torch.randn(batch, tokens, 3)
    mask = torch.rand(batch, tokens) > 0.3 if rng.random() < 0.5 else None
    history.add(KeptInput(position, hidden, mask))
    oracle = {p: v for p, v in oracle.items() if p < position}
    for t in range(tokens):
        oracle[position + t] = (hidden[:, t], None if mask is None else mask[:, t])
    return oracle


def _assert_matches(history: History, oracle: dict) -> None:
    assert history.length == len(oracle)
    positions = [p for e in history.entries for p in range(e.position, e.end)]
    assert positions == list(range(len(oracle)))  # in order, no gap, no overlap
    for e in history.entries:
        for t in range(e.hidden.shape[1]):
            want_hidden, want_mask = oracle[e.position + t]
            assert torch.equal(e.hidden[:, t], want_hidden)
            assert (e.key_mask is None and want_mask is None) or torch.equal(e.key_mask[:, t], want_mask)


def test_history_matches_the_oracle_under_random_steps_and_rewinds():
    rng = random.Random(0)
    for _ in range(200):
        history, oracle = History(), {}
        for _ in range(rng.randrange(1, 12)):
            position = rng.randrange(0, len(oracle) + 1)  # at the end, or a rewind
            oracle = _add(history, oracle, position, rng.choice([1, 1, 1, 2, 5]), 2, rng)
        _assert_matches(history, oracle)
        assert history.nbytes == 2 * len(oracle) * 3 * 4


def test_steps_are_kept_with_their_original_shapes():
    history = History()
    history.add(KeptInput(0, torch.randn(1, 5, 4), None))
    for p in range(5, 8):
        history.add(KeptInput(p, torch.randn(1, 1, 4), None))
    assert [(e.position, e.hidden.shape[1]) for e in history.entries] == [(0, 5), (5, 1), (6, 1), (7, 1)]


def test_reorders_match_the_oracle_however_often_the_inputs_are_read():
    """Beam search: a reorder moves every kept row (row i becomes row rows[i]); `History` notes reorders and
    applies them when its inputs are read, which the oracle does at once."""
    rng = random.Random(1)
    for _ in range(200):
        history, oracle, reordered_at = History(), {}, -1
        for step in range(rng.randrange(1, 16)):
            if oracle and rng.random() < 0.4:
                rows = torch.tensor([rng.randrange(3) for _ in range(3)])
                history.reorder(rows, step)
                oracle = {p: (h[rows], None if m is None else m[rows]) for p, (h, m) in oracle.items()}
                reordered_at = step
            position = len(oracle) if rng.random() < 0.8 else rng.randrange(0, len(oracle) + 1)
            oracle = _add(history, oracle, position, rng.choice([1, 1, 2, 4]), 3, rng)
            if rng.random() < 0.3:
                history.entries  # noqa: B018 (reading applies the reorders noted so far)
        assert history.reordered_at == reordered_at
        _assert_matches(history, oracle)
        rebuilt = History(history.entries, history.reordered_at)  # a replacement's, from what it replayed
        assert rebuilt.reordered_at == reordered_at
        _assert_matches(rebuilt, oracle)
