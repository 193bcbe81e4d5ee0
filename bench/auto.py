"""Compression to a budget (issue 9): PTQ int8 against FP, and auto against single methods.

Parts (``--part``, default all; results merge into bench/results/auto.json and auto.md):

- ``ptq``: ``resnet20`` on CIFAR-10 (FP checkpoint ``--fp``, trained here with
  ``--fp-epochs`` when missing), PTQ with int8 weights and activations on every layer, no
  retraining, for each calibration rule (512 training images); full test set.
- ``auto``: from the same FP model, at equal QAT budget (``--qat-epochs``): ``--method
  auto`` with a byte budget of 1/10 of fp32 and an energy budget of 1/20 of fp16, and the
  single methods that can meet that budget (SST (8, 2), SBNN at density 0.05); each
  checked against the budget on its packed file (bytes) and frozen cost model (energy).

Runs live under bench/runs/auto and resume (a finished run's result.json is reused).

    LOWBIT_DATA=../shared/data python bench/auto.py --part ptq
    LOWBIT_DATA=../shared/data python bench/auto.py --part auto --qat-epochs 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lowbit.ptq import Calibration, uniform_recipe  # noqa: E402
from lowbit.train import TrainConfig  # noqa: E402
from lowbit.utils import write_json  # noqa: E402
from lowbit.workflow import analyze_model, compress_model, ptq_model, train_model  # noqa: E402

RESULTS = HERE / "results" / "auto.json"
RUNS = HERE / "runs" / "auto"


def _fp(args) -> str:
    ckpt = Path(args.fp) if args.fp else RUNS / "resnet20-fp" / "last.pt"
    if ckpt.is_file():
        return str(ckpt)
    cfg = TrainConfig(epochs=args.fp_epochs, batch_size=128, lr=0.1, seed=args.seed)
    res = train_model("resnet20", "cifar10", ckpt.parent, cfg, limit_test=args.limit_test)
    return res["checkpoint"]


def part_ptq(args) -> dict:
    fp = _fp(args)
    rows = []
    for rule in ("percentile", "mse", "minmax"):
        out = RUNS / f"ptq-int8-{rule}"
        done = out / "result.json"
        if done.is_file():
            res = json.loads(done.read_text())
        else:
            res = ptq_model(fp, out, uniform_recipe("int8", "int8"),
                            calibration=Calibration(method=rule), calib_images=512,
                            limit_test=args.limit_test, seed=args.seed)  # fmt: skip
        rows.append({
            "calibration": rule,
            "fp_accuracy": res["fp_test_accuracy"],
            "ptq_accuracy": res["test_accuracy"],
            "gap_points": 100 * (res["fp_test_accuracy"] - res["test_accuracy"]),
            "frozen_agreement": res["frozen_agreement"],
            "compression_vs_fp32": res["compression_vs_fp32"],
            "seconds": res["seconds"],
        })  # fmt: skip
    return {"fp_checkpoint": fp, "fp_training": _fp_training(fp), "rows": rows}


def _fp_training(ckpt: str) -> dict:
    """How the FP model was trained (its run's config.json and result.json)."""
    d = Path(ckpt).parent
    if not (d / "result.json").is_file():
        return {}
    res = json.loads((d / "result.json").read_text())
    cfg = json.loads((d / "config.json").read_text()) if (d / "config.json").is_file() else {}
    argv = " ".join(cfg.get("environment", {}).get("argv", [])[1:])
    return {"epochs": res["epochs"], "seconds": res["seconds"], "seed": res["seed"],
            "test_accuracy": res["test_accuracy"], "command": f"lowbit {argv}"}  # fmt: skip


def part_auto(args) -> dict:
    fp = _fp(args)
    base = analyze_model("resnet20")["baselines"]
    budget = {"max_bytes": base["fp32_storage_bytes"] / 10,
              "max_energy_pj": base["fp16_energy_pj"] / 20}  # fmt: skip
    sgd = TrainConfig(epochs=args.qat_epochs, batch_size=128, lr=0.01, seed=args.seed)
    adam = TrainConfig(epochs=args.qat_epochs, batch_size=128, optimizer="adam", lr=1e-3,
                       weight_decay=0.0, seed=args.seed)  # fmt: skip
    runs = {
        "auto": ("auto", sgd, {**budget, "calib_images": 256, "holdout": 1000}),
        "sst-8-2": ("sst", sgd, {"n": 8, "k": 2}),
        "sbnn-0.05": ("sbnn", adam, {"density": 0.05}),
    }
    rows = []
    for name, (method, cfg, opts) in runs.items():
        if args.only and name not in args.only:
            continue
        out = RUNS / name
        done = out / "result.json"
        t0 = time.perf_counter()
        if done.is_file() and json.loads(done.read_text()).get("packed"):
            res = json.loads(done.read_text())
        else:
            res = compress_model(method, "resnet20", "cifar10", out, cfg, from_checkpoint=fp,
                                 limit_test=args.limit_test, method_options=opts,
                                 resume=(out / "qat" / "last.pt").is_file())  # fmt: skip
        rows.append({
            "run": name,
            "test_accuracy": res["test_accuracy"],
            "fp_accuracy": res["fp_test_accuracy"],
            "storage_bytes": res["storage_bytes"],
            "energy_pj": res["energy_pj"],
            "compression_vs_fp32": res["compression_vs_fp32"],
            "energy_vs_fp16": res["energy_vs_fp16"],
            "meets_bytes": res["storage_bytes"] <= budget["max_bytes"],
            "meets_energy": res["energy_pj"] <= budget["max_energy_pj"],
            "qat_epochs": res["epochs"],
            "qat_seconds": res["seconds"],
            "wall_seconds": round(time.perf_counter() - t0, 1),
            "plan": res.get("plan"),
        })  # fmt: skip
        if name == "auto":
            png = out / "sensitivity" / "sensitivity.png"
            if png.is_file():
                shutil.copyfile(png, HERE / "results" / "auto_sensitivity_resnet20.png")
    return {"fp_checkpoint": fp, "budget": budget, "rows": rows}


def _md(res: dict) -> str:
    lines = ["# Compression to a budget (issue 9)", ""]
    env = res.get("environment", {})
    if "ptq" in res:
        p = res["ptq"]
        lines += [
            "## PTQ int8 on ResNet-20, CIFAR-10 (no retraining)",
            "",
            f"Command: `{p['command']}`. FP model: `{p['fp_checkpoint']}`; int8 weights "
            "(per channel) and int8 activations on every layer; 512 calibration images from "
            "the training split; accuracy on the full test set (10,000 images).",
            "",
            *(
                [
                    f"FP training: `{t['command']}` ({t['epochs']} epochs, {t['seconds']:.0f} s, "
                    f"seed {t['seed']}, test accuracy {100 * t['test_accuracy']:.2f}%).",
                    "",
                ]
                if (t := p.get("fp_training"))
                else []
            ),
            "| calibration | FP | PTQ int8 | gap (points) | frozen = PTQ | vs fp32 | seconds |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in p["rows"]:
            lines.append(
                f"| {r['calibration']} | {100 * r['fp_accuracy']:.2f}% | "
                f"{100 * r['ptq_accuracy']:.2f}% | {r['gap_points']:.2f} | "
                f"{100 * r['frozen_agreement']:.2f}% | x{r['compression_vs_fp32']:.2f} | "
                f"{r['seconds']:.0f} |"
            )
        lines.append("")
    if "auto" in res:
        a = res["auto"]
        lines += [
            "## Auto against single methods at equal QAT budget (ResNet-20, CIFAR-10)",
            "",
            f"Command: `{a['command']}`. Budget: {a['budget']['max_bytes']:,.0f} B "
            f"(fp32 / 10) and {a['budget']['max_energy_pj']:.4g} pJ (fp16 / 20). All runs "
            f"start from the same FP model and train the same QAT epochs; auto's sensitivity "
            "pass (PTQ only, no training) is extra time, in wall seconds.",
            "",
            "| run | test acc | FP | bytes | vs fp32 | energy vs fp16 | meets bytes | meets "
            "energy | QAT epochs | QAT s | wall s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in a["rows"]:
            lines.append(
                f"| {r['run']} | {100 * r['test_accuracy']:.2f}% | {100 * r['fp_accuracy']:.2f}% "
                f"| {r['storage_bytes']:,.0f} | x{r['compression_vs_fp32']:.1f} | "
                f"x{r['energy_vs_fp16']:.1f} | {r['meets_bytes']} | {r['meets_energy']} | "
                f"{r['qat_epochs']} | {r['qat_seconds']:.0f} | {r['wall_seconds']:.0f} |"
            )
        plans = [r for r in a["rows"] if r.get("plan")]
        if plans:
            lines += ["", "Auto's plan (codec per layer): " + ", ".join(
                f"{k}={v}" for k, v in plans[0]["plan"].items())]  # fmt: skip
        lines.append("")
    lines.append(f"Machine: {env.get('machine', '?')}, {env.get('threads', '?')} threads, CPU.")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("ptq", "auto", "all"), default="all")
    ap.add_argument("--fp", help="FP resnet20 checkpoint (default: train one)")
    ap.add_argument("--fp-epochs", type=int, default=10)
    ap.add_argument("--qat-epochs", type=int, default=3)
    ap.add_argument("--only", nargs="*", help="auto part: only these runs")
    ap.add_argument("--limit-test", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not os.environ.get("LOWBIT_DATA"):
        sys.exit("set LOWBIT_DATA to the folder with cifar10/")
    torch.set_num_threads(args.threads)
    res = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    cmd = "LOWBIT_DATA=../shared/data python bench/auto.py " + " ".join(sys.argv[1:])
    if args.part in ("ptq", "all"):
        res["ptq"] = {**part_ptq(args), "command": cmd}
    if args.part in ("auto", "all"):
        res["auto"] = {**part_auto(args), "command": cmd}
    res["environment"] = {"machine": platform.processor() or platform.machine(),
                          "threads": args.threads, "torch": torch.__version__}  # fmt: skip
    write_json(RESULTS, res)
    RESULTS.with_suffix(".md").write_text(_md(res))
    print(RESULTS.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
