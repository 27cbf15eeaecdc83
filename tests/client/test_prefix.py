"""What a session reuses of the tokens its servers hold (`RemoteSession.reusable_prefix`), against a brute-force
oracle: the longest common prefix of every row, or, for beam search, which held row each new row continues."""

import random
from dataclasses import dataclass

import torch

from swarmllm.client.model import RemoteSession


@dataclass
class _Held:
    """What `RemoteSession` reads of its inference session: how many positions the servers hold."""

    position: int
    max_length: int = 64


def _remote(ids: torch.Tensor, mask: torch.Tensor) -> RemoteSession:
    remote = RemoteSession(_Held(ids.shape[1]))
    remote.input_ids, remote.attention_mask = ids, mask
    return remote


def _oracle(held, held_mask, new, new_mask) -> tuple[int, list[int] | None]:
    n = held.shape[1]
    rows = [
        next(
            (
                j
                for j in range(len(held))
                if held[j].tolist() == new[i, :n].tolist()
                and held_mask[j].tolist() == new_mask[i, :n].tolist()
            ),
            None,
        )
        for i in range(len(new))
    ]
    if held.tolist() == new[:, :n].tolist() and held_mask.tolist() == new_mask[:, :n].tolist():
        return n, None
    if new.shape[1] == n + 1 and None not in rows:
        return n, rows
    common = 0
    while common < n and all(
        held[i, common] == new[i, common] and held_mask[i, common] == new_mask[i, common]
        for i in range(len(new))
    ):
        common += 1
    return common, None


def test_reuse_matches_the_oracle():
    rng = random.Random(0)
    for _ in range(500):
        batch, n = rng.randrange(1, 5), rng.randrange(1, 6)
        held = torch.randint(0, 3, (batch, n))  # a small vocabulary: rows often repeat
        held_mask = torch.ones(batch, n, dtype=torch.bool)
        if rng.random() < 0.3:
            held_mask[0, 0] = False
        kind = rng.choice(["next", "beams", "edited", "longer"])
        rows = torch.tensor([rng.randrange(batch) for _ in range(batch)])
        new, new_mask = (held[rows], held_mask[rows]) if kind in ("beams", "longer") else (held, held_mask)
        if kind == "edited":
            new = new.clone()
            new[rng.randrange(batch), rng.randrange(n)] = 3
        extra = 2 if kind == "longer" else 1
        new = torch.cat([new, torch.randint(0, 3, (batch, extra))], dim=1)
        new_mask = torch.cat([new_mask, torch.ones(batch, extra, dtype=torch.bool)], dim=1)
        start, reorder = _remote(held, held_mask).reusable_prefix(new, new_mask)
        want_start, want_rows = _oracle(held, held_mask, new, new_mask)
        assert start == want_start
        if want_rows is None:
            assert reorder is None
        else:  # any held row with the same tokens will do: they hold the same cache
            assert reorder is not None
            for i, j in enumerate(reorder):
                assert torch.equal(held[j], new[i, :n]) and torch.equal(held_mask[j], new_mask[i, :n])


def test_a_batch_of_another_size_reuses_nothing():
    ids = torch.tensor([[1, 2, 3]])
    assert _remote(ids, torch.ones_like(ids, dtype=torch.bool)).reusable_prefix(
        torch.tensor([[1, 2, 3, 4]] * 2), torch.ones(2, 4, dtype=torch.bool)
    ) == (0, None)


def test_embeddings_reuse_matches_the_oracle():
    """`reusable_embeds` (PEFT's prompt learning resends the whole sequence's embeddings at each step): the
    first position where any row's embedding or mask differs from what the servers hold."""
    rng = random.Random(1)
    for _ in range(300):
        batch, n, hidden = rng.randrange(1, 4), rng.randrange(1, 6), 3
        held = torch.randint(0, 2, (batch, n, hidden)).float()
        held_mask = torch.ones(batch, n, dtype=torch.bool)
        new, new_mask = held.clone(), held_mask.clone()
        if rng.random() < 0.5:
            new[rng.randrange(batch), rng.randrange(n), rng.randrange(hidden)] += 1
        if rng.random() < 0.2:
            new_mask[rng.randrange(batch), rng.randrange(n)] = False
        extra = rng.randrange(0, 3)
        new = torch.cat([new, torch.rand(batch, extra, hidden)], dim=1)
        new_mask = torch.cat([new_mask, torch.ones(batch, extra, dtype=torch.bool)], dim=1)
        remote = _remote(torch.full((batch, n), -1), held_mask)
        remote.embeds = held
        want = next(
            (
                i
                for i in range(n)
                if any(
                    held[b, i].tolist() != new[b, i].tolist() or bool(held_mask[b, i]) != bool(new_mask[b, i])
                    for b in range(batch)
                )
            ),
            n,
        )
        assert remote.reusable_embeds(new, new_mask) == want
        assert (
            remote.reusable_embeds(new[:1].expand(batch + 1, -1, -1), new_mask[:1].expand(batch + 1, -1)) == 0
        )
    remote = _remote(torch.full((1, 2), -1), torch.ones(1, 2, dtype=torch.bool))
    assert remote.reusable_embeds(torch.zeros(1, 3, 3), torch.ones(1, 3, dtype=torch.bool)) == 0  # none held
