"""Parameter and multiply-accumulate counts.

MACs are measured, not computed from a table: forward hooks on every ``nn.Conv2d`` and
``nn.Linear`` (subclasses included, e.g. quantized layers) record the shapes of one
batch-1 forward pass. A conv costs ``out_elements * (C_in / groups) * kh * kw`` MACs, a
linear layer ``out_elements * in_features``. Batch norm, activations, pooling and
additions are not counted (the usual convention of the compression literature).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .registry import ModelError, _check_shape

__all__ = ["count_macs", "count_params", "layer_table"]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _kind(m: nn.Module) -> str:
    if isinstance(m, nn.Linear):
        return "linear"
    if m.groups > 1 and m.groups == m.in_channels:
        return "depthwise"
    if m.groups == 1 and all(k == 1 for k in m.kernel_size):
        return "pointwise"
    return "conv"


def _example_input(model: nn.Module, input_shape: Any) -> torch.Tensor:
    shape = input_shape if input_shape is not None else getattr(model, "default_input_shape", None)
    if shape is None:
        raise ModelError(
            f"{type(model).__name__} has no default_input_shape; pass input_shape=(C, H, W)"
        )
    shape = _check_shape(shape)
    p = next(model.parameters(), None)
    dtype = p.dtype if p is not None and p.is_floating_point() else torch.float32
    device = p.device if p is not None else "cpu"
    return torch.zeros((1, *shape), dtype=dtype, device=device)


def layer_table(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> list[dict]:
    """One row per conv/linear call, in execution order: ``name``, ``type`` (class name),
    ``kind`` (conv, pointwise, depthwise or linear), ``in_shape`` and ``out_shape``
    (without the batch dimension), ``params``, ``macs``, and for convs ``kernel_size``,
    ``stride`` and ``groups`` (None for linear layers).

    ``input_shape`` (C, H, W) defaults to ``model.default_input_shape``.
    """
    x = _example_input(model, input_shape)
    rows: list[dict] = []

    def hook(name: str):
        def record(m: nn.Module, args: tuple, out: torch.Tensor) -> None:
            inp = args[0]
            batch = out.shape[0] if out.dim() > 1 else 1
            if isinstance(m, nn.Linear):
                macs = out.numel() // batch * m.in_features
                kernel = stride = groups = None
            else:
                macs = out.numel() // batch * (m.in_channels // m.groups)
                macs *= math.prod(m.kernel_size)
                kernel, stride, groups = tuple(m.kernel_size), tuple(m.stride), m.groups
            rows.append(
                {
                    "name": name,
                    "type": type(m).__name__,
                    "kind": _kind(m),
                    "in_shape": tuple(inp.shape[1:]),
                    "out_shape": tuple(out.shape[1:]),
                    "params": sum(p.numel() for p in m.parameters()),
                    "macs": int(macs),
                    "kernel_size": kernel,
                    "stride": stride,
                    "groups": groups,
                }
            )

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()  # BN on a batch of one would fail in training mode
        with torch.no_grad():
            model(x)
    finally:
        for m, mode in modes:  # restore each module's own mode (some may be frozen)
            m.training = mode
        for h in handles:
            h.remove()
    return rows


def count_macs(model: nn.Module, input_shape: tuple[int, int, int] | None = None) -> int:
    """Multiply-accumulates of one forward pass on one example (convs and linear layers)."""
    return sum(row["macs"] for row in layer_table(model, input_shape))
