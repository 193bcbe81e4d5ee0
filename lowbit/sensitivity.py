"""Per-layer sensitivity: what compressing one layer costs in accuracy and saves in bytes,
energy and measured latency.

For every Conv2d/Linear layer and every candidate weight codec (int8, int4, ternary,
SST (8, 2), binary, fixed point, ...; see ``lowbit.ptq.parse_weight_codec``):

- **accuracy drop**: PTQ of that layer alone (its weights with the candidate, its input
  activations int8, BatchNorm re-estimated below 8-bit weights, ranges calibrated: see
  ``lowbit.ptq``), accuracy on a held-out split of the *training* data (disjoint from the
  calibration images; the test set is never used for decisions), minus the FP model's
  accuracy on the same split;
- **bytes and energy saved**: the cost model's per-layer storage and energy (the
  convention chosen) of the FP layer minus those of the compressed layer, taken from one
  model with *every* layer on the candidate (a layer's cost depends only on its own codecs
  and shapes, so one analysis per candidate gives all layers);
- **latency saved** (optional): lowbit's runtime per-layer time (the layer's op plus its
  input quantization, batch 1, median of ``repeats``) with every layer in float32 minus
  the same with every layer on the candidate: one frozen, packed model per candidate.
  Times are measured inside whole-model runs, so they include cache effects of the
  neighbours; a layer the runtime cannot run with the candidate gets ``None``.

The (layer, candidate) PTQ runs are independent jobs (``lowbit.sweep``): in this process,
in local worker processes (``workers``) or on a Ray cluster (``ray_address``), with the
same table in every case (the runs are deterministic and the FP model, calibration and
held-out images are the same). Latency is measured only in this process, before the
jobs start: a timing taken while other processes share the cores says little about the
model.
"""

from __future__ import annotations

import copy
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .ptq import Calibration, calibrate_activations, correct_batchnorm, parse_weight_codec
from .sweep import run_jobs

__all__ = ["DEFAULT_CANDIDATES", "layer_sensitivity", "run_sensitivity", "format_table", "plot"]

DEFAULT_CANDIDATES = ("int8", "int4", "ternary", "sst-8-2", "binary")
_WHOLE = "<whole model>"  # key of the whole-model totals next to the per-layer figures


def _layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    from .recipes import layer_kinds

    return list(layer_kinds(model, example))


def _one_layer_recipe(name: str, codec):
    from .recipes import Recipe, Rule

    return Recipe("sensitivity", [Rule(codec, "int8", name=name)])


def _all_layers_recipe(codec):
    from .recipes import Recipe, Rule

    return Recipe("sensitivity", [Rule(codec, "int8", select="all")])


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, bs: int = 500):
    model.eval()
    correct = 0
    for i in range(0, len(images), bs):
        correct += int((model(images[i : i + bs]).argmax(1) == labels[i : i + bs]).sum())
    return correct / max(1, len(images))


def _ptq_copy(fp: nn.Module, recipe, calib_x: torch.Tensor, example, calib: Calibration):
    from .recipes import compress_

    net = copy.deepcopy(fp)
    compress_(net, recipe, example)
    if any(m.weight_codec.weight_bits() < 8 for m in _quant_modules(net)):
        correct_batchnorm(net, calib_x, calib.batch_size)
    calibrate_activations(net, calib_x, calib)
    return net.eval()


def _quant_modules(net: nn.Module):
    from .layers import QuantConv2d, QuantLinear

    return [m for m in net.modules() if isinstance(m, QuantConv2d | QuantLinear)]


def _per_layer_cost(net: nn.Module, example, convention: str) -> dict[str, dict[str, float]]:
    from .cost import analyze

    rep = analyze(net, example, convention=convention)
    out = {
        row["name"]: {"bytes": float(row["storage_bytes"]), "energy_pj": float(row["energy_pj"])}
        for row in rep["layers"]
        if "storage_bytes" in row
    }
    out[_WHOLE] = {"bytes": float(rep["totals"]["storage_bytes"]),
                   "energy_pj": float(rep["totals"]["energy_pj"])}  # fmt: skip
    return out


def _per_layer_latency(net: nn.Module, example, names: Sequence[str], repeats: int):
    """Runtime ms per layer name (op + its input quantization), from a frozen packed copy."""
    from .freeze import freeze
    from .packfile import save
    from .runtime import load

    frozen = freeze(net.eval(), example)
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.lowbit")
        save(frozen, path)
        engine = load(path, threads=1)
        rows = engine.profile(example.numpy().astype(np.float32), repeats=repeats)
    by_op: dict[str, float] = {}
    for r in rows:
        base = r["name"].removesuffix(".quantize")
        by_op[base] = by_op.get(base, 0.0) + r["ms"]
    out = {n: by_op.get(n.replace(".", "_")) for n in names}
    out[_WHOLE] = sum(by_op.values())
    return out


def layer_sensitivity(
    fp_model: nn.Module,
    calib_images: torch.Tensor,
    holdout_images: torch.Tensor,
    holdout_labels: torch.Tensor,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    calibration: Calibration | None = None,
    convention: str = "operand-width",
    latency: bool = True,
    repeats: int = 20,
    progress: bool = True,
    workers: int = 1,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """The sensitivity table of ``fp_model`` (float, eval mode; inputs normalized). Returns
    ``{"fp_accuracy", "candidates", "rows": [...], "skipped": [...]}``; each row: layer,
    candidate, accuracy, drop (points), bytes, bytes_saved, energy_pj, energy_saved_pj,
    latency_ms, latency_saved_ms (None without ``latency``).

    ``workers`` / ``ray_address``: where the (layer, candidate) PTQ runs go (see
    ``lowbit.sweep.run_jobs``); the table is the same wherever they run. Latencies are
    always measured in this process, before any worker starts: timings taken while other
    processes share the cores would be meaningless."""
    calib = calibration or Calibration()
    codecs = {c: parse_weight_codec(c) for c in candidates}
    fp_model = copy.deepcopy(fp_model).cpu().eval()
    example = calib_images[:1]
    names = _layers(fp_model, example)
    fp_acc = _accuracy(fp_model, holdout_images, holdout_labels)
    base_cost = _per_layer_cost(fp_model, example, convention)
    base_lat = _per_layer_latency(fp_model, example, names, repeats) if latency else {}
    costs, lats, skipped = {}, {}, []
    for cand, codec in codecs.items():
        whole = _ptq_copy(fp_model, _all_layers_recipe(codec), calib_images, example, calib)
        costs[cand] = _per_layer_cost(whole, example, convention)
        if latency:
            try:
                lats[cand] = _per_layer_latency(whole, example, names, repeats)
            except Exception as e:  # a codec pair the runtime has no kernel for
                lats[cand] = {}
                skipped.append({"candidate": cand, "latency": f"{type(e).__name__}: {e}"})
    # the (layer, candidate) PTQ runs are independent jobs: serial, local processes or Ray
    # (lowbit.sweep); latencies above were measured here before any worker started
    jobs = [(name, cand) for name in names for cand in codecs]
    shared = {"model": fp_model, "codecs": codecs, "calib_images": calib_images,
              "holdout_images": holdout_images, "holdout_labels": holdout_labels,
              "calibration": calib}  # fmt: skip
    outcomes = run_jobs(_layer_job, jobs, workers, ray_address, progress, shared=shared,
                        desc="sensitivity")  # fmt: skip
    rows: list[dict[str, Any]] = []
    for (name, cand), got in zip(jobs, outcomes):
        if "skipped" in got:
            skipped.append({"layer": name, "candidate": cand, "reason": got["skipped"]})
            continue
        acc = got["accuracy"]
        b0, b1 = base_cost.get(name, {}), costs[cand].get(name, {})
        l0, l1 = base_lat.get(name), lats.get(cand, {}).get(name)
        rows.append({
            "layer": name,
            "candidate": cand,
            "accuracy": acc,
            "drop": 100.0 * (fp_acc - acc),
            "bytes": b1.get("bytes"),
            "bytes_saved": _diff(b0.get("bytes"), b1.get("bytes")),
            "energy_pj": b1.get("energy_pj"),
            "energy_saved_pj": _diff(b0.get("energy_pj"), b1.get("energy_pj")),
            "latency_ms": l1,
            "latency_saved_ms": _diff(l0, l1),
            "seconds": got["seconds"],
        })  # fmt: skip
    return {
        "fp_accuracy": fp_acc,
        "candidates": list(codecs),
        "layers": names,
        "fp_layers": {n: {**base_cost.get(n, {}), "latency_ms": base_lat.get(n)} for n in names},
        # every layer on one candidate: totals of the whole model (cost model; runtime ms)
        "whole": {
            c: {**costs[c][_WHOLE], "latency_ms": lats.get(c, {}).get(_WHOLE)} for c in codecs
        },
        "fp_whole": {**base_cost[_WHOLE], "latency_ms": base_lat.get(_WHOLE)},
        "holdout_images": len(holdout_images),
        "calibration_images": len(calib_images),
        "calibration": calib.to_dict(),
        "convention": convention,
        "rows": rows,
        "skipped": skipped,
    }


def _layer_job(shared: dict[str, Any], job: tuple[str, str]) -> dict[str, Any]:
    """One sweep job: accuracy on the held-out split with only layer ``job[0]`` on
    candidate ``job[1]`` (``{"skipped": reason}`` when the codec cannot take the layer)."""
    name, cand = job
    t0 = time.perf_counter()
    calib_images = shared["calib_images"]
    recipe = _one_layer_recipe(name, shared["codecs"][cand])
    try:
        net = _ptq_copy(shared["model"], recipe, calib_images, calib_images[:1],
                        shared["calibration"])  # fmt: skip
    except ValueError as e:  # e.g. SST on a layer whose fan-in the groups cannot cut
        return {"skipped": str(e)}
    acc = _accuracy(net, shared["holdout_images"], shared["holdout_labels"])
    return {"accuracy": acc, "seconds": round(time.perf_counter() - t0, 3)}


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _fmt(v, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def format_table(result: dict[str, Any]) -> str:
    """Markdown: one row per (layer, candidate)."""
    lines = [
        f"FP accuracy on the held-out split: {100 * result['fp_accuracy']:.2f}% "
        f"({result['holdout_images']} training images not used for calibration)",
        "",
        "| layer | codec | accuracy | drop (pts) | bytes | bytes saved | energy saved (pJ) "
        "| latency (ms) | latency saved (ms) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['layer']} | {r['candidate']} | {100 * r['accuracy']:.2f}% | "
            f"{r['drop']:.2f} | {_fmt(r['bytes'], ',.0f')} | {_fmt(r['bytes_saved'], ',.0f')} | "
            f"{_fmt(r['energy_saved_pj'], '.4g')} | {_fmt(r['latency_ms'], '.4f')} | "
            f"{_fmt(r['latency_saved_ms'], '.4f')} |"
        )
    for s in result["skipped"]:
        lines.append(f"\nskipped: {s}")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str | os.PathLike) -> str:
    """Accuracy drop against bytes saved (and against energy saved) per layer, one marker
    per candidate codec. Written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .utils import atomic_write

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "os^Dv<>Px*"
    for i, cand in enumerate(result["candidates"]):
        rows = [r for r in result["rows"] if r["candidate"] == cand]
        for ax, key, scale in ((axes[0], "bytes_saved", 1e-3), (axes[1], "energy_saved_pj", 1e-6)):
            pts = [(r[key] * scale, r["drop"]) for r in rows if r[key] is not None]
            if pts:
                xs, ys = zip(*pts)
                ax.scatter(xs, ys, marker=markers[i % len(markers)], label=cand, alpha=0.8)
    axes[0].set_xlabel("storage saved per layer (KB)")
    axes[1].set_xlabel("energy saved per layer (uJ per image)")
    for ax in axes:
        xs = [x for c in ax.collections for x in c.get_offsets()[:, 0]]
        if xs and min(xs) > 0:
            ax.set_xscale("log")
        ax.set_ylabel("accuracy drop (points, held-out split)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.grid(alpha=0.3)
        ax.legend(title="codec", fontsize=8)
    fig.suptitle("Per-layer sensitivity: PTQ of one layer at a time")
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
    return str(path)


def run_sensitivity(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    calib_images: int = 256,
    holdout: int = 1000,
    calibration: Calibration | None = None,
    convention: str = "operand-width",
    latency: bool = True,
    repeats: int = 20,
    seed: int = 0,
    progress: bool = True,
    workers: int = 1,
    ray_address: str | None = None,
) -> dict[str, Any]:
    """``lowbit sensitivity``: the table for an FP checkpoint, written to OUT
    (sensitivity.json, sensitivity.md, sensitivity.png). The first ``calib_images`` of a
    fixed-seed shuffle of the training split calibrate, the next ``holdout`` judge."""
    from . import data as data_mod
    from .train import build_from_checkpoint
    from .utils import atomic_write, write_json
    from .workflow import _check_input_shape, data_meta, environment, transforms_for

    if calib_images < 1 or holdout < 1:
        raise ValueError("--calib-images and --holdout must be at least 1")
    if not candidates:
        raise ValueError("give at least one candidate codec")
    for c in candidates:
        parse_weight_codec(c)  # a bad name fails before any work
    net, ckpt = build_from_checkpoint(checkpoint)
    if ckpt.get("recipe"):
        raise ValueError(f"{checkpoint} is already compressed; sensitivity starts from FP")
    name = data or (ckpt.get("data") or {}).get("name")
    if not name:
        raise ValueError(f"{checkpoint} does not record its data set: pass --data")
    train = data_mod.load(name, "train", data_dir)
    if calib_images + holdout > len(train):
        raise ValueError(
            f"--calib-images {calib_images} + --holdout {holdout} exceed the {len(train)} "
            f"training images of {name}"
        )
    train = train.subset(calib_images + holdout, seed=seed)
    _check_input_shape(ckpt, train, checkpoint, name)
    _, test_tf = transforms_for(data_meta(train), augment=False)
    x = test_tf(torch.as_tensor(train.images))
    y = torch.as_tensor(train.labels, dtype=torch.long)
    t0 = time.perf_counter()
    result = layer_sensitivity(
        net, x[:calib_images], x[calib_images:], y[calib_images:], candidates, calibration,
        convention, latency, repeats, progress, workers, ray_address,
    )  # fmt: skip
    result = {
        "model": ckpt["model"]["name"],
        "data": data_mod.canonical_name(name),
        "checkpoint": str(checkpoint),
        **result,
        "seconds": round(time.perf_counter() - t0, 3),
        "environment": environment(),
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "sensitivity.json", result)
    with atomic_write(out / "sensitivity.md", "w") as f:
        f.write(f"# Per-layer sensitivity: {result['model']} on {result['data']}\n\n")
        f.write(format_table(result) + "\n")
    result["plot"] = plot(result, out / "sensitivity.png")
    result["out"] = str(out)
    return result
