"""SST: structured sparse ternary weight coding.

Y. Boo, W. Sung, "Structured sparse ternary weight coding of deep neural networks for
efficient hardware implementations", IEEE SiPS 2017, arXiv 1707.03684.

Each output unit's incoming weights (flattened in C order: ``in_channels x kh x kw`` for a
conv) are cut into groups of ``n`` (the last group zero-padded); in each group at most
``k`` weights are non-zero, and those are ``+-Delta``. A group is then one pattern of a
fixed codebook (``lowbit.sstcode``: ``sum_j C(n, j) 2^j`` patterns) and is stored as its
index: (8, 2) has 129 patterns, an 8-bit index per 8 weights (1 bit per weight); (4, 1)
9 patterns in 4 bits per 4 weights; (8, 1) 17 patterns, 5 bits per 8 weights.

Projection (the paper's exact rule is not published; methods.md, section 3): in each
group keep the ``k`` weights of largest ``|w|`` (ties: the lower position), set them to
``sign(w) * Delta`` and the rest to 0; ``Delta`` is the mean ``|w|`` over the kept
weights, per output channel (default) or per layer, which is L2-optimal for that
support. ``threshold=True`` also drops kept weights below ``Delta / 2`` (the L2-optimal
support for a fixed Delta), alternating the two steps ``iters`` times.

Training: QAT from the FP model with FP shadow weights and the identity STE; BatchNorm
after every layer but the last (``add_bn``: layers whose output no BatchNorm reads get one,
initialized to the identity on the first training batch, so the FP model's function is
kept); gradual pruning (``SSTSchedule``): the non-zeros allowed per group fall from
``start_k`` (default ``n``) to ``k`` between ``prune_start`` and ``prune_end`` (fractions
of the training steps) on the cubic schedule of Zhu & Gupta (arXiv 1710.01878), rounded to
whole non-zeros. ``start="binary"`` (default) keeps the ``k(t)`` largest weights of each
group while the allowance is above ``k`` (at ``k(t) = n`` every weight is +-Delta);
``start="ternary"`` also drops those below Delta/2 then (a dense ternary start). Measured
on LeNet-300-100, MNIST, 5 FP + 5 QAT epochs, seed 0 (the FP model of ``bench/sst.py
--part mnist``, then ``lowbit compress --method sst --model lenet300 --data mnist --from
bench/runs/sst/mnist/fp5/last.pt --epochs 5 --lr 0.01 --weight-decay 1e-4 --method-arg
...`` for each variant): SST(8, 2)
97.97% with the binary start, 97.85% ternary start, 97.92% ``threshold=True``, 97.97%
with ``prune_end=0.3``, 97.90% at QAT lr 0.03 instead of 0.01; (4, 1) 97.75% binary and
97.75% ternary start: differences within one seed's noise, so the defaults stay simple.

Layers: every Conv2d and Linear gets SST weights with int8 inputs (``act="float"`` keeps
float inputs); ``first="auto"`` (default) keeps a first *convolution* at int8 (its fan-in
of 27 for RGB 3x3 is a poor fit for groups of 8 and it holds few weights), while a first
fully connected layer (LeNet-300-100's 784x300, most of that model) is SST.

Inference: each output is ``Delta[c] * sum over groups of (the pattern's +-1 taps of the
input)``: additions only. The runtime's ``sst-lut`` kernel (``lowbit.runtime``) builds,
for each input row, the partial sums of every codebook pattern for every group once, and
each output channel then needs one table look-up and one add per group (T-MAC style).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .. import sstcode
from ..codecs import (
    Encoded,
    FloatAct,
    Int,
    Int8Act,
    WeightCodec,
    _fake_quant_identity,
    check_act_mode,
)
from ..layers import QuantConv2d, QuantLinear
from ..recipes import Recipe, Rule, _example_input, layer_kinds, register_method
from ..train import TrainHook

__all__ = [
    "PRESETS",
    "SST",
    "SSTConfig",
    "SSTSchedule",
    "add_batchnorm_",
    "sst_layers",
    "sst_project",
    "sst_recipe",
    "group_nonzeros",
    "support_for_delta",
]

#: (n, k) presets of the paper
PRESETS: tuple[tuple[int, int], ...] = ((8, 2), (4, 1), (8, 1))


# ----------------------------------------------------------------------------- projection


def _groups(w: Tensor, n: int) -> tuple[Tensor, int]:
    """``w`` -> ``[rows, groups, n]`` (zero-padded), and the fan-in."""
    rows = w.shape[0]
    flat = w.reshape(rows, -1)
    fan_in = flat.shape[1]
    pad = (-fan_in) % n
    if pad:
        flat = F.pad(flat, (0, pad))
    return flat.reshape(rows, -1, n), fan_in


def _topk_mask(a: Tensor, k: int) -> Tensor:
    """Per group (last dim), the ``k`` largest entries of ``a`` (ties: lower position)."""
    n = a.shape[-1]
    if k >= n:
        return torch.ones_like(a, dtype=torch.bool)
    idx = torch.sort(a, dim=-1, descending=True, stable=True).indices[..., :k]
    mask = torch.zeros_like(a, dtype=torch.bool)
    return mask.scatter_(-1, idx, True)


def _delta(a: Tensor, mask: Tensor, per_channel: bool) -> Tensor:
    """Mean of ``a`` over ``mask`` per row (or over everything); 1 where nothing is kept."""
    dims = (1, 2) if per_channel else (0, 1, 2)
    s = torch.where(mask, a, 0).sum(dims, keepdim=True)
    c = mask.sum(dims, keepdim=True)
    return torch.where(c > 0, s / c.clamp_min(1), torch.ones_like(s))


def support_for_delta(a: Tensor, top: Tensor, delta: Tensor) -> Tensor:
    """For a fixed Delta, the L2-optimal support among patterns of at most ``k`` non-zeros:
    the ``k`` largest ``|w|`` (``top``) that are at least ``Delta / 2`` (keeping ``w`` as
    ``sign(w) Delta`` costs ``(|w| - Delta)^2`` against ``w^2`` for a zero)."""
    return top & (a >= delta / 2) & (a > 0)


def sst_project(
    w: Tensor,
    n: int,
    k: int,
    per_channel: bool = True,
    threshold: bool = False,
    iters: int = 3,
) -> tuple[Tensor, Tensor]:
    """The SST projection of ``w`` (dim 0 = output units): ``(t, delta)`` with ternary
    ``t`` (same shape as ``w``, at most ``k`` non-zeros per group of ``n``) and ``delta``
    of shape ``[rows]`` (per channel) or ``[1]``, so that ``w ~ delta[c] * t``."""
    w = w.detach()
    g, fan_in = _groups(w, n)
    a = g.abs()
    mask = _topk_mask(a, k) & (a > 0)
    delta = _delta(a, mask, per_channel)
    if threshold:
        top = mask
        for _ in range(max(1, iters)):
            mask = support_for_delta(a, top, delta)
            delta = _delta(a, mask, per_channel)
    t = torch.where(mask, torch.sign(g), 0).reshape(w.shape[0], -1)[:, :fan_in]
    return t.reshape(w.shape), delta.reshape(-1)


def group_nonzeros(t: Tensor, n: int) -> Tensor:
    """Non-zeros per group of a ternary code tensor: ``[rows, groups]``."""
    g, _ = _groups(t, n)
    return (g != 0).sum(-1)


# ----------------------------------------------------------------------------- the codec


@dataclass(frozen=True)
class SST(WeightCodec):
    """Structured sparse ternary weights: at most ``k`` non-zero ``+-Delta`` in every group
    of ``n`` (see the module docstring). Stored as one codebook index per group
    (``ceil(log2(codebook))`` bits) plus Delta per output channel (or per layer).

    ``k_active`` and ``ternary_active`` are training state (the gradual-pruning schedule's
    current allowance, >= ``k``, and whether the threshold rule applies while it is above
    ``k``): they change the forward pass only; codes, packing and serialization always use
    ``k`` and ``threshold``."""

    type_name: ClassVar[str] = "sst"
    n: int = 8
    k: int = 2
    per_channel: bool = True
    threshold: bool = False
    iters: int = 3
    k_active: int | None = None
    ternary_active: bool = False

    def __post_init__(self):
        sstcode.check_nk(self.n, self.k)
        if not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"SST codec: iters must be an integer >= 1, got {self.iters!r}")
        if self.k_active is not None and not self.k <= self.k_active <= self.n:
            raise ValueError(
                f"SST codec: k_active must be in k..n = {self.k}..{self.n}, got {self.k_active}"
            )

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        for key in ("k_active", "ternary_active"):  # training state, not the representation
            d["_data"].pop(key)
        return d

    @property
    def codebook_size(self) -> int:
        return sstcode.codebook_size(self.n, self.k)

    @property
    def index_bits(self) -> int:
        return sstcode.index_bits(self.n, self.k)

    def weight_bits(self) -> float:
        return self.index_bits / self.n

    def code_bits(self, w_shape):
        rows = w_shape[0]
        fan_in = math.prod(w_shape[1:])
        return float(rows * sstcode.groups_per_row(fan_in, self.n) * self.index_bits)

    def file_packing(self):
        return {"kind": "sst", "n": self.n, "k": self.k, "bits": self.index_bits}

    def project(self, w: Tensor, k: int | None = None) -> tuple[Tensor, Tensor]:
        return sst_project(
            w, self.n, self.k if k is None else k, self.per_channel, self.threshold, self.iters
        )

    def _value(self, w: Tensor) -> Tensor:
        if self.ternary_active and self.k_active is not None:  # a dense-ternary start
            t, delta = sst_project(w, self.n, self.k_active, self.per_channel, True, self.iters)
        else:
            t, delta = self.project(w, self.k_active)
        return t.mul_(delta.reshape([-1] + [1] * (w.ndim - 1)).to(t.dtype))

    def fake_quant(self, w, params=None):
        return _fake_quant_identity(w, self._value)

    def encode(self, w, params=None):
        t, delta = self.project(w.detach())
        return Encoded(t.to(torch.int32), {"scale": delta.float()})

    def decode(self, enc):
        s = enc.params["scale"]
        return enc.codes.float() * s.reshape([-1] + [1] * (enc.codes.ndim - 1))

    def scale_count(self, w_shape):
        return w_shape[0] if self.per_channel else 1

    def mac_kind(self, act):
        return "fp32_mac" if isinstance(act, FloatAct) else "int_add"


# ----------------------------------------------------------------------------- config


@dataclass(frozen=True)
class SSTConfig:
    """Options of the ``sst`` method (see the module docstring)."""

    n: int = 8  # group size
    k: int = 2  # non-zeros allowed per group
    per_channel: bool = True  # Delta per output channel (else per layer)
    threshold: bool = False  # also drop kept weights below Delta/2 (alternating)
    iters: int = 3  # alternations of the threshold rule
    first: str = "auto"  # "auto" (int8 if a conv) | "int8" | "sst"
    last: str = "sst"  # "sst" | "int8"
    act: str = "int8"  # layer inputs: "int8" | "float"
    act_mode: str = "ema"  # int8 input scale: see codecs.INT8_ACT_MODES
    add_bn: bool = True  # BatchNorm after every layer but the last (added where missing)
    start_k: int | None = None  # non-zeros allowed at the start (None: n)
    # while more than k are allowed: "ternary" (also drop |w| < Delta/2: a dense ternary
    # start) or "binary" (keep the start_k largest: +-Delta everywhere at start_k = n)
    start: str = "binary"
    prune_start: float = 0.0  # fraction of the training steps where k starts to fall
    prune_end: float = 0.5  # ... and where it reaches k

    def __post_init__(self):
        problems: list[str] = []
        try:
            sstcode.check_nk(self.n, self.k)
        except ValueError as e:
            problems.append(str(e).removeprefix("SST: "))
        if not isinstance(self.iters, int) or self.iters < 1:
            problems.append(f"iters must be an integer >= 1, got {self.iters!r}")
        for name, valid in (("first", FIRST), ("last", LAST), ("act", ACTS), ("start", STARTS)):
            if getattr(self, name) not in valid:
                problems.append(f"{name} must be one of {', '.join(valid)}, got "
                                f"{getattr(self, name)!r}")  # fmt: skip
        if problem := check_act_mode(self.act_mode):
            problems.append(problem)
        if self.start_k is not None and not (
            isinstance(self.start_k, int)
            and isinstance(self.n, int)
            and isinstance(self.k, int)
            and self.k <= self.start_k <= self.n
        ):
            problems.append(f"start_k must be in k..n = {self.k}..{self.n}, got {self.start_k!r}")
        if not 0 <= self.prune_start <= self.prune_end <= 1:
            problems.append(
                f"need 0 <= prune_start <= prune_end <= 1, got {self.prune_start}, {self.prune_end}"
            )
        if problems:
            raise ValueError("bad sst option(s): " + "; ".join(problems))

    def codec(self) -> SST:
        return SST(self.n, self.k, self.per_channel, self.threshold, self.iters)


FIRST = ("auto", "int8", "sst")
LAST = ("sst", "int8")
ACTS = ("int8", "float")
STARTS = ("ternary", "binary")


@register_method("sst")
def sst_recipe(**options: Any) -> Recipe:
    """The SST recipe; ``options`` are the fields of ``SSTConfig`` (validated)."""
    cfg = SSTConfig(**options)
    act = Int8Act(mode=cfg.act_mode) if cfg.act == "int8" else FloatAct()
    rules = [Rule(select="all", weights=cfg.codec(), activations=act)]
    if cfg.first == "auto":
        rules.append(Rule(select="first+conv", weights=Int(8), activations=act, optional="silent"))
    elif cfg.first == "int8":
        rules.append(Rule(select="first", weights=Int(8), activations=act))
    if cfg.last == "int8":
        rules.append(Rule(select="last", weights=Int(8), activations=act))
    prepare = [add_batchnorm_] if cfg.add_bn else []
    start_k = cfg.n if cfg.start_k is None else cfg.start_k
    factories = []
    if start_k > cfg.k:
        factories.append(
            lambda m: SSTSchedule(
                m, start_k, cfg.prune_start, cfg.prune_end, ternary=cfg.start == "ternary"
            )
        )
    return Recipe("sst", rules, asdict(cfg), factories, prepare)


# ----------------------------------------------------------------------------- training


def sst_layers(model: nn.Module) -> list[tuple[str, QuantConv2d | QuantLinear]]:
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, QuantConv2d | QuantLinear) and isinstance(m.weight_codec, SST)
    ]


class SSTSchedule(TrainHook):
    """Gradual pruning: the non-zeros allowed per group, ``k(t) = k + round((start_k - k)
    (1 - t')^3)`` with ``t'`` the progress through [start, end] (fractions of all training
    steps), ``start_k`` before, ``k`` after. Sets each SST layer's ``k_active`` before every
    step; logs ``sst_k``."""

    def __init__(
        self,
        model: nn.Module,
        start_k: int,
        start: float = 0.0,
        end: float = 0.5,
        ternary: bool = True,
    ):
        self.layers = [m for _, m in sst_layers(model)]
        self.start_k, self.start, self.end = int(start_k), float(start), float(end)
        self.ternary = bool(ternary)
        self.current: int | None = None

    def k_at(self, progress: float, k: int) -> int:
        if progress >= self.end or self.start_k <= k:
            return k
        if progress < self.start:
            return max(k, self.start_k)
        t = (progress - self.start) / max(1e-12, self.end - self.start)
        return k + int(round((self.start_k - k) * (1 - t) ** 3))

    def _apply(self, trainer, step: int) -> None:
        total = max(1, trainer.config.epochs * max(1, trainer.steps_per_epoch))
        progress = step / total
        for m in self.layers:
            c = m.weight_codec
            ka = self.k_at(progress, c.k)
            ka = min(ka, c.n)
            new = None if ka == c.k else ka
            if c.k_active != new:
                m.weight_codec = replace(c, k_active=new, ternary_active=self.ternary)
            self.current = ka

    def on_fit_start(self, trainer):  # also a resume mid-epoch
        self._apply(trainer, trainer.global_step)

    def on_epoch_start(self, trainer, epoch):
        self._apply(trainer, trainer.global_step)

    def after_step(self, trainer):
        self._apply(trainer, trainer.global_step + 1)

    def on_epoch_end(self, trainer, epoch, metrics):
        if self.current is not None:
            metrics["sst_k"] = self.current


# ----------------------------------------------------------------------------- BatchNorm


class _IdentityInit:
    """BatchNorm that sets itself to the identity on its first training batch (gamma =
    batch std, beta = batch mean), so inserting it keeps the model's function."""

    def _init_buffers(self):
        self.register_buffer("identity_init_done", torch.zeros((), dtype=torch.uint8))

    def forward(self, x):
        if self.training and not bool(self.identity_init_done):
            with torch.no_grad():
                dims = [0] + list(range(2, x.dim()))
                mean = x.mean(dims)
                var = x.var(dims, unbiased=False)
                self.weight.copy_(torch.sqrt(var + self.eps))
                self.bias.copy_(mean)
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
                self.identity_init_done.fill_(1)
        return super().forward(x)


class IdentityInitBatchNorm1d(_IdentityInit, nn.BatchNorm1d):
    def __init__(self, num_features: int):
        super().__init__(num_features)
        self._init_buffers()


class IdentityInitBatchNorm2d(_IdentityInit, nn.BatchNorm2d):
    def __init__(self, num_features: int):
        super().__init__(num_features)
        self._init_buffers()


_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_PASS = (nn.MaxPool2d, nn.Dropout, nn.Identity)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, nn.Conv2d | nn.Linear) or super().is_leaf_module(m, qualname)


def _reads_bn(node, mods) -> bool:
    """Whether a BatchNorm reads ``node``'s output (directly or through max-pool/dropout)."""
    for u in node.users:
        if u.op != "call_module":
            continue
        m = mods.get(u.target)
        if isinstance(m, _BN):
            return True
        if isinstance(m, _PASS) and _reads_bn(u, mods):
            return True
    return False


def add_batchnorm_(model: nn.Module, example_input: Tensor | None = None) -> list[str]:
    """Put a BatchNorm after every Conv2d/Linear but the last whose output no BatchNorm
    reads (the layer becomes ``Sequential(layer, bn)`` under its old name). Returns the
    names of the layers that got one. Linear layers are handled when their output is 2-D."""
    kinds = layer_kinds(model, example_input)
    order = list(kinds)
    if not order:
        return []
    mods = dict(model.named_modules())
    try:
        graph = _Tracer().trace(model)
    except Exception as e:  # an untraceable model: leave it as it is
        warnings.warn(f"sst: cannot trace {type(model).__name__} ({e}); no BatchNorm added",
                      stacklevel=2)  # fmt: skip
        return []
    calls: dict[str, list] = {}
    for node in graph.nodes:
        if node.op == "call_module" and node.target in kinds:
            calls.setdefault(node.target, []).append(node)
    ndim: dict[str, int] = {}

    def record(name):
        def hook(m, i, o):
            ndim.setdefault(name, o.dim())

        return hook

    handles = [mods[n].register_forward_hook(record(n)) for n in order]
    was = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_example_input(model, example_input))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    added = []
    for name in order[:-1]:
        nodes = calls.get(name, [])
        if len(nodes) != 1 or _reads_bn(nodes[0], mods):
            continue
        m = mods[name]
        if isinstance(m, nn.Conv2d):
            bn = IdentityInitBatchNorm2d(m.out_channels)
        elif ndim.get(name) == 2:
            bn = IdentityInitBatchNorm1d(m.out_features)
        else:
            continue
        bn = bn.to(m.weight.device)
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, nn.Sequential(m, bn))
        added.append(name)
    return added
