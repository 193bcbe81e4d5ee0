"""Quantized layers: ``QuantConv2d`` and ``QuantLinear`` take any weight and activation codec.

The layer keeps the full-precision "shadow" weight and learns it; the forward pass uses
``weight_codec.fake_quant(weight)`` and quantizes the layer's *input* with the activation
codec. Both are drop-in replacements for ``nn.Conv2d``/``nn.Linear`` (same parameters and
state-dict keys, plus the codecs' own tensors), so an FP checkpoint loads into them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .codecs import (
    ActCodec,
    FloatAct,
    Int8Act,
    SignAct,
    WeightCodec,
    act_codec,
    ste,
    weight_codec,
)

__all__ = ["ActQuantizer", "QuantConv2d", "QuantLinear", "QuantLayer", "sign_with_estimator"]


class _SignFn(torch.autograd.Function):
    """sign(x) forward (sign(0) = -1); a chosen surrogate gradient backward."""

    @staticmethod
    def forward(ctx, x, estimator: str, t: float, k: float):
        ctx.save_for_backward(x)
        ctx.estimator, ctx.t, ctx.k = estimator, t, k
        return torch.where(x > 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        if ctx.estimator == "approxsign":  # Bi-Real Net: derivative of the piecewise quadratic
            d = torch.where(x < 0, 2 + 2 * x, 2 - 2 * x).clamp_min(0) * (x.abs() < 1)
        elif ctx.estimator == "irnet":  # IR-Net: k * t * (1 - tanh^2(t x))
            d = ctx.k * ctx.t * (1 - torch.tanh(ctx.t * x) ** 2)
        else:  # clipped identity
            d = (x.abs() <= 1).to(g.dtype)
        return g * d, None, None, None


def sign_with_estimator(x: Tensor, estimator: str = "approxsign", t: float = 1.0, k: float = 1.0):
    return _SignFn.apply(x, estimator, t, k)


class ActQuantizer(nn.Module):
    """Quantizes a layer's input as its activation codec says; holds the scale state.

    Int8 (``ema``): during training the per-tensor range ``max|x|`` is tracked by an
    exponential moving average and used as the clip value; ``s = range / qmax``;
    ``x_q = s * clamp(round(x / s), qmin, qmax)``, STE identity inside the range, zero
    outside. ``lsq``: ``s`` is a parameter learned with the LSQ gradient scale
    ``1/sqrt(numel * qmax)``. In eval mode the scale is frozen.
    """

    def __init__(self, codec: ActCodec):
        super().__init__()
        self.codec = codec
        # -1 marks "not seen data yet"; signed is decided at the first batch when unset
        self.register_buffer("scale", torch.tensor(-1.0))
        self.register_buffer("signed_flag", torch.tensor(-1.0))
        if isinstance(codec, Int8Act) and codec.mode == "lsq":
            self.lsq_scale = nn.Parameter(torch.tensor(1.0))
        self.irnet_t = 1.0  # set per epoch by the SBNN hook when estimator == "irnet"
        self.irnet_k = 1.0

    @property
    def signed(self) -> bool:
        if self.codec.signed is not None:
            return bool(self.codec.signed)
        return bool(self.signed_flag.item() > 0)

    def qrange(self) -> tuple[int, int]:
        return (-127, 127) if self.signed else (0, 255)

    def forward(self, x: Tensor) -> Tensor:
        c = self.codec
        if isinstance(c, FloatAct):
            return x
        if isinstance(c, SignAct):
            return sign_with_estimator(x, c.estimator, self.irnet_t, self.irnet_k)
        return self._int8(x)

    def _int8(self, x: Tensor) -> Tensor:
        c = self.codec
        if self.signed_flag.item() < 0:  # first batch: is the input non-negative?
            self.signed_flag.fill_(1.0 if bool((x.detach() < 0).any()) else 0.0)
            if c.mode == "lsq":
                with torch.no_grad():
                    qmax = self.qrange()[1]
                    self.lsq_scale.fill_(2 * x.detach().abs().mean().item() / math.sqrt(qmax))
        qmin, qmax = self.qrange()
        if c.mode == "lsq":
            g = 1.0 / math.sqrt(x.numel() / x.shape[0] * qmax)
            s = ste(self.lsq_scale, self.lsq_scale * g).abs().clamp_min(1e-8)
            self.scale.fill_(float(s.detach()))
        else:
            if self.training:
                r = x.detach().abs().amax() if self.signed else x.detach().clamp_min(0).amax()
                r = r.clamp_min(1e-8)
                if self.scale.item() < 0:
                    self.scale.fill_(float(r) / qmax)
                else:
                    self.scale.mul_(1 - c.momentum).add_(c.momentum * float(r) / qmax)
            s = self.scale.clamp_min(1e-8)
        q = torch.clamp(torch.round(x / s), qmin, qmax) * s
        inside = (x >= qmin * s) & (x <= qmax * s)
        # STE: identity inside the range, clipped (zero gradient for x) outside
        return torch.where(inside, ste(q, x), q.detach() if c.mode == "ema" else q)

    def extra_repr(self) -> str:
        return str(self.codec)


class QuantLayer:
    """Mixin: codec handling shared by QuantConv2d and QuantLinear."""

    weight: Tensor
    weight_codec: WeightCodec
    act: ActQuantizer
    codec_params: nn.ParameterDict

    def _init_codecs(self, wcodec, acodec) -> None:
        self.weight_codec = weight_codec(wcodec)
        self.act = ActQuantizer(act_codec(acodec))
        params = self.weight_codec.init_params(self.weight)
        self.codec_params = nn.ParameterDict(
            {k: nn.Parameter(v.detach().clone().float()) for k, v in params.items()}
        )

    def quantized_weight(self) -> Tensor:
        return self.weight_codec.fake_quant(self.weight, dict(self.codec_params))

    def codec_repr(self) -> str:
        return f"weights={self.weight_codec}, act={self.act.codec}"


class QuantConv2d(nn.Conv2d, QuantLayer):
    """``nn.Conv2d`` with quantized weights and a quantized input. Any stride, padding,
    dilation and groups (depthwise included)."""

    def __init__(self, *args, weight_codec="int8", act_codec="float", **kw):
        super().__init__(*args, **kw)
        self._init_codecs(weight_codec, act_codec)

    @classmethod
    def from_float(cls, m: nn.Conv2d, weight_codec, act_codec) -> QuantConv2d:
        """A QuantConv2d sharing ``m``'s weight and bias (the codecs start from them)."""
        q = cls(
            m.in_channels, m.out_channels, m.kernel_size, stride=m.stride, padding=m.padding,
            dilation=m.dilation, groups=m.groups, bias=m.bias is not None,
            padding_mode=m.padding_mode, weight_codec=weight_codec, act_codec=act_codec,
            device=m.weight.device, dtype=m.weight.dtype,
        )  # fmt: skip
        q.weight, q.bias = m.weight, m.bias
        q._init_codecs(weight_codec, act_codec)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self.act(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.codec_repr()


class QuantLinear(nn.Linear, QuantLayer):
    """``nn.Linear`` with quantized weights and a quantized input."""

    def __init__(self, *args, weight_codec="int8", act_codec="float", **kw):
        super().__init__(*args, **kw)
        self._init_codecs(weight_codec, act_codec)

    @classmethod
    def from_float(cls, m: nn.Linear, weight_codec, act_codec) -> QuantLinear:
        """A QuantLinear sharing ``m``'s weight and bias (the codecs start from them)."""
        q = cls(
            m.in_features, m.out_features, bias=m.bias is not None, weight_codec=weight_codec,
            act_codec=act_codec, device=m.weight.device, dtype=m.weight.dtype,
        )  # fmt: skip
        q.weight, q.bias = m.weight, m.bias
        q._init_codecs(weight_codec, act_codec)
        return q

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.act(x), self.quantized_weight(), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self.codec_repr()
