"""The training loop shared by every method: FP training, QAT, and the methods' hooks.

Design notes
- Exact resume. Every source of randomness is re-derived from ``(seed, epoch, step)``:
  the epoch's sample order (``DistributedSampler`` with ``seed`` and ``set_epoch``), the
  augmentation generator and torch's global RNG (dropout) for each step, and the
  learning rate is a pure function of the global step. A run stopped anywhere, even in
  the middle of an epoch, and resumed from its checkpoint therefore takes exactly the
  steps the uninterrupted run would have taken.
- Data stays in memory as one uint8 tensor; augmentation runs batch-wise on the
  training device (``lowbit.transforms``), so there are no worker processes to manage.
- Hooks (``TrainHook``) let a compression method add loss terms and act per step or
  per epoch without touching the loop: SBNN's entropy penalty, SST's pruning schedule,
  the Bayesian KL term, BURN's moving-target loss.
- Distributed data parallel when launched by ``torchrun``: gloo on CPU, NCCL on CUDA;
  each rank trains on its shard, metrics are all-reduced, and only rank 0 logs and
  writes checkpoints.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .errors import CheckpointError, TrainingError, TrainingInterrupted
from .utils import atomic_write, derive_seed, resolve_device

CHECKPOINT_FORMAT = "lowbit.checkpoint"
CHECKPOINT_VERSION = 1

__all__ = [
    "TrainConfig",
    "TrainHook",
    "Trainer",
    "evaluate",
    "load_checkpoint",
    "save_checkpoint",
    "build_from_checkpoint",
]


@dataclass
class TrainConfig:
    """Everything that decides how a model is trained. Saved with every checkpoint."""

    epochs: int = 10
    batch_size: int = 128
    optimizer: str = "sgd"  # "sgd" | "adam" | "adamw"
    lr: float | None = None  # None: 0.1 for SGD, 1e-3 for Adam(W)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"  # "cosine" | "step" | "constant"
    warmup_epochs: float = 0.0  # linear warm-up from lr/100, in (fractional) epochs
    milestones: tuple[float, ...] = (0.5, 0.75)  # step schedule: fractions of training
    gamma: float = 0.1  # step schedule: factor at each milestone
    min_lr_ratio: float = 0.0  # cosine schedule ends at lr * min_lr_ratio
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # 0 disables mixup
    grad_clip: float | None = None  # max global grad norm; None disables
    augment: bool = True
    seed: int = 0
    device: str = "auto"
    eval_batch_size: int = 512
    progress: bool = True

    def __post_init__(self) -> None:
        self.milestones = tuple(float(m) for m in self.milestones)
        problems = []
        if self.epochs < 0:
            problems.append(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if self.optimizer not in ("sgd", "adam", "adamw"):
            problems.append(f"optimizer must be sgd, adam or adamw, got {self.optimizer!r}")
        if self.schedule not in ("cosine", "step", "constant"):
            problems.append(f"schedule must be cosine, step or constant, got {self.schedule!r}")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.label_smoothing < 1:
            problems.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.mixup_alpha < 0:
            problems.append(f"mixup_alpha must be >= 0, got {self.mixup_alpha}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            problems.append(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.warmup_epochs < 0:
            problems.append(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        if any(not 0 < m < 1 for m in self.milestones):
            problems.append(f"milestones are fractions of training in (0, 1): {self.milestones}")
        if problems:
            raise ValueError("bad training configuration: " + "; ".join(problems))

    @property
    def base_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.1 if self.optimizer == "sgd" else 1e-3

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training options {unknown}; valid: {sorted(known)}")
        return cls(**d)


class TrainHook:
    """Base class for the per-method additions to the training loop. All no-ops.

    A hook sees the ``Trainer`` (``trainer.model`` is the unwrapped model,
    ``trainer.epoch``/``trainer.step`` the position, ``trainer.config`` the config).
    """

    def on_fit_start(self, trainer: Trainer) -> None:
        """Once, before the first step (also after a resume)."""

    def on_epoch_start(self, trainer: Trainer, epoch: int) -> None:
        """Before the first step of ``epoch`` (0-based)."""

    def loss(
        self, trainer: Trainer, loss: torch.Tensor, outputs: torch.Tensor, targets: torch.Tensor
    ) -> torch.Tensor:
        """Return the loss to minimize; add terms to ``loss`` (the task loss so far)."""
        return loss

    def after_step(self, trainer: Trainer) -> None:
        """After each optimizer step (e.g. clamp latent weights)."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: dict[str, Any]) -> None:
        """After evaluation; may add entries to ``metrics`` (they are logged)."""

    def state_dict(self) -> dict[str, Any]:
        """What the hook needs to resume exactly (saved in checkpoints)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Distill(TrainHook):
    """Knowledge distillation from a frozen teacher (Hinton, Vinyals, Dean, arXiv 1503.02531):
    the loss becomes ``(1 - weight) * task + weight * T^2 * KL(p_teacher^T || p_student^T)``,
    ``p^T`` the softmax of the logits over ``T`` (the temperature). The teacher (usually the
    FP model the QAT run starts from) runs in eval mode under no_grad on the same (augmented)
    batch. Put it first in the hook list: it scales the task loss, the method's own terms
    (entropy, KL priors) are then added unscaled."""

    def __init__(self, teacher: nn.Module, weight: float = 0.5, temperature: float = 4.0):
        if not 0 < weight <= 1:
            raise ValueError(f"distillation weight must be in (0, 1], got {weight}")
        if not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature}")
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight, self.temperature = float(weight), float(temperature)

    def on_fit_start(self, trainer: Trainer) -> None:
        self.teacher.to(trainer.device).eval()

    def loss(self, trainer, loss, outputs, targets):
        t = self.temperature
        with torch.no_grad():
            target = F.log_softmax(self.teacher(trainer.batch_inputs).float() / t, dim=1)
        kd = F.kl_div(F.log_softmax(outputs.float() / t, dim=1), target, reduction="batchmean",
                      log_target=True)  # fmt: skip
        return (1 - self.weight) * loss + self.weight * t * t * kd


# ----------------------------------------------------------------------------- helpers


def _destroy_process_group() -> None:
    """At exit, while the interpreter still runs: a process group left to the interpreter's
    teardown can abort the process (gloo, "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _dist_info() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment; (0, 0, 1) otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


def lr_at(config: TrainConfig, global_step: int, steps_per_epoch: int) -> float:
    """Learning rate for ``global_step``: warm-up, then cosine/step/constant. Pure."""
    base = config.base_lr
    total = max(1, config.epochs * steps_per_epoch)
    warm = int(round(config.warmup_epochs * steps_per_epoch))
    if global_step < warm:
        return base * (0.01 + 0.99 * (global_step + 1) / warm)
    if config.schedule == "constant":
        return base
    progress = (global_step - warm) / max(1, total - warm)
    if config.schedule == "cosine":
        lo = base * config.min_lr_ratio
        return lo + (base - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    passed = sum(progress >= m for m in config.milestones)
    return base * config.gamma**passed


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD or Adam(W). BatchNorm parameters and biases get no weight decay.

    A parameter with an ``lr_mult`` attribute (set by a method, e.g. SBNN's learned scales)
    goes into its own group that learns at ``lr * lr_mult`` (see ``set_lr``). The groups are
    the same for the same model, so an optimizer state saved in a checkpoint loads back."""
    groups_by_key: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for p in model.parameters():
        if p.requires_grad:
            key = (p.ndim > 1, float(getattr(p, "lr_mult", 1.0)))
            groups_by_key.setdefault(key, []).append(p)
    base = [(True, 1.0), (False, 1.0)]  # the two usual groups first, even when empty
    keys = base + sorted(k for k in groups_by_key if k not in base)
    groups = [
        {"params": groups_by_key.get(k, []), "weight_decay": config.weight_decay if k[0] else 0.0,
         "lr_mult": k[1]}
        for k in keys
    ]  # fmt: skip
    lr = config.base_lr
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=config.momentum, nesterov=config.nesterov)
    if config.optimizer == "adam":
        return torch.optim.Adam(groups, lr=lr)
    return torch.optim.AdamW(groups, lr=lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every group to ``lr`` times the group's ``lr_mult``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_mult", 1.0)


def _as_tensors(data) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (N,C,H,W), int64 labels) from an ImageSet or a pair of arrays."""
    images, labels = (data.images, data.labels) if hasattr(data, "images") else data
    images = torch.as_tensor(images)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    return images, labels


@torch.no_grad()
def evaluate(
    model: nn.Module,
    data,
    transform: Callable | None = None,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    shard: tuple[int, int] = (0, 1),
) -> dict[str, float]:
    """Top-1 accuracy (a fraction) and mean cross-entropy of ``model`` on ``data``.

    ``data`` is an ``ImageSet`` (uint8 images) or an (images, labels) pair;
    ``transform`` turns a uint8 batch into the model's float input. ``shard=(rank, world)``
    evaluates every world-th sample; counts are summed across ranks when distributed.
    """
    images, labels = _as_tensors(data)
    rank, world = shard
    idx = torch.arange(rank, len(images), world)
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.float64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for start in range(0, len(idx), batch_size):
        b = idx[start : start + batch_size]
        x = images[b].to(device, non_blocking=True)
        y = labels[b].to(device, non_blocking=True)
        x = transform(x) if transform is not None else x.float()
        out = model(x)
        loss_sum += F.cross_entropy(out, y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum().double()
    counts = torch.stack([correct, loss_sum, torch.tensor(float(len(idx)), device=device)])
    if world > 1:
        dist.all_reduce(counts)
    model.train(was_training)
    n = max(1.0, counts[2].item())
    return {"test_accuracy": counts[0].item() / n, "test_loss": counts[1].item() / n}


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, inputs: Iterable[torch.Tensor]) -> int:
    """Reset the running statistics of every trained BatchNorm and re-estimate them as a
    cumulative average (``momentum=None``) over the float input batches ``inputs``.
    Everything but BatchNorm runs in eval mode (activation ranges and weights are not
    touched); the modes and momenta are restored. Returns how many BatchNorms were reset."""
    bns = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.track_running_stats
        and int(m.num_batches_tracked) > 0
    ]
    if not bns:
        return 0
    was_training = model.training
    momenta = [bn.momentum for bn in bns]
    model.eval()
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
        bn.train()
    try:
        for x in inputs:
            model(x)
    finally:
        for bn, m in zip(bns, momenta):
            bn.momentum = m
        model.train(was_training)
    return len(bns)


def recalibrate_bn(
    model: nn.Module,
    data,
    transform: Callable | None = None,
    batches: int = 100,
    batch_size: int = 128,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> int:
    """Re-estimate every BatchNorm's running mean and variance with the model as it is now.

    In QAT the weights that BatchNorm sees keep changing (ternary and binary weights flip
    between levels until the last step), so the running statistics, an EMA over the whole
    run, lag behind the final weights; the frozen model folds exactly these statistics.
    This re-estimates them (:func:`reestimate_batchnorm`) over ``batches`` batches of
    ``data`` drawn with ``seed``, with the activations quantized as trained. Nagel et al.,
    "Overcoming Oscillations in Quantization-Aware Training", ICML 2022, section 4.

    ``transform`` (``t(x, generator=...)``, the lowbit transform protocol) should be the
    *training* transform, augmentation included, drawing from a generator seeded with
    ``seed``: the statistics the network was trained to expect. Without augmentation the
    statistics move to a distribution the weights and the learned activation scales never
    saw: on CIFAR-10 (MobileNetV2 w0.5, PROM, 100 batches) that cost 2.5 points, against
    0.08 with it (bench/results/prom_cifar.md). Returns the number of images used.
    """
    if batches < 1 or batch_size < 2:
        raise ValueError(f"BN recalibration needs batches >= 1 and batch_size >= 2, "
                         f"got {batches} and {batch_size}")  # fmt: skip
    images, _ = _as_tensors(data)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(images), generator=g)[: batches * batch_size]
    chunks = [b for b in idx.split(batch_size) if len(b) >= 2]  # BatchNorm needs 2 samples

    def inputs():
        for b in chunks:
            x = images[b].to(device)
            yield transform(x, generator=g) if transform is not None else x.float()

    reestimate_batchnorm(model, inputs())
    return sum(len(b) for b in chunks)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically (tensors, numbers, strings, lists and dicts only)."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    with atomic_write(path, "wb") as f:
        torch.save(payload, f)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read a lowbit checkpoint safely (``weights_only=True``: no arbitrary unpickling)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt, truncated, or a pickle with foreign objects
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {path}: {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a lowbit checkpoint (no format marker)")
    if int(ckpt.get("version", 0)) > CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint version {ckpt['version']}, newer than this lowbit "
            f"understands ({CHECKPOINT_VERSION}); upgrade lowbit"
        )
    for key in ("model", "state_dict"):
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {path} has no {key!r} entry")
    return ckpt


def build_from_checkpoint(ckpt: dict | str | os.PathLike) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights. Returns (model, ckpt)."""
    from . import models

    if not isinstance(ckpt, dict):
        ckpt = load_checkpoint(ckpt)
    spec = ckpt["model"]
    try:
        model = models.build(
            spec["name"],
            num_classes=spec.get("num_classes"),
            input_shape=tuple(spec["input_shape"]) if spec.get("input_shape") else None,
            **spec.get("kwargs", {}),
        )
    except KeyError as e:
        raise CheckpointError(f"checkpoint model description lacks {e}") from None
    if ckpt.get("recipe"):  # a QAT checkpoint: rebuild the quantized layers first
        from .recipes import Recipe, compress_

        shape = spec.get("input_shape") or getattr(model, "default_input_shape", None)
        example = torch.zeros(1, *shape) if shape else None
        compress_(model, Recipe.from_dict(ckpt["recipe"]), example_input=example)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        msg = str(e).splitlines()[0]
        raise CheckpointError(f"checkpoint weights do not fit {spec['name']}: {msg}") from None
    return model, ckpt


# ----------------------------------------------------------------------------- trainer


@dataclass
class FitResult:
    """What ``Trainer.fit`` returns: the final metrics and where things were written."""

    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_accuracy: float | None = None
    checkpoint: str | None = None
    best_checkpoint: str | None = None
    seconds: float = 0.0


class Trainer:
    """Trains ``model`` with ``config`` and the given hooks.

    >>> trainer = Trainer(model, TrainConfig(epochs=2), out_dir="runs/x",
    ...                   meta={"model": {"name": "lenet5", "kwargs": {}}})
    >>> result = trainer.fit(train_set, test_set)          # doctest: +SKIP

    ``meta`` is stored in every checkpoint; it must say how to rebuild the model
    (``{"model": {"name", "kwargs", "num_classes", "input_shape"}}``) so that
    ``lowbit eval`` and ``--resume`` work. ``train_transform``/``test_transform`` map a
    uint8 batch (B,C,H,W) on the device to the float model input.
    """

    def __init__(
        self,
        model: nn.Module,
        config: TrainConfig | None = None,
        hooks: Sequence[TrainHook] = (),
        out_dir: str | os.PathLike | None = None,
        meta: dict[str, Any] | None = None,
        train_transform: Callable | None = None,
        test_transform: Callable | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.config = config or TrainConfig()
        self.hooks = list(hooks)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.meta = dict(meta or {})
        self.train_transform = train_transform
        self.test_transform = test_transform
        self.rank, self.local_rank, self.world = _dist_info()
        self.batch_inputs: torch.Tensor | None = None  # the current step's model input
        self._log = log or (lambda s: print(s, file=sys.stderr, flush=True))
        self.device = self._pick_device()
        self.model = model.to(self.device)
        self.epoch = 0  # current epoch (0-based)
        self.step = 0  # steps done within the current epoch
        self.global_step = 0
        self.steps_per_epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best_accuracy: float | None = None
        self.optimizer = make_optimizer(self.model, self.config)

    # -- setup

    def _pick_device(self) -> torch.device:
        dev = resolve_device(self.config.device)
        if self.world > 1 and dev.type == "cuda":
            dev = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(dev)
        return dev

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.is_main:
            self._log(msg)

    def _setup_distributed(self) -> nn.Module:
        if self.world <= 1:
            return self.model
        if not dist.is_initialized():
            backend = "nccl" if self.device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            atexit.register(_destroy_process_group)  # the group lowbit made, lowbit ends
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DDP(self.model, device_ids=ids)

    # -- checkpoints

    def state(self) -> dict[str, Any]:
        return {
            **self.meta,
            "state_dict": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "hooks": [h.state_dict() for h in self.hooks],
            "epoch": self.epoch,
            "step": self.step,
            "global_step": self.global_step,
            "config": asdict(self.config),
            "history": self.history,
            "best_accuracy": self.best_accuracy,
        }

    def save(self, name: str) -> str | None:
        if self.out_dir is None or not self.is_main:
            return None
        path = self.out_dir / name
        save_checkpoint(path, self.state())
        return str(path)

    def restore(self, ckpt: dict[str, Any] | str | os.PathLike) -> None:
        """Continue from a checkpoint written by ``save`` (model, optimizer, position)."""
        if not isinstance(ckpt, dict):
            ckpt = load_checkpoint(ckpt)
        self.model.load_state_dict(ckpt["state_dict"])
        if "optimizer" in ckpt:
            try:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            except ValueError as e:  # other parameter groups: another version or options
                raise CheckpointError(
                    f"the checkpoint's optimizer state does not fit this run ({e}); it was "
                    "written by another lowbit version or other method options, so the run "
                    "cannot resume: start a new run from its weights instead"
                ) from None
        states = ckpt.get("hooks", [])
        if len(states) != len(self.hooks):
            raise CheckpointError(
                f"checkpoint has {len(states)} hook states, this run has {len(self.hooks)}"
            )
        for hook, st in zip(self.hooks, states):
            hook.load_state_dict(st)
        self.epoch = int(ckpt.get("epoch", 0))
        self.step = int(ckpt.get("step", 0))
        self.global_step = int(ckpt.get("global_step", 0))
        self.history = list(ckpt.get("history", []))
        self.best_accuracy = ckpt.get("best_accuracy")

    # -- the loop

    def _batches(self, n: int, epoch: int) -> list[torch.Tensor]:
        from torch.utils.data import DistributedSampler

        sampler = DistributedSampler(
            range(n), num_replicas=self.world, rank=self.rank, shuffle=True,
            seed=self.config.seed, drop_last=False,
        )  # fmt: skip
        sampler.set_epoch(epoch)
        order = torch.tensor(list(sampler), dtype=torch.long)
        bs = self.config.batch_size
        batches = list(order.split(bs))
        if len(batches) > 1 and len(batches[-1]) < 2:  # BatchNorm needs 2 samples
            batches.pop()
        return batches

    def _step_loss(self, net: nn.Module, x: torch.Tensor, y: torch.Tensor, seed: int):
        cfg = self.config
        ls = cfg.label_smoothing
        if cfg.mixup_alpha > 0:
            g = torch.Generator().manual_seed(seed ^ 0x5F5F)
            lam = float(np.random.default_rng(seed).beta(cfg.mixup_alpha, cfg.mixup_alpha))
            perm = torch.randperm(len(x), generator=g).to(x.device)
            x = lam * x + (1 - lam) * x[perm]
        self.batch_inputs = x  # what the model saw this step (hooks may run a teacher on it)
        out = net(x)
        loss = F.cross_entropy(out, y, label_smoothing=ls)
        if cfg.mixup_alpha > 0:
            loss = lam * loss + (1 - lam) * F.cross_entropy(out, y[perm], label_smoothing=ls)
        return out, loss

    def fit(self, train_data, test_data=None, resume: dict | str | os.PathLike | None = None):
        """Train for ``config.epochs`` epochs (continuing from ``resume`` if given).

        Writes ``last.pt`` after every epoch and ``best.pt`` when the test accuracy
        improves (when ``out_dir`` is set); on Ctrl-C writes ``last.pt`` at the current
        step and raises ``TrainingInterrupted``. Returns a ``FitResult``.
        """
        cfg = self.config
        if resume is not None:
            self.restore(resume)
        images, labels = _as_tensors(train_data)
        if len(images) < 2:
            raise ValueError("need at least 2 training samples")
        # the DDP wrapper lives only as long as fit(): it holds the process group, which must
        # not outlive the interpreter's shutdown (gloo's threads then abort the process)
        net = self._setup_distributed()
        batches0 = self._batches(len(images), 0)
        self.steps_per_epoch = len(batches0)
        if self.out_dir is not None and self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        for h in self.hooks:
            h.on_fit_start(self)
        t_start = time.perf_counter()
        last_path = None
        try:
            while self.epoch < cfg.epochs:
                metrics = self._run_epoch(net, images, labels, test_data)
                last_path = self.save("last.pt")
                if metrics.get("best"):
                    self.save("best.pt")
        except KeyboardInterrupt:
            path = self.save("last.pt")
            raise TrainingInterrupted(path, self.epoch, self.step) from None
        if last_path is None and self.out_dir is not None:  # nothing left to train
            last_path = self.save("last.pt")
        final = self.history[-1] if self.history else {}
        if test_data is not None and not final:
            final = self.evaluate(test_data)
        best = self.out_dir / "best.pt" if self.out_dir is not None else None
        return FitResult(
            metrics=dict(final),
            history=list(self.history),
            best_accuracy=self.best_accuracy,
            checkpoint=last_path,
            best_checkpoint=str(best) if best is not None and best.exists() else None,
            seconds=time.perf_counter() - t_start,
        )

    def evaluate(self, data) -> dict[str, float]:
        return evaluate(
            self.model, data, self.test_transform, self.config.eval_batch_size,
            self.device, (self.rank, self.world),
        )  # fmt: skip

    def _run_epoch(self, net, images, labels, test_data) -> dict[str, Any]:
        cfg = self.config
        epoch = self.epoch
        batches = self._batches(len(images), epoch)
        if self.step == 0:
            for h in self.hooks:
                h.on_epoch_start(self, epoch)
        net.train()
        bar = None
        if cfg.progress and self.is_main:
            from tqdm import tqdm

            bar = tqdm(
                total=len(batches), initial=self.step, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                file=sys.stderr, leave=False, dynamic_ncols=True, mininterval=0.5, disable=None,
            )  # fmt: skip
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        correct = torch.zeros((), dtype=torch.float64, device=self.device)
        seen, t0 = 0, time.perf_counter()
        while self.step < len(batches):
            b = batches[self.step]
            seed = derive_seed(cfg.seed, epoch, self.step, self.rank)
            torch.manual_seed(seed)  # dropout and any other global-RNG use in this step
            gen = torch.Generator(device=self.device).manual_seed(seed)
            x = images[b].to(self.device, non_blocking=True)
            y = labels[b].to(self.device, non_blocking=True)
            if cfg.augment and self.train_transform is not None:
                x = self.train_transform(x, generator=gen)
            elif self.test_transform is not None:
                x = self.test_transform(x)
            else:
                x = x.float()
            lr = lr_at(cfg, self.global_step, len(batches))
            set_lr(self.optimizer, lr)
            out, loss = self._step_loss(net, x, y, seed)
            for h in self.hooks:
                loss = h.loss(self, loss, out, y)
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at epoch {epoch + 1}, step {self.step + 1} "
                    f"(global step {self.global_step + 1}, lr {lr:.3g}); try a lower learning "
                    "rate (--lr), gradient clipping (--grad-clip) or check the data"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            for h in self.hooks:
                h.after_step(self)
            self.step += 1
            self.global_step += 1
            loss_sum += loss.detach().double() * len(b)
            correct += (out.detach().argmax(1) == y).sum().double()
            seen += len(b)
            if bar is not None:
                bar.update(1)
                if self.step % 10 == 0 or self.step == len(batches):
                    rate = seen * self.world / max(1e-9, time.perf_counter() - t0)
                    bar.set_postfix(
                        loss=f"{loss_sum.item() / seen:.4f}",
                        acc=f"{correct.item() / seen:.3f}",
                        img_s=f"{rate:.0f}",
                        refresh=False,
                    )
        if bar is not None:
            bar.close()
        seconds = time.perf_counter() - t0
        counts = torch.stack(
            [loss_sum, correct, torch.tensor(float(seen), dtype=torch.float64, device=self.device)]
        )
        if self.world > 1:
            dist.all_reduce(counts)
        n = max(1.0, counts[2].item())
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "train_loss": counts[0].item() / n,
            "train_accuracy": counts[1].item() / n,
            "lr": lr_at(cfg, self.global_step - 1, len(batches)),
            "seconds": seconds,
            "images_per_s": n / max(seconds, 1e-9),
        }
        if test_data is not None:
            metrics.update(self.evaluate(test_data))
            acc = metrics["test_accuracy"]
            if self.best_accuracy is None or acc > self.best_accuracy:
                self.best_accuracy = acc
                metrics["best"] = True
        for h in self.hooks:
            h.on_epoch_end(self, epoch, metrics)
        self.history.append(metrics)
        self.log(_summary_line(metrics, cfg.epochs))
        if self.out_dir is not None and self.is_main:
            with atomic_write(self.out_dir / "log.jsonl", "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in self.history)
        self.epoch += 1
        self.step = 0
        return metrics


def _summary_line(m: dict[str, Any], epochs: int) -> str:
    parts = [
        f"epoch {m['epoch']}/{epochs}",
        f"loss {m['train_loss']:.4f}",
        f"train acc {100 * m['train_accuracy']:.2f}%",
    ]
    if "test_accuracy" in m:
        parts.append(f"test acc {100 * m['test_accuracy']:.2f}%" + (" *" if m.get("best") else ""))
    parts += [f"lr {m['lr']:.3g}", f"{m['seconds']:.1f} s", f"{m['images_per_s']:.0f} img/s"]
    extra = [
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
        for k, v in m.items()
        if k not in _SUMMARY_KEYS
    ]
    return "  ".join(parts + extra)


_SUMMARY_KEYS = {
    "epoch", "train_loss", "train_accuracy", "test_accuracy", "test_loss", "lr",
    "seconds", "images_per_s", "best",
}  # fmt: skip
