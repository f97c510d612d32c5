"""The tolerance rule itself: it passes honest float32 results and fails wrong ones.

A result below float64 may be at most 2x as far from the float64 oracle as plain PyTorch in the
same precision, plus a floor of a few ulps of the result's scale; NaN and inf positions must match.
"""
import pytest
import torch

from tests._utils import assert_formula, assert_fp_rule


def _sums(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).reshape(64, -1).sum(1)


@pytest.fixture
def x() -> torch.Tensor:
    return torch.randn(64 * 4097, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).float()


def test_an_honest_float32_result_passes(x):
    # a different summation order than plain torch: pairwise in blocks, then the block sums
    blocked = x.reshape(64, 17, 241).sum(2).sum(1)
    assert_formula(blocked, lambda dt: _sums(x, dt), "blocked sums")


def test_a_result_four_times_plain_error_fails(x):
    oracle, plain = _sums(x, torch.float64), _sums(x, torch.float32)
    err = (plain.double() - oracle).abs().max()
    worse = (oracle + 4 * err + 1e-3 * oracle.abs().max()).float()  # well past 2x plain + the floor
    with pytest.raises(AssertionError, match="max error vs the fp64 oracle"):
        assert_fp_rule(worse, oracle, plain, "worse")


def test_a_result_one_percent_off_fails_even_when_plain_is_exact():
    oracle = torch.full((32,), 3.0, dtype=torch.float64)
    with pytest.raises(AssertionError):
        assert_fp_rule(torch.full((32,), 3.03), oracle, oracle.float(), "off by 1%")


def test_special_values_must_sit_where_the_oracle_has_them():
    oracle = torch.tensor([1.0, float("nan"), float("inf"), -2.0], dtype=torch.float64)
    ok = oracle.float()
    assert_fp_rule(ok, oracle, ok, "same specials")
    with pytest.raises(AssertionError, match="NaN"):
        assert_fp_rule(torch.tensor([1.0, 0.0, float("inf"), -2.0]), oracle, ok, "NaN swallowed")
    with pytest.raises(AssertionError, match="infinities"):
        assert_fp_rule(torch.tensor([1.0, float("nan"), float("-inf"), -2.0]), oracle, ok, "inf sign")
    with pytest.raises(AssertionError, match="infinities"):
        assert_fp_rule(torch.tensor([1.0, float("nan"), 3e38, -2.0]), oracle, ok, "inf made finite")


def test_float64_results_are_held_to_1e_10(x):
    exact = _sums(x, torch.float64)
    assert_formula(exact.clone(), lambda dt: _sums(x, dt), "fp64")
    with pytest.raises(AssertionError):
        assert_formula(exact * (1 + 1e-8), lambda dt: _sums(x, dt), "fp64 off by 1e-8")
