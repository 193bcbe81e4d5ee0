"""The packed ``.lowbit`` file: a safetensors container, no pickle.

``save(frozen, path)`` writes every tensor of a ``FrozenModel``; weight codes are packed
at the bits their codec stores (1-bit binary, 2-bit or base-3 ternary, n-bit integers,
int8 as bytes); the header's metadata holds the graph as JSON (``lowbit.format``,
``lowbit.graph``, ``lowbit.packing``). ``load_frozen(path)`` reads it back into a
``FrozenModel`` with the same outputs. The write goes to a temporary file renamed into
place, so a crash never leaves a half-written model.

The graph and packing JSON are stored zlib-compressed and base64-encoded
(``read_header`` decodes them). Bit packing (``kind: "bits"``): code ``c`` is stored as
the unsigned ``u = (c - lo) / step`` in ``bits`` bits, little-endian within a byte stream:
element ``i`` occupies bits ``[i*bits, (i+1)*bits)`` counted from the least significant
bit of byte 0.
Base-3 packing (``kind: "base3"``): trits ``t = c + 1`` in {0, 1, 2}, five per byte,
``byte = t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4``.
"""

from __future__ import annotations

import base64
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .codecs import Binary, FixedPoint, Float, Int, Ternary, codec_from_dict
from .freeze import FrozenModel
from .utils import atomic_write

__all__ = ["FORMAT", "LowbitFileError", "load_frozen", "pack_bits", "save", "unpack_bits"]

FORMAT = "lowbit-packed"
FILE_VERSION = 1


class LowbitFileError(ValueError):
    """Not a lowbit file, a newer version, or a damaged one."""


# ----------------------------------------------------------------------------- packing


def pack_bits(codes: np.ndarray, lo: int, bits: int, step: int = 1) -> np.ndarray:
    """Pack integer ``codes`` (any shape) as ``(codes - lo) / step`` in ``bits`` bits each
    (``step`` 2 stores {-1, +1} in one bit)."""
    d = np.asarray(codes, np.int64).reshape(-1) - lo
    u = d // step
    if u.size and (u.min() < 0 or u.max() >= (1 << bits) or np.any(u * step != d)):
        hi = lo + step * ((1 << bits) - 1)
        raise ValueError(f"codes outside {{{lo}, {lo + step}, ..., {hi}}} cannot use {bits} bits")
    bit_matrix = ((u[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, count: int, lo: int, bits: int, step: int = 1) -> np.ndarray:
    flat = np.unpackbits(np.asarray(packed, np.uint8), bitorder="little")[: count * bits]
    if flat.size != count * bits:
        raise LowbitFileError("packed codes are shorter than their shape says")
    u = (flat.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(1)
    return u * step + lo


def pack_base3(codes: np.ndarray) -> np.ndarray:
    t = np.asarray(codes, np.int64).reshape(-1) + 1
    if t.size and (t.min() < 0 or t.max() > 2):
        raise ValueError("base-3 packing takes codes in {-1, 0, 1}")
    t = np.concatenate([t, np.zeros((-t.size) % 5, np.int64)]).reshape(-1, 5)
    return (t @ np.array([1, 3, 9, 27, 81])).astype(np.uint8)


def unpack_base3(packed: np.ndarray, count: int) -> np.ndarray:
    b = np.asarray(packed, np.int64)
    if b.size * 5 < count or (b.size and b.max() > 242):
        raise LowbitFileError("damaged base-3 codes")
    t = (b[:, None] // np.array([1, 3, 9, 27, 81])) % 3
    return t.reshape(-1)[:count] - 1


def _packing_for(codec_dict: dict, codes: torch.Tensor) -> dict[str, Any]:
    """How a layer's codes are stored, from its weight codec (falls back to the codes'
    own range)."""
    codec = codec_from_dict(codec_dict)
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


def _zjson(obj: Any) -> str:
    """Compact JSON, zlib-compressed, base64 (the graph of a small net is otherwise
    larger than its weights)."""
    return base64.b64encode(
        zlib.compress(json.dumps(obj, separators=(",", ":")).encode(), 9)
    ).decode()


def _unzjson(text: str) -> Any:
    return json.loads(zlib.decompress(base64.b64decode(text, validate=True)))


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """The graph and packing of a ``.lowbit`` file as plain JSON (for inspection)."""
    raw = Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8 : 8 + n]).get("__metadata__") or {}
    return {"graph": _unzjson(meta["lowbit.graph"]), "packing": _unzjson(meta["lowbit.packing"])}


def save(frozen: FrozenModel, path: str | os.PathLike) -> dict[str, Any]:
    """Write ``frozen`` to ``path`` (atomically). Returns ``{"path", "bytes"}``."""
    from safetensors.numpy import save as st_save

    if not isinstance(frozen, FrozenModel):
        raise TypeError(
            f"save() takes a FrozenModel (lowbit.freeze(model)), not {type(frozen).__name__}"
        )
    arrays: dict[str, np.ndarray] = {}
    packing: dict[str, dict[str, Any]] = {}
    for key, t in frozen.tensors().items():
        op_name, tname = key.rsplit("/", 1)
        op = next(o for o in frozen.ops if o.name == op_name)
        if tname == "codes" and op.kind in ("conv", "linear"):
            spec = _packing_for(op.attrs["weight_codec"], t)
            spec.update(shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."))
            if spec["kind"] == "bits":
                arrays[key] = pack_bits(t.numpy(), spec["lo"], spec["bits"], spec.get("step", 1))
            elif spec["kind"] == "base3":
                arrays[key] = pack_base3(t.numpy())
            elif spec["kind"] == "float16":
                arrays[key] = t.numpy().astype(np.float16)
            else:
                arrays[key] = t.numpy()
            packing[key] = spec
        else:
            arrays[key] = t.contiguous().numpy()
    graph = frozen.graph()
    meta = {
        "lowbit.format": FORMAT,
        "lowbit.file_version": str(FILE_VERSION),
        "lowbit.version": __version__,
        "lowbit.graph": _zjson(graph),
        "lowbit.packing": _zjson(packing),
    }
    blob = st_save(arrays, metadata=meta)
    path = Path(path)
    with atomic_write(path) as f:
        f.write(blob)
    return {"path": str(path), "bytes": len(blob)}


def load_frozen(path: str | os.PathLike) -> FrozenModel:
    """Read a ``.lowbit`` file written by ``save`` (no pickle involved)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load as st_load

    path = Path(path)
    if not path.is_file():
        raise LowbitFileError(f"{path}: no such file")
    raw = path.read_bytes()
    try:
        arrays = st_load(raw)
        header_len = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8 : 8 + header_len])
    except (SafetensorError, ValueError, json.JSONDecodeError, OverflowError) as e:
        raise LowbitFileError(f"{path}: not a lowbit file (unreadable container: {e})") from None
    meta = header.get("__metadata__") or {}
    if meta.get("lowbit.format") != FORMAT:
        raise LowbitFileError(f"{path}: not a lowbit file (no {FORMAT!r} marker)")
    version = int(meta.get("lowbit.file_version", "0"))
    if version > FILE_VERSION:
        raise LowbitFileError(
            f"{path}: file version {version} is newer than this lowbit reads ({FILE_VERSION}); "
            "upgrade lowbit"
        )
    try:
        graph = _unzjson(meta["lowbit.graph"])
        packing = _unzjson(meta["lowbit.packing"])
    except (KeyError, ValueError, zlib.error) as e:
        raise LowbitFileError(f"{path}: damaged header ({e})") from None
    tensors: dict[str, torch.Tensor] = {}
    for key, a in arrays.items():
        spec = packing.get(key)
        if spec is None:
            tensors[key] = torch.from_numpy(np.array(a))
            continue
        shape = spec["shape"]
        count = int(np.prod(shape)) if shape else 1
        if spec["kind"] == "bits":
            codes = unpack_bits(a, count, spec["lo"], spec["bits"], spec.get("step", 1))
        elif spec["kind"] == "base3":
            codes = unpack_base3(a, count)
        elif spec["kind"] in ("raw", "float16"):
            codes = np.array(a)
        else:
            raise LowbitFileError(f"{path}: unknown packing {spec['kind']!r} for {key}")
        dtype = getattr(torch, spec["dtype"])
        tensors[key] = torch.from_numpy(np.asarray(codes).reshape(shape)).to(dtype)
    try:
        return FrozenModel.from_parts(graph, tensors)
    except (KeyError, TypeError) as e:
        raise LowbitFileError(f"{path}: damaged graph ({type(e).__name__}: {e})") from None
