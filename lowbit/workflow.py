"""The end-to-end jobs behind the CLI, as plain functions (usable from Python and bench/).

``train_model`` and ``evaluate_checkpoint`` do what ``lowbit train`` and ``lowbit eval``
do, returning dictionaries instead of printing.
"""

from __future__ import annotations

import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .train import (
    Distill,
    TrainConfig,
    Trainer,
    build_from_checkpoint,
    evaluate,
    load_checkpoint,
    recalibrate_bn,
)
from .utils import resolve_device, write_json


def load_splits(
    name: str,
    data_dir: str | os.PathLike | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    seed: int = 0,
):
    """Train and test ``ImageSet``s of a data set, each cut to its limit after a
    fixed-seed shuffle (so a limited run still sees a class mix)."""
    from . import data

    train = data.load(name, "train", data_dir).subset(limit_train, seed=seed)
    test = data.load(name, "test", data_dir).subset(limit_test, seed=seed)
    return train, test


def data_meta(ds) -> dict[str, Any]:
    """What a checkpoint records about its data set (to rebuild inputs and labels)."""
    return {
        "name": ds.name,
        "mean": list(ds.mean),
        "std": list(ds.std),
        "classes": list(ds.classes),
        "shape": list(ds.shape),
    }


def transforms_for(ds_meta: dict[str, Any], augment: bool = True):
    """(train transform, test transform) for a data set described by ``data_meta``."""
    from . import transforms

    return (
        transforms.train_transform(ds_meta["name"], augment=augment),
        transforms.test_transform(ds_meta["name"]),
    )


def environment() -> dict[str, Any]:
    return {
        "lowbit": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "argv": sys.argv,
    }


def train_model(
    model: str,
    data: str,
    out: str | os.PathLike,
    config: TrainConfig,
    data_dir: str | os.PathLike | None = None,
    model_kwargs: dict[str, Any] | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    resume: str | os.PathLike | None = None,
    extra_config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train a zoo model (or ``pkg.module:factory``) on a data set; checkpoints into ``out``.

    Returns a summary with ``test_accuracy`` (a fraction), ``checkpoint`` (last.pt),
    ``best_checkpoint``, ``epochs``, ``seconds`` and the per-epoch ``history``.
    """
    from . import models

    out = Path(out)
    model_kwargs = dict(model_kwargs or {})
    resume_ckpt = None
    if resume is not None:
        resume_ckpt = load_checkpoint(resume)
        spec = resume_ckpt["model"]
        if spec["name"] != model or spec.get("kwargs", {}) != model_kwargs:
            raise ValueError(
                f"--resume checkpoint {resume} was trained with model {spec['name']} "
                f"{spec.get('kwargs', {})}, not {model} {model_kwargs}"
            )
    train_set, test_set = load_splits(data, data_dir, limit_train, limit_test, config.seed)
    torch.manual_seed(config.seed)  # the initial weights
    net = models.build(
        model, num_classes=len(train_set.classes), input_shape=train_set.shape, **model_kwargs
    )
    dmeta = data_meta(train_set)
    meta = {
        "model": {
            "name": model,
            "kwargs": model_kwargs,
            "num_classes": len(train_set.classes),
            "input_shape": list(train_set.shape),
        },
        "data": dmeta,
        "lowbit_version": __version__,
        "recipe": None,
    }
    train_tf, test_tf = transforms_for(dmeta, augment=config.augment)
    trainer = Trainer(
        net, config, out_dir=out, meta=meta, train_transform=train_tf, test_transform=test_tf
    )
    if trainer.is_main:
        write_json(
            out / "config.json",
            {
                "command": "train",
                "model": meta["model"],
                "data": {
                    **dmeta,
                    "data_dir": str(data_dir) if data_dir else None,
                    "train_samples": len(train_set),
                    "test_samples": len(test_set),
                    "limit_train": limit_train,
                    "limit_test": limit_test,
                },
                "train": asdict(config),
                "resume": str(resume) if resume else None,
                "environment": environment(),
                **(extra_config or {}),
            },
        )
    result = trainer.fit(train_set, test_set, resume=resume_ckpt)
    summary = {
        "model": model,
        "data": data,
        "test_accuracy": result.metrics.get("test_accuracy"),
        "best_test_accuracy": result.best_accuracy,
        "train_accuracy": result.metrics.get("train_accuracy"),
        "epochs": trainer.epoch,
        "seconds": round(sum(m.get("seconds", 0.0) for m in result.history), 3),
        "checkpoint": result.checkpoint,
        "best_checkpoint": result.best_checkpoint,
        "out": str(out),
        "seed": config.seed,
        "train_samples": len(train_set),
        "test_samples": len(test_set),
        "history": result.history,
    }
    if trainer.is_main:
        write_json(out / "result.json", summary)
    return summary


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    limit_test: int | None = None,
    device: str = "auto",
    batch_size: int = 512,
    seed: int = 0,
) -> dict[str, Any]:
    """Test accuracy of a checkpoint on a data set (default: the one it was trained on)."""
    from . import data as data_mod

    model, ckpt = build_from_checkpoint(checkpoint)
    dmeta = ckpt.get("data") or {}
    name = data or dmeta.get("name")
    if not name:
        raise ValueError(f"{checkpoint} does not record its data set: pass --data")
    test = data_mod.load(name, "test", data_dir).subset(limit_test, seed=seed)
    want = ckpt["model"].get("input_shape")
    if want and list(test.shape) != list(want):
        raise ValueError(
            f"data set {name} has images of shape {list(test.shape)}, but the model in "
            f"{checkpoint} expects {list(want)}"
        )
    n_classes = ckpt["model"].get("num_classes")
    if n_classes and len(test.classes) != n_classes:
        raise ValueError(
            f"data set {name} has {len(test.classes)} classes, the model has {n_classes}"
        )
    _, test_tf = transforms_for({**data_meta(test), **{"name": name}})
    dev = resolve_device(device)
    t0 = time.perf_counter()
    metrics = evaluate(model.to(dev), test, test_tf, batch_size, dev)
    return {
        **metrics,
        "checkpoint": str(checkpoint),
        "model": ckpt["model"]["name"],
        "data": name,
        "test_samples": len(test),
        "seconds": round(time.perf_counter() - t0, 3),
    }


def analyze_model(
    model: str,
    method: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    input_shape: tuple[int, ...] | None = None,
    convention: str = "operand-width",
    checkpoint: str | os.PathLike | None = None,
    method_options: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Cost report of a zoo model under a method's recipe (shapes only, no training), or of
    a checkpoint (FP or QAT). ``input_shape`` is (C,H,W) or (1,C,H,W)."""
    from . import models
    from .cost import analyze
    from .recipes import compress_, make_recipe

    if checkpoint is not None:
        net, ckpt = build_from_checkpoint(checkpoint)
        model = ckpt["model"]["name"]
        method = (ckpt.get("recipe") or {}).get("method", "fp32")
    else:
        net = models.create(model, **(model_kwargs or {}))
        method = method or "fp32"
        shape = _example_shape(net, input_shape)
        compress_(net, make_recipe(method, **(method_options or {})), torch.zeros(1, *shape))
    shape = _example_shape(net, input_shape)
    report = analyze(net, torch.zeros(1, *shape), convention=convention)
    return {"model": model, "method": method, **report}


def _example_shape(net, input_shape) -> tuple[int, ...]:
    if input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        if len(shape) == 4:
            if shape[0] != 1:
                raise ValueError(f"--input-shape: the batch must be 1, got {shape}")
            shape = shape[1:]
        if len(shape) != 3:
            raise ValueError(f"--input-shape must be C,H,W or 1,C,H,W, got {input_shape}")
        return shape
    shape = getattr(net, "default_input_shape", None)
    if shape is None:
        raise ValueError("the model has no default input shape: pass --input-shape C,H,W")
    return tuple(shape)


#: Methods whose training does not fit the generic FP -> QAT flow below: method name ->
#: "module:function" taking ``compress_model``'s arguments and returning its result keys.
METHOD_WORKFLOWS: dict[str, str] = {
    "bayes": "lowbit.methods.bayes:compress_model",  # posterior training, pruning, bits
    "burn": "lowbit.methods.burn:compress_burn",  # label-free, two views, its own loop
    "auto": "lowbit.auto:compress_auto",  # sensitivity, search to a budget, then QAT
}


def compress_model(
    method: str,
    model: str,
    data: str,
    out: str | os.PathLike,
    config: TrainConfig,
    data_dir: str | os.PathLike | None = None,
    model_kwargs: dict[str, Any] | None = None,
    from_checkpoint: str | os.PathLike | None = None,
    fp_config: TrainConfig | None = None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    method_options: dict[str, Any] | None = None,
    convention: str = "operand-width",
    resume: bool = False,
    recipe=None,
    distill: float = 0.0,
    distill_temperature: float = 4.0,
    bn_recalibrate: int = 0,
) -> dict[str, Any]:
    """Compress a model with a method, end to end.

    ``bn_recalibrate`` > 0: after QAT, re-estimate the BatchNorm statistics over that many
    training batches (:func:`lowbit.train.recalibrate_bn`; no augmentation) before the
    freeze; the result then reports the test accuracy before and after, and the QAT
    checkpoint written is ``OUT/qat/recalibrated.pt`` (``last.pt`` stays the run's own).

    ``distill`` > 0: the QAT loss mixes in distillation from the FP model it starts from
    (:class:`lowbit.train.Distill`, that weight and ``distill_temperature``).

    ``recipe`` (a Recipe) replaces the method's own (``method`` then only names the run:
    ``lowbit compress --recipe FILE``, and ``--method auto`` after its search).

    1. The FP model: ``from_checkpoint``, else trained here with ``fp_config`` (into
       ``OUT/fp``).
    2. ``compress_`` with the method's recipe, then QAT with ``config`` and the recipe's
       hooks (into ``OUT/qat``; ``resume`` continues an interrupted QAT run).
    3. The cost report (``OUT/cost.json``, ``OUT/cost.md``) and a summary
       (``OUT/summary.md``, ``OUT/result.json``).
    """
    from .recipes import Recipe, compress_, make_recipe

    if distill and not 0 < distill <= 1:  # before any training
        raise ValueError(f"distillation weight (--distill) must be in (0, 1], got {distill}")
    if bn_recalibrate < 0:
        raise ValueError(f"--bn-recalibrate must be >= 0 batches, got {bn_recalibrate}")
    qat_flags = [f for f, v in (("--distill", distill), ("--bn-recalibrate", bn_recalibrate)) if v]
    if qat_flags and method in METHOD_WORKFLOWS and recipe is None:
        raise ValueError(
            f"{' and '.join(qat_flags)} appl{'ies' if len(qat_flags) == 1 else 'y'} to the "
            f"plain QAT methods (sbnn, prom, sst), not {method!r}, which trains in its own loop"
        )
    if method in METHOD_WORKFLOWS and recipe is None:  # e.g. BURN: its own loop
        import importlib

        module, func = METHOD_WORKFLOWS[method].split(":")
        return getattr(importlib.import_module(module), func)(
            method=method, model=model, data=data, out=out, config=config, data_dir=data_dir,
            model_kwargs=model_kwargs, from_checkpoint=from_checkpoint, fp_config=fp_config,
            limit_train=limit_train, limit_test=limit_test, method_options=method_options,
            convention=convention, resume=resume,
        )  # fmt: skip
    out = Path(out)
    model_kwargs = dict(model_kwargs or {})
    if recipe is None:
        recipe = make_recipe(method, **(method_options or {}))  # validate before any training
    elif method_options:
        raise ValueError("method options go with a method's recipe, not with a recipe file")
    train_set, test_set = load_splits(data, data_dir, limit_train, limit_test, config.seed)
    if from_checkpoint is None:
        fp = train_model(
            model, data, out / "fp", fp_config or config, data_dir, model_kwargs,
            limit_train, limit_test,
        )  # fmt: skip
        from_checkpoint = fp["checkpoint"]
    net, ckpt = build_from_checkpoint(from_checkpoint)
    from_ptq = bool(ckpt.get("recipe") and ckpt.get("ptq"))
    if ckpt.get("recipe") and not from_ptq:
        raise ValueError(f"--from {from_checkpoint} is already compressed; give an FP checkpoint")
    if from_ptq and ckpt["recipe"].get("method") != method:
        raise ValueError(
            f"--from {from_checkpoint} was quantized (lowbit ptq) with the "
            f"{ckpt['recipe'].get('method')!r} recipe, not {method!r}: use --method "
            f"{ckpt['recipe'].get('method')} or start from the FP checkpoint"
        )
    _check_input_shape(ckpt, train_set, from_checkpoint, data)
    dmeta = data_meta(train_set)
    train_tf, test_tf = transforms_for(dmeta, augment=config.augment)
    dev = resolve_device(config.device)
    example = torch.zeros(1, *train_set.shape)
    teacher = None
    if from_ptq:  # already quantized and calibrated: QAT fine-tunes it
        recipe = Recipe.from_dict(ckpt["recipe"])
        fp_acc = {"test_accuracy": ckpt.get("fp_test_accuracy")}
        if distill:
            teacher = build_from_checkpoint(ckpt["fp_checkpoint"])[0]
    else:
        fp_acc = evaluate(net.to(dev), test_set, test_tf, config.eval_batch_size, dev)
        if distill:
            teacher = copy.deepcopy(net).cpu()
        compress_(net.cpu(), recipe, example)
    hooks = recipe.hooks(net)
    if teacher is not None:  # first: it scales the task loss, the method's terms add to it
        hooks = [Distill(teacher, distill, distill_temperature), *hooks]
    meta = {
        "model": ckpt["model"],
        "data": dmeta,
        "lowbit_version": __version__,
        "recipe": recipe.to_dict(),
        "fp_checkpoint": str(ckpt.get("fp_checkpoint", from_checkpoint)),
        "fp_test_accuracy": fp_acc["test_accuracy"],
    }
    if teacher is not None:
        meta["distill"] = {"weight": distill, "temperature": distill_temperature}
    qat_dir = out / "qat"
    trainer = Trainer(
        net, config, hooks=hooks, out_dir=qat_dir, meta=meta,
        train_transform=train_tf, test_transform=test_tf,
    )  # fmt: skip
    resume_from = qat_dir / "last.pt" if resume and (qat_dir / "last.pt").exists() else None
    if trainer.is_main:
        write_json(
            out / "config.json",
            {
                "command": "compress",
                "method": method,
                "recipe": recipe.to_dict(),
                "model": ckpt["model"],
                "data": {**dmeta, "limit_train": limit_train, "limit_test": limit_test,
                         "data_dir": str(data_dir) if data_dir else None},
                "from": str(from_checkpoint),
                "qat": asdict(config),
                "fp": asdict(fp_config) if fp_config else None,
                "convention": convention,
                "distill": meta.get("distill"),
                "environment": environment(),
            },
        )  # fmt: skip
    result = trainer.fit(train_set, test_set, resume=resume_from)
    test_accuracy, checkpoint = result.metrics.get("test_accuracy"), result.checkpoint
    extra = {}
    if bn_recalibrate:
        images = recalibrate_bn(trainer.model, train_set, train_tf, bn_recalibrate,
                                config.batch_size, config.seed, trainer.device)  # fmt: skip
        extra["bn_recalibrate"] = {"batches": bn_recalibrate, "images": images,
                                   "augmented": config.augment,
                                   "test_accuracy_before": test_accuracy}  # fmt: skip
        test_accuracy = trainer.evaluate(test_set)["test_accuracy"]
        checkpoint = trainer.save("recalibrated.pt") or checkpoint
    return report_compressed(
        trainer.model.cpu(), example, test_set, test_tf, out, meta,
        method=method, data=data, convention=convention,
        test_accuracy=test_accuracy, write=trainer.is_main,
        extra={
            "epochs": trainer.epoch,
            "seconds": round(sum(m.get("seconds", 0.0) for m in result.history), 3),
            "checkpoint": checkpoint,
            "fp_checkpoint": meta["fp_checkpoint"],
            "seed": config.seed,
            **extra,
        },
    )  # fmt: skip


def _check_input_shape(ckpt: dict, ds, source, data: str) -> None:
    want = ckpt["model"].get("input_shape")
    if want and list(ds.shape) != list(want):
        raise ValueError(
            f"{source} was trained on inputs of shape {want}, data set {data} has {list(ds.shape)}"
        )


def report_compressed(
    net, example, test_set, test_tf, out: Path, meta: dict[str, Any], *, method: str,
    data: str, convention: str, test_accuracy: float | None, write: bool = True,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Freeze and pack a compressed model (when ``write``), cost it, and write the result
    files every compress-like command leaves in ``out`` (cost.json, cost.md, summary.md,
    result.json). ``meta`` is the checkpoint metadata (model, data, recipe,
    fp_test_accuracy). Returns the result (``compress --json``'s keys)."""
    from . import data as data_mod
    from .cost import analyze, format_table

    frozen_info: dict[str, Any] = {}
    costed = net
    if write:
        fmeta = {**meta, "input_shape": list(test_set.shape)}
        costed, frozen_info = freeze_and_pack(net, example, test_set, test_tf,
                                              out / "model.lowbit", fmeta)  # fmt: skip
    # the cost of the frozen model: its storage is what the packed file holds
    report = analyze(costed, example, convention=convention)
    model_name = meta["model"]["name"]
    report = {"model": model_name, "method": method, **report}
    summary = {
        "method": method,
        "model": model_name,
        "data": data_mod.canonical_name(data),
        "test_accuracy": test_accuracy,
        "fp_test_accuracy": meta.get("fp_test_accuracy"),
        "storage_bytes": report["totals"]["storage_bytes"],
        "fp32_storage_bytes": report["baselines"]["fp32_storage_bytes"],
        "compression_vs_fp32": report["ratios"]["storage_vs_fp32"],
        "storage_vs_fp16": report["ratios"]["storage_vs_fp16"],
        "energy_pj": report["totals"]["energy_pj"],
        "energy_vs_fp16": report["ratios"]["energy_vs_fp16"],
        "energy_vs_fp32": report["ratios"]["energy_vs_fp32"],
        "bops": report["totals"]["bops"],
        "density": report["totals"]["density"],
        "convention": convention,
        **frozen_info,
        "epochs": 0,
        "seconds": 0.0,
        **(extra or {}),
        "out": str(out),
    }
    if write:
        write_json(out / "cost.json", report)
        (out / "cost.md").write_text(f"# Cost report: {method} on {model_name}\n\n```\n"
                                     f"{format_table(report)}\n```\n")  # fmt: skip
        (out / "summary.md").write_text(_summary_md(summary))
        write_json(out / "result.json", summary)
    return summary


def ptq_model(
    checkpoint: str | os.PathLike,
    out: str | os.PathLike,
    recipe,
    data: str | None = None,
    data_dir: str | os.PathLike | None = None,
    calibration=None,
    calib_images: int = 512,
    limit_test: int | None = None,
    convention: str = "operand-width",
    seed: int = 0,
    eval_batch_size: int = 512,
) -> dict[str, Any]:
    """``lowbit ptq``: post-training quantization of an FP checkpoint with ``recipe`` (a
    Recipe or a method name), calibrated on ``calib_images`` training images (their labels
    unused), then frozen, packed and costed like ``compress_model``. Writes OUT/ptq.pt (a
    QAT checkpoint: ``lowbit eval`` reads it, ``lowbit compress --from`` fine-tunes it),
    OUT/model.lowbit, the cost report and OUT/result.json."""
    from . import data as data_mod
    from .ptq import Calibration, ptq_
    from .recipes import Recipe, make_recipe
    from .train import save_checkpoint

    t0 = time.perf_counter()
    out = Path(out)
    calib = calibration or Calibration()
    if calib_images < 1:
        raise ValueError(f"--calib-images must be at least 1, got {calib_images}")
    if isinstance(recipe, str):
        recipe = make_recipe(recipe)
    elif not isinstance(recipe, Recipe):
        raise TypeError(f"recipe must be a Recipe or a method name, got {type(recipe).__name__}")
    net, ckpt = build_from_checkpoint(checkpoint)
    if ckpt.get("recipe"):
        raise ValueError(f"{checkpoint} is already compressed; PTQ starts from an FP checkpoint")
    name = data or (ckpt.get("data") or {}).get("name")
    if not name:
        raise ValueError(f"{checkpoint} does not record its data set: pass --data")
    train_set, test_set = load_splits(name, data_dir, calib_images, limit_test, seed)
    _check_input_shape(ckpt, train_set, checkpoint, name)
    dmeta = data_meta(train_set)
    _, test_tf = transforms_for(dmeta, augment=False)
    net = net.cpu().eval()
    fp_acc = evaluate(net, test_set, test_tf, eval_batch_size)["test_accuracy"]
    images = test_tf(torch.as_tensor(train_set.images))
    example = torch.zeros(1, *train_set.shape)
    info = ptq_(net, recipe, images, calib, example_input=example)
    acc = evaluate(net, test_set, test_tf, eval_batch_size)["test_accuracy"]
    meta = {
        "model": ckpt["model"],
        "data": dmeta,
        "lowbit_version": __version__,
        "recipe": recipe.to_dict(),
        "fp_checkpoint": str(checkpoint),
        "fp_test_accuracy": fp_acc,
        "ptq": {k: v for k, v in info.items() if k != "ranges"},
    }
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out / "ptq.pt", {**meta, "state_dict": net.state_dict()})
    write_json(
        out / "config.json",
        {
            "command": "ptq",
            "recipe": recipe.to_dict(),
            "model": ckpt["model"],
            "data": {**dmeta, "calib_images": calib_images, "limit_test": limit_test,
                     "data_dir": str(data_dir) if data_dir else None},
            "from": str(checkpoint),
            "calibration": calib.to_dict(),
            "convention": convention,
            "environment": environment(),
        },
    )  # fmt: skip
    return report_compressed(
        net, example, test_set, test_tf, out, meta, method=recipe.method,
        data=data_mod.canonical_name(name), convention=convention, test_accuracy=acc,
        extra={
            "ptq": True,
            "calibration": calib.to_dict(),
            "calibration_images": info["calibration_images"],
            "batchnorms_reestimated": info["batchnorms_reestimated"],
            "checkpoint": str(out / "ptq.pt"),
            "fp_checkpoint": str(checkpoint),
            "seconds": round(time.perf_counter() - t0, 3),
            "seed": seed,
        },
    )  # fmt: skip


@torch.no_grad()
def frozen_agreement(net, frozen, data, transform, batch_size: int = 500) -> dict[str, float]:
    """How often the frozen model predicts what the QAT model predicts on ``data``, and
    both accuracies."""
    from .train import _as_tensors

    images, labels = _as_tensors(data)
    net.eval()
    same = correct_q = correct_f = 0
    for i in range(0, len(images), batch_size):
        x = transform(images[i : i + batch_size]) if transform else images[i : i + batch_size]
        y = labels[i : i + batch_size]
        pq = net(x).argmax(1)
        pf = frozen(x).argmax(1)
        same += int((pq == pf).sum())
        correct_q += int((pq == y).sum())
        correct_f += int((pf == y).sum())
    n = max(1, len(images))
    return {"agreement": same / n, "qat_accuracy": correct_q / n, "frozen_accuracy": correct_f / n}


def freeze_and_pack(net, example, test_set, test_tf, path: Path, meta: dict):
    """Freeze ``net``, check it against the QAT model on ``test_set``, write the packed
    file. Returns the frozen model and the figures the compress result reports."""
    from .freeze import freeze
    from .packfile import save

    frozen = freeze(net, example, meta=json.loads(json.dumps(meta, default=str)))
    check = frozen_agreement(net, frozen, test_set, test_tf)
    frozen.meta["test_accuracy_at_save"] = check["frozen_accuracy"]
    saved = save(frozen, path)
    return frozen, {
        "frozen_agreement": check["agreement"],
        "frozen_test_accuracy": check["frozen_accuracy"],
        "packed": saved["path"],
        "packed_bytes": saved["bytes"],
        "packed_payload_bytes": saved["payload_bytes"],
        "packed_header_bytes": saved["header_bytes"],
    }


def _summary_md(s: dict[str, Any]) -> str:
    bn = s.get("bn_recalibrate")
    bn_row = (
        [
            f"| BatchNorm recalibrated | {bn['batches']} batches ({bn['images']:,} images"
            f"{', augmented' if bn.get('augmented') else ''}); test "
            f"accuracy before {100 * bn['test_accuracy_before']:.2f}% |"
        ]
        if bn and bn.get("test_accuracy_before") is not None
        else []
    )
    return "\n".join(
        [
            f"# {s['method']} on {s['model']} ({s['data']})",
            "",
            "| | value |",
            "|---|---|",
            f"| test accuracy (compressed) | {100 * s['test_accuracy']:.2f}% |",
            f"| test accuracy (FP) | {100 * s['fp_test_accuracy']:.2f}% |",
            f"| storage | {s['storage_bytes']:,.0f} B (x{s['compression_vs_fp32']:.2f} vs fp32) |",
            f"| energy | {s['energy_pj']:.4g} pJ (x{s['energy_vs_fp16']:.2f} vs fp16, "
            f"{s['convention']}) |",
            f"| density | {s['density']:.3f} |",
            f"| packed file | {s.get('packed_bytes', 0):,} B: {s.get('packed_payload_bytes', 0):,} "
            f"B tensors + {s.get('packed_header_bytes', 0):,} B header ({s.get('packed')}) |",
            f"| frozen vs QAT predictions | {100 * s.get('frozen_agreement', 0):.2f}% the same |",
            f"| QAT epochs / seconds | {s['epochs']} / {s['seconds']:.0f} |",
            *bn_row,
            "",
        ]
    )


def save_checkpoint_packed(
    checkpoint: str | os.PathLike, output: str | os.PathLike, example_shape=None
) -> dict[str, Any]:
    """``lowbit save``: freeze a checkpoint (QAT or FP) and write the packed file."""
    from .cost import analyze
    from .freeze import freeze
    from .packfile import save

    if not str(output).endswith(".lowbit"):
        raise ValueError(f"the output file should end in .lowbit, got {output}")
    net, ckpt = build_from_checkpoint(checkpoint)
    meta = {
        "model": ckpt.get("model"),
        "data": ckpt.get("data") or (ckpt.get("meta") or {}).get("data"),
        "recipe": ckpt.get("recipe"),
        "lowbit_version": __version__,
        "checkpoint": str(checkpoint),
        "test_accuracy_at_save": (ckpt.get("history") or [{}])[-1].get("test_accuracy"),
    }
    shape = (ckpt.get("model") or {}).get("input_shape") or example_shape
    example = torch.zeros(1, *shape) if shape else None
    frozen = freeze(net.cpu().eval(), example, meta=json.loads(json.dumps(meta, default=str)))
    saved = save(frozen, output)
    report = analyze(frozen)
    return {
        **saved,
        "model": (meta["model"] or {}).get("name"),
        "method": (meta["recipe"] or {}).get("method", "fp32"),
        "storage_bytes": report["totals"]["storage_bytes"],
        "compression_vs_fp32": report["ratios"]["storage_vs_fp32"],
        "energy_vs_fp16": report["ratios"]["energy_vs_fp16"],
        "energy_pj": report["totals"]["energy_pj"],
        "bops": report["totals"]["bops"],
    }


def run_packed(
    path: str | os.PathLike,
    data: str,
    data_dir: str | os.PathLike | None = None,
    limit_test: int | None = None,
    batch_size: int = 256,
    threads: int | None = None,
    seed: int = 0,
    check: bool = False,
) -> dict[str, Any]:
    """``lowbit run``: accuracy of a packed file with lowbit's runtime, from the file alone
    (its stored normalization applied to the raw uint8 test images)."""
    import numpy as np

    from . import data as data_mod
    from .runtime import load

    engine = load(path, threads=threads)
    meta = engine.meta
    dmeta = meta.get("data") or {}
    test = data_mod.load(data, "test", data_dir).subset(limit_test, seed=seed)
    want = meta.get("input_shape")
    if want and list(test.shape) != list(want):
        raise ValueError(f"{path} takes inputs of shape {want}; {data} has {list(test.shape)}")
    mean = np.asarray(dmeta.get("mean", test.mean), np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(dmeta.get("std", test.std), np.float32).reshape(1, -1, 1, 1)
    images, labels = np.asarray(test.images), np.asarray(test.labels)

    def batches():  # the stored normalization applied to raw uint8 images
        for i in range(0, len(images), batch_size):
            x = (images[i : i + batch_size].astype(np.float32) / np.float32(255.0) - mean) / std
            yield np.ascontiguousarray(x, dtype=np.float32)

    t0 = time.perf_counter()
    preds = np.concatenate([np.empty(0, np.int64)] + [engine(x).argmax(1) for x in batches()])
    seconds = time.perf_counter() - t0
    correct = int((preds == labels).sum())
    n = max(1, len(images))
    result = {
        "model": (meta.get("model") or {}).get("name"),
        "method": (meta.get("recipe") or {}).get("method", "fp32"),
        "data": data_mod.canonical_name(data),
        "test_samples": len(images),
        "test_accuracy": correct / n,
        "seconds": round(seconds, 3),
        "ms_per_image": 1000 * seconds / n,
        "file": str(path),
    }
    if check:
        from .packfile import load_frozen

        frozen = load_frozen(path)
        ref = [frozen(torch.from_numpy(x)).argmax(1).numpy() for x in batches()]
        ref = np.concatenate([np.empty(0, np.int64), *ref])
        result["agreement_with_reference"] = float((preds == ref).mean()) if len(ref) else 1.0
    return result
