"""Bayesian compression on MNIST: LeNet-5 (GNJ and GHS) and LeNet-300-100, against the paper.

Runs (each resumable: rerun the same command to continue; a finished run is only re-read):

- ``fp-lenet5``, ``fp-lenet300``: the FP starting points (``--fp-epochs`` epochs, Adam 1e-3);
- ``lenet5-gnj``, ``lenet5-ghs``, ``lenet300-gnj`` (and ``lenet300-ghs`` with ``--all``):
  Bayesian training from the FP weights, ``--epochs5`` / ``--epochs300`` epochs, Adam 1e-3
  constant, batch 128, no weight decay, then pruning by the default thresholds, unit
  removal, bits from the posterior (the authors' unit round-off rule), freeze and pack;
- speed: the removed-unit model against the original (masked, full-size) model in PyTorch
  at batch 256, one thread, median of ``--repeats`` timings of ``--iters`` forward passes
  each; and whether both give the same predictions on the whole test set.

Writes ``bench/results/bayes.json`` and ``bench/results/bayes.md``.

    LOWBIT_DATA=../shared/data python bench/bayes.py
    LOWBIT_DATA=../shared/data python bench/bayes.py --epochs5 1 --epochs300 1 --fp-epochs 1 \\
        --limit-train 2000 --limit-test 500 --runs-dir /tmp/bz --results-dir /tmp/bz
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lowbit.methods import bayes  # noqa: E402
from lowbit.train import TrainConfig, load_checkpoint  # noqa: E402
from lowbit.utils import write_json  # noqa: E402
from lowbit.workflow import load_splits, train_model, transforms_for  # noqa: E402

TARGETS = {"lenet5": {"error": 1.2, "compression": 150},
           "lenet300": {"error": 2.0, "compression": 40}}  # fmt: skip


def _done(path: Path, epochs: int) -> bool:
    return path.exists() and load_checkpoint(path).get("epoch", 0) >= epochs


@torch.no_grad()
def _time(net, x, iters: int, repeats: int) -> float:
    """Median over ``repeats`` of the mean milliseconds per forward pass."""
    net.eval()
    net(x)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            net(x)
        out.append(1000 * (time.perf_counter() - t0) / iters)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fp-epochs", type=int, default=3)
    ap.add_argument("--epochs5", type=int, default=10, help="Bayesian epochs, LeNet-5")
    ap.add_argument("--epochs300", type=int, default=30, help="Bayesian epochs, LeNet-300-100")
    ap.add_argument("--lr-scale", type=float, default=None,
                    help="bayes option lr_scale (default: the method's)")  # fmt: skip
    ap.add_argument("--finetune", type=int, default=0,
                    help="bayes option finetune_epochs: epochs with the mask fixed")  # fmt: skip
    ap.add_argument(
        "--thresholds5",
        help="per-layer pruning thresholds of the LeNet-5 runs, "
        "e.g. 'fc2=-4' (bayes option thresholds; default: -3 everywhere)",
    )
    ap.add_argument(
        "--thresholds300",
        help="the same for LeNet-300-100; the authors used 'fc1=-2.8,fc2=-3,fc3=-5'",
    )
    ap.add_argument(
        "--qat", type=int, default=0,
        help="bayes option qat_epochs: QAT epochs of the pruned fixed-point model",
    )  # fmt: skip
    ap.add_argument("--all", action="store_true", help="also lenet300 with the GHS prior")
    ap.add_argument("--only", help="comma-separated run names to do now (others: re-read)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--runs-dir", default=str(HERE / "runs" / "bayes"))
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    args = ap.parse_args()
    if not os.environ.get("LOWBIT_DATA"):
        sys.exit("set LOWBIT_DATA to the folder holding mnist/")
    torch.set_num_threads(args.threads)
    root, res_dir = Path(args.runs_dir), Path(args.results_dir)
    res_dir.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty()
    limits = {"limit_train": args.limit_train, "limit_test": args.limit_test}
    runs = [("lenet5-gnj", "lenet5", "gnj"), ("lenet5-ghs", "lenet5", "ghs"),
            ("lenet300-gnj", "lenet300", "gnj")]  # fmt: skip
    if args.all:
        runs.append(("lenet300-ghs", "lenet300", "ghs"))
    only = set(args.only.split(",")) if args.only else None
    results_path = res_dir / "bayes.json"
    previous = {}
    if results_path.exists():
        old = json.loads(results_path.read_text())
        previous = {r["run"]: r for r in old.get("results", [])}
        for r in previous.values():  # rows written before each row recorded its FP start
            r.setdefault("fp_start", old.get("fp", {}).get(r["model"]))

    fps = {}
    todo = [r for r in runs if only is None or r[0] in only]
    for model in sorted({m for _, m, _ in todo}):
        # one FP start per model and FP budget, so a rerun at another --fp-epochs does not
        # overwrite the start the other rows came from
        d = root / (f"fp-{model}" if args.fp_epochs == 3 else f"fp-{model}-{args.fp_epochs}ep")
        if not _done(d / "last.pt", args.fp_epochs):
            cfg = TrainConfig(epochs=args.fp_epochs, batch_size=128, optimizer="adam", lr=1e-3,
                              weight_decay=0.0, seed=args.seed, progress=progress)  # fmt: skip
            last = d / "last.pt"
            train_model(model, "mnist", d, cfg, resume=last if last.exists() else None, **limits)
        ck = load_checkpoint(d / "last.pt")
        fps[model] = {"checkpoint": str(d / "last.pt"), "epochs": ck["epoch"],
                      "test_accuracy": ck["history"][-1].get("test_accuracy"),
                      "seconds": round(sum(h["seconds"] for h in ck["history"]), 1)}  # fmt: skip

    results = []
    for name, model, prior in runs:
        if only is not None and name not in only:
            if name in previous:
                results.append(previous[name])
            continue
        epochs = args.epochs5 if model == "lenet5" else args.epochs300
        opts = {"prior": prior}
        thr = args.thresholds5 if model == "lenet5" else args.thresholds300
        out = root / name
        if thr:  # another pruning rule: its own run folder (the mask is set before fine-tuning)
            opts["thresholds"] = thr
            out = root / (name + "-thr" + thr.replace("=", "").replace(",", "_"))
        if args.qat:  # the Bayesian run is the same; only its end differs
            opts["qat_epochs"] = args.qat
            out = out.with_name(out.name + f"-qat{args.qat}")
        if args.lr_scale is not None:
            opts["lr_scale"] = args.lr_scale
        if args.finetune:
            opts["finetune_epochs"] = args.finetune
        cfg = TrainConfig(epochs=epochs, batch_size=128, optimizer="adam", lr=1e-3,
                          weight_decay=0.0, schedule="constant", seed=args.seed,
                          progress=progress)  # fmt: skip
        r = bayes.compress_model("bayes", model, "mnist", out, cfg,
                                 from_checkpoint=fps[model]["checkpoint"], method_options=opts,
                                 resume=True, **limits)  # fmt: skip
        speed = _speed(out, model, args, limits)
        b = r["bayes"]
        err = 100 * (1 - r["test_accuracy"])
        t = TARGETS[model]
        results.append({
            "run": name, "model": model, "prior": prior, "options": opts, "seed": args.seed,
            "fp_start": fps[model],
            "epochs": r["epochs"], "finetune_epochs": r.get("finetune_epochs", 0),
            "qat_epochs": args.qat,
            "accuracy_before_qat": r["bayes"].get("accuracy_fixed_point_before_qat"),
            "seconds": r["seconds"], "threads": args.threads,
            "command": "LOWBIT_DATA=../shared/data python " + " ".join(sys.argv),
            "fp_test_accuracy": r["fp_test_accuracy"], "test_accuracy": r["test_accuracy"],
            "test_error_pct": err, "packed_file_accuracy": r["frozen_test_accuracy"],
            "frozen_agreement": r["frozen_agreement"],
            "architecture": b["architecture"], "architecture_original": b["architecture_original"],
            "compression_pruned": b["compression_pruned"],
            "compression_vs_fp32": r["compression_vs_fp32"],
            "compression_authors_count": b["compression_authors_count"],
            "bits_per_weight": b["bits_per_weight"],
            "authors_bits_per_weight": b["authors_bits_per_weight"],
            "storage_bytes": r["storage_bytes"], "packed_bytes": r["packed_bytes"],
            "layers": b["layers"], "accuracy_masked": b["accuracy_masked"],
            "accuracy_pruned": b["accuracy_pruned"],
            "accuracy_posterior_mean": b["accuracy_posterior_mean"],
            "pruned_same_predictions": b["pruned_same_predictions"], "speed": speed,
            "paper": (b.get("paper") or {}).get(prior),
            "target": t, "meets_error": err <= t["error"],
            "meets_compression": r["compression_vs_fp32"] >= t["compression"],
        })  # fmt: skip
        _write(res_dir, args, results, limits)
    _write(res_dir, args, results, limits)
    print((res_dir / "bayes.md").read_text())


def _speed(out: Path, model: str, args, limits) -> dict:
    """PyTorch batch-256 timing of the removed-unit model against the masked original."""
    cfg_d = json.loads((out / "config.json").read_text())
    cfg = bayes.BayesConfig(**cfg_d["recipe"]["options"])
    bnet = bayes.load_bayes_run(out)
    _, test = load_splits("mnist", None, None, limits["limit_test"], 0)
    _, test_tf = transforms_for({"name": "mnist"})
    example = torch.zeros(1, 1, 28, 28)
    order = bayes._layer_order(bnet, example)
    pq = bayes.prune_and_quantize(bnet, cfg, example, order)
    images = test_tf(torch.as_tensor(test.images[:256]))
    t_masked = _time(pq["masked"], images, args.iters, args.repeats)
    t_small = _time(pq["small"], images, args.iters, args.repeats)
    return {"batch": 256, "threads": torch.get_num_threads(), "iters": args.iters,
            "repeats": args.repeats, "original_ms": t_masked, "removed_ms": t_small,
            "speedup": t_masked / t_small}  # fmt: skip


def _write(res_dir, args, results, limits) -> None:
    payload = {
        "command": "LOWBIT_DATA=../shared/data python " + " ".join(sys.argv),
        "data": "mnist", "seed": args.seed, "threads": args.threads, **limits,
        "training": "Adam 1e-3 constant, batch 128, no weight decay, KL / N_train, from the FP "
        "weights", "results": results,
    }  # fmt: skip
    write_json(res_dir / "bayes.json", payload)
    (res_dir / "bayes.md").write_text(_markdown(payload))


def _markdown(d) -> str:
    lines = [
        "# Bayesian compression on MNIST", "",
        f"{d['training']}; {d['threads']} thread(s), seed "
        f"{d['seed']}. FP starts (Adam 1e-3; each row names its own): " + ", ".join(
            f"{r['run']} from {r['model']} {v['epochs']} epochs ({100 * v['test_accuracy']:.2f}%, "
            f"{v['seconds']:.0f} s)" for r in d["results"] for v in [r["fp_start"]]) + ".", "",
        "Epochs include the fine-tuning epochs with the mask fixed and the QAT epochs of the "
        "pruned fixed-point model (bayes option qat_epochs, not in the paper; the error before "
        "them in brackets); seconds are training "
        "seconds (the machine was shared, so they vary).", "",
        "| run | epochs | seconds | error | pruned architecture | x pruned | x stored "
        "(everything) | x authors' count | bits/w lowbit / authors | paper | target met |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in d["results"]:
        p = r.get("paper") or {}
        t = r["target"]
        met = (f"error {'yes' if r['meets_error'] else 'NO'} (<= {t['error']}%), "
               f"x{t['compression']} {'yes' if r['meets_compression'] else 'NO'}")  # fmt: skip
        pre = ""
        if r.get("qat_epochs"):
            pre = f" ({100 * (1 - r['accuracy_before_qat']):.2f}%)"
        lines.append(
            f"| {r['run']} | {r['epochs']} | {r['seconds']:.0f} | "
            f"{r['test_error_pct']:.2f}%{pre} | "
            f"{r['architecture']} (of {r['architecture_original']}) | "
            f"x{r['compression_pruned']:.1f} | x{r['compression_vs_fp32']:.1f} | "
            f"x{r['compression_authors_count']:.1f} | {r['bits_per_weight']:.2f} / "
            f"{r['authors_bits_per_weight']:.2f} | {p.get('error', '-')}%, "
            f"x{p.get('compression', '-')}, {p.get('architecture', '-')} | {met} |"
        )
    lines += ["", "Commands (one per run; each run resumable):", ""]
    lines += [f"- {r['run']}: `{r['command']}`" for r in d["results"]]
    lines += ["", "Per layer (kept groups / groups, fraction bits from the rule, stored bits per "
              "weight):", ""]  # fmt: skip
    for r in d["results"]:
        parts = [f"{x['layer']} {x['kept_groups']}/{x['groups']} t={x['t_rule']} "
                 f"{x['bits_per_weight']}b" for x in r["layers"]]  # fmt: skip
        lines.append(f"- {r['run']}: " + "; ".join(parts))
    lines += ["", "Removed-unit model against the original architecture (masked), PyTorch, "
              "batch 256:", "",
              "| run | original ms | removed ms | speed-up | same predictions as masked |",
              "|---|---|---|---|---|"]  # fmt: skip
    for r in d["results"]:
        s = r["speed"]
        lines.append(
            f"| {r['run']} | {s['original_ms']:.2f} | {s['removed_ms']:.2f} | "
            f"x{s['speedup']:.2f} | {100 * r['pruned_same_predictions']:.2f}% |"
        )
    lines += [
        "",
        "x stored: the original fp32 model's bytes over the bytes lowbit stores (fixed-point "
        "codes, fp32 biases, everything). x authors' count: 32 N_original over the kept weights "
        "at the authors' 1 + exponent + significand bits (weights only). Timings: median of "
        "repeats, one thread.",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
