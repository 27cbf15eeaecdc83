"""Checks on what peers send: finiteness, ranks, dtypes, sizes and integer fields."""

import pytest
import torch

from swarmllm.wire import RequestError
from swarmllm.wire.validation import FLOAT_DTYPES, all_finite, check_tensor, get_int


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_one_bad_value_anywhere_is_caught(dtype, bad):
    for index in (0, 517, 4095):
        tensor = torch.randn(1, 1, 4096).to(dtype)
        tensor[0, 0, index] = bad
        assert not all_finite(tensor)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_the_largest_finite_values_do_not_overflow_the_check(dtype):
    big = torch.finfo(dtype).max
    assert all_finite(torch.full((8, 4096), big, dtype=dtype))
    assert all_finite(torch.tensor([big, -big, big], dtype=dtype))  # nor cancel into NaN
    assert all_finite(torch.randn(3, 5).to(dtype))


def test_check_tensor_names_the_problem():
    hidden = torch.randn(2, 3, 8)
    assert (
        check_tensor(hidden, "hidden", ndim=3, dtypes=FLOAT_DTYPES, shape={0: 2, 2: 8}, finite=True) is hidden
    )
    cases = [
        (torch.randn(2, 8), "dimensions"),
        (torch.randn(2, 3, 8).double(), "dtype"),
        (torch.randn(3, 3, 8), "axis 0"),
        (torch.randn(2, 0, 8), "empty"),
        (torch.full((2, 3, 8), float("nan")), "NaN"),
    ]
    for tensor, words in cases:
        with pytest.raises(RequestError, match=words) as info:
            check_tensor(tensor, "hidden", ndim=3, dtypes=FLOAT_DTYPES, shape={0: 2, 2: 8}, finite=True)
        assert info.value.code == "bad_request"


def test_get_int_refuses_bools_strings_and_out_of_range():
    assert get_int({"position": 3}, "position", low=0, high=5) == 3
    for value in (True, "3", 3.0, None, -1, 6):
        with pytest.raises(RequestError, match="position"):
            get_int({"position": value}, "position", low=0, high=5)
