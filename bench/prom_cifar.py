"""PROM on MobileNetV2 (CIFAR-10): accuracy against the FP model with the same budget.

A training budget of E epochs is split into FP epochs then PROM QAT epochs (default
3 + 2), and an FP model trained for all E epochs with the same options is the
same-budget reference (with the full training set and the defaults, the FP run of
``bench/results/baselines.json``, ``mobilenetv2-w0.5-cifar10``, is reused; with
``--train-reference`` it is trained here, once: the results file records it by width,
epochs and seed, and a later run uses that record when the git-ignored checkpoint is
gone; ``--no-reference`` skips the reference and compares with the FP start alone,
the paper's protocol). Then the QAT
model is frozen and the frozen model's predictions are compared with the QAT model's on
the whole test set. Resumable: rerun to continue.

    LOWBIT_DATA=../shared/data python bench/prom_cifar.py
    LOWBIT_DATA=../shared/data python bench/prom_cifar.py --limit-train 10000   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lowbit.codecs import INT8_ACT_MODES  # noqa: E402
from lowbit.train import TrainConfig, load_checkpoint  # noqa: E402
from lowbit.utils import write_json  # noqa: E402
from lowbit.workflow import compress_model, train_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--fp-epochs", type=int, default=3)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--qat-lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--distill",
        type=float,
        default=0.0,
        help="QAT distillation weight from the FP start model (0: off)",
    )
    ap.add_argument("--distill-temperature", type=float, default=4.0)
    ap.add_argument(
        "--ternary-rule",
        choices=["absmean", "twn"],
        default="absmean",
        help="threshold rule of the ternary pointwise weights (the recipe's ternary_rule)",
    )
    ap.add_argument("--ternary-delta", type=float, default=0.7, help="twn: threshold factor")
    ap.add_argument(
        "--act-mode",
        choices=list(INT8_ACT_MODES),
        default="ema",
        help="int8 activation scale: EMA of the range, or learned with the full LSQ gradient "
        "(lsq) or its clipping term alone (lsq-clip) (the recipe's act_mode)",
    )
    ap.add_argument(
        "--bn-recalibrate",
        type=int,
        default=0,
        metavar="BATCHES",
        help="re-estimate the BatchNorm statistics over this many training batches after QAT, "
        "before the freeze (0: off); a finished QAT run of the same setting without it is "
        "reused, not trained again",
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-train", type=int, help="train on the first N images (shuffled)")
    ap.add_argument(
        "--train-reference",
        action="store_true",
        help="train the same-budget FP reference here even where bench/results/baselines.json "
        "has the run (another machine's)",
    )
    ap.add_argument(
        "--no-reference",
        action="store_true",
        help="record the PROM run against its own FP start only (the paper's protocol: no "
        "same-budget FP reference is trained or looked up; the gap column shows '-')",
    )
    ap.add_argument(
        "--only",
        choices=["prom", "reference"],
        help="run one half (for two processes side by side): the FP start + PROM QAT, or "
        "the same-budget FP reference; the results are written by a run of both",
    )
    ap.add_argument("--runs-dir", default=str(HERE / "runs" / "prom-cifar"))
    args = ap.parse_args()
    if args.no_reference and args.train_reference:
        ap.error("--no-reference and --train-reference contradict each other: choose one")
    if not os.environ.get("LOWBIT_DATA"):
        sys.exit("set LOWBIT_DATA to the folder holding cifar10/")
    torch.set_num_threads(args.threads)
    root = Path(args.runs_dir) / (f"limit{args.limit_train}" if args.limit_train else "full")
    lim = args.limit_train
    progress = sys.stderr.isatty()
    fp_cfg = TrainConfig(epochs=args.fp_epochs, batch_size=128, optimizer="sgd", lr=0.1,
                         weight_decay=4e-5, warmup_epochs=1, seed=args.seed,
                         progress=progress)  # fmt: skip
    t0 = time.perf_counter()

    def fp_run(out: Path, cfg: TrainConfig) -> dict:
        resume = out / "last.pt" if (out / "last.pt").exists() else None
        ck = load_checkpoint(resume) if resume is not None else {}
        if ck.get("epoch", 0) >= cfg.epochs:  # finished: no training, no second load
            return {"checkpoint": str(resume), "test_accuracy": ck["history"][-1]["test_accuracy"],
                    "epochs": ck["epoch"],
                    "seconds": sum(h.get("seconds", 0.0) for h in ck["history"])}  # fmt: skip
        return train_model("mobilenetv2", "cifar10", out, cfg, model_kwargs={"width": args.width},
                           limit_train=lim, resume=resume)  # fmt: skip

    # one folder per setting (a resumed run must never pick up another setting's checkpoint)
    sfx = f"-s{args.seed}" if args.seed else ""
    total = args.fp_epochs + args.qat_epochs
    if args.only == "reference":
        ref = fp_run(root / f"fp{total}{sfx}", replace(fp_cfg, epochs=total))
        print(f"FP {total} epochs: {100 * ref['test_accuracy']:.2f}%")
        return
    fp_ckpt = fp_run(root / f"fp{args.fp_epochs}{sfx}", fp_cfg)["checkpoint"]
    qat_cfg = TrainConfig(epochs=args.qat_epochs, batch_size=128, optimizer="sgd",
                          lr=args.qat_lr, weight_decay=4e-5, seed=args.seed,
                          progress=progress)  # fmt: skip
    kd = f"-kd{args.distill:g}t{args.distill_temperature:g}" if args.distill else ""
    twn = args.ternary_rule == "twn"
    rule = f"-twn{args.ternary_delta:g}" if twn else ""
    act = "" if args.act_mode == "ema" else "-" + args.act_mode.replace("-", "")
    setting = f"prom-fp{args.fp_epochs}-qat{args.qat_epochs}-lr{args.qat_lr:g}{kd}{rule}{act}"
    bn = f"-bn{args.bn_recalibrate}" if args.bn_recalibrate else ""
    prom_dir = root / f"{setting}{bn}{sfx}"
    plain_qat = root / f"{setting}{sfx}" / "qat" / "last.pt"
    if bn and not (prom_dir / "qat" / "last.pt").exists() and plain_qat.exists():
        # the same QAT run: recalibration comes after it, so it is not trained twice
        (prom_dir / "qat").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plain_qat, prom_dir / "qat" / "last.pt")
    options = {"ternary_rule": args.ternary_rule, "act_mode": args.act_mode}
    if twn:
        options["ternary_delta"] = args.ternary_delta
    done = prom_dir / "result.json"
    res = json.loads(done.read_text()) if done.exists() else {}
    if res.get("epochs") != args.qat_epochs:  # not finished: train (or resume), freeze, pack
        res = compress_model("prom", "mobilenetv2", "cifar10", prom_dir, qat_cfg,
                             from_checkpoint=fp_ckpt, limit_train=lim, resume=True,
                             method_options=options,
                             distill=args.distill,
                             distill_temperature=args.distill_temperature,
                             bn_recalibrate=args.bn_recalibrate)  # fmt: skip
    if args.only == "prom":
        print(f"PROM {args.fp_epochs} + {args.qat_epochs}: {100 * res['test_accuracy']:.2f}%")
        return
    baselines = json.loads((HERE / "results" / "baselines.json").read_text())
    base = baselines.get("mobilenetv2-w0.5-cifar10", {})
    reuse = (
        not args.train_reference
        and lim is None
        and args.width == 0.5
        and base.get("epochs") == total
        and not args.seed
    )
    name = f"prom_cifar_limit{lim}" if lim else "prom_cifar"
    prev_path = HERE / "results" / f"{name}.json"
    prev = json.loads(prev_path.read_text()) if prev_path.exists() else {}
    references = dict(prev.get("references") or {})  # FP references trained here
    ref_key = f"w{args.width:g}-e{total}-s{args.seed}"
    ref_dir = root / f"fp{total}{sfx}"
    if args.no_reference:
        base = {}
    elif not reuse:
        recorded = references.get(ref_key)
        if recorded and not (ref_dir / "last.pt").exists():
            # trained here by an earlier run (its checkpoint is git-ignored and may be gone):
            # the same seed and options give the same run, so it is not trained again
            base = dict(recorded)
        else:  # train the same-budget FP reference here
            ref = fp_run(ref_dir, replace(fp_cfg, epochs=total))
            base = {"test_accuracy": ref["test_accuracy"], "epochs": total,
                    "seconds": ref.get("seconds")}  # fmt: skip
            references[ref_key] = base
    out = {
        "command": "LOWBIT_DATA=../shared/data python bench/prom_cifar.py "
        f"--width {args.width} --fp-epochs {args.fp_epochs} --qat-epochs {args.qat_epochs} "
        f"--qat-lr {args.qat_lr:g}"
        + (f" --limit-train {lim}" if lim else "")
        + (f" --seed {args.seed}" if args.seed else "")
        + (
            f" --distill {args.distill:g} --distill-temperature {args.distill_temperature:g}"
            if args.distill
            else ""
        )
        + (f" --ternary-rule twn --ternary-delta {args.ternary_delta:g}" if twn else "")
        + (f" --act-mode {args.act_mode}" if act else "")
        + (f" --bn-recalibrate {args.bn_recalibrate}" if bn else "")
        + (" --train-reference" if args.train_reference else "")
        + (" --no-reference" if args.no_reference else ""),
        "model": f"mobilenetv2, width={args.width}",
        "data": f"cifar10 ({lim or 50000:,} train / 10,000 test)",
        "limit_train": lim,
        "seed": args.seed,
        "threads": args.threads,
        "fp_epochs": args.fp_epochs,
        "qat_epochs": args.qat_epochs,
        "qat_lr": args.qat_lr,
        "distill": args.distill,
        "distill_temperature": args.distill_temperature if args.distill else None,
        "ternary_rule": args.ternary_rule,
        "ternary_delta": args.ternary_delta if twn else None,
        "act_mode": args.act_mode,
        "bn_recalibrate": res.get("bn_recalibrate"),
        "fp_start_test_accuracy": res["fp_test_accuracy"],
        "prom_test_accuracy": res["test_accuracy"],
        "prom_qat_seconds": res["seconds"],
        "same_budget_fp_seconds": base.get("seconds"),
        "same_budget_fp_test_accuracy": base.get("test_accuracy"),
        "same_budget_fp_epochs": base.get("epochs"),
        "frozen_agreement": res.get("frozen_agreement"),
        "frozen_test_accuracy": res.get("frozen_test_accuracy"),
        "storage_bytes": res["storage_bytes"],
        "compression_vs_fp32": res["compression_vs_fp32"],
        "energy_vs_fp16": res["energy_vs_fp16"],
        "wall_seconds_this_call": round(time.perf_counter() - t0, 1),
    }
    # every setting ever run stays in the file ("tried"; a rerun replaces its own line)
    out["references"] = references
    tried = prev.get("tried") or ([_tried(prev)] if "prom_test_accuracy" in prev else [])
    tried = [t for t in tried if t["key"] != _tried(out)["key"]] + [_tried(out)]
    out["tried"] = tried
    write_json(prev_path, out)
    gap = None
    if out["same_budget_fp_test_accuracy"] is not None:
        gap = 100 * (out["same_budget_fp_test_accuracy"] - out["prom_test_accuracy"])
    threads = f"{args.threads} thread" + ("s" if args.threads != 1 else "")
    lines = [
        f"# PROM on MobileNetV2, CIFAR-10 ({out['data']})",
        "",
        f"Command: `{out['command']}` (seed {args.seed}, {threads}, CPU).",
        "",
        "| model | epochs | test acc |",
        "|---|---|---|",
        f"| FP (start of QAT) | {args.fp_epochs} | {100 * out['fp_start_test_accuracy']:.2f}% |",
        f"| PROM QAT (ternary 1x1{_rule_text(out)}, int8 rest, {args.act_mode} act scale"
        f"{_kd_text(out)}) | "
        f"{args.fp_epochs} FP + "
        f"{args.qat_epochs} QAT | "
        f"{100 * out['prom_test_accuracy']:.2f}% |",
    ]
    if gap is not None:
        lines.append(
            f"| FP, same budget | {out['same_budget_fp_epochs']} | "
            f"{100 * out['same_budget_fp_test_accuracy']:.2f}% |"
        )
    lines += [""]
    if gap is not None:
        lines.append(f"Gap to the same-budget FP model: {gap:.2f} points.")
    change = 100 * (out["prom_test_accuracy"] - out["fp_start_test_accuracy"])
    lines.append(f"Change from the FP start model: {change:+.2f} points.")
    bn_res = out["bn_recalibrate"]
    if bn_res:
        lines.append(
            f"BatchNorm statistics re-estimated after QAT over {bn_res['batches']} training "
            f"batches ({bn_res['images']:,} images, "
            f"{'augmented as in training' if bn_res.get('augmented') else 'no augmentation'}); "
            "test accuracy before "
            f"that {100 * bn_res['test_accuracy_before']:.2f}%."
        )
    if out["frozen_agreement"] is not None:
        lines.append(
            f"Frozen model vs QAT model: same prediction on {100 * out['frozen_agreement']:.2f}% "
            f"of the test set (frozen accuracy {100 * out['frozen_test_accuracy']:.2f}%)."
        )
    lines.append(
        f"Storage {out['storage_bytes']:,.0f} B (x{out['compression_vs_fp32']:.2f} vs fp32), "
        f"energy x{out['energy_vs_fp16']:.2f} vs fp16 (operand-width convention); "
        f"QAT {out['prom_qat_seconds']:.0f} s"
        + (
            f", FP reference {out['same_budget_fp_seconds']:.0f} s (training time)."
            if out["same_budget_fp_seconds"]
            else "."
        )
    )
    if len(tried) > 1:
        lines += ["", "Every setting tried (each its own command):", "",
                  "| FP + QAT epochs | QAT lr | ternary rule | act scale | distillation "
                  "| BN recalibration | seed | FP start | FP same budget | PROM | gap |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for t in tried:
            ref_acc = t["same_budget_fp_test_accuracy"]
            gap_t = "-" if ref_acc is None else f"{100 * (ref_acc - t['prom']):.2f} pts"
            lines.append(f"| {t['fp_epochs']} + {t['qat_epochs']} | {t['qat_lr']} | "
                         f"{_rule_text(t).lstrip(', ') or 'absmean'} | "
                         f"{t.get('act_mode', 'ema')} | "
                         f"{_kd_text(t).lstrip(', ') or '-'} | "
                         f"{_bn_text(t)} | "
                         f"{t['seed']} | {_pct(t.get('fp_start'))} | {_pct(ref_acc)} | "
                         f"{100 * t['prom']:.2f}% | {gap_t} |")  # fmt: skip
    (HERE / "results" / f"{name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _pct(x: float | None) -> str:
    """An accuracy as table text ('-' where the run did not record it)."""
    return "-" if x is None else f"{100 * x:.2f}%"


def _kd_text(r: dict) -> str:
    """The distillation setting of a run as table text (empty without distillation)."""
    if not r.get("distill"):
        return ""
    return f", distillation {r['distill']:g}, T={r['distill_temperature']:g}"


def _bn_text(t: dict) -> str:
    """The BN recalibration of a tried row as table text."""
    if not t.get("bn_recalibrate"):
        return "-"
    return f"{t['bn_recalibrate']} batches" + ("" if t.get("bn_augmented") else ", no augmentation")


def _rule_text(r: dict) -> str:
    """The ternary rule of a run as table text (empty for the default, absmean)."""
    if r.get("ternary_rule", "absmean") != "twn":
        return ""
    return f", TWN delta {r['ternary_delta']:g}"


def _tried(r: dict) -> dict:
    lr = r.get("qat_lr", 0.01)  # runs before the option was recorded used the default
    kd = r.get("distill") or 0.0
    key = f"{r['fp_epochs']}+{r['qat_epochs']}-lr{lr:g}-s{r.get('seed', 0)}"
    if kd:
        key += f"-kd{kd:g}t{r['distill_temperature']:g}"
    rule = r.get("ternary_rule", "absmean")
    if rule == "twn":
        key += f"-twn{r['ternary_delta']:g}"
    act_mode = r.get("act_mode", "ema")  # runs before the option was recorded used ema
    if act_mode != "ema":
        key += f"-{act_mode}"
    if r.get("same_budget_fp_test_accuracy") is None:  # --no-reference: its own row
        key += "-noref"
    bn_res = r.get("bn_recalibrate") or {}
    bn = bn_res.get("batches", 0)
    bn_aug = bool(bn_res.get("augmented"))  # recalibration on plain images until 2026-12-07
    if bn:
        key += f"-bn{bn}" + ("" if bn_aug else "-plain")
    return {"key": key, "fp_epochs": r["fp_epochs"], "qat_epochs": r["qat_epochs"],
            "qat_lr": lr, "distill": kd, "distill_temperature": r.get("distill_temperature"),
            "ternary_rule": rule, "ternary_delta": r.get("ternary_delta"), "act_mode": act_mode,
            "bn_recalibrate": bn, "bn_augmented": bn_aug,
            "seed": r.get("seed", 0), "prom": r["prom_test_accuracy"],
            "fp_start": r.get("fp_start_test_accuracy"),
            "same_budget_fp_test_accuracy": r.get("same_budget_fp_test_accuracy")}  # fmt: skip


if __name__ == "__main__":
    main()
