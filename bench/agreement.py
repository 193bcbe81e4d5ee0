"""Whole zoo models, every method: does the packed file, run by lowbit's runtime, predict
what the frozen model predicts, on the whole test set?

For each method one zoo model is compressed with a short budget through the command
line (``lowbit compress ... --json``: FP training, QAT, freeze, pack), then the packed
file is run on the full test set (``lowbit run FILE --data D --check --json``: the
runtime's predictions against the PyTorch reference executor of the same file). Two
agreements are reported per model: frozen model vs QAT model (from ``compress``) and
runtime vs frozen model (from ``run --check``). The budgets are small on purpose: this
checks the chain QAT -> freeze -> file -> kernels on real data and whole networks, not
accuracy (the method benchmarks report accuracy at real budgets).

Resumable: a case whose folder holds ``agreement.json`` is not run again.

    LOWBIT_DATA=../shared/data python bench/agreement.py
    LOWBIT_DATA=../shared/data python bench/agreement.py --only prom,sst
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# (case, method, model, data, extra compress arguments). Budgets: about a minute or two
# each on one core of the 2-core machine.
CASES = [
    ("sbnn-vgg_small", "sbnn", "vgg_small", "cifar10",
     ["--model-arg", "width=0.25", "--fp-epochs", "1", "--epochs", "1",
      "--limit-train", "5000"]),
    ("prom-mobilenetv2", "prom", "mobilenetv2", "cifar10",
     ["--model-arg", "width=0.5", "--fp-epochs", "1", "--epochs", "1",
      "--limit-train", "5000"]),
    ("sst-lenet300", "sst", "lenet300", "mnist",
     ["--fp-epochs", "1", "--epochs", "1", "--limit-train", "10000"]),
    ("bayes-lenet5", "bayes", "lenet5", "mnist",
     ["--fp-epochs", "1", "--epochs", "1", "--limit-train", "10000"]),
    ("burn-resnet20", "burn", "resnet20", "cifar10",
     ["--fp-epochs", "1", "--epochs", "1", "--limit-train", "2000"]),
    ("bnn-pruned-resnet20", "bnn-pruned", "resnet20", "cifar10",
     ["--fp-epochs", "1", "--epochs", "1", "--limit-train", "5000"]),
]  # fmt: skip


def _lowbit(*args: str) -> dict:
    """Run the lowbit CLI with --json and return its JSON object (stderr passed through)."""
    cmd = [sys.executable, "-m", "lowbit", *args, "--json"]
    proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed (exit {proc.returncode})")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated methods or case names")
    ap.add_argument("--runs-dir", default=str(HERE / "runs" / "agreement"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not os.environ.get("LOWBIT_DATA"):
        sys.exit("set LOWBIT_DATA to the folder holding mnist/ and cifar10/")
    only = set(args.only.split(",")) if args.only else None
    rows = []
    for case, method, model, data, extra in CASES:
        if only and case not in only and method not in only:
            continue
        out = Path(args.runs_dir) / case
        done = out / "agreement.json"
        if done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        print(f"[{case}] compress", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        common = ["--threads", str(args.threads), "--seed", str(args.seed)]
        comp = _lowbit("compress", "--method", method, "--model", model, "--data", data,
                       "--out", str(out), "--resume", "--quiet", *extra, *common)  # fmt: skip
        print(f"[{case}] run --check", file=sys.stderr, flush=True)
        run = _lowbit("run", str(out / "model.lowbit"), "--data", data, "--check", *common)
        row = {
            "case": case,
            "method": method,
            "model": model,
            "data": data,
            "command": f"lowbit compress --method {method} --model {model} --data {data} "
            f"{' '.join(extra)} --seed {args.seed} --threads {args.threads}",
            "test_samples": run["test_samples"],
            "qat_test_accuracy": comp.get("test_accuracy"),
            "frozen_agreement": comp.get("frozen_agreement"),
            "file_test_accuracy": run["test_accuracy"],
            "runtime_vs_frozen": run["agreement_with_reference"],
            "ms_per_image": run["ms_per_image"],
            "seconds": round(time.perf_counter() - t0, 1),
        }
        done.write_text(json.dumps(row, indent=2) + "\n")
        rows.append(row)
    write(rows)


def write(rows: list[dict]) -> None:
    res = HERE / "results"
    (res / "agreement.json").write_text(json.dumps({"rows": rows}, indent=2) + "\n")
    lines = [
        "# Packed file vs frozen model vs QAT model, whole zoo models",
        "",
        "Command: `LOWBIT_DATA=../shared/data python bench/agreement.py`; "
        f"{platform.processor() or platform.machine()}, 1 thread. Short budgets (the "
        "compress arguments below): this checks the chain, not accuracy.",
        "",
        "| case | data | test images | QAT acc | frozen = QAT | file acc (runtime) "
        "| runtime = frozen | ms / image |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def pct(v):
        return "-" if v is None else f"{100 * v:.2f}%"

    for r in rows:
        lines.append(
            f"| {r['case']} | {r['data']} | {r['test_samples']:,} | {pct(r['qat_test_accuracy'])} "
            f"| {pct(r['frozen_agreement'])} | {pct(r['file_test_accuracy'])} "
            f"| {pct(r['runtime_vs_frozen'])} | {r['ms_per_image']:.3f} |"
        )
    lines += ["", "Compress arguments per case:", ""]
    lines += [f"- {r['case']}: `{r['command']}`" for r in rows]
    (res / "agreement.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
