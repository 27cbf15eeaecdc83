"""The API's kept sessions (no network): which kept session a prompt takes, against a brute-force oracle, and the
pool's keeping, closing and expiry over a model that records the sessions it opens and closes."""

import random

import torch

from swarmllm.api.sessions import SessionPool, best_match, common_prefix


def test_best_match_is_the_longest_shared_prefix_with_room():
    rng = random.Random(0)
    for _ in range(500):
        kept = [
            ([rng.randrange(3) for _ in range(rng.randrange(8))], rng.randrange(4, 12))
            for _ in range(rng.randrange(5))
        ]
        prompt = [rng.randrange(3) for _ in range(rng.randrange(1, 8))]
        need = rng.randrange(2, 12)

        def shared(tokens, prompt=prompt):
            return max((n for n in range(len(tokens) + 1) if tokens[:n] == prompt[:n]), default=0)

        fits = [(shared(t), -i) for i, (t, room) in enumerate(kept) if room >= need and shared(t) > 0]
        want = -max(fits)[1] if fits else None
        assert best_match(kept, prompt, need) == want
    assert common_prefix([1, 2, 3], [1, 2]) == 2 and common_prefix([], [1]) == 0


class Remote:
    """What the pool reads of a RemoteSession: its room, the tokens its servers hold, whether it is closed."""

    def __init__(self, max_length: int):
        self.max_length, self.input_ids, self.position = max_length, None, 0
        self.closed = False

    def holds(self, tokens: list[int]) -> "Remote":
        self.input_ids, self.position = torch.tensor([tokens + [99]]), len(tokens)  # the last token unsent
        return self


class Model:
    def __init__(self):
        self.opened, self.closed = [], []

    def open_session(self, max_length: int) -> Remote:
        self.opened.append(Remote(max_length))
        return self.opened[-1]

    def close_session(self, remote: Remote) -> None:
        self.closed.append(remote)


def test_the_pool_keeps_the_latest_sessions_and_hands_out_the_best():
    model = Model()
    pool = SessionPool(model, size=2, idle_s=60, headroom=8, context_length=20)
    a, cached = pool.take([1, 2, 3], need=6)
    assert cached == 0 and a.max_length == 14  # what it needs, and the headroom
    b, _ = pool.take([5, 6], need=18)
    assert b.max_length == 20  # the headroom capped by the context
    pool.give(a.holds([1, 2, 3, 4]))
    pool.give(b.holds([5, 6, 7]))
    again, cached = pool.take([1, 2, 3, 4, 8, 9], need=10)
    assert again is a and cached == 4
    whole, cached = pool.take([5, 6, 7], need=4)
    assert whole is b and cached == 2  # the last prompt token is always sent
    c, cached = pool.take([1, 2], need=4)  # none kept: a new one
    assert cached == 0 and c is model.opened[-1] and not model.closed
    for remote in (a, b, c):
        pool.give(remote.holds([1]))
    assert model.closed == [a]  # beyond 2: the least recently given back
    pool.idle_s = -1  # every kept session is now too old
    pool.take([1], need=2)
    assert model.closed == [a, b, c]


def test_a_pool_of_none_closes_each_session_when_its_request_ends():
    model = Model()
    pool = SessionPool(model, size=0, context_length=20)
    remote, _ = pool.take([1, 2], need=4)
    pool.give(remote.holds([1, 2]))
    assert model.closed == [remote]
    failed, _ = pool.take([1, 2], need=4)
    pool.drop(failed)
    assert model.closed == [remote, failed]
