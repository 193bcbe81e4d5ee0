"""End-to-end runtime benchmark: the lowbit Engine on packed ``.lowbit`` files against
PyTorch fp32 eager and ONNX Runtime fp32/int8, single thread, batch 1 (the issue's targets).

Cases:
  (a) binary 3x3 conv stack: 4 x (conv 128->128 at 32x32, binary weights, sign input, BN);
      the PyTorch peer is the fp32 model itself (conv + BN + sign per layer); target >= 10x;
  (b) ternary x int8 pointwise conv 256->256 at 16x16 (+ BN): target >= 3x PyTorch fp32,
      ratio vs ONNX Runtime int8 reported;
  (c) binary vgg_small (binary weights + sign activations on all but the first and last
      layer; random weights, BN statistics from a few train-mode batches): target >= 5x
      PyTorch fp32; the Engine's predictions must equal the frozen model's;
  (d) PROM MobileNetV2 (CIFAR, width 1; int8 scales calibrated on random batches): vs
      PyTorch fp32, ONNX Runtime fp32 and int8.

Models use random weights (speed does not depend on them). Timings are medians of
interleaved rounds (``lowbit.runtime.bench.compare``). Writes bench/results/runtime.json
and .md.

    .venv/bin/python bench/runtime.py [--repeats 50] [--quick]
"""

from __future__ import annotations

import os

# numba's OpenMP pool and PyTorch's spin-wait after their parallel regions and starve each
# other when both run in one process (measured: PyTorch 14x slower once the Engine had
# run); passive waiting must be set before either runtime starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lowbit import models  # noqa: E402
from lowbit.freeze import freeze  # noqa: E402
from lowbit.packfile import load_frozen, save  # noqa: E402
from lowbit.recipes import Recipe, Rule, compress_  # noqa: E402
from lowbit.runtime import _cext, load  # noqa: E402
from lowbit.runtime.bench import compare  # noqa: E402

RESULTS = HERE / "results"
BURST = 5  # back-to-back calls per runtime and round in the warm (steady-state) figures


class BinaryStack(nn.Module):
    """4 x (conv 3x3 128->128 without bias, BN); each conv's input is binarized (sign) by
    its activation codec, so the stack is conv + BN + sign per layer."""

    default_input_shape = (128, 32, 32)

    def __init__(self, layers=4, ch=128):
        super().__init__()
        self.body = nn.Sequential(*[
            m for _ in range(layers) for m in (nn.Conv2d(ch, ch, 3, padding=1, bias=False),
                                               nn.BatchNorm2d(ch))
        ])  # fmt: skip

    def forward(self, x):
        return self.body(x)


class SignStackFp32(nn.Module):
    """The fp32 peer of (a): sign, conv, BN, repeated (the same order as the lowbit model)."""

    def __init__(self, net: BinaryStack):
        super().__init__()
        self.body = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(128, 128, 3, padding=1, bias=False), nn.BatchNorm2d(128))
            for _ in range(len(net.body) // 2)
        ])  # fmt: skip
        self.eval()

    def forward(self, x):
        for blk in self.body:
            x = blk(torch.sign(x))
        return x


class Pointwise(nn.Module):
    default_input_shape = (256, 16, 16)

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(256, 256, 1, bias=False)
        self.bn = nn.BatchNorm2d(256)

    def forward(self, x):
        return self.bn(self.conv(x))


def _prepare(net, shape, batches=3):
    net.train()
    with torch.no_grad():  # BN statistics and int8 activation scales from random data
        for _ in range(batches):
            net(torch.randn(8, *shape))
    return net.eval()


def _time(fn, repeats):
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def _amx_vs_avx512(path: Path, shape, repeats: int) -> dict:
    """Where the AMX kernels run: the same Engine timed with them and without them
    (``_cext.no_amx``), in alternating warm bursts; both give the same outputs."""
    if not _cext.amx():
        return {}
    eng = load(path, threads=1)
    x = np.random.default_rng(2).standard_normal((1, *shape)).astype(np.float32)
    ts = {"amx": [], "avx512": []}
    outs = {}
    for _ in range(-(-repeats // BURST)):
        for k in ts:
            with _cext.no_amx() if k == "avx512" else contextlib.nullcontext():
                outs[k] = eng(x)
                for _ in range(BURST):
                    t0 = time.perf_counter()
                    eng(x)
                    ts[k].append(time.perf_counter() - t0)
    amx_ms, avx_ms = (round(statistics.median(ts[k]) * 1e3, 4) for k in ("amx", "avx512"))
    same = bool(np.array_equal(outs["amx"], outs["avx512"]))
    return {"warm_lowbit_amx_ms": amx_ms, "warm_lowbit_avx512_ms": avx_ms,
            "amx_speedup_vs_avx512": round(avx_ms / amx_ms, 3),
            "amx_outputs_equal_avx512": same}  # fmt: skip


def case_binary_stack(tmp: Path, repeats: int) -> dict:
    torch.manual_seed(0)
    fp = BinaryStack()
    net = compress_(BinaryStack(), Recipe("bin", [Rule(select="all", weights="binary",
                                                         activations="sign")]))  # fmt: skip
    net.load_state_dict(fp.state_dict(), strict=False)
    _prepare(net, (128, 32, 32))
    path = tmp / "binary_stack.lowbit"
    save(freeze(net), path)
    res = compare(path, threads=1, batch=1, repeats=repeats, onnx=True, per_layer=True)
    res.update(_amx_vs_avx512(path, (128, 32, 32), repeats))
    # the literal fp32 peer: conv + BN + sign (BN not folded)
    peer = SignStackFp32(fp)
    x = torch.randn(1, 128, 32, 32)
    eng = load(path, threads=1)
    xn = x.numpy()
    ts = {"peer": [], "lowbit": []}
    warm = {"peer": [], "lowbit": []}
    fns = (("peer", lambda: peer(x)), ("lowbit", lambda: eng(xn)))
    with torch.inference_mode():
        peer(x)
        for _ in range(repeats):  # cold: call by call
            for k, fn in fns:
                t0 = time.perf_counter()
                fn()
                ts[k].append(time.perf_counter() - t0)
        for _ in range(-(-repeats // BURST)):  # warm: bursts, rounds alternating
            for k, fn in fns:
                fn()
                for _ in range(BURST):
                    t0 = time.perf_counter()
                    fn()
                    warm[k].append(time.perf_counter() - t0)

    def med(v):
        return round(statistics.median(v) * 1e3, 4)

    res["torch_fp32_conv_bn_sign_ms"] = med(ts["peer"])
    res["lowbit_ms_paired"] = med(ts["lowbit"])
    res["speedup_vs_torch_conv_bn_sign"] = round(
        res["torch_fp32_conv_bn_sign_ms"] / res["lowbit_ms_paired"], 3
    )
    res["warm_torch_fp32_conv_bn_sign_ms"] = med(warm["peer"])
    res["warm_lowbit_ms_paired"] = med(warm["lowbit"])
    res["speedup_warm_vs_torch_conv_bn_sign"] = round(
        res["warm_torch_fp32_conv_bn_sign_ms"] / res["warm_lowbit_ms_paired"], 3
    )
    res["target"] = ">= 10x PyTorch fp32 (conv + BN + sign)"
    res["target_value"] = res["speedup_vs_torch_conv_bn_sign"]
    res["target_value_warm"] = res["speedup_warm_vs_torch_conv_bn_sign"]
    return res


def case_pointwise(tmp: Path, repeats: int) -> dict:
    torch.manual_seed(0)
    net = compress_(Pointwise(), Recipe("t", [Rule(select="all", weights="ternary",
                                                   activations="int8")]))  # fmt: skip
    _prepare(net, (256, 16, 16))
    path = tmp / "pointwise_ternary.lowbit"
    save(freeze(net), path)
    res = compare(path, threads=1, batch=1, repeats=repeats * 4, onnx=True, per_layer=True)
    res.update(_amx_vs_avx512(path, (256, 16, 16), repeats * 4))
    res["target"] = ">= 3x PyTorch fp32; ratio vs ONNX Runtime int8 reported"
    res["target_value"] = res["speedup_vs_torch_fp32"]
    res["target_value_warm"] = res["speedup_warm_vs_torch_fp32"]
    return res


def case_vgg_binary(tmp: Path, repeats: int) -> dict:
    torch.manual_seed(0)
    recipe = Recipe("binary-vgg", [
        Rule(select="all", weights="binary", activations="sign"),
        Rule(select="first", weights="int8", activations="int8"),
        Rule(select="last", weights="int8", activations="int8"),
    ])  # fmt: skip
    net = compress_(models.create("vgg_small"), recipe)
    _prepare(net, (3, 32, 32))
    frozen = freeze(net)
    path = tmp / "vgg_small_binary.lowbit"
    save(frozen, path)
    eng = load(path, threads=1)
    x = np.random.default_rng(1).standard_normal((16, 3, 32, 32)).astype(np.float32)
    ref = load_frozen(path)(torch.from_numpy(x)).numpy()
    got = eng(x)
    res = compare(path, threads=1, batch=1, repeats=repeats, onnx=True, per_layer=True)
    res["predictions_equal_frozen"] = bool((got.argmax(1) == ref.argmax(1)).all())
    res["logits_equal_frozen"] = bool(np.array_equal(got, ref))
    res["kernels"] = sorted(set(eng.kernels().values()))
    res.update(_amx_vs_avx512(path, (3, 32, 32), repeats))
    res["target"] = ">= 5x PyTorch fp32"
    res["target_value"] = res["speedup_vs_torch_fp32"]
    res["target_value_warm"] = res["speedup_warm_vs_torch_fp32"]
    return res


def case_mobilenetv2(tmp: Path, repeats: int) -> dict:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = compress_(models.create("mobilenetv2"), "prom")
    _prepare(net, (3, 32, 32))
    frozen = freeze(net)
    path = tmp / "mobilenetv2_prom.lowbit"
    save(frozen, path)
    x = np.random.default_rng(1).standard_normal((8, 3, 32, 32)).astype(np.float32)
    ref = load_frozen(path)(torch.from_numpy(x)).numpy()
    got = load(path)(x)
    res = compare(path, threads=1, batch=1, repeats=repeats, onnx=True, per_layer=True)
    res["max_abs_diff_vs_frozen"] = float(np.abs(got - ref).max())
    res.update(_amx_vs_avx512(path, (3, 32, 32), repeats))
    res["target"] = "report vs PyTorch fp32, ONNX Runtime fp32 and int8"
    res["target_value"] = res["speedup_vs_onnxruntime_int8"]
    return res


CASES = {
    "a_binary_conv_stack": case_binary_stack,
    "b_pointwise_ternary_int8": case_pointwise,
    "c_vgg_small_binary": case_vgg_binary,
    "d_mobilenetv2_prom": case_mobilenetv2,
}


def _fmt(v, unit=""):
    return "-" if v is None else f"{v:.3f}{unit}" if isinstance(v, float) else str(v)


def _kernel_summary(rows):
    agg: dict[str, float] = {}
    for r in rows:
        k = r["kind"] + (f"/{r['kernel']}" if "kernel" in r else "")
        agg[k] = agg.get(k, 0.0) + r["ms"]
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(agg.items(), key=lambda kv: -kv[1])[:6])


def _row(name: str, r: dict, warm: bool) -> str:
    w = r.get("warm_ms", {}) if warm else {}

    def ms(k):
        return w.get(k) if warm else r[f"{k}_ms"]

    def sp(k):
        return r.get(f"speedup_warm_vs_{k}") if warm else r[f"speedup_vs_{k}"]

    lowbit, torch_ms, vs_torch = ms("lowbit"), ms("torch_fp32"), sp("torch_fp32")
    if "speedup_vs_torch_conv_bn_sign" in r:  # its own pairing: lowbit vs that peer
        pre = "warm_" if warm else ""
        vs_torch = r[f"speedup_{'warm_' if warm else ''}vs_torch_conv_bn_sign"]
        torch_ms = r[f"{pre}torch_fp32_conv_bn_sign_ms"]
        lowbit = r[f"{pre}lowbit_ms_paired"]
        name += " (*)"
    reached = r.get("reached_warm" if warm else "reached", "-")
    return (
        f"| {name} | {_fmt(lowbit)} | {_fmt(torch_ms)} | {_fmt(ms('onnxruntime_fp32'))} | "
        f"{_fmt(ms('onnxruntime_int8'))} | {_fmt(vs_torch, 'x')} | "
        f"{_fmt(sp('onnxruntime_fp32'), 'x')} | {_fmt(sp('onnxruntime_int8'), 'x')} | "
        f"{r['target']} | {reached} |"
    )


def write_markdown(out: dict, path: Path) -> None:
    m = out["machine"]
    lines = [
        "# Runtime benchmark (Engine end to end)",
        "",
        f"Produced by `{out['command']}` on {out['date']}. Machine: {m['cpu']}, "
        f"{m['cores']} cores (shared with other work; 1-minute load average "
        f"{out['load_before']:.2f} before, {out['load_after']:.2f} after), VNNI GEMM: "
        f"{m['vnni']}; numpy {m['versions']['numpy']}, numba {m['versions']['numba']}, "
        f"torch {m['versions']['torch']}, onnxruntime {m['versions']['onnxruntime']}. "
        "Single thread, batch 1, random weights. speedup = peer ms / lowbit ms. The PyTorch "
        "and ONNX Runtime peers run the file's network in float32 (dequantized weights, BN "
        "folded); ONNX Runtime int8 is that network statically quantized (QDQ, per-channel). "
        f"C kernels: {m.get('c_kernels')}; AMX tile kernels: {m.get('amx')}.",
        "",
        "Two protocols, both side by side in one process so that drift of the shared machine "
        "hits every runtime alike. **Warm** (steady state, what a deployment that runs "
        f"inference back to back sees): rounds in which each runtime runs {BURST + 1} calls "
        f"back to back, the first untimed; median of the timed calls. **Cold**: the runtimes "
        "called in turn, one call each; every call starts with the caches the other runtimes "
        "left (PyTorch's working set is megabytes, lowbit's a few hundred kB, so this favours "
        "PyTorch).",
        "",
    ]
    for proto, key in (("Warm", "warm"), ("Cold", "cold")):
        lines += [
            f"### {proto}",
            "",
            "| case | lowbit ms | torch fp32 ms | ORT fp32 ms | ORT int8 ms | vs torch "
            "| vs ORT fp32 | vs ORT int8 | target | reached |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in out["cases"].items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} |||||||||")
                continue
            lines.append(_row(name, r, key == "warm"))
        lines.append("")
    lines += [
        "(*) row (a): lowbit and PyTorch timed in their own rounds against the literal fp32 "
        "model (conv + BN + sign per layer, BN not folded); the ORT columns and ratios come "
        "from the common rounds.",
        "",
    ]
    lines += ["", "Where the time goes (Engine.profile, ms per op kind / kernel):", ""]
    for name, r in out["cases"].items():
        if "per_layer" in r:
            lines.append(f"- {name}: {_kernel_summary(r['per_layer'])}")
    amx = [(n, r) for n, r in out["cases"].items() if "amx_speedup_vs_avx512" in r]
    if amx:
        lines += ["", "AMX tile kernels (the int8 GEMM; the binary conv as +-1 int8 dot products) "
                      "against the AVX-512 ones (VNNI GEMM; XOR + popcount), the same Engine, "
                      "warm, alternating bursts; `LOWBIT_NO_AMX=1` selects the latter:",
                  ""]  # fmt: skip
        for n, r in amx:
            lines.append(f"- {n}: {r['warm_lowbit_amx_ms']:.3f} ms with AMX, "
                         f"{r['warm_lowbit_avx512_ms']:.3f} ms without "
                         f"({r['amx_speedup_vs_avx512']:.2f}x; outputs equal: "
                         f"{r['amx_outputs_equal_avx512']})")  # fmt: skip
    notes = out["cases"].get("c_vgg_small_binary", {})
    if "predictions_equal_frozen" in notes:
        lines += ["", f"Binary vgg_small: Engine predictions equal the frozen model's on 16 "
                      f"random inputs: {notes['predictions_equal_frozen']} (logits bit-equal: "
                      f"{notes['logits_equal_frozen']})."]  # fmt: skip
    if out.get("notes"):
        lines += ["", *out["notes"]]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="repeats = 10")
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    args = ap.parse_args(argv)
    repeats = 10 if args.quick else args.repeats

    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    out: dict = {
        "command": "python bench/runtime.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "threads": 1,
        "batch": 1,
        "repeats": repeats,
        "load_before": load_before,
        "cases": {},
    }
    targets = {"a_binary_conv_stack": 10.0, "b_pointwise_ternary_int8": 3.0,
               "c_vgg_small_binary": 5.0}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lowbit-bench-rt-") as d:
        for name in args.cases:
            t0 = time.time()
            try:
                r = CASES[name](Path(d), repeats)
            except Exception as e:  # noqa: BLE001 - record and go on
                r = {"error": f"{type(e).__name__}: {e}"}
            if name in targets and "target_value" in r:
                r["reached"] = "yes" if r["target_value"] >= targets[name] else "no"
                r["reached_warm"] = "yes" if r["target_value_warm"] >= targets[name] else "no"
            r["wall_s"] = round(time.time() - t0, 1)
            out["cases"][name] = r
            print(name, json.dumps({k: v for k, v in r.items() if k != "per_layer"
                                    and k != "machine"}), flush=True)  # fmt: skip
    out["load_after"] = os.getloadavg()[0]
    first = next((r for r in out["cases"].values() if "machine" in r), None)
    out["machine"] = first["machine"] if first else {}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "runtime.json").write_text(json.dumps(out, indent=1) + "\n")
    if first:
        write_markdown(out, RESULTS / "runtime.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
