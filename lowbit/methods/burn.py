"""BURN: label-free training of binary networks from a moving floating-point target.

D. Kim, J. Choi, "Unsupervised Representation Learning for Binary Networks by Joint
Classifier Learning", CVPR 2022, arXiv 2110.08851.

The parts (methods.md, section 4):

- the FP target: a frozen FP encoder ``f_FP`` (a user checkpoint, ``teacher``, with the
  feature layer named by ``feature_layer``; or lowbit's own self-supervised pretraining,
  ``pretrain="simclr"``) followed by a randomly initialized FP MLP head ``g_FP`` that is
  trained jointly with the binary network, so the target moves;
- the binary student: the same architecture as the model given, with binary weights
  (``Binary("pm1")``: ``sign(w) * mean|w|`` per output channel, detached scale, clipped
  identity STE) and sign activations (``SignAct("approxsign")``) on every layer but the
  first and the last (int8, as in the BNN literature), plus its own MLP head ``g_B`` on the
  input of its last layer;
- the loss, for two augmented views v1, v2 of N images, ``z`` the head outputs and ``zh``
  the L2-normalized ones (``burn_loss``)::

      L(v1, v2) = [ (1 - lam) sum_i ||zh_B(v1_i) - zh_FP(v2_i)||^2
                    + lam sum_i KL(softmax(z_FP(v2_i) / T) || softmax(z_B(v1_i) / T)) ] / N
      L_sym = L(v1, v2) + L(v2, v1)

  (the two directions are summed, as BYOL sums its symmetrized loss); gradients reach
  ``g_FP``, the binary encoder and ``g_B``; ``f_FP`` is frozen (no parameter of it requires
  a gradient and its features are computed under ``no_grad``);
- ``lam(i) = l_end - (l_end - l_base) (cos(pi i / I) + 1) / 2`` over the ``I`` steps of
  each stage (``lambda_at``): 0.1 -> 0.3;
- two stages: stage 1 binarizes the activations only (weights stay float), stage 2 the
  weights too, starting from stage 1's binary encoder, ``g_B`` and ``g_FP`` (and their
  optimizer state is *not* carried: each stage has its own warm-up and cosine schedule);
- the collapse signal (``collapse_stats``): the batch spread of the normalized outputs,
  ``sqrt(mean_i ||zh_i - mean zh||^2) = sqrt(1 - ||mean zh||^2)`` (0 when every output is
  the same), and the entropy of the mean softmax (at T) divided by ``log(K)`` (0 when the
  whole batch falls into one pseudo-class). Both are logged per epoch for both
  heads (``spread_b``, ``entropy_b``, ``spread_fp``, ``entropy_fp``), with the spread of
  the binary encoder's features (``spread_enc``, what the probe sees); a warning is
  printed when one falls below ``collapse_spread`` / ``collapse_entropy``.

Evaluation (labels are used only here): a linear probe on the frozen binary encoder
(``linear_probe``: the features of the un-augmented training images are computed once and
standardized, an FP linear layer is trained on them with SGD and the standardization is
folded into its weights, which then become the student's int8 last layer; its int8 input
scale is calibrated on the same features), the same probe on the FP encoder, and
fine-tuning of the whole binary network (probe included) with 1% and 10% of the labels
(``few_label_finetune``: a class-balanced subset, at least one image per class).

The packed file (``compress_burn``) is the binary encoder with its linear probe as the last
layer, so ``lowbit run`` reports the probe's accuracy.

Choices the paper leaves open, or that this machine forces (all options of ``BURNConfig``):

- Self-supervised pretraining of the default target is **SimCLR** (NT-Xent, temperature
  0.5, a 2-layer projection head): it has no momentum encoder or queue to keep and resume,
  its negatives push the outputs apart, so the all-equal solution is not a minimum (BURN's
  own loss has that collapse mode, so its target should not), and it trains at the batch
  sizes a CPU affords. BYOL would need a predictor and an EMA network; MoCo a queue and an
  EMA network.
- Collapse remedy (``head_out_bn = True``, not in the paper): both heads end in a
  BatchNorm without affine parameters, so every output unit has zero mean and unit
  variance over the batch (while its input varies by more than BatchNorm's eps): a
  batch-constant output, the collapsed minimum of the loss, is out of reach, and the loss
  does not depend on the scale of the last linear layer, so nothing pulls it to zero
  (there is no weight decay). Without it the jointly trained FP head and the student
  drift to that minimum at CPU budgets. Measured with ``lowbit compress --method burn
  --model resnet20 --model-arg width=0.5 --data sample --limit-train 1024 --limit-test
  1000 --epochs 2 --batch-size 64`` (both runs with the same SimCLR teacher): with the
  paper's heads the student head's batch spread fell 0.38, 0.15, 0.10, 0.061 over the four
  epochs and the feature term to 0.007 (linear probe 29.4%); with the output BatchNorm
  the spread stayed between 0.996 and 0.976 (probe 29.8%). ``head_out_bn = False`` gives
  the paper's heads.
- Head sizes: the paper's 2000 -> 2000 heads are for 2048/1024-d ImageNet features; for
  the 64-d features of a CIFAR ResNet-20 the default is ``head_hidden = head_dim = 512``.
- Augmentations: BYOL's (random resized crop, flip, colour jitter 0.4/0.4/0.2/0.1 with
  p 0.8, grayscale p 0.2, Gaussian blur with p 1.0 on view 1 and 0.1 on view 2, no
  solarization), with the blur kernel at about 10% of the image side (3 on 32x32) and
  crop areas from ``crop_min_scale = 0.2`` (BYOL's 0.08 leaves little of a 32x32 image).
- Optimizer (``compress_burn``'s CLI defaults): Adam, weight decay 0, cosine with a linear
  warm-up over ``warmup = 5%`` of each stage (10 of 200 epochs in the paper); lr 1e-3 (the
  paper's 3e-4 is for batch 4096 and 200 epochs per stage, budgets a CPU does not have).
- Linear probe: SGD with momentum 0.9, 100 epochs, steps (x0.1) at 60% and 80% as in the
  paper, on standardized features, so its learning rate is ``probe_lr = 0.1`` rather than
  the paper's 0.01 on raw ImageNet features; no augmentation (features computed once).
- Baselines for the benchmark (``objective``): ``burn`` (the method), ``fixed`` (the FP
  head frozen at its random init: distillation from a fixed target), ``kl`` (BURN without
  the feature-similarity term: ``L = KL`` alone), ``simclr`` (NT-Xent on the binary
  network directly, no teacher).

Example::

    >>> from lowbit.workflow import compress_model
    >>> compress_model("burn", "resnet20", "cifar10", "runs/burn", TrainConfig(epochs=2),
    ...                method_options={"pretrain": "simclr"})       # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..codecs import Binary, Float, Int, Int8Act, SignAct, check_act_mode
from ..errors import TrainingError, TrainingInterrupted
from ..layers import QuantConv2d, QuantLinear
from ..recipes import Recipe, Rule, compress_, register_method
from ..train import (
    TrainConfig,
    TrainHook,
    build_from_checkpoint,
    load_checkpoint,
    lr_at,
    make_optimizer,
    save_checkpoint,
    set_lr,
)
from ..transforms import (
    ColorJitter,
    Compose,
    GaussianBlur,
    Normalize,
    RandomApply,
    RandomGrayscale,
    RandomHorizontalFlip,
    RandomResizedCrop,
)
from ..utils import derive_seed, resolve_device, write_json

__all__ = [
    "BURNConfig",
    "OBJECTIVES",
    "PRETRAIN_METHODS",
    "FeatureExtractor",
    "MLPHead",
    "burn_recipe",
    "stage1_recipe",
    "binarize_weights_",
    "lambda_at",
    "burn_loss",
    "nt_xent",
    "collapse_stats",
    "two_view_transforms",
    "BURNObjective",
    "train_two_view",
    "pretrain_simclr",
    "train_burn",
    "linear_probe",
    "few_label_finetune",
    "compress_burn",
    "demo_row",
]

OBJECTIVES = ("burn", "fixed", "kl", "simclr")
PRETRAIN_METHODS = ("simclr",)
ESTIMATORS = ("approxsign", "irnet", "ste")


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class BURNConfig:
    """Options of the ``burn`` method (see the module docstring for the choices)."""

    teacher: str | None = None  # FP lowbit checkpoint (--teacher / --from); None: pretrain
    feature_layer: str | None = None  # teacher module whose output is the feature; None:
    # the input of the teacher's last layer (its classifier). 4-D outputs are avg-pooled.
    pretrain: str | None = None  # "simclr"; None with no teacher: simclr (and says so)
    objective: str = "burn"  # "burn" | "fixed" | "kl" | "simclr" (baselines, see docstring)
    stages: int = 2  # 2: binary activations, then binary weights too; 1: both at once
    temperature: float = 0.2  # T of the KL term (paper)
    lambda_base: float = 0.1  # KL weight at the start of a stage (paper)
    lambda_end: float = 0.3  # ... and at its end (paper)
    head_hidden: int = 512  # MLP heads: in -> hidden -> dim (paper 2000 -> 2000, ImageNet)
    head_dim: int = 512
    head_out_bn: bool = True  # batch-standardized head outputs: no collapsed solution
    estimator: str = "approxsign"  # sign surrogate of the activations (paper: ApproxSign)
    clip: float = 1.5  # STE window and latent clamp of the binary weights
    binarize_first_last: bool = False  # the BNN literature keeps them at 8 bits
    act_mode: str = "ema"  # int8 inputs of the first/last layers: see codecs.INT8_ACT_MODES
    warmup: float = 0.05  # linear warm-up, fraction of each stage (paper: 10 of 200 epochs)
    crop_min_scale: float = 0.2  # random resized crop areas in [crop_min_scale, 1]
    pretrain_lr: float = 1e-3  # SimCLR pretraining: Adam lr (its epochs: --fp-epochs)
    pretrain_temperature: float = 0.5  # NT-Xent temperature (SimCLR's CIFAR-10 value)
    probe_epochs: int = 100  # linear probe on cached features (paper: 100)
    probe_lr: float = 0.1  # SGD on standardized features, x0.1 at 60% and 80%
    probe_batch: int = 256
    finetune_fractions: tuple[float, ...] = (0.01, 0.1)  # few-label fine-tuning; () skips
    finetune_steps: int = 50  # steps of each fine-tuning run
    finetune_lr: float = 1e-4  # Adam
    collapse_spread: float = 0.05  # warn when a head's batch spread falls below this
    collapse_entropy: float = 0.1  # ... or its normalized mean-softmax entropy below this

    def __post_init__(self):
        p: list[str] = []
        if self.teacher is not None and (not isinstance(self.teacher, str) or not self.teacher):
            p.append(f"teacher must be a checkpoint path, got {self.teacher!r}")
        if self.pretrain is not None and self.pretrain not in PRETRAIN_METHODS:
            p.append(
                f"pretrain must be one of {', '.join(PRETRAIN_METHODS)}, got {self.pretrain!r}"
            )
        if self.teacher is not None and self.pretrain is not None:
            p.append("give teacher (--teacher/--from) or pretrain (--pretrain), not both")
        if self.objective not in OBJECTIVES:
            p.append(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.objective == "simclr" and self.teacher is not None:
            p.append("objective simclr trains without a teacher; drop teacher")
        if self.stages not in (1, 2):
            p.append(f"stages must be 1 or 2, got {self.stages!r}")
        if not self.temperature > 0:
            p.append(f"temperature must be > 0, got {self.temperature}")
        if not 0 <= self.lambda_base <= 1 or not 0 <= self.lambda_end <= 1:
            p.append(
                f"lambda_base and lambda_end must be in [0, 1], got {self.lambda_base}, "
                f"{self.lambda_end}"
            )
        for name in ("head_hidden", "head_dim", "probe_epochs", "probe_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                p.append(f"{name} must be a positive integer, got {v!r}")
        v = self.finetune_steps
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            p.append(f"finetune_steps must be an integer >= 0, got {v!r}")
        if self.estimator not in ESTIMATORS:
            p.append(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if not self.clip > 0:
            p.append(f"clip must be > 0, got {self.clip}")
        if problem := check_act_mode(self.act_mode):
            p.append(problem)
        if not 0 <= self.warmup < 1:
            p.append(f"warmup must be in [0, 1), got {self.warmup}")
        if not 0 < self.crop_min_scale <= 1:
            p.append(f"crop_min_scale must be in (0, 1], got {self.crop_min_scale}")
        for name in ("pretrain_lr", "pretrain_temperature", "probe_lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                p.append(f"{name} must be > 0, got {getattr(self, name)}")
        fr = self.finetune_fractions
        if isinstance(fr, int | float):
            fr = (fr,)
        try:
            fr = tuple(float(f) for f in fr)
        except (TypeError, ValueError):
            p.append(
                f"finetune_fractions must be a list of fractions, got {self.finetune_fractions!r}"
            )
            fr = ()
        if any(not 0 < f <= 1 for f in fr):
            p.append(f"finetune_fractions must lie in (0, 1], got {list(fr)}")
        if not 0 <= self.collapse_spread < 1 or not 0 <= self.collapse_entropy < 1:
            p.append("collapse_spread and collapse_entropy must be in [0, 1)")
        if p:
            raise ValueError("bad burn option(s): " + "; ".join(p))
        object.__setattr__(self, "finetune_fractions", fr)

    @property
    def needs_teacher(self) -> bool:
        return self.objective != "simclr"


def _rules(weights, cfg: BURNConfig) -> list[Rule]:
    rules = [Rule(select="all", weights=weights, activations=SignAct(cfg.estimator))]
    if not cfg.binarize_first_last:
        act = Int8Act(mode=cfg.act_mode)
        rules += [
            Rule(select="first", weights=Int(8), activations=act),
            Rule(select="last", weights=Int(8), activations=act),
        ]
    return rules


@register_method("burn")
def burn_recipe(**options: Any) -> Recipe:
    """The final (stage 2) BURN model: pm1 binary weights, sign inputs, int8 first/last
    layers; ``options`` are the fields of ``BURNConfig`` (validated). The training itself
    is ``compress_burn`` (the generic QAT loop does not apply: no labels, two views)."""
    cfg = BURNConfig(**options)
    return Recipe(
        "burn", _rules(Binary("pm1", clip=cfg.clip), cfg), asdict(cfg), [_clamp_factory(cfg)]
    )


def stage1_recipe(cfg: BURNConfig) -> Recipe:
    """Stage 1: sign inputs, float weights on the layers stage 2 binarizes."""
    return Recipe("burn-stage1", _rules(Float(), cfg), {"stage": 1})


def _clamp_factory(cfg: BURNConfig):
    return lambda m: LatentClamp(m, cfg.clip)


class LatentClamp(TrainHook):
    """Clamp the latent weights of the binary layers to ``[-clip, clip]`` after each step
    (the STE window: no weight stuck outside it without gradient)."""

    def __init__(self, model: nn.Module, clip: float = 1.5):
        self.layers = [m for _, m in binary_layers(model)]
        self.clip = float(clip)

    @torch.no_grad()
    def after_step(self, trainer=None):
        for m in self.layers:
            m.weight.clamp_(-self.clip, self.clip)


def binary_layers(model: nn.Module) -> list[tuple[str, QuantConv2d | QuantLinear]]:
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, QuantConv2d | QuantLinear) and isinstance(m.weight_codec, Binary)
    ]


def binarize_weights_(model: nn.Module, cfg: BURNConfig) -> list[str]:
    """Stage 1 -> stage 2 in place: every layer with float weights and sign inputs gets
    ``Binary("pm1")`` weights (the latent weights are stage 1's, clamped to the window);
    the model's recipe becomes the ``burn`` recipe. Returns the layers changed."""
    changed = []
    for name, m in model.named_modules():
        if (
            isinstance(m, QuantConv2d | QuantLinear)
            and isinstance(m.weight_codec, Float)
            and isinstance(m.act.codec, SignAct)
        ):
            m.weight_codec = Binary("pm1", clip=cfg.clip)
            with torch.no_grad():
                m.weight.clamp_(-cfg.clip, cfg.clip)
            changed.append(name)
    model.lowbit_recipe = burn_recipe(**asdict(cfg))
    return changed


# ----------------------------------------------------------------------------- pure maths


def lambda_at(i: int, total: int, base: float = 0.1, end: float = 0.3) -> float:
    """``lam(i) = end - (end - base) (cos(pi i / I) + 1) / 2``: ``base`` at i = 0, ``end``
    at i = I (the KL weight rises, the feature weight ``1 - lam`` falls)."""
    frac = min(max(i, 0), max(total, 1)) / max(total, 1)
    return end - (end - base) * (math.cos(math.pi * frac) + 1) / 2


def _burn_one_way(zb: Tensor, zf: Tensor, lam: float, t: float, feature_term: bool):
    n = zb.shape[0]
    feat = (F.normalize(zb, dim=1) - F.normalize(zf, dim=1)).pow(2).sum(1)  # (N,)
    logp_f = F.log_softmax(zf / t, 1)
    kl = (logp_f.exp() * (logp_f - F.log_softmax(zb / t, 1))).sum(1)  # (N,)
    if feature_term:
        loss = ((1 - lam) * feat + lam * kl).sum() / n
    else:
        loss = kl.sum() / n
    return loss, feat.mean().detach(), kl.mean().detach()


def burn_loss(
    zb1: Tensor,
    zb2: Tensor,
    zf1: Tensor,
    zf2: Tensor,
    lam: float,
    temperature: float = 0.2,
    feature_term: bool = True,
) -> tuple[Tensor, dict[str, float]]:
    """The symmetrized BURN loss (module docstring) for student outputs ``zb1, zb2`` and
    target outputs ``zf1, zf2`` of views 1 and 2, all (N, K). ``feature_term=False``: the
    KL term alone (weight 1). Returns (loss, {"feat", "kl"}: the per-sample means of the
    two terms, averaged over both directions)."""
    a, fa, ka = _burn_one_way(zb1, zf2, lam, temperature, feature_term)
    b, fb, kb = _burn_one_way(zb2, zf1, lam, temperature, feature_term)
    return a + b, {"feat": float(fa + fb) / 2, "kl": float(ka + kb) / 2}


def nt_xent(p1: Tensor, p2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's NT-Xent loss over the 2N projections of N pairs (each sample's positive is
    its other view; the other 2N - 2 are negatives), mean over the 2N anchors."""
    n = p1.shape[0]
    z = F.normalize(torch.cat([p1, p2]), dim=1)
    sim = z @ z.t() / temperature
    sim = sim.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    target = (torch.arange(2 * n, device=z.device) + n) % (2 * n)
    return F.cross_entropy(sim, target)


@torch.no_grad()
def collapse_stats(z: Tensor, temperature: float = 0.2) -> dict[str, float]:
    """``spread = sqrt(1 - ||mean_i zh_i||^2)`` (the root mean squared distance of the
    normalized outputs from their mean: 0 when all are equal, near 1 when spread out) and
    ``entropy`` = H(mean_i softmax(z_i / T)) / log(K) (0: one pseudo-class for the whole
    batch; 1: a uniform mean over all K pseudo-classes)."""
    zh = F.normalize(z.detach().double(), dim=1)
    spread = math.sqrt(max(0.0, 1.0 - float(zh.mean(0).pow(2).sum())))
    p = F.softmax(z.detach().float() / temperature, 1).mean(0)
    h = float(-(p * p.clamp_min(1e-12).log()).sum())
    k = z.shape[1]
    return {"spread": spread, "entropy": h / math.log(k) if k > 1 else 0.0}


# ----------------------------------------------------------------------------- modules


class MLPHead(nn.Module):
    """``Linear(in, hidden) - BatchNorm1d - ReLU - Linear(hidden, out)`` (SimCLR's neck),
    plus (``out_bn``) a BatchNorm1d without affine parameters on the output: every output
    unit then has zero mean and unit variance over the batch, so the outputs cannot all be
    the same (see ``BURNConfig.head_out_bn``)."""

    def __init__(self, in_dim: int, hidden: int = 512, out: int = 512, out_bn: bool = False):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Linear(in_dim, hidden, bias=False),
            nn.BatchNorm1d(hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, out, bias=not out_bn),
        ]
        if out_bn:
            layers.append(nn.BatchNorm1d(out, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class _Stop(Exception):
    def __init__(self, value: Tensor):
        self.value = value


class FeatureExtractor(nn.Module):
    """The features of ``net`` for a batch, as (B, D): the output of the module named
    ``layer``, or (``layer=None``) the input of the last Conv2d/Linear layer the forward
    executes (a classifier's input). The forward stops there (the later layers do not
    run); a 4-D feature map is global-average-pooled to (B, C)."""

    def __init__(self, net: nn.Module, layer: str | None = None, example: Tensor | None = None):
        super().__init__()
        self.net = net
        self.layer = layer
        if layer is None:
            from ..recipes import layer_kinds

            kinds = layer_kinds(net, example)
            if not kinds:
                raise ValueError(f"{type(net).__name__} has no Conv2d/Linear layer")
            self.target_name = list(kinds)[-1]
        else:
            names = [n for n, _ in net.named_modules() if n]
            if layer not in names:
                shown = ", ".join(names[:20]) + (", ..." if len(names) > 20 else "")
                raise ValueError(
                    f"feature_layer {layer!r} is not a module of {type(net).__name__}; "
                    f"modules: {shown}"
                )
            self.target_name = layer

    def forward(self, x: Tensor) -> Tensor:
        target = self.net.get_submodule(self.target_name)  # looked up: compress_ swaps it
        if self.layer is None:

            def pre(mod, inp):
                raise _Stop(inp[0])

            h = target.register_forward_pre_hook(pre)
        else:

            def post(mod, inp, out):
                raise _Stop(out if isinstance(out, Tensor) else out[0])

            h = target.register_forward_hook(post)
        try:
            self.net(x)
        except _Stop as s:
            f = s.value
        else:  # pragma: no cover - the hook always fires when the layer runs
            raise ValueError(f"the forward never reached {self.target_name!r}")
        finally:
            h.remove()
        if f.ndim == 4:
            f = f.mean((2, 3))
        return f.flatten(1)


def _feature_dim(extractor: FeatureExtractor, shape) -> int:
    was = extractor.net.training
    extractor.net.eval()
    with torch.no_grad():
        p = next(extractor.net.parameters())
        d = extractor(torch.zeros(2, *shape, device=p.device)).shape[1]
    extractor.net.train(was)
    return int(d)


# ----------------------------------------------------------------------------- augmentation


def two_view_transforms(mean, std, size: int, crop_min_scale: float = 0.2):
    """BYOL's two augmentation pipelines (no solarization) for uint8 batches (B, C, H, W)
    -> normalized float; view 1 always blurred, view 2 with probability 0.1."""
    k = max(3, int(round(0.1 * size)) | 1)

    def pipe(blur_p: float) -> Compose:
        return Compose(
            [
                RandomResizedCrop(size, scale=(crop_min_scale, 1.0)),
                RandomHorizontalFlip(0.5),
                RandomApply(ColorJitter(0.4, 0.4, 0.2, 0.1), p=0.8),
                RandomGrayscale(0.2),
                RandomApply(GaussianBlur(k, (0.1, 2.0)), p=blur_p),
                Normalize(mean, std),
            ]
        )

    return pipe(1.0), pipe(0.1)


# ----------------------------------------------------------------------------- objectives


class BURNObjective(nn.Module):
    """The two-view objectives as one module: its trainable parts and ``loss(x1, x2, i, I)``.

    ``objective``: ``burn`` (student + g_B against frozen teacher + trained g_FP), ``fixed``
    (g_FP frozen at init), ``kl`` (no feature term), ``simclr`` (NT-Xent on student + a
    projection head, no teacher)."""

    def __init__(
        self,
        student: FeatureExtractor,
        student_dim: int,
        cfg: BURNConfig,
        teacher: FeatureExtractor | None = None,
        teacher_dim: int | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.student = student
        self.head_b = MLPHead(student_dim, cfg.head_hidden, cfg.head_dim, cfg.head_out_bn)
        self.teacher = teacher
        if cfg.needs_teacher:
            if teacher is None or teacher_dim is None:
                raise ValueError(f"objective {cfg.objective} needs a teacher")
            self.head_fp = MLPHead(teacher_dim, cfg.head_hidden, cfg.head_dim, cfg.head_out_bn)
            for p in teacher.parameters():
                p.requires_grad_(False)
            if cfg.objective == "fixed":
                for p in self.head_fp.parameters():
                    p.requires_grad_(False)

    def trainable(self) -> nn.ModuleDict:
        """What the optimizer updates and the checkpoint stores."""
        d = {"student": self.student.net, "head_b": self.head_b}
        if self.cfg.needs_teacher:
            d["head_fp"] = self.head_fp
        return nn.ModuleDict(d)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BatchNorm statistics stay the pretrained ones
        if self.cfg.objective == "fixed":
            self.head_fp.eval()  # the fixed target: not even its BN statistics move
        return self

    def loss(self, x1: Tensor, x2: Tensor, i: int, total: int):
        cfg = self.cfg
        h1, h2 = self.student(x1), self.student(x2)
        zb1, zb2 = self.head_b(h1), self.head_b(h2)
        # the encoder's own spread: what the probe sees (the heads' spread says little when
        # their outputs are batch-normalized)
        enc = {"spread_enc": collapse_stats(torch.cat([h1, h2]))["spread"]}
        if cfg.objective == "simclr":
            loss = nt_xent(zb1, zb2, cfg.pretrain_temperature)
            st = collapse_stats(torch.cat([zb1, zb2]), cfg.temperature)
            return loss, {"spread_b": st["spread"], "entropy_b": st["entropy"], **enc}
        with torch.no_grad():
            f1, f2 = self.teacher(x1), self.teacher(x2)
        zf1, zf2 = self.head_fp(f1), self.head_fp(f2)
        lam = lambda_at(i, total, cfg.lambda_base, cfg.lambda_end)
        loss, terms = burn_loss(
            zb1, zb2, zf1, zf2, lam, cfg.temperature, feature_term=cfg.objective != "kl"
        )
        sb = collapse_stats(torch.cat([zb1, zb2]), cfg.temperature)
        sf = collapse_stats(torch.cat([zf1, zf2]), cfg.temperature)
        return loss, {
            "lambda": lam,
            **terms,
            "spread_b": sb["spread"],
            "entropy_b": sb["entropy"],
            "spread_fp": sf["spread"],
            "entropy_fp": sf["entropy"],
            **enc,
        }


# ----------------------------------------------------------------------------- loop


class _DeferInterrupt:
    """Hold Ctrl-C (SIGINT) back until the block ends, so that a checkpoint written on an
    interrupt never holds weights one step ahead of its step count (main thread only)."""

    def __enter__(self):
        self.hit, self.old = False, None
        if threading.current_thread() is threading.main_thread():
            self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def _handler(self, signum, frame):
        self.hit = True

    def __exit__(self, *exc):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        if self.hit and exc[0] is None:
            raise KeyboardInterrupt
        return False


def _images(data) -> Tensor:
    if isinstance(data, Tensor):
        return data
    images = data.images if hasattr(data, "images") else data[0]
    images = torch.as_tensor(images)
    if images.ndim != 4:
        raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
    return images


def train_two_view(
    name: str,
    loss_fn: Callable[[Tensor, Tensor, int, int], tuple[Tensor, dict[str, float]]],
    modules: nn.Module,
    trainable: nn.Module,
    images,
    views: tuple[Callable, Callable],
    config: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    meta: dict[str, Any] | None = None,
    warmup: float = 0.05,
    after_step: Callable[[], None] | None = None,
    epoch_end: Callable[[dict[str, Any]], None] | None = None,
    resume: bool = True,
    log: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """A label-free two-view training loop: for each batch of uint8 images, two views
    (``views``, each with its own generator), ``loss, stats = loss_fn(x1, x2, i, I)``
    (``i`` the step in this run of ``I``), one optimizer step on ``trainable``'s parameters
    that require a gradient (``config``'s optimizer, lr, weight decay; warm-up over
    ``warmup`` of the steps, then ``config.schedule``).

    Exact resume: the sample order of each epoch and the augmentation generators of each
    step derive from ``(config.seed, epoch, step)``; ``out_dir/last.pt`` is written after
    every epoch and on Ctrl-C (then ``TrainingInterrupted``); with ``resume`` an existing
    ``last.pt`` is continued (a finished one returns its history at once). Returns the
    per-epoch history (loss and the mean of each stat)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    cfg = config
    dev = resolve_device(cfg.device)
    modules.to(dev)
    imgs = _images(images)
    n = len(imgs)
    if n < 2:
        raise ValueError("need at least 2 training images")
    bs = min(cfg.batch_size, n)
    steps = n // bs  # full batches only: BatchNorm and the negatives need a full batch
    if steps == 0:
        steps = 1
    total = max(1, cfg.epochs * steps)
    sched = replace(cfg, warmup_epochs=cfg.warmup_epochs or warmup * cfg.epochs)
    opt = make_optimizer(trainable, cfg)
    epoch = step = 0
    history: list[dict[str, Any]] = []
    out = Path(out_dir) if out_dir is not None else None
    last = out / "last.pt" if out is not None else None
    if resume and last is not None and last.exists():
        ck = load_checkpoint(last)
        if ck.get("run") != name:
            raise ValueError(f"{last} belongs to run {ck.get('run')!r}, not {name!r}")
        trainable.load_state_dict(ck["state_dict"])
        opt.load_state_dict(ck["optimizer"])
        epoch, step = int(ck["epoch"]), int(ck["step"])
        history = list(ck.get("history", []))
        if epoch < cfg.epochs:
            log(f"{name}: resuming from {last} at epoch {epoch + 1}, step {step + 1}")

    def save():
        if last is None:
            return None
        save_checkpoint(
            last,
            {
                **(meta or {}),
                "model": (meta or {}).get("model", {"name": name}),
                "run": name,
                "state_dict": trainable.state_dict(),
                "optimizer": opt.state_dict(),
                "epoch": epoch,
                "step": step,
                "history": history,
                "config": asdict(cfg),
            },
        )
        return str(last)

    try:
        while epoch < cfg.epochs:
            g = torch.Generator().manual_seed(derive_seed(cfg.seed, 7, epoch))
            order = torch.randperm(n, generator=g)[: steps * bs].view(steps, bs)
            modules.train()
            sums: dict[str, float] = {}
            t0 = time.perf_counter()
            bar = None
            if cfg.progress:
                from tqdm import tqdm

                bar = tqdm(
                    total=steps,
                    initial=step,
                    desc=f"{name} epoch {epoch + 1}/{cfg.epochs}",
                    file=sys.stderr,
                    leave=False,
                    dynamic_ncols=True,
                    mininterval=0.5,
                    disable=None,
                )
            done_here = 0
            while step < steps:
                i = epoch * steps + step
                seed = derive_seed(cfg.seed, epoch, step)
                torch.manual_seed(seed)
                x = imgs[order[step]].to(dev, non_blocking=True)
                g1 = torch.Generator(device=dev).manual_seed(seed ^ 0x1111)
                g2 = torch.Generator(device=dev).manual_seed(seed ^ 0x2222)
                x1, x2 = views[0](x, generator=g1), views[1](x, generator=g2)
                lr = lr_at(sched, i, steps)
                set_lr(opt, lr)
                loss, stats = loss_fn(x1, x2, i, total)
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"{name}: the loss became {loss.item()} at epoch {epoch + 1}, step "
                        f"{step + 1} (lr {lr:.3g}); try a lower learning rate (--lr)"
                    )
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(trainable.parameters(), cfg.grad_clip)
                with _DeferInterrupt():  # the update and the step count change together
                    opt.step()
                    if after_step is not None:
                        after_step()
                    step += 1
                done_here += 1
                sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{sums['loss'] / done_here:.4f}", refresh=False)
            if bar is not None:
                bar.close()
            seconds = time.perf_counter() - t0
            m: dict[str, Any] = {"epoch": epoch + 1}
            m.update({k: v / max(1, done_here) for k, v in sums.items()})
            m.update(
                {
                    "lr": lr_at(sched, (epoch + 1) * steps - 1, steps),
                    "seconds": seconds,
                    "images_per_s": done_here * bs / max(seconds, 1e-9),
                }
            )
            if epoch_end is not None:
                epoch_end(m)
            history.append(m)
            log(
                f"{name} epoch {epoch + 1}/{cfg.epochs}  "
                + "  ".join(
                    f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                    for k, v in m.items()
                    if k != "epoch"
                )
            )
            epoch += 1
            step = 0
            save()
    except KeyboardInterrupt:
        path = save()
        raise TrainingInterrupted(path, epoch, step) from None
    if last is not None and not last.exists():
        save()
    return history


def _collapse_warning(cfg: BURNConfig, name: str, log: Callable[[str], None]):
    def check(m: dict[str, Any]) -> None:
        bad = []
        for side in ("b", "fp", "enc"):
            s, e = m.get(f"spread_{side}"), m.get(f"entropy_{side}")
            if s is not None and s < cfg.collapse_spread:
                bad.append(f"{side} spread {s:.3g} < {cfg.collapse_spread}")
            if e is not None and e < cfg.collapse_entropy:
                bad.append(f"{side} entropy {e:.3g} < {cfg.collapse_entropy}")
        m["collapse"] = bool(bad)
        if bad:
            msg = (
                f"{name}: the outputs look collapsed at epoch {m['epoch']} ({'; '.join(bad)}): "
                "try a lower learning rate or a larger batch"
            )
            warnings.warn(msg, stacklevel=2)
            log("warning: " + msg)

    return check


# ----------------------------------------------------------------------------- jobs


def _spec(model, num_classes, shape, kwargs) -> dict[str, Any]:
    return {
        "name": model,
        "kwargs": dict(kwargs or {}),
        "num_classes": num_classes,
        "input_shape": list(shape),
    }


def pretrain_simclr(
    net: nn.Module,
    images,
    views,
    config: TrainConfig,
    out_dir: str | os.PathLike | None,
    cfg: BURNConfig,
    meta: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    resume: bool = True,
) -> list[dict[str, Any]]:
    """SimCLR on the FP ``net`` (in place): NT-Xent on a projection head over the input of
    its last layer, Adam ``cfg.pretrain_lr``, weight decay 1e-6, ``config.epochs`` epochs.
    No labels. The encoder (``net``, classifier untrained) is written to
    ``out_dir/encoder.pt`` as a lowbit checkpoint usable as ``--teacher``."""
    shape = tuple(_images(images).shape[1:])
    ext = FeatureExtractor(net, None, torch.zeros(1, *shape))
    dim = _feature_dim(ext, shape)
    head = MLPHead(dim, cfg.head_hidden, 128)
    both = nn.ModuleDict({"net": net, "head": head})
    t = cfg.pretrain_temperature

    def loss_fn(x1, x2, i, total):
        p1, p2 = head(ext(x1)), head(ext(x2))
        st = collapse_stats(torch.cat([p1, p2]), cfg.temperature)
        return nt_xent(p1, p2, t), {"spread": st["spread"]}

    pcfg = replace(config, optimizer="adam", lr=cfg.pretrain_lr, weight_decay=1e-6)
    hist = train_two_view(
        "simclr-pretrain",
        loss_fn,
        both,
        both,
        images,
        views,
        pcfg,
        out_dir,
        meta,
        warmup=cfg.warmup,
        log=log,
        resume=resume,
    )
    if out_dir is not None and meta is not None:
        save_checkpoint(
            Path(out_dir) / "encoder.pt",
            {**meta, "state_dict": net.state_dict(), "recipe": None, "history": hist},
        )
    return hist


def train_burn(
    student: nn.Module,
    images,
    views,
    config: TrainConfig,
    cfg: BURNConfig,
    teacher: FeatureExtractor | None = None,
    out_dir: str | os.PathLike | None = None,
    meta: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
    example: Tensor | None = None,
    resume: bool = True,
) -> tuple[BURNObjective, list[dict[str, Any]]]:
    """Both stages on ``student`` (an FP model; compressed here with ``stage1_recipe``, then
    switched to binary weights by ``binarize_weights_`` unless ``cfg.stages == 1``, when it
    is compressed with the final recipe from the start). ``config.epochs`` epochs per stage.
    Checkpoints in ``out_dir/stage1`` and ``out_dir/stage2`` (resumable). Returns the
    objective (student, heads) and the history of both stages (``stage`` in each entry)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    shape = tuple(_images(images).shape[1:])
    example = example if example is not None else torch.zeros(1, *shape)
    s_ext = FeatureExtractor(student, None, example)
    s_dim = _feature_dim(s_ext, shape)
    t_dim = _feature_dim(teacher, shape) if teacher is not None else None
    first = stage1_recipe(cfg) if cfg.stages == 2 else burn_recipe(**asdict(cfg))
    compress_(student, first, example)
    obj = BURNObjective(s_ext, s_dim, cfg, teacher, t_dim)
    dev = resolve_device(config.device)
    obj.to(dev)
    history: list[dict[str, Any]] = []
    out = Path(out_dir) if out_dir is not None else None
    for stage in range(1, cfg.stages + 1):
        final = stage == cfg.stages
        if stage == 2:
            binarize_weights_(student, cfg)
        clamp = LatentClamp(student, cfg.clip) if final else None
        rec = student.lowbit_recipe
        smeta = {**(meta or {}), "recipe": rec.to_dict(), "stage": stage}
        name = f"burn-stage{stage}" if cfg.objective != "simclr" else f"simclr-bnn-stage{stage}"
        trainable = obj.trainable()
        hist = train_two_view(
            name,
            obj.loss,
            obj,
            trainable,
            images,
            views,
            config,
            out / f"stage{stage}" if out is not None else None,
            smeta,
            warmup=cfg.warmup,
            after_step=clamp.after_step if clamp is not None else None,
            epoch_end=_collapse_warning(cfg, name, log),
            log=log,
            resume=resume,
        )
        history += [{**h, "stage": stage} for h in hist]
    return obj, history


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _features(ext: FeatureExtractor, images: Tensor, transform, batch: int = 500) -> Tensor:
    was = ext.net.training
    ext.net.eval()
    dev = next(ext.net.parameters()).device
    out = [
        ext(transform(images[i : i + batch].to(dev))).float().cpu()
        for i in range(0, len(images), batch)
    ]
    ext.net.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def _train_linear(
    ftr: Tensor, ytr: Tensor, classes: int, epochs: int, lr: float, batch: int, seed: int
) -> tuple[Tensor, Tensor]:
    """An FP linear classifier on standardized features (SGD, momentum 0.9, x0.1 at 60% and
    80%), returned folded back onto the raw features: (weight (K, D), bias (K,))."""
    mu = ftr.mean(0)
    sd = ftr.std(0).clamp_min(1e-6) if len(ftr) > 1 else torch.ones_like(mu)
    x = (ftr - mu) / sd
    lin = nn.Linear(x.shape[1], classes)
    g = torch.Generator().manual_seed(derive_seed(seed, 0x9B0E))
    with torch.no_grad():
        lin.weight.normal_(0, 0.01, generator=g)
        lin.bias.zero_()
    opt = torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9)
    n = len(x)
    bs = min(batch, n)
    for ep in range(epochs):
        f = ep / max(1, epochs)
        for group in opt.param_groups:
            group["lr"] = lr * (0.1 ** ((f >= 0.6) + (f >= 0.8)))
        perm = torch.randperm(n, generator=g)
        for i in range(0, n, bs):
            b = perm[i : i + bs]
            loss = F.cross_entropy(lin(x[b]), ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        w = lin.weight / sd
        b = lin.bias - (w * mu).sum(1)
    return w, b


def linear_probe(
    ext: FeatureExtractor,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    transform,
    classes: int,
    cfg: BURNConfig,
    seed: int = 0,
    layer: nn.Module | None = None,
) -> dict[str, float]:
    """Linear-probe accuracy of the frozen encoder ``ext`` (see the module docstring).

    With ``layer`` (the student's last layer, a ``QuantLinear``), the probe is written into
    it: weights and bias set, its int8 input scale calibrated on the training features (train
    mode on that layer only), and ``test_accuracy`` is the accuracy through it (what the
    packed model computes); ``probe_fp_accuracy`` is the FP probe's."""
    ftr = _features(ext, train_images, transform)
    fte = _features(ext, test_images, transform)
    ytr, yte = torch.as_tensor(train_labels).long(), torch.as_tensor(test_labels).long()
    w, b = _train_linear(ftr, ytr, classes, cfg.probe_epochs, cfg.probe_lr, cfg.probe_batch, seed)
    fp_acc = float(((fte @ w.t() + b).argmax(1) == yte).float().mean()) if len(yte) else 0.0
    result = {
        "test_accuracy": fp_acc,
        "probe_fp_accuracy": fp_acc,
        "train_accuracy": float(((ftr @ w.t() + b).argmax(1) == ytr).float().mean()),
    }
    if layer is not None:
        if not isinstance(layer, nn.Linear) or tuple(layer.weight.shape) != tuple(w.shape):
            raise ValueError(
                f"the student's last layer must be a Linear of shape {tuple(w.shape)} to hold "
                f"the probe; got {layer}"
            )
        dev = layer.weight.device
        with torch.no_grad():
            layer.weight.copy_(w.to(dev))
            if layer.bias is None:
                raise ValueError("the student's last layer has no bias to hold the probe's")
            layer.bias.copy_(b.to(dev))
            was = layer.training
            layer.train()
            for i in range(0, len(ftr), 500):  # the int8 input scale (EMA) on the features
                layer(ftr[i : i + 500].to(dev))
            layer.eval()
            pred = torch.cat(
                [layer(fte[i : i + 500].to(dev)).argmax(1).cpu() for i in range(0, len(fte), 500)]
                or [torch.zeros(0)]
            )
            layer.train(was)
        result["test_accuracy"] = float((pred == yte).float().mean()) if len(yte) else 0.0
    return result


def few_label_subset(labels, fraction: float, classes: int, seed: int = 0) -> np.ndarray:
    """Indices of a class-balanced ``fraction`` of ``labels``: ``max(1, round(fraction *
    count))`` images of each class present, drawn with a fixed seed."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(derive_seed(seed, int(fraction * 1e6)))
    idx = []
    for c in range(classes):
        where = np.flatnonzero(labels == c)
        if len(where):
            k = max(1, int(round(fraction * len(where))))
            idx.append(rng.choice(where, size=min(k, len(where)), replace=False))
    return np.sort(np.concatenate(idx)) if idx else np.zeros(0, np.int64)


def few_label_finetune(
    model: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test,
    fraction: float,
    cfg: BURNConfig,
    train_tf,
    test_tf,
    classes: int,
    config: TrainConfig,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Fine-tune a copy of the binary ``model`` (its encoder and the probe as classifier)
    end to end with cross-entropy on a class-balanced ``fraction`` of the training labels:
    ``cfg.finetune_steps`` Adam steps at ``cfg.finetune_lr`` (cosine), batches of up to
    ``config.batch_size`` with the data set's standard augmentation. Returns the test
    accuracy of the fine-tuned model and the number of labels used."""
    from ..train import evaluate

    idx = torch.as_tensor(few_label_subset(train_labels, fraction, classes, config.seed))
    net = copy.deepcopy(model)
    dev = next(net.parameters()).device
    clamp = LatentClamp(net, cfg.clip)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=cfg.finetune_lr)
    bs = min(config.batch_size, len(idx))
    g = torch.Generator().manual_seed(derive_seed(config.seed, 0xF1, len(idx)))
    steps = cfg.finetune_steps
    net.train()
    t0 = time.perf_counter()
    for s in range(steps):
        for group in opt.param_groups:
            group["lr"] = cfg.finetune_lr * 0.5 * (1 + math.cos(math.pi * s / max(1, steps)))
        b = idx[torch.randperm(len(idx), generator=g)[:bs]]
        if len(b) < 2:  # BatchNorm needs two samples
            b = idx[torch.randint(len(idx), (2,), generator=g)]
        x = train_tf(train_images[b].to(dev), generator=torch.Generator().manual_seed(s))
        loss = F.cross_entropy(net(x), train_labels[b].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clamp.after_step()
    acc = evaluate(net, test, test_tf, config.eval_batch_size, dev)["test_accuracy"]
    if log is not None:
        log(
            f"burn: fine-tuned with {len(idx)} labels ({100 * fraction:g}%): test accuracy "
            f"{100 * acc:.2f}% ({steps} steps, {time.perf_counter() - t0:.1f} s)"
        )
    return {"fraction": fraction, "labels": len(idx), "steps": steps, "test_accuracy": acc}


# ----------------------------------------------------------------------------- workflow


def load_teacher(path, shape, feature_layer: str | None) -> tuple[FeatureExtractor, dict]:
    """A frozen FP encoder from a lowbit checkpoint; checks it is FP and takes ``shape``."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--teacher: checkpoint not found: {path}")
    net, ckpt = build_from_checkpoint(path)
    if ckpt.get("recipe"):
        raise ValueError(f"--teacher {path} is a compressed model; give an FP checkpoint")
    want = ckpt["model"].get("input_shape")
    if want and list(want) != list(shape):
        raise ValueError(f"--teacher {path} takes inputs of shape {want}, the data {list(shape)}")
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return FeatureExtractor(net, feature_layer, torch.zeros(1, *shape)), ckpt


def compress_burn(
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
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``lowbit compress --method burn``, end to end (same arguments and result keys as
    ``lowbit.workflow.compress_model``, which dispatches here).

    1. The FP target encoder: ``teacher`` (or ``from_checkpoint``), else SimCLR pretraining
       of an FP ``model`` on the training images for ``fp_config.epochs`` (``OUT/pretrain``).
    2. BURN, ``config.epochs`` per stage (``OUT/stage1``, ``OUT/stage2``), no labels.
    3. Evaluation with labels: linear probes on the binary and the FP encoder, few-label
       fine-tuning; the probe becomes the student's last layer.
    4. ``OUT/model.pt`` (the QAT checkpoint), ``OUT/model.lowbit``, the cost report and
       ``OUT/result.json``.
    """
    from .. import __version__, models
    from .. import data as data_mod
    from ..cost import analyze, format_table
    from ..workflow import (
        _summary_md,
        data_meta,
        environment,
        freeze_and_pack,
        load_splits,
        transforms_for,
    )

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    opts = dict(method_options or {})
    if from_checkpoint is not None:
        if opts.get("teacher") not in (None, str(from_checkpoint)):
            raise ValueError("--from and --teacher name different checkpoints; give one")
        opts["teacher"] = str(from_checkpoint)
    try:
        cfg = BURNConfig(**opts)
    except TypeError as e:  # an unknown option name
        raise ValueError(f"bad option for method 'burn': {e}") from None
    out = Path(out)
    model_kwargs = dict(model_kwargs or {})
    train_set, test_set = load_splits(data, data_dir, limit_train, limit_test, config.seed)
    shape = tuple(train_set.shape)
    classes = len(train_set.classes)
    dmeta = data_meta(train_set)
    train_tf, test_tf = transforms_for(dmeta, augment=config.augment)
    views = two_view_transforms(train_set.mean, train_set.std, shape[1], cfg.crop_min_scale)
    dev = resolve_device(config.device)
    images = torch.from_numpy(train_set.images)
    labels = torch.from_numpy(train_set.labels)
    test_images = torch.from_numpy(test_set.images)
    test_labels = torch.from_numpy(test_set.labels)
    spec = _spec(model, classes, shape, model_kwargs)
    example = torch.zeros(1, *shape)
    write_json(
        out / "config.json",
        {
            "command": "compress",
            "method": method,
            "options": asdict(cfg),
            "model": spec,
            "data": {
                **dmeta,
                "limit_train": limit_train,
                "limit_test": limit_test,
                "data_dir": str(data_dir) if data_dir else None,
            },
            "train": asdict(config),
            "fp": asdict(fp_config) if fp_config else None,
            "convention": convention,
            "environment": environment(),
        },
    )
    t_start = time.perf_counter()

    # the student (checked first: the probe goes into its last layer)
    torch.manual_seed(config.seed)
    student = models.build(model, num_classes=classes, input_shape=shape, **model_kwargs)
    last = student.get_submodule(FeatureExtractor(student, None, example).target_name)
    if not isinstance(last, nn.Linear) or last.bias is None:
        raise ValueError(
            f"burn puts its linear probe into the model's last layer, which must be a Linear "
            f"with a bias; {model}'s last layer is {type(last).__name__}"
        )

    # 1. the FP target encoder
    teacher = None
    teacher_src = None
    pre_hist: list[dict[str, Any]] = []
    if cfg.needs_teacher:
        if cfg.teacher is not None:
            teacher, _ = load_teacher(cfg.teacher, shape, cfg.feature_layer)
            teacher_src = cfg.teacher
        else:
            pcfg = fp_config or config
            torch.manual_seed(pcfg.seed)
            fp_net = models.build(model, num_classes=classes, input_shape=shape, **model_kwargs)
            teacher = FeatureExtractor(fp_net, cfg.feature_layer, example)  # checks the name
            why = "no --teacher given: " if cfg.pretrain is None else ""
            log(
                f"burn: {why}pre-training the default self-supervised teacher (SimCLR, "
                f"{pcfg.epochs} epoch(s), no labels) into {out / 'pretrain'}"
            )
            pmeta = {"model": spec, "data": dmeta, "lowbit_version": __version__}
            pre_hist = pretrain_simclr(
                fp_net,
                images,
                views,
                replace(pcfg, device=config.device),
                out / "pretrain",
                cfg,
                pmeta,
                log,
                resume,
            )
            fp_net.eval()
            for p in fp_net.parameters():
                p.requires_grad_(False)
            teacher_src = str(out / "pretrain" / "encoder.pt")
        teacher.to(dev)

    # 2. BURN (no labels)
    meta = {"model": spec, "data": dmeta, "lowbit_version": __version__}
    obj, history = train_burn(
        student, images, views, config, cfg, teacher, out, meta, log, example, resume
    )
    train_seconds = sum(h.get("seconds", 0.0) for h in history)

    # 3. evaluation (labels from here on)
    last_name = obj.student.target_name
    probe = linear_probe(
        obj.student,
        images,
        labels,
        test_images,
        test_labels,
        test_tf,
        classes,
        cfg,
        config.seed,
        layer=student.get_submodule(last_name),
    )
    fp_probe = None
    if teacher is not None:
        fp_probe = linear_probe(
            teacher, images, labels, test_images, test_labels, test_tf, classes, cfg, config.seed
        )
    log(
        f"burn: linear probe on the binary encoder {100 * probe['test_accuracy']:.2f}%"
        + (f", on the FP encoder {100 * fp_probe['test_accuracy']:.2f}%" if fp_probe else "")
    )
    finetune = [
        few_label_finetune(
            student, images, labels, test_set, f, cfg, train_tf, test_tf, classes, config, log
        )
        for f in cfg.finetune_fractions
        if cfg.finetune_steps > 0
    ]

    # 4. the QAT checkpoint, the packed file, the cost report
    student = student.cpu().eval()
    recipe = student.lowbit_recipe
    fmeta = {
        "model": spec,
        "data": dmeta,
        "lowbit_version": __version__,
        "recipe": recipe.to_dict(),
        "teacher": teacher_src,
        "fp_test_accuracy": fp_probe["test_accuracy"] if fp_probe else None,
    }
    save_checkpoint(
        out / "model.pt", {**fmeta, "state_dict": student.state_dict(), "history": history}
    )
    costed, frozen_info = freeze_and_pack(
        student,
        example,
        test_set,
        test_tf,
        out / "model.lowbit",
        {**fmeta, "input_shape": list(shape)},
    )
    report = analyze(costed, example, convention=convention)
    report = {"model": model, "method": method, **report}
    summary = {
        "method": method,
        "model": model,
        "data": data_mod.canonical_name(data),
        "test_accuracy": probe["test_accuracy"],
        "fp_test_accuracy": fp_probe["test_accuracy"] if fp_probe else None,
        "probe_fp_accuracy": probe["probe_fp_accuracy"],
        "finetune": finetune,
        **{f"finetune_{100 * f['fraction']:g}pct_accuracy": f["test_accuracy"] for f in finetune},
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
        "objective": cfg.objective,
        "teacher": teacher_src,
        "pretrain": None if cfg.teacher else ("simclr" if cfg.needs_teacher else None),
        "labels_in_training": False,
        "epochs": config.epochs,
        "stages": cfg.stages,
        "seconds": round(train_seconds, 3),
        "pretrain_seconds": round(sum(h.get("seconds", 0.0) for h in pre_hist), 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "collapse_warnings": sum(bool(h.get("collapse")) for h in history),
        "history": history,
        "checkpoint": str(out / "model.pt"),
        "fp_checkpoint": teacher_src,
        "out": str(out),
        "seed": config.seed,
    }
    write_json(out / "cost.json", report)
    (out / "cost.md").write_text(
        f"# Cost report: {method} on {model}\n\n```\n{format_table(report)}\n```\n"
    )
    md = _summary_md({**summary, "fp_test_accuracy": summary["fp_test_accuracy"] or 0.0})
    md += (
        "\nBURN: test accuracy = linear probe on the binary encoder, FP = linear probe on "
        "the FP encoder; no labels in training.\n"
    )
    (out / "summary.md").write_text(md)
    write_json(out / "result.json", summary)
    json.dumps(summary, default=str)  # fail here, not in the CLI, on anything unserializable
    return summary


# ----------------------------------------------------------------------------- demo


def demo_row(out, epochs: int, seed: int, quiet: bool) -> dict[str, Any]:
    """``lowbit demo``'s BURN row: a ResNet-20 at width 0.5 on 512 images of the built-in
    sample, SimCLR-pretrained FP target and both BURN stages for ``epochs`` epochs each
    (Adam 1e-3, batch 64), no labels in training; accuracy = linear probe (1,000 test
    images). Few-label fine-tuning is left out to keep the demo short."""
    from .. import models

    kwargs = {"width": 0.5}
    cfg = TrainConfig(epochs=epochs, batch_size=64, optimizer="adam", lr=1e-3,
                      weight_decay=0.0, seed=seed, progress=not quiet)  # fmt: skip
    res = compress_burn(
        "burn", "resnet20", "sample", Path(out) / "burn-resnet20", cfg, model_kwargs=kwargs,
        fp_config=cfg, limit_train=512, limit_test=1000,
        method_options={"finetune_fractions": ()},
    )  # fmt: skip
    return {
        "method": "burn",
        "model": "resnet20 w0.5",
        "test_accuracy": res["test_accuracy"],
        "fp_test_accuracy": res["fp_test_accuracy"],
        "params": models.count_params(models.create("resnet20", input_shape=(1, 28, 28), **kwargs)),
        "storage_bytes": res["storage_bytes"],
        "compression_vs_fp32": res["compression_vs_fp32"],
        "energy_vs_fp16": res["energy_vs_fp16"],
        "density": res["density"],
        "seconds": res["seconds"],
        "checkpoint": res["checkpoint"],
    }
