"""The cost model: per-layer parameters, storage, MACs, BOPs and energy.

Energy per operation: 45 nm, 0.9 V, M. Horowitz, "Computing's energy problem (and what
we can do about it)", ISSCC 2014, in picojoules. Values marked ``estimate`` are not in
that table (16-bit integer ops interpolated; a 1-bit XNOR+popcount MAC taken as the int8
add scaled per bit). Only arithmetic is billed (no memory traffic), as in the methods'
papers.

Conventions (``convention=``), printed with every result:
- ``operand-width`` (default): a MAC is a multiply plus an add at the operands' width;
  a ternary/binary-weight by integer-activation MAC is one add at the activation width,
  billed for every weight, zero or not (dense hardware).
- ``zero-skipping``: as the default, but MACs with a zero weight cost nothing.
- ``int32-accumulate``: every accumulation of an integer MAC is an int32 add.

Storage counts every stored tensor: weight codes at the codec's exact bits, per-channel
scales (fp32), biases (int32 for integer layers, fp32 otherwise; BatchNorm folded into
them), and each quantized input's scale. The baselines are the same model with every
parameter in fp32 (or fp16).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .codecs import Binary, Float, FloatAct, Int8Act, SignAct
from .layers import QuantConv2d, QuantLinear

#: picojoules per operation; (value, source)
ENERGY_PJ: dict[str, tuple[float, str]] = {
    "int8_add": (0.03, "Horowitz 2014"),
    "int8_mul": (0.2, "Horowitz 2014"),
    "int16_add": (0.05, "estimate: interpolated between int8 and int32"),
    "int16_mul": (0.8, "estimate: int8 multiply scaled by (16/8)^2"),
    "int32_add": (0.1, "Horowitz 2014"),
    "int32_mul": (3.1, "Horowitz 2014"),
    "fp16_add": (0.4, "Horowitz 2014"),
    "fp16_mul": (1.1, "Horowitz 2014"),
    "fp32_add": (0.9, "Horowitz 2014"),
    "fp32_mul": (3.7, "Horowitz 2014"),
    "xnor_popcount": (0.004, "estimate: int8 add scaled per bit (0.03/8)"),
}

CONVENTIONS = ("operand-width", "zero-skipping", "int32-accumulate")


def _e(op: str) -> float:
    return ENERGY_PJ[op][0]


def mac_energy(kind: str, act_bits: int, weight_bits: float, convention: str) -> float:
    """Energy of one MAC of the given arithmetic kind (see ``codecs.MAC_KINDS``)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown energy convention {convention!r}; valid: {CONVENTIONS}")
    if kind == "fp32_mac":
        return _e("fp32_mul") + _e("fp32_add")
    if kind == "fp16_mac":
        return _e("fp16_mul") + _e("fp16_add")
    if kind == "xnor":
        return _e("xnor_popcount")
    if kind == "none":
        return 0.0
    width = 8 if max(act_bits, weight_bits) <= 8 else 16
    add = _e("int32_add") if convention == "int32-accumulate" else _e(f"int{width}_add")
    if kind == "int_add":
        return add
    if kind == "int_mac":
        return _e(f"int{width}_mul") + add
    raise ValueError(f"unknown MAC kind {kind!r}")


@dataclass
class LayerCost:
    name: str
    kind: str  # conv | pointwise | depthwise | linear
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    weight_codec: str
    act_codec: str
    codec: str  # short label "weights/activations", e.g. "ternary/int8"
    params: int
    nonzero_params: int
    bits_per_weight: float
    storage_bits: float
    macs: int
    nonzero_macs: int
    bops: float
    mac_kind: str
    energy_pj: float
    fp32_energy_pj: float
    fp16_energy_pj: float

    def as_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["storage_bytes"] = self.storage_bits / 8
        d["in_shape"], d["out_shape"] = list(self.in_shape), list(self.out_shape)
        return d


def _codecs_of(m: nn.Module):
    if isinstance(m, QuantConv2d | QuantLinear):
        return m.weight_codec, m.act.codec
    return Float(), FloatAct()


def _nonzero_weights(m: nn.Module) -> int:
    with torch.no_grad():
        if isinstance(m, QuantConv2d | QuantLinear):
            w = m.quantized_weight()
        else:
            w = m.weight
        return int((w != 0).sum())


def analyze(
    model: nn.Module,
    example_input: torch.Tensor | None = None,
    convention: str = "operand-width",
) -> dict[str, Any]:
    """Per-layer cost table of ``model`` (QAT or float) on a batch-1 example input.

    Returns ``{"layers": [...], "totals": {...}, "baselines": {...}, "ratios": {...},
    "convention": ..., "energy_table": ...}``; every ratio is baseline over lowbit.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown energy convention {convention!r}; valid: {CONVENTIONS}")
    from .freeze import FrozenModel

    if isinstance(model, str | os.PathLike):
        from .packfile import load_frozen

        model = load_frozen(model)
    if isinstance(model, FrozenModel):
        return _analyze_frozen(model, convention)
    from .recipes import _example_input

    x = _example_input(model, example_input)[:1]
    records: list[tuple[str, nn.Module, tuple, tuple]] = []
    produced_by: dict[int, str] = {}  # id(output tensor) -> conv/linear that produced it
    folded_bn: dict[str, int] = {}  # layer name -> channels of the BN folded into it
    folded_modules: set[nn.Module] = set()
    names = {m: n for n, m in model.named_modules()}

    def hook(mod, inp, out):
        if isinstance(mod, nn.Conv2d | nn.Linear):
            records.append((names[mod], mod, tuple(inp[0].shape), tuple(out.shape)))
            produced_by[id(out)] = names[mod]
        elif isinstance(mod, nn.BatchNorm2d | nn.BatchNorm1d):
            src = produced_by.get(id(inp[0]))
            if src is not None:
                folded_bn[src] = mod.num_features
                folded_modules.add(mod)

    kinds = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.BatchNorm1d)
    leaves = [m for m in model.modules() if isinstance(m, kinds)]
    handles = [m.register_forward_hook(hook) for m in leaves]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    layers: list[LayerCost] = []
    for name, m, ishape, oshape in records:
        wc, ac = _codecs_of(m)
        numel = m.weight.numel()
        nz = _nonzero_weights(m)
        per_weight_macs = (oshape[2] * oshape[3]) if isinstance(m, nn.Conv2d) else 1
        out_ch = m.weight.shape[0]
        quantized = isinstance(m, QuantConv2d | QuantLinear) and not isinstance(wc, Float)
        bn = folded_bn.get(name, 0)
        # storage: codes + scales + bias (+ BN folded into per-channel scale and bias)
        bits = wc.code_bits(tuple(m.weight.shape))
        if quantized:
            scales = wc.scale_count(tuple(m.weight.shape))
            if bn and scales < out_ch and not isinstance(wc, Binary):
                scales = out_ch  # folding BN makes the scale per channel
            bits += 32 * scales
            if m.bias is not None or bn:
                bits += 32 * out_ch  # int32 bias
            if not isinstance(ac, FloatAct | SignAct):
                bits += 32  # the input's activation scale
        else:
            if m.bias is not None or bn:
                bits += wc.weight_bits() * out_ch
        layers.append(_layer_cost(
            name, _kind(m), ishape, oshape, wc, ac, numel, nz, per_weight_macs, bits,
            numel + (out_ch if m.bias is not None else 0), convention,
        ))  # fmt: skip
    n_params = sum(p.numel() for p in model.parameters() if not _is_codec_param(model, p))
    weights = sum(m.weight.numel() for _, m, _, _ in records)
    other_bits = _other_params_bits(model, folded_modules)
    return _report(layers, n_params, weights, other_bits, list(x.shape[1:]), convention)


def _report(layers, n_params, weights, other_bits, input_shape, convention) -> dict[str, Any]:
    """Totals, baselines and ratios from the per-layer costs."""
    totals = {
        "params": n_params,
        "layer_params": sum(layer.params for layer in layers),
        "nonzero_params": sum(layer.nonzero_params for layer in layers),
        "macs": sum(layer.macs for layer in layers),
        "nonzero_macs": sum(layer.nonzero_macs for layer in layers),
        "bops": sum(layer.bops for layer in layers),
        "storage_bytes": other_bits / 8 + sum(layer.storage_bits for layer in layers) / 8,
        "energy_pj": sum(layer.energy_pj for layer in layers),
    }
    xnor_macs = sum(layer.macs for layer in layers if layer.mac_kind == "xnor")
    totals["ops_birealnet"] = (totals["macs"] - xnor_macs) + xnor_macs / 64
    totals["density"] = totals["nonzero_params"] / max(1, weights) if layers else 1.0
    baselines = {
        "fp32_storage_bytes": 4 * n_params,
        "fp16_storage_bytes": 2 * n_params,
        "fp32_energy_pj": sum(layer.fp32_energy_pj for layer in layers),
        "fp16_energy_pj": sum(layer.fp16_energy_pj for layer in layers),
    }
    ratios = {
        "storage_vs_fp32": baselines["fp32_storage_bytes"] / max(1e-9, totals["storage_bytes"]),
        "storage_vs_fp16": baselines["fp16_storage_bytes"] / max(1e-9, totals["storage_bytes"]),
        "energy_vs_fp32": baselines["fp32_energy_pj"] / max(1e-9, totals["energy_pj"]),
        "energy_vs_fp16": baselines["fp16_energy_pj"] / max(1e-9, totals["energy_pj"]),
    }
    return {
        "convention": convention,
        "input_shape": input_shape,
        "layers": [layer.as_dict() for layer in layers],
        "totals": totals,
        "baselines": baselines,
        "ratios": ratios,
        "energy_table_pj": {k: {"pj": v, "source": s} for k, (v, s) in ENERGY_PJ.items()},
        "notes": (
            "Energy: arithmetic only (MACs), 45 nm figures of Horowitz (ISSCC 2014). Storage: "
            "codes at exact bits + fp32 scales + int32 biases (BatchNorm folded) + activation "
            "scales; baselines count every parameter at fp32/fp16. Ratios are baseline over "
            "lowbit."
        ),
    }


def _analyze_frozen(frozen, convention: str) -> dict[str, Any]:
    """The cost table of a frozen model (or a packed file): storage is what the packed
    file stores (codes at their packing, every other tensor at its dtype)."""
    from .codecs import codec_from_dict
    from .packfile import code_bytes

    layers: list[LayerCost] = []
    other_bits = 0.0
    for op in frozen.ops:
        if op.kind not in ("conv", "linear"):
            other_bits += sum(8.0 * t.numel() * t.element_size() for t in op.tensors.values())
            continue
        a = op.attrs
        wc = codec_from_dict(a["weight_codec"])
        ac = codec_from_dict(a["act_codec"])
        codes = op.tensors["codes"]
        numel = codes.numel()
        nz = int((codes != 0).sum())
        oshape, ishape = tuple(a["out_shape"]), tuple(a["in_shape"])
        per_weight = oshape[1] * oshape[2] if op.kind == "conv" else 1
        bits = 0.0
        for name, t in op.tensors.items():
            if name == "codes":  # exactly as the file packs them (empty filters left out)
                bits += 8.0 * code_bytes(a["weight_codec"], codes)
            else:
                bits += 8.0 * t.numel() * t.element_size()
        layers.append(_layer_cost(
            a.get("module", op.name), _kind_of(op), (1, *ishape), (1, *oshape), wc, ac, numel,
            nz, per_weight, bits, numel + (codes.shape[0] if a.get("has_bias") else 0),
            convention,
        ))  # fmt: skip
    weights = sum(op.tensors["codes"].numel() for op in frozen.layers())
    n_params = int(frozen.meta.get("fp_params") or sum(layer.params for layer in layers))
    return _report(layers, n_params, weights, other_bits, frozen.meta.get("input_shape"),
                   convention)  # fmt: skip


def _kind_of(op) -> str:
    if op.kind == "linear":
        return "linear"
    a = op.attrs
    cin = a["weight_shape"][1] * a["groups"]
    if a["groups"] > 1 and a["groups"] == cin:
        return "depthwise"
    if a["weight_shape"][2:] == [1, 1] and a["groups"] == 1:
        return "pointwise"
    return "conv"


def _layer_cost(name, kind, ishape, oshape, wc, ac, numel, nz, per_weight_macs, bits, params,
                convention) -> LayerCost:  # fmt: skip
    act_bits = ac.act_bits() if not isinstance(ac, FloatAct) else ac.bits
    mac_kind = wc.mac_kind(ac)
    e_mac = mac_energy(mac_kind, act_bits, wc.weight_bits(), convention)
    macs, nz_macs = numel * per_weight_macs, nz * per_weight_macs
    billed = nz_macs if convention == "zero-skipping" else macs
    bw = wc.weight_bits() if not isinstance(wc, Float) else wc.bits
    return LayerCost(
        name=name, kind=kind, in_shape=ishape, out_shape=oshape, weight_codec=str(wc),
        act_codec=str(ac), codec=f"{codec_label(wc)}/{codec_label(ac)}", params=params,
        nonzero_params=nz, bits_per_weight=float(bw),
        storage_bits=bits, macs=macs, nonzero_macs=nz_macs,
        bops=float(nz_macs * bw * act_bits), mac_kind=mac_kind, energy_pj=billed * e_mac,
        fp32_energy_pj=macs * mac_energy("fp32_mac", 32, 32, convention),
        fp16_energy_pj=macs * mac_energy("fp16_mac", 16, 16, convention),
    )  # fmt: skip


def _is_codec_param(model: nn.Module, p: torch.Tensor) -> bool:
    for m in model.modules():
        if isinstance(m, QuantConv2d | QuantLinear):
            if any(p is q for q in m.codec_params.values()):
                return True
            if any(p is q for q in m.act.parameters()):
                return True
    return False


def _other_params_bits(model: nn.Module, folded: set[nn.Module]) -> float:
    """Bits of the parameters outside conv/linear layers and not folded into them (a BN
    that follows no conv, a PReLU, ...): stored in fp32."""
    skip: set[int] = set()
    for m in model.modules():
        if isinstance(m, nn.Conv2d | nn.Linear) or m in folded:
            skip.update(id(p) for p in m.parameters())
    return sum(32.0 * p.numel() for p in model.parameters() if id(p) not in skip)


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.groups > 1 and m.groups == m.in_channels:
        return "depthwise"
    if m.kernel_size == (1, 1) and m.groups == 1:
        return "pointwise"
    return "conv"


def format_table(report: dict[str, Any]) -> str:
    """The per-layer cost table as aligned text, with totals and ratios."""
    head = ["layer", "kind", "codec (w/a)", "params", "nz", "bits", "storage B", "MACs", "BOPs",
            "energy pJ"]  # fmt: skip
    rows = [head]
    for r in report["layers"]:
        rows.append(
            [
                r["name"],
                r["kind"],
                r["codec"],
                f"{r['params']:,}",
                f"{r['nonzero_params']:,}",
                f"{r['bits_per_weight']:g}",
                f"{r['storage_bytes']:,.0f}",
                f"{r['macs']:,}",
                f"{r['bops']:.3g}",
                f"{r['energy_pj']:.4g}",
            ]
        )
    t = report["totals"]
    rows.append(
        ["total", "", "", f"{t['params']:,}", f"{t['nonzero_params']:,}", "",
         f"{t['storage_bytes']:,.0f}", f"{t['macs']:,}", f"{t['bops']:.3g}",
         f"{t['energy_pj']:.4g}"]
    )  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = [
        "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
        for r in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.insert(-1, lines[1])
    ra = report["ratios"]
    lines.append("")
    lines.append(
        f"storage: x{ra['storage_vs_fp32']:.2f} vs fp32, x{ra['storage_vs_fp16']:.2f} vs fp16; "
        f"energy: x{ra['energy_vs_fp32']:.2f} vs fp32, x{ra['energy_vs_fp16']:.2f} vs fp16 "
        f"(convention: {report['convention']}); density {t['density']:.3f}"
    )
    return "\n".join(lines)


def codec_label(c) -> str:
    """A short name for a codec: int8, ternary, binary01, fixed6, fp32, uint8, sign, ..."""
    from .codecs import FixedPoint, Int, Ternary

    if isinstance(c, Float | FloatAct):
        return f"fp{c.bits}"
    if isinstance(c, Int):
        return f"int{c.bits}"
    if type(c) is Ternary:  # subclasses (e.g. SBNN's masked binary) go by their own name
        return "ternary" if c.per_channel else "ternary-t"
    if isinstance(c, Binary):
        return {"pm1": "binary", "01": "binary01", "ab": "binaryab"}[c.domain]
    if isinstance(c, FixedPoint):
        return f"fixed{1 + c.integer_bits + c.fraction_bits}"
    if isinstance(c, Int8Act):
        return {None: "int8", True: "sint8", False: "uint8"}[c.signed]
    if isinstance(c, SignAct):
        return "sign"
    return getattr(c, "type_name", type(c).__name__)


# re-export for users who want the mac kinds next to the energy table
__all__ = ["ENERGY_PJ", "CONVENTIONS", "analyze", "mac_energy", "format_table", "Int8Act"]
