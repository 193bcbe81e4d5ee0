"""``lowbit compare``: one report across several compress results of one model and data set.

``collect`` reads the ``result.json`` each compress-like command (compress, ptq, auto)
leaves in its output folder and checks that they describe the same model (name and
options), data set and energy convention. ``build_report`` adds the full-precision row
(the FP accuracy the results record, with fp32 bytes and energy from the same cost
model), times every packed file with lowbit's runtime against PyTorch fp32 and ONNX
Runtime (``lowbit.runtime.bench.compare``: interleaved rounds, medians, one process),
marks the Pareto-optimal rows (highest accuracy for the bytes, energy or latency) and
writes, each file atomically:

- ``report.md``: the table and links to the plots;
- ``accuracy_vs_bytes.png``, ``accuracy_vs_energy.png``, ``accuracy_vs_latency.png``:
  accuracy against a log x axis, one marker per row, the Pareto front as a step line;
- ``report.json``: every number in the table and the timing settings;
- ``report.html``: the same table as an HTML ``<table>`` and the plots as base64 data
  URIs, with no external resource (one file to mail or attach to an issue).
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import LowbitError
from .utils import atomic_write, write_json

__all__ = ["ReportError", "build_report", "collect", "format_table", "pareto_front"]

#: The metrics a row can be Pareto-optimal on: key in ``row``, plot file, axis label.
METRICS = {
    "bytes": ("storage_bytes", "accuracy_vs_bytes.png", "storage (bytes, log scale)"),
    "energy": ("energy_uj", "accuracy_vs_energy.png",
               "energy per image (µJ, cost model, log scale)"),
    "latency": ("lowbit_ms", "accuracy_vs_latency.png", "latency (ms, lowbit runtime, log scale)"),
}  # fmt: skip
#: PyTorch and ONNX Runtime columns of the table (``row["latency"]`` keys)
PEERS = (("torch_fp32_ms", "PyTorch fp32"), ("onnxruntime_fp32_ms", "ONNX Runtime fp32"),
         ("onnxruntime_int8_ms", "ONNX Runtime int8"))  # fmt: skip
NOT_INSTALLED = "not installed"


class ReportError(LowbitError, ValueError):
    """The results given to ``lowbit compare`` cannot be put in one report."""


# ----------------------------------------------------------------------------- collect


def _identity(res: dict[str, Any], folder: Path) -> dict[str, Any]:
    """What must agree across results: model name and options, data set, convention."""
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            config = {}
    model = config.get("model") if isinstance(config.get("model"), dict) else None
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    return {"model": res.get("model"), "data": res.get("data"),
            "model_kwargs": None if model is None else (model.get("kwargs") or {}),
            "convention": res.get("convention"), "limit_test": data.get("limit_test")}  # fmt: skip


def collect(dirs: Sequence[str | os.PathLike]) -> list[dict[str, Any]]:
    """The ``result.json`` of each folder in ``dirs`` (with ``dir`` added), checked to be of
    one model and data set. Raises ``ReportError`` naming the folder at fault."""
    if not dirs:
        raise ReportError("give at least one compress output folder (or --run METHODS)")
    results, first = [], None
    for d in dirs:
        folder = Path(d)
        path = folder / "result.json"
        if not path.is_file():
            what = "does not exist" if not folder.exists() else "has no result.json"
            raise ReportError(
                f"{folder} {what}: give folders written by lowbit compress, ptq or "
                "compress --method auto"
            )
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ReportError(f"{path}: not a readable result file ({e})") from None
        missing = [k for k in ("model", "data", "test_accuracy", "storage_bytes", "energy_pj")
                   if res.get(k) is None]  # fmt: skip
        if missing:
            raise ReportError(f"{path} lacks {', '.join(missing)}: not a compress result")
        ident = _identity(res, folder)
        if first is None:
            first = (folder, ident)
        else:
            for key, label in (("model", "model"), ("data", "data set"),
                               ("model_kwargs", "model options"),
                               ("convention", "energy convention")):  # fmt: skip
                a, b = first[1][key], ident[key]
                if key == "model_kwargs" and (a is None or b is None):
                    continue  # a folder without config.json: the name must do
                if a != b:
                    raise ReportError(
                        f"{folder} holds a result for {label} {b!r}, but {first[0]} is for "
                        f"{a!r}: compare results of one model and one data set"
                    )
        results.append({**res, "dir": str(folder), "limit_test": ident["limit_test"]})
    return results


# ----------------------------------------------------------------------------- rows


def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[bool]:
    """For ``(cost, accuracy)`` pairs, which are Pareto-optimal: no other point has a cost
    at most as high and an accuracy at least as high, one of them strictly. Points with a
    missing value are never optimal; equal points are all optimal."""
    out = []
    for i, (c, a) in enumerate(points):
        if c is None or a is None:
            out.append(False)
            continue
        dominated = any(
            c2 is not None and a2 is not None and c2 <= c and a2 >= a and (c2 < c or a2 > a)
            for j, (c2, a2) in enumerate(points)
            if j != i
        )
        out.append(not dominated)
    return out


def _packed_file(res: dict[str, Any]) -> Path | None:
    for p in (Path(res["dir"]) / "model.lowbit", res.get("packed")):
        if p and Path(p).is_file():
            return Path(p)
    return None


def _label(res: dict[str, Any], results: list[dict[str, Any]]) -> str:
    """The method, with the folder's name where two results share a method."""
    method = str(res.get("method"))
    if sum(str(r.get("method")) == method for r in results) > 1:
        return f"{method} ({Path(res['dir']).name})"
    return method


def _row(res: dict[str, Any], label: str) -> dict[str, Any]:
    packed = _packed_file(res)
    return {
        "label": label,
        "kind": "compressed",
        "method": res.get("method"),
        "dir": res["dir"],
        "test_accuracy": res["test_accuracy"],
        "fp_test_accuracy": res.get("fp_test_accuracy"),
        "storage_bytes": res["storage_bytes"],
        "compression_vs_fp32": res.get("compression_vs_fp32"),
        "energy_pj": res["energy_pj"],
        "energy_uj": res["energy_pj"] / 1e6,
        "bops": res.get("bops"),
        "packed": str(packed) if packed else None,
        "packed_bytes": res.get("packed_bytes"),
    }


def _fp_cost(ckpt: str, convention: str) -> dict[str, Any]:
    """fp32 bytes, energy and BOPs of the FP checkpoint by lowbit's cost model."""
    import torch

    from .cost import analyze
    from .train import build_from_checkpoint

    net, meta = build_from_checkpoint(ckpt)
    shape = (meta.get("model") or {}).get("input_shape")
    example = torch.zeros(1, *shape) if shape else None
    return analyze(net.cpu().eval(), example, convention=convention)["totals"]


def _find_fp_checkpoint(res: dict[str, Any]) -> str | None:
    """The FP checkpoint a result records, resolved: as written (relative paths are relative
    to where compress ran), else below one of the result folder's parents."""
    recorded = res.get("fp_checkpoint")
    if not recorded:
        return None
    if Path(recorded).is_file():
        return str(Path(recorded).resolve())
    if not Path(recorded).is_absolute():
        for parent in Path(res["dir"]).resolve().parents:
            if (parent / recorded).is_file():
                return str(parent / recorded)
    return None


def _fp_rows(results: list[dict[str, Any]], out: Path) -> list[dict[str, Any]]:
    """One FP row per FP model the results started from (usually one): its accuracy as the
    results record it; fp32 bytes, energy and BOPs by the cost model on its checkpoint (else
    the fp32 baselines the first result records); a packed fp32 file of it
    (OUT/fp32*.lowbit) for the timings."""
    from .workflow import save_checkpoint_packed

    groups: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        if res.get("fp_test_accuracy") is None:
            continue
        ckpt = _find_fp_checkpoint(res)
        res = {**res, "fp_checkpoint": ckpt or res.get("fp_checkpoint")}
        key = ckpt or f"{res['dir']}#{res.get('fp_checkpoint')}"
        groups.setdefault(key, []).append(res)
    rows = []
    for i, group in enumerate(groups.values()):
        res = group[0]
        e32 = res["energy_pj"] * res["energy_vs_fp32"] if res.get("energy_vs_fp32") else None
        row = {
            "label": "fp32" if len(groups) == 1 else f"fp32 ({Path(res['dir']).name})",
            "kind": "fp",
            "method": "fp32",
            "dir": res["dir"],
            "fp_checkpoint": res.get("fp_checkpoint"),
            "test_accuracy": res["fp_test_accuracy"],
            "fp_test_accuracy": res["fp_test_accuracy"],
            "storage_bytes": res.get("fp32_storage_bytes"),
            "compression_vs_fp32": 1.0,
            "energy_pj": e32,
            "bops": None,
            "packed": None,
            "packed_bytes": None,
        }
        ckpt = res.get("fp_checkpoint")
        if ckpt and Path(ckpt).is_file():
            path = out / ("fp32.lowbit" if len(groups) == 1 else f"fp32-{i}.lowbit")
            try:
                cost = _fp_cost(ckpt, res.get("convention") or "operand-width")
                saved = save_checkpoint_packed(ckpt, path)
            except (LowbitError, ValueError, KeyError, RuntimeError) as e:
                row["note"] = f"FP checkpoint {ckpt} could not be costed and packed: {e}"
            else:
                row.update(storage_bytes=cost["storage_bytes"], energy_pj=cost["energy_pj"],
                           bops=cost["bops"], packed=saved["path"],
                           packed_bytes=saved["bytes"])  # fmt: skip
        else:
            row["note"] = (f"FP checkpoint {ckpt} not found: the FP row has the fp32 baselines "
                           f"{res['dir']} records, no BOPs and no timing")  # fmt: skip
        row["energy_uj"] = None if row["energy_pj"] is None else row["energy_pj"] / 1e6
        rows.append(row)
    return rows


def _measure(rows: list[dict[str, Any]], batch: int, repeats: int, threads: int,
             onnx: bool, progress) -> dict[str, Any]:  # fmt: skip
    """Time each row's packed file (lowbit runtime, PyTorch fp32, ONNX Runtime)."""
    from .runtime.bench import compare, machine_info

    try:
        import onnxruntime  # noqa: F401

        have_ort = True
    except ImportError:
        have_ort = False
    # One throwaway round first: the first runtime and PyTorch calls in a process pay for
    # thread pools and kernel caches for a while (measured: 6.9 ms then 0.41 ms for the same
    # LeNet-5 file in one process), which would otherwise fall on the first row alone.
    first = next((row["packed"] for row in rows if row["packed"] is not None), None)
    if first is not None:
        compare(first, threads=threads, batch=batch, repeats=min(repeats, 5), onnx=False)
    for row in rows:
        lat: dict[str, Any] = {"lowbit_ms": None, **{k: None for k, _ in PEERS}}
        if row["packed"] is None:
            row["latency_note"] = "no packed file"
        else:
            progress(f"timing {row['label']}: {row['packed']}")
            res = compare(row["packed"], threads=threads, batch=batch, repeats=repeats,
                          onnx=onnx and have_ort)  # fmt: skip
            lat.update({k: res.get(k) for k in lat})
        if not have_ort:
            lat["onnxruntime_fp32_ms"] = lat["onnxruntime_int8_ms"] = NOT_INSTALLED
        row["latency"] = lat
        row["lowbit_ms"] = lat["lowbit_ms"]
    return {"batch": batch, "repeats": repeats, "threads": threads,
            "onnxruntime": "installed" if have_ort else NOT_INSTALLED,
            "machine": machine_info(threads)}  # fmt: skip


# ----------------------------------------------------------------------------- output


def _num(v: Any, fmt: str) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    return format(v, fmt)


def table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The report's table: header and rows of strings (shared by text, Markdown, HTML)."""
    head = ["method", "accuracy (%)", "vs FP (points)", "storage (B)", "x smaller than fp32",
            "energy (µJ)", "BOPs", "lowbit (ms)", *(f"{n} (ms)" for _, n in PEERS),
            "Pareto"]  # fmt: skip
    body = []
    for r in report["rows"]:
        acc, fp = r["test_accuracy"], r.get("fp_test_accuracy")
        delta = None if fp is None or r["kind"] == "fp" else 100 * (acc - fp)
        lat = r.get("latency") or {}
        body.append([
            r["label"], _num(100 * acc, ".2f"), _num(delta, "+.2f"),
            _num(r["storage_bytes"], ",.0f"), _num(r.get("compression_vs_fp32"), ".1f"),
            _num(r["energy_uj"], ".4g"), _num(r["bops"], ".3g"), _num(lat.get("lowbit_ms"), ".3f"),
            *(_num(lat.get(k), ".3f") for k, _ in PEERS),
            ", ".join(m for m, on in r["pareto"].items() if on) or "-",
        ])  # fmt: skip
    return head, body


def format_table(report: dict[str, Any]) -> str:
    """The table as aligned text (the CLI's output without --json)."""
    head, body = table(report)
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths)))
             for row in [head, *body]]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _caption(report: dict[str, Any]) -> str:
    t = report.get("timing")
    timing = (
        f"Latency: median of {t['repeats']} interleaved runs at batch {t['batch']}, "
        f"{t['threads']} thread(s), on {t['machine'].get('cpu', '?')}; the PyTorch and ONNX "
        "Runtime columns run the same network in float32 (and ONNX Runtime's int8 export), "
        f"ONNX Runtime {t['onnxruntime']}."
        if t
        else "Latency not measured (--no-latency)."
    )
    return (
        f"{report['model']} on {report['data']}; {len(report['rows'])} rows. Energy: "
        f"{report['convention']} convention of lowbit's cost model. 'x smaller than fp32': "
        "fp32 bytes over bytes stored. Pareto: no other row is at least as accurate at a "
        f"lower cost on that metric. {timing}"
    )


def _markdown(report: dict[str, Any]) -> str:
    head, body = table(report)
    lines = [f"# lowbit compare: {report['model']} on {report['data']}", "",
             "| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]  # fmt: skip
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", _caption(report), ""]
    for r in report["rows"]:
        lines.append(
            f"- {r['label']}: {r['dir']}" + (f", packed {r['packed']}" if r["packed"] else "")
        )
    for note in report["notes"]:
        lines.append(f"- note: {note}")
    lines.append("")
    for name, plot in report["plots"].items():
        lines += [f"![accuracy vs {name}]({Path(plot['path']).name})", ""]
    return "\n".join(lines)


def _html(report: dict[str, Any]) -> str:
    head, body = table(report)
    e = html.escape
    rows = "\n".join(
        "<tr" + (' class="pareto"' if any(r["pareto"].values()) else "") + ">"
        + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
        for r, row in zip(report["rows"], body)
    )  # fmt: skip
    imgs = []
    for name, plot in report["plots"].items():
        data = base64.b64encode(Path(plot["path"]).read_bytes()).decode("ascii")
        imgs.append(
            f'<figure><img class="plot" alt="accuracy vs {e(name)}" '
            f'src="data:image/png;base64,{data}"><figcaption>{e(plot["title"])}</figcaption>'
            "</figure>"
        )
    notes = "".join(f"<li>{e(n)}</li>" for n in report["notes"])
    # The script records each image's decoded size on the element (data-natural-width), so
    # a headless browser's DOM dump shows that the plots really decoded.
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>lowbit compare: {e(report["model"])} on {e(report["data"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border: 1px solid #bbb; padding: 0.3em 0.6em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
tr.pareto td:first-child {{ font-weight: bold; }}
figure {{ display: inline-block; margin: 1em; }}
img.plot {{ max-width: 640px; }}
</style></head>
<body>
<h1>lowbit compare: {e(report["model"])} on {e(report["data"])}</h1>
<table id="results">
<thead><tr>{"".join(f"<th>{e(h)}</th>" for h in head)}</tr></thead>
<tbody>
{rows}
</tbody></table>
<p>{e(_caption(report))}</p>
<ul>{notes}</ul>
{"".join(imgs)}
<script>
window.addEventListener("load", function () {{
  var imgs = document.querySelectorAll("img.plot"), decoded = 0;
  for (var i = 0; i < imgs.length; i++) {{
    imgs[i].setAttribute("data-natural-width", String(imgs[i].naturalWidth));
    if (imgs[i].complete && imgs[i].naturalWidth > 0) decoded++;
  }}
  document.body.setAttribute("data-images-decoded", decoded + "/" + imgs.length);
}});
</script>
</body></html>
"""


def _tick_formatter(minor: bool):
    """Plain tick labels on a log axis (0.3, 2, 50k, 1.5M), minor ticks only at 2 and 5."""
    import math

    from matplotlib.ticker import FuncFormatter

    def fmt(v: float, _pos) -> str:
        if v <= 0:
            return ""
        lead = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
        if minor and lead not in (2, 5):
            return ""
        for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if v >= div:
                return f"{v / div:g}{suffix}"
        return f"{v:g}"

    return FuncFormatter(fmt)


def plot_metric(report: dict[str, Any], metric: str, path: Path) -> dict[str, Any]:
    """Accuracy against one cost (log x axis), one marker per row, the Pareto front as a
    step line; written atomically as PNG (axis labels also in the PNG's text metadata).
    Returns the plot's path, title, axis labels and legend entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, _, xlabel = METRICS[metric]
    ylabel = "test accuracy (%)"
    t = report.get("timing") or {}
    if metric == "latency":
        xlabel = (f"latency per batch of {t.get('batch')} (ms, lowbit runtime, "
                  f"{t.get('threads')} thread(s), log scale)")  # fmt: skip
    title = f"{report['model']} on {report['data']}: accuracy vs {metric}"
    fig, ax = plt.subplots(figsize=(7, 4.6))
    markers = "os^Dv<>P*Xhp"
    pts = [(r[key], 100 * r["test_accuracy"], r) for r in report["rows"] if r.get(key)]
    for i, (x, y, r) in enumerate(pts):
        style = {"marker": "*", "s": 160, "color": "black"} if r["kind"] == "fp" else {
            "marker": markers[i % len(markers)], "s": 60}  # fmt: skip
        ax.scatter([x], [y], label=r["label"], zorder=3, **style)
    front = sorted((x, y) for x, y, r in pts if r["pareto"][metric])
    if front:  # a step line through the optimal rows, each ringed (visible even alone)
        xs, ys = zip(*front)
        ax.step(xs, ys, where="post", color="grey", ls="--", lw=1, marker="o", ms=15,
                mfc="none", label="Pareto front", zorder=2)  # fmt: skip
    if metric == "latency":  # the float baselines of the FP model, for reference
        for r in report["rows"]:
            lat = r.get("latency") or {}
            for k, name, m in (("torch_fp32_ms", "PyTorch", "x"),
                               ("onnxruntime_fp32_ms", "ONNX Runtime fp32", "+")):  # fmt: skip
                v = lat.get(k)
                if r["kind"] == "fp" and isinstance(v, float | int) and v > 0:
                    ax.scatter([v], [100 * r["test_accuracy"]], marker=m, s=70, color="black",
                               label=f"{r['label']} model in {name}", zorder=3)  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(_tick_formatter(minor=False))
    ax.xaxis.set_minor_formatter(_tick_formatter(minor=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best")
    legend = [txt.get_text() for txt in ax.get_legend().get_texts()]
    fig.tight_layout()
    meta = {"Title": title, "Description": f"x: {xlabel}; y: {ylabel}; legend: {', '.join(legend)}"}
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110, metadata=meta)
    plt.close(fig)
    return {"path": str(path), "title": title, "xlabel": xlabel, "ylabel": ylabel,
            "legend": legend}  # fmt: skip


def build_report(
    dirs: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    latency: bool = True,
    batch: int = 1,
    repeats: int = 20,
    threads: int = 1,
    onnx: bool = True,
    progress=None,
) -> dict[str, Any]:
    """``lowbit compare``: collect the results in ``dirs``, add the FP row, time the packed
    files (unless ``latency`` is false), mark the Pareto rows and write report.md,
    report.json, report.html and one PNG per metric into ``out``. Returns the report."""
    if batch < 1 or repeats < 1 or threads < 1:
        raise ValueError("batch, repeats and threads must be at least 1")
    progress = progress or (lambda msg: None)
    results = collect(dirs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = _fp_rows(results, out) + [_row(r, _label(r, results)) for r in results]
    notes = []
    limits = {r.get("limit_test") for r in results}
    if sum(r["kind"] == "fp" for r in rows) > 1:
        notes.append("the results start from different FP models: one FP row for each")
    if any(r.get("method") == "burn" for r in results):
        notes.append("BURN is label-free: its accuracy is a linear probe's")
    if len(limits) > 1:
        notes.append("the results were tested on different test subsets")
    notes += [r["note"] for r in rows if r.get("note")]
    timing = _measure(rows, batch, repeats, threads, onnx, progress) if latency else None
    metrics = [m for m in METRICS if latency or m != "latency"]
    for r in rows:
        r.setdefault("lowbit_ms", None)
    for m in METRICS:
        flags = pareto_front([(r.get(METRICS[m][0]), r["test_accuracy"]) for r in rows])
        for r, flag in zip(rows, flags):
            r.setdefault("pareto", {})[m] = flag and m in metrics
    report: dict[str, Any] = {
        "model": results[0]["model"],
        "data": results[0]["data"],
        "convention": results[0].get("convention"),
        "rows": rows,
        "timing": timing,
        "notes": notes,
        "out": str(out),
        "plots": {},
    }
    for m in metrics:
        report["plots"][m] = plot_metric(report, m, out / METRICS[m][1])
    files = {
        "markdown": out / "report.md",
        "html": out / "report.html",
        "json": out / "report.json",
    }
    report["files"] = {k: str(v) for k, v in files.items()}
    with atomic_write(files["markdown"], "w") as f:
        f.write(_markdown(report))
    with atomic_write(files["html"], "w") as f:
        f.write(_html(report))
    write_json(files["json"], report)
    return report
