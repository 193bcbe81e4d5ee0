"""Image classification data sets, loaded whole into memory as uint8 arrays.

``load(name, split, data_dir)`` returns an :class:`ImageSet` (images ``(N, C, H, W)`` uint8,
labels ``(N,)`` int64). Supported data sets are in :data:`DATASETS`:

- ``sample``: 6,000 + 1,000 MNIST digits shipped inside the package (no data folder needed);
- ``mnist`` and ``fashion-mnist``: the standard IDX files (gzip or not) in
  ``<data root>/mnist/`` and ``<data root>/fashion-mnist/``;
- ``cifar10``: in ``<data root>/cifar10/``, the official python batches (``data_batch_1..5``,
  ``test_batch``, read with a restricted unpickler), else a ``*.zip`` holding an ImageFolder
  tree (``train/<class>/*.jpg``, ``test/<class>/...``) at any depth, else such a tree.

The data root is ``--data-dir`` / ``data_dir`` or the environment variable ``LOWBIT_DATA``.
Decoded JPEG/PNG/pickle sources are cached as ``.npy`` files under :func:`cache_dir`
(``LOWBIT_CACHE`` or ``~/.cache/lowbit``); nothing is ever written inside the data folder.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import LowbitError
from .utils import atomic_write

__all__ = [
    "DATASETS",
    "DataError",
    "ImageSet",
    "cache_dir",
    "dataset_stats",
    "load",
    "load_cifar_batches",
    "load_idx_pair",
    "load_image_tree",
    "load_image_zip",
    "read_idx",
    "resolve_data_dir",
    "write_idx",
]

DATASETS = ("sample", "mnist", "fashion-mnist", "cifar10")
SPLITS = ("train", "test")

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
}

MNIST_CLASSES = [str(i) for i in range(10)]
FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR10_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]

# Per-channel mean and std of each train split, in [0, 1] pixel units.
_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "sample": ((0.1307,), (0.3081,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}

SAMPLE_DIR = Path(__file__).parent / "_sample"

# Defensive bounds on what a data file may make us allocate or read.
MAX_ARRAY_BYTES = 2**31  # one IDX payload / one decoded split
MAX_ZIP_MEMBERS = 1_000_000
MAX_MEMBER_BYTES = 10 * 2**20  # one encoded image
MAX_TOTAL_BYTES = 4 * 2**30  # all encoded images of one split
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_PICKLE_BYTES = 512 * 2**20  # one CIFAR python batch (official: 31 MB)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")
_CACHE_VERSION = 1


class DataError(LowbitError, ValueError):
    """A data file or data set request is invalid (bad format, corrupt, unknown name...)."""


# --------------------------------------------------------------------------- ImageSet


@dataclass
class ImageSet:
    """One split of a data set, entirely in memory.

    ``images``: uint8 ``(N, C, H, W)``; ``labels``: int64 ``(N,)``; ``classes``: names in label
    order; ``mean``/``std``: per-channel statistics of the train split in [0, 1] units.
    """

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise DataError(
                f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                f"{self.images.shape}"
            )
        if self.labels.ndim != 1 or len(self.labels) != len(self.images):
            raise DataError(
                f"{self.name}: {len(self.images)} images but labels of shape {self.labels.shape}"
            )
        self.labels = self.labels.astype(np.int64, copy=False)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        self.classes = list(self.classes)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        _, c, h, w = self.images.shape
        return (c, h, w)

    def subset(self, n: int | None, seed: int = 0) -> ImageSet:
        """The first ``n`` samples after a permutation by ``np.random.default_rng(seed)``.

        ``n`` None or ``>= len(self)`` returns ``self``; ``n <= 0`` is a :class:`DataError`.
        """
        if n is None:
            return self
        if isinstance(n, bool) or not isinstance(n, int | np.integer):
            raise DataError(f"subset size must be an integer or None, got {n!r}")
        if n <= 0:
            raise DataError(f"subset size must be positive, got {n}")
        if n >= len(self):
            return self
        idx = np.random.default_rng(seed).permutation(len(self))[: int(n)]
        return ImageSet(
            images=np.ascontiguousarray(self.images[idx]),
            labels=self.labels[idx],
            classes=list(self.classes),
            mean=self.mean,
            std=self.std,
            name=self.name,
        )


# --------------------------------------------------------------------------- paths


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """The data root: ``data_dir`` if given, else ``$LOWBIT_DATA``, else None.

    Relative paths are taken relative to the current directory; ``~`` is expanded.
    """
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get("LOWBIT_DATA") or None
    if data_dir is None:
        return None
    return Path(data_dir).expanduser().absolute()


def cache_dir() -> Path:
    """Where decoded data sets are cached: ``$LOWBIT_CACHE`` or ``~/.cache/lowbit`` (created)."""
    env = os.environ.get("LOWBIT_CACHE")
    path = Path(env).expanduser().absolute() if env else Path.home() / ".cache" / "lowbit"
    path.mkdir(parents=True, exist_ok=True)
    return path


def canonical_name(name: str) -> str:
    """The data set name as in :data:`DATASETS` (case-insensitive, ``_`` accepted for ``-``)."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise DataError(f"unknown data set {name!r}; valid names: {', '.join(DATASETS)}")
    return key


def dataset_stats(name: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) per channel of the train split of a known data set, in [0, 1] units."""
    return _STATS[canonical_name(name)]


def _check_split(split: str) -> str:
    s = str(split).strip().lower()
    if s not in SPLITS:
        raise DataError(f"unknown split {split!r}; valid splits: train, test")
    return s


# --------------------------------------------------------------------------- IDX

_IDX_TYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_exact(f, n: int, path: Path, what: str) -> bytes:
    try:
        data = f.read(n)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataError(f"{path}: truncated or corrupt gzip data ({e})") from e
    if len(data) != n:
        raise DataError(f"{path}: truncated file: expected {n} bytes of {what}, got {len(data)}")
    return data


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into a numpy array of its shape.

    Checks the magic number, that the dimensions are sane and that the payload length matches
    them exactly; any problem raises :class:`DataError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file not found: {path}")
    with open(path, "rb") as raw:
        is_gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        f = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
        try:
            head = _read_exact(f, 4, path, "IDX header")
            if head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
                raise DataError(
                    f"{path}: not an IDX file (magic bytes {head.hex()}, expected 0000 + type "
                    "byte 08..0e + number of dimensions)"
                )
            dtype, ndim = _IDX_TYPES[head[2]], head[3]
            if not 1 <= ndim <= 8:
                raise DataError(f"{path}: IDX file with {ndim} dimensions (expected 1 to 8)")
            dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path, "IDX dimensions"))
            nbytes = dtype.itemsize
            for d in dims:
                nbytes *= d
            if nbytes > MAX_ARRAY_BYTES:
                raise DataError(
                    f"{path}: IDX dimensions {dims} need {nbytes} bytes, more than the limit "
                    f"of {MAX_ARRAY_BYTES}"
                )
            payload = _read_exact(f, nbytes, path, f"data for dimensions {dims}")
            try:
                tail = f.read(1)
            except (EOFError, gzip.BadGzipFile, zlib.error) as e:
                raise DataError(f"{path}: truncated or corrupt gzip data ({e})") from e
            if tail:
                raise DataError(f"{path}: extra data after the IDX payload for dimensions {dims}")
        except OSError as e:
            raise DataError(f"{path}: cannot read IDX data ({e})") from e
        finally:
            if is_gzip:
                f.close()
    arr = np.frombuffer(bytearray(payload), dtype=dtype).reshape(dims)
    return arr.astype(dtype.newbyteorder("="), copy=False)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed (reproducibly) if ``path`` ends in .gz."""
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_TYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None or not 1 <= array.ndim <= 8:
        raise DataError(f"cannot write a {array.dtype} array of {array.ndim} dims as IDX")
    big = array.astype(_IDX_TYPES[code], copy=False)
    data = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data += np.ascontiguousarray(big).tobytes()
    path = Path(path)
    with open(path, "wb") as f:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename="", fileobj=f, mode="wb", compresslevel=9, mtime=0) as g:
                g.write(data)
        else:
            f.write(data)


def load_idx_pair(
    images_path: str | os.PathLike, labels_path: str | os.PathLike, num_classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 images ``(N, 1, H, W)``, int64 labels ``(N,)``) from an IDX image/label pair.

    Images must be a 3-D uint8 IDX file, labels a 1-D uint8 IDX file with the same count and
    values in ``0 .. num_classes - 1``.
    """
    images = read_idx(images_path)
    labels = read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{images_path}: expected 3-D uint8 images (N, H, W), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DataError(
            f"{labels_path}: expected 1-D uint8 labels, got {labels.dtype} {labels.shape}"
        )
    if len(images) != len(labels):
        raise DataError(
            f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels"
        )
    if len(labels) and int(labels.max()) >= num_classes:
        raise DataError(
            f"{labels_path}: label {int(labels.max())} out of range 0..{num_classes - 1}"
        )
    return images[:, None, :, :], labels.astype(np.int64)


def _idx_file(folder: Path, prefix: str, kind: str) -> Path:
    """The IDX file ``<prefix>-<kind>`` in ``folder``, in any of the usual spellings."""
    dims = "idx3" if kind == "images" else "idx1"
    names = [
        f"{prefix}-{kind}-{dims}-ubyte.gz",
        f"{prefix}-{kind}-{dims}-ubyte",
        f"{prefix}-{kind}.{dims}-ubyte.gz",
        f"{prefix}-{kind}.{dims}-ubyte",
    ]
    for n in names:
        if (folder / n).is_file():
            return folder / n
    raise FileNotFoundError(
        f"{folder}: no {kind} file for the {'train' if prefix == 'train' else 'test'} split; "
        f"expected {names[0]} (or {names[1]})"
    )


def load_idx_folder(folder: str | os.PathLike, split: str, num_classes: int = 10):
    """(images, labels) of a split from a folder with the four standard MNIST file names."""
    folder = Path(folder)
    prefix = "train" if _check_split(split) == "train" else "t10k"
    return load_idx_pair(
        _idx_file(folder, prefix, "images"), _idx_file(folder, prefix, "labels"), num_classes
    )


# --------------------------------------------------------------------------- CIFAR pickles


def _safe_codecs_encode(obj, encoding="utf-8"):
    """What protocol-2 pickles use to rebuild ``bytes``: only str -> latin-1 bytes."""
    if not isinstance(obj, str) or str(encoding).lower().replace("-", "") != "latin1":
        raise pickle.UnpicklingError("refused _codecs.encode call in pickle")
    return obj.encode("latin-1")


def _safe_dtype(*args, **kwargs):
    dt = np.dtype(*args, **kwargs)
    if dt.hasobject:
        raise pickle.UnpicklingError("refused object dtype in pickle")
    return dt


_reconstruct = np.array(0).__reduce__()[0]  # numpy's ndarray rebuild function


class _RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds only plain containers, bytes/str/numbers and numeric numpy arrays."""

    _ALLOWED: dict[tuple[str, str], object] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): _safe_dtype,
        ("_codecs", "encode"): _safe_codecs_encode,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name} in pickle") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refused persistent id in pickle")


def safe_unpickle(path: str | os.PathLike):
    """Unpickle a CIFAR batch file with :class:`_RestrictedUnpickler` (never executes code)."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_PICKLE_BYTES:
        raise DataError(f"{path}: {size} bytes, larger than a CIFAR batch may be")
    with open(path, "rb") as f:
        try:
            return _RestrictedUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as e:
            raise DataError(f"{path}: not a valid CIFAR batch: {e}") from e
        except Exception as e:  # noqa: BLE001  (any failure of a malformed pickle)
            raise DataError(f"{path}: corrupt pickle ({type(e).__name__}: {e})") from e


def _str_keys(d, path: Path) -> dict:
    if not isinstance(d, dict):
        raise DataError(f"{path}: expected a dict in the CIFAR batch, got {type(d).__name__}")
    return {k.decode("latin-1") if isinstance(k, bytes) else str(k): v for k, v in d.items()}


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _str_keys(safe_unpickle(path), path)
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path}: CIFAR batch without 'data' and 'labels' entries")
    data, labels = d["data"], d["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DataError(f"{path}: 'data' must be a uint8 array of shape (N, 3072)")
    if data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: 'data' rows have {data.shape[1]} values, expected 3072")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: 'labels' is not a list of integers") from e
    if labels.shape != (len(data),):
        raise DataError(f"{path}: {len(data)} images but {labels.size} labels")
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DataError(f"{path}: labels outside 0..9")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar_batch_dir(folder: Path) -> Path | None:
    for d in (folder, folder / "cifar-10-batches-py"):
        if (d / "test_batch").is_file() or (d / "data_batch_1").is_file():
            return d
    return None


def load_cifar_batches(
    folder: str | os.PathLike, split: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images ``(N, 3, 32, 32)``, labels, class names) from the official CIFAR-10 python
    batches in ``folder``, unpickled without running any code."""
    folder = Path(folder)
    names = (
        [f"data_batch_{i}" for i in range(1, 6)]
        if _check_split(split) == "train"
        else ["test_batch"]
    )
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{folder}: missing CIFAR-10 batch file(s) {', '.join(missing)}")
    parts = [_cifar_batch(folder / n) for n in names]
    images = np.ascontiguousarray(np.concatenate([p[0] for p in parts]))
    labels = np.concatenate([p[1] for p in parts])
    classes = list(CIFAR10_CLASSES)
    meta = folder / "batches.meta"
    if meta.is_file():
        m = _str_keys(safe_unpickle(meta), meta)
        names_ = m.get("label_names")
        if (
            not isinstance(names_, list)
            or len(names_) != 10
            or not all(isinstance(x, bytes | str) for x in names_)
        ):
            raise DataError(f"{meta}: 'label_names' must be a list of 10 names")
        classes = [x.decode("utf-8") if isinstance(x, bytes) else x for x in names_]
    return images, labels, classes


# --------------------------------------------------------------------------- image trees


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None, leave=False)


def _decode_images(
    items: Sequence[tuple[str, int]],
    read: Callable[[str], bytes],
    mode: str | None,
    where: str,
    split: str,
) -> np.ndarray:
    """Decode ``items`` (name, label) into one uint8 ``(N, C, H, W)`` array.

    ``mode`` "RGB" or "L" forces the channels; None gives 1 channel when every image is grey.
    """
    from PIL import Image, UnidentifiedImageError

    grey_modes = {"1", "L", "LA", "I", "I;16", "F"}
    out = None
    all_grey = True
    total = 0
    bar = _progress(len(items), f"decoding {split} of {Path(where).name}")
    try:
        for i, (name, _) in enumerate(items):
            data = read(name)
            total += len(data)
            if total > MAX_TOTAL_BYTES:
                raise DataError(f"{where}: more than {MAX_TOTAL_BYTES} bytes of {split} images")
            try:
                with Image.open(io.BytesIO(data)) as im:
                    w, h = im.size
                    if out is None:
                        if w * h > MAX_IMAGE_PIXELS or w < 1 or h < 1:
                            raise DataError(f"{where}: {name}: image size {w}x{h} is too large")
                        if len(items) * 3 * w * h > MAX_ARRAY_BYTES:
                            raise DataError(
                                f"{where}: {len(items)} images of {w}x{h} are too many to load"
                            )
                        out = np.empty((len(items), 3, h, w), dtype=np.uint8)
                        size0, name0 = (w, h), name
                    elif (w, h) != size0:
                        raise DataError(
                            f"{where}: {name}: image size {w}x{h} differs from "
                            f"{size0[0]}x{size0[1]} of {name0}; all images must have the same size"
                        )
                    grey = mode == "L" or (mode is None and im.mode in grey_modes)
                    arr = np.asarray(im.convert("L" if grey else "RGB"))
            except DataError:
                raise
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
                raise DataError(f"{where}: {name}: cannot decode image ({e})") from e
            except Image.DecompressionBombError as e:  # pragma: no cover
                raise DataError(f"{where}: {name}: {e}") from e
            if grey:
                out[i] = arr[None]
            else:
                out[i] = arr.transpose(2, 0, 1)
                all_grey = False
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    if out is None:
        raise DataError(f"{where}: no {split} images")
    if mode == "L" or (mode is None and all_grey):
        out = np.ascontiguousarray(out[:, :1])
    return out


def _tree_classes(
    train_classes: Iterable[str], split_classes: Iterable[str], where: str, canonical
) -> list[str]:
    classes = sorted(set(train_classes))
    if not classes:
        raise DataError(f"{where}: no class folders with images under train/")
    extra = sorted(set(split_classes) - set(classes))
    if extra:
        raise DataError(f"{where}: test/ has classes missing from train/: {', '.join(extra)}")
    if canonical is not None and sorted(canonical) == classes:
        return list(canonical)
    return classes


def _items_by_class(paths: Iterable[str], classes: list[str]) -> list[tuple[str, int]]:
    """Sorted (path, label) pairs; ``paths`` are ``<split>/<class>/.../<file>``."""
    index = {c: i for i, c in enumerate(classes)}
    items = [(p, index[PurePosixPath(p).parts[1]]) for p in paths]
    items.sort(key=lambda t: (t[1], t[0]))
    return items


def _is_image_name(parts: Sequence[str]) -> bool:
    return (
        len(parts) >= 3
        and not any(p.startswith(".") or p == "__MACOSX" for p in parts)
        and parts[-1].lower().endswith(IMAGE_EXTENSIONS)
    )


def _scan_tree(root: Path) -> dict[str, list[str]]:
    """Relative image paths under root/train and root/test, keyed by split."""
    found: dict[str, list[str]] = {"train": [], "test": []}
    for split in SPLITS:
        base = root / split
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(root).parts
            for fn in filenames:
                parts = (*rel, fn)
                if _is_image_name(parts):
                    found[split].append("/".join(parts))
    return found


def load_image_tree(
    root: str | os.PathLike,
    split: str,
    mode: str | None = None,
    canonical_classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, labels, classes) of ``root/<split>/<class>/*.jpg|png|...``.

    Classes are the sorted folder names under ``root/train`` (or ``canonical_classes`` when the
    names are exactly those). All images must have the same size.
    """
    root = Path(root)
    split = _check_split(split)
    if not (root / "train").is_dir() or not (root / "test").is_dir():
        raise FileNotFoundError(f"{root}: expected train/ and test/ sub-folders (ImageFolder tree)")
    found = _scan_tree(root)
    return _load_tree_items(found, split, str(root), mode, canonical_classes, _file_reader(root))


def _file_reader(root: Path) -> Callable[[str], bytes]:
    def read(rel: str) -> bytes:
        p = root / rel
        size = p.stat().st_size
        if size > MAX_MEMBER_BYTES:
            raise DataError(f"{p}: {size} bytes, larger than the {MAX_MEMBER_BYTES} byte limit")
        return p.read_bytes()

    return read


def _load_tree_items(found, split, where, mode, canonical, read):
    train_classes = [PurePosixPath(p).parts[1] for p in found["train"]]
    split_classes = [PurePosixPath(p).parts[1] for p in found[split]]
    classes = _tree_classes(train_classes, split_classes, where, canonical)
    items = _items_by_class(found[split], classes)
    if not items:
        raise DataError(f"{where}: no images under {split}/")
    images = _decode_images(items, read, mode, where, split)
    labels = np.array([lab for _, lab in items], dtype=np.int64)
    return images, labels, classes


def _zip_tree_root(names: Iterable[str], where: str) -> str:
    """The folder inside a zip (as a prefix, "" for the top) that has train/ and test/."""
    splits_at: dict[str, set[str]] = {}
    for n in names:
        parts = n.split("/")
        if any(p.startswith(".") or p == "__MACOSX" for p in parts):
            continue
        for i, p in enumerate(parts[:-1]):
            if p in SPLITS:
                splits_at.setdefault("/".join(parts[:i]), set()).add(p)
    roots = [r for r, s in splits_at.items() if s == set(SPLITS)]
    if not roots:
        raise DataError(f"{where}: no folder with train/ and test/ sub-folders in the zip")
    depth = min(r.count("/") + (r != "") for r in roots)
    best = sorted(r for r in roots if r.count("/") + (r != "") == depth)
    if len(best) > 1:
        raise DataError(f"{where}: several image trees in the zip: {', '.join(best)}")
    return best[0] + "/" if best[0] else ""


def _check_member_name(name: str, where: str) -> None:
    norm = name.replace("\\", "/")
    if (
        norm.startswith("/")
        or (len(norm) > 1 and norm[1] == ":")
        or ".." in norm.split("/")
        or "\x00" in norm
    ):
        raise DataError(f"{where}: unsafe member name {name!r} in zip (absolute path or '..')")


def load_image_zip(
    path: str | os.PathLike,
    split: str,
    mode: str | None = None,
    canonical_classes: Sequence[str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(images, labels, classes) from a zip holding an ImageFolder tree at any depth.

    Nothing is extracted: members are read into memory (each at most ``MAX_MEMBER_BYTES``) and
    decoded with PIL. Unsafe member names, a corrupt or truncated zip raise :class:`DataError`.
    """
    path = Path(path)
    split = _check_split(split)
    where = str(path)
    try:
        zf = zipfile.ZipFile(path)
    except FileNotFoundError:
        raise
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a valid zip file (corrupt or truncated?): {e}") from e
    with zf:
        infos = zf.infolist()
        if len(infos) > MAX_ZIP_MEMBERS:
            raise DataError(f"{path}: {len(infos)} members, more than {MAX_ZIP_MEMBERS}")
        by_name: dict[str, zipfile.ZipInfo] = {}
        for info in infos:
            _check_member_name(info.filename, where)
            if not info.is_dir():
                by_name.setdefault(info.filename, info)
        prefix = _zip_tree_root(by_name, where)
        found: dict[str, list[str]] = {"train": [], "test": []}
        for n in by_name:
            if n.startswith(prefix):
                parts = n[len(prefix) :].split("/")
                if parts[0] in SPLITS and _is_image_name(parts):
                    found[parts[0]].append(n[len(prefix) :])

        def read(rel: str) -> bytes:
            info = by_name[prefix + rel]
            if info.file_size > MAX_MEMBER_BYTES:
                raise DataError(
                    f"{path}:{info.filename}: {info.file_size} bytes, larger than the "
                    f"{MAX_MEMBER_BYTES} byte limit"
                )
            try:
                with zf.open(info) as f:
                    data = f.read(MAX_MEMBER_BYTES + 1)
            except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
                raise DataError(f"{path}:{info.filename}: corrupt zip member ({e})") from e
            except (RuntimeError, NotImplementedError) as e:  # encrypted, unknown compression
                raise DataError(f"{path}:{info.filename}: cannot read member ({e})") from e
            if len(data) > MAX_MEMBER_BYTES:
                raise DataError(f"{path}:{info.filename}: larger than its header says")
            return data

        return _load_tree_items(found, split, where, mode, canonical_classes, read)


# --------------------------------------------------------------------------- cache


def _source_key(files: Sequence[Path], extra: str) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{extra}".encode())
    for f in files:
        st = f.stat()
        h.update(f"|{f.absolute()}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _crc(a: np.ndarray) -> int:
    return zlib.crc32(memoryview(np.ascontiguousarray(a)).cast("B"))


def _atomic_write(path: Path, write: Callable[[io.BufferedWriter], None]) -> None:
    with atomic_write(path, "wb") as f:
        write(f)


def _cache_load(folder: Path, split: str):
    meta_path = folder / f"{split}.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(folder / f"{split}-images.npy", allow_pickle=False)
        labels = np.load(folder / f"{split}-labels.npy", allow_pickle=False)
        classes = [str(c) for c in meta["classes"]]
        ok = (
            meta.get("version") == _CACHE_VERSION
            and images.dtype == np.uint8
            and labels.dtype == np.int64
            and list(images.shape) == meta["images_shape"]
            and labels.shape == (images.shape[0],)
            and _crc(images) == meta["images_crc"]
            and _crc(labels) == meta["labels_crc"]
            and (len(labels) == 0 or (labels.min() >= 0 and labels.max() < len(classes)))
        )
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        return None
    return (images, labels, classes) if ok else None


def _cache_save(folder: Path, split: str, images, labels, classes, source: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _atomic_write(folder / f"{split}-images.npy", lambda f: np.save(f, images))
        _atomic_write(folder / f"{split}-labels.npy", lambda f: np.save(f, labels))
        meta = {
            "version": _CACHE_VERSION,
            "source": source,
            "classes": list(classes),
            "images_shape": list(images.shape),
            "images_crc": _crc(images),
            "labels_crc": _crc(labels),
        }
        _atomic_write(folder / f"{split}.json", lambda f: f.write(json.dumps(meta).encode()))
    except OSError as e:
        warnings.warn(f"could not write the data cache in {folder}: {e}", stacklevel=3)


def _cached(dataset: str, files: Sequence[Path], extra: str, split: str, build: Callable):
    """``build()`` -> (images, labels, classes), cached under cache_dir()/dataset/key/."""
    try:
        folder = cache_dir() / dataset / _source_key(files, extra)
    except OSError as e:
        warnings.warn(f"data cache unavailable ({e}); decoding without caching", stacklevel=3)
        return build()
    hit = _cache_load(folder, split)
    if hit is not None:
        return hit
    images, labels, classes = build()
    _cache_save(folder, split, images, labels, classes, ", ".join(str(f) for f in files))
    return images, labels, classes


# --------------------------------------------------------------------------- loading


def _dataset_folder(root: Path, name: str) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{folder}: expected a folder {name}/ in the data folder {root} holding the "
            f"{name} files"
        )
    return folder


def _load_cifar10(folder: Path, split: str):
    batches = _cifar_batch_dir(folder)
    if batches is not None:
        files = sorted(p for p in batches.iterdir() if p.is_file() and "batch" in p.name)
        return _cached(
            "cifar10", files, "pickle", split, lambda: load_cifar_batches(batches, split)
        )
    zips = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".zip" and p.is_file())
    if zips:
        z = zips[0]
        return _cached(
            "cifar10",
            [z],
            "zip|RGB",
            split,
            lambda: load_image_zip(z, split, mode="RGB", canonical_classes=CIFAR10_CLASSES),
        )
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        found = _scan_tree(folder)
        files = [folder / p for p in sorted(found["train"] + found["test"])]
        return _cached(
            "cifar10",
            files,
            f"tree|RGB|{folder.absolute()}",
            split,
            lambda: _load_tree_items(
                found, split, str(folder), "RGB", CIFAR10_CLASSES, _file_reader(folder)
            ),
        )
    raise FileNotFoundError(
        f"{folder}: no CIFAR-10 data; expected the python batches (data_batch_1..5, test_batch), "
        "a .zip holding train/ and test/ image folders, or train/ and test/ image folders"
    )


def load(name: str, split: str = "train", data_dir: str | os.PathLike | None = None) -> ImageSet:
    """Load one split (``"train"`` or ``"test"``) of a data set in :data:`DATASETS`.

    ``sample`` is built in; the others are read from ``data_dir`` (or ``$LOWBIT_DATA``), a
    folder holding one sub-folder per data set (``mnist/``, ``fashion-mnist/``, ``cifar10/``).
    """
    key = canonical_name(name)
    split = _check_split(split)
    mean, std = _STATS[key]
    if key == "sample":
        images, labels = load_idx_folder(SAMPLE_DIR, split)
        return ImageSet(images, labels, list(MNIST_CLASSES), mean, std, key)
    root = resolve_data_dir(data_dir)
    if root is None:
        raise DataError(
            f"data set {key!r} needs its files: pass --data-dir or set LOWBIT_DATA to a folder "
            "holding one sub-folder per data set (mnist/, fashion-mnist/, cifar10/)"
        )
    folder = _dataset_folder(root, key)
    if key in ("mnist", "fashion-mnist"):
        images, labels = load_idx_folder(folder, split)
        classes = MNIST_CLASSES if key == "mnist" else FASHION_CLASSES
        return ImageSet(images, labels, list(classes), mean, std, key)
    images, labels, classes = _load_cifar10(folder, split)
    if images.shape[1:] != (3, 32, 32) or len(classes) != 10:
        raise DataError(
            f"{folder}: CIFAR-10 images must be 3x32x32 in 10 classes, got "
            f"{'x'.join(map(str, images.shape[1:]))} in {len(classes)} classes"
        )
    return ImageSet(images, labels, classes, mean, std, key)
