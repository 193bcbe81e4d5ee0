"""Where does PROM lose accuracy? Post-training quantization of one FP checkpoint with
variants of the PROM recipe, each part switched on alone.

Variants (BatchNorm re-estimated under the quantized weights for each, activation ranges
calibrated on ``--calib`` training images):

- ``int8 all``: int8 weights and int8 activations everywhere (PROM without ternary);
- ``ternary 1x1, float activations (RULE)``: the ternary pointwise weights alone, for
  each ternary rule asked for (``--rules``: absmean, or twn:DELTA);
- ``prom``: the full recipe (ternary 1x1 absmean, int8 rest, int8 activations).

    LOWBIT_DATA=../shared/data python bench/prom_ptq_diag.py \\
        bench/runs/prom-cifar/limit10000/fp10/best.pt --rules absmean,twn:0.6,twn:0.7,twn:0.8

Prints one line per variant and writes ``--out`` (JSON) when given. A diagnostic, not a
method: PTQ accuracy says which part of the recipe QAT has to repair.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lowbit.codecs import FloatAct, Int, Int8Act, Ternary  # noqa: E402
from lowbit.ptq import Calibration, ptq_  # noqa: E402
from lowbit.recipes import Recipe, Rule  # noqa: E402
from lowbit.train import build_from_checkpoint, evaluate  # noqa: E402
from lowbit.workflow import data_meta, load_splits, transforms_for  # noqa: E402


def _ternary(rule: str) -> Ternary:
    if rule == "absmean":
        return Ternary()
    name, _, delta = rule.partition(":")
    if name != "twn":
        raise SystemExit(f"--rules: absmean or twn:DELTA, got {rule!r}")
    return Ternary(rule="twn", delta=float(delta or 0.7))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="an FP lowbit checkpoint (CIFAR-10 model)")
    ap.add_argument("--data", default="cifar10")
    ap.add_argument("--rules", default="absmean,twn:0.7", help="ternary rules to try")
    ap.add_argument("--calib", type=int, default=1024, help="calibration images")
    ap.add_argument("--limit-test", type=int)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", help="write the results here (JSON)")
    args = ap.parse_args()
    if not os.environ.get("LOWBIT_DATA"):
        sys.exit("set LOWBIT_DATA to the folder holding the data sets")
    torch.set_num_threads(args.threads)
    net, _ = build_from_checkpoint(args.checkpoint)
    train, test = load_splits(args.data, None, args.calib, args.limit_test, 0)
    _, tf = transforms_for(data_meta(train), augment=False)
    images = tf(torch.as_tensor(train.images))
    example = images[:1]
    int8w, act = Int(8, per_channel=True), Int8Act(mode="ema")
    variants = {"int8 all": [Rule(select="all", weights=int8w, activations=act)]}
    for rule in args.rules.split(","):
        variants[f"ternary 1x1, float activations ({rule})"] = [
            Rule(select="all", weights=int8w, activations=FloatAct()),
            Rule(select="pointwise", weights=_ternary(rule), activations=FloatAct()),
        ]
    variants["prom"] = [
        Rule(select="all", weights=int8w, activations=act),
        Rule(select="pointwise", weights=Ternary(), activations=act),
    ]
    results = {"checkpoint": args.checkpoint, "calibration_images": len(images)}
    results["fp"] = evaluate(net.eval(), test, tf)["test_accuracy"]
    print(f"fp: {100 * results['fp']:.2f}%", flush=True)
    for name, rules in variants.items():
        m = copy.deepcopy(net)
        calib = Calibration(bn_correct=True)
        ptq_(m, Recipe("diag", rules, {}), images, calib, example_input=example)
        results[name] = evaluate(m, test, tf)["test_accuracy"]
        print(f"{name}: {100 * results[name]:.2f}%", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
