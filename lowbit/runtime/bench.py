"""``lowbit bench``: the Engine against PyTorch fp32 eager and ONNX Runtime (fp32, int8) on
the same network, side by side.

The peers run a float32 version of the file's network: every layer's weights dequantized
(``codes * scale``, the input scale and folded BatchNorm included), every quantize op
dropped (a sign quantizer stays a sign, so a binary network keeps its sign activations),
fused requantization ranges kept as clamps. It is built from the file alone, so it
measures the same computation as the Engine. ONNX Runtime int8 is that model exported
with ``torch.onnx.export`` and quantized statically (QDQ, per-channel int8 weights,
calibrated on a few random batches), or dynamically when static quantization fails.

Timings: ``repeats`` rounds, each running every runtime once (interleaved), after a
warm-up; medians in milliseconds. This module imports torch (the peer), the Engine
does not.
"""

from __future__ import annotations

import os
import platform
import resource
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from ..fileformat import read
from .engine import load

# numba's and PyTorch's OpenMP pools spin after their parallel regions and starve each other
# in one process (PyTorch measured 14x slower); effective only if set before either starts,
# so the CLI should set it first thing too
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__all__ = ["compare", "machine_info", "torch_module"]


# ----------------------------------------------------------------------------- fp32 peer


def _float_weights(op: dict, t: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``(weight, bias)`` in float32 with ``y = conv(x, weight) + bias`` close to the layer."""
    a = op["attrs"]
    codes = t["codes"].astype(np.float32)
    q = a.get("in_quant")
    s_in = float(q["scale"]) if q else 1.0
    if a.get("out") == "int":
        mult = t["m"].astype(np.float64) * 2.0 ** (int(a["pre_shift"]) - t["n"].astype(np.float64))
        out_scale = mult * float(a["out_scale_next"])
        bias = t["bias_q"].astype(np.float64) / 2.0 ** int(a["pre_shift"]) * out_scale
    else:
        out_scale = t["out_scale"].astype(np.float64)
        bias = t["bias"].astype(np.float64)
    shape = (-1,) + (1,) * (codes.ndim - 1)
    if q and q.get("mode") == "sign":
        s_in = 1.0
    w = codes * (out_scale / s_in).reshape(shape)
    if "offset_scale" in t:
        w = w + (t["offset_scale"].astype(np.float64) / s_in).reshape(shape)
    return w.astype(np.float32), bias.astype(np.float32)


def torch_module(path: str | os.PathLike):
    """A float32 ``torch.nn.Module`` (NCHW) computing the file's network in floating point
    (see the module docstring)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    f = read(path)
    g = f.graph

    class Fp32Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleDict()
            self.buffers_ = {}
            self.ops = []
            for i, op in enumerate(g["ops"]):
                kind, a = op["kind"], op["attrs"]
                t = {k: np.asarray(f.tensors[f"{op['name']}/{k}"]) for k in op["tensors"]}
                key = f"op{i}"
                if kind in ("conv", "linear"):
                    w, b = _float_weights(op, t)
                    if kind == "conv":
                        cin = w.shape[1] * a["groups"]
                        m = nn.Conv2d(cin, w.shape[0], w.shape[2:], a["stride"], a["padding"],
                                      a["dilation"], a["groups"])  # fmt: skip
                    else:
                        m = nn.Linear(w.shape[1], w.shape[0])
                    m.weight.data = torch.from_numpy(w)
                    m.bias.data = torch.from_numpy(b)
                    self.layers[key] = m
                elif kind == "affine":
                    self.register_buffer(
                        f"{key}_s", torch.from_numpy(t["scale"].astype(np.float32))
                    )
                    self.register_buffer(
                        f"{key}_b", torch.from_numpy(t["shift"].astype(np.float32))
                    )
                self.ops.append((key, op))

        def forward(self, x):
            env = {g["input"]: x}
            for key, op in self.ops:
                kind, a = op["kind"], op["attrs"]
                xs = [env[i] for i in op["inputs"]]
                x0 = xs[0]
                if kind in ("conv", "linear"):
                    y = self.layers[key](x0)
                    if a.get("out") == "int":
                        s = float(a["out_scale_next"])
                        y = torch.clamp(y, a["lo"] * s, a["hi"] * s)
                elif kind == "quantize":
                    y = torch.where(x0 > 0, 1.0, -1.0) if a["mode"] == "sign" else x0
                elif kind == "affine":
                    shp = [1, -1] + [1] * (x0.dim() - 2)
                    y = x0 * getattr(self, f"{key}_s").reshape(shp) + getattr(
                        self, f"{key}_b").reshape(shp)  # fmt: skip
                elif kind == "relu":
                    y = torch.relu(x0)
                elif kind == "clamp":
                    y = torch.clamp(x0, a["min"], a["max"])
                elif kind == "maxpool":
                    y = F.max_pool2d(x0, a["kernel"], a["stride"], a["padding"], a["dilation"],
                                     ceil_mode=a["ceil_mode"])  # fmt: skip
                elif kind == "avgpool":
                    y = F.avg_pool2d(x0, a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                                     a["count_include_pad"])  # fmt: skip
                elif kind == "gap":
                    y = x0.mean(dim=(2, 3), keepdim=a.get("keepdim", True))
                elif kind == "flatten":
                    y = torch.flatten(x0, a["start_dim"], a["end_dim"])
                elif kind == "reshape":
                    y = x0.reshape([x0.shape[0]] + a["shape"])
                elif kind == "add":
                    y = xs[0] + xs[1]
                elif kind == "cat":
                    y = torch.cat(xs, dim=a["dim"])
                elif kind == "pad":
                    y = F.pad(x0, a["pad"], value=a["value"])
                else:  # slice
                    y = x0[tuple(slice(*s) for s in a["slices"])]
                env[op["output"]] = y
            return env[g["output"]]

    return Fp32Net().eval()


# ----------------------------------------------------------------------------- ONNX Runtime


def _onnx_sessions(module, shape, threads: int, tmp: Path, calib_batches: int = 8):
    """``{"fp32": session, "int8": session}`` (int8 None where quantization failed) and a
    note on how int8 was made."""
    import onnxruntime as ort
    import torch

    fp32 = tmp / "fp32.onnx"
    x = torch.zeros(shape)
    kw: dict[str, Any] = {"input_names": ["x"], "output_names": ["y"], "opset_version": 17}
    # The TorchScript exporter on purpose: the torch.export-based one needs onnxscript, one
    # more dependency, for the plain conv/gemm graphs here; its deprecation notices are noise.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            torch.onnx.export(module, (x,), str(fp32), dynamo=False, **kw)
        except TypeError:  # older torch without the dynamo switch
            torch.onnx.export(module, (x,), str(fp32), **kw)

    def session(p):
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        return ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])

    out = {"fp32": session(fp32), "int8": None}
    note = ""
    try:
        from onnxruntime.quantization import (
            CalibrationDataReader,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.shape_inference import quant_pre_process

        rng = np.random.default_rng(0)

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.it = iter(
                    [{"x": rng.standard_normal(shape).astype(np.float32)}
                     for _ in range(calib_batches)]
                )  # fmt: skip

            def get_next(self):
                return next(self.it, None)

        pre = tmp / "pre.onnx"
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
        except Exception:
            pre = fp32
        q8 = tmp / "int8.onnx"
        quantize_static(str(pre), str(q8), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8)  # fmt: skip
        out["int8"] = session(q8)
        note = "static QDQ, per-channel int8 weights, uint8 activations, random calibration"
    except Exception as e:  # noqa: BLE001 - fall back to dynamic quantization
        try:
            from onnxruntime.quantization import QuantType, quantize_dynamic

            q8 = tmp / "int8_dyn.onnx"
            quantize_dynamic(str(fp32), str(q8), weight_type=QuantType.QInt8)
            out["int8"] = session(q8)
            note = f"dynamic int8 (static failed: {type(e).__name__}: {e})"
        except Exception as e2:  # noqa: BLE001
            note = f"int8 quantization failed: {type(e2).__name__}: {e2}"
    return out, note


# ----------------------------------------------------------------------------- machine


def machine_info(threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for mod in ("numpy", "numba", "torch", "onnxruntime"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            versions[mod] = None
    from . import kernels as K

    try:
        load1 = os.getloadavg()[0]
    except OSError:
        load1 = None
    from . import _cext

    return {"cpu": cpu, "cores": os.cpu_count(), "threads": threads, "vnni": K.HAS_VNNI,
            "c_kernels": _cext.available() or _cext.why_not(),
            "amx": _cext.amx() or _cext.why_not_amx(),
            "load_average_1min": load1, "python": platform.python_version(),
            "versions": versions}  # fmt: skip


_BURST = 5  # timed calls per runtime and round in the steady-state (warm) measurement


def _median_ms(ts: list[float]) -> float:
    return round(statistics.median(ts) * 1e3, 4)


def compare(
    path: str | os.PathLike,
    threads: int = 1,
    batch: int = 1,
    repeats: int = 50,
    onnx: bool = True,
    torch_fp32: bool = True,
    per_layer: bool = False,
    warmup: int = 3,
    sst_kernel: str = "gemm",
) -> dict[str, Any]:
    """Time the Engine, PyTorch fp32 eager and ONNX Runtime fp32/int8 on ``path``.

    Returns ``lowbit_ms``, ``torch_fp32_ms``, ``onnxruntime_fp32_ms``,
    ``onnxruntime_int8_ms`` (None where not measured / not installed),
    ``speedup_vs_torch_fp32``, ``speedup_vs_onnxruntime_fp32``,
    ``speedup_vs_onnxruntime_int8``, ``peak_rss_mb``, ``machine``, ``batch``, ``threads``,
    ``repeats``, ``agreement_top1_vs_fp32`` (top-1 agreement of the Engine with the fp32
    peer on the random batch), ``warm_ms`` and ``speedup_warm_vs_*`` (steady state: rounds
    of back-to-back calls per runtime, alternating between runtimes) and, with
    ``per_layer``, ``per_layer`` (``Engine.profile``). The ``*_ms`` fields are the medians
    of single calls interleaved call by call (each runtime then starts with the caches the
    others left: the cold figure, which favours the runtime with the larger working set).
    ``sst_kernel``: see ``lowbit.runtime.load``."""
    threads, batch, repeats = int(threads), int(batch), max(1, int(repeats))
    if threads < 1 or batch < 1:
        raise ValueError("threads and batch must be >= 1")
    engine = load(path, threads=threads, sst_kernel=sst_kernel)
    if engine.input_shape is None:
        raise ValueError(f"{path}: the file records no input shape")
    shape = (batch, *engine.input_shape)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    runners: dict[str, Any] = {"lowbit": lambda: engine(x)}
    notes: dict[str, str] = {}
    torch = None
    if torch_fp32 or onnx:
        try:
            import torch
        except ImportError:
            torch = None
            notes["torch"] = "torch is not installed"
    prev_threads = torch.get_num_threads() if torch is not None else None
    tmp = tempfile.TemporaryDirectory(prefix="lowbit-bench-")
    agreement = None
    try:
        if torch is not None:
            torch.set_num_threads(threads)
            module = torch_module(path)
            xt = torch.from_numpy(x)
            if torch_fp32:

                def run_torch():
                    with torch.inference_mode():
                        return module(xt)

                runners["torch_fp32"] = run_torch
                ref = run_torch().numpy()
                agreement = float(np.mean(engine(x).argmax(-1) == ref.argmax(-1)))
            if onnx:
                try:
                    import onnxruntime  # noqa: F401
                except ImportError:
                    notes["onnxruntime"] = "onnxruntime is not installed (pip install lowbit[onnx])"
                else:
                    sess, note = _onnx_sessions(module, shape, threads, Path(tmp.name))
                    notes["onnxruntime_int8"] = note
                    for k, s in sess.items():
                        if s is not None:
                            runners[f"onnxruntime_{k}"] = lambda s=s: s.run(None, {"x": x})
        times: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(max(0, warmup)):
            for fn in runners.values():
                fn()
        for _ in range(repeats):
            for k, fn in runners.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        # steady state: rounds in which each runtime runs a burst of back-to-back calls (the
        # first of a burst untimed: it pays for the caches the others evicted); the rounds
        # alternate between runtimes, so drift of a shared machine hits all of them alike
        warm: dict[str, list[float]] = {k: [] for k in runners}
        for _ in range(max(1, -(-repeats // _BURST))):
            for k, fn in runners.items():
                fn()
                for _ in range(_BURST):
                    t0 = time.perf_counter()
                    fn()
                    warm[k].append(time.perf_counter() - t0)
    finally:
        if torch is not None and prev_threads is not None:
            torch.set_num_threads(prev_threads)
        tmp.cleanup()
    res: dict[str, Any] = {"path": str(path), "batch": batch, "threads": threads,
                           "repeats": repeats, "file_bytes": engine.file_bytes}  # fmt: skip
    for k in ("lowbit", "torch_fp32", "onnxruntime_fp32", "onnxruntime_int8"):
        res[f"{k}_ms"] = _median_ms(times[k]) if k in times else None
    res["warm_ms"] = {k: _median_ms(v) for k, v in warm.items()}
    for k in ("torch_fp32", "onnxruntime_fp32", "onnxruntime_int8"):
        v = res[f"{k}_ms"]
        res[f"speedup_vs_{k}"] = round(v / res["lowbit_ms"], 3) if v else None
        w = res["warm_ms"].get(k)
        res[f"speedup_warm_vs_{k}"] = round(w / res["warm_ms"]["lowbit"], 3) if w else None
    res["agreement_top1_vs_fp32"] = agreement
    res["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    res["machine"] = machine_info(threads)
    res["notes"] = notes
    if per_layer:
        res["per_layer"] = engine.profile(x, repeats=min(repeats, 20))
    return res


def format_result(res: dict[str, Any]) -> str:
    """``compare``'s result as a short text table (the CLI's non-JSON output)."""

    def ms(v):
        return "-" if v is None else f"{v:.3f}"

    def ratio(v):
        return "-" if v is None else f"x{v:.2f}"

    m = res["machine"]
    warm = res.get("warm_ms") or {}
    lines = [
        f"{res['path']}: batch {res['batch']}, {res['threads']} thread(s), median of "
        f"{res['repeats']} interleaved runs ({m.get('cpu', '?')})",
        "",
        f"{'runtime':<20} {'warm ms':>9} {'speed-up':>9} {'cold ms':>9} {'speed-up':>9}",
        f"{'lowbit':<20} {ms(warm.get('lowbit')):>9} {'':>9} {ms(res['lowbit_ms']):>9}",
    ]
    for k, label in (("torch_fp32", "PyTorch fp32"), ("onnxruntime_fp32", "ONNX Runtime fp32"),
                     ("onnxruntime_int8", "ONNX Runtime int8")):  # fmt: skip
        lines.append(f"{label:<20} {ms(warm.get(k)):>9} "
                     f"{ratio(res.get(f'speedup_warm_vs_{k}')):>9} {ms(res[f'{k}_ms']):>9} "
                     f"{ratio(res[f'speedup_vs_{k}']):>9}")  # fmt: skip
    lines.append("warm: steady state (back-to-back calls); cold: runtimes called in turn, "
                 "one call each (lowbit speed-up = peer ms / lowbit ms)")  # fmt: skip
    lines.append(f"\npeak memory {res['peak_rss_mb']} MB; file {res['file_bytes']:,} B")
    for k, v in (res.get("notes") or {}).items():
        lines.append(f"note ({k}): {v}")
    if res.get("per_layer"):
        lines += ["", f"{'op':<32} {'kind':<10} {'kernel':<12} {'ms':>8}"]
        for row in res["per_layer"]:
            kernel = str(row.get("kernel"))[:12]
            lines.append(f"{row['name'][:32]:<32} {row['kind']:<10} {kernel:<12} {row['ms']:>8.3f}")
    return "\n".join(lines)
