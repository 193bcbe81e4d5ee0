"""Exactness of the runtime kernels against PyTorch (float64 convs of integer values are
exact here) and against lowbit.requant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lowbit.requant import quantize_multiplier, requantize_np
from lowbit.runtime import kernels as K

RNG = np.random.default_rng(0)

GEMM_PATHS = [pytest.param(True, id="vnni"), pytest.param(False, id="portable")]


@pytest.fixture(params=GEMM_PATHS)
def gemm_path(request, monkeypatch):
    if request.param and not K.HAS_VNNI:
        pytest.skip("no VNNI on this CPU")
    monkeypatch.setattr(K, "HAS_VNNI", request.param)
    return request.param


def rand_act(shape, dtype):
    if dtype == np.uint8:
        return RNG.integers(0, 256, shape).astype(np.uint8)
    return RNG.integers(-127, 128, shape).astype(np.int8)


def rand_w(shape, lo=-127, hi=127):
    return RNG.integers(lo, hi + 1, shape).astype(np.int8)


def ref_conv(x, w, stride=1, padding=0, dilation=1, groups=1):
    xt = torch.from_numpy(x.astype(np.float64)).permute(0, 3, 1, 2)
    wt = torch.from_numpy(w.astype(np.float64)).permute(0, 3, 1, 2)
    y = F.conv2d(xt, wt, stride=stride, padding=padding, dilation=dilation, groups=groups)
    return y.permute(0, 2, 3, 1).numpy()


def ref_linear(x, w):
    return (
        torch.from_numpy(x.astype(np.float64)) @ torch.from_numpy(w.astype(np.float64)).T
    ).numpy()


def assert_exact(got, ref):
    assert got.dtype == np.int32
    assert got.shape == ref.shape
    np.testing.assert_array_equal(got, ref.astype(np.int64))


# -------------------------------------------------------------------------------- int8


CONV_CASES = [
    # N, H, W, Cin, O, kh, kw, stride, padding, dilation, groups
    (1, 7, 5, 32, 24, 1, 1, 1, 0, 1, 1),  # pointwise, P % 6 != 0, O % 16 == 8
    (2, 4, 4, 13, 40, 1, 1, 1, 0, 1, 1),  # K % 4 != 0
    (1, 6, 6, 16, 5, 1, 1, 2, 0, 1, 1),  # strided pointwise, O < 8
    (1, 5, 6, 8, 16, 1, 1, 1, 1, 1, 1),  # padded pointwise
    (2, 6, 7, 12, 20, 3, 3, 1, 1, 1, 1),  # 3x3
    (1, 9, 8, 6, 9, 3, 2, 2, (1, 0), (2, 1), 1),  # stride, asymmetric pad, dilation
    (1, 6, 6, 8, 12, 3, 3, 1, 1, 1, 2),  # general groups
    (1, 5, 5, 12, 6, 1, 3, (1, 2), (0, 1), 1, 3),
    (1, 7, 6, 24, 24, 3, 3, 1, 1, 1, 24),  # depthwise 3x3
    (2, 9, 8, 16, 16, 3, 3, 2, 1, 1, 16),  # depthwise stride 2
    (1, 8, 9, 8, 8, 3, 3, 1, 2, 2, 8),  # depthwise dilated 3x3
    (1, 8, 7, 5, 5, 5, 3, (2, 1), (2, 0), (1, 2), 5),  # depthwise 5x3
    (1, 4, 4, 4, 8, 3, 3, 1, 1, 1, 4),  # channel multiplier 2: general groups path
]


@pytest.mark.parametrize("dtype", [np.uint8, np.int8], ids=["u8", "s8"])
@pytest.mark.parametrize("case", CONV_CASES, ids=[f"c{i}" for i in range(len(CONV_CASES))])
def test_conv2d_int_exact(case, dtype, gemm_path):
    N, H, W, cin, O, kh, kw, s, p, d, g = case
    x = rand_act((N, H, W, cin), dtype)
    w = rand_w((O, kh, kw, cin // g))
    y = K.conv2d_int(x, w, s, p, d, g)
    assert_exact(y, ref_conv(x, w, s, p, d, g))
    assert y.flags.c_contiguous
    packed = K.prepare_conv(w, g)
    assert_exact(K.conv2d_int(x, packed, s, p, d), y)


def test_conv2d_int_extremes(gemm_path):
    # largest magnitudes: 255 * -127 and -127 * -127 summed over many taps
    x = np.full((1, 3, 3, 64), 255, np.uint8)
    w = np.full((16, 3, 3, 64), -127, np.int8)
    assert_exact(K.conv2d_int(x, w, 1, 1), ref_conv(x, w, 1, 1))
    xs = np.full((1, 3, 3, 64), -127, np.int8)
    assert_exact(K.conv2d_int(xs, w, 1, 1), ref_conv(xs, w, 1, 1))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8], ids=["u8", "s8"])
@pytest.mark.parametrize("n,k,o", [(1, 100, 10), (3, 64, 33), (8, 7, 1)])
def test_linear_int_exact(n, k, o, dtype, gemm_path):
    x = rand_act((n, k), dtype)
    w = rand_w((o, k))
    y = K.linear_int(x, w)
    assert_exact(y, ref_linear(x, w))
    assert_exact(K.linear_int(x, K.prepare_linear(w)), y)


def test_threads_same_result():
    x = rand_act((2, 10, 10, 24), np.uint8)
    w = rand_w((40, 1, 1, 24))
    wd = rand_w((24, 3, 3, 1))
    before = K.get_threads()
    try:
        K.set_threads(1)
        a, ad = K.conv2d_int(x, w), K.conv2d_int(x, wd, 2, 1, 1, 24)
        K.set_threads(numba_max := K.numba.config.NUMBA_NUM_THREADS)
        assert K.get_threads() == numba_max
        assert_exact(K.conv2d_int(x, w), a)
        assert_exact(K.conv2d_int(x, wd, 2, 1, 1, 24), ad)
    finally:
        K.set_threads(before)
    with pytest.raises(ValueError):
        K.set_threads(0)


# -------------------------------------------------------------------------------- ternary


@pytest.mark.parametrize("dtype", [np.uint8, np.int8], ids=["u8", "s8"])
def test_ternary_matches_int(dtype, gemm_path):
    x = rand_act((2, 5, 7, 20), dtype)
    w = rand_w((28, 1, 1, 20), -1, 1)
    packed = K.pack_ternary(w)
    y = K.conv2d_ternary(x, packed)
    assert_exact(y, ref_conv(x, w))
    assert_exact(y, K.conv2d_int(x, w))
    w3 = rand_w((8, 3, 3, 10), -1, 1)
    y3 = K.conv2d_ternary(x, K.pack_ternary(w3, groups=2), 2, 1)
    assert_exact(y3, ref_conv(x, w3, 2, 1, groups=2))
    wl = rand_w((10, 35), -1, 1)
    xl = rand_act((3, 35), dtype)
    assert_exact(K.linear_ternary(xl, K.pack_ternary(wl)), ref_linear(xl, wl))


def test_ternary_rejects_other_codes():
    with pytest.raises(ValueError, match="ternary"):
        K.pack_ternary(np.array([[2, 0, 1]], np.int8))
    with pytest.raises(ValueError, match="pack_ternary"):
        K.conv2d_ternary(rand_act((1, 2, 2, 4), np.uint8), K.prepare_conv(rand_w((4, 1, 1, 4))))


# -------------------------------------------------------------------------------- binary


def rand_signs(shape):
    return np.where(RNG.random(shape) < 0.5, -1, 1).astype(np.int8)


def test_pack_signs_layout():
    x = -np.ones((2, 70), np.int8)
    x[0, 0] = x[0, 63] = x[0, 64] = x[1, 69] = 1
    p = K.pack_signs(x)
    assert p.dtype == np.uint64 and p.shape == (2, 2)
    assert p[0, 0] == (1 | (1 << 63)) and p[0, 1] == 1
    assert p[1, 0] == 0 and p[1, 1] == 1 << 5
    with pytest.raises(ValueError, match="-1 or \\+1"):
        K.pack_signs(np.zeros((1, 3), np.int8))
    with pytest.raises(ValueError, match="int8"):
        K.pack_signs(np.ones((1, 3), np.float32))


BIN_CASES = [
    # N, H, W, C, O, k, stride, padding, dilation
    (1, 6, 6, 64, 16, 3, 1, 1, 1),
    (2, 7, 5, 100, 13, 3, 2, 1, 1),  # C not a multiple of 64, odd sizes, stride 2
    (1, 8, 8, 130, 8, 3, 1, 2, 2),  # 3 words, dilation
    (1, 5, 5, 3, 4, 1, 1, 0, 1),  # pointwise, tiny C
    (1, 6, 5, 70, 6, 5, (1, 2), (2, 1), 1),
]


@pytest.mark.parametrize("case", BIN_CASES, ids=[f"b{i}" for i in range(len(BIN_CASES))])
def test_conv2d_binary_exact(case):
    N, H, W, C, O, k, s, p, d = case
    x = rand_signs((N, H, W, C))
    w = rand_signs((O, k, k, C))
    y = K.conv2d_binary(K.pack_signs(x), C, K.pack_binary_weights(w), k, k, s, p, d)
    assert_exact(y, ref_conv(x, w, s, p, d))  # zero padding: padded taps contribute 0


def test_linear_binary_exact():
    for n, k, o in [(1, 784, 300), (3, 64, 10), (2, 5, 7)]:
        x, w = rand_signs((n, k)), rand_signs((o, k))
        y = K.linear_binary(K.pack_signs(x), k, K.pack_binary_weights(w))
        assert_exact(y, ref_linear(x, w))


def test_binary_bad_input():
    xp = K.pack_signs(rand_signs((1, 4, 4, 70)))
    wp = K.pack_binary_weights(rand_signs((8, 3, 3, 70)))
    with pytest.raises(ValueError, match="words"):
        K.conv2d_binary(xp, 140, wp, 3, 3)
    with pytest.raises(ValueError, match="kernel"):
        K.conv2d_binary(xp, 70, wp, 1, 1)
    with pytest.raises(ValueError, match="uint64"):
        K.conv2d_binary(xp.astype(np.int64), 70, wp, 3, 3)
    with pytest.raises(ValueError, match="words"):
        K.linear_binary(K.pack_signs(rand_signs((1, 70))), 70, K.pack_signs(rand_signs((3, 200))))


# -------------------------------------------------------------------------------- requant


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "scalar"])
@pytest.mark.parametrize(
    "lo,hi,dt", [(0, 255, np.uint8), (-127, 127, np.int8), (-5, 300, np.int32)]
)
def test_requant_exact(per_channel, lo, hi, dt):
    C = 19
    acc = RNG.integers(-(2**24), 2**24, (3, 5, 4, C)).astype(np.int32)
    acc[0, 0, 0, :4] = [2**31 - 10**6, -(2**31) + 10**6, 0, 1]
    bias = RNG.integers(-(2**20), 2**20, C).astype(np.int32)
    reals = np.exp(RNG.uniform(-22, 2, C)) if per_channel else np.float64(0.0037)
    m, n = quantize_multiplier(reals)
    if per_channel:
        m[3] = 0  # an all-zero channel
        n[3] = 31
    # ties: values whose product lands exactly on a half
    acc[1, 1, 1, :] = np.where(np.arange(C) % 2 == 0, 3, -3)
    got = K.requant(acc, bias, m, n, lo, hi, dt)
    ref = requantize_np(acc.astype(np.int64) + bias, m, n, lo, hi, channel_dim=-1)
    assert got.dtype == np.dtype(dt)
    np.testing.assert_array_equal(got.astype(np.int64), ref)
    got0 = K.requant(acc, None, m, n, lo, hi, dt)
    np.testing.assert_array_equal(got0.astype(np.int64), requantize_np(acc, m, n, lo, hi, -1))


def test_requant_pre_shift_and_negative_m():
    C = 11
    acc = RNG.integers(-(2**20), 2**20, (4, 3, C)).astype(np.int32)
    bias = RNG.integers(-(2**26), 2**26, C).astype(np.int64)
    m, n = quantize_multiplier(np.exp(RNG.uniform(-20, -4, C)))
    m[::3] *= -1
    for ps in (0, 1, 8):
        got = K.requant(acc, bias, m, n, -127, 127, np.int8, pre_shift=ps)
        ref = requantize_np(acc, m, n, -127, 127, channel_dim=-1, bias=bias, pre_shift=ps)
        np.testing.assert_array_equal(got.astype(np.int64), ref)


def test_requant_ties_round_away():
    acc = np.array([[1, -1, 3, -3, 2]], np.int32)
    m = np.full(5, 2**30, np.int64)  # multiplier 0.5
    n = np.full(5, 31, np.int64)
    got = K.requant(acc, None, m, n, -100, 100, np.int32)
    np.testing.assert_array_equal(got, [[1, -1, 2, -2, 1]])


def test_requant_bad_input():
    acc = np.zeros((2, 3), np.int32)
    m, n = np.full(3, 2**30), np.full(3, 31)
    with pytest.raises(ValueError, match="int32"):
        K.requant(acc.astype(np.int64), None, m, n, 0, 255)
    with pytest.raises(ValueError, match="shape"):
        K.requant(acc, np.zeros(4), m, n, 0, 255)
    with pytest.raises(ValueError, match="fit"):
        K.requant(acc, None, m, n, 0, 300, np.uint8)


# -------------------------------------------------------------------------------- dequant


def test_dequant_bitexact_vs_torch():
    C = 37
    acc = RNG.integers(-(2**30), 2**30, (2, 3, 5, C)).astype(np.int32)
    acc[0, 0, 0, :3] = [0, 2**31 - 1, -(2**31)]
    scale = (RNG.standard_normal(C) * 10.0 ** RNG.uniform(-6, 0, C)).astype(np.float32)
    bias = (RNG.standard_normal(C) * 3).astype(np.float32)
    got = K.dequant(acc, scale, bias)
    ta = torch.from_numpy(acc)
    ref = (ta.float() * torch.from_numpy(scale) + torch.from_numpy(bias)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.int32), ref.view(np.int32))
    ref0 = (ta.float() * torch.from_numpy(scale)).numpy()
    np.testing.assert_array_equal(K.dequant(acc, scale).view(np.int32), ref0.view(np.int32))


# -------------------------------------------------------------------------------- errors


def test_conv_bad_input():
    x = rand_act((1, 4, 4, 8), np.uint8)
    w = rand_w((4, 3, 3, 8))
    with pytest.raises(ValueError, match="int8 or uint8"):
        K.conv2d_int(x.astype(np.float32), w)
    with pytest.raises(ValueError, match="rank 4"):
        K.conv2d_int(x[0], w)
    with pytest.raises(ValueError, match="int8"):
        K.conv2d_int(x, w.astype(np.int16))
    with pytest.raises(ValueError, match="channels"):
        K.conv2d_int(rand_act((1, 4, 4, 6), np.uint8), w)
    with pytest.raises(ValueError, match="groups"):
        K.conv2d_int(x, rand_w((6, 3, 3, 2)), groups=4)
    with pytest.raises(ValueError, match="stride"):
        K.conv2d_int(x, w, stride=0)
    with pytest.raises(ValueError, match="does not fit"):
        K.conv2d_int(rand_act((1, 2, 2, 8), np.uint8), w)
    with pytest.raises(ValueError, match="features"):
        K.linear_int(rand_act((2, 5), np.int8), rand_w((3, 6)))
    with pytest.raises(ValueError, match="rank 2"):
        K.linear_int(rand_act((2, 5, 1), np.int8), rand_w((3, 5)))


# ---------------------------------------------------------------- fused engine kernels


def _dw_fused_run(x, w, stride, pad, dil, rq=None, fl=None, narrow=False):
    """Runs K._dw_fused as the Engine does (zero-padded input, 16-channel padded tables)."""
    N, H, W, C = x.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dil
    Ho = (H + 2 * ph - 2 * dh - 1) // sh + 1
    Wo = (W + 2 * pw - 2 * dw - 1) // sw + 1
    Cp = -(-C // 16) * 16
    Hp = max(H + 2 * ph, (Ho - 1) * sh + 2 * dh + 1)
    Wp = max(W + 2 * pw, (Wo - 1) * sw + 2 * dw + 1)
    xpad = np.zeros((N, Hp, Wp, Cp), x.dtype)
    xpad[:, ph : ph + H, pw : pw + W, :C] = x
    koff = np.array([(i * dh * Wp + j * dw) * Cp for i in range(3) for j in range(3)], np.int64)
    w9 = np.zeros((9, Cp), np.float32)
    w9[:, :C] = w.reshape(C, 9).T

    def pad16(v, dt, fill=0):
        out = np.full(Cp, fill, dt)
        out[:C] = v
        return out

    z = np.zeros(Cp, np.int64)
    zf = np.zeros(Cp, np.float32)
    if rq is not None:
        bias, m, n, ps, lo, hi, dt = rq
        half = np.left_shift(np.int64(1), n.astype(np.int64) - 1)
        out = np.empty((N, Ho, Wo, C), dt)
        K._dw_fused(xpad, koff, w9, C, sh, Ho, Wo, sw, pad16(bias, np.int64), pad16(m, np.int64),
                    pad16(n, np.int64, 1), pad16(half, np.int64, 1), ps, lo, hi, zf, zf, narrow,
                    out)  # fmt: skip
    else:
        scale, fb = fl
        out = np.empty((N, Ho, Wo, C), np.float32)
        K._dw_fused(xpad, koff, w9, C, sh, Ho, Wo, sw, z, z, z + 1, z + 1, 0, 0, 0,
                    pad16(scale, np.float32), pad16(fb, np.float32), False, out)  # fmt: skip
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.int8], ids=["u8", "s8"])
@pytest.mark.parametrize(
    "N,H,W,C,stride,pad,dil",
    [(1, 7, 6, 24, (1, 1), (1, 1), (1, 1)), (2, 9, 8, 32, (2, 2), (1, 1), (1, 1)),
     (1, 8, 9, 5, (1, 2), (2, 0), (2, 1)), (1, 3, 3, 40, (1, 1), (0, 0), (1, 1))],
)  # fmt: skip
def test_dw_fused_exact(N, H, W, C, stride, pad, dil, dtype):
    x = rand_act((N, H, W, C), dtype)
    w = rand_w((C, 3, 3, 1), -128, 127)
    acc = ref_conv(x, w, stride, pad, dil, groups=C).astype(np.int64).astype(np.int32)
    m, n = quantize_multiplier(np.exp(RNG.uniform(-12, -6, C)))
    m[::3] *= -1
    for ps, bias_mag, narrow in ((0, 2**20, True), (0, 2**20, False), (16, 2**27, False)):
        bias = RNG.integers(-bias_mag, bias_mag, C).astype(np.int64)
        rq = (bias, m, n, ps, 0, 255, np.uint8)
        got = _dw_fused_run(x, w, stride, pad, dil, rq, narrow=narrow)
        ref = K.requant(acc, bias, m, n, 0, 255, np.uint8, pre_shift=ps)
        np.testing.assert_array_equal(got, ref)
    scale = RNG.uniform(0.001, 0.1, C).astype(np.float32)
    fb = RNG.standard_normal(C).astype(np.float32)
    got = _dw_fused_run(x, w, stride, pad, dil, fl=(scale, fb))
    np.testing.assert_array_equal(got, K.dequant(acc, scale, fb))


@pytest.mark.parametrize("dtype", [np.uint8, np.int8], ids=["u8", "s8"])
def test_gemm_fused_epilogues(dtype, gemm_path):
    P, Kk, O = 37, 40, 72  # P % 24 != 0, O % 16 == 8, O > 64 (two sign words)
    x = rand_act((P, Kk), dtype)
    w = rand_w((O, Kk))
    pc = K.prepare_linear(w)
    acc = ref_linear(x, w).astype(np.int64).astype(np.int32)
    signed = dtype == np.int8
    xu = K._gemm_input(x, pc.wp.shape[2] * 4, signed)
    init = pc.corr[0] if signed else pc.zero[0]
    bias = RNG.integers(-(2**20), 2**20, O).astype(np.int64)
    m, n = quantize_multiplier(np.exp(RNG.uniform(-14, -8, O)))
    half = np.left_shift(np.int64(1), n.astype(np.int64) - 1)
    scale = RNG.uniform(0.001, 0.1, O).astype(np.float32)
    fb = RNG.standard_normal(O).astype(np.float32)
    oi = np.empty((P, O), np.int8)
    of = np.empty((P, O), np.float32)
    of3 = np.empty((1, O, P), np.float32)
    ob = np.empty((P, 2), np.uint64)
    i32 = np.empty((P, O), np.int32)
    d = (np.zeros((1, 1), np.float32), np.zeros((1, 1, 1), np.float32), np.zeros((1, 1), np.uint64))
    args = (K.HAS_VNNI, xu, pc.wp[0], pc.w2d[0], init, O)
    K._gemm_fused(*args, 0, 3, bias, m, n, half, -127, 127, scale, fb, P, oi, *d)
    np.testing.assert_array_equal(oi, K.requant(acc, bias, m, n, -127, 127, np.int8, 3))
    K._gemm_fused(*args, 1, 0, bias, m, n, half, 0, 0, scale, fb, P, i32, of, d[1], d[2])
    want = K.dequant(acc, scale, fb)
    np.testing.assert_array_equal(of, want)
    K._gemm_fused(*args, 2, 0, bias, m, n, half, 0, 0, scale, fb, P, i32, d[0], of3, d[2])
    np.testing.assert_array_equal(of3[0].T, want)
    K._gemm_fused(*args, 3, 0, bias, m, n, half, 0, 0, scale, fb, P, i32, d[0], d[1], ob)
    np.testing.assert_array_equal(ob, K.pack_signs(np.where(want > 0, 1, -1).astype(np.int8)))
    K._gemm_fused(*args, 4, 0, bias, m, n, half, 0, 0, scale, fb, P, i32, *d)
    np.testing.assert_array_equal(i32, acc)


def test_nchw_input_kernels():
    x = RNG.standard_normal((2, 70, 5, 6)).astype(np.float32)
    s = np.float32(0.03)
    ref = np.clip(np.rint(x / s), -127, 127).transpose(0, 2, 3, 1)
    out = np.empty((2, 5, 6, 70), np.int8)
    K._quant_nchw(x, s, -127, 127, out)
    np.testing.assert_array_equal(out, ref)
    xu = np.empty((2 * 3 * 3, 72), np.uint8)
    K._quant_rows_nchw(x, s, -127, 127, 128, 2, 2, xu)
    want = (ref[:, ::2, ::2].reshape(-1, 70) + 128).astype(np.uint8)
    np.testing.assert_array_equal(xu[:, :70], want)
    assert not xu[:, 70:].any()
    xu2 = np.empty_like(xu)
    K._quant_rows_nhwc(np.ascontiguousarray(x.transpose(0, 2, 3, 1)), s, -127, 127, 128, 2, 2, xu2)
    np.testing.assert_array_equal(xu2, xu)
    bits = np.empty((2, 5, 6, 2), np.uint64)
    K._sign_pack_nchw(x, bits)
    signs = np.where(x > 0, 1, -1).astype(np.int8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(bits, K.pack_signs(np.ascontiguousarray(signs)))
