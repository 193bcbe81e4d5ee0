"""The ``.lowbit`` container, read and written with numpy alone (no torch, no pickle).

Layout: a safetensors file (so ``safetensors`` can open it too): 8 bytes little-endian
header length ``N``, ``N`` bytes of JSON header (padded with spaces to a multiple of 8),
then the tensor bytes, contiguous, in header order. The header's ``__metadata__`` (string
values only, as safetensors requires) holds:

- ``lowbit.format``: ``"lowbit-packed"``; ``lowbit.format_version``: ``"MAJOR.MINOR"``
  (a reader refuses a newer major version);
- ``lowbit.graph``: the frozen graph as JSON (ops, their attributes and codecs);
- ``lowbit.meta``: input shape, normalization, class names, provenance (lowbit version,
  recipe, data set, accuracy at save time);
- ``lowbit.packing``: for each packed tensor, how its codes are stored (below);
- ``lowbit.checksums``: CRC-32 of every tensor's bytes.

Packing of weight codes (``kind``):
- ``bits``: code ``c`` stored as the unsigned ``u = (c - lo) / step`` in ``bits`` bits,
  little-endian in a byte stream: element ``i`` occupies bits ``[i*bits, (i+1)*bits)``
  counted from the least significant bit of byte 0 (``step`` 2 stores {-1, +1} in 1 bit);
- ``base3``: ternary trits ``t = c + 1``, five per byte, ``t0 + 3 t1 + 9 t2 + 27 t3 + 81 t4``;
- ``sst``: structured sparse ternary codes (``lowbit.sstcode``): each row (dim 0, one
  output unit) flattened in C order, cut into groups of ``n`` (the last one zero-padded),
  each group stored as its codebook index in ``bits`` bits (as ``bits`` packing, ``lo`` 0);
- ``raw`` / ``float16``: the array as is (int8 codes, float weights) or as float16.

``row_mask: true`` (bit-packed kinds): the all-zero rows (output channels whose weights
are all zero, e.g. the empty filters of a sparse binary layer) are not stored; a bit mask
of the rows kept comes first (``ceil(rows / 8)`` bytes), then the kept rows' codes.

Reading is defensive: every malformed file (truncated, no marker, bad JSON, sizes that
do not add up, absurd shapes, a wrong checksum, an unknown version) raises
``FormatError``; sizes are checked before anything is allocated; tensors are memory-mapped.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import sstcode
from .errors import FormatError
from .utils import atomic_write

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "FormatError",
    "LoadedFile",
    "pack_base3",
    "pack_bits",
    "read",
    "unpack_base3",
    "unpack_bits",
    "write",
]

FORMAT = "lowbit-packed"
FORMAT_VERSION = (1, 0)
MAX_HEADER = 16 << 20  # bytes of JSON header we are willing to parse
MAX_ELEMENTS = 1 << 31  # per tensor

_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "F32": np.float32, "F64": np.float64,
}  # fmt: skip
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
#: what unpacked codes may be declared as
_CODE_DTYPES = {"int8", "int16", "int32", "int64", "uint8", "float16", "float32", "float64"}


# ----------------------------------------------------------------------------- packing


def pack_bits(codes: np.ndarray, lo: int, bits: int, step: int = 1) -> np.ndarray:
    """Pack integer ``codes`` (any shape) as ``(codes - lo) / step`` in ``bits`` bits each."""
    d = np.asarray(codes, np.int64).reshape(-1) - lo
    u = d // step
    if u.size and (u.min() < 0 or u.max() >= (1 << bits) or np.any(u * step != d)):
        hi = lo + step * ((1 << bits) - 1)
        raise ValueError(f"codes outside {{{lo}, {lo + step}, ..., {hi}}} cannot use {bits} bits")
    bit_matrix = ((u[:, None] >> np.arange(bits)) & 1).astype(np.uint8)
    return np.packbits(bit_matrix.reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, count: int, lo: int, bits: int, step: int = 1) -> np.ndarray:
    packed = np.asarray(packed, np.uint8)
    if packed.size * 8 < count * bits:
        raise FormatError("packed codes are shorter than their shape says")
    out = np.empty(count, np.int64)
    chunk = 1 << 20  # codes per pass: bounded temporary memory
    for start in range(0, count, chunk):
        n = min(chunk, count - start)
        first, last = start * bits, (start + n) * bits  # bit range of this chunk
        b0 = first // 8
        flat = np.unpackbits(packed[b0 : -(-last // 8)], bitorder="little")
        flat = flat[first - 8 * b0 : first - 8 * b0 + n * bits].reshape(n, bits)
        u = np.zeros(n, np.uint32 if bits <= 32 else np.uint64)
        for j in range(bits):
            u |= flat[:, j].astype(u.dtype) << j
        out[start : start + n] = u
    return out * step + lo


def pack_base3(codes: np.ndarray) -> np.ndarray:
    t = np.asarray(codes, np.int64).reshape(-1) + 1
    if t.size and (t.min() < 0 or t.max() > 2):
        raise ValueError("base-3 packing takes codes in {-1, 0, 1}")
    t = np.concatenate([t, np.zeros((-t.size) % 5, np.int64)]).reshape(-1, 5)
    return (t @ np.array([1, 3, 9, 27, 81])).astype(np.uint8)


def unpack_base3(packed: np.ndarray, count: int) -> np.ndarray:
    b = np.asarray(packed, np.int64)
    if b.size != -(-count // 5) or (b.size and b.max() > 242):
        raise FormatError("damaged base-3 codes")
    t = (b[:, None] // np.array([1, 3, 9, 27, 81])) % 3
    return t.reshape(-1)[:count] - 1


def _sst_groups(spec: dict[str, Any], shape) -> int:
    """How many SST group indices a tensor of ``shape`` stores."""
    rows = int(shape[0]) if len(shape) else 1
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return rows * sstcode.groups_per_row(fan_in, int(spec["n"]))


def packed_nbytes(spec: dict[str, Any], count: int, shape=None) -> int:
    """Bytes a packed tensor of ``count`` codes (of ``shape``, for ``sst``) takes."""
    kind = spec["kind"]
    if kind == "sst":
        return -(-_sst_groups(spec, shape) * int(spec["bits"]) // 8)
    if kind == "bits":
        return -(-count * int(spec["bits"]) // 8)
    if kind == "base3":
        return -(-count // 5)
    raise FormatError(f"packing {kind!r} has no fixed size")


#: packings that may drop all-zero rows (``row_mask``)
ROW_MASK_KINDS = ("bits", "base3", "sst")


def pack(codes: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Pack ``codes`` as ``spec`` says. With ``spec["row_mask"]`` (bit-packed kinds only)
    the rows (dim 0) that are all zero are left out: a bit mask of the rows kept
    (``ceil(rows / 8)`` bytes, bit ``r % 8`` of byte ``r // 8``) precedes the packed codes
    of the kept rows."""
    if spec.get("row_mask"):
        if spec["kind"] not in ROW_MASK_KINDS:
            raise ValueError(f"packing {spec['kind']!r} cannot drop rows")
        codes = np.asarray(codes)
        live = codes.reshape(codes.shape[0], -1).any(1)
        mask = np.packbits(live, bitorder="little")
        inner = pack(codes[live], {**spec, "row_mask": False})
        return np.concatenate([mask, inner]).astype(np.uint8)
    kind = spec["kind"]
    if kind == "bits":
        return pack_bits(codes, spec["lo"], spec["bits"], spec.get("step", 1))
    if kind == "base3":
        return pack_base3(codes)
    if kind == "sst":
        codes = np.asarray(codes)
        if codes.ndim < 2:
            codes = codes.reshape(codes.shape[0] if codes.ndim else 1, -1)
        index = sstcode.encode_groups(codes, spec["n"], spec["k"])
        return pack_bits(index, 0, spec["bits"])
    if kind == "float16":
        return np.asarray(codes).astype(np.float16)
    if kind == "raw":
        return np.ascontiguousarray(codes)
    raise ValueError(f"unknown packing {kind!r}")


# ----------------------------------------------------------------------------- write


def write(
    path: str | os.PathLike,
    arrays: dict[str, np.ndarray],
    graph: dict[str, Any],
    meta: dict[str, Any],
    packing: dict[str, dict[str, Any]],
) -> dict[str, int]:
    """Write the container atomically. ``arrays`` are already packed. Returns
    ``{"bytes", "header_bytes", "payload_bytes"}``."""
    entries: dict[str, Any] = {}
    checks: dict[str, str] = {}
    offset = 0
    blobs = []
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in _CODES:
            raise ValueError(f"tensor {name}: dtype {a.dtype} cannot be stored")
        raw = a.tobytes()
        entries[name] = {"dtype": _CODES[a.dtype], "shape": list(a.shape),
                         "data_offsets": [offset, offset + len(raw)]}  # fmt: skip
        checks[name] = f"{zlib.crc32(raw):08x}"
        offset += len(raw)
        blobs.append(raw)
    entries["__metadata__"] = {
        "lowbit.format": FORMAT,
        "lowbit.format_version": f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}",
        "lowbit.graph": json.dumps(graph, separators=(",", ":")),
        "lowbit.meta": json.dumps(meta, separators=(",", ":")),
        "lowbit.packing": json.dumps(packing, separators=(",", ":")),
        "lowbit.checksums": json.dumps(checks, separators=(",", ":")),
    }
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * ((-len(header)) % 8)
    with atomic_write(path) as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for raw in blobs:
            f.write(raw)
    return {"bytes": 8 + len(header) + offset, "header_bytes": 8 + len(header),
            "payload_bytes": offset}  # fmt: skip


# ----------------------------------------------------------------------------- read


@dataclass
class LoadedFile:
    """A parsed ``.lowbit`` file: graph and meta (dicts), tensors with codes unpacked
    (numpy; raw tensors are read-only views of the memory map), sizes."""

    path: str
    graph: dict[str, Any]
    meta: dict[str, Any]
    tensors: dict[str, np.ndarray]
    packing: dict[str, dict[str, Any]]
    header_bytes: int
    payload_bytes: int
    version: str


def _fail(path, msg: str) -> FormatError:
    return FormatError(f"{path}: {msg}")


def _json_field(path, meta: dict, key: str, kind=dict):
    if key not in meta:
        raise _fail(path, f"header has no {key!r}")
    try:
        value = json.loads(meta[key])
    except (ValueError, TypeError, RecursionError) as e:
        raise _fail(path, f"{key} is not valid JSON ({e})") from None
    if not isinstance(value, kind):
        raise _fail(path, f"{key} should be a JSON {kind.__name__}")
    return value


def _shape(path, name, shape) -> tuple[int, ...]:
    if not isinstance(shape, list) or len(shape) > 8:
        raise _fail(path, f"tensor {name}: bad shape {shape!r}")
    if not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_ELEMENTS
               for d in shape):  # fmt: skip
        raise _fail(path, f"tensor {name}: bad shape {shape!r}")
    if math.prod(shape) > MAX_ELEMENTS:
        raise _fail(path, f"tensor {name}: shape {shape} is absurdly large")
    return tuple(shape)


def read(path: str | os.PathLike, verify: bool = True) -> LoadedFile:
    """Parse and check a ``.lowbit`` file (see the module docstring). ``verify``: check
    every tensor's CRC-32. Raises ``FileNotFoundError`` or ``FormatError``."""
    path = Path(path)
    size = path.stat().st_size  # FileNotFoundError as usual
    if not path.is_file():
        raise _fail(path, "not a file")
    if size < 8:
        raise _fail(path, f"not a lowbit file (only {size} bytes)")
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise _fail(path, f"not a lowbit file (header length {n} does not fit a "
                              f"{size}-byte file)")  # fmt: skip
        head = f.read(n)
        try:
            header = json.loads(head)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge ints
            raise _fail(path, f"not a lowbit file (header is not JSON: {e})") from None
        if not isinstance(header, dict):
            raise _fail(path, "not a lowbit file (header is not a JSON object)")
        meta = header.pop("__metadata__", None)
        if not isinstance(meta, dict) or meta.get("lowbit.format") != FORMAT:
            raise _fail(path, f"not a lowbit file (no {FORMAT!r} format marker)")
        version = meta.get("lowbit.format_version", "")
        try:
            major, minor = (int(v) for v in str(version).split("."))
        except ValueError:
            raise _fail(path, f"bad format version {version!r}") from None
        if major > FORMAT_VERSION[0]:
            ours = f"{FORMAT_VERSION[0]}.{FORMAT_VERSION[1]}"
            raise _fail(path, f"written by format version {version}, newer than this lowbit "
                              f"reads ({ours}); upgrade lowbit")  # fmt: skip
        if major < 1:
            raise _fail(path, f"unknown format version {version!r}")
        graph = _json_field(path, meta, "lowbit.graph")
        info = _json_field(path, meta, "lowbit.meta")
        packing = _json_field(path, meta, "lowbit.packing")
        checks = _json_field(path, meta, "lowbit.checksums")
        data_start = 8 + n
        data_len = size - data_start
        spans = []
        for name, e in header.items():
            if (
                not isinstance(e, dict)
                or not isinstance(e.get("dtype"), str)
                or (e["dtype"] not in _DTYPES)
            ):
                raise _fail(path, f"tensor {name}: bad entry")
            shape = _shape(path, name, e.get("shape"))
            offs = e.get("data_offsets")
            if (
                not isinstance(offs, list)
                or len(offs) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
            ):
                raise _fail(path, f"tensor {name}: bad data offsets")  # fmt: skip
            begin, end = offs
            itemsize = np.dtype(_DTYPES[e["dtype"]]).itemsize
            if not 0 <= begin <= end <= data_len:
                raise _fail(path, f"tensor {name}: data [{begin}, {end}) lies outside the "
                                  f"{data_len}-byte payload (truncated file?)")  # fmt: skip
            if end - begin != math.prod(shape) * itemsize:
                raise _fail(path, f"tensor {name}: {end - begin} bytes for shape {list(shape)}")
            spans.append((begin, end, name, shape, e["dtype"]))
        spans.sort()
        pos = 0
        for begin, end, name, _, _ in spans:
            if begin != pos:
                raise _fail(path, f"tensor {name}: overlapping or non-contiguous data")
            pos = end
        if pos != data_len:
            raise _fail(path, f"{data_len - pos} stray bytes after the last tensor")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
    tensors: dict[str, np.ndarray] = {}
    try:
        for begin, end, name, shape, dt in spans:
            view = memoryview(mm)[data_start + begin : data_start + end]
            if verify:
                want = checks.get(name)
                if want is None:
                    raise _fail(path, f"tensor {name} has no checksum")
                if f"{zlib.crc32(view):08x}" != want:
                    raise _fail(path, f"tensor {name}: checksum mismatch (damaged file)")
            a = np.frombuffer(view, dtype=_DTYPES[dt]).reshape(shape)
            tensors[name] = _unpack(path, name, a, packing.get(name))
            del view, a
    except BaseException:
        tensors.clear()
        if mm is not None:
            try:
                mm.close()
            except BufferError:  # a view is still referenced by the traceback; GC closes it
                pass
        raise
    extra = set(packing) - set(tensors)
    if extra:
        raise _fail(path, f"packing names missing tensors: {sorted(extra)[:3]}")
    return LoadedFile(str(path), graph, info, tensors, packing, data_start, data_len, version)


def _unpack(path, name: str, a: np.ndarray, spec: dict | None) -> np.ndarray:
    if spec is None:
        return a
    if not isinstance(spec, dict):
        raise _fail(path, f"tensor {name}: bad packing entry")
    shape = _shape(path, name, spec.get("shape"))
    if not spec.get("row_mask"):
        return _unpack_plain(path, name, a, spec, shape)
    if spec.get("kind") not in ROW_MASK_KINDS or not shape or a.dtype != np.uint8:
        raise _fail(path, f"tensor {name}: a row mask needs bit-packed codes")
    rows = shape[0]
    mb = -(-rows // 8)
    if a.size < mb:
        raise _fail(path, f"tensor {name}: {a.size} bytes do not hold a mask of {rows} rows")
    live = np.unpackbits(a[:mb], count=rows, bitorder="little").astype(bool)
    inner = _unpack_plain(path, name, a[mb:], spec, (int(live.sum()), *shape[1:]))
    out = np.zeros(shape, inner.dtype)
    out[live] = inner
    return out


def _unpack_plain(path, name: str, a: np.ndarray, spec: dict, shape) -> np.ndarray:
    kind = spec.get("kind")
    count = math.prod(shape)
    dtype_name = spec.get("dtype", "int8")
    if not isinstance(dtype_name, str) or dtype_name not in _CODE_DTYPES:
        raise _fail(path, f"tensor {name}: bad dtype {dtype_name!r}")
    dtype = np.dtype(dtype_name)
    if kind == "bits":
        bits, lo, step = spec.get("bits"), spec.get("lo"), spec.get("step", 1)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (bits, lo, step)):
            raise _fail(path, f"tensor {name}: bad bit packing {spec}")
        if not 1 <= bits <= 32 or not 1 <= step <= 2 or abs(lo) > 2**31:
            raise _fail(path, f"tensor {name}: bad bit packing {spec}")
        if a.dtype != np.uint8 or a.size != packed_nbytes(spec, count):
            raise _fail(path, f"tensor {name}: {a.size} packed bytes do not hold {count} "
                              f"codes of {bits} bits")  # fmt: skip
        codes = unpack_bits(a, count, lo, bits, step)
    elif kind == "base3":
        if a.dtype != np.uint8 or a.size != packed_nbytes(spec, count):
            raise _fail(path, f"tensor {name}: {a.size} bytes do not hold {count} trits")
        try:
            codes = unpack_base3(a, count)
        except FormatError as e:
            raise _fail(path, f"tensor {name}: {e}") from None
    elif kind == "sst":
        n, k, bits = spec.get("n"), spec.get("k"), spec.get("bits")
        try:
            sstcode.check_nk(n, k)
        except ValueError as e:
            raise _fail(path, f"tensor {name}: bad SST packing ({e})") from None
        if bits != sstcode.index_bits(n, k) or isinstance(bits, bool):
            raise _fail(path, f"tensor {name}: SST({n}, {k}) indices take "
                              f"{sstcode.index_bits(n, k)} bits, not {bits!r}")  # fmt: skip
        ngroups = _sst_groups(spec, shape)
        if a.dtype != np.uint8 or a.size != packed_nbytes(spec, count, shape):
            raise _fail(path, f"tensor {name}: {a.size} packed bytes do not hold {ngroups} "
                              f"SST groups of {bits} bits")  # fmt: skip
        rows = shape[0] if len(shape) else 1
        per_row = sstcode.groups_per_row(math.prod(shape[1:]), n)
        index = unpack_bits(a, ngroups, 0, bits).reshape(rows, per_row)
        try:
            codes = sstcode.decode_groups(index, n, k, math.prod(shape[1:]))
        except ValueError as e:
            raise _fail(path, f"tensor {name}: {e}") from None
    elif kind in ("raw", "float16"):
        if a.size != count:
            raise _fail(path, f"tensor {name}: {a.size} values for shape {list(shape)}")
        codes = a
    else:
        raise _fail(path, f"tensor {name}: unknown packing {kind!r}")
    codes = np.asarray(codes)
    if dtype.kind in "iu" and codes.size and codes.dtype.kind in "iu":
        info = np.iinfo(dtype)
        if codes.min() < info.min or codes.max() > info.max:
            raise _fail(path, f"tensor {name}: codes do not fit {dtype}")
    return codes.astype(dtype, copy=False).reshape(shape)
