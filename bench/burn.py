"""BURN on CIFAR-10: linear-probe accuracy of one binary ResNet-20 trained without labels
by BURN and by the baselines, at equal budgets.

Every run uses the same training subset (``--limit-train`` images after the fixed-seed
shuffle), the same binary network (ResNet-20, pm1 binary weights and sign activations,
int8 first and last layers), the same initial weights (``--seed``), the same two stages
(``--epochs`` epochs each: binary activations, then binary weights too), batch, optimizer
(Adam, lr ``--lr``, no weight decay, 5% warm-up, cosine) and BYOL augmentations:

- ``burn``: BURN (frozen SimCLR-pretrained FP encoder + jointly trained FP head);
- ``simclr-bnn``: a self-supervised objective (SimCLR's NT-Xent) on the binary network
  directly, no teacher;
- ``fixed-target``: distillation from a fixed target (the FP head frozen at its random
  init, otherwise BURN's loss);
- ``burn-no-feature``: BURN without the feature-similarity term (KL alone);
- ``burn-paper-head``: BURN with the paper's heads (no BatchNorm on the head outputs, the
  ``head_out_bn=False`` option);
- upper bounds: ``fp-encoder`` (the FP target encoder itself: SimCLR, ``--pretrain-epochs``
  epochs) and ``supervised-bnn`` (the binary network trained with labels, cross-entropy,
  same two stages and epochs, standard crop + flip augmentation);
- ``random-bnn``: the binary network at its random init (a floor).

Accuracy: a linear probe on the frozen encoder (features of the un-augmented training
subset, 100 epochs of SGD on standardized features), tested on ``--limit-test`` test
images. For the binary runs the probe is the int8 last layer (what the packed file
computes).

Resumable: each row's result is kept in ``--runs-dir/ROW/result.json`` and its training in
``ROW/*/last.pt``; rerun the same command to continue. Writes ``bench/results/burn.json``
and ``burn.md`` after every row.

    LOWBIT_DATA=../shared/data nice -n 10 python bench/burn.py
    LOWBIT_DATA=../shared/data python bench/burn.py --limit-train 512 --limit-test 256 \\
        --epochs 1 --pretrain-epochs 1 --runs-dir /tmp/burn-smoke --results-dir /tmp/burn-smoke
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lowbit import models  # noqa: E402
from lowbit.methods import burn  # noqa: E402
from lowbit.recipes import compress_  # noqa: E402
from lowbit.train import TrainConfig, Trainer, build_from_checkpoint  # noqa: E402
from lowbit.utils import write_json  # noqa: E402
from lowbit.workflow import data_meta, load_splits, transforms_for  # noqa: E402

ROWS = ("fp-encoder", "random-bnn", "burn", "fixed-target", "simclr-bnn", "supervised-bnn",
        "burn-no-feature", "burn-paper-head")  # fmt: skip
SEEDED = ("burn", "fixed-target", "simclr-bnn")  # the rows --extra-seeds repeats
OBJECTIVE = {"burn": "burn", "fixed-target": "fixed", "simclr-bnn": "simclr",
             "burn-no-feature": "kl", "burn-paper-head": "burn"}  # fmt: skip


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--limit-train", type=int, default=10000)
    ap.add_argument("--limit-test", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=2, help="epochs per stage (default 2)")
    ap.add_argument("--pretrain-epochs", type=int, default=4, help="SimCLR epochs of the FP target")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0, help="data subset, FP target, first seed")
    ap.add_argument(
        "--extra-seeds",
        default="",
        help="e.g. 1,2: repeat burn, fixed-target and "
        "simclr-bnn with these seeds (initial weights, order, augmentation, probe)",
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rows", default=",".join(ROWS), help="comma-separated subset of rows")
    ap.add_argument("--runs-dir", default=str(HERE / "runs" / "burn"))
    ap.add_argument("--results-dir", default=str(HERE / "results"))
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    bad = [r for r in rows if r not in ROWS]
    extra = [int(v) for v in args.extra_seeds.split(",") if v.strip()]
    rows += [f"{r}-s{sd}" for sd in extra for r in SEEDED]
    if bad:
        ap.error(f"unknown row(s) {bad}; valid: {', '.join(ROWS)}")
    runs = Path(args.runs_dir)
    command = "python bench/burn.py " + " ".join(sys.argv[1:])

    train_set, test_set = load_splits("cifar10", args.data_dir, args.limit_train,
                                      args.limit_test, args.seed)  # fmt: skip
    shape = tuple(train_set.shape)
    classes = len(train_set.classes)
    dmeta = data_meta(train_set)
    train_tf, test_tf = transforms_for(dmeta)
    images = torch.from_numpy(train_set.images)
    labels = torch.from_numpy(train_set.labels)
    test_images = torch.from_numpy(test_set.images)
    test_labels = torch.from_numpy(test_set.labels)
    example = torch.zeros(1, *shape)
    cfg = burn.BURNConfig(pretrain="simclr")
    views = burn.two_view_transforms(train_set.mean, train_set.std, shape[1], cfg.crop_min_scale)
    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, optimizer="adam",
                         lr=args.lr, weight_decay=0.0, seed=args.seed, device="cpu")  # fmt: skip
    spec = {"name": args.model, "kwargs": {}, "num_classes": classes, "input_shape": list(shape)}
    meta = {"model": spec, "data": dmeta}

    def fresh(seed=args.seed):
        torch.manual_seed(seed)  # the same initial weights for every binary run of a seed
        return models.build(args.model, num_classes=classes, input_shape=shape)

    def probe(ext, layer=None, seed=args.seed):
        return burn.linear_probe(ext, images, labels, test_images, test_labels, test_tf,
                                 classes, cfg, seed, layer=layer)  # fmt: skip

    # the FP target: SimCLR on the training subset, no labels (shared by the teacher rows)
    teacher = None

    def get_teacher():
        nonlocal teacher
        if teacher is None:
            pdir = runs / "fp-encoder"
            pcfg = TrainConfig(**{**asdict(config), "epochs": args.pretrain_epochs})
            t0 = time.perf_counter()
            hist = burn.pretrain_simclr(fresh(), images, views, pcfg, pdir, cfg, meta, log)
            net, _ = build_from_checkpoint(pdir / "encoder.pt")
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
            teacher = (burn.FeatureExtractor(net, None, example), hist, time.perf_counter() - t0)
        return teacher

    results_path = Path(args.results_dir) / "burn.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results = results if results.get("command") == command else {}
    results.update({"command": command, "environment": _env(args)})
    results.setdefault("rows", {})

    for row in rows:
        rdir = runs / row
        done = rdir / "result.json"
        if done.exists():
            results["rows"][row] = json.loads(done.read_text())
            log(f"{row}: done before ({100 * results['rows'][row]['probe_accuracy']:.2f}%)")
            continue
        log(f"{row}: start")
        t0 = time.perf_counter()
        base, _, sd = row.partition("-s")
        seed = int(sd) if sd.isdigit() else args.seed
        base = base if sd.isdigit() else row
        res: dict = {"row": row, "seed": seed}
        if row == "fp-encoder":
            ext, hist, _ = get_teacher()
            p = probe(ext)
            res.update(epochs=args.pretrain_epochs, train_seconds=_secs(hist),
                       probe_accuracy=p["test_accuracy"], history=hist)  # fmt: skip
        elif base in OBJECTIVE:
            rc = burn.BURNConfig(objective=OBJECTIVE[base], head_out_bn=base != "burn-paper-head")
            ext = get_teacher()[0] if rc.needs_teacher else None
            student = fresh(seed)
            obj, hist = burn.train_burn(student, images, views, replace(config, seed=seed), rc,
                                        ext, rdir, meta, log, example)  # fmt: skip
            p = probe(obj.student, student.get_submodule(obj.student.target_name), seed)
            res.update(epochs_per_stage=args.epochs, stages=2, train_seconds=_secs(hist),
                       probe_accuracy=p["test_accuracy"], probe_fp_accuracy=p["probe_fp_accuracy"],
                       collapse_epochs=sum(bool(h.get("collapse")) for h in hist),
                       history=hist)  # fmt: skip
        elif row == "supervised-bnn":
            student = fresh()
            ext = burn.FeatureExtractor(student, None, example)
            compress_(student, burn.stage1_recipe(cfg), example)
            hist = []
            for stage in (1, 2):
                if stage == 2:
                    burn.binarize_weights_(student, cfg)
                hooks = [burn.LatentClamp(student, cfg.clip)] if stage == 2 else []
                tr = Trainer(student, config, hooks=hooks, out_dir=rdir / f"stage{stage}",
                             meta={**meta, "recipe": student.lowbit_recipe.to_dict()},
                             train_transform=train_tf, test_transform=test_tf)  # fmt: skip
                last = rdir / f"stage{stage}" / "last.pt"
                fit = tr.fit(train_set, test_set, resume=last if last.exists() else None)
                hist += [{**h, "stage": stage} for h in fit.history]
            own = hist[-1]["test_accuracy"]
            p = probe(ext, student.get_submodule(ext.target_name))
            res.update(epochs_per_stage=args.epochs, stages=2, train_seconds=_secs(hist),
                       probe_accuracy=p["test_accuracy"], supervised_test_accuracy=own,
                       history=hist)  # fmt: skip
        elif row == "random-bnn":
            student = fresh()
            ext = burn.FeatureExtractor(student, None, example)
            compress_(student, burn.burn_recipe(), example)
            student.train()
            with torch.no_grad():  # BN statistics and int8 input scales from the data
                for i in range(0, len(images), 500):
                    ext(test_tf(images[i : i + 500]))
            p = probe(ext, student.get_submodule(ext.target_name))
            res.update(train_seconds=0.0, probe_accuracy=p["test_accuracy"])
        res["seconds"] = round(time.perf_counter() - t0, 1)
        write_json(done, res)
        results["rows"][row] = res
        log(f"{row}: linear probe {100 * res['probe_accuracy']:.2f}% ({res['seconds']:.0f} s)")
        _write(results, args, Path(args.results_dir))
    _write(results, args, Path(args.results_dir))
    return 0


def _secs(hist) -> float:
    return round(sum(h.get("seconds", 0.0) for h in hist), 1)


def _env(args) -> dict:
    import platform

    return {"torch": torch.__version__, "python": platform.python_version(),
            "threads": args.threads, "cpus": os.cpu_count()}  # fmt: skip


def _write(results: dict, args, out: Path) -> None:
    results["settings"] = {
        "model": args.model, "train_images": args.limit_train, "test_images": args.limit_test,
        "epochs_per_stage": args.epochs, "pretrain_epochs": args.pretrain_epochs,
        "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed,
    }  # fmt: skip
    write_json(out / "burn.json", results)
    s = results["settings"]
    lines = [
        "# BURN on CIFAR-10: linear-probe accuracy of a binary ResNet-20",
        "",
        f"Command: `{results['command']}` (seed {s['seed']}, {args.threads} thread(s)).",
        "",
        f"Training subset: {s['train_images']} CIFAR-10 training images (fixed-seed shuffle), "
        f"no labels except in the supervised row and the probes; probe tested on "
        f"{s['test_images']} test images. Binary runs: two stages of {s['epochs_per_stage']} "
        f"epoch(s) each, batch {s['batch_size']}, Adam lr {s['lr']}; FP target: SimCLR, "
        f"{s['pretrain_epochs']} epoch(s).",
        "",
        "| row | training | epochs | linear probe | train s |",
        "|---|---|---|---|---|",
    ]
    what = {
        "fp-encoder": "FP ResNet-20, SimCLR (upper bound; the BURN target)",
        "burn": "BURN (moving FP target)",
        "fixed-target": "distillation from a fixed target (FP head frozen at init)",
        "simclr-bnn": "SimCLR on the binary network directly",
        "supervised-bnn": "supervised binary network (labels; upper bound)",
        "burn-no-feature": "BURN without the feature term (KL only)",
        "burn-paper-head": "BURN with the paper's heads (no output BatchNorm)",
        "random-bnn": "binary network at random init (floor)",
    }
    order = list(ROWS) + sorted(k for k in results["rows"] if k not in ROWS)
    for row in order:
        r = results["rows"].get(row)
        base, _, sd = row.partition("-s")
        if not sd.isdigit():
            base = row
        label = what[base] + (f", seed {sd}" if sd.isdigit() else "")
        if r is None:
            lines.append(f"| {row} | {label} | | not run | |")
            continue
        if row == "fp-encoder":
            ep = f"{r['epochs']} (SimCLR)"
        elif row == "random-bnn":
            ep = "0"
        else:
            ep = f"{r['stages']} x {r['epochs_per_stage']}"
        extra = ""
        if "supervised_test_accuracy" in r:
            extra = f" (its own classifier: {100 * r['supervised_test_accuracy']:.2f}%)"
        if r.get("collapse_epochs"):
            extra += f" (collapse warned in {r['collapse_epochs']} epoch(s))"
        lines.append(f"| {row} | {label} | {ep} | {100 * r['probe_accuracy']:.2f}%{extra} | "
                     f"{r.get('train_seconds', 0):.0f} |")  # fmt: skip
    rows = results["rows"]

    def mean(base):  # over the seeds run
        v = [
            100 * r["probe_accuracy"]
            for k, r in rows.items()
            if k == base or (k.startswith(base + "-s") and k[len(base) + 2 :].isdigit())
        ]
        return sum(v) / len(v), len(v)

    if all(k in rows for k in ("burn", "simclr-bnn", "fixed-target")):
        (b, n), (s2, _), (s3, _) = (mean(k) for k in ("burn", "simclr-bnn", "fixed-target"))
        over = f" (means over {n} seeds of each)" if n > 1 else ""
        verdict = "beats both" if b > max(s2, s3) else "does NOT beat both"
        lines += ["", f"At this budget{over} BURN ({b:.2f}%) {verdict} baselines: "
                  f"{b - s2:+.2f} points against SimCLR on the binary network ({s2:.2f}%), "
                  f"{b - s3:+.2f} against distillation from a fixed target "
                  f"({s3:.2f}%)."]  # fmt: skip
    lines += ["", "Rows ending in -sN repeat a row with training seed N (same data subset and FP "
              "target); see burn.json for per-epoch histories "
              "(loss, lambda, feature/KL terms, collapse signals).", ""]  # fmt: skip
    (out / "burn.md").write_text("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
