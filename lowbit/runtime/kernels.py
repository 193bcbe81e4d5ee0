"""Low-level CPU kernels of the lowbit runtime (numba), numpy arrays in and out.

Conventions (shared with the freezer and the Engine):

* Activations are NHWC, ``uint8`` (after ReLU, 0..255) or ``int8`` (-127..127), zero
  point 0. Padding contributes 0.
* Conv weights are ``int8`` codes laid out ``[O, kh, kw, C_in // groups]``; linear
  weights ``[O, K]``. Accumulators are ``int32``.
* Binary activations/weights are ``{-1, +1}`` packed along channels into ``uint64`` words
  (bit ``c % 64`` of word ``c // 64`` is 1 for +1; unused high bits are 0).

Integer GEMM. Every int8/uint8 x int8 product (pointwise convs, linear layers, general
convs through an im2col buffer, ternary weights) runs one GEMM ``acc[p, o] =
sum_k x[p, k] * w[o, k]``. On CPUs with AVX512-VNNI or AVX-VNNI its micro-kernel is written
directly in LLVM IR (a numba ``@intrinsic``) around ``vpdpbusd``: a tile of ``_MR`` pixels x
16 output channels lives in 12 ymm registers, each step broadcasts 4 input bytes of a pixel
and multiply-adds them against 4 bytes x 8 channels of pre-packed weights. ``vpdpbusd``
multiplies *unsigned* by *signed* bytes, so int8 activations are shifted to uint8 by
``x ^ 0x80`` (= x + 128) and ``128 * sum_k w[o, k]`` is subtracted through the accumulator's
initial value (padding then becomes 128, so it still contributes 0 after the correction).
Other CPUs get a plain numba GEMM (same results, several times slower).

C kernels. Where the AVX-512 extension ``lowbit.runtime._lbk`` is built and this CPU runs it
(``lowbit.runtime._cext``), :func:`binary_conv_fused`, :func:`gemm_fused` and
:func:`quant_nchw_k4` run C code instead (same layouts, bit-identical results); the numba
kernels here are the portable path and stay tested against it.

Weights are repacked once with :func:`prepare_conv` / :func:`prepare_linear` /
:func:`pack_ternary`; the conv functions also accept raw codes (packed on every call).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import llvmlite.binding as _llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from . import _cext

__all__ = [
    "HAS_VNNI",
    "PackedBinaryConv",
    "PackedConv",
    "PackedSST",
    "conv2d_binary",
    "conv2d_int",
    "conv2d_ternary",
    "dequant",
    "get_threads",
    "linear_binary",
    "linear_int",
    "linear_ternary",
    "pack_binary_weights",
    "pack_signs",
    "pack_ternary",
    "prepare_conv",
    "prepare_linear",
    "prepare_sst",
    "requant",
    "set_threads",
    "sst_lut_matmul",
]


def _detect_vnni() -> bool:
    if os.environ.get("LOWBIT_NO_VNNI", "") not in ("", "0"):
        return False
    try:
        feats = _llvm.get_host_cpu_features()
    except Exception:  # pragma: no cover - exotic platforms
        return False
    return bool(feats.get("avxvnni")) or bool(feats.get("avx512vnni") and feats.get("avx512vl"))


HAS_VNNI: bool = _detect_vnni()
"""True when the int8 GEMM uses the ``vpdpbusd`` micro-kernel (set LOWBIT_NO_VNNI=1 to
force the portable numba GEMM)."""

_MR = 6  # pixels per GEMM tile (rows); a tile covers 8 * NV output channels


# ---------------------------------------------------------------------------------------
# threads


def set_threads(n: int) -> None:
    """Number of threads the kernels use (numba's thread pool; 1..NUMBA_NUM_THREADS)."""
    n = int(n)
    if not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads must be in [1, {numba.config.NUMBA_NUM_THREADS}], got {n}")
    numba.set_num_threads(n)


def get_threads() -> int:
    return numba.get_num_threads()


# ---------------------------------------------------------------------------------------
# LLVM intrinsics: popcount, and the VNNI GEMM micro-kernel


@intrinsic
def _popc(typingctx, v_t):
    """Population count of a 64-bit integer (LLVM ctpop: popcnt / vpopcntq)."""
    if not isinstance(v_t, types.Integer) or v_t.bitwidth != 64:
        return None
    sig = types.int64(v_t)

    def codegen(context, builder, sig, args):
        i64 = ir.IntType(64)
        fn = builder.module.declare_intrinsic("llvm.ctpop", [i64])
        return builder.call(fn, [args[0]])

    return sig, codegen


def _make_vnni_tile(mr: int, nv: int):
    """An intrinsic computing one ``mr x (8*nv)`` int32 tile of ``x @ w.T``.

    ``tile(x, xoff, xstride, w, woff, wvstride, k4, init, ioff, out, ooff, ostride)``:
    ``x`` uint8 rows (``xstride`` bytes apart, starting at byte ``xoff``), ``w`` the packed
    weights: for each of the ``nv`` 8-channel blocks (``wvstride`` bytes apart, first at
    ``woff``) ``k4`` groups of 32 bytes ``[8 channels][4 k]``; ``init`` (int32, element
    ``ioff``) the accumulators' initial values per channel; results stored to ``out``
    (int32, element ``ooff``, rows ``ostride`` elements apart). All arrays C-contiguous.
    """

    @intrinsic
    def tile(
        typingctx, x_t, xoff_t, xs_t, w_t, woff_t, wvs_t, k4_t, i_t, ioff_t, o_t, ooff_t, os_t
    ):
        ip = types.intp
        sig = types.void(x_t, ip, ip, w_t, ip, ip, ip, i_t, ip, o_t, ip, ip)

        def codegen(context, builder, sig, args):
            x, xoff, xs, w, woff, wvs, k4, init, ioff, out, ooff, ostride = args
            i8p = ir.IntType(8).as_pointer()
            i32 = ir.IntType(32)
            i64 = ir.IntType(64)
            v8 = ir.VectorType(i32, 8)
            v8p = v8.as_pointer()

            def data(ty, val):
                return context.make_array(ty)(context, builder, val).data

            xb = builder.gep(builder.bitcast(data(sig.args[0], x), i8p), [xoff])
            wb = builder.gep(builder.bitcast(data(sig.args[3], w), i8p), [woff])
            ib = builder.gep(builder.bitcast(data(sig.args[7], init), i32.as_pointer()), [ioff])
            ob = builder.gep(builder.bitcast(data(sig.args[9], out), i32.as_pointer()), [ooff])
            fn = builder.module.declare_intrinsic(
                "llvm.x86.avx512.vpdpbusd.256", fnty=ir.FunctionType(v8, [v8, v8, v8])
            )

            def c64(v):
                return ir.Constant(i64, v)

            inits = []
            for v in range(nv):
                ld = builder.load(builder.bitcast(builder.gep(ib, [c64(8 * v)]), v8p))
                ld.align = 4
                inits.append(ld)
            wvptr = [builder.gep(wb, [builder.mul(wvs, c64(v))]) for v in range(nv)]
            xrow = [builder.gep(xb, [builder.mul(xs, c64(r))]) for r in range(mr)]
            pre = builder.basic_block
            loop = builder.append_basic_block("vnni_loop")
            done = builder.append_basic_block("vnni_done")
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(c64(0), pre)
            acc = [[builder.phi(v8) for _ in range(nv)] for _ in range(mr)]
            for r in range(mr):
                for v in range(nv):
                    acc[r][v].add_incoming(inits[v], pre)
            wk = builder.mul(k, c64(32))
            wv = []
            for v in range(nv):
                ld = builder.load(builder.bitcast(builder.gep(wvptr[v], [wk]), v8p))
                ld.align = 1
                wv.append(ld)
            xk = builder.mul(k, c64(4))
            new = []
            for r in range(mr):
                xi = builder.load(builder.bitcast(builder.gep(xrow[r], [xk]), i32.as_pointer()))
                xi.align = 1
                xv = builder.insert_element(ir.Constant(v8, ir.Undefined), xi, ir.Constant(i32, 0))
                xv = builder.shuffle_vector(
                    xv, ir.Constant(v8, ir.Undefined), ir.Constant(v8, None)
                )
                new.append([builder.call(fn, [acc[r][v], xv, wv[v]]) for v in range(nv)])
            k1 = builder.add(k, c64(1))
            end = builder.basic_block
            k.add_incoming(k1, end)
            for r in range(mr):
                for v in range(nv):
                    acc[r][v].add_incoming(new[r][v], end)
            builder.cbranch(builder.icmp_signed("<", k1, k4), loop, done)
            builder.position_at_end(done)
            for r in range(mr):
                orow = builder.gep(ob, [builder.mul(ostride, c64(r))])
                for v in range(nv):
                    st = builder.store(
                        new[r][v], builder.bitcast(builder.gep(orow, [c64(8 * v)]), v8p)
                    )
                    st.align = 4
            return context.get_dummy_value()

        return sig, codegen

    return tile


_tile_m2 = _make_vnni_tile(_MR, 2)
_tile_m1 = _make_vnni_tile(_MR, 1)
_tile_12 = _make_vnni_tile(1, 2)
_tile_11 = _make_vnni_tile(1, 1)


# ---------------------------------------------------------------------------------------
# GEMM drivers: acc[p, o] = init[o] + sum_k xu[p, k] * w[o, k]  (xu uint8, w int8)


def _make_xnor_tile(mr: int, nv: int, op: str = "xor"):
    """An intrinsic accumulating popcounts for ``mr`` pixels x ``8*nv`` output channels
    (``op`` "xor": of ``x ^ w``, the {-1, +1} weights; "and": of ``x & w``, {0, 1}).

    ``tile(x, xoff, pstride, koff, nk, w, woff, wvstride, out, ooff, ostride)``: ``x`` packed signs
    (uint64), pixel ``r``'s word ``k`` at ``xoff + r*pstride + koff[k]``; ``w`` packed
    weights (uint64), for each of the ``nv`` 8-channel blocks (``wvstride`` words apart,
    first at ``woff``) ``nk`` groups of 8 words; ``out`` int64, ``out[ooff + r*ostride + o] =
    sum_k popcount(x_r[k] ^ w_o[k])`` (written, not accumulated)."""

    @intrinsic
    def tile(typingctx, x_t, xoff_t, ps_t, koff_t, nk_t, w_t, woff_t, wvs_t, o_t, ooff_t, os_t):
        ip = types.intp
        sig = types.void(x_t, ip, ip, koff_t, ip, w_t, ip, ip, o_t, ip, ip)

        def codegen(context, builder, sig, args):
            x, xoff, ps, koff, nk, w, woff, wvs, out, ooff, ostride = args
            i64 = ir.IntType(64)
            i64p = i64.as_pointer()
            v8 = ir.VectorType(i64, 8)
            v8p = v8.as_pointer()

            def data(ty, val):
                return builder.bitcast(context.make_array(ty)(context, builder, val).data, i64p)

            def c64(v):
                return ir.Constant(i64, v)

            xb = builder.gep(data(sig.args[0], x), [xoff])
            kb = data(sig.args[3], koff)
            wb = builder.gep(data(sig.args[5], w), [woff])
            ob = builder.gep(data(sig.args[8], out), [ooff])
            pop = builder.module.declare_intrinsic(
                "llvm.ctpop.v8i64", fnty=ir.FunctionType(v8, [v8])
            )
            wvptr = [builder.gep(wb, [builder.mul(wvs, c64(v))]) for v in range(nv)]
            xrow = [builder.gep(xb, [builder.mul(ps, c64(r))]) for r in range(mr)]
            pre = builder.basic_block
            loop = builder.append_basic_block("xnor_loop")
            done = builder.append_basic_block("xnor_done")
            builder.branch(loop)
            builder.position_at_end(loop)
            k = builder.phi(i64)
            k.add_incoming(c64(0), pre)
            zero = ir.Constant(v8, None)
            acc = [[builder.phi(v8) for _ in range(nv)] for _ in range(mr)]
            for r in range(mr):
                for v in range(nv):
                    acc[r][v].add_incoming(zero, pre)
            wk = builder.mul(k, c64(8))
            wv = []
            for v in range(nv):
                ld = builder.load(builder.bitcast(builder.gep(wvptr[v], [wk]), v8p))
                ld.align = 8
                wv.append(ld)
            ko = builder.load(builder.gep(kb, [k]))
            new = []
            for r in range(mr):
                xi = builder.load(builder.gep(xrow[r], [ko]))
                xv = builder.insert_element(
                    ir.Constant(v8, ir.Undefined), xi, ir.Constant(ir.IntType(32), 0)
                )
                xv = builder.shuffle_vector(
                    xv,
                    ir.Constant(v8, ir.Undefined),
                    ir.Constant(ir.VectorType(ir.IntType(32), 8), None),
                )
                comb = builder.xor if op == "xor" else builder.and_
                new.append([builder.add(acc[r][v], builder.call(pop, [comb(xv, wv[v])]))
                            for v in range(nv)])  # fmt: skip
            k1 = builder.add(k, c64(1))
            end = builder.basic_block
            k.add_incoming(k1, end)
            for r in range(mr):
                for v in range(nv):
                    acc[r][v].add_incoming(new[r][v], end)
            builder.cbranch(builder.icmp_signed("<", k1, nk), loop, done)
            builder.position_at_end(done)
            for r in range(mr):
                orow = builder.gep(ob, [builder.mul(ostride, c64(r))])
                for v in range(nv):
                    st = builder.store(new[r][v], builder.bitcast(
                        builder.gep(orow, [c64(8 * v)]), v8p))  # fmt: skip
                    st.align = 8
            return context.get_dummy_value()

        return sig, codegen

    return tile


_XMR, _XNV = 4, 4
_xtile_44 = _make_xnor_tile(_XMR, _XNV)
_xtile_41 = _make_xnor_tile(_XMR, 1)
_xtile_14 = _make_xnor_tile(1, _XNV)
_xtile_11 = _make_xnor_tile(1, 1)
_atile_44 = _make_xnor_tile(_XMR, _XNV, "and")
_atile_41 = _make_xnor_tile(_XMR, 1, "and")
_atile_14 = _make_xnor_tile(1, _XNV, "and")
_atile_11 = _make_xnor_tile(1, 1, "and")


@njit(parallel=True, cache=True)
def _bin_conv_tiled(xpad, koff, wb, wpop, C, kh, kw, sh, sw, ph, pw, dh, dw, H, W, Ho, Wo, O,
                    mode, scale, fbias, out, out_f, out_f3, out_b, and01, wtot):  # fmt: skip
    # xpad [N, Hp, Wp, CW] uint64 (zero words in the padding), koff [kh*kw*CW] word offsets
    # of each k from a window's origin, wb [OB, K, 8] uint64 (8-channel blocks), wpop
    # [kh*kw, O] int64 popcounts of each tap's weights. The epilogue (acc = the int32
    # accumulator sum over valid taps of C - 2 * popcount(x ^ w)):
    #   mode 0: out [N, Ho, Wo, O] int32 = acc
    #   mode 1: out_f [N, Ho, Wo, O] float32 = float32(acc) * scale + fbias
    #   mode 2: as 1, NCHW: out_f3 [N, O, Ho, Wo]
    #   mode 3: as 1, the signs packed: out_b [N, Ho, Wo, ceil(O/64)] uint64
    # and01: {0, 1} weights (bits b): acc = sum over valid taps of b . x =
    # 2 * popcount(x & b) - popcount(b) (padded words of x are 0, so they add nothing to the
    # first term; wtot [O] = popcount of all of b, less wpop of the padded taps)
    N, Hp, Wp, CW = xpad.shape
    OB, Kk, _ = wb.shape
    Op = OB * 8
    wvs = Kk * 8
    ps = sw * CW
    for r in prange(N * Ho):
        n = r // Ho
        ho = r % Ho
        cnt = np.empty(Wo * Op, np.int64)
        row0 = ((n * Hp + ho * sh) * Wp) * CW
        wo = 0
        while wo < Wo:
            full = wo + _XMR <= Wo
            x0 = row0 + wo * sw * CW
            ob = 0
            while ob < OB:
                four = ob + _XNV <= OB
                oo = wo * Op + ob * 8
                if and01:
                    if full and four:
                        _atile_44(xpad, x0, ps, koff, Kk, wb, ob * wvs, wvs, cnt, oo, Op)
                    elif full:
                        _atile_41(xpad, x0, ps, koff, Kk, wb, ob * wvs, wvs, cnt, oo, Op)
                    elif four:
                        _atile_14(xpad, x0, ps, koff, Kk, wb, ob * wvs, wvs, cnt, oo, Op)
                    else:
                        _atile_11(xpad, x0, ps, koff, Kk, wb, ob * wvs, wvs, cnt, oo, Op)
                elif full and four:
                    _xtile_44(xpad, x0, ps, koff, Kk, wb, ob * wvs, wvs, cnt, oo, Op)
                elif full:
                    _xtile_41(xpad, x0, ps, koff, Kk, wb, ob * wvs, wvs, cnt, oo, Op)
                elif four:
                    _xtile_14(xpad, x0, ps, koff, Kk, wb, ob * wvs, wvs, cnt, oo, Op)
                else:
                    _xtile_11(xpad, x0, ps, koff, Kk, wb, ob * wvs, wvs, cnt, oo, Op)
                ob += _XNV if four else 1
            wo += _XMR if full else 1
        # epilogue: valid taps only (padded taps added popcount(w) to the counts)
        orow = np.empty(O, np.int32)
        for wo in range(Wo):
            base = wo * Op
            h0 = ho * sh - ph
            w0 = wo * sw - pw
            border = h0 < 0 or h0 + (kh - 1) * dh >= H or w0 < 0 or w0 + (kw - 1) * dw >= W
            if not border and and01:
                for o in range(O):
                    orow[o] = np.int32(2 * cnt[base + o] - wtot[o])
            elif not border:
                tot = kh * kw * C
                for o in range(O):
                    orow[o] = np.int32(tot - 2 * cnt[base + o])
            else:
                nvalid = 0
                for o in range(O):
                    orow[o] = 0
                for i in range(kh):
                    hi = h0 + i * dh
                    for j in range(kw):
                        wi = w0 + j * dw
                        if hi < 0 or hi >= H or wi < 0 or wi >= W:
                            t = i * kw + j
                            for o in range(O):
                                orow[o] += np.int32(wpop[t, o])
                        else:
                            nvalid += 1
                tot = nvalid * C
                if and01:
                    for o in range(O):
                        orow[o] = np.int32(2 * cnt[base + o] - (wtot[o] - orow[o]))
                else:
                    for o in range(O):
                        orow[o] = np.int32(tot - 2 * (cnt[base + o] - orow[o]))
            if mode == 0:
                dst = out[n, ho, wo]
                for o in range(O):
                    dst[o] = orow[o]
            elif mode == 1:
                dst = out_f[n, ho, wo]
                for o in range(O):
                    v = np.float32(orow[o]) * scale[o]
                    dst[o] = v + fbias[o]
            elif mode == 2:
                for o in range(O):
                    v = np.float32(orow[o]) * scale[o]
                    out_f3[n, o, ho, wo] = v + fbias[o]
            else:
                dst = out_b[n, ho, wo]
                for w in range(dst.shape[0]):
                    o0 = w * 64
                    o1 = min(o0 + 64, O)
                    word = np.uint64(0)
                    for o in range(o0, o1):
                        v = np.float32(orow[o]) * scale[o]
                        v = v + fbias[o]
                        if v > 0:
                            word |= np.uint64(1) << np.uint64(o - o0)
                    dst[w] = word


_DF = np.zeros(1, np.float32)
_I0 = np.zeros(1, np.int64)
_DF4 = np.zeros((1, 1, 1, 1), np.float32)
_DB4 = np.zeros((1, 1, 1, 1), np.uint64)
_DI4 = np.zeros((1, 1, 1, 1), np.int32)


@dataclass(frozen=True, eq=False)
class PackedBinaryConv:
    """Binary conv weights packed for :func:`binary_conv_fused` (:func:`prepare_binary_conv`).

    ``wb [OB, kh*kw*CW, 8]`` uint64: 8-output-channel blocks, ``OB`` a multiple of 4 (zero
    channels above ``O``); ``wpop [kh*kw, 8*OB]`` int32: popcount of each tap's weights.
    The bits are the {-1, +1} signs (1 = +1) or, for {0, 1} weights, the bits themselves."""

    wb: np.ndarray
    wpop: np.ndarray
    O: int
    kh: int
    kw: int
    wtot: np.ndarray  # [8*OB] int32: popcount of all of each channel's weights
    cache: dict = field(default_factory=dict, repr=False)  # other layouts, made on first use


def prepare_binary_conv(wp: np.ndarray) -> PackedBinaryConv:
    """Packed binary conv weights ``[O, kh, kw, CW]`` (:func:`pack_binary_weights`) ->
    :class:`PackedBinaryConv` for :func:`conv2d_binary_tiled` / :func:`binary_conv_fused`."""
    O, kh, kw, CW = wp.shape
    OB = -(-O // 32) * 4
    w = np.zeros((OB * 8, kh * kw * CW), np.uint64)
    w[:O] = wp.reshape(O, -1)
    wb = np.ascontiguousarray(w.reshape(OB, 8, -1).transpose(0, 2, 1))
    bits = np.unpackbits(wp.view(np.uint8), axis=-1).reshape(O, kh * kw, -1)
    wpop = np.zeros((kh * kw, OB * 8), np.int32)
    wpop[:, :O] = bits.sum(-1, dtype=np.int32).T
    return PackedBinaryConv(wb, wpop, O, kh, kw, wpop.sum(0, dtype=np.int32))


def _padded(v: np.ndarray, n: int) -> np.ndarray:
    """``v`` (1-D) extended with zeros to length ``n`` (itself when it has that length)."""
    if v.shape[0] == n:
        return v
    out = np.zeros(n, v.dtype)
    out[: v.shape[0]] = v
    return out


def binary_conv_fused(xpad, koff, pb: PackedBinaryConv, C, stride, padding, dilation, H, W,
                      Ho, Wo, mode, scale, fbias, out, and01: bool = False) -> None:  # fmt: skip
    """The XOR + popcount conv over a zero-padded packed input ``xpad [N, Hp, Wp, CW]``
    (``koff``: word offset of each (tap, word) from a window's origin), written to ``out``:
    mode 0 int32 NHWC accumulators, 1 float32 NHWC ``acc * scale + fbias``, 2 the same NCHW,
    3 the signs of that packed ``[N, Ho, Wo, ceil(O/64)]``. ``and01``: the weights are {0, 1}
    (SBNN's sparse binary domain): ``acc = sum b . x = 2 * popcount(x & b) - popcount(b)``
    over the valid taps (methods.md), else {-1, +1}: ``C - 2 * popcount(x ^ w)``. Runs the
    C kernel where it is available (``lowbit.runtime._cext``), else the numba one; both are
    exact."""
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    N, Hp, Wp, CW = xpad.shape
    OB = pb.wb.shape[0]
    if _cext.amx() and _AMX_BCONV:  # +-1 int8 dot products on the tile unit (lb_bconv_amx)
        Op = OB * 8
        sc, fb = _padded(scale, Op), _padded(fbias, Op)
        wa = pb.cache.get(("amx", C, bool(and01)))
        if wa is None:
            wa = pb.cache[("amx", C, bool(and01))] = binary_amx_weights(pb, C, and01)
        f = _cext.lib().bconv_amx
        args = (xpad, wa, sc, fb, N, Hp, Wp, CW, C, pb.kh, pb.kw, sh, sw, ph, pw, dh, dw, H, W,
                Ho, Wo, pb.O, mode, out)  # fmt: skip
        macs = N * Ho * Wo * wa.shape[0] * 16 * pb.kh * pb.kw * CW * 64
        _cext.parallel_rows(lambda r0, r1: f(*args, r0, r1), N * Ho, get_threads(),
                            est_ns=macs / 1500)  # fmt: skip
        return
    if _cext.available():
        Op = OB * 8
        sc, fb = _padded(scale, Op), _padded(fbias, Op)
        f = _cext.lib().xnor_conv
        args = (xpad, koff, pb.wb, pb.wpop, sc, fb, N, Hp, Wp, CW, C, pb.kh, pb.kw, sh, sw, ph,
                pw, dh, dw, H, W, Ho, Wo, pb.O, OB, mode, bool(and01), out)  # fmt: skip
        bmacs = N * Ho * Wo * Op * pb.kh * pb.kw * CW * 64  # ~500 binary MACs per ns
        _cext.parallel_rows(lambda r0, r1: f(*args, r0, r1), N * Ho, get_threads(),
                            est_ns=bmacs / 500)  # fmt: skip
        return
    oi, of, of3, ob = _DI4, _DF4, _DF4, _DB4
    if mode == 0:
        oi = out
    elif mode == 1:
        of = out
    elif mode == 2:
        of3 = out
    else:
        ob = out
    _bin_conv_tiled(xpad, koff, pb.wb, pb.wpop, C, pb.kh, pb.kw, sh, sw, ph, pw, dh, dw, H, W,
                    Ho, Wo, pb.O, mode, scale, fbias, oi, of, of3, ob, bool(and01),
                    pb.wtot)  # fmt: skip


# The AMX binary convolution is opt-in: on the one AMX machine measured (Intel Sapphire
# Rapids) it beat XOR + popcount only for layers of at most 128 channels (128 -> 128 at
# 32 x 32: 1.34x; 256 -> 256 at 16 x 16: 0.53x), and its last change (two 16-pixel blocks
# per pass) was tested only directly against the AVX-512 kernel (tests/test_cext.py).
_AMX_BCONV = os.environ.get("LOWBIT_AMX_BCONV", "") not in ("", "0")


def binary_amx_weights(pb: PackedBinaryConv, C: int, and01: bool) -> np.ndarray:
    """The packed weights of ``pb`` as int8 values for the AMX binary conv: -1/+1 (or the
    {0, 1} bits with ``and01``), channel k = (tap, word, bit), zero for input channels >= C
    and output channels >= O, in the tile layout of :func:`amx_weights`."""
    OB, KW, _ = pb.wb.shape
    words = np.ascontiguousarray(pb.wb.transpose(0, 2, 1).reshape(OB * 8, KW))
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little").astype(np.int8)
    w = bits if and01 else 2 * bits - 1
    CW = KW // (pb.kh * pb.kw)
    w = w.reshape(OB * 8, pb.kh * pb.kw, CW * 64)
    w[:, :, C:] = 0
    w[pb.O :] = 0
    return amx_weights(w.reshape(OB * 8, -1))


def pad_binary_input(xp: np.ndarray, kh, kw, stride, padding, dilation):
    """A zero-padded copy of packed signs ``xp [N, H, W, CW]`` and the word offsets of each
    (tap, word) from a window's origin: the input of :func:`binary_conv_fused`."""
    sh, sw = stride
    ph, pw = padding
    dh, dw = dilation
    N, H, W, CW = xp.shape
    Ho = _out_size(H, kh, sh, ph, dh, "height")
    Wo = _out_size(W, kw, sw, pw, dw, "width")
    Hp = max(H + 2 * ph, (Ho - 1) * sh + (kh - 1) * dh + 1)
    Wp = max(W + 2 * pw, (Wo - 1) * sw + (kw - 1) * dw + 1)
    xpad = np.zeros((N, Hp, Wp, CW), np.uint64)
    xpad[:, ph : ph + H, pw : pw + W] = xp
    return xpad, binary_koff(kh, kw, dh, dw, Wp, CW), Ho, Wo


def binary_koff(kh, kw, dh, dw, Wp, CW) -> np.ndarray:
    return np.array([(i * dh * Wp + j * dw) * CW + c for i in range(kh) for j in range(kw)
                     for c in range(CW)], np.int64)  # fmt: skip


def conv2d_binary_tiled(xp, C, pb: PackedBinaryConv, stride=(1, 1), padding=(0, 0),
                        dilation=(1, 1), and01: bool = False) -> np.ndarray:  # fmt: skip
    """As :func:`conv2d_binary` with weights from :func:`prepare_binary_conv`: a register-
    blocked XOR + popcount micro-kernel (C with AVX-512 where available, else numba with
    vpopcntq on 512-bit vectors) over a zero-padded copy of the input, border taps corrected
    exactly. Returns the int32 accumulators ``[N, Ho, Wo, O]`` (``and01``: of {0, 1}
    weights, see :func:`binary_conv_fused`)."""
    st = _pair(stride, "stride", 1)
    pd = _pair(padding, "padding", 0)
    dl = _pair(dilation, "dilation", 1)
    N, H, W, CW = xp.shape
    xpad, koff, Ho, Wo = pad_binary_input(xp, pb.kh, pb.kw, st, pd, dl)
    out = np.empty((N, Ho, Wo, pb.O), np.int32)
    binary_conv_fused(xpad, koff, pb, C, st, pd, dl, H, W, Ho, Wo, 0, _DF, _DF, out, and01)
    return out


_TB = 4  # tiles per parallel task: a task runs _TB * _MR rows against all weights


@njit(parallel=True, cache=True)
def _gemm_vnni(xu, wp, init, out):
    # xu [P, Kp] uint8 (Kp % 4 == 0), wp [OB8, K4, 8, 4] int8, init [OB8*8] int32,
    # out [P, OB8*8] int32; all C-contiguous.
    P, Kp = xu.shape
    OB8 = wp.shape[0]
    K4 = wp.shape[1]
    Op = OB8 * 8
    ws = K4 * 32
    rows = _MR * _TB
    ntask = (P + rows - 1) // rows
    for t in prange(ntask):
        p0 = t * rows
        p1 = min(p0 + rows, P)
        nfull = (p1 - p0) // _MR
        ob = 0
        while ob < OB8:
            two = ob + 2 <= OB8
            for b in range(nfull):
                p = p0 + b * _MR
                if two:
                    _tile_m2(
                        xu, p * Kp, Kp, wp, ob * ws, ws, K4, init, ob * 8, out, p * Op + ob * 8, Op
                    )
                else:
                    _tile_m1(
                        xu, p * Kp, Kp, wp, ob * ws, ws, K4, init, ob * 8, out, p * Op + ob * 8, Op
                    )
            for p in range(p0 + nfull * _MR, p1):
                if two:
                    _tile_12(
                        xu, p * Kp, Kp, wp, ob * ws, ws, K4, init, ob * 8, out, p * Op + ob * 8, Op
                    )
                else:
                    _tile_11(
                        xu, p * Kp, Kp, wp, ob * ws, ws, K4, init, ob * 8, out, p * Op + ob * 8, Op
                    )
            ob += 2 if two else 1


@njit(parallel=True, cache=True)
def _gemm_ref(xu, w2d, init, out):
    # portable fallback: xu [P, Kp] uint8, w2d [Op, Kp] int8, init [Op], out [P, Op]
    P, Kp = xu.shape
    Op = w2d.shape[0]
    for p in prange(P):
        xr = xu[p]
        for o in range(Op):
            wr = w2d[o]
            s = np.int32(0)
            for k in range(Kp):
                s += np.int32(xr[k]) * np.int32(wr[k])
            out[p, o] = init[o] + s


# ---------------------------------------------------------------------------------------
# depthwise micro-kernel (LLVM IR): 16 channels x a row of output pixels, the taps' weights
# in registers, int32 multiply-adds, the requantization (or dequantization) fused in


def _make_dw_row(T: int, narrow: bool = False):
    """An intrinsic for one row of output pixels of a depthwise conv with ``T`` taps, over a
    block of 16 channels.

    ``row(x, xoff, ps, koff, nwo, w, woff, wstride, bias, m, n, half, rqoff, pre_shift, lo,
    hi, scale, fbias, out, ooff, ostride)``: ``x`` int8/uint8 (zero-padded input, flat
    element ``xoff`` = the first window's origin at channel block start), pixel ``wo``'s
    window at ``xoff + wo * ps``, tap ``t`` at ``+ koff[t]`` (int64 elements); ``w`` int32
    weights (float32 holding the int8 codes), tap ``t``'s 16 channels at
    ``woff + t * wstride``; ``bias/m/n/half`` int64 and
    ``scale/fbias`` float32 per channel (element ``rqoff``); ``out`` integer (requantized,
    clamped to [lo, hi]) or float32 (``float32(acc) * scale + fbias``), pixel ``wo``'s 16
    channels at element ``ooff + wo * ostride``. ``narrow``: the caller guarantees
    ``|acc * 2**pre_shift + bias| < 2**31`` and ``|m| < 2**31``, so the requantization's
    product is one 32 x 32 -> 64-bit multiply (vpmuldq) instead of a 64-bit one."""

    @intrinsic
    def row(typingctx, x_t, xoff_t, ps_t, koff_t, nwo_t, w_t, woff_t, ws_t, b_t, m_t, n_t, h_t,
            rqoff_t, pre_t, lo_t, hi_t, sc_t, fb_t, o_t, ooff_t, os_t):  # fmt: skip
        ip = types.intp
        if not isinstance(x_t, types.Array) or x_t.dtype not in (types.int8, types.uint8):
            return None
        sig = types.void(x_t, ip, ip, koff_t, ip, w_t, ip, ip, b_t, m_t, n_t, h_t, ip, ip, ip,
                         ip, sc_t, fb_t, o_t, ip, ip)  # fmt: skip
        signed_in = x_t.dtype == types.int8
        odt = o_t.dtype
        float_out = isinstance(odt, types.Float)

        def codegen(context, builder, sig, args):
            (x, xoff, ps, koff, nwo, w, woff, wst, bias, m, n, half, rqoff, pre, lo, hi, sc, fb,
             out, ooff, ostride) = args  # fmt: skip
            i8, i32, i64 = ir.IntType(8), ir.IntType(32), ir.IntType(64)
            f32 = ir.FloatType()
            v16 = lambda t: ir.VectorType(t, 16)  # noqa: E731

            def data(k, ty):
                a = context.make_array(sig.args[k])(context, builder, args[k])
                return builder.bitcast(a.data, ty.as_pointer())

            def c64(v):
                return ir.Constant(i64, v)

            def vload(ptr, ty, align):
                ld = builder.load(builder.bitcast(ptr, v16(ty).as_pointer()))
                ld.align = align
                return ld

            def splat(val, ty):
                v = builder.insert_element(ir.Constant(v16(ty), ir.Undefined), val,
                                           ir.Constant(i32, 0))  # fmt: skip
                return builder.shuffle_vector(v, ir.Constant(v16(ty), ir.Undefined),
                                              ir.Constant(v16(i32), None))  # fmt: skip

            xb = builder.gep(data(0, i8), [xoff])
            kb = data(3, i64)
            wb = builder.gep(data(5, f32), [woff])
            offs = [builder.load(builder.gep(kb, [c64(t)])) for t in range(T)]
            wv = [vload(builder.gep(wb, [builder.mul(wst, c64(t))]), f32, 4) for t in range(T)]
            fma = builder.module.declare_intrinsic(
                "llvm.fma.v16f32", fnty=ir.FunctionType(v16(f32), [v16(f32)] * 3)
            )
            if float_out:
                ob = builder.gep(data(18, f32), [ooff])
                scv = vload(builder.gep(data(16, f32), [rqoff]), f32, 4)
                fbv = vload(builder.gep(data(17, f32), [rqoff]), f32, 4)
            else:
                oty = ir.IntType(odt.bitwidth)
                ob = builder.gep(data(18, oty), [ooff])
                bv = vload(builder.gep(data(8, i64), [rqoff]), i64, 8)
                mv = vload(builder.gep(data(9, i64), [rqoff]), i64, 8)
                nv = vload(builder.gep(data(10, i64), [rqoff]), i64, 8)
                hv = vload(builder.gep(data(11, i64), [rqoff]), i64, 8)
                prev = splat(pre, i64)
                lov = splat(lo, i64)
                hiv = splat(hi, i64)
                zero64 = ir.Constant(v16(i64), None)
                if narrow:
                    b32 = builder.trunc(bv, v16(i32))
                    m32 = builder.trunc(mv, v16(i32))
                    pre32 = builder.trunc(prev, v16(i32))
            pre_bb = builder.basic_block
            loop = builder.append_basic_block("dw_loop")
            done = builder.append_basic_block("dw_done")
            builder.cbranch(builder.icmp_signed(">", nwo, c64(0)), loop, done)
            builder.position_at_end(loop)
            wo = builder.phi(i64)
            wo.add_incoming(c64(0), pre_bb)
            base = builder.gep(xb, [builder.mul(wo, ps)])
            # float32 multiply-adds: exact, every product and partial sum is an integer
            # below 2**24 (T * 255 * 128 for T <= 9 taps)
            acc = None
            for t in range(T):
                xv = vload(builder.gep(base, [offs[t]]), i8, 1)
                xe = builder.sext(xv, v16(i32)) if signed_in else builder.zext(xv, v16(i32))
                xf = builder.sitofp(xe, v16(f32))
                if acc is None:
                    acc = builder.fmul(xf, wv[t])
                else:
                    acc = builder.call(fma, [xf, wv[t], acc])
            optr = builder.gep(ob, [builder.mul(wo, ostride)])
            if float_out:
                f = builder.fmul(acc, scv)
                f = builder.fadd(f, fbv)
                st = builder.store(f, builder.bitcast(optr, v16(f32).as_pointer()))
                st.align = 4
            else:
                if narrow:
                    a32 = builder.add(builder.shl(builder.fptosi(acc, v16(i32)), pre32), b32)
                    pv = builder.mul(builder.sext(a32, v16(i64)), builder.sext(m32, v16(i64)))
                else:
                    a64 = builder.fptosi(acc, v16(i64))
                    pv = builder.mul(builder.add(builder.shl(a64, prev), bv), mv)
                neg = builder.icmp_signed("<", pv, zero64)
                ab = builder.select(neg, builder.sub(zero64, pv), pv)
                q = builder.ashr(builder.add(ab, hv), nv)
                q = builder.select(neg, builder.sub(zero64, q), q)
                q = builder.select(builder.icmp_signed("<", q, lov), lov, q)
                q = builder.select(builder.icmp_signed(">", q, hiv), hiv, q)
                qt = builder.trunc(q, v16(oty))
                st = builder.store(qt, builder.bitcast(optr, v16(oty).as_pointer()))
                st.align = 1
            wo1 = builder.add(wo, c64(1))
            wo.add_incoming(wo1, builder.basic_block)
            builder.cbranch(builder.icmp_signed("<", wo1, nwo), loop, done)
            builder.position_at_end(done)
            return context.get_dummy_value()

        return sig, codegen

    return row


_dw_row9 = _make_dw_row(9)
_dw_row9n = _make_dw_row(9, narrow=True)


@njit(parallel=True, cache=True)
def _dw_fused(xpad, koff, w, C, sh, Ho, Wo, sw, bias, m, n, half, pre_shift, lo, hi, scale,
              fbias, narrow, out):  # fmt: skip
    # depthwise conv with 9 taps (3x3, any stride/dilation: koff), requantization (integer
    # out) or dequantization (float32 out) fused. xpad [N, Hp, Wp, Cp] int8/uint8, zero
    # padded (Cp = C rounded up to 16), koff [9] int64 flat tap offsets, w [9, Cp] float32,
    # bias/m/n/half [Cp] int64, scale/fbias [Cp] float32, out [N, Ho, Wo, C].
    N, Hp, Wp, Cp = xpad.shape
    CB = Cp // 16
    ps = sw * Cp
    for r in prange(N * Ho):
        img = r // Ho
        ho = r % Ho
        x0 = ((img * Hp + ho * sh) * Wp) * Cp
        if C == Cp:
            o0 = ((img * Ho + ho) * Wo) * C
            for cb in range(CB):
                if narrow:
                    _dw_row9n(
                        xpad,
                        x0 + cb * 16,
                        ps,
                        koff,
                        Wo,
                        w,
                        cb * 16,
                        Cp,
                        bias,
                        m,
                        n,
                        half,
                        cb * 16,
                        pre_shift,
                        lo,
                        hi,
                        scale,
                        fbias,
                        out,
                        o0 + cb * 16,
                        C,
                    )
                else:
                    _dw_row9(
                        xpad,
                        x0 + cb * 16,
                        ps,
                        koff,
                        Wo,
                        w,
                        cb * 16,
                        Cp,
                        bias,
                        m,
                        n,
                        half,
                        cb * 16,
                        pre_shift,
                        lo,
                        hi,
                        scale,
                        fbias,
                        out,
                        o0 + cb * 16,
                        C,
                    )
        else:
            tmp = np.empty((Wo, Cp), out.dtype)
            for cb in range(CB):
                if narrow:
                    _dw_row9n(
                        xpad,
                        x0 + cb * 16,
                        ps,
                        koff,
                        Wo,
                        w,
                        cb * 16,
                        Cp,
                        bias,
                        m,
                        n,
                        half,
                        cb * 16,
                        pre_shift,
                        lo,
                        hi,
                        scale,
                        fbias,
                        tmp,
                        cb * 16,
                        Cp,
                    )
                else:
                    _dw_row9(
                        xpad,
                        x0 + cb * 16,
                        ps,
                        koff,
                        Wo,
                        w,
                        cb * 16,
                        Cp,
                        bias,
                        m,
                        n,
                        half,
                        cb * 16,
                        pre_shift,
                        lo,
                        hi,
                        scale,
                        fbias,
                        tmp,
                        cb * 16,
                        Cp,
                    )
            for wo in range(Wo):
                dst = out[img, ho, wo]
                for c in range(C):
                    dst[c] = tmp[wo, c]


# ---------------------------------------------------------------------------------------
# fused GEMM: quantized input rows in, requantized / dequantized / sign-packed rows out.
# Each parallel task computes _TB * _MR rows against all weights into an int32 scratch block
# (L1/L2 resident) and applies the epilogue from there: no int32 array goes through memory.

_T2 = [_make_vnni_tile(m, 2) for m in range(1, _MR + 1)]
_T1 = [_make_vnni_tile(m, 1) for m in range(1, _MR + 1)]
_t2_1, _t2_2, _t2_3, _t2_4, _t2_5, _t2_6 = _T2
_t1_1, _t1_2, _t1_3, _t1_4, _t1_5, _t1_6 = _T1


@njit(inline="always")
def _vnni_rows(m, two, xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op):
    # one m x 16 (two) or m x 8 tile, m in 1.._MR (6)
    if two:
        if m == 6:
            _t2_6(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)
        elif m == 5:
            _t2_5(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)
        elif m == 4:
            _t2_4(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)
        elif m == 3:
            _t2_3(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)
        elif m == 2:
            _t2_2(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)
        else:
            _t2_1(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)
    else:
        if m == 6:
            _t1_6(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)
        elif m == 5:
            _t1_5(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)
        elif m == 4:
            _t1_4(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)
        elif m == 3:
            _t1_3(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)
        elif m == 2:
            _t1_2(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)
        else:
            _t1_1(xu, xo, Kp, wp, wo, ws, K4, init, io, acc, oo, Op)


@njit(inline="always")
def _gemm_block(vnni, xu, wp, w2d, init, p0, n, acc):
    # acc[r, :] = init + sum_k xu[p0 + r, k] * w[:, k] for r < n (acc [>= n, Op] int32)
    Kp = xu.shape[1]
    Op = acc.shape[1]
    if vnni:
        OB8 = wp.shape[0]
        K4 = wp.shape[1]
        ws = K4 * 32
        ob = 0
        while ob < OB8:
            two = ob + 2 <= OB8
            b = 0
            while b < n:
                m = min(_MR, n - b)
                _vnni_rows(m, two, xu, (p0 + b) * Kp, Kp, wp, ob * ws, ws, K4, init, ob * 8, acc,
                           b * Op + ob * 8, Op)  # fmt: skip
                b += m
            ob += 2 if two else 1
    else:
        for r in range(n):
            xr = xu[p0 + r]
            ar = acc[r]
            for o in range(Op):
                wr = w2d[o]
                s = np.int32(0)
                for k in range(Kp):
                    s += np.int32(xr[k]) * np.int32(wr[k])
                ar[o] = init[o] + s


@njit(inline="always")
def _rq1(a, pre_shift, bias, m, n, half, lo, hi):
    p = ((np.int64(a) << pre_shift) + bias) * m
    q = (np.abs(p) + half) >> n
    if p < 0:
        q = -q
    return min(max(q, lo), hi)


@njit(parallel=True, cache=True)
def _gemm_fused(vnni, xu, wp, w2d, init, O, mode, pre_shift, bias, m, n, half, lo, hi, scale,
                fbias, hw, out_i, out_f, out_f3, out_b):  # fmt: skip
    # xu [P, Kp] uint8; the epilogue per row p and output channel o < O of acc:
    #   mode 0: out_i[p, o] = requant(acc)              (out_i [P, O] integer codes)
    #   mode 1: out_f[p, o] = float32(acc) * scale + fbias   (out_f [P, O] float32)
    #   mode 2: as 1, stored NCHW: out_f3[p // hw, o, p % hw]  (out_f3 [N, O, hw])
    #   mode 3: as 1, then the sign bits packed: out_b[p, o // 64] (out_b [P, ceil(O/64)])
    #   mode 4: out_i[p, o] = acc (int32)
    P = xu.shape[0]
    Op = init.shape[0]
    rows = _MR * _TB
    ntask = (P + rows - 1) // rows
    for t in prange(ntask):
        p0 = t * rows
        nr = min(rows, P - p0)
        acc = np.empty((rows, Op), np.int32)
        _gemm_block(vnni, xu, wp, w2d, init, p0, nr, acc)
        if mode == 0:
            for r in range(nr):
                ar = acc[r]
                orow = out_i[p0 + r]
                for o in range(O):
                    orow[o] = _rq1(ar[o], pre_shift, bias[o], m[o], n[o], half[o], lo, hi)
        elif mode == 1:
            for r in range(nr):
                ar = acc[r]
                orow = out_f[p0 + r]
                for o in range(O):
                    v = np.float32(ar[o]) * scale[o]
                    orow[o] = v + fbias[o]
        elif mode == 2:
            fb = np.empty((rows, O), np.float32)
            for r in range(nr):
                ar = acc[r]
                fr = fb[r]
                for o in range(O):
                    v = np.float32(ar[o]) * scale[o]
                    fr[o] = v + fbias[o]
            r = 0
            while r < nr:
                p = p0 + r
                img = p // hw
                q0 = p - img * hw
                seg = min(nr - r, hw - q0)
                for o in range(O):
                    dst = out_f3[img, o]
                    for j in range(seg):
                        dst[q0 + j] = fb[r + j, o]
                r += seg
        elif mode == 3:
            OW = out_b.shape[1]
            for r in range(nr):
                ar = acc[r]
                for w in range(OW):
                    o0 = w * 64
                    o1 = min(o0 + 64, O)
                    word = np.uint64(0)
                    for o in range(o0, o1):
                        v = np.float32(ar[o]) * scale[o]
                        v = v + fbias[o]
                        if v > 0:
                            word |= np.uint64(1) << np.uint64(o - o0)
                    out_b[p0 + r, w] = word
        else:
            for r in range(nr):
                ar = acc[r]
                orow = out_i[p0 + r]
                for o in range(O):
                    orow[o] = ar[o]


def amx_weights(w2d: np.ndarray) -> np.ndarray:
    """``w2d [Op, Kp]`` int8 -> the AMX tile layout ``[Oq/16, Kq/4, 16, 4]`` (Kq = Kp rounded
    up to 64, Oq = Op rounded up to 32, zeros above): each 64-byte row holds 4 consecutive
    k of 16 output channels, so 16 such rows are one weight tile of ``tdpbusd``."""
    Op, Kp = w2d.shape
    Kq, Oq = -(-Kp // 64) * 64, -(-Op // 32) * 32
    w = np.zeros((Oq, Kq), np.int8)
    w[:Op, :Kp] = w2d
    return np.ascontiguousarray(w.reshape(Oq // 16, 16, Kq // 4, 4).transpose(0, 2, 1, 3))


def gemm_fused(xu, pc: PackedConv, init, O, mode, pre_shift, bias, m, n, half, lo, hi,
               scale, fbias, hw, out, interleaved: bool = False) -> None:  # fmt: skip
    """The int8 GEMM of group 0 of ``pc`` over ``xu [P, Kp]`` (uint8) with the epilogue
    fused, written to ``out`` (see ``_gemm_fused`` for the modes; ``out`` is the 2-D view
    for modes 0, 1, 3, 4 and ``[N, O, hw]`` for mode 2). The C kernel where it runs (the
    per-channel arrays padded to the packed channel count), else numba. ``interleaved``:
    ``xu`` is ``[Kp/4, P, 4]`` (:func:`quant_nchw_k4`; C kernel only)."""
    if _cext.available() and (mode != 0 or out.dtype.itemsize <= 4):
        Op = init.shape[0]
        f = _cext.lib().gemm_u8s8
        isz = out.dtype.itemsize if mode == 0 else 4
        if mode == 0:
            bias, m, n, half = (_padded(v, Op) for v in (bias, m, n, half))
        elif mode in (1, 2, 3):
            scale, fbias = _padded(scale, Op), _padded(fbias, Op)
        P, Kp = (xu.shape[1], xu.shape[0] * 4) if interleaved else xu.shape
        w, align, rate = pc.wp[0], _MR * _TB, 170  # rate: MACs per ns (measured)
        if _cext.amx():
            align, rate = 32, 400
            f = _cext.lib().gemm_amx
            w = pc.cache.get("amx")
            if w is None:
                w = pc.cache["amx"] = amx_weights(pc.w2d[0])
        args = (xu, interleaved, w, init, P, Kp, Op, O, mode, pre_shift, bias, m, n,
                half, lo, hi, isz, scale, fbias, hw, out)  # fmt: skip
        _cext.parallel_rows(lambda r0, r1: f(*args, r0, r1), P, get_threads(), align=align,
                            est_ns=P * Kp * Op / rate)  # fmt: skip
        return
    if interleaved:
        raise ValueError("an interleaved GEMM input needs the C kernels")
    oi, of, of3, ob = _OI2, _DF2, _DF3, _DB2
    if mode in (0, 4):
        oi = out
    elif mode == 1:
        of = out
    elif mode == 2:
        of3 = out
    else:
        ob = out
    _gemm_fused(HAS_VNNI, xu, pc.wp[0], pc.w2d[0], init, O, mode, pre_shift, bias, m, n, half,
                lo, hi, scale, fbias, hw, oi, of, of3, ob)  # fmt: skip


def quant_nchw_k4(x, s, lo, hi, shift, sh, sw, Kp, out=None) -> np.ndarray:
    """The GEMM input of a pointwise conv with stride (sh, sw) from an NCHW float32 input,
    interleaved ``[Kp/4, N*Ho*Wo, 4]`` uint8: ``clip(rint(x / s), lo, hi) + shift`` (C
    kernels only; no transpose, unlike ``_quant_rows_nchw``)."""
    N, C, H, W = x.shape
    Ho, Wo = (H - 1) // sh + 1, (W - 1) // sw + 1
    if out is None:
        out = np.empty((Kp // 4, N * Ho * Wo, 4), np.uint8)
    f = _cext.lib().quant_k4
    args = (x, float(s), float(lo), float(hi), int(shift), N, C, H, W, sh, sw, Kp, out)
    _cext.parallel_rows(lambda r0, r1: f(*args, r0, r1), N * Ho, get_threads(),
                        est_ns=N * Ho * Wo * Kp / 6)  # ~6 values per ns  # fmt: skip
    return out


def sign_pack_fast(x: np.ndarray, out: np.ndarray, nchw: bool) -> bool:
    """Pack the signs of a C-contiguous float32 ``x`` (rows ``[R, C]`` or NCHW) into ``out``
    with the C kernel; False (nothing written) where that kernel does not apply."""
    if not _cext.available() or x.dtype != np.float32 or not x.flags.c_contiguous:
        return False
    f = _cext.lib().sign_pack
    if nchw:
        N, C, H, W = x.shape
        args = (x, True, N, C, H, W, out)
        rows = N
    else:
        N, C = x.shape
        args = (x, False, N, C, 1, 1, out)
        rows = N
    _cext.parallel_rows(lambda r0, r1: f(*args, r0, r1), rows, get_threads(),
                        est_ns=x.size / 10)  # ~10 values per ns  # fmt: skip
    return True


_OI2 = np.zeros((1, 1), np.int32)
_DF2 = np.zeros((1, 1), np.float32)
_DF3 = np.zeros((1, 1, 1), np.float32)
_DB2 = np.zeros((1, 1), np.uint64)


@njit(inline="always")
def _q1(v, s, lo, hi):
    # clip(rint(v / s), lo, hi) in float32 (lo, hi float32)
    return min(max(np.rint(v / s), lo), hi)


@njit(parallel=True, cache=True)
def _quant_rows_nhwc(x, s, lo, hi, shift, sh, sw, xu):
    # x [N, H, W, C] float32 (NHWC) -> xu [N*Ho*Wo, Kp] uint8: the GEMM input of a pointwise
    # conv with stride (sh, sw): clip(rint(x / s), lo, hi) (+ 128 when shift), zero padding
    lo = np.float32(lo)
    hi = np.float32(hi)
    N, H, W, C = x.shape
    Kp = xu.shape[1]
    Ho = (H - 1) // sh + 1
    Wo = (W - 1) // sw + 1
    for r in prange(N * Ho):
        img = r // Ho
        ho = r % Ho
        for wo in range(Wo):
            xr = x[img, ho * sh, wo * sw]
            orow = xu[r * Wo + wo]
            for c in range(C):
                orow[c] = np.uint8(np.int32(_q1(xr[c], s, lo, hi)) + shift)
            for c in range(C, Kp):
                orow[c] = 0


@njit(parallel=True, cache=True)
def _quant_rows_nchw(x, s, lo, hi, shift, sh, sw, xu):
    # as _quant_rows_nhwc from an NCHW input x [N, C, H, W] (the layout change fused in):
    # one output row of pixels quantized per channel (vectorized), then transposed
    lo = np.float32(lo)
    hi = np.float32(hi)
    N, C, H, W = x.shape
    Kp = xu.shape[1]
    Ho = (H - 1) // sh + 1
    Wo = (W - 1) // sw + 1
    for r in prange(N * Ho):
        img = r // Ho
        ho = r % Ho
        base = r * Wo
        tmp = np.empty((C, Wo), np.uint8)
        for c in range(C):
            xr = x[img, c, ho * sh]
            tr = tmp[c]
            if sw == 1:
                for wo in range(Wo):
                    tr[wo] = np.uint8(np.int32(_q1(xr[wo], s, lo, hi)) + shift)
            else:
                for wo in range(Wo):
                    tr[wo] = np.uint8(np.int32(_q1(xr[wo * sw], s, lo, hi)) + shift)
        for wo in range(Wo):
            orow = xu[base + wo]
            for c in range(C):
                orow[c] = tmp[c, wo]
            for c in range(C, Kp):
                orow[c] = 0


@njit(parallel=True, cache=True)
def _quant_nchw(x, s, lo, hi, out):
    # x [N, C, H, W] float32 -> out [N, H, W, C] integer codes clip(rint(x / s), lo, hi)
    lo = np.float32(lo)
    hi = np.float32(hi)
    N, C, H, W = x.shape
    for r in prange(N * H):
        img = r // H
        h = r % H
        tmp = np.empty((C, W), out.dtype)
        for c in range(C):
            xr = x[img, c, h]
            tr = tmp[c]
            for w in range(W):
                tr[w] = _q1(xr[w], s, lo, hi)
        for w in range(W):
            orow = out[img, h, w]
            for c in range(C):
                orow[c] = tmp[c, w]


@njit(parallel=True, cache=True)
def _sign_pack_nchw(x, out):
    # x [N, C, H, W] (real) -> out [N, H, W, ceil(C/64)] uint64 packed signs (x > 0)
    N, C, H, W = x.shape
    CW = out.shape[3]
    for r in prange(N * H):
        img = r // H
        h = r % H
        acc = np.empty(W, np.uint64)
        for cw in range(CW):
            for w in range(W):
                acc[w] = 0
            for c in range(cw * 64, min(cw * 64 + 64, C)):
                xr = x[img, c, h]
                bit = np.uint64(1) << np.uint64(c - cw * 64)
                for w in range(W):
                    acc[w] |= bit if xr[w] > 0 else np.uint64(0)
            for w in range(W):
                out[img, h, w, cw] = acc[w]


@njit(parallel=True, cache=True)
def _shift_rows(x, shift, sh, sw, xu):
    # x [N, H, W, C] int8/uint8 codes -> xu [N*Ho*Wo, Kp] uint8 = x (+ 128 when shift, the
    # int8 -> uint8 move of the VNNI GEMM), pixels strided by (sh, sw), zero padding
    N, H, W, C = x.shape
    Kp = xu.shape[1]
    Ho = (H - 1) // sh + 1
    Wo = (W - 1) // sw + 1
    for r in prange(N * Ho):
        img = r // Ho
        ho = r % Ho
        for wo in range(Wo):
            xr = x[img, ho * sh, wo * sw]
            orow = xu[r * Wo + wo]
            for c in range(C):
                orow[c] = np.uint8(np.int32(xr[c]) + shift)
            for c in range(C, Kp):
                orow[c] = 0


@njit(parallel=True, cache=True)
def _im2col(xu, c0, cg, kh, kw, sh, sw, ph, pw, dh, dw, ho_n, wo_n, padval, cols):
    # xu [N, H, W, C] uint8 -> cols [N*Ho*Wo, Kp] uint8, k = (i*kw + j)*cg + c
    N, H, W, _ = xu.shape
    Kp = cols.shape[1]
    pv = np.uint8(padval)
    for r in prange(N * ho_n):
        n = r // ho_n
        ho = r % ho_n
        for wo in range(wo_n):
            row = cols[r * wo_n + wo]
            k = 0
            for i in range(kh):
                hi = ho * sh - ph + i * dh
                for j in range(kw):
                    wi = wo * sw - pw + j * dw
                    if hi >= 0 and hi < H and wi >= 0 and wi < W:
                        row[k : k + cg] = xu[n, hi, wi, c0 : c0 + cg]
                    else:
                        for c in range(cg):
                            row[k + c] = pv
                    k += cg
            for kk in range(k, Kp):
                row[kk] = 0


# ---------------------------------------------------------------------------------------
# depthwise: out[n, ho, wo, c] = sum_ij x[n, hi, wi, c] * w[i, j, c]


@njit(parallel=True, cache=True)
def _dw_conv(x, w32, kh, kw, sh, sw, ph, pw, dh, dw, out):
    # x [N, H, W, C] uint8/int8, w32 [kh*kw, C] int32, out [N, Ho, Wo, C] int32
    N, H, W, C = x.shape
    Ho = out.shape[1]
    Wo = out.shape[2]
    three = kh == 3 and kw == 3
    for r in prange(N * Ho):
        n = r // Ho
        ho = r % Ho
        h0 = ho * sh - ph
        rows_ok = h0 >= 0 and h0 + (kh - 1) * dh < H
        for wo in range(Wo):
            o = out[n, ho, wo]
            w0 = wo * sw - pw
            if three and rows_ok and w0 >= 0 and w0 + 2 * dw < W:
                a0 = x[n, h0, w0]
                a1 = x[n, h0, w0 + dw]
                a2 = x[n, h0, w0 + 2 * dw]
                b0 = x[n, h0 + dh, w0]
                b1 = x[n, h0 + dh, w0 + dw]
                b2 = x[n, h0 + dh, w0 + 2 * dw]
                c0 = x[n, h0 + 2 * dh, w0]
                c1 = x[n, h0 + 2 * dh, w0 + dw]
                c2 = x[n, h0 + 2 * dh, w0 + 2 * dw]
                q0 = w32[0]
                q1 = w32[1]
                q2 = w32[2]
                q3 = w32[3]
                q4 = w32[4]
                q5 = w32[5]
                q6 = w32[6]
                q7 = w32[7]
                q8 = w32[8]
                for c in range(C):
                    s0 = np.int32(a0[c]) * q0[c] + np.int32(a1[c]) * q1[c] + np.int32(a2[c]) * q2[c]
                    s1 = np.int32(b0[c]) * q3[c] + np.int32(b1[c]) * q4[c] + np.int32(b2[c]) * q5[c]
                    s2 = np.int32(c0[c]) * q6[c] + np.int32(c1[c]) * q7[c] + np.int32(c2[c]) * q8[c]
                    o[c] = s0 + s1 + s2
            else:
                for c in range(C):
                    o[c] = 0
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
                            o[c] += np.int32(xr[c]) * wr[c]


# ---------------------------------------------------------------------------------------
# binary: XOR + popcount over packed channel words


@njit(parallel=True, cache=True)
def _bin_conv(xp, wt, C, sh, sw, ph, pw, dh, dw, out):
    # xp [N, H, W, CW] uint64, wt [kh, kw, CW, O] uint64, out [N, Ho, Wo, O] int32
    N, H, W, CW = xp.shape
    kh, kw, _, O = wt.shape
    Ho = out.shape[1]
    Wo = out.shape[2]
    for r in prange(N * Ho):
        n = r // Ho
        ho = r % Ho
        cnt = np.empty(O, np.int32)
        for wo in range(Wo):
            for o in range(O):
                cnt[o] = 0
            nv = 0
            for i in range(kh):
                hi = ho * sh - ph + i * dh
                if hi < 0 or hi >= H:
                    continue
                for j in range(kw):
                    wi = wo * sw - pw + j * dw
                    if wi < 0 or wi >= W:
                        continue
                    nv += 1
                    for cw in range(CW):
                        xw = xp[n, hi, wi, cw]
                        wr = wt[i, j, cw]
                        for o in range(O):
                            cnt[o] += np.int32(_popc(xw ^ wr[o]))
            base = np.int32(nv * C)
            orow = out[n, ho, wo]
            for o in range(O):
                orow[o] = base - 2 * cnt[o]


@njit(parallel=True, cache=True)
def _bin_linear(xp, wp, K, out):
    # xp [N, KW] uint64, wp [O, KW] uint64, out [N, O] int32
    N, KW = xp.shape
    O = wp.shape[0]
    for n in prange(N):
        xr = xp[n]
        for o in range(O):
            wr = wp[o]
            s = 0
            for k in range(KW):
                s += _popc(xr[k] ^ wr[k])
            out[n, o] = K - 2 * s


# ---------------------------------------------------------------------------------------
# requantization and dequantization (per channel = last axis)


@njit(parallel=True, cache=True)
def _requant(acc, pre_shift, bias, m, n, half, lo, hi, out):
    # acc [R, C] int32, bias/m/n/half [C] int64, out [R, C] any integer dtype
    R, C = acc.shape
    for r in prange(R):
        ar = acc[r]
        orow = out[r]
        for c in range(C):
            p = ((np.int64(ar[c]) << pre_shift) + bias[c]) * m[c]
            q = (np.abs(p) + half[c]) >> n[c]
            if p < 0:
                q = -q
            q = min(max(q, lo), hi)
            orow[c] = q


@njit(parallel=True, cache=True)
def _dequant(acc, scale, bias, has_bias, out):
    # acc [R, C] int32, scale/bias [C] float32, out [R, C] float32; mul then add, no FMA
    R, C = acc.shape
    for r in prange(R):
        ar = acc[r]
        orow = out[r]
        if has_bias:
            for c in range(C):
                v = np.float32(ar[c]) * scale[c]
                orow[c] = v + bias[c]
        else:
            for c in range(C):
                orow[c] = np.float32(ar[c]) * scale[c]


# ---------------------------------------------------------------------------------------
# validation helpers


def _pair(v, name: str, minimum: int) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v), int(v))
    try:
        a, b = (int(t) for t in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an int or a pair of ints, got {v!r}") from None
    if a < minimum or b < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {(a, b)}")
    return a, b


def _check_act(x, ndim: int, what: str) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(x).__name__}")
    if x.dtype not in (np.uint8, np.int8):
        raise ValueError(f"{what} must be int8 or uint8, got {x.dtype}")
    if x.ndim != ndim:
        layout = "NHWC" if ndim == 4 else "[N, K]"
        raise ValueError(f"{what} must have rank {ndim} ({layout}), got shape {x.shape}")
    return np.ascontiguousarray(x)


def _out_size(size: int, k: int, s: int, p: int, d: int, axis: str) -> int:
    o = (size + 2 * p - d * (k - 1) - 1) // s + 1
    if o < 1:
        raise ValueError(
            f"kernel {k} (dilation {d}) does not fit the padded input {axis} {size}+2*{p}"
        )
    return o


# ---------------------------------------------------------------------------------------
# packed weights


@dataclass(frozen=True, eq=False)
class PackedConv:
    """Int8 (or ternary) conv/linear weights repacked once for the kernels.

    ``kind``: "int8" or "ternary" (same kernels; ternary only checks the codes).
    ``depthwise``: groups == C_in == O, weights kept as ``w32 [kh*kw, C] int32``.
    Otherwise, per group ``g`` (K = kh*kw*cg padded to Kp, a multiple of 4; O per group
    padded to Op, a multiple of 8): ``wp[g] [Op/8, Kp/4, 8, 4] int8`` (the VNNI layout:
    for each block of 8 output channels and each 4 consecutive k, 32 bytes channel-major),
    ``w2d[g] [Op, Kp] int8`` (portable GEMM) and ``corr[g] [Op] int32 = -128 * sum_k w``
    (the accumulator's start for int8 activations, which the GEMM sees as ``x ^ 0x80``).
    """

    kind: str
    out_channels: int
    in_channels: int
    kh: int
    kw: int
    groups: int
    depthwise: bool
    wp: np.ndarray | None = None
    w2d: np.ndarray | None = None
    corr: np.ndarray | None = None
    zero: np.ndarray | None = None
    w32: np.ndarray | None = None
    cache: dict = field(default_factory=dict, repr=False)  # other layouts, made on first use

    @property
    def k(self) -> int:
        return self.kh * self.kw * (self.in_channels // self.groups)


def _check_weights(w, ndim: int) -> np.ndarray:
    if not isinstance(w, np.ndarray):
        raise ValueError(f"weights must be a numpy array, got {type(w).__name__}")
    if w.dtype != np.int8:
        raise ValueError(f"weight codes must be int8, got {w.dtype}")
    if w.ndim != ndim:
        layout = "[O, kh, kw, C_in/groups]" if ndim == 4 else "[O, K]"
        raise ValueError(f"weights must have rank {ndim} {layout}, got shape {w.shape}")
    if w.size == 0:
        raise ValueError(f"weights are empty: shape {w.shape}")
    return np.ascontiguousarray(w)


def _pack_gemm(w2: np.ndarray):
    """w2 [O, K] int8 -> (wp [Op/8, Kp/4, 8, 4], w2d [Op, Kp], corr [Op], zero [Op]); Op = O
    rounded up to a multiple of 16 (the C epilogue works on 16 channels at a time)."""
    O, K = w2.shape
    Kp = -(-K // 4) * 4
    Op = -(-O // 16) * 16
    w2d = np.zeros((Op, Kp), np.int8)
    w2d[:O, :K] = w2
    wp = np.ascontiguousarray(w2d.reshape(Op // 8, 8, Kp // 4, 4).transpose(0, 2, 1, 3))
    corr = (-128 * w2d.astype(np.int32).sum(axis=1)).astype(np.int32)
    return wp, w2d, corr, np.zeros(Op, np.int32)


def prepare_conv(w: np.ndarray, groups: int = 1, kind: str = "int8") -> PackedConv:
    """Repack int8 conv codes ``[O, kh, kw, C_in // groups]`` for :func:`conv2d_int`."""
    w = _check_weights(w, 4)
    groups = int(groups)
    O, kh, kw, cg = w.shape
    if groups < 1 or O % groups:
        raise ValueError(f"groups={groups} must be >= 1 and divide the {O} output channels")
    cin = cg * groups
    if groups == O and cg == 1:
        w32 = np.ascontiguousarray(w.reshape(O, kh * kw).T.astype(np.int32))
        return PackedConv(kind, O, cin, kh, kw, groups, True, w32=w32)
    og = O // groups
    parts = [_pack_gemm(w[g * og : (g + 1) * og].reshape(og, kh * kw * cg)) for g in range(groups)]
    wp, w2d, corr, zero = (np.stack([p[i] for p in parts]) for i in range(4))
    return PackedConv(kind, O, cin, kh, kw, groups, False, wp, w2d, corr, zero)


def prepare_linear(w: np.ndarray, kind: str = "int8") -> PackedConv:
    """Repack int8 linear codes ``[O, K]`` for :func:`linear_int`."""
    w = _check_weights(w, 2)
    O, Kk = w.shape
    if O == 1 and Kk == 1:  # prepare_conv would take a 1x1 1-channel conv for depthwise
        wp, w2d, corr, zero = (a[None] for a in _pack_gemm(w))
        return PackedConv(kind, 1, 1, 1, 1, 1, False, wp, w2d, corr, zero)
    return prepare_conv(w.reshape(O, 1, 1, Kk), 1, kind)


def _check_ternary(w: np.ndarray) -> None:
    if w.dtype != np.int8:
        raise ValueError(f"ternary codes must be int8, got {w.dtype}")
    if np.any((w < -1) | (w > 1)):
        raise ValueError("ternary codes must be in {-1, 0, +1}")


def pack_ternary(w_codes: np.ndarray, groups: int = 1) -> PackedConv:
    """Ternary codes (int8 in {-1, 0, +1}), ``[O, kh, kw, C_in // groups]`` or ``[O, K]``.

    The packed form is the int8 :class:`PackedConv` (kind "ternary"): with VNNI a
    multiply by a code costs the same as an add, and the dense GEMM beats index lists or
    bit masks on this hardware (see bench/kernels.py).
    """
    if not isinstance(w_codes, np.ndarray):
        raise ValueError(f"weights must be a numpy array, got {type(w_codes).__name__}")
    _check_ternary(w_codes)
    if w_codes.ndim == 2:
        return prepare_linear(w_codes, kind="ternary")
    return prepare_conv(w_codes, groups, kind="ternary")


# ---------------------------------------------------------------------------------------
# int8 / ternary convolutions and linear layers


def _gemm(xu: np.ndarray, pc: PackedConv, g: int, signed: bool) -> np.ndarray:
    init = pc.corr[g] if signed else pc.zero[g]
    out = np.empty((xu.shape[0], init.shape[0]), np.int32)
    if HAS_VNNI:
        _gemm_vnni(xu, pc.wp[g], init, out)
    else:
        _gemm_ref(xu, pc.w2d[g], init, out)
    return out


def _gemm_input(x2: np.ndarray, Kp: int, signed: bool) -> np.ndarray:
    """x2 [P, K] uint8/int8 -> contiguous uint8 [P, Kp] (int8 shifted by ^0x80, pad 0)."""
    P, K = x2.shape
    if not signed and K == Kp and x2.flags.c_contiguous:
        return x2
    xu = np.empty((P, Kp), np.uint8)
    if signed:
        np.bitwise_xor(x2.view(np.uint8), np.uint8(0x80), out=xu[:, :K])
    else:
        xu[:, :K] = x2
    xu[:, K:] = 0
    return xu


def conv2d_int(
    x: np.ndarray,
    w: np.ndarray | PackedConv,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
    groups: int = 1,
) -> np.ndarray:
    """Integer convolution: ``x`` NHWC int8/uint8, ``w`` int8 codes ``[O, kh, kw, C/groups]``
    (or a :class:`PackedConv`); returns the int32 accumulator NHWC ``[N, Ho, Wo, O]``."""
    x = _check_act(x, 4, "conv input")
    sh, sw = _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation", 1)
    if isinstance(w, PackedConv):
        pc = w
        if int(groups) != 1 and int(groups) != pc.groups:
            raise ValueError(f"groups={groups} but the packed weights have groups={pc.groups}")
    else:
        pc = prepare_conv(w, groups)
    N, H, W, C = x.shape
    if C != pc.in_channels:
        raise ValueError(
            f"input has {C} channels but the weights expect {pc.in_channels} "
            f"({pc.in_channels // pc.groups} per group x {pc.groups} groups)"
        )
    Ho = _out_size(H, pc.kh, sh, ph, dh, "height")
    Wo = _out_size(W, pc.kw, sw, pw, dw, "width")
    O = pc.out_channels
    if pc.depthwise:
        out = np.empty((N, Ho, Wo, O), np.int32)
        _dw_conv(x, pc.w32, pc.kh, pc.kw, sh, sw, ph, pw, dh, dw, out)
        return out
    signed = x.dtype == np.int8
    G = pc.groups
    cg = C // G
    og = O // G
    Kp = pc.wp.shape[2] * 4
    pointwise = pc.kh == 1 and pc.kw == 1 and ph == 0 and pw == 0 and G == 1
    if pointwise:
        xs = x if (sh, sw) == (1, 1) else x[:, ::sh, ::sw, :]
        xu = _gemm_input(np.ascontiguousarray(xs).reshape(N * Ho * Wo, C), Kp, signed)
        acc = _gemm(xu, pc, 0, signed)
        if acc.shape[1] != O:
            acc = np.ascontiguousarray(acc[:, :O])
        return acc.reshape(N, Ho, Wo, O)
    xu = np.bitwise_xor(x.view(np.uint8), np.uint8(0x80)) if signed else x
    padval = 128 if signed else 0
    cols = np.empty((N * Ho * Wo, Kp), np.uint8)
    if G == 1:
        _im2col(xu, 0, cg, pc.kh, pc.kw, sh, sw, ph, pw, dh, dw, Ho, Wo, padval, cols)
        acc = _gemm(cols, pc, 0, signed)
        if acc.shape[1] != O:
            acc = np.ascontiguousarray(acc[:, :O])
        return acc.reshape(N, Ho, Wo, O)
    out = np.empty((N * Ho * Wo, O), np.int32)
    for g in range(G):
        _im2col(xu, g * cg, cg, pc.kh, pc.kw, sh, sw, ph, pw, dh, dw, Ho, Wo, padval, cols)
        out[:, g * og : (g + 1) * og] = _gemm(cols, pc, g, signed)[:, :og]
    return out.reshape(N, Ho, Wo, O)


def linear_int(x: np.ndarray, w: np.ndarray | PackedConv) -> np.ndarray:
    """``x [N, K]`` int8/uint8 times ``w [O, K]`` int8 codes (or a packed linear):
    int32 ``[N, O]``."""
    x = _check_act(x, 2, "linear input")
    pc = w if isinstance(w, PackedConv) else prepare_linear(w)
    if pc.kh != 1 or pc.kw != 1 or pc.groups != 1 or pc.depthwise:
        raise ValueError("linear_int needs linear weights [O, K] (see prepare_linear)")
    if x.shape[1] != pc.in_channels:
        raise ValueError(f"input has {x.shape[1]} features but the weights expect {pc.in_channels}")
    signed = x.dtype == np.int8
    Kp = pc.wp.shape[2] * 4
    acc = _gemm(_gemm_input(x, Kp, signed), pc, 0, signed)
    return np.ascontiguousarray(acc[:, : pc.out_channels])


def _as_ternary(packed) -> PackedConv:
    if isinstance(packed, PackedConv):
        if packed.kind != "ternary":
            raise ValueError("weights were not packed with pack_ternary")
        return packed
    if isinstance(packed, np.ndarray):
        return pack_ternary(packed)
    raise ValueError(f"expected pack_ternary(...) output, got {type(packed).__name__}")


def conv2d_ternary(x, packed, stride=(1, 1), padding=(0, 0), dilation=(1, 1)) -> np.ndarray:
    """Convolution with ternary weights from :func:`pack_ternary` (groups as packed);
    equal to :func:`conv2d_int` with the same codes."""
    pc = _as_ternary(packed)
    return conv2d_int(x, pc, stride, padding, dilation, pc.groups)


def linear_ternary(x: np.ndarray, packed) -> np.ndarray:
    """Linear layer with ternary weights from :func:`pack_ternary` (``[O, K]`` codes)."""
    return linear_int(x, _as_ternary(packed))


# ---------------------------------------------------------------------------------------
# binary


def pack_signs(x: np.ndarray, check: bool = True) -> np.ndarray:
    """Pack ``{-1, +1}`` int8 values along the last axis into uint64 words:
    ``[..., C] -> [..., ceil(C / 64)]``, bit ``c % 64`` of word ``c // 64`` is 1 for +1."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"signs must be a numpy array, got {type(x).__name__}")
    if x.dtype != np.int8:
        raise ValueError(f"signs must be int8 in {{-1, +1}}, got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"signs need a non-empty last (channel) axis, got shape {x.shape}")
    if check and np.any((x != 1) & (x != -1)):
        raise ValueError("signs must be -1 or +1 (binary activations/weights)")
    C = x.shape[-1]
    cw = -(-C // 64)
    bits = np.packbits(x > 0, axis=-1, bitorder="little")
    pad = cw * 8 - bits.shape[-1]
    if pad:
        bits = np.concatenate([bits, np.zeros((*bits.shape[:-1], pad), np.uint8)], axis=-1)
    return np.ascontiguousarray(bits).view("<u8").astype(np.uint64, copy=False)


def pack_binary_weights(w: np.ndarray) -> np.ndarray:
    """Binary weight codes ``[O, kh, kw, C]`` (or ``[O, K]``) in {-1, +1} ->
    uint64 ``[O, kh, kw, ceil(C/64)]`` (or ``[O, ceil(K/64)]``), packed as :func:`pack_signs`."""
    if isinstance(w, np.ndarray) and w.ndim not in (2, 4):
        raise ValueError(f"binary weights must be [O, kh, kw, C] or [O, K], got shape {w.shape}")
    return pack_signs(w)


def _check_packed(a, ndim: int, what: str) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.uint64 or a.ndim != ndim:
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"{what} must be a uint64 array of rank {ndim} (from pack_*), got {got}")
    return np.ascontiguousarray(a)


def conv2d_binary(
    xp: np.ndarray,
    C: int,
    wp: np.ndarray,
    kh: int,
    kw: int,
    stride=(1, 1),
    padding=(0, 0),
    dilation=(1, 1),
) -> np.ndarray:
    """Binary convolution (groups=1) of packed signs ``xp [N, H, W, ceil(C/64)]`` with packed
    weights ``wp [O, kh, kw, ceil(C/64)]``. Returns int32 ``[N, Ho, Wo, O]`` equal to
    ``conv2d_int`` on the ±1 values with zero padding: ``sum over valid taps of
    C - 2 * popcount(x ^ w)``."""
    xp = _check_packed(xp, 4, "packed input")
    wp = _check_packed(wp, 4, "packed weights")
    C = int(C)
    cw = -(-C // 64) if C > 0 else 0
    if C < 1 or xp.shape[3] != cw:
        raise ValueError(f"C={C} needs {cw} words per pixel, the input has {xp.shape[3]}")
    if wp.shape[3] != cw:
        raise ValueError(f"input has C={C} ({cw} words) but the weights have {wp.shape[3]} words")
    if wp.shape[1] != kh or wp.shape[2] != kw:
        raise ValueError(f"weights have kernel {wp.shape[1:3]}, not ({kh}, {kw})")
    sh, sw = _pair(stride, "stride", 1)
    ph, pw = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation", 1)
    N, H, W, _ = xp.shape
    Ho = _out_size(H, kh, sh, ph, dh, "height")
    Wo = _out_size(W, kw, sw, pw, dw, "width")
    wt = np.ascontiguousarray(wp.transpose(1, 2, 3, 0))  # [kh, kw, CW, O]: O innermost
    out = np.empty((N, Ho, Wo, wp.shape[0]), np.int32)
    _bin_conv(xp, wt, C, sh, sw, ph, pw, dh, dw, out)
    return out


def linear_binary(xp: np.ndarray, K: int, wp: np.ndarray) -> np.ndarray:
    """Binary linear layer: packed signs ``xp [N, ceil(K/64)]``, packed weights
    ``wp [O, ceil(K/64)]``; int32 ``[N, O] = K - 2 * popcount(x ^ w)``."""
    xp = _check_packed(xp, 2, "packed input")
    wp = _check_packed(wp, 2, "packed weights")
    K = int(K)
    kw = -(-K // 64) if K > 0 else 0
    if K < 1 or xp.shape[1] != kw or wp.shape[1] != kw:
        raise ValueError(
            f"K={K} needs {kw} words; input has {xp.shape[1]}, weights have {wp.shape[1]}"
        )
    out = np.empty((xp.shape[0], wp.shape[0]), np.int32)
    _bin_linear(xp, wp, K, out)
    return out


# ---------------------------------------------------------------------------------------
# requant / dequant


def _per_channel(v, C: int, dtype, name: str) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim == 0:
        return np.full(C, a, dtype)
    if a.shape != (C,):
        raise ValueError(f"{name} must be a scalar or have shape ({C},), got {a.shape}")
    return np.ascontiguousarray(a, dtype)


def _check_acc(acc) -> np.ndarray:
    if not isinstance(acc, np.ndarray):
        raise ValueError(f"accumulator must be a numpy array, got {type(acc).__name__}")
    if acc.dtype != np.int32:
        raise ValueError(f"accumulator must be int32, got {acc.dtype}")
    if acc.ndim < 1:
        raise ValueError("accumulator needs a channel (last) axis")
    return np.ascontiguousarray(acc)


def requant(acc, bias, m, n, lo: int, hi: int, out_dtype=np.uint8, pre_shift: int = 0):
    """Per-channel (last axis) integer requantization in int64:
    ``clamp(round_half_away((acc * 2**pre_shift + bias) * m / 2**n), lo, hi)`` cast to
    ``out_dtype``, in one pass; exactly :func:`lowbit.requant.requantize_np` with
    ``channel_dim=-1`` (``requantize_np(acc + bias, m, n, lo, hi, -1)`` when
    ``pre_shift == 0``). ``bias`` may be None; ``bias``, ``m`` (``|m| < 2**31``, negative
    allowed) and ``n`` (in [1, 62]) are scalars or per channel. The caller keeps
    ``|(acc * 2**pre_shift + bias) * m| < 2**62`` (true for quantize_multiplier's ``m`` and
    int32 ``acc + bias`` at ``pre_shift == 0``)."""
    acc = _check_acc(acc)
    C = acc.shape[-1]
    out_dtype = np.dtype(out_dtype)
    if out_dtype.kind not in "iu":
        raise ValueError(f"out_dtype must be an integer dtype, got {out_dtype}")
    info = np.iinfo(out_dtype)
    lo, hi = int(lo), int(hi)
    if lo > hi or lo < info.min or hi > info.max:
        raise ValueError(f"clamp range [{lo}, {hi}] is empty or does not fit {out_dtype}")
    pre_shift = int(pre_shift)
    if not 0 <= pre_shift <= 31:
        raise ValueError(f"pre_shift must be in [0, 31], got {pre_shift}")
    b = np.zeros(C, np.int64) if bias is None else _per_channel(bias, C, np.int64, "bias")
    mm = _per_channel(m, C, np.int64, "m")
    nn = _per_channel(n, C, np.int64, "n")
    if np.any(nn < 1) or np.any(nn > 62):
        raise ValueError("shift n must be in [1, 62]")
    if np.any(np.abs(mm) >= 2**31):
        raise ValueError("multiplier m must satisfy |m| < 2**31")
    half = np.left_shift(np.int64(1), nn - 1)
    out = np.empty(acc.shape, out_dtype)
    _requant(acc.reshape(-1, C), pre_shift, b, mm, nn, half, lo, hi, out.reshape(-1, C))
    return out


def dequant(acc, scale, bias=None) -> np.ndarray:
    """``acc.astype(float32) * scale[c]`` then ``+ bias[c]`` (two float32 roundings, as
    PyTorch's ``acc.float() * scale + bias``); per channel along the last axis."""
    acc = _check_acc(acc)
    C = acc.shape[-1]
    s = _per_channel(scale, C, np.float32, "scale")
    has_bias = bias is not None
    b = _per_channel(bias, C, np.float32, "bias") if has_bias else np.zeros(C, np.float32)
    out = np.empty(acc.shape, np.float32)
    _dequant(acc.reshape(-1, C), s, b, has_bias, out.reshape(-1, C))
    return out


# ---------------------------------------------------------------------------------------
# structured sparse ternary (SST): look-up tables


@dataclass(frozen=True, eq=False)
class PackedSST:
    """SST weights for :func:`sst_lut_matmul`: ``index [O, G]`` codebook indices, the
    codebook's non-zero taps (``pos``, ``sign``, ``nnz``) and ``colmap [G * n]``: for each
    position of each group, the column of the input row it reads (-1: zero padding).
    ``c_taps`` (uint8 ``[G, k, O rounded up to 64]``): the C kernel's layout, each output
    channel's k taps per group as 5-bit codes (position, +16 when negative; 15, a zero lane,
    when unused), channels ``i`` and ``32 + i`` of each block of 64 side by side (bytes
    ``2i``, ``2i + 1``), where groups have at most 15 weights (else None: numba only)."""

    index: np.ndarray
    pos: np.ndarray
    sign: np.ndarray
    nnz: np.ndarray
    colmap: np.ndarray
    n: int
    k: int
    fan_in: int
    c_taps: np.ndarray | None = None
    reads: int = 0  # the input columns the weights read (colmap's maximum + 1)

    @property
    def out_channels(self) -> int:
        return self.index.shape[0]


def prepare_sst(codes: np.ndarray, n: int, k: int, colmap: np.ndarray | None = None) -> PackedSST:
    """SST weights from ternary ``codes`` ``[O, ...]`` (each row flattened in C order, at
    most ``k`` non-zeros per group of ``n``). ``colmap[f]`` is the input column that
    flattened weight position ``f`` multiplies (default: ``f``)."""
    from .. import sstcode

    if k * 255 > 32767:
        raise ValueError(f"SST look-up tables are int16: k = {k} is too large")
    codes = np.asarray(codes)
    rows = codes.shape[0]
    fan_in = int(np.prod(codes.shape[1:])) if codes.ndim > 1 else 1
    index = sstcode.encode_groups(codes.reshape(rows, fan_in), n, k)
    g = index.shape[1]
    cm = np.full(g * n, -1, np.int64)
    cm[:fan_in] = np.arange(fan_in) if colmap is None else np.asarray(colmap, np.int64)
    pos, sign, nnz = sstcode.pattern_taps(n, k)
    taps = None
    if n <= 15:
        q = index.astype(np.int64)
        code = np.where(sign[q] == 0, 15, pos[q] + 16 * (sign[q] < 0)).astype(np.uint8)
        op = -(-rows // 64) * 64
        taps = np.full((g, pos.shape[1], op), 15, np.uint8)  # [G, k, Op]
        taps[:, :, :rows] = code.transpose(1, 2, 0)
        # byte pairs: in each block of 64 channels, channel i and channel 32 + i share a
        # 16-bit lane (the kernel's vpermw reads the low byte, then the high one shifted)
        taps = np.ascontiguousarray(
            taps.reshape(g, -1, op // 64, 2, 32).transpose(0, 1, 2, 4, 3).reshape(g, -1, op)
        )
    return PackedSST(np.ascontiguousarray(index.astype(np.int32)), pos, sign.astype(np.int16),
                     nnz, cm, int(n), int(k), fan_in, taps,
                     int(cm.max(initial=-1)) + 1)  # fmt: skip


_SST_R = 16  # input rows per table: the innermost (vectorized) axis of the tables
_SST_GC = 8  # groups per table chunk (the chunk's tables stay in L1/L2)


@njit(parallel=True, cache=True)
def _sst_lut(x, index, colmap, pos, sign, nnz, n, out):
    """``out[p, o] = sum_g T[g, index[o, g], p]``, ``T[g, q, p]`` the partial sum of
    pattern ``q``'s taps over group ``g`` of input row ``p``: built once for a block of
    ``_SST_R`` rows (the vector lanes) and a chunk of ``_SST_GC`` groups, and shared by
    every output channel, which then needs one look-up and one (vector) add per group.
    Tables are int16 (|sum| <= k * 255), accumulators int32."""
    P = x.shape[0]
    O, G = index.shape
    cb = pos.shape[0]
    R = _SST_R
    GC = _SST_GC
    ntask = (P + R - 1) // R
    for task in prange(ntask):
        p0 = task * R
        nr = min(R, P - p0)
        T = np.zeros((GC, cb, R), np.int16)
        v = np.zeros((n, R), np.int16)
        acc = np.zeros((O, R), np.int32)
        for g0 in range(0, G, GC):
            gn = min(GC, G - g0)
            for gi in range(gn):
                g = g0 + gi
                for j in range(n):
                    c = colmap[g * n + j]
                    for r in range(R):
                        v[j, r] = x[p0 + r, c] if (c >= 0 and r < nr) else 0
                for q in range(cb):
                    for r in range(R):
                        T[gi, q, r] = 0
                    for t in range(nnz[q]):
                        sg = sign[q, t]
                        pj = pos[q, t]
                        for r in range(R):
                            T[gi, q, r] += sg * v[pj, r]
            for o in range(O):
                for gi in range(gn):
                    q = index[o, g0 + gi]
                    for r in range(R):
                        acc[o, r] += T[gi, q, r]
        for o in range(O):
            for r in range(nr):
                out[p0 + r, o] = acc[o, r]


def sst_lut_matmul(x2: np.ndarray, packed: PackedSST) -> np.ndarray:
    """``x2 [P, F]`` int8/uint8 rows times SST weights: the int32 ``[P, O]`` accumulator
    (equal to ``x2 @ codes.T`` with the colmap applied), by look-up tables: in C (AVX-512,
    groups of at most 15) each row's group values and their negatives are a register table
    that every output channel's taps index (``_lbk.c``, lb_sst_taps); in numba the partial
    sums of every codebook pattern over 16 rows are tabulated and shared by the channels."""
    x2 = _sst_rows(x2, packed)
    out = np.empty((x2.shape[0], packed.out_channels), np.int32)
    if sst_c_ok(packed):  # one row at a time, in registers
        _sst_c(x2, packed, 4, 0, _I0, _I0, _I0, _I0, 0, 0, _DF, _DF, out)
    else:
        _sst_lut(x2, packed.index, packed.colmap, packed.pos, packed.sign, packed.nnz,
                 packed.n, out)  # fmt: skip
    return out


def sst_c_ok(packed: PackedSST) -> bool:
    """The C look-up kernel (and so :func:`sst_fused`) runs these weights."""
    return packed.c_taps is not None and _cext.available()


def _sst_rows(x2: np.ndarray, packed: PackedSST) -> np.ndarray:
    x2 = np.ascontiguousarray(x2)
    if x2.ndim != 2 or x2.dtype not in (np.int8, np.uint8):
        raise ValueError(f"sst_lut_matmul takes a 2-D int8/uint8 array, got {x2.dtype} "
                         f"{x2.shape}")  # fmt: skip
    if packed.reads > x2.shape[1]:
        raise ValueError(f"input rows have {x2.shape[1]} columns; the weights read more")
    return x2


def sst_fused(x2, packed: PackedSST, mode, pre_shift, bias, m, n, half, lo, hi, scale, fbias,
              out) -> None:  # fmt: skip
    """The C look-up kernel with the GEMM's epilogue fused (modes 0 requantized, 1 float,
    3 sign bits, 4 int32; see :func:`gemm_fused`), written to the 2-D ``out``; the
    per-channel arrays are padded here to the taps' channel count."""
    _sst_c(_sst_rows(x2, packed), packed, mode, pre_shift, bias, m, n, half, lo, hi, scale,
           fbias, out)  # fmt: skip


def _sst_c(x2, packed, mode, pre_shift, bias, m, n, half, lo, hi, scale, fbias, out) -> None:
    """:func:`sst_fused` on rows already checked by ``_sst_rows``."""
    G, k, Op = packed.c_taps.shape
    isz = out.dtype.itemsize if mode == 0 else 4
    if mode == 0:
        bias, m, n, half = (_padded(v, Op) for v in (bias, m, n, half))
    elif mode in (1, 3):
        scale, fbias = _padded(scale, Op), _padded(fbias, Op)
    f = _cext.lib().sst_taps
    P = x2.shape[0]
    args = (x2, x2.dtype == np.int8, P, x2.shape[1], packed.colmap, G, packed.n, packed.c_taps,
            Op, packed.out_channels, k, mode, pre_shift, bias, m, n, half, lo, hi, isz, scale,
            fbias, out)  # fmt: skip
    _cext.parallel_rows(lambda r0, r1: f(*args, r0, r1), P, get_threads(),
                        est_ns=P * G * k * Op / 32 * 1.0)  # fmt: skip
