"""Bayesian compression: group-sparsity priors, structured pruning, learned bit precision.

C. Louizos, K. Ullrich, M. Welling, "Bayesian Compression for Deep Learning", NeurIPS
2017, arXiv 1705.08665.

Every Conv2d / Linear becomes a Bayesian layer whose weights share a scale per *group*:
the input neurons of a linear layer, the output filters of a convolution. A
sparsity-inducing prior on the group scales drives whole groups to zero; the groups the
posterior calls noise are pruned and removed physically, and the posterior variance of the
surviving weights sets each layer's fixed-point precision (``FixedPoint`` codec).

Priors (``prior=``)
-------------------
``gnj``, group normal-Jeffreys: ``p(z) ~ 1/|z|``, ``w_ij | z_i ~ N(0, z_i^2)``;
``q(z_i) = N(mu_z, alpha_i mu_z^2)``, ``q(w_ij | z_i) = N(z_i mu_ij, z_i^2 sigma_ij^2)``.
``KL(q(z)||p(z))`` uses the published approximation (Molchanov et al. 2017)
``-(k1 sigmoid(k2 + k3 log alpha) - 0.5 softplus(-log alpha) - k1)``; ``k1`` (fitted)
is within 6e-4 of ``(gamma_Euler + ln 2) / 2``, the constant that makes the true KL vanish
as ``alpha -> inf`` (checked against numerical integration in the tests: within 0.012).

``ghs``, group horseshoe: ``s ~ C+(0, tau0)``, ``z_i ~ C+(0, 1)``,
``w_ij = w~_ij z_i s``, ``w~ ~ N(0, 1)``. Our parameterization (re-derived, the paper's
printed constants are inconsistent): a half-Cauchy ``C+(0, b)`` is ``sqrt(a * c)`` with
``a ~ Gamma(1/2, rate 1/b^2)`` and ``c ~ InvGamma(1/2, scale 1)`` (``a = b^2 g1^2 / 2``,
``c = 2 / g2^2`` for standard normals ``g1, g2``, so ``sqrt(a c) = b |g1 / g2|``). Every
one of ``s_a, s_b, a_i, b_i`` gets a log-normal posterior; the KLs of a log-normal against
a Gamma and an inverse Gamma are closed-form (``kl_lognormal_gamma``,
``kl_lognormal_invgamma``; tested against Monte Carlo). The group scale
``theta_i = z_i s`` is then log-normal, ``log theta_i ~ N(m_i, v_i)`` with
``m_i = (mu_a + mu_b + mu_sa + mu_sb) / 2`` and ``v_i`` a quarter of the summed variances,
and is sampled per example (local reparameterization).

Forward (both priors, training): with the group multiplier ``g`` sampled per example,
linear: ``xg = x * g``, ``mean = xg @ mu^T + b``, ``var = xg^2 @ sigma^2^T + sigma_b^2``;
conv: ``mean = conv(x, mu) + b``, ``var = conv(x^2, sigma^2) + sigma_b^2`` and the output
``N(g * mean, g^2 * var)`` (so a pruned filter outputs exactly 0, bias included).
Evaluation uses the posterior means ``E[w] = mu E[g]`` times the pruning mask.
Objective: cross-entropy + ``beta(t) * KL / N_train`` with ``beta`` ramping linearly from 0
to 1 over ``kl_warmup_epochs`` (0: no warm-up, as the paper).

Training speed (``lr_scale``, not in the paper): under Adam every parameter moves by about
the learning rate per step, which is 3% of a weight mean of size 0.03 but 0.1% of a group
scale near 1 and of a log-variance starting at -9; with the authors' plain Adam, pruning
starts after about 10 epochs and goes on for dozens (methods.md). Log-variances and group
parameters are therefore stored divided by ``lr_scale`` (default 5), which makes Adam move
them that many times faster; measured on LeNet-300-100 (full MNIST, Adam 1e-3 constant,
from a 3-epoch FP model): 5 epochs pruned it to 411-157-77 (97.1%, x17 stored).
``finetune_epochs`` (default 0) trains on with the pruning mask fixed, recovering accuracy
that pruning costs at short budgets.

Fixed-point fine-tuning (``qat_epochs``, not in the paper; default 0)
---------------------------------------------------------------------
After pruning, unit removal and the choice of bits, the small fixed-point model is an
ordinary QAT model (``FixedPoint`` codecs, straight-through gradients): ``qat_epochs``
trains it on with plain cross-entropy (the run's optimizer and learning rate, cosine
decay, no KL, no noise), bits and architecture fixed, then freezes it. Why: the
posterior mean is tuned for a network with multiplicative noise and under a KL pull, and
``finetune_epochs`` keeps both; the deployed network has neither. The bits stay those
the posterior chose (the grid step stays about the posterior's standard deviation), so
compression does not change; only accuracy can.

Pruning (``threshold``, ``thresholds``)
----------------------------------------
GNJ keeps group ``i`` if ``log alpha_i < threshold`` (default -3.0 for every layer; the
authors used -2.8 / -3.0 / -5.0 on LeNet-300-100; per layer: ``thresholds="fc1=-2.8,
fc3=-5"``). GHS: the paper does not state its rule (methods.md); we threshold the same
quantity for the horseshoe's group multiplier, ``log alpha_i = log(Var(theta_i) /
E[theta_i]^2) = log(exp(v_i) - 1)`` (``ghs_threshold``, default -3.0).
A weight survives only if its input and its output neuron survive.
``remove_pruned`` then deletes pruned neurons and filters (rows, columns, BatchNorm
channels, flattened features) and gives a smaller dense model; a pruned filter that feeds
a residual addition or a concatenation cannot be removed and is left whole (reported).

Bit precision (``bits_rule``)
-----------------------------
``unit-roundoff`` (the authors'): for each weight, the number of ``t`` in 1..23 with
``2^-t > 2 Var(w)``; the layer's fraction bits are the ceiling of the mean. ``std``: per
weight the largest ``t`` with ``2^-t > std_k * std(w)``, ceiling of the mean. Weights are
rounded to the grid ``2^-t`` and stored as fixed point (sign + integer bits for
``max|w|`` + ``t`` fraction bits). When ``max|w|`` is small the grid would round the whole
layer to zero: the fraction bits are raised until the largest weight spans at least
``min_levels`` steps (reported as ``fraction_bits`` beside ``t_rule``). The authors'
count, ``1 + exponent + t`` with ``exponent = ceil(log2(log2(max|E[w]|) + 1) + 1)`` from
one maximum over all layers (undefined or <= 0 below ``max|w|`` of about 0.71, floored
at 1 bit), is reported beside lowbit's exact count.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..codecs import FixedPoint
from ..recipes import Recipe, Rule, register_method
from ..train import TrainHook

__all__ = [
    "K1",
    "K2",
    "K3",
    "BayesConfig",
    "BayesConv2d",
    "BayesLinear",
    "FeatureSelect",
    "KLHook",
    "authors_exponent_bits",
    "bayesian_",
    "compress_model",
    "deterministic_",
    "fixed_point_for",
    "gaussian_kl",
    "gnj_kl",
    "kl_lognormal_gamma",
    "kl_lognormal_invgamma",
    "layer_bits",
    "load_bayes_run",
    "remove_pruned",
    "total_kl",
]

#: Molchanov et al. (2017) constants of the KL approximation (methods.md, section 5)
K1, K2, K3 = 0.63576, 1.87320, 1.48695
PRIORS = ("gnj", "ghs")
BITS_RULES = ("unit-roundoff", "std")
_LOG_EPS = 1e-8


# ----------------------------------------------------------------------------- KL maths


def gnj_kl(log_alpha: Tensor) -> Tensor:
    """Approximate ``KL(N(mu, alpha mu^2) || p(z) ~ 1/|z|)`` per element (Molchanov et al.)."""
    return -(K1 * torch.sigmoid(K2 + K3 * log_alpha) - 0.5 * F.softplus(-log_alpha) - K1)


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, 1))`` per element."""
    return 0.5 * (-logvar + logvar.exp() + mu * mu - 1)


def _lognormal_entropy(logvar: Tensor, mu: Tensor) -> Tensor:
    return mu + 0.5 * (math.log(2 * math.pi) + 1 + logvar)


def kl_lognormal_gamma(mu: Tensor, logvar: Tensor, shape: float, rate: float) -> Tensor:
    """``KL(LogNormal(mu, exp(logvar)) || Gamma(shape, rate))`` per element, closed form:
    ``-H(q) - shape log rate + lgamma(shape) - (shape - 1) mu + rate exp(mu + var / 2)``."""
    return (
        -_lognormal_entropy(logvar, mu)
        - shape * math.log(rate)
        + math.lgamma(shape)
        - (shape - 1) * mu
        + rate * torch.exp(mu + 0.5 * logvar.exp())
    )


def kl_lognormal_invgamma(mu: Tensor, logvar: Tensor, shape: float, scale: float) -> Tensor:
    """``KL(LogNormal(mu, exp(logvar)) || InvGamma(shape, scale))`` per element:
    ``-H(q) - shape log scale + lgamma(shape) + (shape + 1) mu + scale exp(-mu + var / 2)``."""
    return (
        -_lognormal_entropy(logvar, mu)
        - shape * math.log(scale)
        + math.lgamma(shape)
        + (shape + 1) * mu
        + scale * torch.exp(-mu + 0.5 * logvar.exp())
    )


# ----------------------------------------------------------------------------- config


def _parse_thresholds(spec) -> dict[str, float]:
    if spec is None or spec == "":
        return {}
    if isinstance(spec, dict):
        items = spec.items()
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            name, sep, value = part.strip().partition("=")
            if not sep or not name:
                raise ValueError(
                    f"bad bayes option thresholds={spec!r}: use 'layer=value,...', e.g. "
                    "'fc1=-2.8,fc3=-5'"
                )
            items.append((name, value))
    else:
        raise ValueError(f"bad bayes option thresholds={spec!r}: a 'layer=value,...' string")
    out = {}
    for name, value in items:
        try:
            out[str(name)] = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"bad bayes option thresholds: {name}={value!r} is not a number"
            ) from None
    return out


@dataclass(frozen=True)
class BayesConfig:
    """Options of the ``bayes`` method (see the module docstring)."""

    prior: str = "gnj"  # "gnj" (group normal-Jeffreys) | "ghs" (group horseshoe)
    threshold: float = -3.0  # GNJ: keep a group while log alpha < threshold
    ghs_threshold: float = -3.0  # GHS: keep while log(Var(theta) / E[theta]^2) < this
    thresholds: Any = None  # per-layer overrides "name=value,..." (of the prior's statistic)
    tau0: float = 1e-5  # GHS global scale of the half-Cauchy prior on s (the paper's)
    kl_warmup_epochs: float = 0.0  # KL weight ramps 0 -> 1 over these epochs (0: none)
    var_cap_first: float | None = 0.04  # cap on the first layer's weight variance (authors)
    bits_rule: str = "unit-roundoff"  # "unit-roundoff" (authors) | "std"
    std_k: float = 1.0  # the std rule: largest t with 2^-t > std_k * std(w)
    min_levels: int = 4  # the largest weight spans at least this many grid steps
    # epochs of training with the pruning mask fixed, after the main run (not in the paper:
    # recovers the accuracy pruning costs at short budgets; 0 = the paper's procedure)
    finetune_epochs: int = 0
    # epochs of quantization-aware training of the pruned fixed-point model, after the bits
    # are set (not in the paper; 0 = the paper's procedure). See "Fixed-point fine-tuning".
    qat_epochs: int = 0
    max_fraction_bits: int = 23  # as the authors' float32 significand
    # log-variances and group scales learn this many times faster than the weight means
    # (see _BayesLayer): under Adam every parameter moves about lr per step, a weight mean
    # of size 0.03 by 3% but a log-variance from -9 or a group scale near 1 by 0.1%; at 1,
    # the authors' setting, pruning starts only after ~10 epochs (methods.md)
    lr_scale: float = 5.0

    def __post_init__(self):
        problems = []
        if self.prior not in PRIORS:
            problems.append(f"prior must be one of {', '.join(PRIORS)}, got {self.prior!r}")
        for name in (
            "threshold",
            "ghs_threshold",
            "kl_warmup_epochs",
            "tau0",
            "std_k",
            "lr_scale",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                problems.append(f"{name} must be a number, got {v!r}")
        if isinstance(self.tau0, int | float) and not self.tau0 > 0:
            problems.append(f"tau0 must be > 0, got {self.tau0}")
        if isinstance(self.kl_warmup_epochs, int | float) and self.kl_warmup_epochs < 0:
            problems.append(f"kl_warmup_epochs must be >= 0, got {self.kl_warmup_epochs}")
        if isinstance(self.lr_scale, int | float) and not self.lr_scale > 0:
            problems.append(f"lr_scale must be > 0, got {self.lr_scale}")
        if isinstance(self.std_k, int | float) and not self.std_k > 0:
            problems.append(f"std_k must be > 0, got {self.std_k}")
        if self.var_cap_first is not None and not (
            isinstance(self.var_cap_first, int | float) and self.var_cap_first > 0
        ):
            problems.append(f"var_cap_first must be > 0 or null, got {self.var_cap_first!r}")
        if self.bits_rule not in BITS_RULES:
            problems.append(
                f"bits_rule must be one of {', '.join(BITS_RULES)}, got {self.bits_rule!r}"
            )
        for name in ("finetune_epochs", "qat_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                problems.append(f"{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.min_levels, int) or not 1 <= self.min_levels <= 2**20:
            problems.append(f"min_levels must be an integer >= 1, got {self.min_levels!r}")
        if not isinstance(self.max_fraction_bits, int) or not 1 <= self.max_fraction_bits <= 30:
            problems.append(f"max_fraction_bits must be in 1..30, got {self.max_fraction_bits!r}")
        if problems:
            raise ValueError("bad bayes option(s): " + "; ".join(problems))
        object.__setattr__(self, "thresholds", _parse_thresholds(self.thresholds))

    def threshold_for(self, name: str) -> float:
        if name in self.thresholds:
            return self.thresholds[name]
        return self.threshold if self.prior == "gnj" else self.ghs_threshold


# ----------------------------------------------------------------------------- layers


class _BayesLayer(nn.Module):
    """Shared parameters and maths of ``BayesLinear`` and ``BayesConv2d``.

    ``group_dim`` 1 (linear: input neurons) or 0 (conv: output filters).
    """

    group_dim: int

    def _init_bayes(self, weight: Tensor, bias: Tensor | None, prior: str, tau0: float,
                    var_cap: float | None, lv_scale: float = 1.0) -> None:  # fmt: skip
        if prior not in PRIORS:
            raise ValueError(f"prior must be one of {', '.join(PRIORS)}, got {prior!r}")
        self.prior = prior
        self.tau0 = float(tau0)
        self.var_cap = var_cap
        # log-variances and group-scale parameters are stored divided by lv_scale: Adam's
        # steps (about lr each) then move them lv_scale times faster than the weight means
        self.lv_scale = k = float(lv_scale)
        w = weight.detach().float().clone()
        n = w.shape[self.group_dim]
        self.n_groups = n

        def noise(shape, mean, std=0.01):
            return torch.randn(shape) * std + mean

        if prior == "gnj":
            self.weight_mu = nn.Parameter(w)
            self.z_mu_p = nn.Parameter(noise(n, 1.0) / k)
            self.z_logvar_p = nn.Parameter(noise(n, -9.0) / k)
        else:
            # theta_i starts at the group's RMS weight, so w~ starts at unit scale (the
            # prior's); s takes the median group scale, z the rest. The light-tailed Gamma
            # factors start at their prior means (tau0^2 / 2 and 1 / 2): a Gamma factor costs
            # KL linear in its value, an inverse-Gamma one only linear in its log, so the
            # heavy-tailed factor carries the scale (starting the Gamma factor of s at s0^2
            # made the KL ~1e9 with tau0 = 1e-5)
            dims = [d for d in range(w.dim()) if d != self.group_dim]
            rms = w.pow(2).mean(dim=dims).sqrt().clamp_min(1e-3)
            s0 = rms.median()
            shape = [1] * w.dim()
            shape[self.group_dim] = n
            self.weight_mu = nn.Parameter(w / rms.reshape(shape))
            log_sa = math.log(self.tau0**2 / 2)
            self.sa_mu_p = nn.Parameter(torch.full((1,), log_sa) / k)
            self.sb_mu_p = nn.Parameter((2 * torch.log(s0) - log_sa).reshape(1) / k)
            self.sa_logvar_p = nn.Parameter(noise(1, -9.0) / k)
            self.sb_logvar_p = nn.Parameter(noise(1, -9.0) / k)
            log_a = math.log(0.5)
            self.a_mu_p = nn.Parameter(torch.full((n,), log_a) / k)
            self.b_mu_p = nn.Parameter((2 * torch.log(rms / s0) - log_a) / k)
            self.a_logvar_p = nn.Parameter(noise(n, -9.0) / k)
            self.b_logvar_p = nn.Parameter(noise(n, -9.0) / k)
        self.weight_logvar_p = nn.Parameter(noise(w.shape, -9.0) / k)
        if bias is not None:
            self.bias_mu = nn.Parameter(bias.detach().float().clone())
            self.bias_logvar_p = nn.Parameter(noise(bias.shape, -9.0) / k)
        else:
            self.bias_mu = self.bias_logvar_p = None
        self.register_buffer("mask", torch.ones(n))

    # -- log-variances and group scales (stored as parameter / lv_scale)

    @property
    def z_mu(self) -> Tensor:
        return self.z_mu_p * self.lv_scale

    @property
    def sa_mu(self) -> Tensor:
        return self.sa_mu_p * self.lv_scale

    @property
    def sb_mu(self) -> Tensor:
        return self.sb_mu_p * self.lv_scale

    @property
    def a_mu(self) -> Tensor:
        return self.a_mu_p * self.lv_scale

    @property
    def b_mu(self) -> Tensor:
        return self.b_mu_p * self.lv_scale

    @property
    def weight_logvar(self) -> Tensor:
        return self.weight_logvar_p * self.lv_scale

    @property
    def bias_logvar(self) -> Tensor | None:
        return None if self.bias_logvar_p is None else self.bias_logvar_p * self.lv_scale

    @property
    def z_logvar(self) -> Tensor:
        return self.z_logvar_p * self.lv_scale

    @property
    def sa_logvar(self) -> Tensor:
        return self.sa_logvar_p * self.lv_scale

    @property
    def sb_logvar(self) -> Tensor:
        return self.sb_logvar_p * self.lv_scale

    @property
    def a_logvar(self) -> Tensor:
        return self.a_logvar_p * self.lv_scale

    @property
    def b_logvar(self) -> Tensor:
        return self.b_logvar_p * self.lv_scale

    # -- the group multiplier

    def log_scale_moments(self) -> tuple[Tensor, Tensor]:
        """GHS: mean and variance of ``log theta_i`` (log-normal group scale)."""
        m = 0.5 * (self.a_mu + self.b_mu + self.sa_mu + self.sb_mu)
        v = 0.25 * (self.a_logvar.exp() + self.b_logvar.exp()
                    + self.sa_logvar.exp() + self.sb_logvar.exp())  # fmt: skip
        return m, v

    def group_moments(self) -> tuple[Tensor, Tensor]:
        """``(E[g], E[g^2])`` of each group's multiplier."""
        if self.prior == "gnj":
            return self.z_mu, self.z_mu**2 + self.z_logvar.exp()
        m, v = self.log_scale_moments()
        return torch.exp(m + 0.5 * v), torch.exp(2 * m + 2 * v)

    def sample_groups(self, batch: int) -> Tensor:
        """A multiplier per example and group, (B, n)."""
        eps = torch.randn(batch, self.n_groups, device=self.weight_mu.device)
        if self.prior == "gnj":
            return (self.z_mu + eps * (0.5 * self.z_logvar).exp()) * self.mask
        m, v = self.log_scale_moments()
        return torch.exp(m + eps * v.sqrt()) * self.mask  # pruned groups stay 0 (fine-tuning)

    def group_statistic(self) -> Tensor:
        """What pruning thresholds: the noise-to-signal ratio of the group multiplier,
        ``log alpha_i``. GNJ: ``log sigma_z^2 - log mu_z^2`` (the paper's). GHS (the paper
        does not state its rule): ``log(Var(theta_i) / E[theta_i]^2) = log(exp(v_i) - 1)``
        for the log-normal group scale, the same quantity for the horseshoe's multiplier (a
        threshold on the scale itself is meaningless: the likelihood does not identify how
        the scale splits between ``s``, ``z`` and ``w~``)."""
        with torch.no_grad():
            if self.prior == "gnj":
                return self.z_logvar - torch.log(self.z_mu**2 + _LOG_EPS)
            _, v = self.log_scale_moments()
            return torch.log(torch.expm1(v) + _LOG_EPS**2)

    def keep_groups(self, threshold: float) -> Tensor:
        return self.group_statistic() < threshold

    # -- moments of the weights

    def _weight_var(self) -> Tensor:
        var = self.weight_logvar.exp()
        return var.clamp(max=self.var_cap) if self.var_cap is not None else var

    def _expand(self, g: Tensor) -> Tensor:
        shape = [1] * self.weight_mu.dim()
        shape[self.group_dim] = -1
        return g.reshape(shape)

    def posterior_mean(self, masked: bool = True) -> tuple[Tensor, Tensor | None]:
        """``E[w]`` (times the mask) and the bias at inference."""
        g, _ = self.group_moments()
        if masked:
            g = g * self.mask
        w = self.weight_mu * self._expand(g)
        b = self.bias_mu
        if b is not None and self.group_dim == 0:
            b = b * g
        return w, b

    def posterior_var(self) -> Tensor:
        """``Var(w) = (mu^2 + sigma^2) E[g^2] - mu^2 E[g]^2`` (the group multiplier and the
        weight independent; for GNJ this is methods.md's
        ``mu_z^2 sigma^2 + sigma_z^2 mu^2 + sigma_z^2 sigma^2``)."""
        g1, g2 = self.group_moments()
        mu2 = self.weight_mu**2
        return (mu2 + self._weight_var()) * self._expand(g2) - mu2 * self._expand(g1**2)

    # -- KL

    def kl(self) -> Tensor:
        """This layer's ``KL(q || p)`` (weights, biases, group scales)."""
        lv = self.weight_logvar
        if self.var_cap is not None:
            lv = lv.clamp(max=math.log(self.var_cap))
        total = gaussian_kl(self.weight_mu, lv).sum()
        if self.bias_mu is not None:
            total = total + gaussian_kl(self.bias_mu, self.bias_logvar).sum()
        if self.prior == "gnj":
            log_alpha = self.z_logvar - torch.log(self.z_mu**2 + _LOG_EPS)
            return total + gnj_kl(log_alpha).sum()
        total = total + kl_lognormal_gamma(self.sa_mu, self.sa_logvar, 0.5, self.tau0**-2).sum()
        total = total + kl_lognormal_invgamma(self.sb_mu, self.sb_logvar, 0.5, 1.0).sum()
        total = total + kl_lognormal_gamma(self.a_mu, self.a_logvar, 0.5, 1.0).sum()
        return total + kl_lognormal_invgamma(self.b_mu, self.b_logvar, 0.5, 1.0).sum()


class BayesLinear(_BayesLayer):
    """Bayesian ``nn.Linear``; one group per *input* neuron."""

    group_dim = 1

    def __init__(self, m: nn.Linear, prior: str = "gnj", tau0: float = 1e-5,
                 var_cap: float | None = None, lv_scale: float = 1.0):  # fmt: skip
        super().__init__()
        self.in_features, self.out_features = m.in_features, m.out_features
        self._init_bayes(m.weight, m.bias, prior, tau0, var_cap, lv_scale)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            w, b = self.posterior_mean()
            return F.linear(x, w, b)
        g = self.sample_groups(x.shape[0])  # (B, in)
        shape = [x.shape[0]] + [1] * (x.dim() - 2) + [self.in_features]
        xg = x * g.reshape(shape)
        mean = F.linear(xg, self.weight_mu, self.bias_mu)
        bvar = self.bias_logvar.exp() if self.bias_mu is not None else None
        var = F.linear(xg * xg, self._weight_var(), bvar)
        return mean + (var + 1e-8).sqrt() * torch.randn_like(mean)

    def to_float(self) -> nn.Linear:
        w, b = self.posterior_mean()
        m = nn.Linear(self.in_features, self.out_features, bias=b is not None)
        with torch.no_grad():
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
        return m.to(self.weight_mu.device)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, prior={self.prior}"


class BayesConv2d(_BayesLayer):
    """Bayesian ``nn.Conv2d``; one group per *output* filter (any stride, padding, groups)."""

    group_dim = 0

    def __init__(self, m: nn.Conv2d, prior: str = "gnj", tau0: float = 1e-5,
                 var_cap: float | None = None, lv_scale: float = 1.0):  # fmt: skip
        super().__init__()
        if m.padding_mode != "zeros":
            raise ValueError(f"bayes supports zero-padded convolutions, not {m.padding_mode!r}")
        self.conv_args = dict(stride=m.stride, padding=m.padding, dilation=m.dilation,
                              groups=m.groups)  # fmt: skip
        self.in_channels, self.out_channels = m.in_channels, m.out_channels
        self.kernel_size = m.kernel_size
        self._init_bayes(m.weight, m.bias, prior, tau0, var_cap, lv_scale)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            w, b = self.posterior_mean()
            return F.conv2d(x, w, b, **self.conv_args)
        g = self.sample_groups(x.shape[0])[:, :, None, None]  # (B, out, 1, 1)
        mean = F.conv2d(x, self.weight_mu, self.bias_mu, **self.conv_args)
        bvar = self.bias_logvar.exp() if self.bias_mu is not None else None
        var = F.conv2d(x * x, self._weight_var(), bvar, **self.conv_args)
        return mean * g + (var + 1e-8).sqrt() * g.abs() * torch.randn_like(mean)

    def to_float(self) -> nn.Conv2d:
        w, b = self.posterior_mean()
        m = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size,
                      bias=b is not None, **self.conv_args)  # fmt: skip
        with torch.no_grad():
            m.weight.copy_(w)
            if b is not None:
                m.bias.copy_(b)
        return m.to(self.weight_mu.device)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"prior={self.prior}")  # fmt: skip


BAYES_LAYERS = (BayesLinear, BayesConv2d)


def bayes_layers(model: nn.Module) -> dict[str, _BayesLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BAYES_LAYERS)}


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    if "." not in name:
        return model, name
    p, attr = name.rsplit(".", 1)
    return model.get_submodule(p), attr


def _layer_order(model: nn.Module, example: Tensor | None) -> list[str]:
    from ..recipes import layer_kinds

    return list(layer_kinds(model, example))


def bayesian_(model: nn.Module, config: BayesConfig | None = None,
              example_input: Tensor | None = None, **options) -> nn.Module:  # fmt: skip
    """Swap every Conv2d / Linear for its Bayesian version in place (weight means start from
    the current weights); returns ``model``. ``deterministic_`` is the way back.

    >>> net = lowbit.models.create("lenet5")
    >>> bayesian_(net, prior="ghs")                          # doctest: +SKIP
    """
    cfg = config or BayesConfig(**options)
    order = _layer_order(model, example_input)
    if not order:
        raise ValueError(f"{type(model).__name__} has no Conv2d or Linear layer to make Bayesian")
    for i, name in enumerate(order):
        parent, attr = _parent(model, name)
        old = getattr(parent, attr)
        if isinstance(old, BAYES_LAYERS):
            raise ValueError(f"layer {name} is already Bayesian")
        cap = cfg.var_cap_first if i == 0 else None
        cls = BayesConv2d if isinstance(old, nn.Conv2d) else BayesLinear
        new = cls(old, cfg.prior, cfg.tau0, cap, cfg.lr_scale).to(old.weight.device)
        setattr(parent, attr, new)
    model.lowbit_bayes = cfg
    return model


def deterministic_(model: nn.Module) -> nn.Module:
    """Replace every Bayesian layer by a plain Conv2d / Linear holding ``E[w]`` times its
    pruning mask (the "masked model"), in place; returns ``model``."""
    for name, m in list(bayes_layers(model).items()):
        parent, attr = _parent(model, name)
        setattr(parent, attr, m.to_float())
    return model


def _check_threshold_names(cfg: BayesConfig, layers: list[str]) -> None:
    unknown = set(cfg.thresholds) - set(layers)
    if unknown:
        raise ValueError(
            f"bayes option thresholds names unknown layer(s) {sorted(unknown)}; layers: "
            f"{', '.join(layers)}"
        )


@torch.no_grad()
def set_masks(model: nn.Module, cfg: BayesConfig) -> dict[str, dict[str, Any]]:
    """Set each Bayesian layer's pruning mask from its threshold; returns per-layer counts."""
    out = {}
    _check_threshold_names(cfg, list(bayes_layers(model)))
    for name, m in bayes_layers(model).items():
        # a group pruned before (fine-tuning runs with the mask) stays pruned
        keep = m.keep_groups(cfg.threshold_for(name)) & (m.mask > 0)
        m.mask.copy_(keep.float())
        out[name] = {"groups": m.n_groups, "kept": int(keep.sum()),
                     "threshold": cfg.threshold_for(name)}  # fmt: skip
    return out


def total_kl(model: nn.Module) -> Tensor:
    kls = [m.kl() for m in bayes_layers(model).values()]
    if not kls:
        raise ValueError("the model has no Bayesian layer (call bayesian_ first)")
    return torch.stack(kls).sum()


class KLHook(TrainHook):
    """Adds ``beta * KL / N_train`` to the loss (``beta`` ramps over the warm-up epochs) and
    logs the KL and the kept groups at each epoch end."""

    def __init__(self, model: nn.Module, n_train: int, warmup_epochs: float = 0.0,
                 cfg: BayesConfig | None = None):  # fmt: skip
        if n_train < 1:
            raise ValueError("KLHook needs the training set size (n_train >= 1)")
        self.model = model
        self.n_train = int(n_train)
        self.warmup_epochs = float(warmup_epochs)
        self.cfg = cfg or BayesConfig()
        self.last_kl = 0.0

    def beta(self, trainer) -> float:
        if self.warmup_epochs <= 0:
            return 1.0
        steps = max(1, getattr(trainer, "steps_per_epoch", 1))
        return min(1.0, (trainer.global_step + 1) / (self.warmup_epochs * steps))

    def loss(self, trainer, loss, outputs, targets):
        kl = total_kl(self.model)
        self.last_kl = float(kl.detach())
        return loss + self.beta(trainer) * kl / self.n_train

    def on_epoch_end(self, trainer, epoch, metrics):
        metrics["kl"] = self.last_kl
        kept = []
        for name, m in bayes_layers(self.model).items():
            kept.append(str(int(m.keep_groups(self.cfg.threshold_for(name)).sum())))
        metrics["kept_groups"] = "-".join(kept)


# ----------------------------------------------------------------------------- removal


class FeatureSelect(nn.Module):
    """Keeps the given channels / features of dimension 1 (sorted indices), as constant
    slices and one ``cat``, so that freeze and the runtime run it without a gather op."""

    def __init__(self, keep: list[int], total: int):
        super().__init__()
        keep = sorted(int(i) for i in keep)
        if not keep:
            raise ValueError("FeatureSelect needs at least one index to keep")
        runs: list[tuple[int, int]] = []
        for i in keep:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
        self.runs = runs
        self.total = int(total)
        self.kept = len(keep)

    def forward(self, x: Tensor) -> Tensor:
        if len(self.runs) == 1:
            a, b = self.runs[0]
            return x[:, a:b]
        return torch.cat([x[:, a:b] for a, b in self.runs], 1)

    def extra_repr(self) -> str:
        return f"{self.kept} of {self.total} in {len(self.runs)} runs"


_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Dropout,
    nn.Identity, nn.BatchNorm1d, nn.BatchNorm2d, nn.Flatten,
)  # fmt: skip
_PASS_FUNCS = {
    "relu", "relu_", "relu6", "hardtanh", "leaky_relu", "elu", "gelu", "silu", "sigmoid", "tanh",
    "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d", "dropout",
    "flatten", "view", "reshape", "contiguous", "clamp", "clip",
}  # fmt: skip


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_PASS_MODULES, nn.Conv2d, nn.Linear)) or super().is_leaf_module(
            m, qualname
        )


class _Rec(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def _flow(model: nn.Module, example: Tensor):
    """Channel flow of ``model``: for every Conv2d/Linear, where its input comes from
    (``(producer, spatial factor, BN modules on the way)``; producer ``None`` = the network
    input), and which producers must keep their output channels (and why)."""
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        raise ValueError(
            f"bayes pruning cannot trace {type(model).__name__} with torch.fx ({e}); the forward "
            "needs to be free of data-dependent control flow"
        ) from None
    gm = fx.GraphModule(model, graph)
    rec = _Rec(gm)
    was = model.training
    model.eval()
    with torch.no_grad():
        rec.run(example)
    model.train(was)
    mods = dict(model.named_modules())
    src: dict[str, tuple | None] = {}  # node -> (producer or None for input, S, [bn names])
    inputs: dict[str, tuple] = {}  # layer -> its input's src
    blocked: dict[str, str] = {}
    for node in graph.nodes:
        val = rec.values.get(node.name)
        if node.op == "placeholder":
            src[node.name] = ("<input>", 1, [])
            continue
        if node.op == "output":
            out = node.args[0]
            for a in out if isinstance(out, tuple | list) else [out]:
                s = src.get(getattr(a, "name", None))
                if s is not None and s[0] != "<input>":
                    blocked.setdefault(s[0], "its output is the model's output")
            continue
        targs = [a for a in node.args if isinstance(a, fx.Node)]
        tracked = [src.get(a.name) for a in targs if src.get(a.name) is not None]
        if not isinstance(val, Tensor):
            continue  # sizes and other static values
        m = mods.get(node.target) if node.op == "call_module" else None
        if isinstance(m, nn.Conv2d | nn.Linear):
            s = src.get(targs[0].name) if targs else None
            if isinstance(m, nn.Conv2d) and m.groups != 1:
                if s is not None and s[0] != "<input>":
                    blocked.setdefault(s[0], f"feeds the grouped convolution {node.target}")
                blocked.setdefault(node.target, "a grouped convolution")
                s = None
            if isinstance(m, nn.Linear) and val.dim() != 2:  # channels not on dim 1
                if s is not None and s[0] != "<input>":
                    blocked.setdefault(s[0], f"feeds {node.target} on a {val.dim()}-d tensor")
                blocked.setdefault(node.target, f"a linear layer on a {val.dim()}-d tensor")
                s = None
            inputs[node.target] = s
            src[node.name] = (node.target, 1, [])
            continue
        name = node.target if node.op != "call_module" else None
        fname = getattr(name, "__name__", name) if name is not None else None
        passes = (m is not None and isinstance(m, _PASS_MODULES)) or (
            m is None and fname in _PASS_FUNCS
        )
        x_in = rec.values.get(targs[0].name) if targs else None
        if passes and len(tracked) == 1 and isinstance(x_in, Tensor):
            s = tracked[0]
            same = x_in.dim() >= 2 and val.dim() >= 2 and val.shape[1] == x_in.shape[1]
            if same and val.dim() == x_in.dim():
                bns = s[2] + (
                    [node.target] if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d) else []
                )
                src[node.name] = (s[0], s[1], bns)
                continue
            if x_in.dim() == 4 and val.dim() == 2 and val.shape[1] == x_in[0].numel():
                src[node.name] = (s[0], s[1] * x_in.shape[2] * x_in.shape[3], s[2])
                continue
        for s in tracked:
            if s[0] != "<input>":
                what = fname or type(m).__name__
                blocked.setdefault(s[0], f"feeds {what} ({node.name})")
        src[node.name] = None
    return inputs, blocked


@torch.no_grad()
def remove_pruned(model: nn.Module, example: Tensor) -> tuple[nn.Module, dict[str, Any]]:
    """A smaller dense copy of a masked model (plain Conv2d/Linear with zeroed groups).

    Removes output channels whose every consumer ignores them (zero input columns) or that
    are dead (zero filter and bias) with a value at the consumer that folds into its bias
    exactly; slices BatchNorm channels and flattened features on the way; then drops the
    remaining zero input columns of Linear (and groups=1 Conv2d) layers with a
    ``FeatureSelect`` in front of them. Returns the model and, per layer, the kept input and
    output indices (original numbering) and which producers were left whole, and why.
    """
    model = copy.deepcopy(model).eval()
    example = example[:2] if example.shape[0] >= 2 else torch.cat([example, example])
    inputs, blocked = _flow(model, example)
    mods = dict(model.named_modules())
    layers = {n: mods[n] for n in inputs}
    consumers: dict[str, list[tuple[str, int, list[str]]]] = {}
    for c, s in inputs.items():
        if s is not None and s[0] != "<input>":
            consumers.setdefault(s[0], []).append((c, s[1], s[2]))

    def unused_cols(c: str) -> Tensor:  # per input feature/channel: all-zero column
        w = layers[c].weight
        return (w == 0).all(dim=0).reshape(w.shape[1], -1).all(dim=1)

    # record each layer's input (batch 2)
    recorded: dict[str, Tensor] = {}

    def record(name: str):
        def hook(mod, inp, out):
            recorded[name] = inp[0].detach()

        return hook

    hooks = [layers[n].register_forward_hook(record(n)) for n in layers]
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
    in_idx = {n: torch.arange(m.weight.shape[1]) for n, m in layers.items()}
    out_idx = {n: torch.arange(m.weight.shape[0]) for n, m in layers.items()}

    keep_out: dict[str, Tensor] = {}
    # consumer -> [(producer, removed channels, their constant values, positions per channel)]
    fold: dict[str, list[tuple[str, Tensor, Tensor, int]]] = {}
    left_whole: dict[str, str] = {}
    for p, cons in consumers.items():
        w = layers[p].weight
        b = layers[p].bias
        dead = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
        if b is not None:
            dead &= b == 0
        if p in blocked:
            if dead.any() or any(unused_cols(c).any() for c, _, _ in cons):
                left_whole[p] = blocked[p]
            continue
        removable = torch.ones(w.shape[0], dtype=torch.bool)
        consts: dict[str, Tensor] = {}
        for c, S, _ in cons:
            unused = unused_cols(c).reshape(-1, S).all(dim=1) if isinstance(layers[c], nn.Linear) \
                else unused_cols(c)  # fmt: skip
            x = recorded[c]
            xc = x.reshape(x.shape[0], w.shape[0], -1)  # (B, channels, positions)
            const = xc[0, :, 0]
            is_const = (xc - const[None, :, None]).abs().amax(dim=(0, 2)) <= 1e-6 * (
                1 + const.abs()
            )
            cm = layers[c]
            foldable = dead & is_const
            if isinstance(cm, nn.Conv2d) and any(int(p_) != 0 for p_ in _pads(cm)):
                foldable &= const == 0  # zero padding makes a non-zero constant position-dependent
            removable &= unused | foldable
            consts[c] = torch.where(unused, torch.zeros_like(const), const)
        if removable.all():
            removable[0] = False  # keep one channel: a layer needs an output
        keep_out[p] = ~removable
        for c, S, _ in cons:
            fold.setdefault(c, []).append((p, removable, consts[c], S))

    # apply: producers' outputs, BN on the way, consumers' inputs (+ folded constants)
    for p, keep in keep_out.items():
        m = layers[p]
        idx = keep.nonzero().flatten()
        out_idx[p] = out_idx[p][idx]
        m.weight = nn.Parameter(m.weight[idx].clone())
        if m.bias is not None:
            m.bias = nn.Parameter(m.bias[idx].clone())
        if isinstance(m, nn.Conv2d):
            m.out_channels = len(idx)
        else:
            m.out_features = len(idx)
        for _c, _, bns in consumers[p]:
            for bn_name in bns:
                bn = mods[bn_name]
                if bn.num_features == len(idx):
                    continue  # shared by two consumers: sliced once
                bn.num_features = len(idx)
                for attr in ("weight", "bias"):
                    t = getattr(bn, attr)
                    if t is not None:
                        setattr(bn, attr, nn.Parameter(t[idx].clone()))
                bn.running_mean = bn.running_mean[idx].clone()
                bn.running_var = bn.running_var[idx].clone()
    for c, items in fold.items():
        m = layers[c]
        for _p, removable, const, S in items:
            if not removable.any():
                continue
            w = m.weight
            if isinstance(m, nn.Linear):
                feat = removable.repeat_interleave(S)
                cvec = const.repeat_interleave(S)
                add = w[:, feat] @ cvec[feat]
                keep = ~feat
            else:
                add = (w[:, removable].sum(dim=(2, 3)) * const[removable]).sum(dim=1)
                keep = ~removable
            if add.abs().max() > 0:
                if m.bias is None:
                    m.bias = nn.Parameter(torch.zeros(w.shape[0]))
                m.bias = nn.Parameter(m.bias + add)
            m.weight = nn.Parameter(w[:, keep].clone())
            in_idx[c] = in_idx[c][keep]
            if isinstance(m, nn.Conv2d):
                m.in_channels = int(m.weight.shape[1])
            else:
                m.in_features = int(m.weight.shape[1])
    # remaining zero input columns: a FeatureSelect in front of the layer
    renamed: dict[str, str] = {}
    selects: dict[str, FeatureSelect] = {}
    for name, m in layers.items():
        if isinstance(m, nn.Conv2d) and m.groups != 1:
            continue
        unused = (m.weight == 0).all(dim=0).reshape(m.weight.shape[1], -1).all(dim=1)
        if not unused.any() or unused.all():
            continue
        if isinstance(m, nn.Linear) and recorded[name].dim() != 2:
            continue
        keep = (~unused).nonzero().flatten().tolist()
        sel = FeatureSelect(keep, m.weight.shape[1])
        m.weight = nn.Parameter(m.weight[:, ~unused].clone())
        in_idx[name] = in_idx[name][~unused]
        if isinstance(m, nn.Conv2d):
            m.in_channels = int(m.weight.shape[1])
        else:
            m.in_features = int(m.weight.shape[1])
        parent, attr = _parent(model, name)
        setattr(parent, attr, nn.Sequential(sel, m))
        renamed[name] = f"{name}.1"
        selects[name] = sel
    info = {"renamed": renamed, "left_whole": left_whole, "in_idx": in_idx, "out_idx": out_idx,
            "selects": {k: len(v.runs) for k, v in selects.items()}}  # fmt: skip
    return model, info


def _pads(m: nn.Conv2d):
    p = m.padding
    if isinstance(p, str):
        return [0] if p == "valid" else [1]
    return list(p)


# ----------------------------------------------------------------------------- bit precision


def layer_bits(var: Tensor, rule: str = "unit-roundoff", std_k: float = 1.0,
               max_t: int = 23) -> int:  # fmt: skip
    """Fraction bits ``t`` of a layer from its weights' posterior variances.

    ``unit-roundoff`` (Louizos et al.): per weight, how many ``t`` in 1..max_t satisfy
    ``2^-t > 2 Var(w)``; ``ceil`` of the mean. ``std``: per weight the largest ``t`` in
    0..max_t with ``2^-t > std_k * std(w)`` (0 if none); ``ceil`` of the mean.
    """
    if rule not in BITS_RULES:
        raise ValueError(f"bits_rule must be one of {', '.join(BITS_RULES)}, got {rule!r}")
    v = var.detach().double().flatten()
    if v.numel() == 0:
        return 0
    t = torch.arange(1, max_t + 1, dtype=torch.float64)
    u = 2.0**-t  # unit round-off of a t-bit significand
    if rule == "unit-roundoff":
        counts = (u[None, :] > 2 * v[:, None]).sum(dim=1).double()
    else:
        ok = u[None, :] > std_k * v.clamp_min(0).sqrt()[:, None]
        # u decreases with t: the count of satisfied t is the largest such t
        counts = ok.sum(dim=1).double()
    return int(math.ceil(float(counts.mean()) - 1e-12))


def fixed_point_for(w: Tensor, t: int, min_levels: int = 4, max_t: int = 23) -> FixedPoint:
    """The ``FixedPoint`` codec storing ``w`` on the grid ``2^-f``: ``f = t``, raised until
    ``max|w|`` spans ``min_levels`` steps (a small layer is not rounded to zero), and
    enough integer bits for ``max|w|``."""
    wmax = float(w.detach().abs().max()) if w.numel() else 0.0
    f = max(0, int(t))
    while wmax > 0 and f < max_t and round(wmax * 2**f) < min_levels:
        f += 1
    i = 0
    while round(wmax * 2**f) > 2 ** (i + f) - 1 and i + f < 31:
        i += 1
    if i + f == 0:
        f = 1
    return FixedPoint(integer_bits=i, fraction_bits=f)


def authors_exponent_bits(max_abs: float) -> tuple[int, bool]:
    """``ceil(log2(log2(max|E[w]|) + 1) + 1)`` (Louizos et al.), floored at 1 bit; returns
    ``(bits, floored)``: the formula is <= 0 or undefined for ``max|w|`` below ~0.71."""
    inner = math.log2(max_abs) + 1 if max_abs > 0 else -math.inf
    if inner <= 0:
        return 1, True
    e = math.ceil(math.log2(inner) + 1)
    return (e, False) if e >= 1 else (1, True)


# ----------------------------------------------------------------------------- recipe


@register_method("bayes")
def bayes_recipe(**options: Any) -> Recipe:
    """The ``bayes`` recipe: the validated ``BayesConfig`` options. Its rules are the final
    stage (fixed-point weights, float activations); the precision per layer is decided from
    the posterior after training (``compress_model``), 8 fraction bits until then."""
    cfg = BayesConfig(**options)
    opts = asdict(cfg)
    rules = [Rule(select="all", weights=FixedPoint(0, 8), activations="float")]
    return Recipe("bayes", rules, opts)


# ----------------------------------------------------------------------------- workflow


#: the paper's figures as methods.md and issue 7 quote them (lenet300: the prior is not
#: stated there, so the same row stands beside both)
PAPER = {
    "lenet5": {"architecture": "20-50-800-500",
               "gnj": {"error": 1.0, "pruned": "x108", "compression": 361},
               "ghs": {"error": 1.0, "pruned": "x156", "compression": 419,
                       "architecture": "5-10-76-16"}},
    "lenet300": {"architecture": "784-300-100",
                 "gnj": {"error": 1.8, "compression": "~58"},
                 "ghs": {"error": 1.8, "compression": "~58"}},
}  # fmt: skip


@torch.no_grad()
def _predict(net: nn.Module, data, transform, batch_size: int = 500) -> tuple[Tensor, Tensor]:
    from ..train import _as_tensors

    images, labels = _as_tensors(data)
    was = net.training
    net.eval()
    preds = [net(transform(images[i : i + batch_size])).argmax(1)
             for i in range(0, len(images), batch_size)]  # fmt: skip
    net.train(was)
    return (torch.cat(preds) if preds else torch.empty(0, dtype=torch.long)), labels


def _params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _arch(model: nn.Module, order: list[str], sizes: dict[str, int]) -> str:
    return "-".join(str(sizes[n]) for n in order)


def prune_and_quantize(bnet: nn.Module, cfg: BayesConfig, example: Tensor,
                       order: list[str]) -> dict[str, Any]:  # fmt: skip
    """Masks from the thresholds, the masked and the removed-unit models, bits per layer
    and the fixed-point model (``compress_``-ed with ``FixedPoint`` per layer)."""
    from ..recipes import compress_

    bnet = bnet.cpu().eval()
    groups = set_masks(bnet, cfg)
    blayers = bayes_layers(bnet)
    means = {n: m.posterior_mean()[0].detach() for n, m in blayers.items()}
    variances = {n: m.posterior_var().detach() for n, m in blayers.items()}
    masked = deterministic_(copy.deepcopy(bnet))
    small, info = remove_pruned(masked, example)
    # bits from the posterior of the weights that survive
    kept_var, kept_mean = {}, {}
    for n in blayers:
        oi, ii = info["out_idx"][n], info["in_idx"][n]
        kept_var[n] = variances[n][oi][:, ii]
        kept_mean[n] = means[n][oi][:, ii]
    max_all = max(float(w.abs().max()) for w in kept_mean.values() if w.numel())
    exp_bits, floored = authors_exponent_bits(max_all)
    layers_out = []
    rules = []
    sub = dict(small.named_modules())
    for n in order:
        t = layer_bits(kept_var[n], cfg.bits_rule, cfg.std_k, cfg.max_fraction_bits)
        t_other = layer_bits(kept_var[n], "std" if cfg.bits_rule != "std" else "unit-roundoff",
                             cfg.std_k, cfg.max_fraction_bits)  # fmt: skip
        name = info["renamed"].get(n, n)
        w = sub[name].weight.detach()
        codec = fixed_point_for(w, t, cfg.min_levels, cfg.max_fraction_bits)
        rules.append(Rule(name=name, weights=codec, activations="float"))
        m = blayers[n]
        kept = int(m.mask.sum())
        layers_out.append({
            "layer": n, "kind": "conv" if isinstance(m, BayesConv2d) else "linear",
            "group": "output filters" if isinstance(m, BayesConv2d) else "input neurons",
            "groups": m.n_groups, "kept_groups_mask": kept,
            "kept_groups": int(w.shape[0] if isinstance(m, BayesConv2d) else w.shape[1]),
            "weight_shape": list(w.shape), "weights": int(w.numel()),
            "threshold": groups[n]["threshold"],
            "t_rule": t, f"t_{'std' if cfg.bits_rule != 'std' else 'unit-roundoff'}": t_other,
            "integer_bits": codec.integer_bits, "fraction_bits": codec.fraction_bits,
            "bits_per_weight": 1 + codec.integer_bits + codec.fraction_bits,
            "authors_bits_per_weight": 1 + exp_bits + t,
            "max_abs_weight": float(w.abs().max()) if w.numel() else 0.0,
        })  # fmt: skip
    qnet = copy.deepcopy(small)
    compress_(qnet, Recipe("bayes", rules, asdict(cfg)), example[:1])
    return {"masked": masked, "small": small, "quant": qnet, "info": info, "layers": layers_out,
            "exponent_bits": exp_bits, "exponent_floored": floored}  # fmt: skip


def compress_model(
    method: str,
    model: str,
    data: str,
    out,
    config,
    data_dir=None,
    model_kwargs: dict[str, Any] | None = None,
    from_checkpoint=None,
    fp_config=None,
    limit_train: int | None = None,
    limit_test: int | None = None,
    method_options: dict[str, Any] | None = None,
    convention: str = "operand-width",
    resume: bool = False,
) -> dict[str, Any]:
    """``lowbit compress --method bayes``: FP model, Bayesian training (KL / N_train),
    pruning, removal, bits from the posterior, freeze and pack. Same arguments and result
    keys as ``lowbit.workflow.compress_model`` plus the Bayesian report."""
    from .. import __version__
    from .. import data as data_mod
    from ..cost import analyze, format_table
    from ..freeze import freeze
    from ..packfile import save
    from ..train import Trainer, build_from_checkpoint, evaluate
    from ..utils import resolve_device, write_json
    from ..workflow import (
        data_meta,
        environment,
        frozen_agreement,
        load_splits,
        train_model,
        transforms_for,
    )

    out = Path(out)
    model_kwargs = dict(model_kwargs or {})
    recipe = bayes_recipe(**(method_options or {}))  # validate before any training
    cfg = BayesConfig(**recipe.options)
    train_set, test_set = load_splits(data, data_dir, limit_train, limit_test, config.seed)
    if cfg.thresholds and from_checkpoint is None:  # layer names are known before training
        from .. import models

        probe = models.build(model, num_classes=len(train_set.classes),
                             input_shape=train_set.shape, **model_kwargs)  # fmt: skip
        _check_threshold_names(cfg, _layer_order(probe, torch.zeros(1, *train_set.shape)))
    if from_checkpoint is None:
        fp_dir = out / "fp"
        if resume and (fp_dir / "result.json").exists():
            from_checkpoint = json.loads((fp_dir / "result.json").read_text())["checkpoint"]
        else:
            fp = train_model(model, data, fp_dir, fp_config or config, data_dir, model_kwargs,
                             limit_train, limit_test)  # fmt: skip
            from_checkpoint = fp["checkpoint"]
    net, ckpt = build_from_checkpoint(from_checkpoint)
    if ckpt.get("recipe"):
        raise ValueError(f"--from {from_checkpoint} is already compressed; give an FP checkpoint")
    want = ckpt["model"].get("input_shape")
    if want and list(train_set.shape) != list(want):
        raise ValueError(
            f"{from_checkpoint} was trained on inputs of shape {want}, data set {data} has "
            f"{list(train_set.shape)}"
        )
    dmeta = data_meta(train_set)
    train_tf, test_tf = transforms_for(dmeta, augment=config.augment)
    dev = resolve_device(config.device)
    fp_acc = evaluate(net.to(dev), test_set, test_tf, config.eval_batch_size, dev)
    net = net.cpu()
    example = torch.zeros(1, *train_set.shape)
    fp_report = analyze(net, example, convention=convention)
    order = _layer_order(net, example)
    orig_weights = sum(net.get_submodule(n).weight.numel() for n in order)
    torch.manual_seed(config.seed)
    bayesian_(net, cfg, example)
    _check_threshold_names(cfg, list(bayes_layers(net)))
    meta = {
        "model": ckpt["model"], "data": dmeta, "lowbit_version": __version__,
        "recipe": recipe.to_dict(), "fp_checkpoint": str(from_checkpoint),
        "fp_test_accuracy": fp_acc["test_accuracy"],
    }  # fmt: skip
    bdir = out / "bayes"
    hook = KLHook(net, len(train_set), cfg.kl_warmup_epochs, cfg)
    trainer = Trainer(net, config, hooks=[hook], out_dir=bdir, meta=meta,
                      train_transform=train_tf, test_transform=test_tf)  # fmt: skip
    resume_from = bdir / "last.pt" if resume and (bdir / "last.pt").exists() else None
    write_json(out / "config.json", {
        "command": "compress", "method": method, "recipe": recipe.to_dict(),
        "model": ckpt["model"],
        "data": {**dmeta, "limit_train": limit_train, "limit_test": limit_test,
                 "data_dir": str(data_dir) if data_dir else None},
        "from": str(from_checkpoint), "bayes_training": asdict(config),
        "fp": asdict(fp_config) if fp_config else None, "convention": convention,
        "environment": environment(),
    })  # fmt: skip
    t0 = time.perf_counter()
    result = trainer.fit(train_set, test_set, resume=resume_from)
    history = list(result.history)
    epochs_done = trainer.epoch
    bnet = trainer.model.cpu().eval()
    if cfg.finetune_epochs > 0:  # prune now, train on with the mask fixed
        set_masks(bnet, cfg)
        ft_dir = out / "bayes-finetune"
        ft_config = replace(config, epochs=cfg.finetune_epochs)
        ft = Trainer(bnet, ft_config, hooks=[KLHook(bnet, len(train_set), 0.0, cfg)],
                     out_dir=ft_dir, meta=meta, train_transform=train_tf,
                     test_transform=test_tf)  # fmt: skip
        ft_resume = ft_dir / "last.pt" if resume and (ft_dir / "last.pt").exists() else None
        result = ft.fit(train_set, test_set, resume=ft_resume)
        history += result.history
        epochs_done += ft.epoch
        bnet = ft.model.cpu().eval()
    # accuracy of the posterior mean before pruning
    bnet_unmasked_acc = _accuracy_unmasked(bnet, test_set, test_tf)
    pq = prune_and_quantize(bnet, cfg, example, order)
    p_masked, labels = _predict(pq["masked"], test_set, test_tf)
    p_small, _ = _predict(pq["small"], test_set, test_tf)
    p_quant, _ = _predict(pq["quant"], test_set, test_tf)
    p_before_qat = p_quant
    if cfg.qat_epochs > 0:  # train the pruned fixed-point model itself (STE), bits fixed
        qat_dir = out / "bayes-qat"
        qat_config = replace(config, epochs=cfg.qat_epochs, schedule="cosine", warmup_epochs=0)
        qt = Trainer(pq["quant"], qat_config, out_dir=qat_dir, meta=meta,
                     train_transform=train_tf, test_transform=test_tf)  # fmt: skip
        qt_resume = qat_dir / "last.pt" if resume and (qat_dir / "last.pt").exists() else None
        result = qt.fit(train_set, test_set, resume=qt_resume)
        history += result.history
        epochs_done += qt.epoch
        pq["quant"] = qt.model.cpu().eval()
        p_quant, _ = _predict(pq["quant"], test_set, test_tf)
    n = max(1, len(labels))

    def acc(p):
        return float((p == labels).sum()) / n

    qnet = pq["quant"]
    fmeta = {**meta, "input_shape": list(train_set.shape)}
    frozen = freeze(qnet, example, meta=json.loads(json.dumps(fmeta, default=str)))
    n_orig = _params(build_from_checkpoint(from_checkpoint)[0])
    frozen.meta["fp_params"] = n_orig  # ratios against the original, unpruned model
    check = frozen_agreement(qnet, frozen, test_set, test_tf)
    frozen.meta["test_accuracy_at_save"] = check["frozen_accuracy"]
    saved = save(frozen, out / "model.lowbit")
    report = analyze(frozen, convention=convention)
    report = {"model": ckpt["model"]["name"], "method": method, **report}
    small = pq["small"]
    sizes = {row["layer"]: row["kept_groups"] for row in pq["layers"]}
    orig_sizes = {row["layer"]: row["groups"] for row in pq["layers"]}
    n_small = _params(small)
    kept_w = sum(r["weights"] for r in pq["layers"])
    authors_bits = sum(r["weights"] * r["authors_bits_per_weight"] for r in pq["layers"])
    lowbit_w_bits = sum(r["weights"] * r["bits_per_weight"] for r in pq["layers"])
    fp16_energy_orig = fp_report["baselines"]["fp16_energy_pj"]
    name = ckpt["model"]["name"]
    bayes_report = {
        "prior": cfg.prior,
        "architecture_original": _arch(net, order, orig_sizes),
        "architecture": _arch(net, order, sizes),
        "layers": pq["layers"],
        "left_whole": pq["info"]["left_whole"],
        "feature_selects": pq["info"]["selects"],
        "params_original": n_orig,
        "params_pruned": n_small,
        "compression_pruned": n_orig / max(1, n_small),
        "compression_quantized": report["ratios"]["storage_vs_fp32"],
        "weights_kept": kept_w,
        "bits_per_weight": lowbit_w_bits / max(1, kept_w),
        "authors_bits_per_weight": authors_bits / max(1, kept_w),
        "authors_exponent_bits": pq["exponent_bits"],
        "authors_exponent_floored": pq["exponent_floored"],
        "compression_authors_count": 32 * n_orig / max(1, authors_bits),
        "compression_weights_only": 32 * n_orig / max(1, lowbit_w_bits),
        "accuracy_posterior_mean": bnet_unmasked_acc,
        "accuracy_masked": acc(p_masked),
        "accuracy_pruned": acc(p_small),
        "accuracy_fixed_point": acc(p_quant),
        "accuracy_fixed_point_before_qat": acc(p_before_qat),
        "qat_epochs": cfg.qat_epochs,
        "pruned_same_predictions": float((p_masked == p_small).float().mean()) if n else 1.0,
        "paper": PAPER.get(name),
        "bits_rule": cfg.bits_rule,
    }
    summary = {
        "method": method,
        "model": name,
        "data": data_mod.canonical_name(data),
        "test_accuracy": acc(p_quant),
        "fp_test_accuracy": fp_acc["test_accuracy"],
        "storage_bytes": report["totals"]["storage_bytes"],
        "fp32_storage_bytes": report["baselines"]["fp32_storage_bytes"],
        "compression_vs_fp32": report["ratios"]["storage_vs_fp32"],
        "storage_vs_fp16": report["ratios"]["storage_vs_fp16"],
        "energy_pj": report["totals"]["energy_pj"],
        # against the original (unpruned) model at fp16, as the storage ratio
        "energy_vs_fp16": fp16_energy_orig / max(1e-9, report["totals"]["energy_pj"]),
        "energy_vs_fp32": fp_report["baselines"]["fp32_energy_pj"]
        / max(1e-9, report["totals"]["energy_pj"]),
        "bops": report["totals"]["bops"],
        # the fraction of the original model's weights that are stored
        "density": kept_w / max(1, orig_weights),
        "convention": convention,
        "frozen_agreement": check["agreement"],
        "frozen_test_accuracy": check["frozen_accuracy"],
        "packed": saved["path"],
        "packed_bytes": saved["bytes"],
        "packed_payload_bytes": saved["payload_bytes"],
        "packed_header_bytes": saved["header_bytes"],
        "bayes": bayes_report,
        "epochs": epochs_done,
        "finetune_epochs": cfg.finetune_epochs,
        "seconds": round(sum(m.get("seconds", 0.0) for m in history), 3),
        "wall_seconds": round(time.perf_counter() - t0, 3),
        "checkpoint": result.checkpoint,
        "fp_checkpoint": str(from_checkpoint),
        "out": str(out),
        "seed": config.seed,
    }
    write_json(out / "cost.json", report)
    (out / "cost.md").write_text(f"# Cost report: {method} on {name}\n\n```\n"
                                 f"{format_table(report)}\n```\n")  # fmt: skip
    (out / "summary.md").write_text(report_md(summary))
    write_json(out / "result.json", summary)
    return summary


def load_bayes_run(out) -> nn.Module:
    """The trained Bayesian model of a ``compress --method bayes`` output folder."""
    from ..train import build_from_checkpoint, load_checkpoint

    out = Path(out)
    conf = json.loads((out / "config.json").read_text())
    cfg = BayesConfig(**conf["recipe"]["options"])
    net, _ = build_from_checkpoint(conf["from"])
    shape = conf["model"].get("input_shape")
    bayesian_(net, cfg, torch.zeros(1, *shape) if shape else None)
    net.load_state_dict(load_checkpoint(out / "bayes" / "last.pt")["state_dict"])
    return net.eval()


@torch.no_grad()
def _accuracy_unmasked(bnet: nn.Module, data, transform) -> float:
    saved = {n: m.mask.clone() for n, m in bayes_layers(bnet).items()}
    for m in bayes_layers(bnet).values():
        m.mask.fill_(1.0)
    p, y = _predict(bnet, data, transform)
    for n, m in bayes_layers(bnet).items():
        m.mask.copy_(saved[n])
    return float((p == y).sum()) / max(1, len(y))


def report_md(s: dict[str, Any]) -> str:
    """The Bayesian compression report (Markdown), with the paper's figures beside."""
    b = s["bayes"]
    lines = [
        f"# bayes ({b['prior']}) on {s['model']} ({s['data']})",
        "",
        f"Pruned architecture {b['architecture']} (from {b['architecture_original']}; conv: "
        "output filters kept, linear: input neurons kept).",
        "",
        "| layer | group | kept / groups | threshold | weights | t (rule) | lowbit bits/w "
        "| authors' bits/w |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in b["layers"]:
        lines.append(
            f"| {r['layer']} | {r['group']} | {r['kept_groups']} / {r['groups']} | "
            f"{r['threshold']:g} | {r['weights']:,} | {r['t_rule']} | {r['bits_per_weight']} "
            f"(i{r['integer_bits']}.f{r['fraction_bits']}) | {r['authors_bits_per_weight']} |"
        )
    paper = (b.get("paper") or {}).get(b["prior"]) or {}
    err = 100 * (1 - s["test_accuracy"])
    lines += [
        "",
        "| | lowbit | paper |",
        "|---|---|---|",
        f"| test error | {err:.2f}% | {paper.get('error', '-')}% |",
        f"| architecture | {b['architecture']} | {paper.get('architecture', '-')} |",
        f"| compression after pruning (fp32) | x{b['compression_pruned']:.1f} | "
        f"{paper.get('pruned', '-')} |",
        f"| compression after precision reduction, everything stored | "
        f"x{s['compression_vs_fp32']:.1f} | x{paper.get('compression', '-')} |",
        f"| ... weights only, lowbit's exact bits | x{b['compression_weights_only']:.1f} | |",
        f"| ... weights only, the authors' bit count | x{b['compression_authors_count']:.1f} | |",
        f"| bits per kept weight: lowbit / authors | {b['bits_per_weight']:.2f} / "
        f"{b['authors_bits_per_weight']:.2f} (exponent {b['authors_exponent_bits']} bit"
        f"{', floored' if b['authors_exponent_floored'] else ''}) | |",
        "",
        f"Accuracy: posterior mean {100 * b['accuracy_posterior_mean']:.2f}%, masked "
        f"{100 * b['accuracy_masked']:.2f}%, units removed {100 * b['accuracy_pruned']:.2f}% "
        f"(same predictions as masked: {100 * b['pruned_same_predictions']:.2f}%), fixed point "
        f"{100 * b['accuracy_fixed_point']:.2f}%, packed file {100 * s['frozen_test_accuracy']:.2f}"
        f"%; FP {100 * s['fp_test_accuracy']:.2f}%.",
        f"Storage {s['storage_bytes']:,.0f} B (packed file {s['packed_bytes']:,} B), "
        f"{s['epochs']} Bayesian epochs, {s['seconds']:.0f} s.",
    ]
    if b["left_whole"]:
        lines.append("Left whole (shapes do not allow removal): " + "; ".join(
            f"{k}: {v}" for k, v in b["left_whole"].items()))  # fmt: skip
    return "\n".join(lines) + "\n"
