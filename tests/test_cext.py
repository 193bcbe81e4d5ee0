"""The C (AVX-512) kernels against the numba ones and against the reference kernels.

Both paths must give bit-identical results. Where the extension is not built or the CPU
lacks AVX-512 these tests skip, unless LOWBIT_REQUIRE_CEXT=1 (set by .ci/run on machines
that can build and run it) turns that into a failure: a silently failed build must not
pass CI.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.runtime import _cext
from lowbit.runtime import kernels as K

REQUIRED = os.environ.get("LOWBIT_REQUIRE_CEXT", "") not in ("", "0")
# set by .ci/run where /proc/cpuinfo lists amx_int8: the AMX tile kernels must then run
REQUIRED_AMX = os.environ.get("LOWBIT_REQUIRE_AMX", "") not in ("", "0")


@pytest.fixture(autouse=True)
def _amx_binary_conv(monkeypatch):
    """The AMX binary convolution is opt-in in the engine (LOWBIT_AMX_BCONV=1); these tests
    run it wherever AMX runs, next to the AVX-512 kernel under ``no_amx()``."""
    monkeypatch.setattr(K, "_AMX_BCONV", True)


def test_extension_available_where_required():
    if REQUIRED:
        assert _cext.available(), f"C kernels required but not available: {_cext.why_not()}"
    elif not _cext.available():
        pytest.skip(f"C kernels not available: {_cext.why_not()}")


def test_amx_available_where_required():
    if REQUIRED_AMX:
        assert _cext.amx(), f"AMX kernels required but not running: {_cext.why_not_amx()}"
    elif not _cext.amx():
        pytest.skip(f"AMX kernels not running: {_cext.why_not_amx()}")


needs_c = pytest.mark.skipif(not _cext.available() and not REQUIRED,
                             reason=f"C kernels not available: {_cext.why_not()}")  # fmt: skip


def _signs(rng, shape):
    return np.where(rng.standard_normal(shape) >= 0, 1, -1).astype(np.int8)


def _binary_case(rng, n, c, o, kh, kw, h, w, stride, pad, dil):
    xp = K.pack_signs(_signs(rng, (n, h, w, c)))
    wcodes = _signs(rng, (o, kh, kw, c))
    pb = K.prepare_binary_conv(K.pack_binary_weights(wcodes))
    xpad, koff, ho, wo = K.pad_binary_input(xp, kh, kw, stride, pad, dil)
    sc = rng.standard_normal(o).astype(np.float32)
    fb = rng.standard_normal(o).astype(np.float32)
    return xp, wcodes, pb, xpad, koff, ho, wo, sc, fb


def _bin_out(mode, n, o, ho, wo):
    return {
        0: np.empty((n, ho, wo, o), np.int32),
        1: np.empty((n, ho, wo, o), np.float32),
        2: np.empty((n, o, ho, wo), np.float32),
        3: np.empty((n, ho, wo, -(-o // 64)), np.uint64),
    }[mode]


@needs_c
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 2),
    c=st.integers(1, 200),
    o=st.integers(1, 140),
    k=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    hw=st.tuples(st.integers(3, 11), st.integers(3, 11)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    pad=st.tuples(st.integers(0, 1), st.integers(0, 1)),
    dil=st.tuples(st.just(1), st.integers(1, 2)),
    threads=st.sampled_from([1, 2]),
)
def test_xnor_conv_c_equals_numba_and_reference(seed, n, c, o, k, hw, stride, pad, dil, threads):
    kh, kw = k
    h, w = hw
    if w + 2 * pad[1] < (kw - 1) * dil[1] + 1 or h + 2 * pad[0] < kh:
        return
    rng = np.random.default_rng(seed)
    xp, wcodes, pb, xpad, koff, ho, wo, sc, fb = _binary_case(rng, n, c, o, kh, kw, h, w, stride,
                                                              pad, dil)  # fmt: skip
    ref = K.conv2d_binary(xp, c, K.pack_binary_weights(wcodes), kh, kw, stride, pad, dil)
    K.set_threads(min(threads, K.numba.config.NUMBA_NUM_THREADS))
    min_ns, _cext.PARALLEL_MIN_NS = _cext.PARALLEL_MIN_NS, 0  # split even these small calls
    try:
        for mode in range(4):
            got = _bin_out(mode, n, o, ho, wo)
            K.binary_conv_fused(xpad, koff, pb, c, stride, pad, dil, h, w, ho, wo, mode, sc, fb,
                                got)  # fmt: skip
            want = _bin_out(mode, n, o, ho, wo)
            with _cext.disabled():
                K.binary_conv_fused(xpad, koff, pb, c, stride, pad, dil, h, w, ho, wo, mode, sc,
                                    fb, want)  # fmt: skip
            np.testing.assert_array_equal(got, want, err_msg=f"mode {mode}")
            if _cext.amx():  # the AVX-512 XOR kernel too, where the AMX one ran above
                got_v = _bin_out(mode, n, o, ho, wo)
                with _cext.no_amx():
                    K.binary_conv_fused(xpad, koff, pb, c, stride, pad, dil, h, w, ho, wo, mode,
                                        sc, fb, got_v)  # fmt: skip
                np.testing.assert_array_equal(got_v, want, err_msg=f"AVX-512 mode {mode}")
            if mode == 0:
                np.testing.assert_array_equal(got, ref)
            if mode == 1:  # the float epilogue: multiply then add, in float32
                np.testing.assert_array_equal(got, ref.astype(np.float32) * sc + fb)
            if mode == 3:
                bits = ref.astype(np.float32) * sc + fb > 0
                np.testing.assert_array_equal(got, K.pack_signs(np.where(bits, 1, -1).astype(
                    np.int8)))  # fmt: skip
    finally:
        K.set_threads(1)
        _cext.PARALLEL_MIN_NS = min_ns


def _gemm_case(rng, p, k, o, signed):
    w = rng.integers(-127, 128, (o, k)).astype(np.int8)
    pc = K.prepare_linear(w)
    kp = pc.wp.shape[2] * 4
    x = rng.integers(-127, 128, (p, k)) if signed else rng.integers(0, 256, (p, k))
    xu = np.zeros((p, kp), np.uint8)
    xu[:, :k] = (x + 128 if signed else x).astype(np.uint8)
    init = pc.corr[0] if signed else pc.zero[0]
    return w, x, pc, xu, init


@needs_c
@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    p=st.integers(1, 70),
    k=st.integers(1, 150),
    o=st.integers(1, 100),
    signed=st.booleans(),
    out_dtype=st.sampled_from([np.uint8, np.int8, np.int16, np.int32]),
    threads=st.sampled_from([1, 2]),
)
def test_gemm_c_equals_numba_every_mode(seed, p, k, o, signed, out_dtype, threads):
    rng = np.random.default_rng(seed)
    w, x, pc, xu, init = _gemm_case(rng, p, k, o, signed)
    acc_ref = x.astype(np.int64) @ w.T.astype(np.int64)
    op = init.shape[0]
    info = np.iinfo(out_dtype)
    bias = K._padded(rng.integers(-1000, 1000, o).astype(np.int64), op)
    m = K._padded(rng.integers(1, 2**15, o).astype(np.int64), op)
    n = K._padded(rng.integers(10, 24, o).astype(np.int64), op)
    half = np.left_shift(np.int64(1), n - 1)
    sc = K._padded(rng.standard_normal(o).astype(np.float32), op)
    fb = K._padded(rng.standard_normal(o).astype(np.float32), op)
    hw = int(rng.choice([d for d in range(1, p + 1) if p % d == 0]))
    outs = {
        0: lambda: np.empty((p, o), out_dtype),
        1: lambda: np.empty((p, o), np.float32),
        2: lambda: np.empty((p // hw, o, hw), np.float32),
        3: lambda: np.empty((p, -(-o // 64)), np.uint64),
        4: lambda: np.empty((p, o), np.int32),
    }
    K.set_threads(min(threads, K.numba.config.NUMBA_NUM_THREADS))
    min_ns, _cext.PARALLEL_MIN_NS = _cext.PARALLEL_MIN_NS, 0  # split even these small calls
    try:
        for mode in range(5):
            args = (pc, init, o, mode, 1, bias, m, n, half, max(info.min, -(2**31)),
                    min(info.max, 2**31 - 1), sc, fb, hw)  # fmt: skip
            got, want = outs[mode](), outs[mode]()
            K.gemm_fused(xu, *args, got)
            with _cext.disabled():
                K.gemm_fused(xu, *args, want)
            np.testing.assert_array_equal(got, want, err_msg=f"mode {mode}")
            if _cext.amx():  # the AVX-512 GEMM too, where the AMX one ran above
                got_v = outs[mode]()
                with _cext.no_amx():
                    K.gemm_fused(xu, *args, got_v)
                np.testing.assert_array_equal(got_v, want, err_msg=f"AVX-512 mode {mode}")
            if mode == 4:
                np.testing.assert_array_equal(got, acc_ref)
            # the interleaved input layout [Kp/4, P, 4] gives the same results
            xi = np.ascontiguousarray(xu.reshape(p, -1, 4).transpose(1, 0, 2))
            got2 = outs[mode]()
            K.gemm_fused(xi, *args, got2, interleaved=True)
            np.testing.assert_array_equal(got2, want, err_msg=f"interleaved mode {mode}")
    finally:
        K.set_threads(1)
        _cext.PARALLEL_MIN_NS = min_ns


@needs_c
@pytest.mark.parametrize("c,stride", [(256, 1), (13, 1), (30, 2), (5, 3)])
def test_quant_k4_equals_the_row_quantizer(c, stride):
    rng = np.random.default_rng(c)
    x = (rng.standard_normal((2, c, 9, 21)) * 40).astype(np.float32)
    x[0, 0, 0, :4] = [0.5, 1.5, -0.5, -2.5]  # ties round to even, as np.rint
    kp = -(-c // 4) * 4
    for s, lo, hi, shift in ((np.float32(0.37), -127, 127, 128), (np.float32(1.0), 0, 255, 0)):
        ho, wo = (9 - 1) // stride + 1, (21 - 1) // stride + 1
        rows = np.empty((2 * ho * wo, kp), np.uint8)
        K._quant_rows_nchw(x, s, lo, hi, shift, stride, stride, rows)
        got = K.quant_nchw_k4(x, s, lo, hi, shift, stride, stride, kp)
        np.testing.assert_array_equal(got, rows.reshape(-1, kp // 4, 4).transpose(1, 0, 2))


@needs_c
@pytest.mark.parametrize("s", [0.37, 0.0123, 1 / 3, 0.7071, 2.5e-3])
def test_quant_k4_rounds_as_the_division_next_to_half_integers(s):
    """The C quantizer multiplies by 1/s and divides only where the product is within a
    few ulps of a half-integer: inputs a few ulps around (k + 1/2) s give rint(x / s)."""
    s = np.float32(s)
    mid = ((np.arange(-130, 130, dtype=np.float32) + np.float32(0.5)) * s).astype(np.float32)
    steps = np.arange(-6, 7)
    bits = mid.view(np.int32)[:, None] + np.where(mid[:, None] < 0, -steps, steps)
    x = bits.astype(np.int32).view(np.float32).reshape(-1)
    x = np.concatenate([x, np.float32([0, -0.0, 1e-40, np.inf, -np.inf])])
    x = np.pad(x, (0, -len(x) % 16)).reshape(1, -1, 1, 16)  # C channels of 16 pixels
    c = x.shape[1]
    want = np.clip(np.rint(x / s), -127, 127).astype(np.int32) + 128
    got = K.quant_nchw_k4(x, s, -127, 127, 128, 1, 1, -(-c // 4) * 4)
    got = got.transpose(1, 0, 2).reshape(16, -1)[:, :c].T.reshape(x.shape)
    assert (np.rint(x / s) != np.rint(x * (np.float32(1) / s))).any()  # the cases exist
    np.testing.assert_array_equal(got, want)


@needs_c
def test_wrong_sizes_are_value_errors_not_crashes():
    lib = _cext.lib()
    small = np.zeros(4, np.uint8)
    w = np.zeros((2, 1, 8, 4), np.int8)
    init = np.zeros(16, np.int32)
    f32 = np.zeros(16, np.float32)
    i64 = np.zeros(16, np.int64)
    with pytest.raises(ValueError, match="xu"):
        lib.gemm_u8s8(small, False, w, init, 8, 4, 16, 10, 1, 0, i64, i64, i64, i64, 0, 0, 4,
                      f32, f32, 1, np.zeros((8, 10), np.float32), 0, 8)  # fmt: skip
    with pytest.raises(ValueError, match="out"):
        lib.gemm_u8s8(np.zeros((8, 4), np.uint8), False, w, init, 8, 4, 16, 10, 1, 0, i64, i64,
                      i64, i64, 0, 0, 4, f32, f32, 1, np.zeros(3, np.float32), 0, 8)  # fmt: skip
    with pytest.raises(ValueError, match="inconsistent"):  # rows past P
        lib.gemm_u8s8(np.zeros((8, 4), np.uint8), False, w, init, 8, 4, 16, 10, 1, 0, i64, i64,
                      i64, i64, 0, 0, 4, f32, f32, 1, np.zeros((8, 10), np.float32), 0,
                      9)  # fmt: skip
    if _cext.amx():
        wa = K.amx_weights(np.zeros((16, 4), np.int8))
        lib.gemm_amx(np.zeros((8, 4), np.uint8), False, wa, init, 8, 4, 16, 10, 1, 0, i64, i64,
                     i64, i64, 0, 0, 4, f32, f32, 1, np.zeros((8, 10), np.float32), 0,
                     8)  # fmt: skip
        with pytest.raises(ValueError, match="wa"):  # the AVX-512 layout is too small
            lib.gemm_amx(np.zeros((8, 4), np.uint8), False, w, init, 8, 4, 16, 10, 1, 0, i64,
                         i64, i64, i64, 0, 0, 4, f32, f32, 1, np.zeros((8, 10), np.float32), 0,
                         8)  # fmt: skip
    rng = np.random.default_rng(0)
    xp, _, pb, xpad, koff, ho, wo, sc, fb = _binary_case(rng, 1, 64, 32, 3, 3, 5, 5, (1, 1),
                                                         (1, 1), (1, 1))  # fmt: skip
    args = [xpad, koff, pb.wb, pb.wpop, sc, fb, 1, 7, 7, 1, 64, 3, 3, 1, 1, 1, 1, 1, 1, 5, 5, ho,
            wo, 32, pb.wb.shape[0], 1, False, np.zeros((1, ho, wo, 32), np.float32), 0,
            ho]  # fmt: skip
    lib.xnor_conv(*args)  # the consistent call runs
    bad_koff = koff.copy()
    bad_koff[-1] = 10**6
    with pytest.raises(ValueError, match="koff"):
        lib.xnor_conv(*(args[:1] + [bad_koff] + args[2:]))
    with pytest.raises(ValueError, match="out"):
        lib.xnor_conv(*(args[:-3] + [np.zeros(5, np.float32)] + args[-2:]))
    with pytest.raises(TypeError):  # a read-only output buffer
        ro = np.zeros((1, ho, wo, 32), np.float32)
        ro.flags.writeable = False
        lib.xnor_conv(*(args[:-3] + [ro] + args[-2:]))
    if _cext.amx():  # the AMX binary conv: the same geometry checks
        wa = K.binary_amx_weights(pb, 64, False)
        out = np.zeros((1, ho, wo, 32), np.float32)
        aargs = [xpad, wa, sc, fb, 1, 7, 7, 1, 64, 3, 3, 1, 1, 1, 1, 1, 1, 5, 5, ho, wo, 32, 1,
                 out, 0, ho]  # fmt: skip
        lib.bconv_amx(*aargs)
        want = np.zeros_like(out)
        lib.xnor_conv(*(args[:-3] + [want] + args[-2:]))
        np.testing.assert_array_equal(out, want)
        with pytest.raises(ValueError, match="wa"):
            lib.bconv_amx(*([xpad, wa[:1]] + aargs[2:]))
        with pytest.raises(ValueError, match="xpad"):
            lib.bconv_amx(*([xpad[:, :3]] + aargs[1:]))
        with pytest.raises(ValueError, match="out"):
            lib.bconv_amx(*(aargs[:-3] + [np.zeros(5, np.float32)] + aargs[-2:]))
        with pytest.raises(ValueError, match="inconsistent"):  # padding past the buffer
            lib.bconv_amx(*(aargs[:13] + [5] + aargs[14:]))


@pytest.mark.parametrize("use_c", [True, False], ids=["c", "numba"])
def test_binary01_and_popcount_form_equals_the_integer_conv(use_c):
    """{0, 1} weights x sign inputs (SBNN): 2 popcount(x & b) - popcount(b) over the valid taps
    equals the integer convolution of the {0, 1} codes with the {-1, +1} inputs."""
    if use_c and not _cext.available():
        pytest.skip(f"C kernels not available: {_cext.why_not()}")
    rng = np.random.default_rng(5)
    for c, o, stride, pad, dil in ((70, 37, (1, 1), (1, 1), (1, 1)), (128, 64, (2, 1), (1, 0),
                                                                        (1, 2))):  # fmt: skip
        x = _signs(rng, (2, 9, 10, c))
        b = (rng.random((o, 3, 3, c)) < 0.1).astype(np.int8)
        want = K.conv2d_int(x, b, stride, pad, dil)
        pb = K.prepare_binary_conv(K.pack_binary_weights(2 * b - 1))
        xp = K.pack_signs(x)
        if use_c:
            got = K.conv2d_binary_tiled(xp, c, pb, stride, pad, dil, and01=True)
            with _cext.no_amx():  # the AVX-512 AND + popcount kernel (AMX above, where it runs)
                got_v = K.conv2d_binary_tiled(xp, c, pb, stride, pad, dil, and01=True)
            np.testing.assert_array_equal(got_v, want)
        else:
            with _cext.disabled():
                got = K.conv2d_binary_tiled(xp, c, pb, stride, pad, dil, and01=True)
        np.testing.assert_array_equal(got, want)


@needs_c
@pytest.mark.parametrize("shape", [(2, 130, 5, 19), (1, 64, 3, 16), (3, 7, 2, 33)])
def test_sign_pack_equals_numba(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[::7] = 0.0  # sign(0) packs as -1 (bit 0), as does NaN
    x.flat[3::11] = np.nan
    n, c, h, w = shape
    cw = -(-c // 64)
    want = np.empty((n, h, w, cw), np.uint64)
    K._sign_pack_nchw(x, want)
    got = np.zeros((n, h, w, cw), np.uint64)
    assert K.sign_pack_fast(x, got, nchw=True)
    np.testing.assert_array_equal(got, want)
    rows = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(-1, c)
    got_rows = np.zeros((rows.shape[0], cw), np.uint64)
    assert K.sign_pack_fast(rows, got_rows, nchw=False)
    np.testing.assert_array_equal(got_rows, want.reshape(-1, cw))
    assert not K.sign_pack_fast(rows.astype(np.float64), got_rows, nchw=False)  # numba's


def test_small_calls_stay_on_one_thread():
    calls = []
    _cext.parallel_rows(lambda r0, r1: calls.append((r0, r1)), 64, 2, est_ns=1_000)
    assert calls == [(0, 64)]
    calls.clear()
    _cext.parallel_rows(lambda r0, r1: calls.append((r0, r1)), 64, 2, est_ns=1e9)
    assert sorted(calls) == [(0, 32), (32, 64)]
