"""SBNN on ResNet-20 (CIFAR-10): accuracy against density and BOPs at equal budgets.

Runs (all from one FP checkpoint trained ``--fp-epochs`` epochs, then ``--epochs`` QAT
epochs each, Adam 1e-3, no weight decay, cosine, batch 128):

- ``fp``: the FP model trained ``--fp-epochs + --epochs`` epochs (the same total budget);
- ``bnn``: dense binary (``sbnn``, domain pm1, no constraint);
- ``sbnn-0.10``, ``sbnn-0.05``, ``sbnn-0.02``: SBNN (domain 01) at EC = 0.10 / 0.05 / 0.02,
  with the default remedy (projection from 50% to 75% of the steps);
- ``pruned-0.05``: the magnitude-pruned pm1 BNN at density 0.05 on the same schedule;
- every ``--seeds`` beyond the first repeats ``sbnn-0.05`` and ``pruned-0.05``.

Each run is resumable (rerun the same command to continue). Writes
``bench/results/sbnn.json``, ``sbnn.md``, ``sbnn_accuracy.png`` (accuracy against density
and against BOPs) and ``sbnn_kernels.png`` (the kernel-pattern histogram of one layer of
``sbnn-0.05``).

    LOWBIT_DATA=../shared/data python bench/sbnn.py
    LOWBIT_DATA=../shared/data python bench/sbnn.py --epochs 1 --limit-train 512 \\
        --limit-test 500 --fp-epochs 1 --runs-dir /tmp/sbnn-smoke --results-dir /tmp/sbnn-smoke
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

from lowbit.methods import sbnn  # noqa: E402  (registers sbnn and bnn-pruned)
from lowbit.train import TrainConfig, build_from_checkpoint, load_checkpoint  # noqa: E402
from lowbit.utils import write_json  # noqa: E402
from lowbit.workflow import compress_model, train_model  # noqa: E402

KERNEL_LAYER = "layer2.1.conv1"  # a binarized 3x3 conv in the middle of ResNet-20


def runs(seeds: list[int]) -> list[tuple[str, str, dict, int]]:
    """(name, method, options, seed) of every compressed run."""
    s0 = seeds[0]
    out = [("bnn", "sbnn", {"domain": "pm1", "density": 0.5}, s0)]
    out += [(f"sbnn-{d:.2f}", "sbnn", {"density": d}, s0) for d in (0.10, 0.05, 0.02)]
    out += [("pruned-0.05", "bnn-pruned", {"density": 0.05}, s0)]
    for s in seeds[1:]:
        out += [(f"sbnn-0.05-s{s}", "sbnn", {"density": 0.05}, s)]
        out += [(f"pruned-0.05-s{s}", "bnn-pruned", {"density": 0.05}, s)]
    return out


def _done(path: Path, epochs: int) -> bool:
    return path.exists() and load_checkpoint(path).get("epoch", 0) >= epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--fp-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=20, help="QAT epochs of every run")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs-dir", default=str(HERE / "runs" / "sbnn"))
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    args = ap.parse_args()
    if not os.environ.get("LOWBIT_DATA"):
        sys.exit("set LOWBIT_DATA to the folder holding cifar10/")
    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    root, res_dir = Path(args.runs_dir), Path(args.results_dir)
    res_dir.mkdir(parents=True, exist_ok=True)
    progress = sys.stderr.isatty()
    limits = {"limit_train": args.limit_train, "limit_test": args.limit_test}

    def fp_cfg(epochs, seed):
        return TrainConfig(epochs=epochs, batch_size=128, optimizer="sgd", lr=0.1,
                           weight_decay=5e-4, seed=seed, progress=progress)  # fmt: skip

    def qat_cfg(seed):
        return TrainConfig(epochs=args.epochs, batch_size=128, optimizer="adam", lr=1e-3,
                           weight_decay=0.0, seed=seed, progress=progress)  # fmt: skip

    # the shared FP start and the FP reference at the same total budget
    start_dir = root / "fp-start"
    if not _done(start_dir / "last.pt", args.fp_epochs):
        last = start_dir / "last.pt"
        train_model(args.model, "cifar10", start_dir, fp_cfg(args.fp_epochs, seeds[0]),
                    resume=last if last.exists() else None, **limits)  # fmt: skip
    fp_start = start_dir / "last.pt"
    total = args.fp_epochs + args.epochs
    fp_dir = root / "fp"
    if not (fp_dir / "result.json").exists() or not _done(fp_dir / "last.pt", total):
        last = fp_dir / "last.pt"
        train_model(args.model, "cifar10", fp_dir, fp_cfg(total, seeds[0]),
                    resume=last if last.exists() else None, **limits)  # fmt: skip
    fp = json.loads((fp_dir / "result.json").read_text())
    results = [{
        "run": "fp", "method": "fp32", "seed": seeds[0], "epochs": fp["epochs"],
        "seconds": fp["seconds"], "test_accuracy": fp["test_accuracy"], "density": 1.0,
        "bops": None,
    }]  # fmt: skip

    for name, method, opts, seed in runs(seeds):
        out = root / name
        t0 = time.perf_counter()
        if (out / "result.json").exists() and _done(out / "qat" / "last.pt", args.epochs):
            r = json.loads((out / "result.json").read_text())
        else:
            r = compress_model(method, args.model, "cifar10", out, qat_cfg(seed),
                               from_checkpoint=fp_start, method_options=opts, resume=True,
                               **limits)  # fmt: skip
        net, _ = build_from_checkpoint(out / "qat" / "last.pt")
        rows = sbnn.layer_report(net)
        row = {
            "run": name, "method": method, "options": opts, "seed": seed,
            "epochs": r["epochs"], "seconds": r["seconds"],
            "fp_start_accuracy": r["fp_test_accuracy"], "test_accuracy": r["test_accuracy"],
            "density": sbnn.weight_density(net),  # binarized layers
            "density_all_layers": r["density"], "bops": r["bops"],
            "zero_filters": sum(x["zero_filters"] for x in rows),
            "frozen_agreement": r.get("frozen_agreement"),
            "target": opts.get("density") if opts.get("density", 0.5) < 0.5 else None,
            "layers": rows, "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
        }  # fmt: skip
        if row["target"] is not None:
            row["meets_target"] = abs(row["density"] - row["target"]) <= 0.01
        results.append(row)
        if name == "sbnn-0.05":
            rep = sbnn.kernel_patterns(net, KERNEL_LAYER)
            row["kernel_patterns"] = rep
            sbnn.plot_kernel_patterns(rep, res_dir / "sbnn_kernels.png",
                                      f"SBNN EC=0.05, {args.model} {KERNEL_LAYER}")  # fmt: skip

    summary = _compare(results)
    payload = {
        "command": "LOWBIT_DATA=../shared/data python " + " ".join(sys.argv),
        "model": args.model, "data": "cifar10", "fp_epochs": args.fp_epochs,
        "qat_epochs": args.epochs, "seeds": seeds, "threads": args.threads, **limits,
        "budget": f"FP start {args.fp_epochs} epochs, then {args.epochs} epochs per run "
        f"(FP reference: {total} epochs)",
        "results": results, "comparison": summary,
    }  # fmt: skip
    write_json(res_dir / "sbnn.json", payload)
    (res_dir / "sbnn.md").write_text(_markdown(payload))
    _plot(results, res_dir / "sbnn_accuracy.png")
    print((res_dir / "sbnn.md").read_text())


def _compare(results) -> dict:
    """SBNN against the pruned BNN at EC = 0.05 over the seeds."""
    s = [r["test_accuracy"] for r in results if r["run"].startswith("sbnn-0.05")]
    p = [r["test_accuracy"] for r in results if r["run"].startswith("pruned-0.05")]
    if not s or not p:
        return {}
    ms, mp = sum(s) / len(s), sum(p) / len(p)
    return {
        "sbnn_0.05_accuracies": s, "pruned_0.05_accuracies": p,
        "sbnn_mean": ms, "pruned_mean": mp, "sbnn_better": ms > mp,
        "sbnn_better_every_seed": min(s) > max(p),
    }  # fmt: skip


def _markdown(d) -> str:
    lines = [
        f"# SBNN on {d['model']} (CIFAR-10)", "", f"Budget: {d['budget']}; seeds {d['seeds']}; "
        f"{d['threads']} threads. Command: `{d['command']}`", "",
        "| run | seed | epochs | seconds | test acc | density (binarized) | target met | "
        "BOPs | zero filters | frozen = QAT |", "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for r in d["results"]:
        met = "" if r.get("target") is None else ("yes" if r["meets_target"] else "NO")
        bops = f"{r['bops']:.3g}" if r.get("bops") else ""
        agree = f"{100 * r['frozen_agreement']:.2f}%" if r.get("frozen_agreement") else ""
        lines.append(
            f"| {r['run']} | {r['seed']} | {r['epochs']} | {r['seconds']:.0f} | "
            f"{100 * r['test_accuracy']:.2f}% | {r['density']:.4f} | {met} | {bops} | "
            f"{r.get('zero_filters', '')} | {agree} |"
        )
    c = d.get("comparison") or {}
    if c:
        verdict = "more" if c["sbnn_better"] else "NOT more"
        lines += ["", f"At EC = 0.05, SBNN is {verdict} accurate than the magnitude-pruned BNN "
                  f"on average: {100 * c['sbnn_mean']:.2f}% against {100 * c['pruned_mean']:.2f}% "
                  f"(per seed {[round(100 * a, 2) for a in c['sbnn_0.05_accuracies']]} vs "
                  f"{[round(100 * a, 2) for a in c['pruned_0.05_accuracies']]}; better at every "
                  f"seed: {c['sbnn_better_every_seed']})."]  # fmt: skip
    lines += [
        "",
        "Density: non-zero fraction of the binarized layers (first conv and classifier "
        "stay int8 and dense). BOPs: the cost report's, on non-zero weights; the pruned BNN "
        "stores {-a, 0, +a} as 2-bit ternary codes, so its BOPs count 2 weight bits.",
        "",
    ]
    return "\n".join(lines)


def _plot(results, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    styles = {"sbnn": ("o", "#3465a4", "SBNN (01)"), "bnn-pruned": ("s", "#cc0000",
              "pm1 BNN, magnitude-pruned"), "bnn": ("^", "#4e9a06", "dense pm1 BNN")}  # fmt: skip
    for r in results:
        if r["run"] == "fp":
            for ax in axes:
                ax.axhline(100 * r["test_accuracy"], color="grey", ls="--", lw=1)
            continue
        key = "bnn" if r["run"] == "bnn" else r["method"]
        marker, color, label = styles[key]
        for ax, x in zip(axes, (r["density"], r["bops"])):
            ax.scatter([x], [100 * r["test_accuracy"]], marker=marker, color=color, label=label)
    for ax, xl in zip(axes, ("density of the binarized layers", "BOPs (non-zero weights)")):
        ax.set_xscale("log")
        ax.set_xlabel(xl)
        ax.set_ylabel("test accuracy (%)")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
    fig.suptitle("ResNet-20 CIFAR-10: accuracy against density and BOPs (dashed: FP)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
