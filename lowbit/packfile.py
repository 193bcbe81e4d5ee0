"""Saving a ``FrozenModel`` to a packed ``.lowbit`` file and loading it back (the torch
side; the container itself is ``lowbit.fileformat``, numpy only).

Weight codes are packed at the bits their codec stores: 1-bit binary, 2-bit or base-3
ternary, n-bit integers and fixed point, int8 as bytes, fp16 weights as float16; every
other tensor (scales, biases, requantization multipliers) as it is.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import torch

from . import __version__
from .codecs import Binary, FixedPoint, Float, Int, Ternary, codec_from_dict
from .errors import FormatError
from .fileformat import ROW_MASK_KINDS, pack, read, write
from .freeze import FrozenModel

__all__ = ["FormatError", "load_frozen", "save"]


def _packing_for(codec_dict: dict, codes: torch.Tensor) -> dict[str, Any]:
    """How a layer's codes are stored: the codec's packing, leaving out all-zero rows
    (empty filters) where that saves bytes."""
    spec = _codec_packing(codec_dict, codes)
    if spec["kind"] in ROW_MASK_KINDS and codes.ndim >= 1 and codes.shape[0]:
        rows = codes.shape[0]
        dead = int((~codes.reshape(rows, -1).any(1)).sum())
        per_row = packed_nbytes_of(spec, codes) / rows
        if dead * per_row > -(-rows // 8):  # the rows saved outweigh the mask
            spec["row_mask"] = True
    return spec


def packed_nbytes_of(spec: dict[str, Any], codes: torch.Tensor) -> int:
    """Bytes ``codes`` take under ``spec`` (exactly what ``save`` writes)."""
    return int(pack(codes.numpy(), spec).nbytes)


def code_bytes(codec_dict: dict, codes: torch.Tensor) -> int:
    """Bytes a layer's codes take in the file (the cost model's storage of the codes)."""
    return packed_nbytes_of(_packing_for(codec_dict, codes), codes)


def _codec_packing(codec_dict: dict, codes: torch.Tensor) -> dict[str, Any]:
    codec = codec_from_dict(codec_dict)
    own = codec.file_packing()
    if own is not None:
        return dict(own)
    lo_c, hi_c = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    if isinstance(codec, Ternary):
        if codec.packing == "base3":
            return {"kind": "base3"}
        return {"kind": "bits", "bits": 2, "lo": -1}
    if isinstance(codec, Binary):
        # {0, 1}, or {-1, +1} with step 2, in one bit
        return {"kind": "bits", "bits": 1, "lo": lo_c, "step": 2 if lo_c == -1 else 1}
    if isinstance(codec, Int) and codec.bits != 8:
        q = 2 ** (codec.bits - 1) - 1
        return {"kind": "bits", "bits": codec.bits, "lo": -q}
    if isinstance(codec, FixedPoint):
        q = 2 ** (codec.integer_bits + codec.fraction_bits) - 1
        return {"kind": "bits", "bits": 1 + codec.integer_bits + codec.fraction_bits, "lo": -q}
    if isinstance(codec, Float):
        return {"kind": "float16" if codec.bits == 16 else "raw"}
    if codes.is_floating_point() or (-128 <= lo_c and hi_c <= 127):
        return {"kind": "raw"}
    bits = max(1, math.ceil(math.log2(hi_c - lo_c + 1)))
    return {"kind": "bits", "bits": bits, "lo": lo_c}


# ----------------------------------------------------------------------------- save / load


def save(frozen: FrozenModel, path: str | os.PathLike) -> dict[str, Any]:
    """Write ``frozen`` to ``path`` (atomically). Returns ``{"path", "bytes",
    "header_bytes", "payload_bytes"}``."""
    if not isinstance(frozen, FrozenModel):
        raise TypeError(
            f"save() takes a FrozenModel (lowbit.freeze(model)), not {type(frozen).__name__}"
        )
    arrays: dict[str, np.ndarray] = {}
    packing: dict[str, dict[str, Any]] = {}
    by_name = {op.name: op for op in frozen.ops}
    for key, t in frozen.tensors().items():
        op = by_name[key.rsplit("/", 1)[0]]
        if key.endswith("/codes") and op.kind in ("conv", "linear"):
            spec = _packing_for(op.attrs["weight_codec"], t)
            spec.update(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
            arrays[key] = pack(t.numpy(), spec)
            packing[key] = spec
        else:
            arrays[key] = t.contiguous().numpy()
    graph = frozen.graph()
    meta = dict(graph.pop("meta"))  # a copy: saving must not change the model
    meta.setdefault("lowbit_version", __version__)
    sizes = write(path, arrays, graph, meta, packing)
    return {"path": str(path), **sizes}


def load_frozen(path: str | os.PathLike) -> FrozenModel:
    """Read a ``.lowbit`` file written by ``save`` into a ``FrozenModel``."""
    f = read(path)
    try:
        tensors = {k: torch.from_numpy(np.array(v)) for k, v in f.tensors.items()}
        return FrozenModel.from_parts({**f.graph, "meta": f.meta}, tensors)
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise FormatError(f"{path}: damaged graph ({type(e).__name__}: {e})") from None
