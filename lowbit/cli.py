"""The ``lowbit`` command line.

Conventions shared by every sub-command:
- ``--json`` prints exactly one JSON object on stdout (progress and logs go to stderr);
  on an error that object has an ``error`` field and the exit code is non-zero.
- Bad input is one clear line, never a traceback (set ``LOWBIT_DEBUG=1`` to see one).
- ``--data-dir`` (else the ``LOWBIT_DATA`` environment variable) is the folder holding
  one sub-folder per data set; the built-in ``sample`` needs none.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from . import __version__
from .errors import LowbitError, TrainingInterrupted

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that answers usage errors in JSON too when ``--json`` was given."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        if "--json" in sys.argv[1:] or _JSON_FLAG[0]:
            print(json.dumps({"error": message}))
        raise SystemExit(EXIT_USAGE)


_JSON_FLAG = [False]  # set by main() when --json is among the arguments it was given


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, result: dict[str, Any], text: str | None = None) -> None:
    """Print the result: one JSON object with --json, else ``text`` (or key: value lines)."""
    from .utils import dumps

    if getattr(args, "json", False):
        print(dumps(result), flush=True)  # one line: easy to parse line by line
    elif text is not None:
        print(text, flush=True)
    else:
        for k, v in result.items():
            if not isinstance(v, list | dict):
                print(f"{k}: {v}")


def _parse_kv(items: Sequence[str] | None, what: str) -> dict[str, Any]:
    """``["width=0.5", "shortcut=B"]`` -> ``{"width": 0.5, "shortcut": "B"}``."""
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} must look like key=value, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


# ----------------------------------------------------------------------------- options


def _add_common(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("common")
    g.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    g.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--threads", type=_positive_int,
                   help="CPU threads for PyTorch (compare: also timings, default 1)")  # fmt: skip
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")


def _add_data(p: argparse.ArgumentParser, required: bool = True, train: bool = True) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        required=required,
        help="data set: sample (built in), mnist, fashion-mnist, cifar10",
    )
    g.add_argument(
        "--data-dir",
        help="folder with one sub-folder per data set (default: $LOWBIT_DATA)",
    )
    if train:
        g.add_argument(
            "--limit-train",
            type=_positive_int,
            metavar="N",
            help="use the first N training samples (after a fixed-seed shuffle)",
        )
    g.add_argument(
        "--limit-test",
        type=_positive_int,
        metavar="N",
        help="use the first N test samples (after a fixed-seed shuffle)",
    )


def _add_sweep(g, workers_default: int | None) -> None:
    """--workers / --ray: where the sensitivity sweep's (layer, codec) PTQ runs go."""
    g.add_argument(
        "--workers",
        type=_positive_int,
        default=workers_default,
        metavar="N",
        help="run the (layer, codec) PTQ jobs in N local processes, each with its share of "
        "the threads (default 1: in this process); latency is still timed in this process",
    )
    g.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run those jobs on Ray instead: auto (this machine's cluster), HOST:PORT or "
        "ray://HOST:PORT (a cluster), or local (start one here, --workers CPUs); needs "
        "pip install 'lowbit[ray]' and lowbit on every node",
    )


def _add_training(p: argparse.ArgumentParser, epochs: int = 10) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default {epochs})")
    g.add_argument("--batch-size", type=_positive_int, default=128, help="default 128")
    g.add_argument(
        "--optimizer", choices=("sgd", "adam", "adamw"), help="default sgd (adam for sbnn)"
    )
    g.add_argument("--lr", type=float, help="learning rate (default 0.1 SGD, 1e-3 Adam)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    g.add_argument("--weight-decay", type=float, help="default 5e-4")
    g.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine",
                   help="learning-rate schedule (default cosine)")  # fmt: skip
    g.add_argument("--warmup-epochs", type=float, default=0.0,
                   help="epochs of linear learning-rate warm-up (default 0)")  # fmt: skip
    g.add_argument("--label-smoothing", type=float, default=0.0, help="default 0 (off)")
    g.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="0 = off")
    g.add_argument("--grad-clip", type=float, metavar="NORM", help="clip the gradient norm")
    g.add_argument("--no-augment", action="store_true", help="no data augmentation")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


#: QAT settings a method trains best with, used where the user gives none (SBNN follows
#: its paper: Adam, lr 1e-3, no weight decay)
#: compress options that have their own flag (--density, --n, ...) besides --method-arg
_METHOD_FLAGS = ("density", "n", "k", "teacher", "pretrain", "prior")
#: ... and those that only --method auto takes: its budgets, candidates, where its sweep runs
_BUDGET_FLAGS = ("max_bytes", "max_energy_pj", "max_latency_ms", "max_accuracy_drop",
                 "candidates", "workers", "ray")  # fmt: skip

_QAT_DEFAULTS: dict[str, dict[str, Any]] = {
    "sbnn": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    "bnn-pruned": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    # BURN: Adam, no weight decay (its paper); lr 1e-3 for CPU budgets (see methods/burn.py)
    "burn": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
    # Bayesian compression: Adam as the authors; the KL term is the only regularizer
    "bayes": {"optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0},
}


def _train_config(args: argparse.Namespace, defaults: dict[str, Any] | None = None):
    from .train import TrainConfig

    d = {"optimizer": "sgd", "lr": None, "weight_decay": 5e-4, **(defaults or {})}

    def pick(name: str):
        value = getattr(args, name)
        return d[name] if value is None else value

    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        optimizer=pick("optimizer"),
        lr=pick("lr"),
        momentum=args.momentum,
        weight_decay=pick("weight_decay"),
        schedule=args.schedule,
        warmup_epochs=args.warmup_epochs,
        label_smoothing=args.label_smoothing,
        mixup_alpha=args.mixup,
        grad_clip=args.grad_clip,
        augment=not args.no_augment,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )


# ----------------------------------------------------------------------------- commands


def cmd_models(args: argparse.Namespace) -> int:
    from . import models

    rows = []
    for name in models.available():
        shape = models.default_input_shape(name)
        net = models.create(name)
        rows.append(
            {
                "name": name,
                "description": models.describe(name),
                "input_shape": list(shape),
                "params": models.count_params(net),
                "macs": models.count_macs(net),
            }
        )
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'model':<{width}}  {'input':>11}  {'params':>10}  {'MACs':>8}  description"]
    for r in rows:
        shape = "x".join(map(str, r["input_shape"]))
        lines.append(
            f"{r['name']:<{width}}  {shape:>11}  {r['params']:>10,}  "
            f"{r['macs'] / 1e6:>7.1f}M  {r['description']}"
        )
    lines.append("Your own model: --model package.module:factory (called with num_classes=...).")
    _emit(args, {"models": rows}, "\n".join(lines))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .workflow import train_model

    out = args.out
    resume = args.resume
    if resume == "auto":
        resume = os.path.join(out, "last.pt")
        if not os.path.exists(resume):
            raise FileNotFoundError(f"--resume: no checkpoint to resume from at {resume}")
    result = train_model(
        model=args.model,
        data=args.data,
        out=out,
        config=_train_config(args),
        data_dir=args.data_dir,
        model_kwargs=_parse_kv(args.model_arg, "--model-arg"),
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        resume=resume,
    )
    acc = result["test_accuracy"]
    text = (
        f"{result['model']} on {result['data']}: test accuracy "
        f"{100 * acc:.2f}% after {result['epochs']} epochs ({result['seconds']:.1f} s)\n"
        f"checkpoint: {result['checkpoint']}"
        if acc is not None
        else f"checkpoint: {result['checkpoint']}"
    )
    _emit(args, result, text)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .workflow import evaluate_checkpoint

    result = evaluate_checkpoint(
        args.checkpoint,
        data=args.data,
        data_dir=args.data_dir,
        limit_test=args.limit_test,
        device=args.device,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    text = (
        f"{result['model']} on {result['data']} ({result['test_samples']} test samples): "
        f"accuracy {100 * result['test_accuracy']:.2f}%, loss {result['test_loss']:.4f}"
    )
    _emit(args, result, text)
    return 0


def _shape_arg(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise ValueError(
            f"--input-shape must look like 1,3,224,224 or 3,32,32, got {text!r}"
        ) from None


def cmd_analyze(args: argparse.Namespace) -> int:
    from .cost import format_table
    from .workflow import analyze_model

    if args.checkpoint is None and args.model is None:
        raise ValueError("give --model (with --method) or --checkpoint (.pt or .lowbit)")
    if args.checkpoint is not None and str(args.checkpoint).endswith(".lowbit"):
        from .cost import analyze

        report = analyze(args.checkpoint, convention=args.convention)
        head = f"{args.checkpoint} (packed), input {report['input_shape']}"
        _emit(args, report, head + "\n" + format_table(report))
        return 0
    report = analyze_model(
        args.model,
        method=args.method,
        model_kwargs=_parse_kv(args.model_arg, "--model-arg"),
        input_shape=_shape_arg(args.input_shape),
        convention=args.convention,
        checkpoint=args.checkpoint,
        method_options=_parse_kv(args.method_arg, "--method-arg"),
    )
    head = f"{report['method']} on {report['model']}, input {report['input_shape']}"
    _emit(args, report, head + "\n" + format_table(report))
    return 0


def _compress_job(
    args: argparse.Namespace, method: str, out, from_checkpoint, options: dict[str, Any]
) -> dict[str, Any]:
    """``compress_model``'s keyword arguments from the parsed compress flags (shared by
    ``lowbit compress`` and ``lowbit compare --run``)."""
    from dataclasses import replace

    fp_config = _train_config(args)
    if args.fp_epochs is not None:
        fp_config = replace(fp_config, epochs=args.fp_epochs)
    qat_config = _train_config(args, _QAT_DEFAULTS.get(method))
    if qat_config.lr is None:  # fine-tuning from an FP model: a smaller step than training
        qat_config = replace(qat_config, lr=0.01 if qat_config.optimizer == "sgd" else 1e-4)
    return {
        "method": method,
        "model": args.model,
        "data": args.data,
        "out": out,
        "config": qat_config,
        "data_dir": args.data_dir,
        "model_kwargs": _parse_kv(args.model_arg, "--model-arg"),
        "from_checkpoint": from_checkpoint,
        "fp_config": fp_config,
        "limit_train": args.limit_train,
        "limit_test": args.limit_test,
        "method_options": options,
        "convention": args.convention,
        "resume": getattr(args, "resume", False),
        "distill": args.distill or 0.0,
        "distill_temperature": args.distill_temperature,
        "bn_recalibrate": args.bn_recalibrate or 0,
    }


def cmd_compress(args: argparse.Namespace) -> int:
    from .workflow import compress_model

    options = _parse_kv(args.method_arg, "--method-arg")
    for flag in (*_METHOD_FLAGS, *_BUDGET_FLAGS):  # method options with their own flags
        if getattr(args, flag, None) is not None:
            options[flag] = getattr(args, flag)
    recipe = None
    if args.recipe is not None:
        from .recipes import Recipe

        if args.method is not None or options:
            raise ValueError("--recipe replaces --method and its options: give one or the other")
        recipe = Recipe.load(args.recipe)
        args.method = recipe.method
    elif args.method is None:
        raise ValueError("give --method (or --recipe FILE)")
    if args.method != "auto" and any(getattr(args, f, None) is not None for f in _BUDGET_FLAGS):
        raise ValueError("--max-* budgets, --candidates, --workers and --ray go with --method auto")
    job = _compress_job(args, args.method, args.out, getattr(args, "from"), options)
    result = compress_model(recipe=recipe, **job)
    fp_acc = result["fp_test_accuracy"]
    text = (
        f"{result['method']} on {result['model']}: test accuracy "
        f"{100 * result['test_accuracy']:.2f}% (FP "
        f"{'n/a' if fp_acc is None else f'{100 * fp_acc:.2f}%'}), "
        f"storage {result['storage_bytes']:,.0f} B (x{result['compression_vs_fp32']:.1f} vs "
        f"fp32), energy x{result['energy_vs_fp16']:.1f} vs fp16, density "
        f"{result['density']:.3f}\nreport: {result['out']}/summary.md"
    )
    _emit(args, result, text)
    return 0


def _ptq_recipe(args: argparse.Namespace):
    """The recipe ``lowbit ptq`` applies: --recipe FILE, --method NAME, or --weights ..."""
    from .ptq import uniform_recipe
    from .recipes import Recipe, make_recipe

    given = [f for f in ("recipe", "method") if getattr(args, f) is not None]
    if len(given) > 1:
        raise ValueError("give one of --recipe and --method (or neither, with --weights)")
    if args.recipe is not None:
        return Recipe.load(args.recipe)
    if args.method is not None:
        return make_recipe(args.method, **_parse_kv(args.method_arg, "--method-arg"))
    if args.method_arg:
        raise ValueError("--method-arg goes with --method")
    return uniform_recipe(args.weights, args.acts, args.first, args.last)


def cmd_ptq(args: argparse.Namespace) -> int:
    from .ptq import Calibration
    from .workflow import ptq_model

    calib = Calibration(method=args.calibration, percentile=args.percentile,
                        bn_correct=args.bn_correct)  # fmt: skip
    result = ptq_model(
        args.checkpoint, args.out, _ptq_recipe(args), data=args.data, data_dir=args.data_dir,
        calibration=calib, calib_images=args.calib_images, limit_test=args.limit_test,
        convention=args.convention, seed=args.seed,
    )  # fmt: skip
    text = (
        f"PTQ ({result['method']}) {result['model']} on {result['data']}: test accuracy "
        f"{100 * result['test_accuracy']:.2f}% (FP {100 * result['fp_test_accuracy']:.2f}%), "
        f"storage {result['storage_bytes']:,.0f} B (x{result['compression_vs_fp32']:.2f} vs "
        f"fp32), energy x{result['energy_vs_fp16']:.2f} vs fp16; {result['seconds']:.1f} s\n"
        f"packed file: {result.get('packed')}; checkpoint: {result['checkpoint']}"
    )
    _emit(args, result, text)
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from .ptq import Calibration
    from .sensitivity import format_table, run_sensitivity

    cands = [c.strip() for c in args.candidates.split(",") if c.strip()]
    result = run_sensitivity(
        args.checkpoint, args.out, data=args.data, data_dir=args.data_dir, candidates=cands,
        calib_images=args.calib_images, holdout=args.holdout,
        calibration=Calibration(method=args.calibration), convention=args.convention,
        latency=not args.no_latency, repeats=args.repeats, seed=args.seed,
        progress=not args.json, workers=args.workers, ray_address=args.ray,
    )  # fmt: skip
    text = f"{format_table(result)}\n\nwritten to {result['out']} (plot: {result['plot']})"
    _emit(args, result, text)
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from .workflow import save_checkpoint_packed

    result = save_checkpoint_packed(args.checkpoint, args.output, example_shape=None)
    text = (
        f"wrote {result['path']}: {result['bytes']:,} B ({result['payload_bytes']:,} B tensors "
        f"+ {result['header_bytes']:,} B header); cost model storage "
        f"{result['storage_bytes']:,.0f} B, x{result['compression_vs_fp32']:.1f} vs fp32"
    )
    _emit(args, result, text)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .workflow import run_packed

    result = run_packed(
        args.model_file, data=args.data, data_dir=args.data_dir, limit_test=args.limit_test,
        batch_size=args.batch_size, threads=args.threads, seed=args.seed, check=args.check,
    )  # fmt: skip
    text = (
        f"{result['model']} ({result['method']}) from {args.model_file} on {result['data']} "
        f"({result['test_samples']} test samples): accuracy {100 * result['test_accuracy']:.2f}%"
        f", {result['ms_per_image']:.3f} ms per image"
    )
    if result.get("agreement_with_reference") is not None:
        text += "; same prediction as the reference executor on "
        text += f"{100 * result['agreement_with_reference']:.2f}%"
    _emit(args, result, text)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .runtime.bench import compare, format_result

    result = compare(args.model_file, threads=args.threads or 1, batch=args.batch,
                     repeats=args.repeats, onnx=not args.no_onnx,
                     per_layer=args.per_layer, sst_kernel=args.sst_kernel)  # fmt: skip
    _emit(args, result, format_result(result))
    return 0


#: the methods a method flag is passed to by ``lowbit compare --run`` (the rest: auto)
_FLAG_METHODS = {"density": ("sbnn", "bnn-pruned"), "n": ("sst",), "k": ("sst",),
                 "teacher": ("burn",), "pretrain": ("burn",), "prior": ("bayes",)}  # fmt: skip


def _run_compare_jobs(args: argparse.Namespace, valid: Sequence[str]) -> list[str]:
    """``compare --run``: one FP model (unless --from), then each method's compress job from
    it into OUT/METHOD. Returns the job folders."""
    from pathlib import Path

    from .workflow import compress_model, train_model

    methods = [m.strip() for m in args.run.split(",") if m.strip()]
    unknown = [m for m in methods if m not in (*valid, "fp", "fp32")]
    if unknown or not methods:
        raise ValueError(
            f"--run: unknown method {', '.join(unknown) or '(none)'}; valid: "
            f"{', '.join(valid)} (and fp: the FP row, always in the report)"
        )
    if args.model is None or args.data is None:
        raise ValueError("--run needs --model and --data")
    methods = [m for m in dict.fromkeys(methods) if m not in ("fp", "fp32")]
    if "auto" not in methods and any(getattr(args, f) is not None for f in _BUDGET_FLAGS):
        raise ValueError("--max-* budgets, --candidates, --workers and --ray go with auto in --run")
    from .workflow import METHOD_WORKFLOWS

    own_loop = [m for m in methods if m in METHOD_WORKFLOWS]
    for flag in ("distill", "bn_recalibrate"):
        if getattr(args, flag) and own_loop:
            raise ValueError(
                f"--{flag.replace('_', '-')} applies to sbnn, prom and sst, not "
                f"{', '.join(own_loop)}"
            )
    out = Path(args.out)
    start = getattr(args, "from")
    if start is None and methods:  # every method starts from the same FP model
        job = _compress_job(args, "fp32", out / "fp", None, {})
        _stderr(f"lowbit compare: training the FP model into {out / 'fp'}")
        start = train_model(job["model"], job["data"], job["out"], job["fp_config"],
                            job["data_dir"], job["model_kwargs"], job["limit_train"],
                            job["limit_test"])["checkpoint"]  # fmt: skip
    dirs = []
    for method in methods:
        options = {
            f: getattr(args, f)
            for f in (*_METHOD_FLAGS, *_BUDGET_FLAGS)
            if getattr(args, f) is not None and method in _FLAG_METHODS.get(f, ("auto",))
        }
        _stderr(f"lowbit compare: compressing with {method} into {out / method}")
        compress_model(**_compress_job(args, method, out / method, start, options))
        dirs.append(str(out / method))
    return dirs


def cmd_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .recipes import METHODS, _load_methods
    from .report import build_report, format_table

    _load_methods()
    dirs = list(args.dirs)
    if args.run:
        valid = sorted(m for m in METHODS if m != "fp32") + ["auto"]
        dirs += _run_compare_jobs(args, valid)
    report = build_report(
        dirs, args.out, latency=not args.no_latency, batch=args.batch, repeats=args.repeats,
        threads=args.threads or 1, onnx=not args.no_onnx, progress=_stderr,
    )  # fmt: skip
    files = ", ".join(Path(f).name for f in report["files"].values())
    plots = ", ".join(Path(p["path"]).name for p in report["plots"].values())
    text = f"{format_table(report)}\n\nwritten to {report['out']}: {files}, {plots}"
    _emit(args, report, text)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import format_table, run_demo

    result = run_demo(out=args.out, epochs=args.epochs, seed=args.seed, quiet=args.quiet)
    _emit(args, result, format_table(result))
    return 0


# ----------------------------------------------------------------------------- parser


def _add_compress_flags(p: argparse.ArgumentParser, for_compare: bool) -> None:
    """The model, FP start, method, budget, data and training flags of ``lowbit compress``
    (also ``lowbit compare``'s, for its --run jobs, where --model and --data are optional)."""
    from .cost import CONVENTIONS

    model_help = "zoo name or pkg.mod:fn" + (" (needed with --run)" if for_compare else "")
    p.add_argument("--model", required=not for_compare, help=model_help)
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="model option")
    p.add_argument(
        "--from",
        metavar="FP_CKPT",
        help="start every --run job from this FP checkpoint (default: train one FP model "
        "into OUT/fp first)"
        if for_compare
        else "start from this FP checkpoint",
    )
    p.add_argument("--fp-epochs", type=int, help="epochs of the FP run (default: --epochs)")
    p.add_argument(
        "--density", type=float, help="target fraction of non-zero weights (sbnn; default 0.05)"
    )
    p.add_argument("--n", type=int, help="SST group size (sst; default 8)")
    p.add_argument("--k", type=int, help="SST non-zeros allowed per group (sst; default 2)")
    p.add_argument(
        "--teacher",
        metavar="CKPT",
        help="burn: the FP target encoder (a lowbit FP checkpoint; --from is the same)",
    )
    p.add_argument(
        "--pretrain",
        metavar="NAME",
        help="burn: pre-train the FP target "
        "self-supervised first (simclr; the default without --teacher)",
    )
    p.add_argument(
        "--prior", choices=("gnj", "ghs"), help="bayes: group normal-Jeffreys or horseshoe (gnj)"
    )
    p.add_argument(
        "--distill",
        type=float,
        metavar="WEIGHT",
        help="QAT methods (sbnn, prom, sst): mix distillation from the FP start model into "
        "the loss with this weight in (0, 1] (default: off)",
    )
    p.add_argument("--distill-temperature", type=float, default=4.0, metavar="T",
                   help="softmax temperature of --distill (default 4)")  # fmt: skip
    p.add_argument(
        "--bn-recalibrate",
        type=int,
        metavar="BATCHES",
        help="QAT methods (sbnn, prom, sst): after QAT, re-estimate the BatchNorm statistics "
        "over this many training batches (augmented as in training) before the freeze "
        "(default: off)",
    )
    g = p.add_argument_group(
        "budget (--method auto)" if not for_compare else "budget (auto in --run)"
    )
    g.add_argument("--max-bytes", type=float, help="bytes stored (the packed tensors)")
    g.add_argument("--max-energy-pj", type=float, help="energy per image, pJ (cost model)")
    g.add_argument(
        "--max-latency-ms",
        type=float,
        help="lowbit runtime latency on this machine, batch 1, one thread",
    )
    g.add_argument(
        "--max-accuracy-drop",
        type=float,
        metavar="POINTS",
        help="accuracy drop against the FP model, in points",
    )
    g.add_argument(
        "--candidates", help="codecs to choose from (default int8,int4,ternary,sst-8-2,binary)"
    )
    _add_sweep(
        p.add_argument_group(
            "where the sensitivity pass runs "
            + ("(auto in --run)" if for_compare else "(--method auto)")
        ),
        None,
    )
    p.add_argument("--convention", choices=CONVENTIONS, default="operand-width",
                   help="energy accounting (default operand-width)")  # fmt: skip
    _add_data(p, required=not for_compare)
    _add_training(p)
    _add_common(p)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lowbit",
        description="Compress CNNs to binary, ternary and low-bit codes; run them fast on CPUs.",
        epilog="Run 'lowbit COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"lowbit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("models", help="list the built-in models", description="List the zoo.")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser(
        "train",
        help="train a full-precision model",
        description="Train a zoo model (or package.module:factory) on a data set.",
    )
    p.add_argument("--model", required=True, help="zoo name (see 'lowbit models') or pkg.mod:fn")
    p.add_argument(
        "--model-arg",
        action="append",
        metavar="KEY=VALUE",
        help="model option, e.g. width=0.5 (repeatable)",
    )
    p.add_argument("--out", required=True, help="output folder (checkpoints, config, log)")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        metavar="CKPT",
        help="continue a run (default: OUT/last.pt)",
    )
    _add_data(p)
    _add_training(p)
    _add_common(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint",
        description="Test accuracy of a checkpoint (default: on the data set it was trained on).",
    )
    p.add_argument("--checkpoint", required=True, help="a .pt file written by lowbit")
    p.add_argument("--batch-size", type=_positive_int, default=512)
    _add_data(p, required=False, train=False)
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    from .cost import CONVENTIONS
    from .recipes import METHODS, _load_methods

    _load_methods()
    methods = sorted(m for m in METHODS if m != "fp32")

    p = sub.add_parser(
        "analyze",
        help="per-layer cost table: params, storage, MACs, BOPs, energy",
        description="Cost of a zoo model under a method (shapes only) or of a checkpoint.",
    )
    p.add_argument("--model", help="zoo name or pkg.mod:fn")
    p.add_argument("--model-arg", action="append", metavar="KEY=VALUE", help="model option")
    p.add_argument("--method", choices=["fp32", *methods], default=None, help="default fp32")
    p.add_argument("--method-arg", action="append", metavar="KEY=VALUE", help="method option")
    p.add_argument("--checkpoint", help="a trained checkpoint (.pt) or a packed file (.lowbit)")
    p.add_argument("--input-shape", help="C,H,W or 1,C,H,W (default: the model's own)")
    p.add_argument("--convention", choices=CONVENTIONS, default="operand-width",
                   help="energy accounting (default operand-width)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser(
        "compress",
        help="compress a model with a method: FP model, QAT, cost report",
        description=(
            "Compress a model with one of the methods. Without --from the FP model is first "
            "trained here with the same budget (--fp-epochs to change it). The QAT learning "
            "rate defaults to 0.01 (SGD) or 1e-4 (Adam)."
        ),
    )
    p.add_argument(
        "--method",
        choices=[*methods, "auto"],
        help="compression method (auto: search a recipe for the --max-* budget)",
    )
    p.add_argument(
        "--recipe",
        metavar="FILE",
        help="a recipe file instead of --method (e.g. the recipe.toml auto wrote)",
    )
    p.add_argument("--method-arg", action="append", metavar="KEY=VALUE",
                   help="method option, e.g. packing=base3 (repeatable)")  # fmt: skip
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted QAT run")
    _add_compress_flags(p, for_compare=False)
    p.set_defaults(func=cmd_compress)

    p = sub.add_parser(
        "ptq",
        help="post-training quantization of an FP checkpoint (no retraining)",
        description=(
            "Quantize an FP checkpoint with no retraining: a recipe (--method, --recipe, or "
            "--weights/--acts on every layer), activation ranges calibrated on a few hundred "
            "training images (labels unused), optional BatchNorm re-estimation; then freeze, "
            "pack and cost it like compress. OUT/ptq.pt is a starting point for "
            "'lowbit compress --from'."
        ),
    )
    p.add_argument("checkpoint", help="an FP checkpoint written by lowbit train")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--method", choices=methods, help="use this method's recipe")
    p.add_argument(
        "--method-arg",
        action="append",
        metavar="KEY=VALUE",
        help="method option (with --method; repeatable)",
    )
    p.add_argument("--recipe", metavar="FILE", help="a recipe file (.toml, .yaml, .json)")
    p.add_argument(
        "--weights",
        default="int8",
        help="weight codec on every layer when neither --method nor --recipe is "
        "given: int8 (default), int<B>, ternary, binary, sst-N-K, fixed-I-F, ...",
    )
    p.add_argument(
        "--acts",
        default="int8",
        choices=("int8", "uint8", "sint8", "float", "sign"),
        help="activation codec with --weights (default int8)",
    )
    p.add_argument("--first", metavar="CODEC", help="weight codec of the first layer")
    p.add_argument("--last", metavar="CODEC", help="weight codec of the last layer")
    p.add_argument(
        "--calibration",
        choices=("minmax", "percentile", "mse"),
        default="percentile",
        help="activation range rule (default percentile)",
    )
    p.add_argument(
        "--percentile",
        type=float,
        default=99.99,
        help="with --calibration percentile (default 99.99)",
    )
    p.add_argument(
        "--calib-images",
        type=_positive_int,
        default=512,
        metavar="N",
        help="calibration images from the training split (default 512)",
    )
    p.add_argument(
        "--bn-correct",
        choices=("auto", "on", "off"),
        default="auto",
        help="re-estimate BatchNorm statistics under the quantized weights (auto: when some "
        "layer's weights have fewer than 8 bits)",
    )
    p.add_argument("--convention", choices=CONVENTIONS, default="operand-width")
    _add_data(p, required=False, train=False)
    _add_common(p)
    p.set_defaults(func=cmd_ptq)

    p = sub.add_parser(
        "sensitivity",
        help="per-layer accuracy drop and savings of each candidate codec (PTQ)",
        description=(
            "For each layer and candidate weight codec: the accuracy drop on a held-out part "
            "of the training split when only that layer is quantized (PTQ, int8 input), and "
            "the bytes, energy and measured runtime latency it saves. Writes "
            "sensitivity.json, sensitivity.md and sensitivity.png into --out."
        ),
    )
    p.add_argument("checkpoint", help="an FP checkpoint written by lowbit train")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument(
        "--candidates",
        default="int8,int4,ternary,sst-8-2,binary",
        help="comma-separated weight codecs (default int8,int4,ternary,sst-8-2,binary; "
        "also int<B>, fixed-I-F, sst-N-K, binary01)",
    )
    p.add_argument("--calib-images", type=_positive_int, default=256, metavar="N",
                   help="calibration images (training split; default 256)")  # fmt: skip
    p.add_argument("--holdout", type=_positive_int, default=1000, metavar="N",
                   help="held-out training images that judge accuracy (default 1000)")  # fmt: skip
    p.add_argument("--calibration", choices=("minmax", "percentile", "mse"),
                   default="percentile")  # fmt: skip
    p.add_argument("--no-latency", action="store_true", help="skip the runtime timings")
    p.add_argument("--repeats", type=_positive_int, default=20,
                   help="runs per latency median (default 20)")  # fmt: skip
    p.add_argument("--convention", choices=CONVENTIONS, default="operand-width")
    _add_sweep(p.add_argument_group("where the PTQ runs go"), 1)
    g = p.add_argument_group("data")
    g.add_argument("--data", help="data set (default: the checkpoint's)")
    g.add_argument("--data-dir", help="folder with one sub-folder per data set")
    _add_common(p)
    p.set_defaults(func=cmd_sensitivity)

    p = sub.add_parser(
        "save",
        help="freeze a compressed checkpoint into a packed .lowbit file",
        description="Freeze a QAT (or FP) checkpoint and write the packed .lowbit file.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint written by lowbit train/compress")
    p.add_argument("-o", "--output", required=True, help="the .lowbit file to write")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=cmd_save)

    p = sub.add_parser(
        "run",
        help="run a packed .lowbit file on a data set with lowbit's CPU runtime",
        description="Accuracy of a packed model from the file alone (lowbit's runtime, no "
        "PyTorch at inference); the file's stored normalization is applied to the raw data.",
    )
    p.add_argument("model_file", metavar="MODEL.lowbit")
    _add_data(p, train=False)
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument(
        "--check",
        action="store_true",
        help="also run the PyTorch reference executor and report the agreement",
    )
    _add_common(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "bench",
        help="latency of a packed file: lowbit vs PyTorch fp32 vs ONNX Runtime",
        description="Time the packed model with lowbit's runtime, side by side with PyTorch "
        "fp32 eager and ONNX Runtime fp32/int8 of the same network (medians).",
    )
    p.add_argument("model_file", metavar="MODEL.lowbit")
    p.add_argument("--batch", type=_positive_int, default=1, help="batch size (default 1)")
    p.add_argument("--repeats", type=_positive_int, default=30, help="timed runs (default 30)")
    p.add_argument("--per-layer", action="store_true", help="add a per-layer profile")
    p.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    p.add_argument("--sst-kernel", choices=["gemm", "lut"], default="gemm",
                   help="SST layers: int8 GEMM (default) or look-up tables")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--threads", type=_positive_int, default=1, help="threads (default 1)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "compare",
        help="one report across methods: accuracy, bytes, energy, BOPs, latency, Pareto plots",
        description=(
            "Collect compress results (folders with result.json) of one model and data set, "
            "or run them first with --run, add the FP model's row, time each packed file "
            "with lowbit's runtime against PyTorch fp32 and ONNX Runtime, and write "
            "report.md, report.html (self-contained), report.json and Pareto plots of "
            "accuracy against bytes, energy and latency (PNG) into --out."
        ),
    )
    p.add_argument(
        "dirs",
        nargs="*",
        metavar="DIR",
        help="output folders of lowbit compress / ptq (each with result.json)",
    )
    p.add_argument("--out", required=True, help="report folder (--run jobs go in sub-folders)")
    p.add_argument(
        "--run",
        metavar="METHODS",
        help="comma-separated methods to compress with first, e.g. sbnn,prom,sst,burn,bayes,"
        "auto (each into OUT/METHOD, all from one FP model; needs --model and --data)",
    )
    g = p.add_argument_group("latency")
    g.add_argument("--batch", type=_positive_int, default=1,
                   help="batch size of the timed runs (default 1; --batch-size is the "
                   "training batch of --run)")  # fmt: skip
    g.add_argument("--repeats", type=_positive_int, default=20,
                   help="timed runs per median (default 20)")  # fmt: skip
    g.add_argument("--no-latency", action="store_true",
                   help="skip the timings (and the latency plot)")  # fmt: skip
    g.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime")
    _add_compress_flags(p, for_compare=True)
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser(
        "demo",
        help="train and compress a small model on the built-in sample, show the results",
        description="A one-minute tour on the built-in MNIST sample (no download needed).",
    )
    p.add_argument("--out", default="lowbit-demo", help="output folder (default ./lowbit-demo)")
    p.add_argument("--epochs", type=_positive_int, default=3, help="epochs (default 3)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_common(p)
    p.set_defaults(func=cmd_demo)
    return parser


def _configure_torch(args: argparse.Namespace) -> None:
    threads = getattr(args, "threads", None)
    if threads and args.command != "run":  # run uses lowbit's runtime, not PyTorch
        import torch

        torch.set_num_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # PyTorch's and numba's OpenMP pools spin while idle and starve each other when one
    # process uses both (lowbit bench/run): make idle threads sleep. Must precede both.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _JSON_FLAG[0] = "--json" in argv
    # `--model mypkg.mod:factory` should find modules in the current folder, like `python -m`.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    want_json = bool(getattr(args, "json", False))

    def fail(message: str, code: int = EXIT_ERROR, **extra: Any) -> int:
        _stderr(f"lowbit {args.command}: error: {message}")
        if want_json:
            print(json.dumps({"error": message, **extra}), flush=True)
        return code

    try:
        _configure_torch(args)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except TrainingInterrupted as e:
        hint = f"; resume with --resume {e.path}" if e.path else ""
        return fail(f"{e}{hint}", EXIT_INTERRUPTED, checkpoint=e.path)
    except KeyboardInterrupt:
        return fail("interrupted", EXIT_INTERRUPTED)
    except (LowbitError, ValueError, OSError, ImportError) as e:
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        return fail(str(e))
    except Exception as e:  # a bug: say so briefly, keep the traceback one variable away
        if os.environ.get("LOWBIT_DEBUG"):
            raise
        return fail(
            f"internal error ({type(e).__name__}: {e}); rerun with LOWBIT_DEBUG=1 for the "
            "traceback and please report it"
        )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
