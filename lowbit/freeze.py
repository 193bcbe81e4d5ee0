"""Freeze: a trained (QAT) model becomes integer codes + scales, run by a reference executor.

``lowbit.freeze(model)`` traces the model with ``torch.fx`` (leaves it untouched) and
turns it into a ``FrozenModel``: an ordered list of ops over named tensors, each op
holding only plain tensors and JSON-able attributes (so the packed file needs no pickle).

What a frozen conv/linear layer computes
----------------------------------------
Every weight codec is brought to one *integer form* ``w[c, ...] = scale[c] * code[c, ...]
(+ offset[c])``: int8/ternary/fixed-point codes with their scale, binary {0, beta} as
codes {0, 1}, binary ±a as {-1, +1}, binary {alpha, beta} as {-1, +1} with an offset.
BatchNorm (eval statistics) that follows the layer is folded in:
``g = gamma / sqrt(var + eps)``, ``out_scale = s_in * scale * g``, ``bias = g * (b - mean)
+ beta``.

The layer's input is quantized as its activation codec says (the ``quantize`` op):
``int8``: ``q = clamp(round_half_even(x / s_in), lo, hi)`` in float32, exactly as in QAT;
``sign``: ``q = +1 if x > 0 else -1`` (``s_in = 1``). Zero padding stays 0. Then:

- integer path (integer input and integer codes): ``acc = sum(q * code)`` exactly (the
  executor emulates the int32 accumulator in float64, exact below 2**53);
  - output float (the default): ``y = float32(acc) * out_scale[c] + bias[c]`` as two
    separately rounded float32 operations (plus ``offset_scale[c] * float32(sum(q))``
    for an offset);
  - output int8 (*fused requantization*, when the layer's output reaches exactly one
    int8-quantized layer through ReLU / ReLU6 / clamp / max-pool / flatten only):
    ``q_next = requantize(acc, m[c], n[c], lo, hi, bias=bias_q[c], pre_shift=b)``
    (``lowbit.requant``: ``M = out_scale / s_next`` as a 24-bit integer multiplier and a
    shift, round half away from zero; the bias in accumulator units with ``b`` extra
    fraction bits, ``bias_q = round(bias / out_scale * 2**b)``, ``b`` as large as int64
    allows, at most 16: rounding the bias to whole accumulator units, as TFLite does,
    moved 8% of one MobileNet layer's outputs by one step; the activation's clamp folded
    into ``[lo, hi]``). The next layer then takes ``q_next`` as its codes directly.
- float path (float input or float codes): ``y = conv(x, code) * out_scale + bias`` in
  float32 (``out_scale`` then excludes ``s_in``).

Everything else (residual additions, average pooling, BatchNorm not after a conv) runs
in float32 on dequantized values, as in QAT. The frozen model takes the QAT model's input
(float32 NCHW, normalized as in training) and returns its float32 logits.
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .codecs import (
    Binary,
    FixedPoint,
    Float,
    FloatAct,
    Int,
    Int8Act,
    SignAct,
    Ternary,
    WeightCodec,
)
from .layers import QuantConv2d, QuantLinear
from .requant import quantize_multiplier, requantize

__all__ = ["FreezeError", "FrozenModel", "FrozenOp", "freeze", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_ACC_LIMIT = 2**31 - 1
_MULT_BITS = 24  # significant bits of the fused requantization multiplier


class FreezeError(ValueError):
    """The model cannot be frozen (an unsupported op, an untrained quantizer, ...)."""


@dataclass
class FrozenOp:
    """One op of the frozen graph: ``kind`` (see ``KINDS``), input and output tensor
    names, JSON-able ``attrs`` and named ``tensors``."""

    kind: str
    name: str
    inputs: list[str]
    output: str
    attrs: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "inputs": list(self.inputs),
            "output": self.output,
            "attrs": self.attrs,
            "tensors": {k: [str(v.dtype).removeprefix("torch."), list(v.shape)]
                        for k, v in self.tensors.items()},
        }  # fmt: skip


KINDS = (
    "quantize", "conv", "linear", "affine", "relu", "clamp", "maxpool", "avgpool", "gap",
    "flatten", "reshape", "add", "cat", "pad", "slice",
)  # fmt: skip


# ----------------------------------------------------------------------------- integer form


def integer_form(codec: WeightCodec, weight: Tensor, params: dict[str, Tensor]):
    """``(codes, scale, offset, is_int)`` with ``w = scale[c] * codes + offset[c]``.

    ``codes`` is an integer tensor when ``is_int`` (else float32 weights, scale 1);
    ``scale`` per output channel; ``offset`` per output channel or ``None``.
    """
    out = weight.shape[0]
    w = weight.detach()
    if isinstance(codec, Float):  # fp16 weights are stored (and so run) as fp16
        w = w.half() if codec.bits == 16 else w
        return w.float().clone(), torch.ones(out), None, False
    enc = codec.encode(w, params)

    def per_channel(t: Tensor) -> Tensor:
        t = t.detach().float().flatten()
        return t.expand(out).clone() if t.numel() == 1 else t.clone()

    if isinstance(codec, Int | Ternary):
        return enc.codes.to(torch.int32), per_channel(enc.params["scale"]), None, True
    if isinstance(codec, FixedPoint):
        return enc.codes.to(torch.int32), torch.full((out,), 2.0**-codec.fraction_bits), None, True
    if isinstance(codec, Binary):
        alpha, beta = per_channel(enc.params["alpha"]), per_channel(enc.params["beta"])
        bits = enc.codes.to(torch.int32)
        if torch.all(alpha == 0):  # {0, beta}
            return bits, beta, None, True
        signs = 2 * bits - 1
        half = (beta - alpha) / 2
        mid = (beta + alpha) / 2
        return signs, half, (None if torch.all(mid == 0) else mid), True
    # any other codec: the generic rule (integer codes + a "scale"), else decoded floats
    if set(enc.params) == {"scale"} and not enc.codes.is_floating_point():
        return enc.codes.to(torch.int32), per_channel(enc.params["scale"]), None, True
    return codec.decode(enc).float(), torch.ones(out), None, False


def _small_int(t: Tensor) -> Tensor:
    lo, hi = int(t.min()), int(t.max())
    for dt in (torch.int8, torch.int16):
        info = torch.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return t.to(dt)
    return t.to(torch.int32)


# ----------------------------------------------------------------------------- the model


class FrozenModel:
    """Integer codes + scales and a reference executor (PyTorch, integer arithmetic
    emulated exactly). Call it like the QAT model: float32 NCHW in, float32 logits out."""

    def __init__(
        self, ops: list[FrozenOp], input_name: str, output_name: str, meta: dict | None = None
    ):
        self.ops = ops
        self.input_name = input_name
        self.output_name = output_name
        self.meta = dict(meta or {})

    # -- execution

    def __call__(self, x: Tensor) -> Tensor:
        return self.forward(x)

    @torch.no_grad()
    def forward(self, x: Tensor, keep: bool = False) -> Tensor | dict[str, Tensor]:
        """Run the graph on ``x``; with ``keep`` return every intermediate tensor."""
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("FrozenModel expects a float tensor (N, C, H, W) or (N, features)")
        shape = self.meta.get("input_shape")
        if shape is not None and list(x.shape[1:]) != list(shape):
            raise ValueError(
                f"input of shape {list(x.shape)} does not match the model's input shape "
                f"[N, {', '.join(map(str, shape))}]"
            )
        env: dict[str, Tensor] = {self.input_name: x.detach().float().cpu()}
        for op in self.ops:
            env[op.output] = _EXEC[op.kind](op, [env[i] for i in op.inputs])
        return env if keep else env[self.output_name]

    @torch.no_grad()
    def predict(self, x: Tensor, batch_size: int = 256) -> Tensor:
        return torch.cat(
            [self(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]
        )

    # -- inspection

    def layers(self) -> list[FrozenOp]:
        return [op for op in self.ops if op.kind in ("conv", "linear")]

    def graph(self) -> dict[str, Any]:
        """The JSON-able description (ops, attrs, tensor names/dtypes/shapes, meta)."""
        return {
            "format_version": FORMAT_VERSION,
            "input": self.input_name,
            "output": self.output_name,
            "ops": [op.describe() for op in self.ops],
            "meta": self.meta,
        }

    def tensors(self) -> dict[str, Tensor]:
        """Every tensor, keyed ``"<op name>/<tensor name>"``."""
        return {f"{op.name}/{k}": v for op in self.ops for k, v in op.tensors.items()}

    @classmethod
    def from_parts(cls, graph: dict[str, Any], tensors: dict[str, Tensor]) -> FrozenModel:
        """Inverse of ``graph()`` + ``tensors()`` (used by the file loader). Checks the
        graph's structure: op kinds, names, that every input is defined before use and
        every tensor exists with the shape the graph says."""
        if not isinstance(graph, dict):
            raise FreezeError("frozen graph is not a JSON object")
        version = graph.get("format_version")
        if version != FORMAT_VERSION:
            raise FreezeError(f"frozen graph version {version!r} is not {FORMAT_VERSION}")
        ops_in = graph.get("ops")
        if not isinstance(ops_in, list) or not ops_in:
            raise FreezeError("frozen graph has no ops")
        inp, out = graph.get("input"), graph.get("output")
        if not isinstance(inp, str) or not isinstance(out, str):
            raise FreezeError("frozen graph: input and output must be names")
        defined = {inp}
        ops = []
        for i, d in enumerate(ops_in):
            where = f"frozen graph op {i}"
            if not isinstance(d, dict):
                raise FreezeError(f"{where}: not an object")
            kind, name, output = d.get("kind"), d.get("name"), d.get("output")
            inputs, attrs, tdesc = d.get("inputs"), d.get("attrs"), d.get("tensors")
            if kind not in KINDS:
                raise FreezeError(f"{where}: unknown op kind {kind!r}")
            if not isinstance(name, str) or not isinstance(output, str):
                raise FreezeError(f"{where}: name and output must be strings")
            if not isinstance(attrs, dict) or not isinstance(tdesc, dict):
                raise FreezeError(f"{where} ({name}): attrs and tensors must be objects")
            if not isinstance(inputs, list) or not all(isinstance(v, str) for v in inputs):
                raise FreezeError(f"{where} ({name}): inputs must be a list of names")
            missing = [v for v in inputs if v not in defined]
            if missing:
                raise FreezeError(f"{where} ({name}): input {missing[0]!r} is not defined before")
            defined.add(output)
            ts = {}
            for k, spec in tdesc.items():
                key = f"{name}/{k}"
                if key not in tensors:
                    raise FreezeError(f"frozen graph: tensor {key!r} missing")
                t = tensors[key]
                if isinstance(spec, list) and len(spec) == 2 and list(t.shape) != spec[1]:
                    raise FreezeError(f"tensor {key!r} has shape {list(t.shape)}, the graph "
                                      f"says {spec[1]}")  # fmt: skip
                ts[k] = t
            _check_op(kind, attrs, ts, f"{where} ({name})")
            ops.append(FrozenOp(kind, name, list(inputs), output, dict(attrs), ts))
        if out not in defined:
            raise FreezeError(f"frozen graph: output {out!r} is never computed")
        meta = graph.get("meta", {})
        return cls(ops, inp, out, meta if isinstance(meta, dict) else {})

    def summary(self) -> str:
        lines = []
        for op in self.ops:
            a = op.attrs
            extra = ""
            if op.kind in ("conv", "linear"):
                extra = f" {a['path']} path, out {a['out']}, w={a['weight_codec']['_type']}"
            lines.append(f"{op.output:<28} = {op.kind}({', '.join(op.inputs)}){extra}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        n = len(self.layers())
        return f"FrozenModel({len(self.ops)} ops, {n} conv/linear layers)"


# ----------------------------------------------------------------------------- executor


def _acc(op: FrozenOp, q: Tensor, codes: Tensor) -> Tensor:
    """Exact integer accumulation (float64 emulation of int32), returned as int64."""
    a = op.attrs
    if op.kind == "conv":
        y = F.conv2d(q.double(), codes.double(), None, a["stride"], a["padding"], a["dilation"],
                     a["groups"])  # fmt: skip
    else:
        y = F.linear(q.double(), codes.double())
    return y.round().to(torch.int64)


def _channel(t: Tensor, ndim: int) -> Tensor:
    return t.reshape([1, -1] + [1] * (ndim - 2))


def _exec_layer(op: FrozenOp, inputs: list[Tensor]) -> Tensor:
    (x,) = inputs
    a, t = op.attrs, op.tensors
    if a["path"] == "int":
        acc = _acc(op, x, t["codes"])
        if a["out"] == "int":
            return requantize(acc, t["m"], t["n"], a["lo"], a["hi"], bias=t["bias_q"],
                              pre_shift=a["pre_shift"])  # fmt: skip
        y = acc.float() * _channel(t["out_scale"], acc.dim())
        if "offset_scale" in t:
            s = _acc(op, x, torch.ones_like(t["codes"]))
            y = y + s.float() * _channel(t["offset_scale"], acc.dim())
        return y + _channel(t["bias"], y.dim())
    w = t["codes"].float()
    xin = x.float()
    if op.kind == "conv":
        y = F.conv2d(xin, w, None, a["stride"], a["padding"], a["dilation"], a["groups"])
    else:
        y = F.linear(xin, w)
    y = y * _channel(t["out_scale"], y.dim())
    if "offset_scale" in t:
        ones = torch.ones_like(w)
        if op.kind == "conv":
            s = F.conv2d(xin, ones, None, a["stride"], a["padding"], a["dilation"], a["groups"])
        else:
            s = F.linear(xin, ones)
        y = y + s * _channel(t["offset_scale"], y.dim())
    return y + _channel(t["bias"], y.dim())


def _exec_quantize(op: FrozenOp, inputs: list[Tensor]) -> Tensor:
    (x,) = inputs
    a = op.attrs
    if a["mode"] == "sign":
        return torch.where(x > 0, 1, -1).to(torch.int64)
    s = torch.tensor(a["scale"], dtype=torch.float32)
    return torch.clamp(torch.round(x.float() / s), a["lo"], a["hi"]).to(torch.int64)


def _exec_maxpool(op, inputs):
    (x,) = inputs
    a = op.attrs
    is_int = not x.is_floating_point()
    y = F.max_pool2d(x.double() if is_int else x, a["kernel"], a["stride"], a["padding"],
                     a["dilation"], ceil_mode=a["ceil_mode"])  # fmt: skip
    return y.to(torch.int64) if is_int else y


def _exec_avgpool(op, inputs):
    a = op.attrs
    return F.avg_pool2d(inputs[0], a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                        a["count_include_pad"])  # fmt: skip


def _exec_gap(op, inputs):
    y = inputs[0].mean(dim=(2, 3), keepdim=True)
    return y if op.attrs.get("keepdim", True) else y.flatten(1)


def _exec_slice(op, inputs):
    (x,) = inputs
    idx = tuple(slice(*s) for s in op.attrs["slices"])
    return x[idx]


_EXEC = {
    "quantize": _exec_quantize,
    "conv": _exec_layer,
    "linear": _exec_layer,
    "affine": lambda op, i: (
        i[0] * _channel(op.tensors["scale"], i[0].dim()) + _channel(op.tensors["shift"], i[0].dim())
    ),
    "relu": lambda op, i: torch.relu(i[0]),
    "clamp": lambda op, i: (
        torch.clamp(i[0], op.attrs["min"], op.attrs["max"])
        if op.attrs["min"] is not None or op.attrs["max"] is not None
        else i[0]
    ),
    "maxpool": _exec_maxpool,
    "avgpool": _exec_avgpool,
    "gap": _exec_gap,
    "flatten": lambda op, i: torch.flatten(i[0], op.attrs["start_dim"], op.attrs["end_dim"]),
    "reshape": lambda op, i: i[0].reshape([i[0].shape[0]] + op.attrs["shape"]),
    "add": lambda op, i: i[0] + i[1],
    "cat": lambda op, i: torch.cat(i, dim=op.attrs["dim"]),
    "pad": lambda op, i: F.pad(i[0], op.attrs["pad"], value=op.attrs["value"]),
    "slice": _exec_slice,
}


# ----------------------------------------------------------------------------- tracing


_LEAVES = (
    QuantConv2d, QuantLinear, nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU,
    nn.ReLU6, nn.Hardtanh, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Flatten,
    nn.Dropout, nn.Identity,
)  # fmt: skip


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _pair(v) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [int(v), int(v)]


class _Builder:
    """fx graph + example values -> frozen ops."""

    def __init__(self, model: nn.Module, gm: fx.GraphModule, values: dict[str, Any]):
        self.model = model
        self.modules = dict(gm.named_modules())
        self.values = values
        self.ops: list[FrozenOp] = []
        self.alias: dict[str, str] = {}  # fx node name -> tensor name it equals
        self.users: dict[str, int] = {}

    def name(self, node) -> str:
        return self.alias.get(node.name, node.name)

    def emit(self, kind, node, inputs, attrs=None, tensors=None) -> None:
        self.ops.append(FrozenOp(kind, node.name, [self.name(i) for i in inputs], node.name,
                                 attrs or {}, tensors or {}))  # fmt: skip

    def where(self, node) -> str:
        target = (
            node.target
            if isinstance(node.target, str)
            else getattr(node.target, "__name__", node.target)
        )
        return f"{node.op} {target} (node {node.name})"

    def unsupported(self, node, why: str = "") -> FreezeError:
        return FreezeError(
            f"freeze cannot handle {self.where(node)}{': ' + why if why else ''}. Supported: "
            "conv/linear (quantized or not), BatchNorm, ReLU/ReLU6/Hardtanh, max/avg pooling, "
            "global average pooling, flatten/view/reshape, add, cat, constant pad, slicing"
        )

    def convert(self, node) -> None:
        val = self.values.get(node.name)
        if node.op == "call_module":
            self.module(node, self.modules[node.target])
        elif node.op in ("call_function", "call_method"):
            self.function(node, val)
        elif node.op == "get_attr":
            raise self.unsupported(node, "parameters used outside a layer")
        else:
            raise self.unsupported(node)

    def tensor_args(self, node) -> list:
        return [
            a
            for a in node.args
            if isinstance(a, fx.Node) and isinstance(self.values.get(a.name), Tensor)
        ]

    def module(self, node, m: nn.Module) -> None:
        x = node.args[0]
        if isinstance(m, nn.Conv2d | nn.Linear):
            self.layer(node, m)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            g, shift = _bn_affine(m)
            self.emit("affine", node, [x], {"source": "batchnorm"}, {"scale": g, "shift": shift})
        elif isinstance(m, nn.ReLU):
            self.emit("relu", node, [x])
        elif isinstance(m, nn.ReLU6):
            self.emit("clamp", node, [x], {"min": 0.0, "max": 6.0})
        elif isinstance(m, nn.Hardtanh):
            self.emit("clamp", node, [x], {"min": float(m.min_val), "max": float(m.max_val)})
        elif isinstance(m, nn.MaxPool2d):
            self.emit("maxpool", node, [x], {
                "kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                "padding": _pair(m.padding), "dilation": _pair(m.dilation),
                "ceil_mode": bool(m.ceil_mode),
            })  # fmt: skip
        elif isinstance(m, nn.AvgPool2d):
            self.emit("avgpool", node, [x], {
                "kernel": _pair(m.kernel_size), "stride": _pair(m.stride or m.kernel_size),
                "padding": _pair(m.padding), "ceil_mode": bool(m.ceil_mode),
                "count_include_pad": bool(m.count_include_pad),
            })  # fmt: skip
            if m.divisor_override:
                raise self.unsupported(node, "divisor_override")
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            if _pair(m.output_size) != [1, 1]:
                raise self.unsupported(node, "adaptive pooling to a size other than 1x1")
            self.emit("gap", node, [x], {"keepdim": True})
        elif isinstance(m, nn.Flatten):
            self.emit("flatten", node, [x], {"start_dim": m.start_dim, "end_dim": m.end_dim})
        elif isinstance(m, nn.Dropout | nn.Identity):
            self.alias[node.name] = self.name(x)
        else:
            raise self.unsupported(node, f"module type {type(m).__name__}")

    def function(self, node, val) -> None:
        t = node.target
        targs = self.tensor_args(node)
        if not isinstance(val, Tensor):
            return  # sizes, shapes and other static values: only their consumers matter
        if node.op == "call_method":
            name = t
        else:
            name = getattr(t, "__name__", str(t))
        if t in (operator.add, torch.add) or name in ("add", "__add__", "iadd"):
            if len(targs) != 2 or len(node.args) != 2 or node.kwargs:
                raise self.unsupported(node, "only tensor + tensor additions")
            self.emit("add", node, targs)
        elif name in ("relu", "relu_"):
            self.emit("relu", node, targs[:1])
        elif name in ("relu6",):
            self.emit("clamp", node, targs[:1], {"min": 0.0, "max": 6.0})
        elif name in ("hardtanh", "clamp", "clip"):
            self.emit("clamp", node, targs[:1], _clamp_attrs(node, name))
        elif name in ("flatten",):
            x = self.values[node.args[0].name]
            start = node.kwargs.get("start_dim", node.args[1] if len(node.args) > 1 else 0)
            if start == 0 or (start < 0 and start + x.dim() == 0):
                raise self.unsupported(node, "flattening the batch dimension")
            self.emit("reshape", node, targs[:1], {"shape": list(val.shape[1:])})
        elif name in ("view", "reshape", "contiguous", "squeeze", "unsqueeze"):
            if val.shape[0] != self.values[targs[0].name].shape[0]:
                raise self.unsupported(node, "a reshape that changes the batch dimension")
            self.emit("reshape", node, targs[:1], {"shape": list(val.shape[1:])})
        elif name in ("cat", "concat"):
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            parts = node.args[0]
            if dim == 0 or not all(isinstance(p, fx.Node) for p in parts):
                raise self.unsupported(node, "cat along the batch dimension")
            self.emit("cat", node, list(parts), {"dim": int(dim)})
        elif name == "pad":
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
            if mode != "constant":
                raise self.unsupported(node, f"pad mode {mode!r}")
            pad = node.kwargs.get("pad", node.args[1])
            value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else 0.0)
            self.emit("pad", node, targs[:1], {"pad": list(pad), "value": float(value or 0.0)})
        elif name == "getitem":
            self.emit("slice", node, targs[:1], {"slices": _slices(node, self)})
        elif name in ("max_pool2d", "avg_pool2d"):
            self.emit(name[:3] + "pool", node, targs[:1], _pool_attrs(node, name))
        elif name in ("adaptive_avg_pool2d",):
            if _pair(node.args[1]) != [1, 1]:
                raise self.unsupported(node, "adaptive pooling to a size other than 1x1")
            self.emit("gap", node, targs[:1], {"keepdim": True})
        elif name == "mean":
            dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
            keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
            dims = [dims] if isinstance(dims, int) else dims
            x_dim = self.values[targs[0].name].dim()
            if dims is None or x_dim != 4 or sorted(d % 4 for d in dims) != [2, 3]:
                raise self.unsupported(node, "mean over dimensions other than (2, 3)")
            self.emit("gap", node, targs[:1], {"keepdim": bool(keep)})
        elif name in ("dropout",):
            self.alias[node.name] = self.name(targs[0])
        else:
            raise self.unsupported(node)

    def layer(self, node, m: nn.Module) -> None:
        x = node.args[0]
        quant = isinstance(m, QuantConv2d | QuantLinear)
        wc = m.weight_codec if quant else Float()
        ac = m.act.codec if quant else FloatAct()
        params = dict(m.codec_params) if quant else {}
        codes, scale, offset, is_int = integer_form(wc, m.weight, params)
        attrs: dict[str, Any] = {
            "module": node.target,
            "weight_codec": wc.to_dict(),
            "act_codec": ac.to_dict(),
            "weight_shape": list(m.weight.shape),
            "has_bias": m.bias is not None,
            "in_shape": list(self.values[x.name].shape[1:]),
            "out_shape": list(self.values[node.name].shape[1:]),
        }
        if isinstance(m, nn.Conv2d):
            attrs.update(stride=_pair(m.stride), padding=_pair(m.padding),
                         dilation=_pair(m.dilation), groups=int(m.groups))  # fmt: skip
            if m.padding_mode != "zeros":
                raise self.unsupported(node, f"padding_mode {m.padding_mode!r}")
        inputs = [x]
        s_in = 1.0
        if isinstance(ac, Int8Act | SignAct):
            if isinstance(ac, Int8Act):
                s_in = float(m.act.scale)
                if not s_in > 0:
                    raise FreezeError(
                        f"layer {node.target}: its int8 activation scale was never set; train "
                        "or calibrate the model (run it on data in train mode) before freezing"
                    )
                s_in = max(s_in, 1e-8)  # as in QAT
                lo, hi = m.act.qrange()
                qattrs = {"mode": "int8", "scale": s_in, "lo": lo, "hi": hi}
            else:
                qattrs = {"mode": "sign", "scale": 1.0, "lo": -1, "hi": 1}
            qname = f"{node.name}.quantize"
            self.ops.append(FrozenOp("quantize", qname, [self.name(x)], qname, qattrs))
            inputs = []
            attrs["in_quant"] = qattrs
            attrs["path"] = "int" if is_int else "float"
        else:
            attrs["path"] = "float"
            attrs["in_quant"] = None
        # a quantized input is dequantized by s_in: fold it into the output scale
        mult = s_in if attrs["in_quant"] is not None else 1.0
        bias = m.bias.detach().float().clone() if m.bias is not None else torch.zeros(len(scale))
        tensors = {
            "codes": _small_int(codes) if is_int else codes,
            "out_scale": (scale * mult).float(),
            "bias": bias,
        }
        if offset is not None:
            tensors["offset_scale"] = (offset * mult).float()
        attrs["out"] = "float"
        src = [self.ops[-1].output] if not inputs else [self.name(x)]
        self.ops.append(FrozenOp("linear" if isinstance(m, nn.Linear) else "conv", node.name,
                                 src, node.name, attrs, tensors))  # fmt: skip

    # -- passes

    def fold_bn(self, gm: fx.GraphModule) -> None:
        """Fold an 'affine' (BatchNorm) op into the conv/linear that is its only producer
        and whose output nobody else reads."""
        readers: dict[str, int] = {}
        for op in self.ops:
            for i in op.inputs:
                readers[i] = readers.get(i, 0) + 1
        by_out = {op.output: op for op in self.ops}
        keep = []
        for op in self.ops:
            if op.kind == "affine" and op.attrs.get("source") == "batchnorm":
                src = by_out.get(op.inputs[0])
                if src is not None and src.kind in ("conv", "linear") and readers[src.output] == 1:
                    g, shift = op.tensors["scale"], op.tensors["shift"]
                    t = src.tensors
                    t["out_scale"] = t["out_scale"] * g
                    t["bias"] = t["bias"] * g + shift
                    if "offset_scale" in t:
                        t["offset_scale"] = t["offset_scale"] * g
                    src.attrs["folded_batchnorm"] = op.name
                    self.alias_output(op.output, src.output)
                    continue
            keep.append(op)
        self.ops = keep

    def alias_output(self, old: str, new: str) -> None:
        for op in self.ops:
            op.inputs = [new if i == old else i for i in op.inputs]
        if self.output == old:
            self.output = new

    def fuse_requant(self) -> None:
        """Mark integer layers whose output reaches one int8-quantized layer through
        ReLU/ReLU6/clamp/max-pool/flatten only: they emit int8 codes directly."""
        readers: dict[str, list[FrozenOp]] = {}
        for op in self.ops:
            for i in op.inputs:
                readers.setdefault(i, []).append(op)
        for op in list(self.ops):
            if op.kind not in ("conv", "linear") or op.attrs["path"] != "int":
                continue
            if "offset_scale" in op.tensors or op.output == self.output:
                continue
            chain, cur = [], op.output
            while True:
                rs = readers.get(cur, [])
                if len(rs) != 1 or cur == self.output:
                    break
                nxt = rs[0]
                if nxt.kind in ("relu", "clamp", "maxpool", "flatten", "reshape"):
                    chain.append(nxt)
                    cur = nxt.output
                    continue
                break
            rs = readers.get(cur, [])
            if len(rs) != 1 or cur == self.output:
                continue
            q = rs[0]
            if q.kind != "quantize" or q.attrs["mode"] != "int8":
                continue
            s_next = q.attrs["scale"]
            lo, hi = q.attrs["lo"], q.attrs["hi"]
            for c in chain:
                if c.kind == "relu":
                    lo = max(lo, 0)
                elif c.kind == "clamp":
                    if c.attrs["min"] is not None:
                        lo = max(lo, _round_even(c.attrs["min"] / s_next))
                    if c.attrs["max"] is not None:
                        hi = min(hi, _round_even(c.attrs["max"] / s_next))
            if lo > hi:
                continue
            t = op.tensors
            out_scale = t["out_scale"].double()
            acc_bound = _acc_bound(t["codes"], op.attrs["in_quant"]).double()
            # a channel whose accumulator moves its output by less than 1/256 of a step is
            # a constant (e.g. a BatchNorm gamma near 0): treat it as dead, so the huge
            # bias / out_scale never enters the int64 arithmetic
            dead = (out_scale.abs() * acc_bound / s_next) < 2**-8
            safe = torch.where(dead, torch.ones_like(out_scale), out_scale)
            # the bias in accumulator units (a dead channel: acc = 0, M = 1, bias / s_next)
            bias_acc = torch.where(dead, t["bias"].double() / s_next, t["bias"].double() / safe)
            mult = torch.where(dead, torch.ones_like(out_scale), out_scale / s_next)
            codes = t["codes"].clone()
            codes[dead] = 0
            # keep |(acc * 2**b + bias) * m| < 2**61 with a 24-bit m, b extra bias bits;
            # a layer whose bound leaves no room keeps its float output instead
            bound = int(_acc_bound(codes, op.attrs["in_quant"]).max())
            bound += int(bias_acc.abs().max().ceil()) + 1
            room = 61 - _MULT_BITS - math.ceil(math.log2(bound + 1))
            if room < 0 or float(mult.abs().max()) >= 2**30:
                continue
            t["codes"] = codes
            pre_shift = min(16, room)
            m, n = quantize_multiplier((mult.abs() / 2**pre_shift).numpy(), bits=_MULT_BITS)
            m = torch.from_numpy(m) * torch.where(mult < 0, -1, 1)
            bias_q = bias_acc * 2**pre_shift
            t["bias_q"] = (torch.sign(bias_q) * torch.floor(bias_q.abs() + 0.5)).to(torch.int64)
            t["m"], t["n"] = m.to(torch.int32), torch.from_numpy(n).to(torch.int8)
            t["bias_q"] = (
                _small_int(t["bias_q"]) if t["bias_q"].abs().max() < 2**31 else t["bias_q"]
            )
            del t["out_scale"], t["bias"]  # the integer output needs only bias_q, m, n
            op.attrs.update(out="int", lo=int(lo), hi=int(hi), pre_shift=pre_shift,
                           out_scale_next=s_next)  # fmt: skip
            for c in chain:  # the clamp is inside [lo, hi] now
                if c.kind in ("relu", "clamp"):
                    self.ops.remove(c)
                    self.alias_output(c.output, c.inputs[0])
            # the consumer's quantize op is no longer needed
            self.ops.remove(q)
            self.alias_output(q.output, q.inputs[0])
            readers = {}
            for o in self.ops:
                for i in o.inputs:
                    readers.setdefault(i, []).append(o)

    def check_accumulators(self) -> None:
        for op in self.ops:
            if op.kind not in ("conv", "linear") or op.attrs["path"] != "int":
                continue
            worst = int(_acc_bound(op.tensors["codes"], op.attrs["in_quant"]).max())
            if worst > _ACC_LIMIT:
                raise FreezeError(
                    f"layer {op.attrs['module']}: the int32 accumulator could overflow (worst "
                    f"case {worst:,}); use fewer weight bits"
                )


def _acc_bound(codes: Tensor, in_quant: dict) -> Tensor:
    """Per output channel, the largest |accumulator| an integer layer can reach:
    sum |codes| times the largest input code (int64)."""
    amax = max(abs(in_quant["lo"]), abs(in_quant["hi"]))
    return codes.to(torch.int64).abs().flatten(1).sum(1) * amax


def _pool_attrs(node, name: str) -> dict[str, Any]:
    """Attributes of F.max_pool2d / F.avg_pool2d from the call's arguments."""
    order = (["kernel_size", "stride", "padding", "dilation", "ceil_mode"] if name == "max_pool2d"
             else ["kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
                   "divisor_override"])  # fmt: skip
    args = dict(zip(order, node.args[1:], strict=False))
    args.update({k: v for k, v in node.kwargs.items() if k in order})
    if any(isinstance(v, fx.Node) for v in args.values()):
        raise FreezeError(f"{name} with computed arguments (node {node.name})")
    kernel = _pair(args["kernel_size"])
    stride = _pair(args.get("stride") or kernel)
    attrs = {"kernel": kernel, "stride": stride, "padding": _pair(args.get("padding", 0)),
             "ceil_mode": bool(args.get("ceil_mode", False))}  # fmt: skip
    if name == "max_pool2d":
        attrs["dilation"] = _pair(args.get("dilation", 1))
        if node.kwargs.get("return_indices"):
            raise FreezeError(f"max_pool2d with return_indices (node {node.name})")
    else:
        if args.get("divisor_override"):
            raise FreezeError(f"avg_pool2d with divisor_override (node {node.name})")
        attrs["count_include_pad"] = bool(args.get("count_include_pad", True))
    return attrs


def _ints(v, n: int | None = None, low: int = 0) -> bool:
    if not isinstance(v, list) or (n is not None and len(v) != n):
        return False
    return all(isinstance(i, int) and not isinstance(i, bool) and i >= low for i in v)


def _num(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_op(kind: str, a: dict, ts: dict, where: str) -> None:
    """The attributes and tensors an op of ``kind`` needs, with their types (a loaded
    file must fail here, not later while running)."""
    bad = []

    def need(cond: bool, what: str) -> None:
        if not cond:
            bad.append(what)

    def tensors(*names: str) -> None:
        for n in names:
            need(n in ts, f"tensor {n}")

    if kind in ("conv", "linear"):
        need(a.get("path") in ("int", "float"), "path")
        need(a.get("out") in ("int", "float"), "out")
        if kind == "conv":
            for k in ("stride", "dilation"):
                need(_ints(a.get(k), 2, 1), k)
            need(_ints(a.get("padding"), 2), "padding")
            need(isinstance(a.get("groups"), int) and a.get("groups", 0) >= 1, "groups")
            for k in ("in_shape", "out_shape"):  # recorded by freeze; optional otherwise
                need(k not in a or _ints(a[k], 3, 1), k)
        tensors("codes")
        if a.get("out") == "int":
            tensors("m", "n", "bias_q")
            need(isinstance(a.get("pre_shift"), int) and 0 <= a.get("pre_shift", -1) <= 16,
                 "pre_shift")  # fmt: skip
            need(isinstance(a.get("lo"), int) and isinstance(a.get("hi"), int), "lo/hi")
            if "n" in ts and ts["n"].numel():
                need(int(ts["n"].min()) >= 1 and int(ts["n"].max()) <= 62, "n in 1..62")
        else:
            tensors("out_scale", "bias")
        q = a.get("in_quant")
        need(q is None or (isinstance(q, dict) and isinstance(q.get("lo"), int)
                           and isinstance(q.get("hi"), int)), "in_quant")  # fmt: skip
        for k in ("weight_codec", "act_codec"):  # parsed where used (cost, packing)
            need(isinstance(a.get(k), dict) and isinstance(a[k].get("_type"), str), k)
    elif kind == "quantize":
        need(a.get("mode") in ("int8", "sign"), "mode")
        need(_num(a.get("scale")) and a.get("scale", 0) > 0, "scale")
        need(isinstance(a.get("lo"), int) and isinstance(a.get("hi"), int), "lo/hi")
    elif kind == "clamp":
        need(all(a.get(k) is None or _num(a.get(k)) for k in ("min", "max")), "min/max")
    elif kind in ("maxpool", "avgpool"):
        need(_ints(a.get("kernel"), 2, 1) and _ints(a.get("stride"), 2, 1), "kernel/stride")
        need(_ints(a.get("padding"), 2), "padding")
        need(isinstance(a.get("ceil_mode"), bool), "ceil_mode")
        if kind == "maxpool":
            need(_ints(a.get("dilation"), 2, 1), "dilation")
        else:
            need(isinstance(a.get("count_include_pad"), bool), "count_include_pad")
    elif kind == "flatten":
        need(isinstance(a.get("start_dim"), int) and isinstance(a.get("end_dim"), int), "dims")
    elif kind == "reshape":
        need(_ints(a.get("shape"), None, -1), "shape")
    elif kind == "cat":
        need(isinstance(a.get("dim"), int), "dim")
    elif kind == "pad":
        need(_ints(a.get("pad"), None, -(2**31)) and _num(a.get("value")), "pad/value")
    elif kind == "slice":
        sl = a.get("slices")
        need(isinstance(sl, list) and all(
            isinstance(x, list) and len(x) == 3
            and all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in x)
            and x[2] != 0 for x in sl), "slices")  # fmt: skip
    elif kind == "affine":
        tensors("scale", "shift")
    elif kind == "gap":
        need(isinstance(a.get("keepdim", True), bool), "keepdim")
    if bad:
        raise FreezeError(f"{where}: missing or malformed {', '.join(bad)}")


def _round_even(v: float) -> int:
    return int(torch.round(torch.tensor(v, dtype=torch.float32)))


def _clamp_attrs(node, name) -> dict[str, float | None]:
    if name == "hardtanh":
        lo = node.kwargs.get("min_val", node.args[1] if len(node.args) > 1 else -1.0)
        hi = node.kwargs.get("max_val", node.args[2] if len(node.args) > 2 else 1.0)
    else:
        lo = node.kwargs.get("min", node.args[1] if len(node.args) > 1 else None)
        hi = node.kwargs.get("max", node.args[2] if len(node.args) > 2 else None)
    if not all(isinstance(v, int | float) or v is None for v in (lo, hi)):
        raise FreezeError(f"clamp bounds must be constants (node {node.name})")
    # a missing bound is stored as null (JSON has no infinity)
    return {"min": None if lo is None else float(lo), "max": None if hi is None else float(hi)}


def _slices(node, b: _Builder) -> list[list]:
    idx = node.args[1]
    if not isinstance(idx, tuple):
        idx = (idx,)
    x = b.values[node.args[0].name]
    out: list[list] = []
    for i, s in enumerate(idx):
        if s is Ellipsis:
            n_rest = len(idx) - i - 1
            out.extend([[None, None, None]] * (x.dim() - len(out) - n_rest))
            continue
        if not isinstance(s, slice) or any(
            isinstance(v, fx.Node) for v in (s.start, s.stop, s.step)
        ):
            raise b.unsupported(node, "only constant slices (no integer indexing)")
        out.append([s.start, s.stop, s.step])
    if out and out[0] != [None, None, None]:
        raise b.unsupported(node, "slicing the batch dimension")
    return out


def _bn_affine(m: nn.Module) -> tuple[Tensor, Tensor]:
    var, mean = m.running_var, m.running_mean
    if var is None or mean is None:
        raise FreezeError("BatchNorm without running statistics cannot be frozen")
    g = 1.0 / torch.sqrt(var.detach().float() + m.eps)
    shift = -mean.detach().float() * g
    if m.affine:
        g = g * m.weight.detach().float()
        shift = shift * m.weight.detach().float() + m.bias.detach().float()
    return g, shift


class _Recorder(fx.Interpreter):
    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n):
        out = super().run_node(n)
        self.values[n.name] = out
        return out


def freeze(
    model: nn.Module, example_input: Tensor | None = None, meta: dict[str, Any] | None = None
) -> FrozenModel:
    """The frozen (integer) form of a QAT model; ``model`` is left untouched.

    ``example_input``: a batch the model accepts (default: zeros of the model's
    ``default_input_shape``), used to trace shapes. ``meta`` is stored with the model
    (input shape, normalization, class names, provenance, ...).
    """
    from .recipes import _example_input

    for name, m in model.named_modules():
        if isinstance(m, QuantConv2d | QuantLinear) and isinstance(m.act.codec, Int8Act):
            unset_sign = float(m.act.signed_flag) < 0 and m.act.codec.signed is None
            if float(m.act.scale) <= 0 or unset_sign:
                raise FreezeError(
                    f"layer {name}: its int8 activation scale was never set; train or "
                    "calibrate the model (run it on data in train mode) before freezing"
                )
    x = _example_input(model, example_input)
    try:
        x = x[:1].detach().to("cpu").float()
    except Exception as e:  # pragma: no cover - odd example inputs
        raise FreezeError(f"bad example input: {e}") from None
    was_training = model.training
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    try:
        model.eval()
        try:
            graph = _Tracer().trace(model)
        except Exception as e:
            raise FreezeError(
                f"cannot trace {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
                "freeze needs a forward without data-dependent control flow"
            ) from None
        gm = fx.GraphModule(model, graph)
        rec = _Recorder(gm)
        with torch.no_grad():
            rec.run(x.to(device))
        b = _Builder(
            model, gm, {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in rec.values.items()}
        )
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise FreezeError("freeze supports models with exactly one input tensor")
        input_name = placeholders[0].name
        b.output = None
        for node in graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node):
                    raise FreezeError("freeze supports models with exactly one output tensor")
                b.output = b.name(out)
                continue
            b.convert(node)
        b.fold_bn(gm)
        b.fuse_requant()
        b.check_accumulators()
        # cpu copies of everything
        for op in b.ops:
            op.tensors = {k: v.detach().cpu().contiguous() for k, v in op.tensors.items()}
        info = dict(meta or {})
        info.setdefault("input_shape", list(x.shape[1:]))
        codec_ids = {id(p) for m in model.modules() if isinstance(m, QuantConv2d | QuantLinear)
                     for p in [*m.codec_params.values(), *m.act.parameters()]}  # fmt: skip
        info["fp_params"] = sum(p.numel() for p in model.parameters() if id(p) not in codec_ids)
        recipe = getattr(model, "lowbit_recipe", None)
        if recipe is not None:
            info.setdefault("recipe", recipe.to_dict())
        return FrozenModel(b.ops, input_name, b.output, json.loads(json.dumps(info)))
    finally:
        model.train(was_training)
