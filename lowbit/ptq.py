"""Post-training quantization: any recipe on an FP model, no retraining.

``ptq_(model, recipe, calib)`` swaps the layers the recipe selects (``compress_``), then

1. re-estimates BatchNorm statistics under the quantized weights (``bn_correct``: on,
   off, or ``None`` = auto, on when some layer's weights have fewer than 8 bits): every
   BatchNorm that was trained (``num_batches_tracked > 0``) gets the mean and variance of
   its input on the calibration images, with the weights quantized and the activations
   still in float. Quantizing weights (ternary, binary,
   SST above all) shifts each channel's mean and scale; the BatchNorm after it was
   trained for the FP statistics, so re-normalizing puts its output back where the next
   layer expects it. BatchNorms that never saw data (e.g. the identity ones SST inserts)
   are left alone: their statistics are not the ones the layer after them learned on.
   Measured on the demo's MobileNet (``lowbit ptq .../fp/last.pt --method prom``, built-in
   sample): 10.0% without, 82.6% with (FP 96.6%), hence the auto default.
2. calibrates every int8 activation quantizer on the calibration images: a layer's input
   is observed with all activations in float (weights quantized, one pass, no sequential
   re-calibration), signed if any observed value is negative, and the clip value ``c``
   (scale ``c / qmax``) chosen by

   - ``minmax``: the largest magnitude seen;
   - ``percentile``: the ``percentile``-th percentile of the magnitudes (default 99.99),
     from a histogram of ``bins`` bins over [0, max];
   - ``mse``: the clip minimizing the expected squared error on that histogram:
     ``sum_{v <= c} n_v s^2 / 12 + sum_{v > c} n_v (v - c)^2`` with ``s = c / qmax``
     (uniform rounding error inside the range, clipping error outside); exact zeros
     (ReLU outputs) are exact on the grid and left out.

   Binary (sign) and float activations need no calibration.

Training hooks of the recipe (SST's pruning schedule, SBNN's entropy term, ...) do not
run: PTQ is the quick first answer and the starting point for QAT (``lowbit compress
--from OUT/ptq.pt``).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .codecs import FixedPoint, FloatAct, Int, Int8Act, WeightCodec, weight_codec
from .layers import ActQuantizer, QuantConv2d, QuantLinear
from .train import reestimate_batchnorm

__all__ = [
    "Calibration",
    "CALIBRATIONS",
    "ptq_",
    "calibrate_activations",
    "correct_batchnorm",
    "parse_weight_codec",
    "uniform_recipe",
]

CALIBRATIONS = ("minmax", "percentile", "mse")


@dataclass(frozen=True)
class Calibration:
    """How PTQ sets activation ranges (see the module docstring)."""

    method: str = "percentile"
    percentile: float = 99.99
    bins: int = 2048
    bn_correct: bool | None = None  # None: auto (on below 8-bit weights)
    batch_size: int = 128

    def __post_init__(self):
        if self.method not in CALIBRATIONS:
            raise ValueError(
                f"calibration must be one of {', '.join(CALIBRATIONS)}, got {self.method!r}"
            )
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if self.bins < 16:
            raise ValueError(f"bins must be at least 16, got {self.bins}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {self.batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_CODEC_FORMS = "float, fp16, int8, int4, int2, int<B> (2..16), ternary, binary, binary01, "
_CODEC_FORMS += "binaryab, sst-<N>-<K> (e.g. sst-8-2), fixed-<I>-<F> (integer, fraction bits)"


def parse_weight_codec(spec: str | WeightCodec) -> WeightCodec:
    """A weight codec from a short name: the aliases of ``lowbit.codecs.weight_codec``,
    ``int<B>``, ``sst-<N>-<K>`` or ``fixed-<I>-<F>``."""
    if isinstance(spec, WeightCodec):
        return spec
    text = str(spec).strip().lower()
    m = re.fullmatch(r"int(\d+)", text)
    try:
        if m:
            return Int(int(m.group(1)))
        m = re.fullmatch(r"sst-(\d+)-(\d+)", text)
        if m:
            from .methods.sst import SST

            return SST(n=int(m.group(1)), k=int(m.group(2)))
        m = re.fullmatch(r"fixed-(\d+)-(\d+)", text)
        if m:
            return FixedPoint(int(m.group(1)), int(m.group(2)))
        return weight_codec(text)
    except ValueError as e:
        raise ValueError(f"weight codec {spec!r}: {e}; forms: {_CODEC_FORMS}") from None


def uniform_recipe(
    weights: str | WeightCodec = "int8",
    activations: str = "int8",
    first: str | WeightCodec | None = None,
    last: str | WeightCodec | None = None,
):
    """A recipe with one codec pair on every Conv2d/Linear layer, the first and last layers
    optionally with other weight codecs (their activations: int8, or float when
    ``activations`` is float)."""
    from .recipes import Recipe, Rule

    rules = [Rule(parse_weight_codec(weights), activations, select="all")]
    edge_act = "float" if activations in ("float", "fp32") else "int8"
    if first is not None:
        rules.append(Rule(parse_weight_codec(first), edge_act, select="first"))
    if last is not None:
        rules.append(Rule(parse_weight_codec(last), edge_act, select="last"))
    return Recipe("ptq", rules)


def _batches(images: Tensor, batch_size: int) -> Iterator[Tensor]:
    for i in range(0, len(images), batch_size):
        yield images[i : i + batch_size]


def _quant_layers(model: nn.Module) -> list[tuple[str, QuantConv2d | QuantLinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantConv2d | QuantLinear)]


@contextlib.contextmanager
def activations_in_float(model: nn.Module):
    """Within the block, every activation quantizer passes its input through unchanged."""
    saved = [(q, q.codec) for q in model.modules() if isinstance(q, ActQuantizer)]
    try:
        for q, _ in saved:
            q.codec = FloatAct()
        yield
    finally:
        for q, codec in saved:
            q.codec = codec


def correct_batchnorm(model: nn.Module, images: Tensor, batch_size: int = 128) -> int:
    """Re-estimate the running statistics of every trained BatchNorm on ``images`` (float
    input batch, already normalized), activations in float. Returns how many were reset."""
    with activations_in_float(model):
        return reestimate_batchnorm(model, _batches(images, batch_size))


class _RangeObserver:
    """Magnitude statistics of one quantizer's input: max, sign, and (second pass) a
    histogram of the non-zero magnitudes over [0, max]."""

    def __init__(self, bins: int):
        self.bins = bins
        self.max = 0.0
        self.negative = False
        self.hist: Tensor | None = None

    def first_pass(self, x: Tensor) -> None:
        x = x.detach()
        lo, hi = torch.aminmax(x)
        self.negative = self.negative or bool(lo < 0)
        self.max = max(self.max, float(hi), float(-lo))

    def second_pass(self, x: Tensor) -> None:
        if self.max <= 0:
            return
        mag = x.detach().float()
        mag = mag.abs() if self.negative else mag.clamp_min(0)
        mag = mag[mag > 0]
        h = torch.histc(mag, bins=self.bins, min=0.0, max=self.max).double()
        self.hist = h if self.hist is None else self.hist + h

    def clip(self, calib: Calibration, qmax: int) -> float:
        if self.max <= 0:
            return 1e-8 * qmax  # an input that was always zero: any scale is exact
        if calib.method == "minmax" or self.hist is None or float(self.hist.sum()) == 0:
            return self.max
        h = self.hist
        width = self.max / self.bins
        edges = torch.arange(1, self.bins + 1, dtype=torch.float64) * width  # upper edges
        if calib.method == "percentile":
            cum = torch.cumsum(h, 0) / h.sum()
            i = int(torch.searchsorted(cum, torch.tensor(calib.percentile / 100.0).double()))
            return float(edges[min(i, self.bins - 1)])
        return _mse_clip(h, edges, width, qmax)


def _mse_clip(h: Tensor, edges: Tensor, width: float, qmax: int, candidates: int = 256) -> float:
    """The histogram's clip value with the least expected squared quantization error."""
    centers = edges - width / 2
    n = len(edges)
    idx = torch.unique(torch.linspace(n // 100, n - 1, candidates).round().long())
    cands = edges[idx]  # (C,)
    s = cands / qmax
    inside = centers[None, :] <= cands[:, None]  # (C, B)
    round_err = (h[None, :] * inside).sum(1) * s**2 / 12
    clip_err = (h[None, :] * (~inside) * (centers[None, :] - cands[:, None]) ** 2).sum(1)
    return float(cands[int(torch.argmin(round_err + clip_err))])


@torch.no_grad()
def calibrate_activations(
    model: nn.Module, images: Tensor, calib: Calibration | None = None
) -> dict[str, dict[str, Any]]:
    """Set the scale (and sign) of every int8 activation quantizer of ``model`` from
    ``images`` (see the module docstring). Returns per layer: signed, max, clip, scale."""
    calib = calib or Calibration()
    layers = [(n, m) for n, m in _quant_layers(model) if isinstance(m.act.codec, Int8Act)]
    if not layers:
        return {}
    obs = {n: _RangeObserver(calib.bins) for n, _ in layers}
    passes = ["first_pass"] if calib.method == "minmax" else ["first_pass", "second_pass"]
    was_training = model.training
    model.eval()
    try:
        for which in passes:
            handles = [
                m.register_forward_pre_hook(
                    lambda mod, args, o=obs[n], w=which: getattr(o, w)(args[0])
                )
                for n, m in layers
            ]
            try:
                with activations_in_float(model):
                    for x in _batches(images, calib.batch_size):
                        model(x)
            finally:
                for hd in handles:
                    hd.remove()
    finally:
        model.train(was_training)
    report: dict[str, dict[str, Any]] = {}
    for name, m in layers:
        q, o = m.act, obs[name]
        signed = o.negative if q.codec.signed is None else bool(q.codec.signed)
        if q.codec.signed is False and o.negative:
            o.negative = False  # an unsigned codec clips negatives: calibrate on x >= 0
        qmax = 127 if signed else 255
        clip = o.clip(calib, qmax)
        scale = clip / qmax
        q.signed_flag.fill_(1.0 if signed else 0.0)
        q.scale.fill_(scale)
        if hasattr(q, "lsq_scale"):
            q.lsq_scale.fill_(scale)
        q._sign_cache = None
        report[name] = {"signed": signed, "max": o.max, "clip": clip, "scale": scale}
    return report


def ptq_(
    model: nn.Module,
    recipe,
    images: Tensor,
    calibration: Calibration | None = None,
    example_input: Tensor | None = None,
) -> dict[str, Any]:
    """Post-training quantization, in place: ``compress_`` ``model`` with ``recipe`` (a
    Recipe or a method name), re-estimate BatchNorm (``calibration.bn_correct``) and
    calibrate the int8 activations on ``images`` (a float batch as the model takes it:
    normalized, N x C x H x W). Leaves the model in eval mode, ready for ``freeze``.
    A model already compressed (quantized layers in it) is only calibrated. Returns what
    was done (per-layer ranges, BatchNorms re-estimated)."""
    from .recipes import compress_

    calib = calibration or Calibration()
    if not isinstance(images, Tensor) or images.ndim < 2 or len(images) == 0:
        raise ValueError("PTQ needs a non-empty float batch of calibration images")
    if not images.is_floating_point():
        raise ValueError(
            f"calibration images must be float (normalized as the model expects), got "
            f"{images.dtype}; apply the data set's test transform first"
        )
    if example_input is None:
        example_input = images[:1]
    if not any(isinstance(m, QuantConv2d | QuantLinear) for m in model.modules()):
        compress_(model, recipe, example_input)
    bn_correct = calib.bn_correct
    if bn_correct is None:
        bn_correct = any(m.weight_codec.weight_bits() < 8 for _, m in _quant_layers(model))
    n_bn = correct_batchnorm(model, images, calib.batch_size) if bn_correct else 0
    ranges = calibrate_activations(model, images, calib)
    model.eval()
    return {"calibration": calib.to_dict(), "batchnorms_reestimated": n_bn, "ranges": ranges,
            "calibration_images": len(images)}  # fmt: skip
