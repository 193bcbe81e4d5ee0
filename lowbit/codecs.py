"""Codecs: how a weight tensor (or a layer's input activation) is represented.

A codec is a small, frozen, validated dataclass. Everything else asks it:
- training: ``fake_quant(w, params)`` gives the quantized value in the forward pass and
  the straight-through gradient (STE) in the backward pass;
- freezing: ``encode(w, params) -> Encoded`` (integer codes + float scales) and
  ``decode(encoded)`` back to the float tensor (``decode(encode(w)) == fake_quant(w)``);
- storage: ``bits_per_weight`` (exact, the packing the file uses);
- cost: ``mac_kind(act_codec)``, the arithmetic one multiply-accumulate becomes;
- serialization: ``to_dict()`` / ``codec_from_dict()`` as versioned JSON
  (``{"_type", "_version", "_data"}``).

Codecs that learn something (the ``ab``/``01`` binary domains) declare it in
``init_params(w)``: the layer registers those tensors as parameters and passes them back
to ``fake_quant``/``encode``.

The maths are plain functions (``quantize_symmetric``, ``ternary_absmean``, ...), so they
can be tested against independent references.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor

__all__ = [
    "Codec",
    "WeightCodec",
    "ActCodec",
    "Encoded",
    "Float",
    "Int",
    "Binary",
    "Ternary",
    "FixedPoint",
    "FloatAct",
    "Int8Act",
    "SignAct",
    "codec_from_dict",
    "weight_codec",
    "act_codec",
    "MAC_KINDS",
]

CODEC_VERSION = 1

#: The arithmetic a multiply-accumulate becomes, as the cost model bills it.
MAC_KINDS = (
    "fp32_mac",  # fp32 multiply + fp32 add
    "fp16_mac",
    "int_mac",  # integer multiply + add at the operand width (int8 x int8 -> int32)
    "int_add",  # ternary or binary weight times an integer activation: one add or nothing
    "xnor",  # 1-bit x 1-bit: XNOR + popcount
    "none",
)

_EPS = 1e-8


# ----------------------------------------------------------------------------- pure maths


def ste(forward: Tensor, backward: Tensor) -> Tensor:
    """Value of ``forward`` with the gradient of ``backward`` (straight-through)."""
    return backward + (forward - backward).detach()


def channel_reduce(w: Tensor, fn: str, per_channel: bool) -> Tensor:
    """``max``/``mean`` of ``|w|`` per output channel (dim 0), shaped to broadcast on ``w``."""
    a = w.detach().abs()
    if not per_channel:
        v = a.max() if fn == "max" else a.mean()
        return v.reshape([1] * w.ndim)
    flat = a.reshape(a.shape[0], -1)
    v = flat.amax(1) if fn == "max" else flat.mean(1)
    return v.reshape([-1] + [1] * (w.ndim - 1))


def quantize_symmetric(w: Tensor, bits: int, per_channel: bool = True) -> tuple[Tensor, Tensor]:
    """Symmetric uniform quantization: ``codes = clamp(round(w / s), -q, q)``, ``q = 2^(b-1)-1``,
    ``s = max|w| / q`` per output channel (or per tensor). Returns (codes, s); ``w ~ s*codes``.
    """
    q = 2 ** (bits - 1) - 1
    s = channel_reduce(w, "max", per_channel).clamp_min(_EPS) / q
    codes = torch.clamp(torch.round(w / s), -q, q)
    return codes, s


def ternary_absmean(w: Tensor, per_channel: bool = True, eps: float = 1e-6):
    """BitNet b1.58 rule: ``s = mean|w|``, ``t = clamp(round(w/(s+eps)), -1, 1)``, ``w ~ s*t``."""
    s = channel_reduce(w, "mean", per_channel)
    t = torch.clamp(torch.round(w / (s + eps)), -1, 1)
    return t, s


TERNARY_RULES = ("absmean", "twn")


def ternary_twn(w: Tensor, per_channel: bool = True, delta: float = 0.7):
    """TWN rule (Li et al. 2016, arXiv 1605.04711): threshold ``delta * mean|w|``,
    ``t = sign(w) * [|w| > threshold]``, ``s`` = mean ``|w|`` of the weights kept (the
    L2-optimal scale for that pattern; 1 where a channel keeps none). ``w ~ s*t``."""
    a = w.detach().abs()
    keep = a > delta * channel_reduce(w, "mean", per_channel)
    t = torch.sign(w.detach()) * keep
    if per_channel:
        dims = tuple(range(1, w.ndim))
        kept, n = (a * keep).sum(dims, keepdim=True), keep.sum(dims, keepdim=True)
    else:
        kept, n = (a * keep).sum().reshape([1] * w.ndim), keep.sum().reshape([1] * w.ndim)
    s = torch.where(n > 0, kept / n.clamp_min(1), torch.ones_like(kept))
    return t, s


class _IdentitySTE(torch.autograd.Function):
    """Forward: ``quantize(w)`` (run without autograd); backward: the gradient unchanged.

    The same value and gradient as ``ste(quantize(w), w)`` in one node: nothing is saved
    for backward and no extra passes over ``w`` are made for the straight-through part.
    """

    @staticmethod
    def forward(ctx, w, quantize):
        return quantize(w)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        return g, None


def _fake_quant_identity(w: Tensor, quantize) -> Tensor:
    """``quantize(w)`` with the identity STE gradient to ``w`` (when a graph is built)."""
    if torch.is_grad_enabled() and w.requires_grad:
        return _IdentitySTE.apply(w, quantize)
    with torch.no_grad():
        return quantize(w)


def _symmetric_value(w: Tensor, bits: int, per_channel: bool) -> Tensor:
    """``s * clamp(round(w / s), -q, q)`` as ``quantize_symmetric``, computed in place."""
    q = 2 ** (bits - 1) - 1
    s = channel_reduce(w, "max", per_channel).clamp_min(_EPS) / q
    out = torch.div(w, s)
    return out.round_().clamp_(-q, q).mul_(s)


def _ternary_value(w: Tensor, per_channel: bool, eps: float, rule: str, delta: float) -> Tensor:
    """``s * t`` of ``ternary_absmean`` (computed in place) or ``ternary_twn``."""
    if rule == "twn":
        t, s = ternary_twn(w, per_channel, delta)
        return t.mul_(s)
    s = channel_reduce(w, "mean", per_channel)
    out = torch.div(w, s + eps)
    return out.round_().clamp_(-1, 1).mul_(s)


def sign_pm1(x: Tensor) -> Tensor:
    """sign with sign(0) = -1, so a value is never a third level."""
    return torch.where(x > 0, torch.ones_like(x), -torch.ones_like(x))


# ----------------------------------------------------------------------------- base classes


@dataclass(frozen=True)
class Encoded:
    """A frozen weight: integer ``codes`` (same shape as the weight) and float ``params``
    (scales, offsets), such that the codec's ``decode`` rebuilds the float weight."""

    codes: Tensor
    params: dict[str, Tensor]


_REGISTRY: dict[str, type[Codec]] = {}


@dataclass(frozen=True)
class Codec:
    """Base of every codec: validation, versioned JSON and the registry."""

    type_name: ClassVar[str] = ""
    role: ClassVar[str] = ""  # "weight" | "activation"

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.type_name:
            _REGISTRY[cls.type_name] = cls

    def to_dict(self) -> dict[str, Any]:
        return {"_type": self.type_name, "_version": CODEC_VERSION, "_data": asdict(self)}

    def __str__(self) -> str:
        args = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in fields(self))
        return f"{type(self).__name__}({args})"


def codec_from_dict(d: dict[str, Any]) -> Codec:
    """Inverse of ``Codec.to_dict``; refuses unknown types and newer versions clearly."""
    if not isinstance(d, dict) or "_type" not in d:
        raise ValueError(f"not a codec description: {d!r}")
    kind = d["_type"]
    if kind not in _REGISTRY:  # a method's own codec: importing the methods registers it
        from .recipes import _load_methods

        _load_methods()
    if kind not in _REGISTRY:
        raise ValueError(f"unknown codec type {kind!r}; known: {sorted(_REGISTRY)}")
    version = int(d.get("_version", 1))
    if version > CODEC_VERSION:
        raise ValueError(
            f"codec {kind!r} has version {version}, newer than this lowbit ({CODEC_VERSION})"
        )
    cls = _REGISTRY[kind]
    data = dict(d.get("_data", {}))
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"codec {kind!r} has no options {unknown}; valid: {sorted(known)}")
    for f in fields(cls):  # JSON gives lists where the dataclass holds tuples
        if isinstance(data.get(f.name), list):
            data[f.name] = tuple(data[f.name])
    return cls(**data)


@dataclass(frozen=True)
class WeightCodec(Codec):
    role: ClassVar[str] = "weight"
    #: bits the file stores per weight (exact; 1.6 for base-3 packed ternary)
    bits_per_weight: ClassVar[float] = 32.0

    def init_params(self, w: Tensor) -> dict[str, Tensor]:
        """Learnable tensors this codec needs for ``w`` (registered by the layer)."""
        return {}

    def fake_quant(self, w: Tensor, params: dict[str, Tensor] | None = None) -> Tensor:
        raise NotImplementedError

    def encode(self, w: Tensor, params: dict[str, Tensor] | None = None) -> Encoded:
        raise NotImplementedError

    def decode(self, enc: Encoded) -> Tensor:
        raise NotImplementedError

    def weight_bits(self) -> float:
        return float(self.bits_per_weight)

    def code_bits(self, w_shape: tuple[int, ...]) -> float:
        """Bits the codes of a weight of shape ``w_shape`` take in the file (exact)."""
        return math.prod(w_shape) * self.weight_bits()

    def file_packing(self) -> dict[str, Any] | None:
        """How the file packs this codec's codes (``lowbit.fileformat``); None: decided
        by the file writer from the codec type."""
        return None

    def scale_count(self, w_shape: tuple[int, ...]) -> int:
        """How many float scalars ``encode`` stores besides the codes (for storage)."""
        return 0

    def mac_kind(self, act: ActCodec) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class ActCodec(Codec):
    role: ClassVar[str] = "activation"

    def act_bits(self) -> int:
        raise NotImplementedError


# ----------------------------------------------------------------------------- weights


@dataclass(frozen=True)
class Float(WeightCodec):
    """No quantization (fp32 weights). ``bits``: 32 or 16 (storage / cost only)."""

    type_name: ClassVar[str] = "float"
    bits: int = 32

    def __post_init__(self):
        if self.bits not in (16, 32):
            raise ValueError(f"Float codec: bits must be 16 or 32, got {self.bits}")

    def weight_bits(self) -> float:
        return float(self.bits)

    def fake_quant(self, w, params=None):
        return w

    def encode(self, w, params=None):
        return Encoded(w.detach().clone(), {})

    def decode(self, enc):
        return enc.codes.float()

    def mac_kind(self, act):
        return "fp16_mac" if self.bits == 16 else "fp32_mac"


@dataclass(frozen=True)
class Int(WeightCodec):
    """Symmetric integer weights: ``w_q = s * clamp(round(w/s), -q, q)``, ``q = 2^(b-1)-1``,
    ``s = max|w|/q`` per output channel (or per tensor). STE: identity.
    """

    type_name: ClassVar[str] = "int"
    bits: int = 8
    per_channel: bool = True

    def __post_init__(self):
        if not 2 <= self.bits <= 16:
            raise ValueError(f"Int codec: bits must be in 2..16, got {self.bits}")

    def weight_bits(self):
        return float(self.bits)

    def fake_quant(self, w, params=None):
        # value: codes * s of quantize_symmetric; gradient: identity (STE)
        bits, per_channel = self.bits, self.per_channel
        return _fake_quant_identity(w, lambda v: _symmetric_value(v, bits, per_channel))

    def encode(self, w, params=None):
        codes, s = quantize_symmetric(w.detach(), self.bits, self.per_channel)
        return Encoded(codes.to(torch.int32), {"scale": s.flatten().float()})

    def decode(self, enc):
        s = enc.params["scale"]
        return enc.codes.float() * s.reshape([-1] + [1] * (enc.codes.ndim - 1))

    def scale_count(self, w_shape):
        return w_shape[0] if self.per_channel else 1

    def mac_kind(self, act):
        return "fp32_mac" if isinstance(act, FloatAct) else "int_mac"


@dataclass(frozen=True)
class Ternary(WeightCodec):
    """Ternary weights ``s * t``, ``t`` in {-1, 0, +1}, per output channel (or per tensor).

    ``rule``: "absmean" (BitNet b1.58, the default): ``s = mean|w|``,
    ``t = clamp(round(w/(s+eps)), -1, 1)``, i.e. a threshold of ``s/2``; or "twn" (TWN):
    threshold ``delta * mean|w|`` (``delta`` 0.7 by default), ``s`` = the mean ``|w|`` of
    the weights kept. STE: identity. ``packing``: "2bit" (fast kernels) or "base3"
    (5 trits per byte, 1.6 bits).
    """

    type_name: ClassVar[str] = "ternary"
    per_channel: bool = True
    packing: str = "2bit"
    eps: float = 1e-6
    rule: str = "absmean"
    delta: float = 0.7

    def __post_init__(self):
        if self.packing not in ("2bit", "base3"):
            raise ValueError(f"Ternary codec: packing must be 2bit or base3, got {self.packing!r}")
        if self.rule not in TERNARY_RULES:
            raise ValueError(
                f"Ternary codec: rule must be one of {', '.join(TERNARY_RULES)}, got {self.rule!r}"
            )
        if not 0 < self.delta < 2:
            raise ValueError(f"Ternary codec: delta must be in (0, 2), got {self.delta}")

    def weight_bits(self):
        return 2.0 if self.packing == "2bit" else 1.6

    def fake_quant(self, w, params=None):
        # value: t * s of the rule; gradient: identity (STE)
        per_channel, eps, rule, delta = self.per_channel, self.eps, self.rule, self.delta
        return _fake_quant_identity(w, lambda v: _ternary_value(v, per_channel, eps, rule, delta))

    def encode(self, w, params=None):
        if self.rule == "twn":
            t, s = ternary_twn(w.detach(), self.per_channel, self.delta)
        else:
            t, s = ternary_absmean(w.detach(), self.per_channel, self.eps)
        return Encoded(t.to(torch.int32), {"scale": s.flatten().float()})

    def decode(self, enc):
        s = enc.params["scale"]
        return enc.codes.float() * s.reshape([-1] + [1] * (enc.codes.ndim - 1))

    def scale_count(self, w_shape):
        return w_shape[0] if self.per_channel else 1

    def mac_kind(self, act):
        return "fp32_mac" if isinstance(act, FloatAct) else "int_add"


@dataclass(frozen=True)
class Binary(WeightCodec):
    """Binary weights in a two-value domain; bit ``b = [w > 0]``, ``s(w) = 2b - 1``.

    - ``pm1``: ``q = a * s(w)``, ``a`` = per-output-channel mean|w| (detached; XNOR-Net).
    - ``01``: ``q = beta * b`` (alpha fixed at 0), ``beta = 2*tau`` learned.
    - ``ab``: ``q = phi + tau * s(w)``, alpha = phi - tau, beta = phi + tau, both learned;
      initialized L2-optimally (the means of the weights on each side).
    STE: identity inside ``|w| <= clip`` and zero outside (clipped identity); the latent
    weights are clamped to the same window after each step (SBNN, arXiv 2306.13515).
    """

    type_name: ClassVar[str] = "binary"
    domain: str = "pm1"
    clip: float = 1.5

    def __post_init__(self):
        if self.domain not in ("pm1", "01", "ab"):
            raise ValueError(f"Binary codec: domain must be pm1, 01 or ab, got {self.domain!r}")
        if not self.clip > 0:
            raise ValueError(f"Binary codec: clip must be > 0, got {self.clip}")

    bits_per_weight: ClassVar[float] = 1.0

    def init_params(self, w):
        if self.domain == "pm1":
            return {}
        w = w.detach()
        pos, neg = w[w > 0], w[w <= 0]
        beta = pos.mean() if pos.numel() else w.abs().mean()
        if self.domain == "01":
            alpha = torch.zeros(())
        else:
            alpha = neg.mean() if neg.numel() else -w.abs().mean()
        return {"tau": ((beta - alpha) / 2).reshape(()), "phi": ((beta + alpha) / 2).reshape(())}

    def _surrogate(self, w):
        # identity gradient inside the clip window, zero outside
        return torch.where(w.abs() <= self.clip, w, w.detach())

    def fake_quant(self, w, params=None):
        s = ste(sign_pm1(w), self._surrogate(w))
        if self.domain == "pm1":
            return s * channel_reduce(w, "mean", True)
        tau, phi = params["tau"], params["phi"]
        if self.domain == "01":
            phi = tau  # alpha = phi - tau = 0
        return phi + tau * s

    def encode(self, w, params=None):
        bits = (w.detach() > 0).to(torch.int32)
        if self.domain == "pm1":
            a = channel_reduce(w.detach(), "mean", True).flatten().float()
            return Encoded(bits, {"alpha": -a, "beta": a})
        tau, phi = params["tau"].detach().float(), params["phi"].detach().float()
        if self.domain == "01":
            phi = tau
        return Encoded(bits, {"alpha": (phi - tau).reshape(1), "beta": (phi + tau).reshape(1)})

    def decode(self, enc):
        shape = [-1] + [1] * (enc.codes.ndim - 1)
        a = enc.params["alpha"].reshape(shape)
        b = enc.params["beta"].reshape(shape)
        return torch.where(enc.codes > 0, b, a).float()

    def scale_count(self, w_shape):
        return 2 * w_shape[0] if self.domain == "pm1" else 2

    def mac_kind(self, act):
        if isinstance(act, SignAct):
            return "xnor"
        return "fp32_mac" if isinstance(act, FloatAct) else "int_add"


@dataclass(frozen=True)
class FixedPoint(WeightCodec):
    """Signed fixed point: 1 sign bit + ``integer_bits`` + ``fraction_bits``.

    ``w_q = clamp(round(w * 2^f), -(2^(i+f) - 1), 2^(i+f) - 1) / 2^f``. STE: identity.
    Used by Bayesian compression, whose precision per layer comes from the posterior.
    """

    type_name: ClassVar[str] = "fixed"
    integer_bits: int = 0
    fraction_bits: int = 7

    def __post_init__(self):
        if self.integer_bits < 0 or self.fraction_bits < 0:
            raise ValueError("FixedPoint codec: integer_bits and fraction_bits must be >= 0")
        if not 1 <= self.integer_bits + self.fraction_bits <= 31:
            raise ValueError("FixedPoint codec: integer_bits + fraction_bits must be in 1..31")

    def weight_bits(self):
        return float(1 + self.integer_bits + self.fraction_bits)

    def _codes(self, w):
        q = 2 ** (self.integer_bits + self.fraction_bits) - 1
        return torch.clamp(torch.round(w * 2**self.fraction_bits), -q, q)

    def fake_quant(self, w, params=None):
        return ste(self._codes(w) / 2**self.fraction_bits, w)

    def encode(self, w, params=None):
        return Encoded(self._codes(w.detach()).to(torch.int32), {})

    def decode(self, enc):
        return enc.codes.float() / 2**self.fraction_bits

    def mac_kind(self, act):
        return "fp32_mac" if isinstance(act, FloatAct) else "int_mac"


# ----------------------------------------------------------------------------- activations


@dataclass(frozen=True)
class FloatAct(ActCodec):
    """Activations stay float (fp32, or fp16 for cost accounting)."""

    type_name: ClassVar[str] = "float_act"
    bits: int = 32

    def act_bits(self):
        return self.bits


# How an int8 activation scale is set in training (Int8Act.mode):
#   "ema"      the batch range, tracked by an exponential moving average;
#   "lsq"      learned, with the full LSQ gradient of Esser et al. 2020: inside the range
#              d/ds = round(x/s) - x/s, outside it the clipped code;
#   "lsq-clip" learned, with only the outside (clipping) term (lowbit before 2026-12).
INT8_ACT_MODES = ("ema", "lsq", "lsq-clip")


def check_act_mode(mode: str, name: str = "act_mode") -> str | None:
    """The problem with an int8 activation mode, or None when it is one of INT8_ACT_MODES."""
    if mode in INT8_ACT_MODES:
        return None
    return f"{name} must be one of {', '.join(INT8_ACT_MODES)}, got {mode!r}"


@dataclass(frozen=True)
class Int8Act(ActCodec):
    """8-bit activations with a per-tensor scale: unsigned [0, 255] (after ReLU) or signed
    [-127, 127]. The scale is learned (``lsq``, Esser et al. 2020; ``lsq-clip``, LSQ's
    clipping term only) or tracked by an EMA of the batch range (``ema``) during training,
    then frozen. STE: identity inside the range.
    """

    type_name: ClassVar[str] = "int8"
    signed: bool | None = None  # None: decided from the data at the first batch
    mode: str = "ema"  # one of INT8_ACT_MODES
    momentum: float = 0.1

    @property
    def learned(self) -> bool:
        """The scale is a parameter (an LSQ mode)."""
        return self.mode in ("lsq", "lsq-clip")

    def __post_init__(self):
        if problem := check_act_mode(self.mode, "mode"):
            raise ValueError(f"Int8 activation codec: {problem}")

    def act_bits(self):
        return 8


@dataclass(frozen=True)
class SignAct(ActCodec):
    """Binary activations ``sign(x)`` (sign(0) = -1). Backward: ``approxsign`` (Bi-Real:
    2 + 2x on [-1, 0), 2 - 2x on [0, 1), else 0) or ``irnet`` (k t (1 - tanh^2(t x)))."""

    type_name: ClassVar[str] = "sign"
    estimator: str = "approxsign"

    def __post_init__(self):
        if self.estimator not in ("approxsign", "irnet", "ste"):
            raise ValueError(
                f"Sign codec: estimator must be approxsign, irnet or ste, got {self.estimator!r}"
            )

    def act_bits(self):
        return 1


# ----------------------------------------------------------------------------- aliases

_WEIGHT_ALIASES: dict[str, WeightCodec] = {
    "float": Float(),
    "fp32": Float(),
    "fp16": Float(bits=16),
    "int8": Int(8),
    "int4": Int(4),
    "int2": Int(2),
    "ternary": Ternary(),
    "binary": Binary("pm1"),
    "binary01": Binary("01"),
    "binaryab": Binary("ab"),
}
_ACT_ALIASES: dict[str, ActCodec] = {
    "float": FloatAct(),
    "fp32": FloatAct(),
    "int8": Int8Act(),
    "uint8": Int8Act(signed=False),
    "sint8": Int8Act(signed=True),
    "sign": SignAct(),
}


def weight_codec(spec: str | dict | WeightCodec) -> WeightCodec:
    """A weight codec from an alias (``"int8"``, ``"ternary"``, ``"binary01"``, ...), a
    ``to_dict`` form, or a codec (returned as is)."""
    return _lookup(spec, _WEIGHT_ALIASES, WeightCodec, "weight")


def act_codec(spec: str | dict | ActCodec) -> ActCodec:
    """An activation codec from an alias (``"float"``, ``"int8"``, ``"sign"``) or a dict."""
    return _lookup(spec, _ACT_ALIASES, ActCodec, "activation")


def _lookup(spec, aliases, base, what):
    if isinstance(spec, base):
        return spec
    if isinstance(spec, dict):
        c = codec_from_dict(spec)
        if not isinstance(c, base):
            raise ValueError(f"{c} is not a {what} codec")
        return c
    if isinstance(spec, str) and spec.lower() in aliases:
        return aliases[spec.lower()]
    raise ValueError(f"unknown {what} codec {spec!r}; valid: {', '.join(sorted(aliases))}")


def log2_ceil(n: int) -> int:
    return max(1, math.ceil(math.log2(n))) if n > 1 else 0
