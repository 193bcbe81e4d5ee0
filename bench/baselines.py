"""Full-precision reference points every compression method is compared with.

Trains each baseline with a budget that fits this 2-core machine and writes
``bench/results/baselines.json`` and ``bench/results/baselines.md``. Runs are
resumable: rerunning the script continues any run that stopped (from its
``last.pt``) and skips finished ones.

    LOWBIT_DATA=../shared/data python bench/baselines.py            # all runs
    LOWBIT_DATA=../shared/data python bench/baselines.py --only lenet5-mnist
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lowbit.train import TrainConfig, load_checkpoint  # noqa: E402
from lowbit.utils import write_json  # noqa: E402
from lowbit.workflow import train_model  # noqa: E402

# name -> (model, model kwargs, data set, training options, limit_train)
# Budgets: LeNet-5 runs about 19 s per MNIST epoch here; ResNet-20 about 2.3 min per
# CIFAR-10 epoch; MobileNetV2 (CIFAR) about 11 min per epoch at width 1, so it runs at
# width 0.5.
RUNS: dict[str, dict] = {
    "lenet5-mnist": dict(
        model="lenet5", kwargs={}, data="mnist", limit_train=None,
        config=dict(epochs=8, batch_size=128, optimizer="sgd", lr=0.05, weight_decay=5e-4),
    ),
    "lenet5-fashion-mnist": dict(
        model="lenet5", kwargs={}, data="fashion-mnist", limit_train=None,
        config=dict(epochs=8, batch_size=128, optimizer="sgd", lr=0.05, weight_decay=5e-4),
    ),
    "resnet20-cifar10": dict(
        model="resnet20", kwargs={}, data="cifar10", limit_train=None,
        config=dict(epochs=10, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=5e-4,
                    warmup_epochs=1),
    ),
    "mobilenetv2-w0.5-cifar10": dict(
        model="mobilenetv2", kwargs={"width": 0.5}, data="cifar10", limit_train=None,
        config=dict(epochs=5, batch_size=128, optimizer="sgd", lr=0.1, weight_decay=4e-5,
                    warmup_epochs=1),
    ),
}  # fmt: skip


def run_one(name: str, spec: dict, root: Path, seed: int, threads: int) -> dict:
    out = root / name
    config = TrainConfig(**spec["config"], seed=seed, progress=sys.stderr.isatty())
    resume = None
    last = out / "last.pt"
    if last.exists():
        ckpt = load_checkpoint(last)
        if ckpt.get("epoch", 0) >= config.epochs and (out / "result.json").exists():
            print(f"[{name}] already finished", file=sys.stderr)
            return json.loads((out / "result.json").read_text())
        resume = last
        print(f"[{name}] resuming from {last} (epoch {ckpt.get('epoch')})", file=sys.stderr)
    t0 = time.perf_counter()
    res = train_model(
        spec["model"], spec["data"], out, config, model_kwargs=spec["kwargs"],
        limit_train=spec["limit_train"], resume=resume,
    )  # fmt: skip
    res["wall_seconds_this_call"] = round(time.perf_counter() - t0, 1)
    res["threads"] = threads
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", choices=sorted(RUNS), help="run only these")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs-dir", default=str(HERE / "runs" / "baselines"))
    args = ap.parse_args()
    if not os.environ.get("LOWBIT_DATA"):
        sys.exit("set LOWBIT_DATA to the folder holding mnist/, fashion-mnist/, cifar10/")
    torch.set_num_threads(args.threads)
    results_path = HERE / "results" / "baselines.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for name in args.only or list(RUNS):
        spec = RUNS[name]
        res = run_one(name, spec, Path(args.runs_dir), args.seed, args.threads)
        results[name] = {
            "model": spec["model"],
            "model_kwargs": spec["kwargs"],
            "data": spec["data"],
            "train_samples": res["train_samples"],
            "test_samples": res["test_samples"],
            "epochs": res["epochs"],
            "train_seconds": res["seconds"],
            "test_accuracy": res["test_accuracy"],
            "best_test_accuracy": res["best_test_accuracy"],
            "seed": args.seed,
            "threads": args.threads,
            "config": spec["config"],
            "command": f"LOWBIT_DATA=../shared/data python bench/baselines.py --only {name}",
        }
        write_json(results_path, results)
        write_markdown(results, HERE / "results" / "baselines.md")
        print(f"[{name}] test accuracy {100 * res['test_accuracy']:.2f}%", file=sys.stderr)


def write_markdown(results: dict, path: Path) -> None:
    lines = [
        "# Full-precision baselines",
        "",
        "Produced by `bench/baselines.py` on the 2-core development machine (CPU, PyTorch "
        "fp32). Test accuracy is after the last epoch; seconds are training time only.",
        "",
        "| run | model | data | train / test samples | epochs | seconds | test acc | best | seed |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        kw = "".join(f", {k}={v}" for k, v in r["model_kwargs"].items())
        lines.append(
            f"| {name} | {r['model']}{kw} | {r['data']} | {r['train_samples']:,} / "
            f"{r['test_samples']:,} | {r['epochs']} | {r['train_seconds']:.0f} | "
            f"{100 * r['test_accuracy']:.2f}% | {100 * r['best_test_accuracy']:.2f}% | "
            f"{r['seed']} |"
        )
    lines += ["", "Training options per run are in `baselines.json` (`config`)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
