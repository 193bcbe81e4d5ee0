"""The integer requantization rule shared by the reference executor and the runtime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.requant import quantize_multiplier, requantize, requantize_np


@given(st.floats(min_value=1e-9, max_value=1e4, allow_nan=False))
@settings(max_examples=200, deadline=None)
def test_multiplier_is_accurate(x):
    m, n = quantize_multiplier(x)
    assert 1 <= int(n) <= 62
    if int(n) < 62:
        assert 2**30 <= int(m) < 2**31
        assert abs(int(m) * 2.0 ** -int(n) - x) <= x * 2.0**-30
    else:
        assert abs(int(m) * 2.0 ** -int(n) - x) <= 2.0**-62


def test_zero_and_bad_multipliers():
    m, n = quantize_multiplier(np.array([0.0, 0.5]))
    assert m[0] == 0 and m[1] == 2**30 and n[1] == 31
    with pytest.raises(ValueError, match="non-negative"):
        quantize_multiplier(-1.0)
    with pytest.raises(ValueError, match="too large"):
        quantize_multiplier(2.0**40)


def test_requantize_matches_exact_rational_rounding():
    rng = np.random.default_rng(0)
    acc = rng.integers(-(2**31), 2**31 - 1, size=(4, 3, 5), dtype=np.int64)
    real = np.array([3.7e-4, 0.021, 1.5])
    m, n = quantize_multiplier(real)
    got_t = requantize(torch.from_numpy(acc), torch.from_numpy(m), torch.from_numpy(n),
                       -(2**40), 2**40)  # fmt: skip
    got_np = requantize_np(acc, m, n, -(2**40), 2**40)
    assert np.array_equal(got_t.numpy(), got_np)
    # exact rational arithmetic with Python ints: round half away from zero
    for idx in np.ndindex(acc.shape):
        p = int(acc[idx]) * int(m[idx[1]])
        d = 1 << int(n[idx[1]])
        r = (abs(p) + d // 2) // d
        assert got_np[idx] == (r if p >= 0 else -r)


def test_requantize_ties_round_away_and_clamp():
    m, n = torch.tensor([2**30]), torch.tensor([31])  # multiplier 0.5
    acc = torch.tensor([[-3, -1, 1, 3, 1000, -1000]]).reshape(1, 1, 6).transpose(1, 2)
    out = requantize(acc.reshape(1, 6), m.expand(6), n.expand(6), -127, 127)
    assert out.tolist() == [[-2, -1, 1, 2, 127, -127]]
