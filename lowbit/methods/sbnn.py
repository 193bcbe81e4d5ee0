"""SBNN: sparse binary networks by binary-domain generalization.

R. Schiavone, F. Galati, M. A. Zuluaga, "Binary domain generalization for sparsifying
binary neural networks", ECML-PKDD 2023, arXiv 2306.13515.

Weights of the binarized layers live in a two-value domain (``lowbit.codecs.Binary``):
``01`` = {0, beta} (sparse binary, the default), ``ab`` = {alpha, beta} or ``pm1`` (a
classic BNN). Their inputs are binarized with ``sign`` (ApproxSign or IR-Net surrogate
gradient). First and last layers keep int8 weights and int8 inputs unless
``binarize_first_last``.

The entropy constraint (``EntropyConstraint``): with the density
``p = #{w > 0} / #weights`` over all binarized layers (differentiable through the sign
STE: ``b = (s(w) + 1) / 2``, ``db/dw = 1/2`` inside the clip window),
``h = relu(p - EC)``, ``lambda = gamma * L_task / (h (1 - gamma))`` (detached, 0 when
``h <= 1e-4``, at most ``lambda_cap``) and ``L = L_task + lambda * h``.

Why the published penalty stalls at short budgets, and the remedy
-----------------------------------------------------------------
The penalty's *value* is a fixed fraction gamma of the loss, so its gradient on one latent
weight is ``lambda / (2 N) = gamma / (1 - gamma) * L_task / (2 N h)``: about 1e-7 for a
LeNet-5 at L_task = 0.1 (N = 50k binarized weights, h = 0.2), orders of magnitude below the
task gradient of every weight the task uses. Adam divides each coordinate by the RMS of
its gradient, so a weight with a noisy task gradient moves by about
``lr * (lambda / 2N) / rms(task grad)`` per step toward zero: the weights the task is
indifferent to drift slowly, the ones it uses do not move at all, and as the task loss
falls the push falls with it. Measured (LeNet-5 from its FP weights, the built-in
MNIST sample, 6 epochs, Adam 1e-3 cosine, EC = 0.05, gamma = 0.07): the density went
0.483, 0.476, 0.471, 0.469, 0.468, 0.468 while the mean lambda fell from 0.17 to 0.018
(accuracy 95.7%); the methods doc's prototype (latent weights from +-0.01) stopped at 0.234.

The remedy (``remedy="project"``, the default) keeps the penalty as published for the
first part of training, then makes the constraint hard: from ``project_start`` to
``project_end`` (fractions of the training steps) the allowed density shrinks from the
density reached so far to EC on the cubic schedule of gradual pruning (Zhu & Gupta 2017,
arXiv 1710.01878), ``d(t) = EC + (p0 - EC) (1 - t')^3``; after every optimizer step the
weights over budget are projected to zero, keeping the largest latent weights (the ones
the penalty and the task pushed furthest from the zero side), and after ``project_end``
the projection holds the density at EC while training goes on with the mask so found (a
weight outside it returns only by beating the smallest kept weight in one step). It holds
it from below too: the task can turn weights off by itself (ResNet-20, CIFAR-10, EC 0.10:
0.082 at the end with a cap alone), so when the density falls under EC the largest "off"
latent weights are set just above zero (``_REVIVE``) until it is EC again.
Same run with the remedy: density 0.0500 (binarized layers), accuracy 92.2%.
Defaults ``project_start = 0.2``, ``project_end = 0.5`` (were 0.5 / 0.75): at 3 QAT
epochs (3,000 images, batch 64) the earlier schedule leaves half the run to fine-tune
the final mask: 90.6% (Adam FP) and 90.2% (SGD FP) against 89.4% / 88.1%.
``project_scope="proportional"`` (default) shrinks every layer's density by the same
factor, so the per-layer allocation the entropy constraint learned is kept and latent
scales of different layers are never compared; ``layer`` puts every layer at EC;
``global`` ranks raw latent values across layers. ``remedy="none"`` is the published
method alone.

ReLU before a sign-quantized layer (``relu="identity"``, the default): ``sign(relu(x)) ==
sign(x)`` with ``sign(0) = -1``, also through max-pool and flatten, so such a ReLU changes
no forward value but zeroes the sign surrogate's gradient on ``x < 0``. The hook
``ReluBypass`` replaces every ReLU whose output reaches *only* sign-quantized layers (through
max-pool / flatten / dropout / identity) with ``nn.Identity`` when training starts.
Forward values, checkpoints and the frozen model are the same either way (a model rebuilt
by ``build_from_checkpoint`` keeps its ReLUs and computes the same function); only the
gradients differ. ReLUs that also feed a float path (a residual addition) stay.
Measured on the LeNet-5 run above (remedy on): 92.2% with ``identity``, 91.1% with
``keep`` (one seed, 1,000 test images: a small gain, within a seed's noise).

The honest baseline: ``bnn-pruned`` trains a classic pm1 BNN (no constraint) and prunes it
by latent magnitude to the same density on the same schedule (``MaskedBinary``: weights
``a * sign(w)`` with ``sign(0) = 0``; a latent weight held at exactly 0 is pruned), so it has
the same steps, schedule and budget as SBNN. ``prune_bnn_`` does the same to a trained
pm1 model in one shot.

Example::

    >>> from lowbit.recipes import compress_
    >>> net = lowbit.models.create("lenet5")
    >>> recipe = sbnn_recipe(density=0.05)
    >>> compress_(net, recipe)                              # doctest: +SKIP
    >>> Trainer(net, cfg, hooks=recipe.hooks(net)).fit(train, test)  # doctest: +SKIP
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, fx, nn

from ..codecs import (
    Binary,
    Encoded,
    Int,
    Int8Act,
    SignAct,
    Ternary,
    check_act_mode,
    sign_pm1,
    ste,
)
from ..layers import QuantConv2d, QuantLinear
from ..recipes import Recipe, Rule, register_method
from ..train import TrainHook

__all__ = [
    "PUBLISHED_GAMMA",
    "SBNNConfig",
    "BNNPrunedConfig",
    "MaskedBinary",
    "EntropyConstraint",
    "LatentClamp",
    "IRNetSchedule",
    "ScaleLR",
    "DensityProjection",
    "ReluBypass",
    "BiasCorrection",
    "sbnn_recipe",
    "bnn_pruned_recipe",
    "published_gamma",
    "binarized_layers",
    "latent_density",
    "weight_density",
    "project_density_",
    "prune_bnn_",
    "layer_report",
    "kernel_patterns",
    "plot_kernel_patterns",
    "irnet_t_k",
]

#: Published (EC, gamma) pairs, CIFAR-10 (arXiv 2306.13515); EC = 0.5: no constraint.
PUBLISHED_GAMMA: tuple[tuple[float, float], ...] = (
    (0.01, 0.10), (0.02, 0.08), (0.03, 0.08), (0.04, 0.07), (0.05, 0.07), (0.10, 0.04),
    (0.25, 0.02), (0.50, 0.0),
)  # fmt: skip

REMEDIES = ("project", "none")
SCOPES = ("proportional", "layer", "global")
RELU_MODES = ("identity", "keep")
DOMAINS = ("01", "ab", "pm1")
ESTIMATORS = ("approxsign", "irnet", "ste")
H_CUT = 1e-4  # lambda = 0 when the hinge is at most this
RATE_MIN = 0.02  # BiasCorrection: firing rates kept in [RATE_MIN, 1 - RATE_MIN]


def published_gamma(density: float) -> float:
    """gamma for a target density: the published CIFAR-10 value at a published EC, linear
    interpolation in EC between them, the end values outside [0.01, 0.5]."""
    pts = PUBLISHED_GAMMA
    if density <= pts[0][0]:
        return pts[0][1]
    for (e0, g0), (e1, g1) in zip(pts, pts[1:]):
        if e0 <= density <= e1:
            return g0 + (g1 - g0) * (density - e0) / (e1 - e0)
    return pts[-1][1]


def irnet_t_k(epoch: int, epochs: int) -> tuple[float, float]:
    """IR-Net's schedule: ``t = 10^(-1 + 2 epoch / E)`` (0.1 at the start, towards 10),
    ``k = max(1 / t, 1)``; ``epoch`` is 0-based."""
    t = 10.0 ** (-1.0 + 2.0 * epoch / max(1, epochs))
    return t, max(1.0 / t, 1.0)


# ----------------------------------------------------------------------------- codec


@dataclass(frozen=True)
class MaskedBinary(Ternary):
    """A pruned classic BNN: ``q = a * sign(w)`` with ``sign(0) = 0``, ``a`` = per output
    channel mean ``|w|`` over the non-zero latent weights (detached, XNOR-Net style).

    A latent weight held at exactly 0 (by ``DensityProjection``) is a pruned weight; every
    other weight is +-a, so a dense model is the pm1 BNN of ``Binary("pm1")``. STE:
    identity inside ``|w| <= clip``, zero outside. The value set {-a, 0, +a} is a ternary
    one: the codes {-1, 0, +1} and the scale are stored and run as ternary codes (2 bits per
    weight), which is why the class derives from ``Ternary``.
    """

    type_name: ClassVar[str] = "binary_masked"
    clip: float = 1.5

    def __post_init__(self):
        super().__post_init__()
        if not self.clip > 0:
            raise ValueError(f"MaskedBinary codec: clip must be > 0, got {self.clip}")

    @staticmethod
    def _scale(w: Tensor) -> Tensor:
        flat = w.detach().abs().reshape(w.shape[0], -1)
        n = (flat != 0).sum(1).clamp_min(1)
        return (flat.sum(1) / n).reshape([-1] + [1] * (w.ndim - 1))

    def fake_quant(self, w, params=None):
        surrogate = torch.where(w.abs() <= self.clip, w, w.detach())
        return ste(torch.sign(w.detach()), surrogate) * self._scale(w)

    def encode(self, w, params=None):
        w = w.detach()
        return Encoded(torch.sign(w).to(torch.int32), {"scale": self._scale(w).flatten().float()})

    def mac_kind(self, act):
        return "xnor" if isinstance(act, SignAct) else super().mac_kind(act)


# ----------------------------------------------------------------------------- configs


def _check_common(problems: list[str], c) -> None:
    if c.estimator not in ESTIMATORS:
        problems.append(f"estimator must be one of {', '.join(ESTIMATORS)}, got {c.estimator!r}")
    if not c.clip > 0:
        problems.append(f"clip must be > 0, got {c.clip}")
    if c.relu not in RELU_MODES:
        problems.append(f"relu must be one of {', '.join(RELU_MODES)}, got {c.relu!r}")
    if problem := check_act_mode(c.act_mode):
        problems.append(problem)


@dataclass(frozen=True)
class SBNNConfig:
    """Options of the ``sbnn`` method (see the module docstring)."""

    density: float = 0.05  # EC, the target fraction of non-zero binarized weights
    domain: str = "01"  # "01" = {0, beta} | "ab" = {alpha, beta} | "pm1" (classic BNN)
    estimator: str = "approxsign"  # sign surrogate: "approxsign" | "irnet" | "ste"
    gamma: float | None = None  # None: the published CIFAR-10 value for the density
    # the cap binds once the constraint is violated by less than about gamma*L/(cap*(1-gamma))
    # (7.5e-3 at L = 1, gamma = 0.07): the 1/h growth near the target is cut off there
    lambda_cap: float = 10.0
    binarize_first_last: bool = False  # the BNN literature keeps them at 8 bits
    clip: float = 1.5  # STE window and latent clamp (the authors' 1.5)
    remedy: str = "project"  # "project" (meets the density) | "none" (published penalty only)
    project_start: float = 0.2  # fraction of training steps where the projection begins
    project_end: float = 0.5  # ... and where it reaches the target (then holds it)
    project_scope: str = "proportional"  # "proportional" | "layer" | "global"
    relu: str = "identity"  # ReLUs feeding only sign inputs: "identity" (gradient) | "keep"
    # binarized layers with a bias and no BatchNorm after them: correct the bias for the
    # offset binarization adds, on the first batch (see BiasCorrection); BN models: no-op
    bias_correction: bool = True
    act_mode: str = "ema"  # int8 activations of the first/last layers: see codecs.INT8_ACT_MODES
    # the learned domain scalars (tau, phi) learn at lr * scale_lr (see ScaleLR); 1 = as
    # every other parameter
    scale_lr: float = 0.01

    def __post_init__(self):
        problems: list[str] = []
        if (
            isinstance(self.scale_lr, bool)
            or not isinstance(self.scale_lr, int | float)
            or not (0 < self.scale_lr <= 1e3 and math.isfinite(self.scale_lr))
        ):
            problems.append(f"scale_lr must be a number in (0, 1000], got {self.scale_lr!r}")
        if not isinstance(self.density, int | float) or not 0 < self.density <= 0.5:
            problems.append(f"density must be in (0, 0.5], got {self.density!r}")
        if self.domain not in DOMAINS:
            problems.append(f"domain must be one of {', '.join(DOMAINS)}, got {self.domain!r}")
        elif self.domain == "pm1" and isinstance(self.density, int | float) and self.density < 0.5:
            problems.append(
                "domain pm1 has no zero weights, so a density below 0.5 cannot be met: use "
                "domain '01' (SBNN) or the 'bnn-pruned' method (pm1 BNN pruned by magnitude)"
            )
        if self.gamma is not None and not 0 <= self.gamma < 1:
            problems.append(f"gamma must be in [0, 1), got {self.gamma}")
        if not self.lambda_cap > 0:
            problems.append(f"lambda_cap must be > 0, got {self.lambda_cap}")
        if self.remedy not in REMEDIES:
            problems.append(f"remedy must be one of {', '.join(REMEDIES)}, got {self.remedy!r}")
        if not 0 <= self.project_start <= self.project_end <= 1:
            problems.append(
                "need 0 <= project_start <= project_end <= 1, got "
                f"{self.project_start}, {self.project_end}"
            )
        if self.project_scope not in SCOPES:
            problems.append(
                f"project_scope must be one of {', '.join(SCOPES)}, got {self.project_scope!r}"
            )
        _check_common(problems, self)
        if problems:
            raise ValueError("bad sbnn option(s): " + "; ".join(problems))
        if self.gamma is None:
            object.__setattr__(self, "gamma", round(published_gamma(float(self.density)), 6))
        object.__setattr__(self, "density", float(self.density))

    @property
    def constrained(self) -> bool:
        return self.density < 0.5


@dataclass(frozen=True)
class BNNPrunedConfig:
    """Options of the ``bnn-pruned`` baseline: a pm1 BNN pruned by latent magnitude."""

    density: float = 0.05
    estimator: str = "approxsign"
    binarize_first_last: bool = False
    clip: float = 1.5
    prune_start: float = 0.2  # same schedule as SBNN's projection by default
    prune_end: float = 0.5
    prune_scope: str = "layer"  # uniform per-layer sparsity, the usual magnitude pruning
    relu: str = "identity"
    bias_correction: bool = True
    act_mode: str = "ema"

    def __post_init__(self):
        problems: list[str] = []
        if not isinstance(self.density, int | float) or not 0 < self.density <= 1:
            problems.append(f"density must be in (0, 1], got {self.density!r}")
        if not 0 <= self.prune_start <= self.prune_end <= 1:
            problems.append(
                f"need 0 <= prune_start <= prune_end <= 1, got {self.prune_start}, {self.prune_end}"
            )
        if self.prune_scope not in SCOPES:
            problems.append(
                f"prune_scope must be one of {', '.join(SCOPES)}, got {self.prune_scope!r}"
            )
        _check_common(problems, self)
        if problems:
            raise ValueError("bad bnn-pruned option(s): " + "; ".join(problems))
        object.__setattr__(self, "density", float(self.density))


def _rules(weights, estimator: str, binarize_first_last: bool, act_mode: str) -> list[Rule]:
    rules = [Rule(select="all", weights=weights, activations=SignAct(estimator))]
    if not binarize_first_last:
        act = Int8Act(mode=act_mode)
        rules += [
            Rule(select="first", weights=Int(8), activations=act),
            Rule(select="last", weights=Int(8), activations=act),
        ]
    return rules


@register_method("sbnn")
def sbnn_recipe(**options: Any) -> Recipe:
    """The SBNN recipe; ``options`` are the fields of ``SBNNConfig`` (validated)."""
    cfg = SBNNConfig(**options)
    rules = _rules(
        Binary(cfg.domain, clip=cfg.clip), cfg.estimator, cfg.binarize_first_last, cfg.act_mode
    )
    factories = []
    if cfg.relu == "identity":
        factories.append(ReluBypass)
    if cfg.constrained:
        factories.append(
            lambda m: EntropyConstraint(m, cfg.density, cfg.gamma, cfg.lambda_cap, cfg.clip)
        )
    factories.append(lambda m: LatentClamp(m, cfg.clip))
    if cfg.scale_lr != 1 and cfg.domain != "pm1":
        factories.append(lambda m: ScaleLR(m, cfg.scale_lr))
    if cfg.bias_correction:
        factories.append(BiasCorrection)
    if cfg.constrained and cfg.remedy == "project":
        factories.append(
            lambda m: DensityProjection(
                m, cfg.density, cfg.project_start, cfg.project_end, cfg.project_scope, "value"
            )
        )
    if cfg.estimator == "irnet":
        factories.append(IRNetSchedule)
    return Recipe("sbnn", rules, asdict(cfg), factories)


@register_method("bnn-pruned")
def bnn_pruned_recipe(**options: Any) -> Recipe:
    """The magnitude-pruned pm1 BNN baseline; ``options``: fields of ``BNNPrunedConfig``."""
    cfg = BNNPrunedConfig(**options)
    rules = _rules(
        MaskedBinary(clip=cfg.clip), cfg.estimator, cfg.binarize_first_last, cfg.act_mode
    )
    factories = []
    if cfg.relu == "identity":
        factories.append(ReluBypass)
    factories.append(lambda m: LatentClamp(m, cfg.clip))
    if cfg.bias_correction:
        factories.append(BiasCorrection)
    if cfg.density < 1:
        factories.append(
            lambda m: DensityProjection(
                m, cfg.density, cfg.prune_start, cfg.prune_end, cfg.prune_scope, "magnitude"
            )
        )
    if cfg.estimator == "irnet":
        factories.append(IRNetSchedule)
    return Recipe("bnn-pruned", rules, asdict(cfg), factories)


# ----------------------------------------------------------------------------- densities


def binarized_layers(model: nn.Module) -> list[tuple[str, QuantConv2d | QuantLinear]]:
    """(name, layer) of every layer with binary weights (``Binary`` or ``MaskedBinary``)."""
    return [
        (n, m)
        for n, m in model.named_modules()
        if isinstance(m, QuantConv2d | QuantLinear)
        and isinstance(m.weight_codec, Binary | MaskedBinary)
    ]


def latent_density(model_or_layers, clip: float | None = None) -> Tensor:
    """``p = #{w > 0} / #weights`` over the binarized layers, as a 0-dim tensor whose
    gradient reaches the latent weights through the sign STE: ``b = (s(w) + 1) / 2`` with
    ``s = sign(w)`` forward and the clipped identity backward (window ``clip``, default
    each layer's codec clip), so ``dp/dw = 1 / (2 N)`` inside the window, 0 outside."""
    layers = _as_layers(model_or_layers)
    if not layers:
        raise ValueError("the model has no binarized layers")
    total = sum(m.weight.numel() for m in layers)
    ones = []
    for m in layers:
        w = m.weight
        c = clip if clip is not None else m.weight_codec.clip
        s = ste(sign_pm1(w.detach()), torch.where(w.abs() <= c, w, w.detach()))
        ones.append(((s + 1) * 0.5).sum())
    return torch.stack(ones).sum() / total


def weight_density(model_or_layers) -> float:
    """Fraction of non-zero quantized weights over the binarized layers (the reported
    density: p in the 01 domain, 1 in pm1/ab, the kept fraction for MaskedBinary)."""
    layers = _as_layers(model_or_layers)
    with torch.no_grad():
        nz = sum(int((m.quantized_weight() != 0).sum()) for m in layers)
    return nz / max(1, sum(m.weight.numel() for m in layers))


def _as_layers(x) -> list:
    if isinstance(x, nn.Module):
        return [m for _, m in binarized_layers(x)]
    return list(x)


def _on(m) -> Tensor:
    """Boolean mask of the "on" (non-zero / positive) latent weights of a layer."""
    w = m.weight.detach()
    return w != 0 if isinstance(m.weight_codec, MaskedBinary) else w > 0


@torch.no_grad()
def project_density_(
    model_or_layers,
    density: float,
    scope: str = "proportional",
    score: str = "value",
    floor: float | None = None,
) -> float:
    """Keep at most ``density`` of the binarized weights "on", in place; returns the
    density after. With ``floor`` (``score="value"`` only), a density below ``floor`` is
    raised to it: the largest "off" latent weights (the closest to turning on) are set to
    a small positive value (``_REVIVE``), per layer in the same ``scope``.

    ``score="value"`` (01/ab domains): the on weights are ``w > 0``; the largest latent values
    are kept, the others set to 0 (bit 0). ``score="magnitude"`` (``MaskedBinary``): the
    on weights are ``w != 0``; the largest ``|w|`` are kept, the others set to exactly 0.
    ``scope``: ``proportional`` (every layer's on-count times density / current density),
    ``layer`` (every layer at most ``density``), ``global`` (one ranking of raw scores).
    """
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if score not in ("value", "magnitude"):
        raise ValueError(f"score must be value or magnitude, got {score!r}")
    layers = _as_layers(model_or_layers)
    sizes = [m.weight.numel() for m in layers]
    total = sum(sizes)
    ons = [_on(m) for m in layers]
    counts = [int(o.sum()) for o in ons]
    k_total = int(math.floor(density * total + 1e-9))
    if floor is not None and score == "value" and sum(counts) < floor * total - 1e-9:
        _revive_(layers, ons, counts, sizes, min(floor, density), scope)
        return sum(int(_on(m).sum()) for m in layers) / total
    if sum(counts) <= k_total:
        return sum(counts) / total

    def scores(m, on):
        w = m.weight.detach().flatten()
        s = w.abs() if score == "magnitude" else w
        return torch.where(on.flatten(), s, torch.full_like(s, -math.inf))

    ks = None  # global: one ranking of raw scores
    if scope != "global":
        p = sum(counts) / total
        ks = [
            min(c, math.floor((c * density / p if scope == "proportional" else density * n) + 1e-9))
            for c, n in zip(counts, sizes)
        ]
    keeps = _top_masks([scores(m, o) for m, o in zip(layers, ons)], sizes, k_total, ks)
    for m, o, keep in zip(layers, ons, keeps):
        drop = o.flatten() & ~keep
        w = m.weight.data.view(-1)
        w[drop] = 0.0
    return sum(int(_on(m).sum()) for m in layers) / total


# ----------------------------------------------------------------------------- hooks


class EntropyConstraint(TrainHook):
    """The SBNN entropy constraint: ``L = L_task + lambda * h``, ``h = relu(p - EC)``,
    ``lambda = gamma * L_task / (h (1 - gamma))`` detached, 0 when ``h <= 1e-4``, at most
    ``lambda_cap``. Logs the epoch means of p, h and lambda (``sbnn_p``, ``sbnn_h``,
    ``sbnn_lambda``) and the density of the quantized weights at the epoch's end
    (``density``)."""

    def __init__(
        self,
        model: nn.Module,
        density: float,
        gamma: float,
        lambda_cap: float = 10.0,
        clip: float | None = None,
    ):
        self.layers = [m for _, m in binarized_layers(model)]
        if not self.layers:
            raise ValueError("the entropy constraint needs binarized layers (none found)")
        self.ec, self.gamma, self.cap, self.clip = float(density), float(gamma), lambda_cap, clip
        self._sums = [0.0, 0.0, 0.0, 0]  # p, h, lambda, steps (this epoch)

    def penalty(self, task_loss: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(lambda * h, p, h, lambda) for a task loss; lambda and its inputs detached."""
        p = latent_density(self.layers, self.clip)
        h = torch.relu(p - self.ec)
        hd = h.detach()
        if self.gamma > 0:
            lam = self.gamma * task_loss.detach() / (hd.clamp_min(H_CUT) * (1 - self.gamma))
            lam = torch.where(hd > H_CUT, lam.clamp(max=self.cap), torch.zeros_like(lam))
        else:
            lam = torch.zeros_like(hd)
        return lam * h, p.detach(), hd, lam

    def loss(self, trainer, loss, outputs, targets):
        term, p, h, lam = self.penalty(loss)
        s = self._sums
        s[0] += float(p)
        s[1] += float(h)
        s[2] += float(lam)
        s[3] += 1
        return loss + term

    def on_epoch_start(self, trainer, epoch):
        self._sums = [0.0, 0.0, 0.0, 0]

    def on_epoch_end(self, trainer, epoch, metrics):
        n = max(1, self._sums[3])
        metrics["sbnn_p"] = self._sums[0] / n
        metrics["sbnn_h"] = self._sums[1] / n
        metrics["sbnn_lambda"] = self._sums[2] / n
        metrics["density"] = weight_density(self.layers)

    def state_dict(self):
        return {"sums": list(self._sums)}

    def load_state_dict(self, state):
        self._sums = list(state.get("sums", [0.0, 0.0, 0.0, 0]))


class LatentClamp(TrainHook):
    """Clamp the latent weights of the binarized layers to ``[-clip, clip]`` after each
    optimizer step (the same window as the STE, so no weight is stuck without gradient)."""

    def __init__(self, model: nn.Module, clip: float = 1.5):
        self.layers = [m for _, m in binarized_layers(model)]
        self.clip = float(clip)

    @torch.no_grad()
    def after_step(self, trainer):
        for m in self.layers:
            m.weight.clamp_(-self.clip, self.clip)


class ScaleLR(TrainHook):
    """Gives the learned domain scalars (``tau``, ``phi``) of every binarized layer the
    learning rate ``lr * mult`` (``param.lr_mult``, read by ``make_optimizer``). Create it
    before the ``Trainer``, as ``Recipe.hooks`` does.

    Why: Adam moves every parameter by about ``lr`` per step whatever its size. A latent
    weight only matters through its sign, but tau is a gain: in a layer without BatchNorm
    (LeNet-5's conv2 and fc1) tau started at 0.0027 (fc1) and Adam at 1e-3 raised it by 45%
    in 5 steps. With {0, beta} weights on sign inputs the output holds the common-mode term
    ``beta/2 * sum x`` (a large negative number when most inputs are -1), so the growing tau
    pushed every fc1 output below 0: the ReLU died, every gradient was exactly 0 from step 6
    and the model stayed at chance (LeNet-5 on the built-in sample, from its FP weights,
    Adam 1e-3, density 0.5: 10.0% test accuracy after 2 epochs). With the scalars at
    ``lr * 0.01``: 88% after 60 steps (the same seed and data). Models with BatchNorm after
    every binarized layer do not care about the gain, so the default changes nothing there
    but the noise of a random walk."""

    def __init__(self, model: nn.Module, mult: float):
        self.mult = float(mult)
        for _, m in binarized_layers(model):
            for k in ("tau", "phi"):
                if k in m.codec_params:
                    m.codec_params[k].lr_mult = self.mult


class IRNetSchedule(TrainHook):
    """IR-Net's estimator schedule: at each epoch set ``layer.act.irnet_t`` / ``irnet_k`` of
    every sign-quantized layer to ``irnet_t_k(epoch, epochs)`` (also after a mid-epoch
    resume)."""

    def __init__(self, model: nn.Module):
        self.acts = [
            m.act
            for m in model.modules()
            if isinstance(m, QuantConv2d | QuantLinear)
            and isinstance(m.act.codec, SignAct)
            and m.act.codec.estimator == "irnet"
        ]

    def set_epoch(self, epoch: int, epochs: int) -> tuple[float, float]:
        t, k = irnet_t_k(epoch, epochs)
        for a in self.acts:
            a.irnet_t, a.irnet_k = t, k
        return t, k

    def on_fit_start(self, trainer):
        self.set_epoch(trainer.epoch, trainer.config.epochs)

    def on_epoch_start(self, trainer, epoch):
        self.set_epoch(epoch, trainer.config.epochs)

    def on_epoch_end(self, trainer, epoch, metrics):
        metrics["irnet_t"], metrics["irnet_k"] = irnet_t_k(epoch, trainer.config.epochs)


_REVIVE = 1e-3  # latent value of a weight turned on by the density floor


def _top_masks(scores: list[Tensor], sizes: list[int], k_total: int, ks: list[int] | None):
    """Boolean masks of the highest scores: one ranking across all layers (``k_total``
    picks) when ``ks`` is None, else ``ks[i]`` picks in layer ``i``."""
    if ks is None:
        allsc = torch.cat(scores)
        mask = torch.zeros_like(allsc, dtype=torch.bool)
        mask[torch.topk(allsc, k_total, sorted=False).indices] = True
        return list(mask.split(sizes))
    masks = []
    for sc, k in zip(scores, ks):
        mask = torch.zeros_like(sc, dtype=torch.bool)
        if k > 0:
            mask[torch.topk(sc, k, sorted=False).indices] = True
        masks.append(mask)
    return masks


def _revive_(layers, ons, counts, sizes, floor: float, scope: str) -> None:
    """Turn on the largest off latent weights until the density is ``floor`` (see
    ``project_density_``)."""
    total = sum(sizes)

    def off_scores(m, on):
        w = m.weight.detach().flatten()
        return torch.where(on.flatten(), torch.full_like(w, -math.inf), w)

    ks = None  # global: one ranking of all off weights
    if scope != "global":
        p = sum(counts) / total
        ks = []
        for c, n in zip(counts, sizes):
            want = c * floor / p if scope == "proportional" and p > 0 else floor * n
            ks.append(max(0, min(n, math.ceil(want - 1e-9)) - c))
    need = int(math.ceil(floor * total - 1e-9)) - sum(counts)
    picks = _top_masks([off_scores(m, o) for m, o in zip(layers, ons)], sizes, need, ks)
    for m, pick in zip(layers, picks):
        m.weight.data.view(-1)[pick] = _REVIVE


class DensityProjection(TrainHook):
    """The density remedy: after each optimizer step from ``start`` to ``end`` (fractions of
    all training steps) project the binarized weights to the density
    ``d(t) = target + (p0 - target) (1 - t')^3`` (``t'`` the progress through [start, end],
    ``p0`` the density when it began), then hold ``target`` to the end: at most the target
    and, with ``hold`` (default), at least it too (the largest off latent weights are
    turned on when training turns weights off). See ``project_density_`` for ``scope`` and
    ``score``. Logs ``projected_to``."""

    def __init__(
        self,
        model: nn.Module,
        density: float,
        start: float = 0.2,
        end: float = 0.5,
        scope: str = "proportional",
        score: str = "value",
        hold: bool = True,
    ):
        self.layers = [m for _, m in binarized_layers(model)]
        self.target, self.start, self.end = float(density), float(start), float(end)
        self.scope, self.score, self.hold = scope, score, bool(hold)
        self.p0: float | None = None
        self.last: float | None = None

    def allowed(self, progress: float) -> float | None:
        """The density allowed at ``progress`` (fraction of training done), None before
        the start."""
        if progress < self.start or (progress == 0 and self.start > 0):
            return None
        if progress >= self.end or self.end <= self.start or self.p0 is None:
            return self.target
        t = (progress - self.start) / (self.end - self.start)
        return self.target + (max(self.p0, self.target) - self.target) * (1 - t) ** 3

    def after_step(self, trainer):
        total = max(1, trainer.config.epochs * trainer.steps_per_epoch)
        progress = (trainer.global_step + 1) / total
        if progress < self.start:
            return
        if self.p0 is None:
            sizes = sum(m.weight.numel() for m in self.layers)
            self.p0 = sum(int(_on(m).sum()) for m in self.layers) / max(1, sizes)
        d = self.allowed(progress)
        # from the end of the ramp on, the density is held at the target from both sides:
        # the task can also turn weights off (ResNet-20 CIFAR, EC 0.10: 0.082 at the end
        # with a one-sided cap), and the user asked for that density
        floor = self.target if progress >= self.end and self.hold else None
        self.last = project_density_(self.layers, d, self.scope, self.score, floor=floor)

    def on_epoch_end(self, trainer, epoch, metrics):
        if self.last is not None:
            metrics["projected_to"] = self.last
        metrics.setdefault("density", weight_density(self.layers))

    def state_dict(self):
        return {"p0": self.p0, "last": self.last}

    def load_state_dict(self, state):
        self.p0, self.last = state.get("p0"), state.get("last")


# ----------------------------------------------------------------------------- ReLU bypass

_PASS_MODULES = (nn.MaxPool2d, nn.Flatten, nn.Dropout, nn.Identity)
_PASS_FUNCS = {"flatten", "view", "reshape", "max_pool2d", "dropout"}


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, QuantConv2d | QuantLinear) or super().is_leaf_module(m, qualname)


def _only_feeds_sign(node, mods, layers: list[str] | None = None) -> bool:
    """Whether ``node``'s output reaches only sign-quantized layer inputs (through pass
    ops); the names of those layers are appended to ``layers``."""
    users = list(node.users)
    if not users:
        return False
    for u in users:
        if u.op == "call_module":
            m = mods[u.target]
            if isinstance(m, QuantConv2d | QuantLinear):
                if not isinstance(m.act.codec, SignAct) or u.args[0] is not node:
                    return False
                if layers is not None:
                    layers.append(u.target)
                continue
            if isinstance(m, _PASS_MODULES) and _only_feeds_sign(u, mods, layers):
                continue
            return False
        name = getattr(u.target, "__name__", str(u.target))
        if u.op in ("call_function", "call_method") and name in _PASS_FUNCS:
            if u.args[0] is node and _only_feeds_sign(u, mods, layers):
                continue
        return False
    return True


def sign_fed_relus(model: nn.Module, consumers: dict[str, list[str]] | None = None) -> list[str]:
    """Names of the ``nn.ReLU`` modules whose output reaches only the inputs of
    sign-quantized layers (through max-pool / flatten / dropout / identity); ``consumers``,
    if given, receives the names of the layers each of them feeds."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # an untraceable model: leave its ReLUs alone
        warnings.warn(f"sbnn: cannot trace {type(model).__name__} ({e}); ReLUs kept", stacklevel=2)
        return []
    mods = dict(model.named_modules())
    found: dict[str, list[str]] = {}
    for node in graph.nodes:
        if node.op == "call_module" and isinstance(mods.get(node.target), nn.ReLU):
            layers: list[str] = []
            if _only_feeds_sign(node, mods, layers):
                found.setdefault(node.target, []).extend(layers)
                src = node.args[0] if node.args else None
                if getattr(src, "op", None) == "call_module":  # the layer the ReLU reads
                    found[node.target].append("<" + src.target)
    # a module called at several places must qualify at each of them
    bad = {
        n.target
        for n in graph.nodes
        if n.op == "call_module" and n.target in found and not _only_feeds_sign(n, mods)
    }
    if consumers is not None:
        consumers.update({n: ls for n, ls in found.items() if n not in bad})
    return [n for n in found if n not in bad]


class ReluBypass(TrainHook):
    """Replace the ReLUs that feed only sign-quantized inputs with ``nn.Identity`` (at
    construction): the same forward values, the full sign surrogate gradient. The layers
    they fed are marked (``layer.sbnn_relu_input = True``) so that ``BiasCorrection`` can
    rebuild the FP layer's input."""

    def __init__(self, model: nn.Module):
        consumers: dict[str, list[str]] = {}
        self.replaced = sign_fed_relus(model, consumers)
        for name in self.replaced:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
            for layer in consumers[name]:
                if layer.startswith("<"):
                    model.get_submodule(layer[1:]).sbnn_feeds_sign = True
                else:
                    model.get_submodule(layer).sbnn_relu_input = True


_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


def bn_free_layers(model: nn.Module) -> list[str]:
    """Binarized layers with a bias whose output no BatchNorm reads."""
    names = [n for n, m in binarized_layers(model) if m.bias is not None]
    if not names:
        return []
    try:
        graph = _Tracer().trace(model)
    except Exception:
        return names
    mods = dict(model.named_modules())
    with_bn = {
        n.target
        for n in graph.nodes
        if n.op == "call_module"
        and any(u.op == "call_module" and isinstance(mods.get(u.target), _BN) for u in n.users)
    }
    return [n for n in names if n not in with_bn]


class BiasCorrection(TrainHook):
    """Empirical bias correction (Nagel et al. 2019, arXiv 1906.04721) of the BN-free
    binarized layers, once, on the first training batch: ``bias += mean(conv(x, w)) -
    mean(conv(x, q(w)))`` per output channel, ``x`` the layer's (sign-quantized) input, ``w``
    the latent (FP-initialized) weights, ``q(w)`` the binary ones.

    Why: with sign inputs ``x``, a {0, beta} layer computes ``beta * sum_{b=1} x`` = half the
    pm1 layer's output plus ``beta/2 * sum x``, a term the FP layer does not have. Without a
    BatchNorm after the layer it shifts the next sign's input out of the surrogate's window
    (+-1), where no gradient flows: LeNet-5 (no BN) compressed from its FP weights had
    channel offsets of 1.8 (conv2) and 3.4 (fc1) and stayed at chance accuracy (10%) after
    one epoch; with the correction it reached 77% (the dense pm1 BNN: 93%). Layers followed
    by BN (ResNet, VGG) are left alone: BN removes the offset.

    The reference is the FP layer on its FP input (the float input, with the ReLU put back
    where ``ReluBypass`` removed it), not the latent weights on the sign inputs: an FP model
    trained with SGD (lr 0.1, weight decay) has sparse ReLUs (2% of LeNet-5's conv2
    outputs positive) and mostly negative weights, so with sign inputs the ReLU's zeros
    become -1 and add ``-sum(w)``, a large positive offset that the latent-vs-binary
    comparison cannot see (fc1's sign inputs were all +1: chance from the first step). A
    layer whose output feeds only sign inputs (``sbnn_feeds_sign``) gets the bias that
    makes every output channel fire (> 0) at the FP layer's rate (clamped to
    [RATE_MIN, 1 - RATE_MIN]); any other layer gets its learned scale (tau, phi) set to
    match the FP output's spread and the bias that matches the FP channel means."""

    def __init__(self, model: nn.Module):
        names = set(bn_free_layers(model))
        self.layers = {n: m for n, m in binarized_layers(model) if n in names}
        self.done: list[str] = []
        self._handles = [m.register_forward_pre_hook(self._make(n)) for n, m in self.layers.items()]

    def _make(self, name):
        def pre(mod, inp):
            if name in self.done or not mod.training or not torch.is_grad_enabled():
                return
            self.done.append(name)
            with torch.no_grad():
                x_fp = inp[0]
                if getattr(mod, "sbnn_relu_input", False):  # its ReLU was bypassed
                    x_fp = torch.relu(x_fp)
                x_q = mod.act(inp[0])
                y_q = _channels(mod, x_q, mod.quantized_weight())
                y_fp = _channels(mod, x_fp, mod.weight) + mod.bias[:, None]
                if getattr(mod, "sbnn_feeds_sign", False):
                    rate = (y_fp > 0).float().mean(1).clamp(RATE_MIN, 1 - RATE_MIN)
                    srt = y_q.sort(1).values
                    idx = ((1 - rate) * (srt.shape[1] - 1)).round().long()
                    mod.bias.copy_(-srt.gather(1, idx[:, None]).squeeze(1))
                else:
                    cp = mod.codec_params
                    if "tau" in cp:  # a learned scale: match the FP layer's spread
                        ratio = y_fp.std(1).mean() / y_q.std(1).mean().clamp_min(1e-12)
                        for k in ("tau", "phi"):
                            cp[k].mul_(ratio)
                        y_q = _channels(mod, x_q, mod.quantized_weight())
                    mod.bias.add_(y_fp.mean(1) - mod.bias - y_q.mean(1))

        return pre

    def state_dict(self):
        return {"done": list(self.done)}

    def load_state_dict(self, state):
        self.done = list(state.get("done", []))


def _channels(mod, x: Tensor, w: Tensor) -> Tensor:
    """The layer's output without bias for input ``x`` and weights ``w``, as (out channels,
    positions)."""
    if isinstance(mod, QuantConv2d):
        y = mod._conv_forward(x, w, None)
        return y.transpose(0, 1).reshape(y.shape[1], -1)
    return (x.reshape(-1, x.shape[-1]) @ w.t()).t()


# ----------------------------------------------------------------------------- baseline


def prune_bnn_(model: nn.Module, density: float, scope: str = "layer") -> float:
    """Prune a trained pm1 BNN to ``density`` by latent magnitude, in place; returns the
    density reached.

    The model's binarized layers (``Binary("pm1")`` from ``sbnn`` with ``domain="pm1"``, or
    ``MaskedBinary`` from ``bnn-pruned``) get the ``MaskedBinary`` codec and the smallest
    ``|w|`` are set to exactly 0. A model from ``sbnn`` is relabelled as a ``bnn-pruned``
    model with ``prune_start = prune_end = 0``, so that fine-tuning it with
    ``model.lowbit_recipe.hooks(model)`` keeps the mask (the projection holds the density)
    and its checkpoints rebuild. Fine-tune afterwards with the same budget."""
    layers = binarized_layers(model)
    if not layers:
        raise ValueError("prune_bnn_: the model has no binarized layers")
    for name, m in layers:
        wc = m.weight_codec
        if isinstance(wc, Binary) and wc.domain != "pm1":
            raise ValueError(f"prune_bnn_ takes a pm1 BNN; layer {name} has domain {wc.domain}")
        if isinstance(wc, Binary):
            m.weight_codec = MaskedBinary(clip=wc.clip)
    rec = getattr(model, "lowbit_recipe", None)
    if rec is not None and rec.method == "sbnn":
        o = rec.options
        model.lowbit_recipe = bnn_pruned_recipe(
            density=density, estimator=o["estimator"], clip=o["clip"],
            binarize_first_last=o["binarize_first_last"], prune_start=0.0, prune_end=0.0,
            prune_scope=scope, relu=o["relu"], bias_correction=o["bias_correction"],
            act_mode=o["act_mode"],
        )  # fmt: skip
    with torch.no_grad():
        for _, m in layers:  # a latent weight at exactly 0 would read as pruned
            w = m.weight
            w.copy_(torch.where(w == 0, torch.full_like(w, 1e-12), w))
    return project_density_([m for _, m in layers], density, scope, "magnitude")


# ----------------------------------------------------------------------------- reports


def layer_report(model: nn.Module) -> list[dict[str, Any]]:
    """Per binarized layer: name, shape, weights, non-zero weights, density, the number
    of all-zero output filters, and the codec's (alpha, beta) where it has them."""
    rows = []
    with torch.no_grad():
        for name, m in binarized_layers(model):
            q = m.quantized_weight()
            nz = (q != 0).reshape(q.shape[0], -1)
            row: dict[str, Any] = {
                "name": name,
                "shape": list(q.shape),
                "weights": q.numel(),
                "nonzero": int(nz.sum()),
                "density": float(nz.float().mean()),
                "zero_filters": int((~nz.any(1)).sum()),
                "filters": int(q.shape[0]),
                "codec": str(m.weight_codec),
            }
            wc = m.weight_codec
            if isinstance(wc, Binary) and wc.domain != "pm1":
                enc = wc.encode(m.weight, dict(m.codec_params))
                row["alpha"] = float(enc.params["alpha"].flatten()[0])
                row["beta"] = float(enc.params["beta"].flatten()[0])
            rows.append(row)
    return rows


def _bits(m) -> Tensor:
    """The bit of each weight: non-zero (01 domain, MaskedBinary) or +1 (pm1, ab)."""
    return _on(m)


def kernel_patterns(model: nn.Module, layer: str | None = None) -> dict[str, Any]:
    """Histogram of the 3x3 kernel bit patterns of the binarized 3x3 convolutions (all of
    them, or the one named ``layer``): each kernel's bits ``b[i, j]`` (the weight is
    non-zero in the 01 domain; is +1 in pm1/ab) as the 9-bit integer
    ``sum b[i, j] << (3 i + j)`` (bit 0 top-left, row-major), 0..511; and the histogram of
    the kernels' Hamming weights 0..9.

    Returns ``{"layers", "kernels", "patterns": [512 counts], "hamming": [10 counts],
    "top": [[pattern, count], ...] (the 16 most frequent)}``."""
    convs = [
        (n, m)
        for n, m in binarized_layers(model)
        if isinstance(m, QuantConv2d) and tuple(m.kernel_size) == (3, 3)
    ]
    if layer is not None:
        convs = [(n, m) for n, m in convs if n == layer]
        if not convs:
            raise ValueError(f"no binarized 3x3 conv named {layer!r}")
    weights = torch.tensor([1 << i for i in range(9)], dtype=torch.long)
    patterns = torch.zeros(512, dtype=torch.long)
    for _, m in convs:
        b = _bits(m).reshape(-1, 9).long()  # (O * I/groups, 9), row-major 3x3
        patterns += torch.bincount(b @ weights, minlength=512)
    hw = torch.tensor([bin(i).count("1") for i in range(512)])
    hamming = torch.zeros(10, dtype=torch.long).index_add_(0, hw, patterns)
    order = torch.argsort(patterns, descending=True, stable=True)[:16]
    return {
        "layers": [n for n, _ in convs],
        "kernels": int(patterns.sum()),
        "patterns": patterns.tolist(),
        "hamming": hamming.tolist(),
        "top": [[int(i), int(patterns[i])] for i in order if patterns[i] > 0],
    }


def plot_kernel_patterns(report: dict[str, Any], path, title: str | None = None) -> str:
    """Write the kernel-pattern histogram of ``kernel_patterns`` as an image (matplotlib,
    Agg backend): the 512 pattern counts (log scale), the Hamming-weight histogram and the
    8 most frequent patterns drawn as 3x3 kernels. Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(11, 6.5))
    grid = fig.add_gridspec(2, 8, height_ratios=[2.2, 1])
    ax = fig.add_subplot(grid[0, :5])
    counts = report["patterns"]
    ax.bar(range(512), [max(c, 0) for c in counts], width=1.0, color="#3465a4")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlim(-1, 512)
    ax.set_xlabel("3x3 kernel bit pattern (9-bit integer, bit 0 = top-left)")
    ax.set_ylabel("kernels")
    ax2 = fig.add_subplot(grid[0, 5:])
    ax2.bar(range(10), report["hamming"], color="#73d216")
    ax2.set_xticks(range(10))
    ax2.set_xlabel("Hamming weight (ones per kernel)")
    total = max(1, report["kernels"])
    for i, (pat, c) in enumerate(report["top"][:8]):
        a = fig.add_subplot(grid[1, i])
        img = [[(pat >> (3 * r + col)) & 1 for col in range(3)] for r in range(3)]
        a.imshow(img, cmap="Greys", vmin=0, vmax=1)
        a.set_xticks([])
        a.set_yticks([])
        a.set_title(f"{pat}: {100 * c / total:.1f}%", fontsize=8)
    fig.suptitle(title or f"kernel patterns of {', '.join(report['layers'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)
