"""Exact integer requantization, shared by the frozen model's reference executor and the
runtime kernels (which must agree bit for bit).

A real multiplier ``M`` (for example ``s_in * s_w[c] / s_out``) is stored as an integer
``m`` with ``bits`` significant bits (``[2**(bits-1), 2**bits)``, default 31) and a right
shift ``n`` in ``[1, 62]`` with ``|M| ~= m * 2**-n`` (relative error below ``2**-(bits-1)``;
a negative ``M`` gets a negative ``m``). Applying it to an int32 accumulator ``acc``, with
a bias held at ``pre_shift`` extra fraction bits (``bias = round(b_real / acc_scale *
2**pre_shift)``, so that rounding the bias costs ``2**-pre_shift`` accumulator units, not
half a unit) is, in int64 arithmetic::

    p = (acc * 2**pre_shift + bias) * m           # the caller keeps |p| < 2**62
    r = sign(p) * ((|p| + 2**(n-1)) >> n)         # round half away from zero
    q = clamp(r, lo, hi)                          # e.g. [0, 255] after ReLU, [-127, 127]

(``m * 2**-n`` then approximates ``M / 2**pre_shift``.)

This is the gemmlowp/TFLite scheme written as one rounding shift instead of a doubling
high multiply plus a shift: the same result up to that rounding rule, simpler to state
and to reproduce exactly in numpy, numba and PyTorch.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["quantize_multiplier", "requantize", "requantize_np", "round_half_away"]

MAX_SHIFT = 62


def quantize_multiplier(
    real: np.ndarray | torch.Tensor | float, bits: int = 31
) -> tuple[np.ndarray, np.ndarray]:
    """``(m, n)`` int64 arrays with ``real ~= m * 2**-n``, elementwise, ``m`` in
    ``[2**(bits-1), 2**bits)`` (or 0 where ``real == 0``), ``n`` in ``[1, 62]``."""
    if not 2 <= bits <= 31:
        raise ValueError(f"multiplier bits must be in 2..31, got {bits}")
    r = np.asarray(real.detach().cpu() if isinstance(real, torch.Tensor) else real, np.float64)
    if np.any(~np.isfinite(r)) or np.any(r < 0):
        raise ValueError("requantization multipliers must be finite and non-negative")
    if np.any(r >= 2.0**31):
        raise ValueError(f"requantization multiplier too large: {float(r.max()):g}")
    m = np.zeros(r.shape, np.int64)
    n = np.full(r.shape, 31, np.int64)
    flat_r, flat_m, flat_n = r.reshape(-1), m.reshape(-1), n.reshape(-1)
    for i, x in enumerate(flat_r):
        if x == 0.0:
            continue
        frac, exp = math.frexp(x)  # x = frac * 2**exp, frac in [0.5, 1)
        mi = int(round(frac * (1 << bits)))
        shift = bits - exp
        if mi == 1 << bits:  # frac rounded up to 1.0
            mi //= 2
            shift -= 1
        if shift > MAX_SHIFT:  # tiny multiplier: drop mantissa bits (possibly to 0)
            mi >>= shift - MAX_SHIFT
            shift = MAX_SHIFT
        if shift < 1:
            raise ValueError(f"requantization multiplier too large: {x:g}")
        flat_m[i], flat_n[i] = mi, shift
    return m, n


def _shape_for(t, ndim: int, channel_dim: int):
    shape = [1] * ndim
    shape[channel_dim] = -1
    return shape


def requantize(
    acc: torch.Tensor,
    m: torch.Tensor,
    n: torch.Tensor,
    lo: int,
    hi: int,
    channel_dim: int = 1,
    bias: torch.Tensor | None = None,
    pre_shift: int = 0,
) -> torch.Tensor:
    """The rule in the module docstring, in PyTorch int64; ``m``, ``n`` and ``bias`` per
    channel along ``channel_dim`` (or scalars). Returns int64."""
    acc = acc.to(torch.int64)
    shape = _shape_for(acc, acc.dim(), channel_dim) if m.dim() else []
    m = m.to(torch.int64).reshape(shape)
    n = n.to(torch.int64).reshape(shape)
    if pre_shift:
        acc = acc * (1 << pre_shift)
    if bias is not None:
        acc = acc + bias.to(torch.int64).reshape(shape if bias.dim() else [])
    p = acc * m
    half = torch.bitwise_left_shift(torch.ones_like(n), n - 1)
    r = torch.bitwise_right_shift(p.abs() + half, n)
    r = torch.where(p < 0, -r, r)
    return r.clamp(lo, hi)


def requantize_np(
    acc: np.ndarray,
    m: np.ndarray,
    n: np.ndarray,
    lo: int,
    hi: int,
    channel_dim: int = 1,
    bias: np.ndarray | None = None,
    pre_shift: int = 0,
) -> np.ndarray:
    """The same rule in numpy int64 (the runtime's reference)."""
    acc = np.asarray(acc, np.int64) * (np.int64(1) << np.int64(pre_shift))
    m, n = np.asarray(m, np.int64), np.asarray(n, np.int64)
    shape = _shape_for(acc, acc.ndim, channel_dim)
    if m.ndim:
        m, n = m.reshape(shape), n.reshape(shape)
    if bias is not None:
        b = np.asarray(bias, np.int64)
        acc = acc + (b.reshape(shape) if b.ndim else b)
    p = acc * m
    r = (np.abs(p) + (np.int64(1) << (n - 1))) >> n
    return np.clip(np.where(p < 0, -r, r), lo, hi)


def round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest, ties away from zero (float in, float out)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)
