"""``lowbit demo``: a short tour on the built-in MNIST sample, no download needed.

Each row trains (or compresses) a small model suited to one method and reports what
was gained. The foundation row is the full-precision LeNet-5 every method is compared
with; each method adds its own row in ``DEMO_ROWS`` as it lands.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cost import analyze
from .train import TrainConfig
from .workflow import compress_model, train_model


def _config(epochs: int, seed: int, quiet: bool, lr: float) -> TrainConfig:
    return TrainConfig(
        epochs=epochs, batch_size=64, optimizer="sgd", lr=lr, weight_decay=5e-4,
        schedule="cosine", seed=seed, progress=not quiet,
    )  # fmt: skip


def _fp_row(out: Path, epochs: int, seed: int, quiet: bool) -> dict[str, Any]:
    from .train import build_from_checkpoint

    result = train_model("lenet5", "sample", out / "fp-lenet5", _config(epochs, seed, quiet, 0.05))
    net, _ = build_from_checkpoint(result["checkpoint"])
    report = analyze(net)
    return {
        "method": "fp32",
        "model": "lenet5",
        "test_accuracy": result["test_accuracy"],
        "fp_test_accuracy": result["test_accuracy"],
        "params": report["totals"]["params"],
        "storage_bytes": report["totals"]["storage_bytes"],
        "compression_vs_fp32": report["ratios"]["storage_vs_fp32"],
        "energy_vs_fp16": report["ratios"]["energy_vs_fp16"],
        "density": report["totals"]["density"],
        "seconds": result["seconds"],
        "checkpoint": result["checkpoint"],
    }


def _method_row(method: str, model: str, qat: dict[str, Any] | None = None, **options):
    """A demo row that trains ``model`` in FP, then compresses it with ``method`` (QAT with
    SGD lr 0.01 unless ``qat`` overrides TrainConfig fields)."""

    def row(out: Path, epochs: int, seed: int, quiet: bool) -> dict[str, Any]:
        from dataclasses import replace

        from . import models

        res = compress_model(
            method, model, "sample", out / f"{method}-{model}",
            config=replace(_config(epochs, seed, quiet, 0.01), **(qat or {})),
            fp_config=_config(epochs, seed, quiet, 0.1),
            method_options=options,
        )  # fmt: skip
        return {
            "method": method,
            "model": model,
            "test_accuracy": res["test_accuracy"],
            "fp_test_accuracy": res["fp_test_accuracy"],
            "params": models.count_params(models.create(model)),
            "storage_bytes": res["storage_bytes"],
            "compression_vs_fp32": res["compression_vs_fp32"],
            "energy_vs_fp16": res["energy_vs_fp16"],
            "density": res["density"],
            "seconds": res["seconds"],
            "checkpoint": res["checkpoint"],
        }

    return row


_ADAM = {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}


def _burn_row(out: Path, epochs: int, seed: int, quiet: bool) -> dict[str, Any]:
    """BURN trains without labels from a self-supervised FP target; its own row function
    (a narrow ResNet-20 on 512 sample images, accuracy by linear probe)."""
    from .methods.burn import demo_row

    return demo_row(out, epochs, seed, quiet)


#: (name, function) pairs run in order; later issues append their method's row.
DEMO_ROWS: list[tuple[str, Callable[[Path, int, int, bool], dict[str, Any]]]] = [
    ("fp32", _fp_row),
    ("prom", _method_row("prom", "mobilenet_tiny")),
    # SBNN trains with Adam (its paper's optimizer), density target 5%
    ("sbnn", _method_row("sbnn", "lenet5", qat=_ADAM, density=0.05)),
    # SST(8, 2) on the paper's fully connected net: 1 bit per weight, additions only
    ("sst", _method_row("sst", "lenet300", n=8, k=2)),
    # BURN: label-free; test accuracy = linear probe, FP acc = the FP target's probe
    ("burn", _burn_row),
    # Bayesian compression (GNJ prior): posterior training with Adam, then pruning and bits
    ("bayes", _method_row("bayes", "lenet5", qat={**_ADAM, "schedule": "constant"}, prior="gnj")),
    # auto: a codec per layer for a budget of 1/10 of LeNet-5's fp32 bytes (1.72 MB), from
    # the per-layer sensitivity table (PTQ, 256 calibration + 1,000 held-out train images)
    ("auto", _method_row("auto", "lenet5", max_bytes=172_000, calib_images=256, holdout=1000)),
]


def run_demo(
    out: str | os.PathLike = "lowbit-demo", epochs: int = 3, seed: int = 0, quiet: bool = False
) -> dict[str, Any]:
    """Run every demo row; returns ``{"data": "sample", "rows": [...], "seconds": ...}``."""
    out = Path(out)
    t0 = time.perf_counter()
    rows = [fn(out, epochs, seed, quiet) for _, fn in DEMO_ROWS]
    return {
        "data": "sample",
        "epochs": epochs,
        "seed": seed,
        "rows": rows,
        "out": str(out),
        "seconds": round(time.perf_counter() - t0, 1),
    }


def format_table(result: dict[str, Any]) -> str:
    """The demo's result table as aligned text."""
    head = ["method", "model", "test acc", "FP acc", "params", "storage", "vs fp32",
            "energy vs fp16", "density", "train s"]  # fmt: skip
    lines = [head]
    for r in result["rows"]:
        lines.append(
            [
                r["method"],
                r["model"],
                f"{100 * r['test_accuracy']:.2f}%",
                f"{100 * r['fp_test_accuracy']:.2f}%",
                f"{r['params']:,}",
                _human_bytes(r["storage_bytes"]),
                f"x{r['compression_vs_fp32']:.1f}",
                f"x{r['energy_vs_fp16']:.2f}",
                f"{r['density']:.2f}",
                f"{r['seconds']:.1f}",
            ]
        )
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = [
        "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in lines
    ]
    text.insert(1, "  ".join("-" * w for w in widths))
    note = (
        f"\nBuilt-in MNIST sample (6,000 train / 1,000 test digits), {result['epochs']} epochs, "
        f"seed {result['seed']}; {result['seconds']:.0f} s in all. Outputs in {result['out']}/\n"
        "Compressed rows: FP training, then QAT with the method (train s = the QAT part); "
        "storage and energy ratios are baseline over lowbit (energy: operand-width "
        "convention, Horowitz 45 nm)."
    )
    return "\n".join(text) + note


def _human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
