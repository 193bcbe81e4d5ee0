"""Micro-benchmark of the runtime kernels against PyTorch fp32 of the same shape.

For each kernel and shape: median milliseconds of the lowbit kernel (weights prepared
once, outside the timing, as the Engine does at load time; activations already in the
kernel's input format) and of ``torch.nn.functional.conv2d`` / ``linear`` in fp32 (NCHW,
``torch.no_grad``), with ``torch.set_num_threads`` equal to the kernel thread count, at 1
and 2 threads. The two are timed in alternating rounds so machine noise hits both alike.
Writes ``bench/results/kernels.json`` and ``bench/results/kernels.md``.

    .venv/bin/python bench/kernels.py            # full run (a few minutes)
    .venv/bin/python bench/kernels.py --quick    # fewer rounds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lowbit.runtime import kernels as K  # noqa: E402

RNG = np.random.default_rng(0)


def u8(shape):
    return RNG.integers(0, 256, shape).astype(np.uint8)


def codes(shape, lo, hi):
    return RNG.integers(lo, hi + 1, shape).astype(np.int8)


def signs(shape):
    return np.where(RNG.random(shape) < 0.5, -1, 1).astype(np.int8)


@njit(parallel=True, cache=True)
def _ternary_index_lists(xt, pidx, pptr, midx, mptr, out):
    """Alternative ternary kernel (for comparison only): per output channel, add the input
    rows of its +1 weights and subtract those of its -1 weights; xt [K, P] u8, out [O, P]."""
    O, P = out.shape
    for o in prange(O):
        row = out[o]
        for p in range(P):
            row[p] = 0
        for t in range(pptr[o], pptr[o + 1]):
            xr = xt[pidx[t]]
            for p in range(P):
                row[p] += np.int32(xr[p])
        for t in range(mptr[o], mptr[o + 1]):
            xr = xt[midx[t]]
            for p in range(P):
                row[p] -= np.int32(xr[p])


def index_lists(w2):
    pidx, midx, pptr, mptr = [], [], [0], [0]
    for row in w2:
        pidx.extend(np.flatnonzero(row > 0))
        midx.extend(np.flatnonzero(row < 0))
        pptr.append(len(pidx))
        mptr.append(len(midx))
    a = (np.asarray(v, np.int64) for v in (pidx, pptr, midx, mptr))
    return tuple(a)


def torch_conv(n, h, w, c, o, k, stride, pad, groups):
    x = torch.randn(n, c, h, w)
    wt = torch.randn(o, c // groups, k, k)

    def run():
        with torch.no_grad():
            F.conv2d(x, wt, None, stride, pad, 1, groups)

    return run


def torch_linear(n, k, o):
    x, wt = torch.randn(n, k), torch.randn(o, k)

    def run():
        with torch.no_grad():
            F.linear(x, wt)

    return run


def cases():
    """(kernel, shape text, MACs, lowbit callable, torch callable)."""
    out = []
    pw = [(32, 96, 24), (16, 144, 32), (8, 384, 64)]
    for n in (1, 8):
        for h, c, o in pw:
            x = u8((n, h, h, c))
            shape = f"{n}x{h}x{h}x{c}->{o}"
            macs = n * h * h * c * o
            tc = torch_conv(n, h, h, c, o, 1, 1, 0, 1)
            pc = K.prepare_conv(codes((o, 1, 1, c), -127, 127))
            out.append(("pointwise int8", shape, macs, lambda x=x, pc=pc: K.conv2d_int(x, pc), tc))
            wt = codes((o, 1, 1, c), -1, 1)
            pt = K.pack_ternary(wt)
            out.append(
                ("pointwise ternary", shape, macs, lambda x=x, p=pt: K.conv2d_ternary(x, p), tc)
            )
            if n == 1:
                xt = np.ascontiguousarray(x.reshape(-1, c).T)
                lists = index_lists(wt.reshape(o, c))
                acc = np.empty((o, h * h), np.int32)

                def alt(xt=xt, lists=lists, acc=acc):
                    _ternary_index_lists(xt, *lists, acc)

                out.append(("pointwise ternary (index lists, alt)", shape, macs, alt, tc))
    for n in (1, 8):
        for h, c, s in [(32, 96, 1), (16, 144, 2)]:
            x = u8((n, h, h, c))
            pc = K.prepare_conv(codes((c, 3, 3, 1), -127, 127), groups=c)
            ho = (h + 2 - 3) // s + 1
            out.append((
                "depthwise 3x3 int8", f"{n}x{h}x{h}x{c} s{s}", n * ho * ho * c * 9,
                lambda x=x, pc=pc, s=s: K.conv2d_int(x, pc, s, 1),
                torch_conv(n, h, h, c, c, 3, s, 1, c),
            ))  # fmt: skip
    # 3x3 conv 128->128 at 32x32: binary kernel, and the int8 path (im2col + GEMM)
    xb = signs((1, 32, 32, 128))
    wb = signs((128, 3, 3, 128))
    xp, wp = K.pack_signs(xb), K.pack_binary_weights(wb)
    macs = 32 * 32 * 128 * 128 * 9
    t3 = torch_conv(1, 32, 32, 128, 128, 3, 1, 1, 1)
    out.append((
        "conv3x3 binary", "1x32x32x128->128", macs,
        lambda: K.conv2d_binary(xp, 128, wp, 3, 3, 1, 1), t3,
    ))  # fmt: skip
    out.append((
        "conv3x3 binary + pack_signs", "1x32x32x128->128", macs,
        lambda: K.conv2d_binary(K.pack_signs(xb, check=False), 128, wp, 3, 3, 1, 1), t3,
    ))  # fmt: skip
    x8 = u8((1, 32, 32, 128))
    p8 = K.prepare_conv(codes((128, 3, 3, 128), -127, 127))
    out.append(("conv3x3 int8 (im2col)", "1x32x32x128->128", macs,
                lambda: K.conv2d_int(x8, p8, 1, 1), t3))  # fmt: skip
    for n, k, o in [(1, 1280, 10), (1, 784, 300), (8, 784, 300)]:
        x = u8((n, k))
        tl = torch_linear(n, k, o)
        pl = K.prepare_linear(codes((o, k), -127, 127))
        out.append(
            ("linear int8", f"{n}x{k}->{o}", n * k * o, lambda x=x, p=pl: K.linear_int(x, p), tl)
        )
        pt = K.pack_ternary(codes((o, k), -1, 1))
        out.append(("linear ternary", f"{n}x{k}->{o}", n * k * o,
                    lambda x=x, p=pt: K.linear_ternary(x, p), tl))  # fmt: skip
        xs, ws = K.pack_signs(signs((n, k))), K.pack_binary_weights(signs((o, k)))
        out.append(("linear binary", f"{n}x{k}->{o}", n * k * o,
                    lambda xs=xs, ws=ws, k=k: K.linear_binary(xs, k, ws), tl))  # fmt: skip
    return out


def inner_count(fn, target_s=2e-3) -> int:
    t = time.perf_counter()
    fn()
    dt = max(time.perf_counter() - t, 1e-7)
    return max(1, min(1000, int(target_s / dt)))


# numba's and PyTorch's OpenMP pools are separate; after a parallel region each pool's idle
# threads spin for several ms, and on 2 cores they then starve the other pool (measured:
# 7.6 ms for a 0.015 ms kernel, 28 ms for a 0.03 ms torch conv). A pause after each block
# lets the idle pool go to sleep before the other one is timed.
GAP_S = 0.03


def time_block(f, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    dt = (time.perf_counter() - t0) / n
    time.sleep(GAP_S)
    return dt


def time_pair(fa, fb, rounds: int) -> tuple[float, float]:
    """Median ms per call of fa and fb, timed in alternating rounds."""
    for _ in range(3):
        fa()
        fb()
    na, nb = inner_count(fa), inner_count(fb)
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(time_block(fa, na))
        tb.append(time_block(fb, nb))
    return float(np.median(ta)) * 1e3, float(np.median(tb)) * 1e3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder")
    args = ap.parse_args(argv)
    rounds = 7 if args.quick else 21
    load_start = os.getloadavg()[0]
    all_cases = cases()
    rows = []
    threads = [t for t in (1, 2) if t <= numba.config.NUMBA_NUM_THREADS]
    hdr = (
        f"{'kernel':38s} {'shape':22s} {'thr':>3s} {'lowbit ms':>10s} {'torch ms':>9s} "
        f"{'speedup':>8s} {'GMAC/s':>7s}"
    )
    print(hdr)
    print("-" * len(hdr))
    for t in threads:
        K.set_threads(t)
        torch.set_num_threads(t)
        for name, shape, macs, fl, ft in all_cases:
            lb, tt = time_pair(fl, ft, rounds)
            row = dict(kernel=name, shape=shape, threads=t, macs=macs, lowbit_ms=round(lb, 5),
                       torch_fp32_ms=round(tt, 5), speedup_vs_torch=round(tt / lb, 3),
                       lowbit_gmacs=round(macs / lb / 1e6, 1))  # fmt: skip
            rows.append(row)
            print(f"{name:38s} {shape:22s} {t:3d} {lb:10.4f} {tt:9.4f} {tt / lb:7.2f}x "
                  f"{macs / lb / 1e6:7.1f}", flush=True)  # fmt: skip
    meta = dict(
        command="python bench/kernels.py" + (" --quick" if args.quick else ""),
        date=time.strftime("%Y-%m-%d %H:%M:%S"),
        cpu=platform.processor() or platform.machine(),
        llvm_host_cpu=K._llvm.get_host_cpu_name(),
        vnni=K.HAS_VNNI,
        numba=numba.__version__,
        torch=torch.__version__,
        numpy=np.__version__,
        rounds=rounds,
        load_avg_1min=[round(load_start, 2), round(os.getloadavg()[0], 2)],
        note="median ms per call; speedup = torch fp32 ms / lowbit ms; weights prepared once",
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernels.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=2) + "\n")
    md = [
        "# Runtime kernel micro-benchmark",
        "",
        f"Produced by `{meta['command']}` on {meta['date']} (2-core machine, shared; "
        f"LLVM host CPU `{meta['llvm_host_cpu']}`, VNNI GEMM: {meta['vnni']}; numba "
        f"{meta['numba']}, torch {meta['torch']}; 1-minute load average at start/end "
        f"{meta['load_avg_1min']}: above ~1 the 2-thread rows measure the other work too). "
        f"Median ms per call of {rounds} alternating "
        "rounds; lowbit weights prepared once (as at load time), activations already in the "
        "kernel's format; PyTorch fp32 NCHW with the same thread count. "
        "speedup = torch ms / lowbit ms.",
        "",
        "| kernel | shape (NxHxWxC->O) | threads | lowbit ms | torch fp32 ms | speedup "
        "| lowbit GMAC/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        md.append(
            f"| {r['kernel']} | {r['shape']} | {r['threads']} | {r['lowbit_ms']:.4f} | "
            f"{r['torch_fp32_ms']:.4f} | {r['speedup_vs_torch']:.2f}x | {r['lowbit_gmacs']} |"
        )
    (out / "kernels.md").write_text("\n".join(md) + "\n")
    print(f"wrote {out / 'kernels.json'} and {out / 'kernels.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
