/*
 * lowbit runtime: AVX-512 kernels in C (the fast path of lowbit.runtime.kernels).
 *
 * Built by the package's own build (setup.py, an optional extension: a machine without a
 * C compiler still installs lowbit and runs the numba kernels). The functions are plain C
 * called from Python through thin wrappers (lowbit/runtime/_cext.py calls them) that take
 * numpy arrays by the buffer protocol, check every size against the geometry, and release
 * the GIL while the kernel runs (threads split the output rows). Every kernel is compiled for
 * AVX-512 (F, BW, DQ, VL, VPOPCNTDQ, VNNI) with a function-level target attribute, so the
 * rest of the library builds for the baseline ISA; lb_cpu_ok() tells at run time whether
 * this CPU (and its OS) can run them. Elsewhere the numba kernels run (the tested portable
 * fallback; both paths give bit-identical results, see tests/test_cext.py).
 *
 * Compile with -ffp-contract=off: the float epilogues must round exactly as the numpy
 * reference (a multiply, then an add; never a fused multiply-add).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define LB_X86 1
#include <immintrin.h>
#define LB_AVX512 \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx512vnni")))
/* AMX (tile) kernels need GCC 11 / clang 12 and Linux (the tile state must be requested
 * from the kernel with arch_prctl); elsewhere they are not built and the AVX-512 ones run. */
#if defined(__linux__) && ((defined(__clang__) && __clang_major__ >= 12) || \
                           (!defined(__clang__) && __GNUC__ >= 11))
#define LB_HAS_AMX 1
#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define LB_AMX                                                                                \
    __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vpopcntdq,avx512vnni,"   \
                          "amx-tile,amx-int8")))
#endif
#endif
#ifndef LB_HAS_AMX
#define LB_HAS_AMX 0
#endif

/* 1 when the AVX-512 kernels can run here (CPU features and OS support for zmm state). */
static int lb_cpu_ok(void)
{
#ifdef LB_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512vpopcntdq") && __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

/* 1 when the AMX kernels can run here: the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7,
 * EDX bits 24 and 25) and Linux grants this process the tile data state (asked once). */
static int lb_amx_ok(void)
{
#if LB_HAS_AMX
    static int ok = -1;
    if (ok < 0) {
        unsigned a = 0, b = 0, c = 0, d = 0;
        ok = 0;
        if (lb_cpu_ok() && __get_cpuid_count(7, 0, &a, &b, &c, &d) && (d >> 24 & 1) &&
            (d >> 25 & 1))
            ok = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                         18 /* XFEATURE_XTILEDATA */) == 0;
    }
    return ok;
#else
    return 0;
#endif
}


#ifdef LB_X86

/* ------------------------------------------------------------------------------------
 * Binary {-1,+1} x sign convolution: XOR + popcount.
 *
 * xpad  uint64 [N, Hp, Wp, CW]  packed signs, zero words in the padding (bit c%64 of word
 *                               c/64 = 1 for +1)
 * koff  int64  [T*CW]           word offset of each k (tap, word) from a window's origin
 * wb    uint64 [OB, T*CW, 8]    weights in 8-channel blocks, OB a multiple of 4 (zero
 *                               channels above O)
 * wpop  int32  [T, Op]          popcount of each tap's weights (Op = 8*OB)
 * scale, fbias float32 [Op]     epilogue (zero above O)
 *
 * For output pixel p and channel o, cnt = sum_k popcount(x_p[k] ^ w_o[k]) over all taps
 * (a padded tap adds popcount(w_o[tap])); the conv value over the valid taps is
 * acc = nvalid*C - 2*(cnt - sum_{padded taps} wpop[tap][o]). With and01 the weights are
 * {0, 1} bits b (SBNN): cnt = sum_k popcount(x_p[k] & b_o[k]) (padded words add 0) and
 * acc = sum_valid b.x = 2*cnt - (popcount(b_o) - sum_{padded taps} wpop[tap][o]). Modes:
 *   0: out int32 [N, Ho, Wo, O] = acc
 *   1: out float32 [N, Ho, Wo, O] = float(acc) * scale + fbias
 *   2: as 1, NCHW [N, O, Ho, Wo]
 *   3: out uint64 [N, Ho, Wo, ceil(O/64)]: bit o = (float(acc) * scale + fbias > 0)
 * Rows r0 <= r < r1 of the N*Ho output rows are computed (threads split the rows).
 * ------------------------------------------------------------------------------------ */

#define XNV 4 /* 8-channel blocks per tile: 32 output channels */
#define XMR 6 /* output pixels per tile */

/* One tile: mr pixels (x0 + r*ps) x 32 channels (wb0, blocks wvs words apart);
 * cnt[r*cs + 8*v + lane] = int32 popcount sums. */
#define LB_XTILE(MR, NAME, OP)                                                               \
    LB_AVX512 static void NAME##_##MR(const uint64_t *x0, int64_t ps, const int64_t *koff,    \
                                     int64_t nk, const uint64_t *wb0, int64_t wvs,           \
                                     int32_t *cnt, int64_t cs)                               \
    {                                                                                        \
        __m512i acc[MR][XNV];                                                                \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                                         \
            _Pragma("GCC unroll 8") for (int v = 0; v < XNV; v++) acc[r][v] = _mm512_setzero_si512();                \
        for (int64_t k = 0; k < nk; k++) {                                                   \
            const uint64_t *wk = wb0 + 8 * k;                                                \
            __m512i w[XNV];                                                                  \
            _Pragma("GCC unroll 8") for (int v = 0; v < XNV; v++) w[v] = _mm512_loadu_si512((const void *)(wk + v * wvs)); \
            const uint64_t *xk = x0 + koff[k];                                               \
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {                                                   \
                __m512i xv = _mm512_set1_epi64((long long)xk[r * ps]);                      \
                _Pragma("GCC unroll 8") for (int v = 0; v < XNV; v++)                                                \
                    acc[r][v] = _mm512_add_epi64(                                            \
                        acc[r][v], _mm512_popcnt_epi64(OP(xv, w[v])));                        \
            }                                                                                \
        }                                                                                    \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                                         \
            _Pragma("GCC unroll 8") for (int v = 0; v < XNV; v++)                                                    \
                _mm256_storeu_si256((__m256i *)(cnt + r * cs + 8 * v),                       \
                                    _mm512_cvtepi64_epi32(acc[r][v]));                       \
    }

#define LB_XTILES(NAME, OP)                                                                  \
    LB_XTILE(1, NAME, OP)                                                                    \
    LB_XTILE(2, NAME, OP)                                                                    \
    LB_XTILE(3, NAME, OP)                                                                    \
    LB_XTILE(4, NAME, OP) LB_XTILE(5, NAME, OP) LB_XTILE(6, NAME, OP)
LB_XTILES(xtile, _mm512_xor_si512) /* {-1, +1} weights: popcount(x ^ w) */
LB_XTILES(atile, _mm512_and_si512) /* {0, 1} weights: popcount(x & b) */

typedef void (*xtile_fn)(const uint64_t *, int64_t, const int64_t *, int64_t, const uint64_t *,
                         int64_t, int32_t *, int64_t);
static const xtile_fn XTILES[2][XMR + 1] = {
    {0, xtile_1, xtile_2, xtile_3, xtile_4, xtile_5, xtile_6},
    {0, atile_1, atile_2, atile_3, atile_4, atile_5, atile_6}};

LB_AVX512 static inline __mmask16 tail16(int64_t n)
{
    return n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
}

/* In-register transpose of a 16 x 16 float block (r[i][j] -> r[j][i]). */
LB_AVX512 static inline void transpose16(__m512 r[16])
{
    __m512 t[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(t[4 * i]), b = _mm512_castps_pd(t[4 * i + 2]);
        const __m512d c = _mm512_castps_pd(t[4 * i + 1]), d = _mm512_castps_pd(t[4 * i + 3]);
        r[4 * i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, b));
        r[4 * i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, b));
        r[4 * i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(c, d));
        r[4 * i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(c, d));
    }
    for (int i = 0; i < 4; i++) {
        t[i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0x88);
        t[4 + i] = _mm512_shuffle_f32x4(r[i], r[4 + i], 0xdd);
        t[8 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0x88);
        t[12 + i] = _mm512_shuffle_f32x4(r[8 + i], r[12 + i], 0xdd);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0x88);
        r[8 + i] = _mm512_shuffle_f32x4(t[i], t[8 + i], 0xdd);
        r[4 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0x88);
        r[12 + i] = _mm512_shuffle_f32x4(t[4 + i], t[12 + i], 0xdd);
    }
}

/* Store rows src[0..nrows) (row stride ss floats; 16 readable rows) of channels
 * o0..o0+16 (< O) to NCHW: dst(o) = base + o * cs, element j = row j. */
LB_AVX512 static inline void store_nchw16(const float *src, int64_t ss, int64_t nrows,
                                          int64_t o0, int64_t O, float *base, int64_t cs)
{
    __m512 r[16];
    for (int i = 0; i < 16; i++) r[i] = _mm512_loadu_ps(src + i * ss + o0);
    transpose16(r);
    const __mmask16 m = tail16(nrows);
    for (int j = 0; j < 16 && o0 + j < O; j++) _mm512_mask_storeu_ps(base + (o0 + j) * cs, m, r[j]);
}

LB_AVX512 static int lb_xnor_conv(const uint64_t *xpad, const int64_t *koff, const uint64_t *wb,
                                     const int32_t *wpop, const float *scale, const float *fbias,
                                     int64_t N, int64_t Hp, int64_t Wp, int64_t CW, int64_t C,
                                     int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                                     int64_t pw, int64_t dh, int64_t dw, int64_t H, int64_t W,
                                     int64_t Ho, int64_t Wo, int64_t O, int64_t OB, int mode,
                                     int and01, void *out, int64_t r0, int64_t r1)
{
    const int64_t Op = 8 * OB, Kk = kh * kw * CW, wvs = Kk * 8, T = kh * kw;
    const int64_t OW = (O + 63) / 64;
    int32_t *cnt = (int32_t *)malloc((size_t)(Wo * Op + 16) * sizeof(int32_t));
    int32_t *corr = (int32_t *)malloc((size_t)(Op + 16) * sizeof(int32_t));
    int32_t *wtot = (int32_t *)calloc((size_t)(Op + 16), sizeof(int32_t));
    float *rowf = mode == 2 ? (float *)calloc((size_t)((Wo + 16) * Op), sizeof(float)) : NULL;
    if (!cnt || !corr || !wtot || (mode == 2 && !rowf)) {
        free(cnt);
        free(corr);
        free(wtot);
        free(rowf);
        return -1;
    }
    for (int64_t t = 0; t < T; t++) /* popcount of each channel's weights, all taps */
        for (int64_t o = 0; o < Op; o++) wtot[o] += wpop[t * Op + o];
    const xtile_fn *tiles = XTILES[and01 ? 1 : 0];
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t r = r0; r < r1; r++) {
        const int64_t n = r / Ho, ho = r % Ho;
        const uint64_t *row0 = xpad + ((n * Hp + ho * sh) * Wp) * CW;
        for (int64_t wo = 0; wo < Wo;) {
            const int64_t mr = (Wo - wo) >= XMR ? XMR : (Wo - wo);
            const uint64_t *x0 = row0 + wo * sw * CW;
            for (int64_t ob = 0; ob < OB; ob += XNV)
                tiles[mr](x0, sw * CW, koff, Kk, wb + ob * wvs, wvs, cnt + wo * Op + ob * 8, Op);
            wo += mr;
        }
        /* epilogue, 16 channels at a time */
        const int64_t h0 = ho * sh - ph;
        for (int64_t wo = 0; wo < Wo; wo++) {
            const int64_t w0 = wo * sw - pw;
            const int border =
                h0 < 0 || h0 + (kh - 1) * dh >= H || w0 < 0 || w0 + (kw - 1) * dw >= W;
            int64_t nvalid = T;
            if (border) {
                nvalid = 0;
                memset(corr, 0, (size_t)Op * sizeof(int32_t));
                for (int64_t i = 0; i < kh; i++) {
                    const int64_t hi = h0 + i * dh;
                    for (int64_t j = 0; j < kw; j++) {
                        const int64_t wi = w0 + j * dw;
                        if (hi < 0 || hi >= H || wi < 0 || wi >= W) {
                            const int32_t *wt = wpop + (i * kw + j) * Op;
                            for (int64_t o = 0; o < Op; o += 16)
                                _mm512_storeu_si512(
                                    (void *)(corr + o),
                                    _mm512_add_epi32(_mm512_loadu_si512((const void *)(corr + o)),
                                                     _mm512_loadu_si512((const void *)(wt + o))));
                        } else {
                            nvalid++;
                        }
                    }
                }
            }
            const __m512i tot = _mm512_set1_epi32((int)(nvalid * C));
            const int32_t *cp = cnt + wo * Op;
            uint64_t word = 0;
            for (int64_t o = 0; o < Op; o += 16) {
                __m512i c = _mm512_loadu_si512((const void *)(cp + o)), acc;
                if (and01) { /* sum b.x = 2 popcount(x & b) - popcount(b), valid taps */
                    __m512i wt = _mm512_loadu_si512((const void *)(wtot + o));
                    if (border) wt = _mm512_sub_epi32(wt, _mm512_loadu_si512((const void *)(corr + o)));
                    acc = _mm512_sub_epi32(_mm512_slli_epi32(c, 1), wt);
                } else { /* sum w.x = nvalid C - 2 popcount(x ^ w), valid taps */
                    if (border) c = _mm512_sub_epi32(c, _mm512_loadu_si512((const void *)(corr + o)));
                    acc = _mm512_sub_epi32(tot, _mm512_slli_epi32(c, 1));
                }
                if (mode == 0) {
                    if (o < O)
                        _mm512_mask_storeu_epi32(
                            (int32_t *)out + ((r * Wo + wo) * O + o), tail16(O - o), acc);
                    continue;
                }
                const __m512 v =
                    _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_loadu_ps(scale + o)),
                                  _mm512_loadu_ps(fbias + o));
                if (mode == 3) {
                    const uint64_t m = (uint64_t)_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
                    word |= m << (o & 63);
                    if ((o & 63) == 48 || o + 16 >= Op) {
                        if (o / 64 < OW) ((uint64_t *)out)[(r * Wo + wo) * OW + o / 64] = word;
                        word = 0;
                    }
                } else if (mode == 1) {
                    if (o < O)
                        _mm512_mask_storeu_ps((float *)out + ((r * Wo + wo) * O + o), tail16(O - o),
                                              v);
                } else { /* NCHW: through the row buffer, transposed below */
                    _mm512_storeu_ps(rowf + wo * Op + o, v);
                }
            }
        }
        if (mode == 2) /* NCHW: 16 x 16 blocks transposed in registers */
            for (int64_t wo = 0; wo < Wo; wo += 16)
                for (int64_t o = 0; o < O; o += 16)
                    store_nchw16(rowf + wo * Op, Op, Wo - wo, o, O,
                                 (float *)out + (n * O * Ho + ho) * Wo + wo, Ho * Wo);
    }
    free(cnt);
    free(corr);
    free(wtot);
    free(rowf);
    return 0;
}


/* ------------------------------------------------------------------------------------
 * Integer GEMM with the epilogue fused: acc[p, o] = init[o] + sum_k xu[p, k] * w[o, k],
 * xu uint8 [P, Kp] or, interleaved, [Kp/4, P, 4] (Kp % 4 == 0; int8 activations arrive
 * as x ^ 0x80 with the correction in init), w int8 in the VNNI layout wz [Op/8, Kp/4, 8, 4] (Op % 16 == 0). vpdpbusd
 * multiplies 4 unsigned by 4 signed bytes and adds them to an int32 lane. The tiles use
 * 256-bit vectors (6 rows x 32 channels, 24 accumulators): on Zen 4, 512-bit vpdpbusd
 * runs at half the rate of the 256-bit one, and measured 15% slower here.
 * Modes (per row p < P and channel o < O):
 *   0: out_i[p, o] = requant(acc) = clamp(round_half_away(((acc << pre_shift) + bias) * m
 *                    / 2^n), lo, hi), stored with isz bytes (1 signed/unsigned by lo < 0, 2, 4)
 *   1: out_f[p, o] = float(acc) * scale + fbias
 *   2: as 1, stored NCHW: out[p / hw, o, p % hw]
 *   3: the signs of 1 packed: out[p, o / 64] uint64
 *   4: out[p, o] = acc (int32)
 * Rows p0 <= p < p1 (threads split the rows).
 * ------------------------------------------------------------------------------------ */

#define GMR 6  /* rows per tile */
#define GRB 24 /* rows per block (the epilogue's unit) */
#ifndef GNV
#define GNV 4 /* 8-channel blocks per tile */
#endif

#define LB_GTILE(MR, NV)                                                                      \
    LB_AVX512 static void gtile_##MR##_##NV(const uint8_t *x0, int64_t xr, int64_t xk,       \
                                             const int8_t *w0, int64_t wvs, int64_t k4,       \
                                             const int32_t *init, int32_t *acc, int64_t as)   \
    {                                                                                         \
        __m256i a[MR][NV];                                                                    \
        _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++) {                                \
            const __m256i i0 = _mm256_loadu_si256((const __m256i *)(init + 8 * v));           \
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) a[r][v] = i0;                \
        }                                                                                     \
        for (int64_t k = 0; k < k4; k++) {                                                    \
            __m256i w[NV];                                                                    \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                              \
                w[v] = _mm256_loadu_si256((const __m256i *)(w0 + v * wvs + 32 * k));          \
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {                            \
                int32_t xi;                                                                   \
                memcpy(&xi, x0 + r * xr + k * xk, 4);                                         \
                const __m256i xv = _mm256_set1_epi32(xi);                                     \
                _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                          \
                    a[r][v] = _mm256_dpbusd_epi32(a[r][v], xv, w[v]);                         \
            }                                                                                 \
        }                                                                                     \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                  \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                              \
                _mm256_storeu_si256((__m256i *)(acc + r * as + 8 * v), a[r][v]);              \
    }

#define LB_GTILES(MR) LB_GTILE(MR, 1) LB_GTILE(MR, 2) LB_GTILE(MR, 3) LB_GTILE(MR, 4)
LB_GTILES(1)
LB_GTILES(2)
LB_GTILES(3)
LB_GTILES(4)
LB_GTILES(5)
LB_GTILES(6)

typedef void (*gtile_fn)(const uint8_t *, int64_t, int64_t, const int8_t *, int64_t, int64_t,
                         const int32_t *, int32_t *, int64_t);
#define LB_GROW(MR) {gtile_##MR##_1, gtile_##MR##_2, gtile_##MR##_3, gtile_##MR##_4}
static const gtile_fn GTILES[GMR][4] = {LB_GROW(1), LB_GROW(2), LB_GROW(3),
                                        LB_GROW(4), LB_GROW(5), LB_GROW(6)};

/* requantize 16 int32 accumulators (two int64 halves) */
LB_AVX512 static inline __m512i requant16(__m512i a, int pre_shift, const int64_t *bias,
                                          const int64_t *m, const int64_t *n,
                                          const int64_t *half, int64_t lo, int64_t hi)
{
    __m512i res[2];
    for (int h = 0; h < 2; h++) {
        const __m256i a32 = h ? _mm512_extracti64x4_epi64(a, 1) : _mm512_castsi512_si256(a);
        __m512i p = _mm512_slli_epi64(_mm512_cvtepi32_epi64(a32), (unsigned)pre_shift);
        p = _mm512_add_epi64(p, _mm512_loadu_si512((const void *)(bias + 8 * h)));
        p = _mm512_mullo_epi64(p, _mm512_loadu_si512((const void *)(m + 8 * h)));
        __m512i q = _mm512_add_epi64(_mm512_abs_epi64(p),
                                     _mm512_loadu_si512((const void *)(half + 8 * h)));
        q = _mm512_srlv_epi64(q, _mm512_loadu_si512((const void *)(n + 8 * h)));
        const __mmask8 neg = _mm512_cmplt_epi64_mask(p, _mm512_setzero_si512());
        q = _mm512_mask_sub_epi64(q, neg, _mm512_setzero_si512(), q);
        q = _mm512_max_epi64(q, _mm512_set1_epi64(lo));
        q = _mm512_min_epi64(q, _mm512_set1_epi64(hi));
        res[h] = q;
    }
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(res[0])),
                              _mm512_cvtepi64_epi32(res[1]), 1);
}

/* The GEMM epilogue (modes above) of rows pb <= p < pb + nr, whose accumulators are
 * acc[r * as + o]; fb: a float buffer of (nr + 16) * Op for mode 2; ldo: the row stride of
 * out in elements for modes 0, 1, 4 (O, or more when out points into a wider row). */
LB_AVX512 static void gemm_epilogue(const int32_t *acc, int64_t as, int64_t nr, int64_t pb,
                                    int64_t Op, int64_t O, int mode, int pre_shift,
                                    const int64_t *bias, const int64_t *m, const int64_t *n,
                                    const int64_t *half, int64_t lo, int64_t hi, int isz,
                                    const float *scale, const float *fbias, int64_t hw,
                                    void *out, float *fb, int64_t ldo)
{
    const int64_t OW = (O + 63) / 64;
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t r = 0; r < nr; r++) {
        const int64_t p = pb + r;
        const int32_t *ar = acc + r * as;
        uint64_t word = 0;
        for (int64_t o = 0; o < Op; o += 16) {
            const __m512i a = _mm512_loadu_si512((const void *)(ar + o));
            const __mmask16 t = tail16(O - o);
            if (o >= O && mode != 3) break;
            if (mode == 4) {
                _mm512_mask_storeu_epi32((int32_t *)out + p * ldo + o, t, a);
                continue;
            }
            if (mode == 0) {
                const __m512i q = requant16(a, pre_shift, bias + o, m + o, n + o, half + o,
                                            lo, hi);
                if (isz == 1)
                    _mm_mask_storeu_epi8((int8_t *)out + p * ldo + o, t, _mm512_cvtepi32_epi8(q));
                else if (isz == 2)
                    _mm256_mask_storeu_epi16((int16_t *)out + p * ldo + o, t,
                                             _mm512_cvtepi32_epi16(q));
                else
                    _mm512_mask_storeu_epi32((int32_t *)out + p * ldo + o, t, q);
                continue;
            }
            const __m512 v = _mm512_add_ps(
                _mm512_mul_ps(_mm512_cvtepi32_ps(a), _mm512_loadu_ps(scale + o)),
                _mm512_loadu_ps(fbias + o));
            if (mode == 1) {
                _mm512_mask_storeu_ps((float *)out + p * ldo + o, t, v);
            } else if (mode == 2) {
                _mm512_storeu_ps(fb + r * Op + o, v);
            } else {
                const uint64_t bits = (uint64_t)_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ);
                word |= bits << (o & 63);
                if ((o & 63) == 48 || o + 16 >= Op) {
                    if (o / 64 < OW) ((uint64_t *)out)[p * OW + o / 64] = word;
                    word = 0;
                }
            }
        }
    }
    if (mode == 2) { /* runs of rows inside one image, stored along each channel */
        for (int64_t r = 0; r < nr;) { /* 16 x 16 blocks transposed in registers */
            const int64_t p = pb + r, img = p / hw, q0 = p - img * hw;
            const int64_t seg = nr - r < hw - q0 ? nr - r : hw - q0;
            for (int64_t j = 0; j < seg; j += 16)
                for (int64_t o = 0; o < O; o += 16)
                    store_nchw16(fb + (r + j) * Op, Op, seg - j, o, O,
                                 (float *)out + img * O * hw + q0 + j, hw);
            r += seg;
        }
    }
}

/* ------------------------------------------------------------------------------------
 * Mode 2 from an interleaved input ([Kp/4, P, 4], what lb_quant_k4 writes from NCHW): the
 * same sums with the roles of the tile swapped, pixels in the vector lanes and weights
 * broadcast (w[o, 4k..4k+3] is one int32 of the VNNI layout, at ((o / 8) * k4 + k) * 8 +
 * o % 8), so the accumulators come out as [o, p]: each tile of 6 channels x 32 pixels is
 * dequantized and stored straight along the NCHW channel rows, with no transpose (the
 * row-major tiles' NCHW store cost 15% of a 256 x 256 pointwise layer on Zen 4). Pixel
 * blocks stay inside one image; the last vector of a short block is masked (loads and
 * stores). Same integers, same float epilogue (float(acc) * scale + fbias): bit-equal to
 * the row-major path.
 * ------------------------------------------------------------------------------------ */
#define TMR 6 /* channels per tile */
#define TNV 4 /* 8-pixel vectors per tile */

#define LB_TTILE(MR, NV)                                                                      \
    LB_AVX512 static void ttile_##MR##_##NV(const uint8_t *x0, int64_t xk,                   \
                                             const int32_t *const *wr, int64_t k4,            \
                                             int32_t *acc)                                    \
    {                                                                                         \
        __m256i a[MR][NV];                                                                    \
        const int32_t *w[MR];                                                                 \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {                                \
            w[r] = wr[r];                                                                     \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                              \
                a[r][v] = _mm256_setzero_si256();                                             \
        }                                                                                     \
        for (int64_t k = 0; k < k4; k++) {                                                    \
            __m256i x[NV];                                                                    \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                              \
                x[v] = _mm256_load_si256((const __m256i *)(x0 + k * xk + 32 * v));            \
            _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++) {                            \
                const __m256i wv = _mm256_set1_epi32(w[r][8 * k]);                            \
                _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                          \
                    a[r][v] = _mm256_dpbusd_epi32(a[r][v], x[v], wv);                         \
            }                                                                                 \
        }                                                                                     \
        _Pragma("GCC unroll 8") for (int r = 0; r < MR; r++)                                  \
            _Pragma("GCC unroll 8") for (int v = 0; v < NV; v++)                              \
                _mm256_store_si256((__m256i *)(acc + 8 * (TNV * r + v)), a[r][v]);            \
    }

#define LB_TTILES(MR) LB_TTILE(MR, 1) LB_TTILE(MR, 2) LB_TTILE(MR, 3) LB_TTILE(MR, 4)
LB_TTILES(1)
LB_TTILES(2)
LB_TTILES(3)
LB_TTILES(4)
LB_TTILES(5)
LB_TTILES(6)

typedef void (*ttile_fn)(const uint8_t *, int64_t, const int32_t *const *, int64_t, int32_t *);
#define LB_TROW(MR) {ttile_##MR##_1, ttile_##MR##_2, ttile_##MR##_3, ttile_##MR##_4}
static const ttile_fn TTILES[TMR][TNV] = {LB_TROW(1), LB_TROW(2), LB_TROW(3),
                                          LB_TROW(4), LB_TROW(5), LB_TROW(6)};

LB_AVX512 static int lb_gemm_nchw_k4(const uint8_t *xu, const int8_t *wz, const int32_t *init,
                                      int64_t P, int64_t Kp, int64_t O, const float *scale,
                                      const float *fbias, int64_t hw, float *out, int64_t p0,
                                      int64_t p1)
{
    const int64_t k4 = Kp / 4, xk = 32 * TNV;
    const int32_t *w32 = (const int32_t *)wz;
    /* the block's rows copied together (in place, rows 4P bytes apart would fall into a
     * few cache sets), zero past the block's last pixel */
    uint8_t *pan = (uint8_t *)aligned_alloc(64, (size_t)(k4 * xk));
    int32_t acc[TMR * TNV * 8] __attribute__((aligned(64)));
    if (!pan) return -1;
    for (int64_t p = p0; p < p1;) {
        const int64_t img = p / hw, q = p - img * hw;
        int64_t np = p1 - p < hw - q ? p1 - p : hw - q;
        np = np > 8 * TNV ? 8 * TNV : np;
        const int64_t nv = (np + 7) / 8;
        const __mmask8 last = (__mmask8)((1u << (np - 8 * (nv - 1))) - 1u);
        float *ob = out + img * O * hw + q;
        for (int64_t k = 0; k < k4; k++) {
            const uint8_t *src = xu + k * 4 * P + 4 * p;
            for (int64_t v = 0; v < TNV; v++) {
                const int64_t m = np - 8 * v;
                const __mmask8 mv = m >= 8 ? 0xFF : m > 0 ? (__mmask8)((1u << m) - 1u) : 0;
                _mm256_store_si256((__m256i *)(pan + k * xk + 32 * v),
                                   _mm256_maskz_loadu_epi32(mv, src + 32 * v));
            }
        }
        for (int64_t o = 0; o < O; o += TMR) {
            const int64_t mr = O - o < TMR ? O - o : TMR;
            const int32_t *wr[TMR];
            for (int64_t r = 0; r < mr; r++)
                wr[r] = w32 + ((o + r) / 8) * k4 * 8 + (o + r) % 8;
            TTILES[mr - 1][nv - 1](pan, xk, wr, k4, acc);
            for (int64_t r = 0; r < mr; r++) { /* float(acc + init) * scale + fbias */
                const __m256i i0 = _mm256_set1_epi32(init[o + r]);
                const __m256 sc = _mm256_set1_ps(scale[o + r]), fb = _mm256_set1_ps(fbias[o + r]);
                for (int64_t v = 0; v < nv; v++) {
                    const __m256i t = _mm256_add_epi32(
                        _mm256_load_si256((const __m256i *)(acc + 8 * (TNV * r + v))), i0);
                    _mm256_mask_storeu_ps(ob + (o + r) * hw + 8 * v, v < nv - 1 ? 0xFF : last,
                                          _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(t), sc), fb));
                }
            }
        }
        p += np;
    }
    free(pan);
    return 0;
}

LB_AVX512 static int lb_gemm_u8s8(const uint8_t *xu, int interleaved, const int8_t *wz,
                                  const int32_t *init, int64_t P, int64_t Kp, int64_t Op,
                                  int64_t O, int mode,
                                     int pre_shift, const int64_t *bias, const int64_t *m,
                                     const int64_t *n, const int64_t *half, int64_t lo,
                                     int64_t hi, int isz, const float *scale, const float *fbias,
                                     int64_t hw, void *out, int64_t p0, int64_t p1)
{
    const int64_t k4 = Kp / 4, wvs = k4 * 32, OB = Op / 8;
    /* row p's bytes k..k+3 at xu + p * xr + (k / 4) * xk: rows [P, Kp], or interleaved
     * [Kp/4, P, 4] (the layout lb_quant_k4 writes from an NCHW input) */
    const int64_t xr = interleaved ? 4 : Kp, xk = interleaved ? 4 * P : 4;
    if (interleaved && mode == 2) {
        return lb_gemm_nchw_k4(xu, wz, init, P, Kp, O, scale, fbias, hw, (float *)out, p0, p1);
    }
    int32_t *acc = (int32_t *)malloc((size_t)(GRB * Op + 16) * sizeof(int32_t));
    float *fb = mode == 2 ? (float *)calloc((size_t)((GRB + 16) * Op), sizeof(float)) : NULL;
    if (!acc || (mode == 2 && !fb)) {
        free(acc);
        free(fb);
        return -1;
    }
    for (int64_t pb = p0; pb < p1; pb += GRB) {
        const int64_t nr = p1 - pb < GRB ? p1 - pb : GRB;
        for (int64_t ob = 0; ob < OB; ob += GNV) {
            const int64_t nv = OB - ob < GNV ? OB - ob : GNV;
            for (int64_t r = 0; r < nr; r += GMR) {
                const int64_t mr = nr - r < GMR ? nr - r : GMR;
                GTILES[mr - 1][nv - 1](xu + (pb + r) * xr, xr, xk, wz + ob * wvs, wvs, k4,
                                       init + 8 * ob, acc + r * Op + 8 * ob, Op);
            }
        }
        gemm_epilogue(acc, Op, nr, pb, Op, O, mode, pre_shift, bias, m, n, half, lo, hi, isz,
                      scale, fbias, hw, out, fb, O);
    }
    free(acc);
    free(fb);
    return 0;
}


#if LB_HAS_AMX
/* ------------------------------------------------------------------------------------
 * AMX (Intel Sapphire Rapids and later: AMX-TILE, AMX-INT8): the same integer GEMM on
 * the tile unit. tdpbusd multiplies a 16 x 64 uint8 tile by a
 * 64 x 16 int8 tile (stored as 16 rows of 16 x 4 bytes, the "VNNI" layout) into 16 x 16
 * int32 accumulators: 16,384 multiply-adds per instruction, against 64 for a 512-bit
 * vpdpbusd. The sums are the same integers as the AVX-512 kernels', so every epilogue
 * (and every result) is bit-identical (tests/test_cext.py compares the paths).
 * Tiles: 0, 1 inputs (16 rows each), 2, 3 weights (16 channels each), 4..7 accumulators
 * (2 x 2 blocking: 32 rows x 32 channels per pass). The tile configuration is per thread,
 * so every call loads it and releases the tiles at the end.
 * ------------------------------------------------------------------------------------ */
typedef struct {
    uint8_t palette, start;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} lb_tilecfg;

LB_AMX static void amx_begin(void)
{
    lb_tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) {
        c.colsb[i] = 64;
        c.rows[i] = 16;
    }
    _tile_loadconfig(&c);
}

/* rows r < nr of the interleaved input [Kp/4, P, 4] from row pb, as rows of Kq bytes
 * (zero above Kp and below 32 rows): 16 x 16 blocks of 32-bit words transposed */
LB_AMX static void amx_panel_k4(const uint8_t *xu, int64_t P, int64_t Kp, int64_t Kq,
                                int64_t pb, int64_t nr, uint8_t *apan)
{
    const int64_t k4 = Kp / 4;
    const uint32_t *x32 = (const uint32_t *)xu;
    for (int64_t r0 = 0; r0 < 32; r0 += 16) {
        const __mmask16 rm = r0 < nr ? tail16(nr - r0) : 0;
        for (int64_t kk = 0; kk < Kq / 4; kk += 16) {
            __m512 v[16];
            for (int j = 0; j < 16; j++)
                v[j] = kk + j < k4 ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(
                                         rm, x32 + (kk + j) * P + pb + r0))
                                   : _mm512_setzero_ps();
            transpose16(v);
            for (int j = 0; j < 16; j++)
                _mm512_storeu_ps((float *)(apan + (r0 + j) * Kq) + kk, v[j]);
        }
    }
}

/* Mode 2 straight from one accumulator tile: tb [16, 16] int32 (rows: the pixels pb..pb+nv,
 * columns: channels o0..o0+16) -> float (scale, fbias), transposed in registers, each
 * channel's nv pixels stored along its NCHW plane (element by element where the rows cross
 * an image boundary). */
LB_AVX512 static void amx_tile_nchw(const int32_t *tb, int64_t pb, int64_t nv, int64_t o0,
                                    int64_t O, const float *scale, const float *fbias,
                                    int64_t hw, float *out)
{
    const __m512 sc = _mm512_loadu_ps(scale + o0), fbv = _mm512_loadu_ps(fbias + o0);
    float v[256] __attribute__((aligned(64)));
    for (int i = 0; i < 16; i++)
        _mm512_store_ps(v + 16 * i, _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(
                                        _mm512_load_si512((const void *)(tb + 16 * i))), sc),
                                                  fbv));
    const int64_t img = pb / hw, q0 = pb - img * hw, nc = O - o0 < 16 ? O - o0 : 16;
    if (q0 + nv <= hw) {
        store_nchw16(v, 16, nv, 0, nc, out + (img * O + o0) * hw + q0, hw);
        return;
    }
    for (int64_t i = 0; i < nv; i++) {
        const int64_t p = pb + i, im = p / hw, q = p - im * hw;
        for (int64_t j = 0; j < nc; j++) out[(im * O + o0 + j) * hw + q] = v[16 * i + j];
    }
}

/* The epilogue of one accumulator tile tb [16, 16] (rows pb..pb+nv, channels o0..o0+16)
 * in modes 0, 1, 2, 4. */
LB_AVX512 static void amx_tile_out(const int32_t *tb, int64_t pb, int64_t nv, int64_t o0,
                                   int64_t O, int mode, int pre_shift, const int64_t *bias,
                                   const int64_t *m, const int64_t *n, const int64_t *half,
                                   int64_t lo, int64_t hi, int isz, const float *scale,
                                   const float *fbias, int64_t hw, void *out)
{
    if (mode == 2) {
        amx_tile_nchw(tb, pb, nv, o0, O, scale, fbias, hw, (float *)out);
        return;
    }
    const int64_t esz = mode == 0 ? isz : 4, nc = O - o0 < 16 ? O - o0 : 16;
    gemm_epilogue(tb, 16, nv, pb, 16, nc, mode, pre_shift, bias + o0, m + o0, n + o0, half + o0,
                  lo, hi, isz, scale + o0, fbias + o0, hw, (char *)out + o0 * esz, NULL, O);
}

/* The AMX GEMM: as lb_gemm_u8s8, with the weights wa [Oq/16, Kq/4, 16, 4] int8 (Kq = Kp
 * rounded up to 64, Oq = Op rounded up to 32, zeros above) */
LB_AMX static int lb_gemm_amx(const uint8_t *xu, int interleaved, const int8_t *wa,
                              const int32_t *init, int64_t P, int64_t Kp, int64_t Op, int64_t O,
                              int mode, int pre_shift, const int64_t *bias, const int64_t *m,
                              const int64_t *n, const int64_t *half, int64_t lo, int64_t hi,
                              int isz, const float *scale, const float *fbias, int64_t hw,
                              void *out, int64_t p0, int64_t p1)
{
    const int64_t Kq = (Kp + 63) / 64 * 64, Oq = (Op + 31) / 32 * 32, kq4 = Kq / 4;
    /* the epilogue runs on each tile (tb) while it is in L1, but sign packing (mode 3)
     * needs 64 channels a word: that mode stores the 32-row block to acc first */
    int32_t *acc = mode == 3 ? (int32_t *)malloc((size_t)(32 * Oq) * sizeof(int32_t)) : NULL;
    int32_t *ini = (int32_t *)calloc((size_t)(16 * Oq), sizeof(int32_t));
    uint8_t *apan = (uint8_t *)calloc((size_t)(32 * Kq), 1);
    int32_t tb[256] __attribute__((aligned(64)));
    if ((mode == 3 && !acc) || !ini || !apan) {
        free(acc);
        free(ini);
        free(apan);
        return -1;
    }
    for (int64_t r = 0; r < 16; r++) memcpy(ini + r * Oq, init, (size_t)Op * sizeof(int32_t));
    amx_begin();
    for (int64_t pb = p0; pb < p1; pb += 32) {
        const int64_t nr = p1 - pb < 32 ? p1 - pb : 32;
        if (interleaved) {
            amx_panel_k4(xu, P, Kp, Kq, pb, nr, apan);
        } else {
            for (int64_t r = 0; r < 32; r++) {
                if (r < nr) memcpy(apan + r * Kq, xu + (pb + r) * Kp, (size_t)Kp);
                else memset(apan + r * Kq, 0, (size_t)Kp);
            }
        }
        const int two = nr > 16;
        for (int64_t ob = 0; ob < Oq; ob += 32) {
            const int8_t *w0 = wa + (ob / 16) * kq4 * 64, *w1 = w0 + kq4 * 64;
            _tile_loadd(4, ini + ob, Oq * 4);
            _tile_loadd(5, ini + ob + 16, Oq * 4);
            if (two) {
                _tile_loadd(6, ini + ob, Oq * 4);
                _tile_loadd(7, ini + ob + 16, Oq * 4);
            }
            for (int64_t kb = 0; kb < Kq; kb += 64) {
                _tile_loadd(0, apan + kb, Kq);
                _tile_loadd(2, w0 + kb * 16, 64);
                _tile_loadd(3, w1 + kb * 16, 64);
                _tile_dpbusd(4, 0, 2);
                _tile_dpbusd(5, 0, 3);
                if (two) {
                    _tile_loadd(1, apan + 16 * Kq + kb, Kq);
                    _tile_dpbusd(6, 1, 2);
                    _tile_dpbusd(7, 1, 3);
                }
            }
            if (mode == 3) {
                _tile_stored(4, acc + ob, Oq * 4);
                _tile_stored(5, acc + ob + 16, Oq * 4);
                if (two) {
                    _tile_stored(6, acc + 16 * Oq + ob, Oq * 4);
                    _tile_stored(7, acc + 16 * Oq + ob + 16, Oq * 4);
                }
            } else {
                const int64_t n0 = nr < 16 ? nr : 16, n1 = nr - 16;
#define LB_TILE_OUT(T, ROW, COL, NV)                                                        \
    _tile_stored(T, tb, 64);                                                                \
    if (ob + (COL) < O)                                                                     \
        amx_tile_out(tb, pb + (ROW), NV, ob + (COL), O, mode, pre_shift, bias, m, n, half, lo, \
                     hi, isz, scale, fbias, hw, out);
                LB_TILE_OUT(4, 0, 0, n0)
                LB_TILE_OUT(5, 0, 16, n0)
                if (two) {
                    LB_TILE_OUT(6, 16, 0, n1)
                    LB_TILE_OUT(7, 16, 16, n1)
                }
#undef LB_TILE_OUT
            }
        }
        if (mode == 3)
            gemm_epilogue(acc, Oq, nr, pb, Op, O, mode, pre_shift, bias, m, n, half, lo, hi, isz,
                          scale, fbias, hw, out, NULL, O);
    }
    _tile_release();
    free(acc);
    free(ini);
    free(apan);
    return 0;
}

/* ------------------------------------------------------------------------------------
 * The binary conv on the tile unit: the same sums as lb_xnor_conv (its arguments, with the
 * weights wa in the layout of amx_weights: [Oq/16, T*CW*64/4, 16, 4] int8, channel k =
 * (tap, word, bit), values -1/+1, or 0/1 for {0, 1} weights, zero above C and O), as int8
 * dot products: each packed input word unpacks to 64 bytes of +1/-1 (0 in the padding), and
 * tdpbssd multiplies 16 pixels x 64 channels by 64 channels x 16 outputs. Exact: |acc| <=
 * T*C. Why: a 512-bit XOR + popcount + add does 512 binary MACs in about 1.5 cycles on two
 * ports; one tdpbssd does 16,384 MACs in 16 cycles, so even at +-1 in a byte the tile unit
 * has 3x the throughput. The input rows a thread needs are unpacked once per call into buf
 * (rows of Wb >= Wp pixels, so that 16-row tiles of a short last block stay inside it; their
 * extra rows are never stored). For each output row: 32 pixels x 32 channels per pass, the
 * A tile of tap (i, j) and word cw read in place (row stride sw * 64 * CW bytes), then the
 * row's accumulators go through gemm_epilogue (modes: 0 int32, 1 float NHWC, 2 float NCHW,
 * 3 packed signs, as lb_xnor_conv).
 * ------------------------------------------------------------------------------------ */
/* A per-thread scratch buffer that only grows (kept for the thread's life, so that repeated
 * calls do not pay for fresh pages each time: glibc maps allocations over 128 kB anew). */
static __thread char *lb_tls_buf;
static __thread size_t lb_tls_n;
static void *lb_scratch(size_t n)
{
    if (n > lb_tls_n) {
        free(lb_tls_buf);
        lb_tls_buf = (char *)malloc(n);
        lb_tls_n = lb_tls_buf ? n : 0;
    }
    return lb_tls_buf;
}

#define LB_BGROUP_BYTES (192 * 1024) /* accumulators of one group of output rows */

LB_AMX static int lb_bconv_amx(const uint64_t *xpad, const int8_t *wa, const float *scale,
                               const float *fbias, int64_t N, int64_t Hp, int64_t Wp, int64_t CW,
                               int64_t kh, int64_t kw, int64_t sh, int64_t sw, int64_t ph,
                               int64_t pw, int64_t dh, int64_t dw, int64_t H, int64_t W,
                               int64_t Ho, int64_t Wo, int64_t O, int mode, void *out,
                               int64_t r0, int64_t r1)
{
    const int64_t Cq = 64 * CW, KC = kh * kw * CW, Oq = (O + 31) / 32 * 32;
    const int64_t Op = (O + 15) / 16 * 16, Wv = (Wo + 15) / 16 * 16;
    const int64_t Wneed = (Wv - 1) * sw + (kw - 1) * dw + 1, Wb = Wneed > Wp ? Wneed : Wp;
    /* output rows per group: their accumulators stay within LB_BGROUP_BYTES */
    int64_t G = LB_BGROUP_BYTES / (Wv * Oq * 4);
    G = G < 1 ? 1 : G > Ho ? Ho : G;
    const int64_t rows_in = (G - 1) * sh + (kh - 1) * dh + 1;
    const int gmode = mode == 0 ? 4 : mode;
    (void)N;
    const size_t nbuf = (size_t)(rows_in * Wb * Cq + 64 + 63) / 64 * 64;
    const size_t nacc = (size_t)(G * Wv * Oq) * 4;
    const size_t nfb = mode == 2 ? (size_t)((Wv + 16) * Op) * 4 : 0;
    char *scr = (char *)lb_scratch(nbuf + nacc + nfb + 64);
    if (!scr) return -1;
    scr = (char *)(((uintptr_t)scr + 63) & ~(uintptr_t)63);
    int8_t *buf = (int8_t *)scr;
    int32_t *acc = (int32_t *)(scr + nbuf);
    float *fb = mode == 2 ? (float *)(scr + nbuf + nacc) : NULL;
    const __m512i plus = _mm512_set1_epi8(1), minus = _mm512_set1_epi8(-1);
    const int64_t as = sw * Cq; /* bytes from one output pixel's window to the next */
    amx_begin();
    for (int64_t r = r0; r < r1;) {
        const int64_t n = r / Ho, ha = r % Ho;
        int64_t hb = ha + (r1 - r) < Ho ? ha + (r1 - r) : Ho;
        hb = hb - ha > G ? ha + G : hb;
        const int64_t hs = ha * sh, he = (hb - 1) * sh + (kh - 1) * dh + 1;
        for (int64_t hp = hs; hp < he; hp++) { /* unpack: +1 / -1 per bit, 0 in the padding */
            int8_t *dst = buf + (hp - hs) * Wb * Cq;
            const int row_in = hp >= ph && hp < ph + H;
            const uint64_t *src = xpad + (n * Hp + hp) * Wp * CW;
            for (int64_t wp = 0; wp < Wb; wp++) {
                const int in = row_in && wp >= pw && wp < pw + W;
                for (int64_t c = 0; c < CW; c++)
                    _mm512_storeu_si512((void *)(dst + wp * Cq + 64 * c),
                                        in ? _mm512_mask_blend_epi8(src[wp * CW + c], minus, plus)
                                           : _mm512_setzero_si512());
            }
        }
        /* 32 channels (their weights, 2 KB per k-step, stay in L1) over every row of the
         * group, two blocks of 16 pixels per pass (the next block may start the next output
         * row: four independent accumulators even for rows of 16 pixels or fewer) */
        const int64_t nwb = Wv / 16, nb = (hb - ha) * nwb;
        for (int64_t ob = 0; ob < Oq; ob += 32) {
            const int8_t *w0 = wa + (ob / 16) * KC * 1024, *w1 = w0 + KC * 1024;
            for (int64_t bk = 0; bk < nb; bk += 2) {
                const int two = bk + 1 < nb;
                const int64_t ho0 = ha + bk / nwb, wa0 = 16 * (bk % nwb);
                const int64_t ho1 = ha + (bk + 1) / nwb, wa1 = 16 * ((bk + 1) % nwb);
                _tile_zero(4);
                _tile_zero(5);
                if (two) {
                    _tile_zero(6);
                    _tile_zero(7);
                }
                for (int64_t i = 0; i < kh; i++)
                    for (int64_t j = 0; j < kw; j++) {
                        const int8_t *a0 =
                            buf + ((ho0 * sh - hs + i * dh) * Wb + wa0 * sw + j * dw) * Cq;
                        const int8_t *a1 =
                            buf + ((ho1 * sh - hs + i * dh) * Wb + wa1 * sw + j * dw) * Cq;
                        const int64_t kc0 = (i * kw + j) * CW;
                        for (int64_t c = 0; c < CW; c++) {
                            _tile_loadd(0, a0 + 64 * c, as);
                            _tile_loadd(2, w0 + (kc0 + c) * 1024, 64);
                            _tile_loadd(3, w1 + (kc0 + c) * 1024, 64);
                            _tile_dpbssd(4, 0, 2);
                            _tile_dpbssd(5, 0, 3);
                            if (two) {
                                _tile_loadd(1, a1 + 64 * c, as);
                                _tile_dpbssd(6, 1, 2);
                                _tile_dpbssd(7, 1, 3);
                            }
                        }
                    }
                int32_t *c0 = acc + ((ho0 - ha) * Wv + wa0) * Oq + ob;
                _tile_stored(4, c0, Oq * 4);
                _tile_stored(5, c0 + 16, Oq * 4);
                if (two) {
                    int32_t *c1 = acc + ((ho1 - ha) * Wv + wa1) * Oq + ob;
                    _tile_stored(6, c1, Oq * 4);
                    _tile_stored(7, c1 + 16, Oq * 4);
                }
            }
        }
        for (int64_t ho = ha; ho < hb; ho++)
            gemm_epilogue(acc + (ho - ha) * Wv * Oq, Oq, Wo, (n * Ho + ho) * Wo, Op, O, gmode, 0,
                          NULL, NULL, NULL, NULL, 0, 0, 4, scale, fbias, Ho * Wo, out, fb, O);
        r += hb - ha;
    }
    _tile_release();
    return 0;
}
#endif /* LB_HAS_AMX */


/* ------------------------------------------------------------------------------------
 * Input quantization of an NCHW float32 tensor for the GEMM, without a transpose:
 * q = clip(rint(x / s), lo, hi) + shift (uint8), for the pixels of a pointwise conv with
 * stride (sh, sw), written interleaved: out[k / 4, p, k % 4] for GEMM row p = (n, ho, wo)
 * and channel k < Kp (channels >= C are 0). Rows r0 <= r < r1 of the N*Ho rows.
 * shift is 0 (lo >= 0, hi <= 255) or 128 (-128 <= lo, hi <= 127).
 *
 * No division: rint(x * (1/s)) equals rint(x / s) (the float32 quotient, as the reference
 * rounds it) unless x * (1/s) lies within a few ulps of a half-integer: the product differs
 * from the quotient by under 3 ulps, i.e. under 2^-13 for |x/s| < 512, and beyond 512 both
 * clip to the same bound. A vector with any lane whose fraction is within 2^-12 of 1/2
 * (vreduceps: y - rint(y)) takes the division (rare; vdivps is ~10x a product).
 * Four channels of 16 pixels are narrowed together: two vpackssdw and one byte pack give,
 * per 128-bit lane, 4 pixels x 4 channels channel-major, and one vpshufb interleaves them.
 * ------------------------------------------------------------------------------------ */
LB_AVX512 static void lb_quant_k4(const float *x, float s, float lo, float hi, int shift,
                                  int64_t N, int64_t C, int64_t H, int64_t W, int64_t sh,
                                  int64_t sw, int64_t Kp, uint8_t *out, int64_t r0, int64_t r1)
{
    const int64_t Ho = (H - 1) / sh + 1, Wo = (W - 1) / sw + 1, P = N * Ho * Wo;
    const __m512 vs = _mm512_set1_ps(s), vlo = _mm512_set1_ps(lo), vhi = _mm512_set1_ps(hi);
    const __m512 vr = _mm512_set1_ps(1.0f / s), vnear = _mm512_set1_ps(0.5f - 0x1p-12f);
    const __m512 absm = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const __m512i vpad = _mm512_set1_epi32(-shift), v80 = _mm512_set1_epi8((char)0x80);
    const __m512i shuf = _mm512_broadcast_i32x4(
        _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15));
    const __m512i gidx = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)sw));
    (void)N;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t n = r / Ho, ho = r % Ho;
        for (int64_t k4 = 0; k4 < Kp / 4; k4++) {
            uint8_t *dst = out + (k4 * P + r * Wo) * 4;
            for (int64_t wo = 0; wo < Wo; wo += 16) {
                const __mmask16 m = tail16(Wo - wo);
                __m512i q[4];
                for (int j = 0; j < 4; j++) {
                    const int64_t c = 4 * k4 + j;
                    if (c >= C) { /* a zero byte once shifted */
                        q[j] = vpad;
                        continue;
                    }
                    const float *src = x + ((n * C + c) * H + ho * sh) * W + wo * sw;
                    const __m512 v = sw == 1 ? _mm512_maskz_loadu_ps(m, src)
                                             : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m,
                                                                        gidx, src, 4);
                    __m512 y = _mm512_mul_ps(v, vr);
                    const __m512 frac = _mm512_and_ps(
                        _mm512_reduce_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC), absm);
                    if (_mm512_mask_cmp_ps_mask(m, frac, vnear, _CMP_GE_OQ)) y = _mm512_div_ps(v, vs);
                    /* clip before rounding (lo, hi integers): NaN -> lo, +-inf -> hi, lo */
                    q[j] = _mm512_cvt_roundps_epi32(_mm512_min_ps(_mm512_max_ps(y, vlo), vhi),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                }
                const __m512i ab = _mm512_packs_epi32(q[0], q[1]), cd = _mm512_packs_epi32(q[2], q[3]);
                __m512i b8 = shift ? _mm512_xor_si512(_mm512_packs_epi16(ab, cd), v80)
                                   : _mm512_packus_epi16(ab, cd);
                _mm512_mask_storeu_epi32(dst + 4 * wo, m, _mm512_shuffle_epi8(b8, shuf));
            }
        }
    }
}


/* ------------------------------------------------------------------------------------
 * Sign packing of float32 activations: bit c % 64 of word c / 64 = (x > 0) (NaN -> 0).
 * Rows: x [R, C] -> out [R, ceil(C/64)], rows r0..r1. NCHW: x [N, C, H, W] ->
 * out [N, H, W, ceil(C/64)], images r0..r1: 16 pixels of a channel compare to one 16-bit
 * mask; per pixel, vptestmw on 32 such masks gives 32 channel bits at once.
 * ------------------------------------------------------------------------------------ */
LB_AVX512 static void lb_sign_rows(const float *x, int64_t C, uint64_t *out, int64_t r0,
                                   int64_t r1)
{
    const int64_t CW = (C + 63) / 64;
    const __m512 zero = _mm512_setzero_ps();
    for (int64_t r = r0; r < r1; r++) {
        const float *xr = x + r * C;
        for (int64_t g = 0; g < CW; g++) {
            uint64_t word = 0;
            for (int64_t j = 0; j < 64 && 64 * g + j < C; j += 16) {
                const int64_t c = 64 * g + j;
                const __m512 v = _mm512_maskz_loadu_ps(tail16(C - c), xr + c);
                word |= (uint64_t)_mm512_cmp_ps_mask(v, zero, _CMP_GT_OQ) << j;
            }
            out[r * CW + g] = word;
        }
    }
}

LB_AVX512 static int lb_sign_nchw(const float *x, int64_t C, int64_t HW, uint64_t *out,
                                  int64_t n0, int64_t n1)
{
    const int64_t CW = (C + 63) / 64, Cp = 64 * CW, PB = (HW + 15) / 16;
    const __m512 zero = _mm512_setzero_ps();
    /* m[pb][c]: the mask of 16 pixels (block pb of the flattened H x W plane) of channel c;
     * each channel plane is read front to back, as it lies in memory */
    uint16_t *m = (uint16_t *)calloc((size_t)(PB * Cp), sizeof(uint16_t));
    if (!m) return -1;
    for (int64_t n = n0; n < n1; n++) {
        for (int64_t c = 0; c < C; c++) {
            const float *xc = x + (n * C + c) * HW;
            for (int64_t pb = 0; pb < PB; pb++)
                m[pb * Cp + c] = (uint16_t)_mm512_cmp_ps_mask(
                    _mm512_maskz_loadu_ps(tail16(HW - 16 * pb), xc + 16 * pb), zero, _CMP_GT_OQ);
        }
        for (int64_t pb = 0; pb < PB; pb++) {
            const int64_t np = HW - 16 * pb < 16 ? HW - 16 * pb : 16;
            for (int64_t g = 0; g < CW; g++) {
                const __m512i lo = _mm512_loadu_si512((const void *)(m + pb * Cp + 64 * g));
                const __m512i hi = _mm512_loadu_si512((const void *)(m + pb * Cp + 64 * g + 32));
                uint64_t *dst = out + (n * HW + 16 * pb) * CW + g;
                for (int64_t p = 0; p < np; p++) {
                    const __m512i bit = _mm512_set1_epi16((short)(1u << p));
                    dst[p * CW] = (uint64_t)_mm512_test_epi16_mask(lo, bit) |
                                  ((uint64_t)_mm512_test_epi16_mask(hi, bit) << 32);
                }
            }
        }
    }
    free(m);
    return 0;
}

/* ------------------------------------------------------------------------------------
 * SST, one input row at a time (small batches), multiplication-free: for each group g of
 * n <= 15 inputs a 32-entry int16 table in one register holds the group's values (lanes
 * 0..n-1, lane 15 zero) and their negatives (lanes 16..31); each of an output channel's k
 * taps is one 5-bit code into it (position, +16 when negative; an unused tap points at a
 * zero lane), and 32 channels look their taps up at once with vpermw. Sums run in int16
 * for at most 128 taps (|sum| <= 128 * 255 < 2^15) and are then widened into int32.
 * taps is uint8 [G][k][Op] (Op = O rounded up to 64; built from the codebook indices at
 * load time), channels i and 32 + i of each block of 64 in bytes 2i and 2i + 1: one 64-byte
 * load read as 32 words serves both, the low bytes directly and the high ones after a
 * 16-bit shift (vpermw reads only the low 5 bits of each word, so no code reads outside
 * the table, and this costs one shift where zero-extending bytes cost a second load and
 * a cross-lane widening). The tables are gathered from a copy of the row (colmap -> a zero past its end
 * for unused lanes), and each row's int32 sums go through gemm_epilogue (modes 0, 1, 3,
 * 4 of the GEMM: requantized, float, sign bits, int32).
 * ------------------------------------------------------------------------------------ */
#define LB_SST_PAIR(lo16, hi16, i)                                                            \
    do {                                                                                      \
        const __m512i c_ = _mm512_loadu_si512((const void *)(tp + 64 * (i)));                 \
        lo16 = _mm512_add_epi16(lo16, _mm512_permutexvar_epi16(c_, tb));                      \
        hi16 = _mm512_add_epi16(hi16, _mm512_permutexvar_epi16(_mm512_srli_epi16(c_, 8), tb)); \
    } while (0)
#define LB_SST_WIDEN(a16, lo32, hi32)                                                         \
    do {                                                                                      \
        lo32 = _mm512_add_epi32(lo32, _mm512_cvtepi16_epi32(_mm512_castsi512_si256(a16)));    \
        hi32 = _mm512_add_epi32(hi32, _mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(a16, 1))); \
        a16 = _mm512_setzero_si512();                                                         \
    } while (0)

/* Channels o0 .. o0 + 64 * np (np = 1 or 2) of one row: 2 * np int16 accumulators, each
 * widened into int32 after at most 128 taps, stored to acc + o0. */
LB_AVX512 static inline __attribute__((always_inline)) void
sst_block(const int16_t *tab, const uint8_t *taps, int64_t G, int64_t k, int64_t Op, int64_t o0,
          const int np, int32_t *acc)
{
    const int64_t chunk = 128 / k; /* groups summed in int16 before widening */
    const __m512i z = _mm512_setzero_si512();
    __m512i s[4] = {z, z, z, z}, lo[4] = {z, z, z, z}, hi[4] = {z, z, z, z};
    for (int64_t g0 = 0; g0 < G; g0 += chunk) {
        const int64_t g1 = g0 + chunk < G ? g0 + chunk : G;
        for (int64_t g = g0; g < g1; g++) {
            const __m512i tb = _mm512_load_si512((const void *)(tab + g * 32));
            for (int64_t t = 0; t < k; t++) {
                const uint8_t *tp = taps + (g * k + t) * Op + o0;
                for (int i = 0; i < np; i++) LB_SST_PAIR(s[2 * i], s[2 * i + 1], i);
            }
        }
        for (int i = 0; i < 2 * np; i++) LB_SST_WIDEN(s[i], lo[i], hi[i]);
    }
    for (int i = 0; i < 2 * np; i++) {
        _mm512_store_si512((void *)(acc + o0 + 32 * i), lo[i]);
        _mm512_store_si512((void *)(acc + o0 + 32 * i + 16), hi[i]);
    }
}

LB_AVX512 static int lb_sst_taps(const void *x, int is_signed, int64_t F, const int64_t *colmap,
                                 int64_t G, int64_t n, const uint8_t *taps, int64_t Op,
                                 int64_t O, int64_t k, int mode, int pre_shift,
                                 const int64_t *bias, const int64_t *m, const int64_t *nn,
                                 const int64_t *half, int64_t lo, int64_t hi, int isz,
                                 const float *scale, const float *fbias, void *out, int64_t r0,
                                 int64_t r1)
{
    int16_t *tab = (int16_t *)aligned_alloc(64, (size_t)G * 64);
    int32_t *acc = (int32_t *)aligned_alloc(64, (size_t)Op * 4);
    int32_t *gi = (int32_t *)aligned_alloc(64, (size_t)G * 64);
    uint8_t *xb = (uint8_t *)calloc((size_t)F + 64, 1); /* the row, then zeros */
    if (!tab || !acc || !gi || !xb) {
        free(tab);
        free(acc);
        free(gi);
        free(xb);
        return -1;
    }
    /* the table's 16 lanes gather from the row; unused lanes read the zero at xb[F] */
    for (int64_t g = 0; g < G; g++)
        for (int64_t j = 0; j < 16; j++) {
            const int64_t c = j < n ? colmap[g * n + j] : -1;
            gi[g * 16 + j] = (int32_t)(c < 0 ? F : c);
        }
    const __m512i lowbyte = _mm512_set1_epi32(0xFF);
    const __m256i z256 = _mm256_setzero_si256();
    for (int64_t r = r0; r < r1; r++) {
        memcpy(xb, (const uint8_t *)x + r * F, (size_t)F);
        for (int64_t g = 0; g < G; g++) { /* 4 bytes gathered per lane, the low one kept */
            __m512i v = _mm512_i32gather_epi32(_mm512_load_si512((const void *)(gi + g * 16)),
                                               (const void *)xb, 1);
            v = is_signed ? _mm512_srai_epi32(_mm512_slli_epi32(v, 24), 24)
                          : _mm512_and_si512(v, lowbyte);
            const __m256i h = _mm512_cvtepi32_epi16(v);
            _mm512_store_si512((void *)(tab + g * 32),
                               _mm512_inserti64x4(_mm512_castsi256_si512(h),
                                                  _mm256_sub_epi16(z256, h), 1));
        }
        int64_t o0 = 0;
        for (; o0 + 128 <= Op; o0 += 128) sst_block(tab, taps, G, k, Op, o0, 2, acc);
        for (; o0 < Op; o0 += 64) sst_block(tab, taps, G, k, Op, o0, 1, acc);
        gemm_epilogue(acc, Op, 1, r, Op, O, mode, pre_shift, bias, m, nn, half, lo, hi, isz,
                      scale, fbias, 1, out, NULL, O);
    }
    free(tab);
    free(acc);
    free(gi);
    free(xb);
    return 0;
}
#undef LB_SST_PAIR
#undef LB_SST_WIDEN

#endif /* LB_X86 */

/* ------------------------------------------------------------------------------------
 * The Python module: cpu_ok(), xnor_conv(...), gemm_u8s8(...), quant_k4(...), sign_pack(...),
 * sst_taps(...). Arrays arrive as C-contiguous
 * buffers; every size is checked before the kernel runs (a ValueError, never a wild read).
 * ------------------------------------------------------------------------------------ */

static PyObject *py_cpu_ok(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(lb_cpu_ok());
}

static PyObject *py_amx_ok(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyBool_FromLong(lb_amx_ok());
}

#ifdef LB_X86
static int need(const Py_buffer *b, int64_t bytes, const char *what)
{
    if (bytes < 0 || b->len < bytes) {
        PyErr_Format(PyExc_ValueError, "_lbk: %s has %zd bytes, needs %lld", what, b->len,
                     (long long)bytes);
        return 0;
    }
    return 1;
}

static void release(Py_buffer *b, int n)
{
    for (int i = 0; i < n; i++) PyBuffer_Release(&b[i]);
}

static PyObject *py_xnor_conv(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer b[7];
    long long N, Hp, Wp, CW, C, kh, kw, sh, sw, ph, pw, dh, dw, H, W, Ho, Wo, O, OB, r0, r1;
    int mode, and01;
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "y*y*y*y*y*y*LLLLLLLLLLLLLLLLLLLipw*LL", &b[0], &b[1], &b[2],
                          &b[3], &b[4], &b[5], &N, &Hp, &Wp, &CW, &C, &kh, &kw, &sh, &sw, &ph,
                          &pw, &dh, &dw, &H, &W, &Ho, &Wo, &O, &OB, &mode, &and01, &b[6], &r0,
                          &r1))
        return NULL;
    const int64_t T = kh * kw, Op = 8 * OB, OW = (O + 63) / 64;
    int ok = N >= 0 && CW >= 1 && kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && dh >= 1 &&
             dw >= 1 && Ho >= 1 && Wo >= 1 && O >= 1 && OB % 4 == 0 && Op >= O &&
             mode >= 0 && mode <= 3 && 0 <= r0 && r0 <= r1 && r1 <= N * Ho && C <= 64 * CW &&
             (Ho - 1) * sh + (kh - 1) * dh < Hp && (Wo - 1) * sw + (kw - 1) * dw < Wp;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "_lbk.xnor_conv: inconsistent geometry");
        release(b, 7);
        return NULL;
    }
    const int64_t outn = mode == 3 ? N * Ho * Wo * OW * 8 : N * Ho * Wo * O * 4;
    if (!need(&b[0], N * Hp * Wp * CW * 8, "xpad") || !need(&b[1], T * CW * 8, "koff") ||
        !need(&b[2], OB * T * CW * 64, "wb") || !need(&b[3], T * Op * 4, "wpop") ||
        (mode && (!need(&b[4], Op * 4, "scale") || !need(&b[5], Op * 4, "fbias"))) ||
        !need(&b[6], outn, "out")) {
        release(b, 7);
        return NULL;
    }
    const int64_t *koff = (const int64_t *)b[1].buf;
    for (int64_t k = 0; k < T * CW; k++) /* every word a window reads lies in its image */
        if (koff[k] < 0 || koff[k] + ((Ho - 1) * sh * Wp + (Wo - 1) * sw) * CW >= Hp * Wp * CW) {
            PyErr_SetString(PyExc_ValueError, "_lbk.xnor_conv: koff out of range");
            release(b, 7);
            return NULL;
        }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = lb_xnor_conv(b[0].buf, koff, b[2].buf, b[3].buf, b[4].buf, b[5].buf, N, Hp, Wp, CW, C,
                      kh, kw, sh, sw, ph, pw, dh, dw, H, W, Ho, Wo, O, OB, mode, and01,
                      b[6].buf, r0, r1);
    Py_END_ALLOW_THREADS
    release(b, 7);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

#if LB_HAS_AMX
/* bconv_amx: xnor_conv's arguments with wa (the AMX weights) in place of koff, wb, wpop */
static PyObject *py_bconv_amx(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer b[5];
    long long N, Hp, Wp, CW, C, kh, kw, sh, sw, ph, pw, dh, dw, H, W, Ho, Wo, O, r0, r1;
    int mode;
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "y*y*y*y*LLLLLLLLLLLLLLLLLLiw*LL", &b[0], &b[1], &b[2], &b[3],
                          &N, &Hp, &Wp, &CW, &C, &kh, &kw, &sh, &sw, &ph, &pw, &dh, &dw, &H, &W,
                          &Ho, &Wo, &O, &mode, &b[4], &r0, &r1))
        return NULL;
    const int64_t KC = kh * kw * CW, Oq = (O + 31) / 32 * 32, OW = (O + 63) / 64;
    int ok = N >= 0 && CW >= 1 && kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && dh >= 1 &&
             dw >= 1 && Ho >= 1 && Wo >= 1 && O >= 1 && mode >= 0 && mode <= 3 && 0 <= r0 &&
             r0 <= r1 && r1 <= N * Ho && C <= 64 * CW && ph >= 0 && pw >= 0 &&
             ph + H <= Hp && pw + W <= Wp &&
             (Ho - 1) * sh + (kh - 1) * dh < Hp && (Wo - 1) * sw + (kw - 1) * dw < Wp;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "_lbk.bconv_amx: inconsistent geometry");
        release(b, 5);
        return NULL;
    }
    const int64_t outn = mode == 3 ? N * Ho * Wo * OW * 8 : N * Ho * Wo * O * 4;
    if (!need(&b[0], N * Hp * Wp * CW * 8, "xpad") || !need(&b[1], Oq * KC * 64, "wa") ||
        (mode && (!need(&b[2], (O + 15) / 16 * 16 * 4, "scale") ||
                  !need(&b[3], (O + 15) / 16 * 16 * 4, "fbias"))) ||
        !need(&b[4], outn, "out")) {
        release(b, 5);
        return NULL;
    }
    if (!lb_amx_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "_lbk.bconv_amx: AMX is not available here");
        release(b, 5);
        return NULL;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = lb_bconv_amx(b[0].buf, b[1].buf, b[2].buf, b[3].buf, N, Hp, Wp, CW, kh, kw, sh, sw, ph,
                      pw, dh, dw, H, W, Ho, Wo, O, mode, b[4].buf, r0, r1);
    Py_END_ALLOW_THREADS
    release(b, 5);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
#endif

/* gemm_u8s8 and gemm_amx take the same arguments; amx selects the AMX tile kernel (its
 * weights in the tile layout of amx_weights: Op rounded up to 32, Kp to 64). */
static PyObject *gemm_call(PyObject *args, int amx)
{
    const char *name = amx ? "_lbk.gemm_amx" : "_lbk.gemm_u8s8";
    Py_buffer b[10];
    long long P, Kp, Op, O, lo, hi, hw, p0, p1;
    int interleaved, mode, pre_shift, isz;
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "y*py*y*LLLLiiy*y*y*y*LLiy*y*Lw*LL", &b[0], &interleaved, &b[1],
                          &b[2], &P, &Kp, &Op, &O, &mode, &pre_shift, &b[3], &b[4], &b[5], &b[6],
                          &lo, &hi, &isz, &b[7], &b[8], &hw, &b[9], &p0, &p1))
        return NULL;
    const int ok = P >= 0 && Kp >= 4 && Kp % 4 == 0 && Op % 16 == 0 && O >= 1 && Op >= O &&
                   mode >= 0 && mode <= 4 && pre_shift >= 0 && pre_shift < 32 &&
                   (isz == 1 || isz == 2 || isz == 4) && hw >= 1 && 0 <= p0 && p0 <= p1 &&
                   p1 <= P && (mode != 2 || P % hw == 0);
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "%s: inconsistent arguments", name);
        release(b, 10);
        return NULL;
    }
    const int64_t OW = (O + 63) / 64;
    const int64_t outn = mode == 3 ? P * OW * 8 : P * O * (mode == 0 ? isz : 4);
    const int64_t wn = amx ? (Op + 31) / 32 * 32 * ((Kp + 63) / 64 * 64) : Op * Kp;
    if (!need(&b[0], P * Kp, "xu") || !need(&b[1], wn, amx ? "wa" : "w") ||
        !need(&b[2], Op * 4, "init") ||
        (mode == 0 && (!need(&b[3], Op * 8, "bias") || !need(&b[4], Op * 8, "m") ||
                       !need(&b[5], Op * 8, "n") || !need(&b[6], Op * 8, "half"))) ||
        (mode >= 1 && mode <= 3 && (!need(&b[7], Op * 4, "scale") || !need(&b[8], Op * 4, "fbias"))) ||
        !need(&b[9], outn, "out")) {
        release(b, 10);
        return NULL;
    }
#if LB_HAS_AMX
    if (amx && !lb_amx_ok()) {
        PyErr_Format(PyExc_RuntimeError, "%s: AMX is not available here", name);
        release(b, 10);
        return NULL;
    }
#endif
    int rc;
    Py_BEGIN_ALLOW_THREADS
#if LB_HAS_AMX
    if (amx)
        rc = lb_gemm_amx(b[0].buf, interleaved, b[1].buf, b[2].buf, P, Kp, Op, O, mode, pre_shift,
                         b[3].buf, b[4].buf, b[5].buf, b[6].buf, lo, hi, isz, b[7].buf, b[8].buf, hw,
                         b[9].buf, p0, p1);
    else
#endif
        rc = lb_gemm_u8s8(b[0].buf, interleaved, b[1].buf, b[2].buf, P, Kp, Op, O, mode, pre_shift,
                          b[3].buf, b[4].buf, b[5].buf, b[6].buf, lo, hi, isz, b[7].buf, b[8].buf, hw,
                          b[9].buf, p0, p1);
    Py_END_ALLOW_THREADS
    release(b, 10);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_gemm_u8s8(PyObject *self, PyObject *args)
{
    (void)self;
    return gemm_call(args, 0);
}

#if LB_HAS_AMX
static PyObject *py_gemm_amx(PyObject *self, PyObject *args)
{
    (void)self;
    return gemm_call(args, 1);
}
#endif

static PyObject *py_quant_k4(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer b[2];
    float sc, lo, hi;
    int shift;
    long long N, C, H, W, sh, sw, Kp, r0, r1;
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "y*fffiLLLLLLLw*LL", &b[0], &sc, &lo, &hi, &shift, &N, &C, &H,
                          &W, &sh, &sw, &Kp, &b[1], &r0, &r1))
        return NULL;
    const int ok = N >= 0 && C >= 1 && H >= 1 && W >= 1 && sh >= 1 && sw >= 1 && Kp >= C &&
                   Kp % 4 == 0 && 0 <= r0 && r0 <= r1 && r1 <= N * ((H - 1) / sh + 1) &&
                   (shift == 0 || shift == 128) && lo <= hi && lo + shift >= 0 &&
                   hi + shift <= 255;
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "_lbk.quant_k4: inconsistent arguments");
        release(b, 2);
        return NULL;
    }
    const int64_t P = N * ((H - 1) / sh + 1) * ((W - 1) / sw + 1);
    if (!need(&b[0], N * C * H * W * 4, "x") || !need(&b[1], P * Kp, "out")) {
        release(b, 2);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    lb_quant_k4(b[0].buf, sc, lo, hi, shift, N, C, H, W, sh, sw, Kp, b[1].buf, r0, r1);
    Py_END_ALLOW_THREADS
    release(b, 2);
    Py_RETURN_NONE;
}

static PyObject *py_sign_pack(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer b[2];
    int nchw;
    long long N, C, H, W, r0, r1;
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "y*pLLLLw*LL", &b[0], &nchw, &N, &C, &H, &W, &b[1], &r0, &r1))
        return NULL;
    /* rows layout: N rows of C (H = W = 1); NCHW: the rows are the N images */
    const int64_t rows = N;
    if (N < 0 || C < 1 || H < 1 || W < 1 || (!nchw && (H != 1 || W != 1)) || r0 < 0 ||
        r0 > r1 || r1 > rows) {
        PyErr_SetString(PyExc_ValueError, "_lbk.sign_pack: inconsistent arguments");
        release(b, 2);
        return NULL;
    }
    if (!need(&b[0], N * C * H * W * 4, "x") || !need(&b[1], N * H * W * ((C + 63) / 64) * 8, "out")) {
        release(b, 2);
        return NULL;
    }
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS
    if (nchw)
        rc = lb_sign_nchw(b[0].buf, C, H * W, b[1].buf, r0, r1);
    else
        lb_sign_rows(b[0].buf, C, b[1].buf, r0, r1);
    Py_END_ALLOW_THREADS
    release(b, 2);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_sst_taps(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer b[10];
    int is_signed, mode, pre_shift, isz;
    long long P, F, G, n, Op, O, k, lo, hi, r0, r1;
    memset(b, 0, sizeof b);
    if (!PyArg_ParseTuple(args, "y*pLLy*LLy*LLLiiy*y*y*y*LLiy*y*w*LL", &b[0], &is_signed, &P, &F,
                          &b[1], &G, &n, &b[2], &Op, &O, &k, &mode, &pre_shift, &b[3], &b[4],
                          &b[5], &b[6], &lo, &hi, &isz, &b[7], &b[8], &b[9], &r0, &r1))
        return NULL;
    const int ok = P >= 0 && F >= 1 && G >= 1 && n >= 1 && n <= 15 && O >= 1 && Op >= O &&
                   Op % 64 == 0 && k >= 1 && k <= n && 0 <= r0 && r0 <= r1 && r1 <= P &&
                   F < INT32_MAX && (mode == 0 || mode == 1 || mode == 3 || mode == 4) &&
                   pre_shift >= 0 && pre_shift < 32 && (isz == 1 || isz == 2 || isz == 4);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "_lbk.sst_taps: inconsistent arguments");
        release(b, 10);
        return NULL;
    }
    const int64_t outn = mode == 3 ? P * ((O + 63) / 64) * 8 : P * O * (mode == 0 ? isz : 4);
    if (!need(&b[0], P * F, "x") || !need(&b[1], G * n * 8, "colmap") ||
        !need(&b[2], G * k * Op, "taps") ||
        (mode == 0 && (!need(&b[3], Op * 8, "bias") || !need(&b[4], Op * 8, "m") ||
                       !need(&b[5], Op * 8, "n") || !need(&b[6], Op * 8, "half"))) ||
        ((mode == 1 || mode == 3) && (!need(&b[7], Op * 4, "scale") || !need(&b[8], Op * 4, "fbias"))) ||
        !need(&b[9], outn, "out")) {
        release(b, 10);
        return NULL;
    }
    const int64_t *cm = (const int64_t *)b[1].buf;
    for (int64_t i = 0; i < G * n; i++)
        if (cm[i] >= F) {
            PyErr_SetString(PyExc_ValueError, "_lbk.sst_taps: colmap reads past the input row");
            release(b, 10);
            return NULL;
        }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = lb_sst_taps(b[0].buf, is_signed, F, cm, G, n, b[2].buf, Op, O, k, mode, pre_shift,
                     b[3].buf, b[4].buf, b[5].buf, b[6].buf, lo, hi, isz, b[7].buf, b[8].buf,
                     b[9].buf, r0, r1);
    Py_END_ALLOW_THREADS
    release(b, 10);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}
#endif /* LB_X86 */

static PyMethodDef lbk_methods[] = {
    {"cpu_ok", py_cpu_ok, METH_NOARGS, "True when this CPU runs the AVX-512 kernels."},
    {"amx_ok", py_amx_ok, METH_NOARGS, "True when this CPU and OS run the AMX kernels."},
#ifdef LB_X86
    {"xnor_conv", py_xnor_conv, METH_VARARGS, "Binary conv (XOR + popcount), fused epilogue."},
    {"gemm_u8s8", py_gemm_u8s8, METH_VARARGS, "uint8 x int8 GEMM (VNNI), fused epilogue."},
    {"quant_k4", py_quant_k4, METH_VARARGS, "NCHW float32 -> interleaved uint8 GEMM input."},
    {"sign_pack", py_sign_pack, METH_VARARGS, "float32 rows or NCHW -> packed sign bits."},
    {"sst_taps", py_sst_taps, METH_VARARGS, "SST taps looked up in a register (vpermw), fused epilogue."},
#if LB_HAS_AMX
    {"gemm_amx", py_gemm_amx, METH_VARARGS, "uint8 x int8 GEMM (AMX tiles), fused epilogue."},
    {"bconv_amx", py_bconv_amx, METH_VARARGS, "Binary conv as int8 AMX tiles, fused epilogue."},
#endif
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef lbk_module = {
    PyModuleDef_HEAD_INIT, "_lbk", "lowbit's AVX-512 kernels (C); see lowbit.runtime._cext.", -1,
    lbk_methods,
};

PyMODINIT_FUNC PyInit__lbk(void) { return PyModule_Create(&lbk_module); }
