import pytest

from swarmllm.server.cache import CacheBudget, CacheFullError


def test_reserve_and_release_account_exactly():
    budget = CacheBudget(100)
    budget.reserve("a", 60)
    assert budget.free_tokens == 40
    with pytest.raises(CacheFullError, match="40 of 100"):
        budget.reserve("b", 41)
    budget.reserve("b", 40)
    assert budget.free_tokens == 0
    assert budget.release("a") == 60
    assert budget.release("a") == 0
    assert budget.free_tokens == 60


def test_rejects_bad_reservations():
    budget = CacheBudget(10)
    with pytest.raises(ValueError):
        budget.reserve("a", 0)
    budget.reserve("a", 1)
    with pytest.raises(ValueError):
        budget.reserve("a", 1)
