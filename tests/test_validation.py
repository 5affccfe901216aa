"""Argument checks name the argument, what was expected and what was given."""

import pytest
import torch

from clinkd_kernels._validation import (
    check_int,
    check_nonnegative_float,
    check_positive_float,
    check_same_device,
    check_shape,
    check_tensor,
    first_rows,
)


def test_check_tensor():
    x = torch.randn(2, 3)
    assert check_tensor("x", x, ndim=2, dtypes=(torch.float32,)) is x
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        check_tensor("x", [1.0])
    with pytest.raises(ValueError, match=r"x must be 3-D or 4-D, got 2-D with shape \(2, 3\)"):
        check_tensor("x", x, ndim=(3, 4))
    with pytest.raises(TypeError, match=r"x must have dtype in \(float16, bfloat16\), got float32"):
        check_tensor("x", x, dtypes=(torch.float16, torch.bfloat16))


def test_check_shape_and_device():
    check_shape("w", torch.empty(4, 5), (None, 5))
    with pytest.raises(ValueError, match=r"w must have shape \[\*, 6\], got \[4, 5\]"):
        check_shape("w", torch.empty(4, 5), (None, 6))
    check_same_device(a=torch.empty(1), b=None, c=torch.empty(2))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="b is on cuda"):
            check_same_device(a=torch.empty(1), b=torch.empty(1, device="cuda"))


@pytest.mark.parametrize("value,error", [(0, ValueError), (11, ValueError), (2.0, TypeError), (True, TypeError)])
def test_check_int(value, error):
    with pytest.raises(error, match="k must"):
        check_int("k", value, low=1, high=10)


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_check_positive_float(value):
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        check_positive_float("temperature", value)
    assert check_positive_float("t", 2) == 2.0
    assert check_nonnegative_float("alpha", 0) == 0.0
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        check_nonnegative_float("alpha", -0.5)


def test_first_rows():
    mask = torch.zeros(20, dtype=torch.bool)
    mask[[2, 5, 7, 11, 12, 13, 19]] = True
    assert first_rows(mask) == "2, 5, 7, 11, 12 (and 2 more)"
