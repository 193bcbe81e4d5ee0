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


def _int8_value(x: Tensor, s: Tensor, qmin: int, qmax: int) -> Tensor:
    """``clamp(round(x / s), qmin, qmax) * s``: one new tensor, the rest in place."""
    out = torch.div(x, s)
    return out.round_().clamp_(qmin, qmax).mul_(s)


def _inside(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """``(x >= lo) & (x <= hi)``: the STE mask (bool)."""
    m = torch.ge(x, lo)
    return m.logical_and_(torch.le(x, hi))


# On the CPU a 0-dim tensor is read back without a device sync, so the STE mask for x can
# be left to backward: one fused masked-gradient pass (``hardtanh_backward`` on the saved
# input, with bounds widened by one ulp so that they are inclusive) instead of building
# and saving a boolean mask in forward. Elsewhere (or when ``s`` needs a gradient) the
# mask is built in forward with tensor bounds, and nothing is read back.
_SCALAR_BOUNDS = True


def _scalar_bounds_ok(x: Tensor, s: Tensor) -> bool:
    return _SCALAR_BOUNDS and x.is_cpu and s.is_cpu and x.dtype in (torch.float32, torch.float64)


class _Int8ActFn(torch.autograd.Function):
    """Fake-quantized int8 activation and its STE in one node.

    Forward: ``q = clamp(round(x / s), qmin, qmax) * s``. Backward, with
    ``inside = (x >= qmin * s) & (x <= qmax * s)``: ``dx = g`` inside, 0 outside; and
    (when ``s`` needs a gradient) the LSQ gradient: outside the range ``g * code`` (the
    clipped code, ``q / s``), inside ``g * (round(x / s) - x / s)`` (``full``; Esser et al.
    2020) or nothing (``full=False``, the clipping term alone). Both are one reduction:
    ``ds = sum(g * q - dx * (x if full else q)) / s``.
    """

    @staticmethod
    def forward(ctx, x, s, qmin: int, qmax: int, full: bool = True):
        out = _int8_value(x, s, qmin, qmax)
        need_x, need_s = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.s_shape, ctx.full, ctx.bounds = s.shape, full, None
        if not (need_x or need_s):
            return out
        if _scalar_bounds_ok(x, s):
            # x >= lo  <=>  x > (the float below lo), in x's dtype; likewise for hi
            lo = (qmin * s).detach().to(x.dtype)
            hi = (qmax * s).detach().to(x.dtype)
            inf = torch.tensor(math.inf, dtype=x.dtype)
            ctx.bounds = (torch.nextafter(lo, -inf).item(), torch.nextafter(hi, inf).item())
            inside = None
        else:
            inside = _inside(x, qmin * s, qmax * s)
        if need_s:
            ctx.save_for_backward(x, inside, out, s)
        else:
            ctx.save_for_backward(x if inside is None else None, inside)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, inside, *rest = ctx.saved_tensors
        if ctx.bounds is not None:
            below, above = ctx.bounds
            gx = torch.ops.aten.hardtanh_backward(g, x, below, above)
        else:
            gx = torch.where(inside, g, 0.0)
        gs = None
        if ctx.needs_input_grad[1]:
            out, s = rest
            t = torch.mul(g, out).addcmul_(gx, x if ctx.full else out, value=-1)
            gs = (t.sum() / s).reshape(ctx.s_shape)
        return (gx if ctx.needs_input_grad[0] else None), gs, None, None, None


class ActQuantizer(nn.Module):
    """Quantizes a layer's input as its activation codec says; holds the scale state.

    Int8 (``ema``): during training the per-tensor range ``max|x|`` is tracked by an
    exponential moving average and used as the clip value; ``s = range / qmax``;
    ``x_q = s * clamp(round(x / s), qmin, qmax)``, STE identity inside the range, zero
    outside. ``lsq`` / ``lsq-clip``: ``s`` is a parameter learned with the LSQ gradient
    (full, or its clipping term alone; see ``_Int8ActFn``) and the LSQ gradient scale
    ``1/sqrt(numel * qmax)``. In eval mode the scale is frozen.

    The state lives in tensors (``scale``, ``signed_flag``) and the training step reads
    none of it back to Python: the first batch (``signed_flag < 0``) decides signed /
    unsigned and initializes the scale; after that the sign is cached (and re-read only
    when the ``signed_flag`` buffer changes, e.g. ``load_state_dict``).
    """

    def __init__(self, codec: ActCodec):
        super().__init__()
        self.codec = codec
        # -1 marks "not seen data yet"; signed is decided at the first batch when unset
        self.register_buffer("scale", torch.tensor(-1.0))
        self.register_buffer("signed_flag", torch.tensor(-1.0))
        if isinstance(codec, Int8Act) and codec.learned:
            self.lsq_scale = nn.Parameter(torch.tensor(1.0))
        self.irnet_t = 1.0  # set per epoch by the SBNN hook when estimator == "irnet"
        self.irnet_k = 1.0
        # (signed_flag tensor, its version, signed): valid while the buffer is unchanged
        self._sign_cache: tuple[Tensor, int, bool] | None = None

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

    def _signed_now(self, x: Tensor) -> bool:
        """Signed or not; at the first batch, decide it (and initialize the LSQ scale)."""
        flag = self.signed_flag
        cache = self._sign_cache
        if cache is not None and cache[0] is flag and cache[1] == flag._version:
            return cache[2]
        if flag.item() < 0:  # first batch: is the input non-negative?
            flag.fill_(1.0 if bool((x.detach() < 0).any()) else 0.0)
            if self.codec.learned:
                with torch.no_grad():
                    qmax = self.qrange()[1]
                    self.lsq_scale.fill_(2 * x.detach().abs().mean().item() / math.sqrt(qmax))
        signed = self.signed
        self._sign_cache = (flag, flag._version, signed)
        return signed

    def _int8(self, x: Tensor) -> Tensor:
        c = self.codec
        signed = self._signed_now(x)
        qmin, qmax = (-127, 127) if signed else (0, 255)
        if c.learned:
            g = 1.0 / math.sqrt(x.numel() / x.shape[0] * qmax)
            s = ste(self.lsq_scale, self.lsq_scale * g).abs().clamp_min(1e-8)
            self.scale.copy_(s.detach())
        else:
            if self.training:
                self._track_range(x, signed, qmax)
            s = self.scale.clamp_min(1e-8)
        if torch.is_grad_enabled() and (x.requires_grad or s.requires_grad):
            return _Int8ActFn.apply(x, s, qmin, qmax, c.mode != "lsq-clip")
        with torch.no_grad():
            return _int8_value(x, s, qmin, qmax)

    @torch.no_grad()
    def _track_range(self, x: Tensor, signed: bool, qmax: int) -> None:
        """EMA of the batch range ``max|x|`` (signed) or ``max(x, 0)`` (unsigned) / qmax;
        the first training batch sets it. Tensor ops only (no read-back)."""
        x = x.detach()
        if signed:
            lo, hi = torch.aminmax(x)
            r = torch.maximum(hi, lo.neg())  # == x.abs().amax()
        else:
            r = x.amax()  # clamp_min(0) below: == x.clamp_min(0).amax()
        r = r.clamp_min(1e-8).double()  # the update runs in double, as float(r) did
        m = self.codec.momentum
        first = (r / qmax).to(self.scale.dtype)
        ema = torch.mul(self.scale, 1 - m).add_((r * m / qmax).to(self.scale.dtype))
        self.scale.copy_(torch.where(self.scale < 0, first, ema))

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
