"""The end-to-end jobs behind the CLI, as plain functions (usable from Python and bench/).

``train_model`` and ``evaluate_checkpoint`` do what ``lowbit train`` and ``lowbit eval``
do, returning dictionaries instead of printing.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .train import TrainConfig, Trainer, build_from_checkpoint, evaluate, load_checkpoint
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
