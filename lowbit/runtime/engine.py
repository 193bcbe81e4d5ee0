"""The lowbit Engine: runs a packed ``.lowbit`` file with the runtime kernels (numpy + numba,
no torch).

``load(path)`` reads the file (``lowbit.fileformat``), repacks every layer's weights once
for the kernel its (weight codes, input codes) pair selects, and returns an ``Engine``;
``engine(x)`` takes a float32 NCHW batch (normalized as in training) and returns the float32
logits of the frozen model (``lowbit.freeze``).

Layout: 4-D tensors live in NHWC inside the engine (channels last, as the kernels want);
tensors of any other rank keep the reference layout. Every op that sees dimensions
(flatten, reshape, slice, cat, pad, pooling) maps them, so the result equals the NCHW
reference executor's.

Kernels, per conv/linear layer (``Engine.kernels()`` lists the choice):

- ``gemm-int8``: int8 codes (int8, int4, ternary, binary, fixed point up to 8 bits) x
  int8/uint8 input codes: the VNNI GEMM (im2col for k > 1), depthwise kernel for
  depthwise convs (``lowbit.runtime.kernels``);
- ``xnor``: binary {-1, +1} weights x sign input: the quantize op packs the signs of its
  input into 64-bit words and the layer runs XOR + popcount (zero padding is exact: padded
  taps are skipped). {0, 1} weights (SBNN) run the AND + popcount form of methods.md,
  ``sum b.x = 2 popcount(x & b) - popcount(b)`` (convs; linear layers
  ``(acc_pm1 + sum(x)) / 2``). Where AMX runs, xnor convs compute the same sums as int8
  dot products of the unpacked +-1 signs on the tile unit (``_lbk.c``, lb_bconv_amx);
- ``sst-lut``: structured sparse ternary weights (``load(..., sst_kernel="lut")``), no
  multiplies. C (AVX-512, groups of at most 15): per input row, each group's values and
  their negatives form a 32-entry register table, and 32 output channels look up each of
  their k taps in it at once (``vpermw``), from 5-bit tap codes built at load time; numba:
  per block of 16 input rows the partial sums of every codebook pattern over every group
  are tabulated once and each output channel adds one table entry per group. By default SST
  layers run ``gemm-int8``, faster from a few rows up; at batch 1 the look-up path is
  level with or ahead of it (measure with bench/sst.py --part linear);
- ``int64``: wider integer codes (int16/int32 fixed point): im2col + an int64 GEMM;
- ``float``: float weights or float input: float32 im2col + matmul (not bit-exact).

Fusions (planned at load time, bit-exact): a quantize op read only by a pointwise/linear
gemm-int8 layer is folded into that layer's GEMM-row builder; the engine's NCHW input goes
straight into the first quantizer (or fused layer) and a float conv producing the output
writes NCHW, so neither transposes; requantization, dequantization, NCHW stores and sign
packing run in the GEMM's / XNOR kernel's per-task epilogue (no int32 array in memory); 3x3
depthwise convs run an LLVM-IR micro-kernel (16 channels per vector, float32 multiply-adds,
exact below 2**24) with the requantization fused; scratch and output buffers are kept per
layer between calls (the returned array is always fresh).

Integer layers reproduce the reference exactly: the int32 accumulator, then the fused
requantization (``lowbit.requant``) or ``float32(acc) * out_scale`` (+ ``float32(sum(x))
* offset_scale``) ``+ bias`` as separately rounded float32 operations. The quantize op is
``clip(round_half_even(x / s), lo, hi)`` in float32.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numba import njit, prange
from numpy.lib.stride_tricks import as_strided

from ..errors import FormatError
from ..fileformat import read
from . import kernels as K

__all__ = ["Engine", "load"]

SUPPORTED = (
    "quantize", "conv", "linear", "affine", "relu", "clamp", "maxpool", "avgpool", "gap",
    "flatten", "reshape", "add", "cat", "pad", "slice",
)  # fmt: skip


# ----------------------------------------------------------------------------- numba helpers


@njit(parallel=True, cache=True)
def _quantize_int(x, s, lo, hi, out):
    # x [R, C] float32, out [R, C] int8/uint8/int16: clip(rint(x / s), lo, hi), float32
    R, C = x.shape
    for r in prange(R):
        xr = x[r]
        orow = out[r]
        for c in range(C):
            v = np.rint(xr[c] / s)
            if v < lo:
                v = lo
            elif v > hi:
                v = hi
            orow[c] = v


@njit(parallel=True, cache=True)
def _sign_pack(x, out):
    # x [R, C] (any real dtype) -> out [R, CW] uint64, bit c%64 of word c//64 = (x > 0)
    R, C = x.shape
    CW = out.shape[1]
    for r in prange(R):
        xr = x[r]
        for w in range(CW):
            c0 = w * 64
            c1 = min(c0 + 64, C)
            word = np.uint64(0)
            for c in range(c0, c1):
                if xr[c] > 0:
                    word |= np.uint64(1) << np.uint64(c - c0)
            out[r, w] = word


@njit(parallel=True, cache=True)
def _dequant_sign_pack(acc, scale, bias, out):
    # acc [R, O] int32 -> out [R, OW] uint64: bit o = (float32(acc) * scale + bias > 0), the
    # sign quantizer applied to the dequantized output without writing it
    R, O = acc.shape
    OW = out.shape[1]
    for r in prange(R):
        ar = acc[r]
        for w in range(OW):
            o0 = w * 64
            o1 = min(o0 + 64, O)
            word = np.uint64(0)
            for o in range(o0, o1):
                v = np.float32(ar[o]) * scale[o]
                v = v + bias[o]
                if v > 0:
                    word |= np.uint64(1) << np.uint64(o - o0)
            out[r, w] = word


@njit(parallel=True, cache=True)
def _packed_sums(xp, C, out):
    # xp [R, CW] uint64 packed signs -> out [R] int32 = sum of the ±1 values = 2*pop - C
    R, CW = xp.shape
    for r in prange(R):
        s = 0
        for w in range(CW):
            s += K._popc(xp[r, w])
        out[r] = 2 * s - C


@njit(inline="always")
def _dw_pixel(x, w32, n, h0, w0, kh, kw, dh, dw, H, W, acc):
    # acc[c] = sum over valid taps of x[n, h, w, c] * w32[tap, c] (one pass per tap keeps
    # three pointers in the inner loop, so LLVM vectorizes it)
    C = acc.shape[0]
    for c in range(C):
        acc[c] = 0
    for i in range(kh):
        hi = h0 + i * dh
        if hi < 0 or hi >= H:
            continue
        for j in range(kw):
            wi = w0 + j * dw
            if wi < 0 or wi >= W:
                continue
            xr = x[n, hi, wi]
            wr = w32[i * kw + j]
            for c in range(C):
                acc[c] += np.int32(xr[c]) * wr[c]


@njit(parallel=True, cache=True)
def _dw_epilogue(x, w32, kh, kw, sh, sw, ph, pw, dh, dw, mode, pre_shift, bias, m, n, half, lo,
                 hi, scale, fbias, out):  # fmt: skip
    # depthwise conv + fused epilogue: mode 0 requantization (out integer codes), mode 1
    # float32(acc) * scale + fbias (two roundings, out float32); out [N, Ho, Wo, C]
    N, H, W, C = x.shape
    Ho = out.shape[1]
    Wo = out.shape[2]
    for r in prange(N * Ho):
        b = r // Ho
        ho = r % Ho
        acc = np.empty(C, np.int32)
        for wo in range(Wo):
            _dw_pixel(x, w32, b, ho * sh - ph, wo * sw - pw, kh, kw, dh, dw, H, W, acc)
            orow = out[b, ho, wo]
            if mode == 0:
                for c in range(C):
                    v = ((np.int64(acc[c]) << pre_shift) + bias[c]) * m[c]
                    q = (np.abs(v) + half[c]) >> n[c]
                    if v < 0:
                        q = -q
                    orow[c] = min(max(q, lo), hi)
            else:
                for c in range(C):
                    f = np.float32(acc[c]) * scale[c]
                    orow[c] = f + fbias[c]


@njit(parallel=True, cache=True)
def _gemm_i64(cols, w, out):
    # cols [P, K] int64, w [O, K] int64 -> out [P, O] int32 (the exact int32 accumulator)
    P, Kk = cols.shape
    O = w.shape[0]
    for p in prange(P):
        xr = cols[p]
        for o in range(O):
            wr = w[o]
            s = np.int64(0)
            for k in range(Kk):
                s += xr[k] * wr[k]
            out[p, o] = np.int32(s)


# ----------------------------------------------------------------------------- layout helpers


def _to_nchw(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2)) if x.ndim == 4 else x


def _to_nhwc(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1)) if x.ndim == 4 else x


_NHWC_AXIS = {0: 0, 1: 3, 2: 1, 3: 2}  # reference (NCHW) axis -> NHWC axis


def _axis(dim: int, ndim: int) -> int:
    d = dim + ndim if dim < 0 else dim
    return _NHWC_AXIS[d] if ndim == 4 else d


def _out_size(size, k, s, p, d, ceil=False, what="input") -> int:
    num = size + 2 * p - d * (k - 1) - 1
    o = (num + (s - 1 if ceil else 0)) // s + 1
    if ceil and (o - 1) * s >= size + p:
        o -= 1
    if o < 1:
        raise ValueError(f"the {what} ({size} pixels) is too small for kernel {k}")
    return o


def _windows(x, kh, kw, sh, sw, ph, pw, dh, dw, fill=0, ho=None, wo=None):
    """A strided view ``[N, Ho, Wo, kh, kw, C]`` of NHWC ``x`` padded with ``fill``."""
    N, H, W, C = x.shape
    ho = _out_size(H, kh, sh, ph, dh) if ho is None else ho
    wo = _out_size(W, kw, sw, pw, dw) if wo is None else wo
    need_h = max(H + 2 * ph, (ho - 1) * sh + (kh - 1) * dh + 1)
    need_w = max(W + 2 * pw, (wo - 1) * sw + (kw - 1) * dw + 1)
    if need_h != H or need_w != W:
        xp = np.full((N, need_h, need_w, C), fill, x.dtype)
        xp[:, ph : ph + H, pw : pw + W] = x
    else:
        xp = np.ascontiguousarray(x)
    s = xp.strides
    return as_strided(
        xp,
        (N, ho, wo, kh, kw, C),
        (s[0], s[1] * sh, s[2] * sw, s[1] * dh, s[2] * dw, s[3]),
        writeable=False,
    )


def _im2col(x, g, cg, geo) -> np.ndarray:
    kh, kw, sh, sw, ph, pw, dh, dw = geo
    v = _windows(x, kh, kw, sh, sw, ph, pw, dh, dw)
    N, Ho, Wo = v.shape[:3]
    return v[..., g * cg : (g + 1) * cg].reshape(N * Ho * Wo, kh * kw * cg)


# ----------------------------------------------------------------------------- layers


@dataclass(repr=False)
class _Layer:
    """A conv/linear layer planned for one kernel."""

    op: dict
    kernel: str  # gemm-int8 | xnor | sst-lut | int64 | float
    conv: bool
    codes: np.ndarray  # conv: [O, kh, kw, C/g]; linear: [O, K]
    in_dtype: Any = None  # the input codes' dtype (int8/uint8/int16) on integer paths
    packed: Any = None
    t: dict = field(default_factory=dict)
    binary01: bool = False
    sign_out: bool = False  # emit the packed signs of the float output (a fused quantize)
    fq: Any = None  # (scale, lo, hi): the input quantizer fused in (the input is float)
    nchw_in: bool = False  # the (float) input is the engine's NCHW input
    nchw_out: bool = False  # write the float output NCHW (the engine's output)
    reuse_out: bool = True  # keep the output buffer between calls (not for the result)

    def __post_init__(self):
        self._bufs: dict = {}
        a = self.op["attrs"]
        self.name = self.op["name"]
        self.out_int = a.get("out") == "int"
        self.O = self.codes.shape[0]
        if self.conv:
            self.groups = int(a["groups"])
            _, self.kh, self.kw, self.cg = self.codes.shape
            self.stride = tuple(a["stride"])
            self.padding = tuple(a["padding"])
            self.dilation = tuple(a["dilation"])
            self.geo = (self.kh, self.kw, *self.stride, *self.padding, *self.dilation)
            self.cin = self.cg * self.groups
        else:
            self.groups, self.kh, self.kw = 1, 1, 1
            self.cg = self.cin = self.codes.shape[1]
        self.has_offset = "offset_scale" in self.t
        # an sst-lut layer (packed by _prepare_sst) on the C look-up kernel
        self.sst_c = self.kernel == "sst-lut" and K.sst_c_ok(self.packed)
        if self.out_int:
            lo, hi = int(a["lo"]), int(a["hi"])
            self.lo, self.hi, self.pre_shift = lo, hi, int(a["pre_shift"])
            self.out_dtype = _int_dtype(lo, hi)
        t = self.t
        if self.out_int:
            O = self.O
            self.rq = (
                K._per_channel(t["bias_q"], O, np.int64, "bias"),
                K._per_channel(t["m"], O, np.int64, "m"),
                K._per_channel(t["n"], O, np.int64, "n"),
            )
            self.rq = (*self.rq, np.left_shift(np.int64(1), self.rq[2] - 1))
        elif "out_scale" in t:
            self.dq = (K._per_channel(t["out_scale"], self.O, np.float32, "scale"),
                       K._per_channel(t["bias"], self.O, np.float32, "bias"))  # fmt: skip
        if self.kernel == "gemm-int8":
            if self.conv:
                self.packed = K.prepare_conv(self.codes, self.groups)
            else:
                self.packed = K.prepare_linear(self.codes)
            pc = self.packed
            self.signed = self.in_dtype == np.dtype(np.int8)
            if not pc.depthwise:
                self.Kp = pc.wp.shape[2] * 4
                self.init = pc.corr if self.signed else pc.zero
                if self.groups == 1:  # self.gemm: epilogue arrays zero-padded to Op
                    op = self.init.shape[1]
                    if hasattr(self, "dq"):
                        self.dq_pad = tuple(K._padded(v, op) for v in self.dq)
                    if hasattr(self, "rq"):
                        self.rq_pad = tuple(K._padded(v, op) for v in self.rq)
                self.pointwise = (
                    self.kh == self.kw == 1 and self.groups == 1 and self.padding == (0, 0)
                    if self.conv else True
                )  # fmt: skip
        elif self.kernel == "xnor":
            w = self.codes
            if self.binary01:
                w = (2 * w.astype(np.int16) - 1).astype(np.int8)
            wp = K.pack_signs(w)
            self.packed = K.prepare_binary_conv(wp) if self.conv else wp
            if self.conv and hasattr(self, "dq"):  # the epilogue's per-channel affine,
                op = self.packed.wpop.shape[1]  # zero above O (padded output channels)
                self.dq_bin = tuple(K._padded(v, op) for v in self.dq)
        elif self.kernel == "int64":
            self.w64 = self.codes.reshape(self.O, -1).astype(np.int64)
        elif self.sst_c:
            op = self.packed.c_taps.shape[2]  # the C kernel's epilogue arrays, padded to Op
            if hasattr(self, "dq"):
                self.dq_pad = tuple(K._padded(v, op) for v in self.dq)
            if hasattr(self, "rq"):
                self.rq_pad = tuple(K._padded(v, op) for v in self.rq)
        else:
            self.wf = self.codes.reshape(self.O, -1).astype(np.float32)

    # -- the accumulator

    def _sums(self, x) -> np.ndarray:
        """sum of the input values over each output's receptive field: [..., groups] int32."""
        if self.kernel == "xnor":
            lead = x.shape[:-1]
            s = np.empty(int(np.prod(lead)), np.int32)
            _packed_sums(x.reshape(-1, x.shape[-1]), self.cin, s)
            s = s.reshape(*lead, 1)
        else:
            xs = x.reshape(*x.shape[:-1], self.groups, self.cg)
            s = xs.sum(axis=-1, dtype=np.int64 if x.dtype.kind in "iu" else np.float32)
        if not self.conv:
            return s
        v = _windows(s, *self.geo)
        return v.sum(axis=(3, 4), dtype=s.dtype)

    def _dw9_prepare(self):
        """Per-channel tables padded to 16 channels for the 3x3 depthwise micro-kernel."""
        C = self.cin
        Cp = -(-C // 16) * 16

        def pad(v, dtype, fill=0):
            out = np.full(Cp, fill, dtype)
            out[:C] = v
            return out

        w9 = np.zeros((9, Cp), np.float32)  # int8 codes, exact in float32
        w9[:, :C] = self.packed.w32
        if self.out_int:
            b, m, n, half = self.rq
            rq = (pad(b, np.int64), pad(m, np.int64), pad(n, np.int64, 1), pad(half, np.int64, 1))
            fl = (_F16, _F16)
            # the 32-bit product form is exact when acc * 2**pre_shift + bias stays in int32
            lim = 9 * 255 * int(np.abs(self.packed.w32).max(initial=0))
            narrow = (
                self.pre_shift < 31
                and (lim << self.pre_shift) + int(np.abs(b).max(initial=0)) < 2**31
                and int(np.abs(m).max(initial=0)) < 2**31
            )
        else:
            rq = (_I16, _I16, _I16, _I16)
            fl = (pad(self.dq[0], np.float32), pad(self.dq[1], np.float32))
            narrow = False
        self.dw9 = (Cp, w9, rq, fl, narrow)

    def depthwise(self, x):
        """Depthwise conv with the requantization or dequantization fused."""
        if x.dtype != self.in_dtype:
            x = x.astype(self.in_dtype)
        N, H, W, C = x.shape
        if C != self.cin:
            raise ValueError(f"layer {self.name}: input has {C} channels, not {self.cin}")
        sh, sw = self.stride
        ph, pw = self.padding
        dh, dw = self.dilation
        Ho, Wo = _out_size(H, self.kh, sh, ph, dh), _out_size(W, self.kw, sw, pw, dw)
        shape = (N, Ho, Wo, C)
        if self.kh * self.kw == 9:
            if not hasattr(self, "dw9"):
                self._dw9_prepare()
            Cp, w9, rq, fl, narrow = self.dw9
            Hp = max(H + 2 * ph, (Ho - 1) * sh + 2 * dh + 1)
            Wp = max(W + 2 * pw, (Wo - 1) * sw + 2 * dw + 1)
            key = ("xpad", (N, Hp, Wp, Cp), x.dtype)
            xpad = self._bufs.get(key)
            if xpad is None:  # zero borders and channel padding, written once
                xpad = self._bufs[key] = np.zeros((N, Hp, Wp, Cp), x.dtype)
                self._bufs[("koff", Wp, Cp)] = np.array(
                    [(i * dh * Wp + j * dw) * Cp for i in range(3) for j in range(3)], np.int64
                )
            koff = self._bufs[("koff", Wp, Cp)]
            xpad[:, ph : ph + H, pw : pw + W, :C] = x
            out = self._out(shape, self.out_dtype if self.out_int else np.float32)
            K._dw_fused(xpad, koff, w9, C, sh, Ho, Wo, sw, *rq,
                        self.pre_shift if self.out_int else 0, self.lo if self.out_int else 0,
                        self.hi if self.out_int else 0, *fl, narrow, out)  # fmt: skip
            return out
        x = np.ascontiguousarray(x)
        geo = (self.packed.w32, self.kh, self.kw, sh, sw, ph, pw, dh, dw)
        if self.out_int:
            out = np.empty(shape, self.out_dtype)
            _dw_epilogue(x, *geo, 0, self.pre_shift, *self.rq, self.lo, self.hi, _F0, _F0, out)
        else:
            out = np.empty(shape, np.float32)
            _dw_epilogue(x, *geo, 1, 0, _I0, _I0, _I0, _I0, 0, 0, *self.dq, out)
        return out

    def _buf(self, key, shape, dtype, reuse=True):
        """A scratch/output array kept between calls (keyed by role and shape)."""
        if not reuse:
            return np.empty(shape, dtype)
        k = (key, shape, dtype)
        b = self._bufs.get(k)
        if b is None:
            if len(self._bufs) > 16:
                self._bufs.clear()
            b = self._bufs[k] = np.empty(shape, dtype)
        return b

    def _out(self, shape, dtype):
        return self._buf("out", shape, dtype, self.reuse_out)

    def gemm(self, x):
        """gemm-int8 layers without groups: the GEMM input rows built in one pass (the input
        quantizer, the int8 shift and the layout change fused in), the epilogue fused into
        the GEMM (requantization, dequantization, NCHW store or sign packing)."""
        pc = self.packed
        Kp = self.Kp
        shift = 128 if self.signed else 0
        interleaved = False
        fq = self.fq
        if self.conv:
            if self.nchw_in:
                N, C, H, W = x.shape
            else:
                N, H, W, C = x.shape
            if C != self.cin:
                raise ValueError(f"layer {self.name}: input has {C} channels, not {self.cin}")
            sh, sw = self.stride
            ph, pw = self.padding
            dh, dw = self.dilation
            Ho = _out_size(H, self.kh, sh, ph, dh)
            Wo = _out_size(W, self.kw, sw, pw, dw)
            lead = (N, Ho, Wo)
            P = N * Ho * Wo
            xu = self._buf("xu", (P, Kp), np.uint8)
            if self.pointwise and fq is not None and self.nchw_in and K._cext.available():
                # quantized straight into the GEMM's interleaved layout: no transpose
                xu = self._buf("xu4", (Kp // 4, P, 4), np.uint8)
                K.quant_nchw_k4(x, fq[0], fq[1], fq[2], shift, sh, sw, Kp, xu)
                interleaved = True
            elif self.pointwise:
                if fq is not None:
                    q = K._quant_rows_nchw if self.nchw_in else K._quant_rows_nhwc
                    q(x, fq[0], fq[1], fq[2], shift, sh, sw, xu)
                else:
                    if x.dtype != self.in_dtype:
                        x = x.astype(self.in_dtype)
                    if not shift and Kp == C and (sh, sw) == (1, 1) and x.flags.c_contiguous:
                        xu = x.reshape(P, C).view(np.uint8)
                    else:
                        K._shift_rows(x, shift, sh, sw, xu)
            else:
                if x.dtype != self.in_dtype:
                    x = x.astype(self.in_dtype)
                xs = np.bitwise_xor(x.view(np.uint8), np.uint8(0x80)) if shift else x
                K._im2col(np.ascontiguousarray(xs), 0, self.cg, self.kh, self.kw, sh, sw, ph, pw,
                          dh, dw, Ho, Wo, shift, xu)  # fmt: skip
        else:
            N, C = x.shape
            if C != self.cin:
                raise ValueError(f"layer {self.name}: input has {C} features, not {self.cin}")
            lead = (N,)
            P = N
            xu = self._buf("xu", (P, Kp), np.uint8)
            x4 = x.reshape(N, 1, 1, C)
            if fq is not None:
                K._quant_rows_nhwc(x4, fq[0], fq[1], fq[2], shift, 1, 1, xu)
            else:
                if x.dtype != self.in_dtype:
                    x4 = x4.astype(self.in_dtype)
                K._shift_rows(x4, shift, 1, 1, xu)
        O = self.O
        if self.nchw_out and self.conv and not (self.sign_out or self.out_int):
            mode = 2
            y = self._out((N, O, Ho, Wo), np.float32)
            o2 = y.reshape(N, O, Ho * Wo)
            ep = (0, _I0, _I0, _I0, _I0, 0, 0, *self.dq_pad)
        else:
            mode, y, o2, ep = self._epilogue(lead, P)
        hw = Ho * Wo if self.conv else 1
        K.gemm_fused(xu, pc, self.init[0], O, mode, *ep, hw, o2, interleaved)
        return y

    def _epilogue(self, lead, P):
        """The fused epilogue of ``gemm`` and ``sst`` for channels-last output rows: its
        mode (3 sign bits, 0 requantized, 1 float), the output (``lead`` + channels) and its
        2-D view ``[P, width]``, and the arguments (pre_shift, bias, m, n, half, lo, hi,
        scale, fbias) with the per-channel arrays padded to the kernel's channel count."""
        if self.sign_out:
            mode, width, dtype = 3, -(-self.O // 64), np.uint64
        elif self.out_int:
            mode, width, dtype = 0, self.O, self.out_dtype
        else:
            mode, width, dtype = 1, self.O, np.float32
        y = self._out((*lead, width), dtype)
        if mode == 0:
            ep = (self.pre_shift, *self.rq_pad, self.lo, self.hi, _F0, _F0)
        else:
            ep = (0, _I0, _I0, _I0, _I0, 0, 0, *self.dq_pad)
        return mode, y, y.reshape(P, width), ep

    def binary(self, x):
        """xnor conv layers: the register-blocked XOR + popcount kernel with the epilogue
        fused (dequantization, NCHW store or the next layer's sign packing)."""
        N, H, W, CW = x.shape
        sh, sw = self.stride
        ph, pw = self.padding
        dh, dw = self.dilation
        Ho = _out_size(H, self.kh, sh, ph, dh)
        Wo = _out_size(W, self.kw, sw, pw, dw)
        Hp = max(H + 2 * ph, (Ho - 1) * sh + (self.kh - 1) * dh + 1)
        Wp = max(W + 2 * pw, (Wo - 1) * sw + (self.kw - 1) * dw + 1)
        key = ("xpad", (N, Hp, Wp, CW))
        xpad = self._bufs.get(key)
        if xpad is None:  # zero borders, written once
            xpad = self._bufs[key] = np.zeros((N, Hp, Wp, CW), np.uint64)
            self._bufs[("koff", (N, Hp, Wp, CW))] = K.binary_koff(self.kh, self.kw, dh, dw, Wp,
                                                                  CW)  # fmt: skip
        koff = self._bufs[("koff", (N, Hp, Wp, CW))]
        xpad[:, ph : ph + H, pw : pw + W] = x
        O = self.O
        if self.sign_out:
            mode = 3
            y = self._out((N, Ho, Wo, -(-O // 64)), np.uint64)
        elif self.nchw_out:
            mode = 2
            y = self._out((N, O, Ho, Wo), np.float32)
        else:
            mode = 1
            y = self._out((N, Ho, Wo, O), np.float32)
        K.binary_conv_fused(xpad, koff, self.packed, self.cin, self.stride, self.padding,
                            self.dilation, H, W, Ho, Wo, mode, *self.dq_bin, y,
                            and01=self.binary01)  # fmt: skip
        return y

    def sst(self, x):
        """sst-lut layers on the C look-up kernel with the GEMM's epilogue fused
        (requantization, dequantization or sign packing; channels last)."""
        if x.dtype != self.in_dtype:
            x = x.astype(self.in_dtype)
        if self.conv:
            N, H, W, _ = x.shape
            Ho, Wo = (_out_size(s, k, st, p, d) for s, k, st, p, d in zip(
                (H, W), (self.kh, self.kw), self.stride, self.padding, self.dilation))  # fmt: skip
            rows, lead = _im2col(x, 0, self.cin, self.geo), (N, Ho, Wo)
        else:
            rows, lead = x, (x.shape[0],)
        mode, y, o2, ep = self._epilogue(lead, rows.shape[0])
        K.sst_fused(rows, self.packed, mode, *ep, o2)
        return y

    def acc(self, x) -> np.ndarray:
        if self.kernel == "sst-lut":
            if x.dtype != self.in_dtype:
                x = x.astype(self.in_dtype)
            if not self.conv:
                return K.sst_lut_matmul(x, self.packed)
            cols = _im2col(x, 0, self.cin, self.geo)
            N, H, W, _ = x.shape
            Ho, Wo = (_out_size(s, k, st, p, d) for s, k, st, p, d in zip(
                (H, W), (self.kh, self.kw), self.stride, self.padding, self.dilation))  # fmt: skip
            return K.sst_lut_matmul(cols, self.packed).reshape(N, Ho, Wo, self.O)
        if self.kernel == "gemm-int8":
            if x.dtype != self.in_dtype:
                x = x.astype(self.in_dtype)
            if self.conv:
                return K.conv2d_int(x, self.packed, self.stride, self.padding, self.dilation,
                                    self.groups)  # fmt: skip
            return K.linear_int(x, self.packed)
        if self.kernel == "xnor":
            if self.conv:  # {0, 1} weights: the AND + popcount form of methods.md
                return K.conv2d_binary_tiled(x, self.cin, self.packed, self.stride, self.padding,
                                             self.dilation, and01=self.binary01)  # fmt: skip
            out = K.linear_binary(x, self.cin, self.packed)
            if self.binary01:
                out = ((out + self._sums(x)) // 2).astype(np.int32)
            return out
        # int64 fallback
        x64 = x.astype(np.int64)
        if not self.conv:
            out = np.empty((x.shape[0], self.O), np.int32)
            _gemm_i64(np.ascontiguousarray(x64), self.w64, out)
            return out
        og = self.O // self.groups
        parts = []
        for g in range(self.groups):
            cols = np.ascontiguousarray(_im2col(x64, g, self.cg, self.geo))
            o = np.empty((cols.shape[0], og), np.int32)
            _gemm_i64(cols, self.w64[g * og : (g + 1) * og], o)
            parts.append(o)
        N, H, W, _ = x.shape
        Ho, Wo = (_out_size(s, k, st, p, d) for s, k, st, p, d in zip(
            (H, W), (self.kh, self.kw), self.stride, self.padding, self.dilation))  # fmt: skip
        return np.concatenate(parts, axis=1).reshape(N, Ho, Wo, self.O)

    def float_conv(self, x) -> np.ndarray:
        xf = x.astype(np.float32, copy=False)
        if not self.conv:
            return xf @ self.wf.T
        og = self.O // self.groups
        parts = []
        N, H, W, _ = x.shape
        for g in range(self.groups):
            cols = _im2col(xf, g, self.cg, self.geo)
            parts.append(cols @ self.wf[g * og : (g + 1) * og].T)
        y = parts[0] if self.groups == 1 else np.concatenate(parts, axis=1)
        Ho, Wo = (_out_size(s, k, st, p, d) for s, k, st, p, d in zip(
            (H, W), (self.kh, self.kw), self.stride, self.padding, self.dilation))  # fmt: skip
        return y.reshape(N, Ho, Wo, self.O)

    def float_sums(self, x) -> np.ndarray:
        xf = x.astype(np.float32, copy=False)
        s = xf.reshape(*xf.shape[:-1], self.groups, self.cg).sum(-1, dtype=np.float32)
        if not self.conv:
            return s
        return _windows(s, *self.geo).sum(axis=(3, 4), dtype=np.float32)

    # -- the layer

    def __call__(self, x):
        back = False
        if not self.conv and x.ndim != 2:  # linear over the last reference axis
            if x.ndim == 4:
                x, back = _to_nchw(x), True
            lead = x.shape[:-1]
            y = self(np.ascontiguousarray(x.reshape(-1, x.shape[-1])))
            y = y.reshape(*lead, y.shape[-1])
            return _to_nhwc(y) if back else y
        t = self.t
        if self.kernel == "float":
            y = self.float_conv(x) * t["out_scale"]
            if self.has_offset:
                y = y + self._expand(self.float_sums(x)) * t["offset_scale"]
            return y + t["bias"]
        if _binary_fused(self):
            return self.binary(x)
        fast = self.kernel == "gemm-int8" and not self.has_offset
        if fast and self.packed.depthwise and not self.sign_out:
            return self.depthwise(x)
        if fast and self.groups == 1:
            return self.gemm(x)
        if self.sst_c and not self.has_offset:
            return self.sst(x)
        acc = self.acc(x)
        if self.sign_out:
            ow = -(-self.O // 64)
            out = np.empty((*acc.shape[:-1], ow), np.uint64)
            _dequant_sign_pack(acc.reshape(-1, self.O), self.dq[0], self.dq[1],
                               out.reshape(-1, ow))  # fmt: skip
            return out
        if self.out_int:
            return K.requant(acc, t["bias_q"], t["m"], t["n"], self.lo, self.hi,
                             self.out_dtype, self.pre_shift)  # fmt: skip
        if not self.has_offset:
            return K.dequant(acc, t["out_scale"], t["bias"])
        y = K.dequant(acc, t["out_scale"])
        y += self._expand(self._sums(x)).astype(np.float32) * t["offset_scale"]
        y += t["bias"]
        return y

    def __repr__(self) -> str:
        return f"_Layer({self.name!r}, {self.kernel})"

    def _expand(self, s):
        """[..., groups] sums -> [..., O] (each output channel reads its group's sum)."""
        if s.shape[-1] == self.O:
            return s
        return np.repeat(s, self.O // s.shape[-1], axis=-1)

    def macs(self, y) -> int:
        """MACs of the call that returned ``y`` (channels last, or NCHW when nchw_out)."""
        pixels = np.prod(y.shape) // y.shape[1 if self.nchw_out and y.ndim == 4 else -1]
        return int(pixels) * self.O * self.kh * self.kw * self.cg


_F0 = np.zeros(1, np.float32)
_I0 = np.zeros(1, np.int64)
_F16 = np.zeros(16, np.float32)
_I16 = np.zeros(16, np.int64)
_OI = np.zeros((1, 1), np.int32)
_OF = np.zeros((1, 1), np.float32)
_OF3 = np.zeros((1, 1, 1), np.float32)
_OB = np.zeros((1, 1), np.uint64)


def _prepare_sst(codes: np.ndarray, n: int, k: int, conv: bool):
    """SST look-up-table weights; a conv's input rows are im2col rows ``[kh, kw, C]`` while
    its groups follow the weight's ``[C, kh, kw]`` order, so the column map reorders."""
    if not conv:
        return K.prepare_sst(codes, n, k)
    O, C, kh, kw = codes.shape
    c, i, j = np.meshgrid(np.arange(C), np.arange(kh), np.arange(kw), indexing="ij")
    colmap = ((i * kw + j) * C + c).reshape(-1)
    return K.prepare_sst(codes, n, k, colmap)


def _gemm_rows(lay: _Layer, pointwise: bool = True) -> bool:
    """The layer runs ``_Layer.gemm`` (pointwise: on GEMM rows that are input pixels)."""
    ok = (
        lay.kernel == "gemm-int8"
        and not lay.packed.depthwise
        and lay.groups == 1
        and not lay.has_offset
    )
    return ok and (lay.pointwise or not pointwise)


def _binary_fused(lay: _Layer) -> bool:
    """The layer runs ``_Layer.binary`` (an xnor conv with a float or sign-packed output)."""
    return (
        lay.kernel == "xnor"
        and lay.conv
        and not lay.has_offset
        and not lay.out_int
        and hasattr(lay, "dq")
    )


def _int_dtype(lo: int, hi: int):
    for dt in (np.uint8, np.int8, np.int16, np.int32):
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return np.dtype(dt)
    return np.dtype(np.int64)


# ----------------------------------------------------------------------------- other ops


def _quantize(attrs: dict, packed: bool):
    mode = attrs["mode"]
    if mode == "sign":
        if packed:

            def run(x):
                lead = x.shape[:-1]
                cw = -(-x.shape[-1] // 64)
                out = np.empty((int(np.prod(lead)), cw), np.uint64)
                x2 = np.ascontiguousarray(x).reshape(-1, x.shape[-1])
                if not K.sign_pack_fast(x2, out, nchw=False):
                    _sign_pack(x2, out)
                return out.reshape(*lead, cw)

            def nchw(x):
                N, C, H, W = x.shape
                out = np.empty((N, H, W, -(-C // 64)), np.uint64)
                if not K.sign_pack_fast(x, out, nchw=True):
                    K._sign_pack_nchw(x, out)
                return out

            run.nchw = nchw
            return run
        return lambda x: np.where(x > 0, np.int8(1), np.int8(-1))
    if mode != "int8":
        raise ValueError(f"unknown quantize mode {mode!r}")
    s = np.float32(attrs["scale"])
    lo, hi = int(attrs["lo"]), int(attrs["hi"])
    dt = _int_dtype(lo, hi)

    def run(x):
        x = np.ascontiguousarray(x, dtype=np.float32)
        out = np.empty(x.shape, dt)
        c = x.shape[-1] if x.ndim else 1
        _quantize_int(x.reshape(-1, c), s, lo, hi, out.reshape(-1, c))
        return out

    def nchw(x):
        N, C, H, W = x.shape
        out = np.empty((N, H, W, C), dt)
        K._quant_nchw(x, s, lo, hi, out)
        return out

    run.nchw = nchw
    return run


def _maxpool(a):
    kh, kw = a["kernel"]
    sh, sw = a["stride"]
    ph, pw = a["padding"]
    dh, dw = a["dilation"]
    ceil = bool(a["ceil_mode"])

    def run(x):
        if x.ndim != 4:
            raise ValueError("max pooling needs a 4-D input")
        N, H, W, C = x.shape
        ho = _out_size(H, kh, sh, ph, dh, ceil)
        wo = _out_size(W, kw, sw, pw, dw, ceil)
        if x.dtype.kind == "f":
            fill = -np.inf
        else:
            fill = np.iinfo(x.dtype).min
        if kh == kw == sh == sw == 2 and not (ph or pw) and dh == dw == 1 and not ceil:
            v = x[:, : 2 * ho, : 2 * wo].reshape(N, ho, 2, wo, 2, C)
            return np.maximum(np.maximum(v[:, :, 0, :, 0], v[:, :, 0, :, 1]),
                              np.maximum(v[:, :, 1, :, 0], v[:, :, 1, :, 1]))  # fmt: skip
        return _windows(x, kh, kw, sh, sw, ph, pw, dh, dw, fill, ho, wo).max(axis=(3, 4))

    return run


def _avgpool(a):
    kh, kw = a["kernel"]
    sh, sw = a["stride"]
    ph, pw = a["padding"]
    ceil, inc = bool(a["ceil_mode"]), bool(a["count_include_pad"])

    def divisor(H, W, ho, wo):
        def axis(size, k, s, p, n):
            st = np.arange(n) * s - p
            end = np.minimum(st + k, size + p)
            full = end - st
            cnt = np.minimum(end, size) - np.maximum(st, 0)
            return full, cnt

        fh, ch = axis(H, kh, sh, ph, ho)
        fw, cw = axis(W, kw, sw, pw, wo)
        d = np.outer(fh, fw) if inc else np.outer(ch, cw)
        return d.astype(np.float32)[None, :, :, None]

    def run(x):
        x = x.astype(np.float32, copy=False)
        N, H, W, C = x.shape
        ho = _out_size(H, kh, sh, ph, 1, ceil)
        wo = _out_size(W, kw, sw, pw, 1, ceil)
        s = _windows(x, kh, kw, sh, sw, ph, pw, 1, 1, 0.0, ho, wo).sum(axis=(3, 4))
        return (s / divisor(H, W, ho, wo)).astype(np.float32)

    return run


def _gap(a):
    keep = a.get("keepdim", True)

    def run(x):
        x = x.astype(np.float32, copy=False)
        if x.ndim != 4:
            raise ValueError("global average pooling needs a 4-D input")
        m = x.mean(axis=(1, 2), dtype=np.float64).astype(np.float32)  # [N, C]
        return m[:, None, None, :] if keep else m

    return run


def _flatten(a):
    start, end = int(a["start_dim"]), int(a["end_dim"])

    def run(x):
        nd = x.ndim
        s, e = start % nd, end % nd
        if nd == 4 and (s, e) == (1, 3) and x.shape[1] == x.shape[2] == 1:
            return x.reshape(x.shape[0], x.shape[3])  # [N, 1, 1, C]: NHWC order is NCHW order
        ref = x.transpose(0, 3, 1, 2) if nd == 4 else x  # a view; reshape copies if it must
        shape = ref.shape[:s] + (int(np.prod(ref.shape[s : e + 1])),) + ref.shape[e + 1 :]
        return _to_nhwc(np.ascontiguousarray(ref.reshape(shape)))

    return run


def _reshape(a):
    shape = [int(v) for v in a["shape"]]

    def run(x):
        return _to_nhwc(_to_nchw(x).reshape([x.shape[0], *shape]))

    return run


def _slice(a):
    slices = [slice(*s) for s in a["slices"]]

    def run(x):
        idx = slices + [slice(None)] * (x.ndim - len(slices))
        if x.ndim == 4:
            idx = [idx[0], idx[2], idx[3], idx[1]]
        return np.ascontiguousarray(x[tuple(idx)])

    return run


def _pad(a):
    pad = [int(p) for p in a["pad"]]
    value = float(a["value"])

    def run(x):
        nd = x.ndim
        pairs = [(0, 0)] * nd  # per reference axis
        for i in range(len(pad) // 2):
            pairs[nd - 1 - i] = (pad[2 * i], pad[2 * i + 1])
        if nd == 4:
            pairs = [pairs[0], pairs[2], pairs[3], pairs[1]]
        crop = tuple(slice(max(0, -b), x.shape[i] - max(0, -e)) for i, (b, e) in
                     enumerate(pairs))  # fmt: skip
        x = x[crop]
        grow = [(max(0, b), max(0, e)) for b, e in pairs]
        dt = x.dtype if x.dtype.kind == "f" or float(value).is_integer() else np.float32
        return np.pad(x.astype(dt, copy=False), grow, constant_values=value)

    return run


def _float_of(*xs):
    if all(x.dtype.kind == "f" for x in xs) or all(x.dtype.kind in "iu" for x in xs):
        return xs
    return tuple(x.astype(np.float32) for x in xs)


def _add(x, y):
    x, y = _float_of(x, y)
    if x.dtype.kind in "iu":
        return x.astype(np.int64) + y
    return x + y


def _cat(a):
    dim = int(a["dim"])

    def run(*xs):
        xs = _float_of(*xs)
        dt = np.result_type(*xs)
        return np.concatenate([x.astype(dt, copy=False) for x in xs], axis=_axis(dim, xs[0].ndim))

    return run


def _affine(t):
    scale, shift = t["scale"], t["shift"]

    def run(x):
        x = x.astype(np.float32, copy=False)
        if x.ndim == 4:
            return x * scale + shift
        shape = [1, -1] + [1] * (x.ndim - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)

    return run


def _clamp(a):
    # a missing bound is stored as null
    lo = -math.inf if a["min"] is None else float(a["min"])
    hi = math.inf if a["max"] is None else float(a["max"])

    def run(x):
        if x.dtype.kind in "iu":
            lo_i = -np.inf if lo == -math.inf else math.ceil(lo)
            hi_i = np.inf if hi == math.inf else math.floor(hi)
            return np.clip(x, lo_i, hi_i).astype(x.dtype)
        return np.clip(x, np.float32(lo), np.float32(hi))

    return run


# ----------------------------------------------------------------------------- the engine


@dataclass
class _Step:
    kind: str
    name: str
    inputs: list[str]
    output: str
    run: Any
    layer: _Layer | None = None


class Engine:
    """A loaded ``.lowbit`` model: ``engine(x)`` runs a float32 NCHW batch and returns the
    float32 logits; ``profile(x)`` times every op; ``kernels()`` names each layer's kernel.

    An Engine keeps its work buffers between calls (the returned logits are always a
    fresh array): call one Engine from one thread at a time; load one per thread for
    concurrent inference."""

    def __init__(self, path, threads: int | None = None, warmup: bool = True,
                 sst_kernel: str = "gemm"):  # fmt: skip
        if sst_kernel not in ("gemm", "lut"):
            raise ValueError(f"sst_kernel must be 'gemm' or 'lut', got {sst_kernel!r}")
        self.sst_kernel = sst_kernel
        f = read(path)
        self.path = str(path)
        self.graph = f.graph
        self.meta = dict(f.meta)
        self.file_bytes = f.header_bytes + f.payload_bytes  # header_bytes includes the length
        shape = self.meta.get("input_shape")
        self.input_shape = tuple(int(v) for v in shape) if shape is not None else None
        self.threads = None if threads is None else int(threads)
        if self.threads is not None:
            K.set_threads(self.threads)
        g = self.graph
        if int(g.get("format_version", 0)) != 1:
            raise FormatError(f"{path}: frozen graph version {g.get('format_version')!r} is "
                              "not supported by this runtime (1)")  # fmt: skip
        self._input, self._output = g["input"], g["output"]
        try:
            self.steps = self._plan(g["ops"], f.tensors)
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise FormatError(f"{path}: cannot plan the graph ({type(e).__name__}: {e})") from None
        last = {}
        for i, s in enumerate(self.steps):
            for name in s.inputs:
                last[name] = i
        self._free = [[n for n in s.inputs if last.get(n) == i and n != self._output]
                      for i, s in enumerate(self.steps)]  # fmt: skip
        if warmup and self.input_shape is not None:
            self(np.zeros((1, *self.input_shape), np.float32))

    # -- planning

    def _plan(self, ops: list[dict], tensors: dict[str, np.ndarray]) -> list[_Step]:
        readers: dict[str, list[dict]] = {}
        for op in ops:
            if op.get("kind") not in SUPPORTED:
                raise FormatError(
                    f"{self.path}: op {op.get('name')!r} has kind {op.get('kind')!r}, which this "
                    f"runtime does not support (supported: {', '.join(SUPPORTED)})"
                )
            for i in op["inputs"]:
                readers.setdefault(i, []).append(op)
        by_out = {op["output"]: op for op in ops}

        def tens(op):
            return {k: np.asarray(tensors[f"{op['name']}/{k}"]) for k in op["tensors"]}

        layers: dict[str, _Layer] = {}
        for op in ops:
            if op["kind"] in ("conv", "linear"):
                layers[op["name"]] = self._plan_layer(op, tens(op), by_out)
        steps = []
        for op in ops:
            kind, a, name = op["kind"], op["attrs"], op["name"]
            layer = layers.get(name)
            if layer is not None:
                run = layer
            elif kind == "quantize":
                rs = readers.get(op["output"], [])
                packed = (
                    len(rs) == 1
                    and rs[0]["name"] in layers
                    and layers[rs[0]["name"]].kernel == "xnor"
                )
                src = by_out.get(op["inputs"][0])
                prod = layers.get(src["name"]) if src is not None else None
                if (
                    packed
                    and prod is not None
                    and len(readers.get(src["output"], [])) == 1
                    and src["output"] != self._output
                    and not prod.out_int
                    and not prod.has_offset
                    and prod.kernel != "float"
                    and prod.conv == layers[rs[0]["name"]].conv
                ):
                    prod.sign_out = True  # the producer packs the signs itself
                    run = _identity
                elif (
                    a.get("mode") == "int8"
                    and len(rs) == 1
                    and rs[0]["name"] in layers
                    and rs[0]["inputs"][0] == op["output"]
                    and _gemm_rows(layers[rs[0]["name"]])
                    and layers[rs[0]["name"]].in_dtype == _int_dtype(int(a["lo"]), int(a["hi"]))
                ):
                    # the consumer quantizes its GEMM rows itself
                    layers[rs[0]["name"]].fq = (np.float32(a["scale"]), int(a["lo"]), int(a["hi"]))
                    run = _identity
                else:
                    run = _quantize(a, packed)
            elif kind == "affine":
                t = {k: v.astype(np.float32) for k, v in tens(op).items()}
                run = _affine(t)
            elif kind == "relu":
                run = _relu
            elif kind == "clamp":
                run = _clamp(a)
            elif kind == "maxpool":
                run = _maxpool(a)
            elif kind == "avgpool":
                run = _avgpool(a)
            elif kind == "gap":
                run = _gap(a)
            elif kind == "flatten":
                run = _flatten(a)
            elif kind == "reshape":
                run = _reshape(a)
            elif kind == "add":
                run = _add
            elif kind == "cat":
                run = _cat(a)
            elif kind == "pad":
                run = _pad(a)
            else:  # slice
                run = _slice(a)
            steps.append(_Step(kind, name, list(op["inputs"]), op["output"], run, layer))
        self._layout(steps, layers, by_out)
        return steps

    def _layout(self, steps, layers, by_out) -> None:
        """Take the NCHW input and give the NCHW output without a transpose where the first
        and last ops allow it (a quantizer or fused quantizing layer reads NCHW, a float conv
        writes NCHW)."""
        self._in_nchw = self._out_nchw = self._out_fresh = False
        readers = [s for s in steps if self._input in s.inputs]
        if (
            self.input_shape is not None
            and len(self.input_shape) == 3
            and len(readers) == 1
            and self._input != self._output
            and readers[0].kind == "quantize"
        ):
            s = readers[0]
            nchw = getattr(s.run, "nchw", None)
            if nchw is not None:
                s.run = nchw
                self._in_nchw = True
            elif s.run is _identity:
                nxt = [t for t in steps if s.output in t.inputs]
                lay = nxt[0].layer if len(nxt) == 1 else None
                if lay is not None and lay.fq is not None and lay.conv:
                    lay.nchw_in = True
                    self._in_nchw = True
        for s in steps:
            if s.output == self._output and s.layer is not None:
                lay = s.layer
                lay.reuse_out = False
                self._out_fresh = True
                if (
                    lay.conv
                    and (_gemm_rows(lay, pointwise=False) or _binary_fused(lay))
                    and not lay.out_int
                    and not lay.sign_out
                    and not any(self._output in t.inputs for t in steps)
                ):
                    lay.nchw_out = True
                    self._out_nchw = True

    def _plan_layer(self, op: dict, t: dict[str, np.ndarray], by_out: dict) -> _Layer:
        a = op["attrs"]
        name = op["name"]
        codes = t.pop("codes")
        conv = op["kind"] == "conv"
        orig = codes  # [O, C, kh, kw] / [O, K]: the order SST groups follow
        if conv:
            if codes.ndim != 4:
                raise FormatError(f"{self.path}: conv {name!r}: codes of shape {codes.shape}")
            codes = np.ascontiguousarray(codes.transpose(0, 2, 3, 1))
        elif codes.ndim != 2:
            raise FormatError(f"{self.path}: linear {name!r}: codes of shape {codes.shape}")
        ft = {}
        for k, v in t.items():
            ft[k] = np.ascontiguousarray(v, np.float32) if k in (
                "out_scale", "bias", "offset_scale") else np.ascontiguousarray(v)  # fmt: skip
        if a["path"] != "int":
            return _Layer(op, "float", conv, codes.astype(np.float32), t=ft)
        if codes.dtype.kind not in "iu":
            raise FormatError(f"{self.path}: layer {name!r} is on the integer path but its "
                              f"codes are {codes.dtype}")  # fmt: skip
        q = a.get("in_quant") or {}
        # the input codes' range: the producer's requantization range or the quantizer's
        src = by_out.get(op["inputs"][0])
        while src is not None and src["kind"] in ("maxpool", "flatten", "reshape", "slice"):
            src = by_out.get(src["inputs"][0])
        if (
            src is not None
            and src["kind"] in ("conv", "linear")
            and src["attrs"].get("out") == "int"
        ):
            lo, hi = int(src["attrs"]["lo"]), int(src["attrs"]["hi"])
        else:
            lo, hi = int(q.get("lo", -127)), int(q.get("hi", 127))
        in_dtype = _int_dtype(lo, hi)
        cmin, cmax = (int(codes.min()), int(codes.max())) if codes.size else (0, 0)
        groups = int(a.get("groups", 1))
        sign_in = q.get("mode") == "sign" and src is not None and src["kind"] == "quantize"
        if sign_in and groups == 1 and cmin >= -1 and cmax <= 1:
            vals = set(np.unique(codes).tolist())
            if vals <= {-1, 1}:
                return _Layer(op, "xnor", conv, codes.astype(np.int8), t=ft)
            if vals <= {0, 1} and "offset_scale" not in ft:
                return _Layer(op, "xnor", conv, codes.astype(np.int8), t=ft, binary01=True)
        int8_in = in_dtype in (np.dtype(np.int8), np.dtype(np.uint8))
        wc = a.get("weight_codec") or {}
        if (
            self.sst_kernel == "lut" and wc.get("_type") == "sst" and int8_in and groups == 1
            and "offset_scale" not in ft
        ):  # fmt: skip
            d = wc.get("_data", {})
            try:
                sst = _prepare_sst(orig, int(d["n"]), int(d["k"]), conv)
            except (KeyError, TypeError, ValueError) as e:
                raise FormatError(f"{self.path}: layer {name!r}: bad SST codes ({e})") from None
            return _Layer(op, "sst-lut", conv, codes.astype(np.int8), in_dtype=in_dtype, t=ft,
                          packed=sst)  # fmt: skip
        if -128 <= cmin and cmax <= 127 and int8_in:
            return _Layer(op, "gemm-int8", conv, codes.astype(np.int8), in_dtype=in_dtype, t=ft)
        return _Layer(op, "int64", conv, codes.astype(np.int64), in_dtype=in_dtype, t=ft)

    # -- running

    def _check(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
                x = x.detach().cpu().numpy()
            else:
                raise ValueError(f"the engine takes a numpy array, got {type(x).__name__}")
        if x.dtype.kind != "f":
            raise ValueError(f"the engine takes a float32 array, got {x.dtype}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            want = ", ".join(map(str, self.input_shape))
            raise ValueError(
                f"input of shape {list(x.shape)} does not match the model's input shape [N, {want}]"
            )
        if x.ndim < 2 or x.shape[0] < 1:
            raise ValueError(f"the engine takes a batch (N, ...) with N >= 1, got {list(x.shape)}")
        x = np.ascontiguousarray(x, np.float32)
        return x if self._in_nchw else _to_nhwc(x)

    def __call__(self, x) -> np.ndarray:
        return self.run(x)

    def run(self, x) -> np.ndarray:
        if self.threads is not None:
            K.set_threads(self.threads)
        env = {self._input: self._check(x)}
        for step, free in zip(self.steps, self._free):
            env[step.output] = step.run(*[env[i] for i in step.inputs])
            for n in free:
                env.pop(n, None)
        return self._result(env[self._output])

    def _result(self, y) -> np.ndarray:
        if self._out_nchw:
            return y  # a fresh array from the last layer
        y = np.ascontiguousarray(_to_nchw(y), dtype=np.float32)
        # a view of a buffer that the next call reuses is copied
        return y if self._out_fresh else np.array(y, np.float32)

    def profile(self, x, repeats: int = 1) -> list[dict[str, Any]]:
        """Per op: ``name``, ``kind``, ``kernel`` (layers), ``ms`` (median of ``repeats``
        runs), ``macs`` (layers), ``shape`` (output, reference layout)."""
        if self.threads is not None:
            K.set_threads(self.threads)
        times: list[list[float]] = [[] for _ in self.steps]
        rows: list[dict[str, Any]] = []
        for r in range(max(1, int(repeats))):
            env = {self._input: self._check(x)}
            for i, step in enumerate(self.steps):
                args = [env[n] for n in step.inputs]
                t0 = time.perf_counter()
                y = step.run(*args)
                times[i].append((time.perf_counter() - t0) * 1e3)
                env[step.output] = y
                if r == 0:
                    row: dict[str, Any] = {"name": step.name, "kind": step.kind}
                    if step.layer is not None:
                        row["kernel"] = step.layer.kernel
                        row["macs"] = step.layer.macs(y)
                    shp = list(y.shape)
                    if self._in_nchw and self._input in step.inputs and y.dtype == np.float32:
                        shp = [shp[0], shp[2], shp[3], shp[1]]  # the NCHW input passed on
                    if step.layer is not None and step.layer.nchw_out:
                        shp = [shp[0], shp[2], shp[3], shp[1]]  # already NCHW
                    if y.ndim == 4 and not (step.kind == "quantize" and y.dtype == np.uint64):
                        shp = [shp[0], shp[3], shp[1], shp[2]]
                    row["shape"] = shp
                    rows.append(row)
        for row, ts in zip(rows, times):
            row["ms"] = float(np.median(ts))
        return rows

    def kernels(self) -> dict[str, str]:
        """The kernel chosen for every conv/linear layer, by op name."""
        return {s.name: s.layer.kernel for s in self.steps if s.layer is not None}

    def __repr__(self) -> str:
        n = sum(s.layer is not None for s in self.steps)
        return f"Engine({self.path!r}, {len(self.steps)} ops, {n} layers)"


def _identity(x):
    return x


def _relu(x):
    if x.dtype.kind in "iu":
        return np.maximum(x, 0).astype(x.dtype)
    return np.maximum(x, np.float32(0))


def load(
    path: str | os.PathLike, threads: int | None = None, warmup: bool = True,
    sst_kernel: str = "gemm",
) -> Engine:  # fmt: skip
    """Load a packed ``.lowbit`` file for inference. ``threads``: kernel threads (default:
    numba's, all cores). ``warmup``: run one zero batch now (compiles and checks the plan).
    ``sst_kernel``: SST layers on the int8 GEMM (``gemm``, the faster on CPUs with VNNI,
    measured in bench/sst.py) or on the look-up-table kernel (``lut``).
    Raises ``FileNotFoundError`` or ``lowbit.errors.FormatError``."""
    return Engine(path, threads=threads, warmup=warmup, sst_kernel=sst_kernel)
