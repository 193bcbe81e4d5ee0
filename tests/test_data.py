"""Tests of lowbit.data: IDX, CIFAR pickles, image trees and zips, cache, sample."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lowbit import data
from lowbit.data import DataError

CIFAR = data.CIFAR10_CLASSES


# --------------------------------------------------------------------------- helpers


def idx_bytes(arr: np.ndarray) -> bytes:
    """IDX encoding of a uint8 array, written by hand (independent of data.write_idx)."""
    head = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def write_mnist_folder(folder: Path, n_train=5, n_test=3, gz=True, variant=False) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        for kind, arr in (
            ("images", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)),
            ("labels", np.arange(n, dtype=np.uint8) % 10),
        ):
            dims = "idx3" if kind == "images" else "idx1"
            name = f"{prefix}-{kind}.{dims}-ubyte" if variant else f"{prefix}-{kind}-{dims}-ubyte"
            raw = idx_bytes(arr)
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
            else:
                (folder / name).write_bytes(raw)


def png_bytes(color, size=(32, 32), mode="RGB") -> bytes:
    import io

    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, format="PNG")
    return buf.getvalue()


# Class i of the synthetic trees is a flat image of colour COLORS[i].
COLORS = [(25 * i, 255 - 20 * i, (70 * i) % 256) for i in range(10)]


def tree_files(classes, per_class=(2, 1), size=(32, 32)) -> dict[str, bytes]:
    """Relative path -> PNG bytes of an ImageFolder tree with train/ and test/."""
    files = {}
    for split, n in zip(("train", "test"), per_class):
        for ci, c in enumerate(classes):
            for j in range(n):
                files[f"{split}/{c}/{j:04d}.png"] = png_bytes(COLORS[ci], size)
    return files


def write_tree(root: Path, files: dict[str, bytes]) -> None:
    for rel, b in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b)


def write_zip(path: Path, files: dict[str, bytes], prefix: str = "") -> None:
    with zipfile.ZipFile(path, "w") as z:
        for rel, b in files.items():
            z.writestr(prefix + rel, b)


def snapshot(folder: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for p in folder.rglob("*")}


def check_colours(images: np.ndarray, labels: np.ndarray) -> None:
    for img, lab in zip(images, labels):
        assert tuple(img[:, 0, 0]) == COLORS[lab]


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    raw = idx_bytes(arr)
    p = tmp_path / ("a.idx.gz" if gz else "a.idx")
    p.write_bytes(gzip.compress(raw) if gz else raw)
    out = data.read_idx(p)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 4)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable


def test_write_idx_matches_reader(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (4, 5, 6), dtype=np.uint8)
    for name in ("x.idx", "x.idx.gz"):
        data.write_idx(tmp_path / name, arr)
        np.testing.assert_array_equal(data.read_idx(tmp_path / name), arr)
    assert (tmp_path / "x.idx").read_bytes() == idx_bytes(arr)


def test_read_idx_wrong_magic(tmp_path):
    p = tmp_path / "bad.idx"
    p.write_bytes(b"\x12\x34\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(DataError, match="not an IDX file") as e:
        data.read_idx(p)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
    raw = idx_bytes(np.zeros((10, 28, 28), np.uint8))
    p = tmp_path / "t.idx"
    if gz:
        p.write_bytes(gzip.compress(raw)[:-30])  # cut inside the deflate stream
        with pytest.raises(DataError, match="truncated") as e:
            data.read_idx(p)
    else:
        p.write_bytes(raw[:-5])
        with pytest.raises(DataError, match="truncated") as e:
            data.read_idx(p)
    assert str(p) in str(e.value)


def test_read_idx_truncated_header_and_extra_data(tmp_path):
    p = tmp_path / "h.idx"
    p.write_bytes(b"\x00\x00\x08\x03\x00\x00")
    with pytest.raises(DataError, match="truncated"):
        data.read_idx(p)
    p.write_bytes(idx_bytes(np.zeros(3, np.uint8)) + b"junk")
    with pytest.raises(DataError, match="extra data"):
        data.read_idx(p)


def test_read_idx_huge_dims_refused_before_allocating(tmp_path):
    p = tmp_path / "huge.idx"
    p.write_bytes(b"\x00\x00\x08\x03" + struct.pack(">3I", 2**31 - 1, 60000, 60000))
    with pytest.raises(DataError, match="limit"):
        data.read_idx(p)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.idx"):
        data.read_idx(tmp_path / "nope.idx")


def test_load_idx_pair_checks(tmp_path):
    imgs = tmp_path / "i.idx"
    labs = tmp_path / "l.idx"
    imgs.write_bytes(idx_bytes(np.zeros((3, 4, 4), np.uint8)))
    labs.write_bytes(idx_bytes(np.array([0, 1], np.uint8)))
    with pytest.raises(DataError, match="3 images but .* 2 labels"):
        data.load_idx_pair(imgs, labs)
    labs.write_bytes(idx_bytes(np.array([0, 1, 10], np.uint8)))
    with pytest.raises(DataError, match="out of range"):
        data.load_idx_pair(imgs, labs)
    labs.write_bytes(idx_bytes(np.array([0, 1, 9], np.uint8)))
    x, y = data.load_idx_pair(imgs, labs)
    assert x.shape == (3, 1, 4, 4) and x.dtype == np.uint8
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 9]
    with pytest.raises(DataError, match="3-D uint8 images"):
        data.load_idx_pair(labs, labs)


@pytest.mark.parametrize("gz,variant", [(True, False), (False, False), (False, True)])
def test_load_mnist_from_folder(tmp_path, gz, variant):
    write_mnist_folder(tmp_path / "mnist", gz=gz, variant=variant)
    train = data.load("MNIST", "train", data_dir=tmp_path)
    test = data.load("mnist", "test", data_dir=tmp_path)
    assert (len(train), len(test)) == (5, 3)
    assert train.shape == (1, 28, 28) and train.name == "mnist"
    assert train.mean == (0.1307,) and train.classes == [str(i) for i in range(10)]


def test_fashion_alias_and_env(tmp_path, monkeypatch):
    write_mnist_folder(tmp_path / "fashion-mnist")
    monkeypatch.setenv("LOWBIT_DATA", str(tmp_path))
    ds = data.load("fashion_mnist", "test")
    assert ds.name == "fashion-mnist" and len(ds) == 3 and ds.classes[0] == "T-shirt/top"
    assert ds.std == (0.3530,)


# --------------------------------------------------------------------------- names, roots


def test_unknown_name_lists_valid_ones():
    with pytest.raises(DataError) as e:
        data.load("imagenet")
    for n in data.DATASETS:
        assert n in str(e.value)


def test_bad_split():
    with pytest.raises(DataError, match="split"):
        data.load("sample", "validation")


def test_missing_data_root_message(monkeypatch):
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    with pytest.raises(DataError) as e:
        data.load("cifar10")
    msg = str(e.value)
    assert "--data-dir" in msg and "LOWBIT_DATA" in msg and "cifar10/" in msg


def test_missing_dataset_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.load("fashion-mnist", data_dir=tmp_path)
    assert str(tmp_path / "fashion-mnist") in str(e.value)
    with pytest.raises(FileNotFoundError, match="nothere"):
        data.load("mnist", data_dir=tmp_path / "nothere")
    (tmp_path / "mnist").mkdir()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        data.load("mnist", data_dir=tmp_path)
    (tmp_path / "cifar10").mkdir()
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        data.load("cifar10", data_dir=tmp_path)


def test_resolve_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOWBIT_DATA", raising=False)
    assert data.resolve_data_dir(None) is None
    assert data.resolve_data_dir("rel") == tmp_path / "rel"
    monkeypatch.setenv("LOWBIT_DATA", "envdir")
    assert data.resolve_data_dir(None) == tmp_path / "envdir"
    assert data.resolve_data_dir(tmp_path / "x") == tmp_path / "x"


def test_cache_dir_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "c" / "d"))
    assert data.cache_dir() == tmp_path / "c" / "d"
    assert (tmp_path / "c" / "d").is_dir()


# --------------------------------------------------------------------------- CIFAR pickles


def cifar_batch(n: int, seed: int, str_keys=False) -> dict:
    rng = np.random.default_rng(seed)
    d = {
        b"batch_label": b"training batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        b"labels": [int(v) for v in rng.integers(0, 10, n)],
        b"filenames": [b"x.png"] * n,
    }
    return {k.decode(): v for k, v in d.items()} if str_keys else d


def write_batches(folder: Path, n=3) -> dict[str, dict]:
    folder.mkdir(parents=True, exist_ok=True)
    batches = {f"data_batch_{i}": cifar_batch(n, i) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(n, 99)
    for name, d in batches.items():
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
    return batches


@pytest.mark.parametrize("sub", ["", "cifar-10-batches-py"])
def test_cifar_pickle_batches(tmp_path, sub):
    folder = tmp_path / "cifar10" / sub if sub else tmp_path / "cifar10"
    batches = write_batches(folder)
    meta = {b"label_names": [c.encode() for c in CIFAR], b"num_cases_per_batch": 3}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    before = snapshot(tmp_path)
    train = data.load("cifar10", "train", data_dir=tmp_path)
    test = data.load("cifar10", "test", data_dir=tmp_path)
    assert snapshot(tmp_path) == before  # nothing written in the data folder
    assert len(train) == 15 and len(test) == 3 and train.shape == (3, 32, 32)
    assert train.classes == CIFAR and train.images.dtype == np.uint8
    want = batches["data_batch_2"][b"data"][1].reshape(3, 32, 32)
    np.testing.assert_array_equal(train.images[4], want)
    assert train.labels.tolist() == sum(
        (batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), []
    )
    np.testing.assert_array_equal(test.images.reshape(3, -1), batches["test_batch"][b"data"])


def test_cifar_pickle_protocol_4_str_keys(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    d = cifar_batch(4, 0, str_keys=True)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(d, f, protocol=4)
    images, labels, classes = data.load_cifar_batches(folder, "test")
    assert images.shape == (4, 3, 32, 32) and labels.tolist() == d["labels"]
    assert classes == CIFAR


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("1+1",))


@pytest.mark.parametrize("kind", ["os.system", "eval", "object-array"])
def test_malicious_pickle_refused(tmp_path, kind):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    marker = tmp_path / "pwned"
    payload = {
        "os.system": {b"data": _Evil(marker), b"labels": [0]},
        "eval": {b"data": _EvalEvil(), b"labels": [0]},
        "object-array": {b"data": np.array([1, "a"], dtype=object), b"labels": [0]},
    }[kind]
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(payload, f, protocol=2)
    with pytest.raises(DataError, match="refused") as e:
        data.load("cifar10", "test", data_dir=tmp_path)
    assert "test_batch" in str(e.value)
    assert not marker.exists()


def test_cifar_batch_bad_content(tmp_path):
    folder = tmp_path / "cifar10"
    folder.mkdir()
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f, protocol=2)
    with pytest.raises(DataError, match="3072"):
        data.load("cifar10", "test", data_dir=tmp_path)
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(")  # truncated pickle
    with pytest.raises(DataError, match="test_batch"):
        data.load("cifar10", "test", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        data.load("cifar10", "train", data_dir=tmp_path)


# --------------------------------------------------------------------------- trees and zips


def test_image_tree_generic(tmp_path):
    files = tree_files(["zebra", "ant"])
    # A grey tree loads with one channel; hidden and non-image files are ignored.
    files = {k: png_bytes(COLORS[0][0], mode="L") for k in files}
    files["train/ant/.hidden.png"] = b"junk"
    files["train/ant/notes.txt"] = b"junk"
    write_tree(tmp_path, files)
    images, labels, classes = data.load_image_tree(tmp_path, "train")
    assert classes == ["ant", "zebra"]
    assert images.shape == (4, 1, 32, 32) and labels.tolist() == [0, 0, 1, 1]
    rgb, _, _ = data.load_image_tree(tmp_path, "test", mode="RGB")
    assert rgb.shape == (2, 3, 32, 32)


def test_image_tree_cifar_via_load(tmp_path):
    write_tree(tmp_path / "cifar10", tree_files(CIFAR))
    before = snapshot(tmp_path)
    train = data.load("cifar10", "train", data_dir=tmp_path)
    test = data.load("cifar10", "test", data_dir=tmp_path)
    assert snapshot(tmp_path) == before
    assert (len(train), len(test)) == (20, 10) and train.classes == CIFAR
    assert train.labels.tolist() == [i // 2 for i in range(20)]
    check_colours(train.images, train.labels)
    check_colours(test.images, test.labels)


def test_image_tree_size_mismatch(tmp_path):
    files = tree_files(["a", "b"])
    files["train/b/0001.png"] = png_bytes((1, 2, 3), size=(16, 16))
    write_tree(tmp_path, files)
    with pytest.raises(DataError, match="same size") as e:
        data.load_image_tree(tmp_path, "train")
    assert "train/b/0001.png" in str(e.value)


def test_image_tree_corrupt_image(tmp_path):
    files = tree_files(["a", "b"])
    files["test/a/0000.png"] = files["test/a/0000.png"][:20]
    write_tree(tmp_path, files)
    with pytest.raises(DataError, match="test/a/0000.png"):
        data.load_image_tree(tmp_path, "test")


def test_zip_nested_tree(tmp_path):
    (tmp_path / "cifar10").mkdir()
    write_zip(tmp_path / "cifar10" / "pics.zip", tree_files(CIFAR), prefix="deep/er/cifar/")
    before = snapshot(tmp_path)
    train = data.load("cifar10", "train", data_dir=tmp_path)
    test = data.load("cifar10", "test", data_dir=tmp_path)
    assert snapshot(tmp_path) == before
    assert (len(train), len(test)) == (20, 10) and train.shape == (3, 32, 32)
    check_colours(train.images, train.labels)
    check_colours(test.images, test.labels)


def test_zip_tree_at_top(tmp_path):
    write_zip(tmp_path / "t.zip", tree_files(["b", "a"]))
    images, labels, classes = data.load_image_zip(tmp_path / "t.zip", "test")
    assert classes == ["a", "b"] and labels.tolist() == [0, 1] and images.shape == (2, 3, 32, 32)


def test_zip_unsafe_member_refused(tmp_path):
    files = tree_files(["a", "b"])
    files["../evil.png"] = png_bytes((0, 0, 0))
    write_zip(tmp_path / "evil.zip", files)
    with pytest.raises(DataError, match=r"\.\./evil\.png"):
        data.load_image_zip(tmp_path / "evil.zip", "train")
    write_zip(tmp_path / "abs.zip", {"/etc/x.png": b"", **tree_files(["a"])})
    with pytest.raises(DataError, match="unsafe"):
        data.load_image_zip(tmp_path / "abs.zip", "train")


def test_zip_truncated_and_not_zip(tmp_path):
    write_zip(tmp_path / "ok.zip", tree_files(["a", "b"]))
    raw = (tmp_path / "ok.zip").read_bytes()
    (tmp_path / "cut.zip").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="cut.zip"):
        data.load_image_zip(tmp_path / "cut.zip", "train")
    (tmp_path / "no.zip").write_bytes(b"hello, not a zip")
    with pytest.raises(DataError, match="not a valid zip"):
        data.load_image_zip(tmp_path / "no.zip", "train")


def test_zip_without_tree(tmp_path):
    write_zip(tmp_path / "flat.zip", {"a/0.png": png_bytes((0, 0, 0))})
    with pytest.raises(DataError, match="train/ and test/"):
        data.load_image_zip(tmp_path / "flat.zip", "train")


def test_zip_member_size_bound(tmp_path, monkeypatch):
    write_zip(tmp_path / "t.zip", tree_files(["a", "b"]))
    monkeypatch.setattr(data, "MAX_MEMBER_BYTES", 10)
    with pytest.raises(DataError, match="byte limit"):
        data.load_image_zip(tmp_path / "t.zip", "train")


# --------------------------------------------------------------------------- cache


def test_cache_written_and_reused(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    root = tmp_path / "data"
    (root / "cifar10").mkdir(parents=True)
    write_zip(root / "cifar10" / "c.zip", tree_files(CIFAR))
    first = data.load("cifar10", "train", data_dir=root)
    npys = sorted(p.name for p in cache.rglob("*.npy"))
    assert npys == ["train-images.npy", "train-labels.npy"]
    assert all(p.is_relative_to(cache / "cifar10") for p in cache.rglob("*.npy"))
    assert not list(cache.rglob("*.tmp"))
    arr = np.load(next(cache.rglob("train-images.npy")), allow_pickle=False)
    np.testing.assert_array_equal(arr, first.images)

    def boom(*a, **k):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(data, "_decode_images", boom)
    second = data.load("cifar10", "train", data_dir=root)
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.classes == first.classes


def test_cache_corrupt_is_rebuilt(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    write_tree(tmp_path / "data" / "cifar10", tree_files(CIFAR))
    first = data.load("cifar10", "test", data_dir=tmp_path / "data")
    npy = next(cache.rglob("test-images.npy"))
    raw = bytearray(npy.read_bytes())
    raw[-1] ^= 0xFF  # flip bits in the payload: only the checksum can tell
    npy.write_bytes(bytes(raw))
    again = data.load("cifar10", "test", data_dir=tmp_path / "data")
    np.testing.assert_array_equal(again.images, first.images)
    npy.write_bytes(b"garbage")
    again = data.load("cifar10", "test", data_dir=tmp_path / "data")
    np.testing.assert_array_equal(again.images, first.images)
    assert np.array_equal(np.load(npy), first.images)  # rewritten


def test_cache_key_follows_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    (root / "cifar10").mkdir(parents=True)
    z = root / "cifar10" / "c.zip"
    write_zip(z, tree_files(CIFAR))
    a = data.load("cifar10", "test", data_dir=root)
    write_zip(z, tree_files(CIFAR[::-1]))  # other colours per class
    os.utime(z, ns=(1, 1))
    b = data.load("cifar10", "test", data_dir=root)
    assert not np.array_equal(a.images, b.images)


# --------------------------------------------------------------------------- ImageSet, sample


def test_sample_loads():
    train = data.load("sample", "train")
    test = data.load("Sample", "test", data_dir="/does/not/matter")
    assert (len(train), len(test)) == (6000, 1000)
    assert train.images.shape == (6000, 1, 28, 28) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64 and train.shape == (1, 28, 28)
    assert train.name == "sample" and train.mean == (0.1307,) and train.std == (0.3081,)
    assert np.bincount(train.labels).tolist() == [600] * 10
    assert abs(train.images.mean() / 255 - 0.1307) < 0.01


def test_sample_size_on_disk():
    files = list(data.SAMPLE_DIR.glob("*"))
    assert {f.name for f in files} >= {
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    }
    assert sum(f.stat().st_size for f in files) < 3 * 2**20


def test_subset_determinism_and_mix():
    ds = data.load("sample", "train")
    a, b = ds.subset(200, seed=3), ds.subset(200, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(ds.subset(200, seed=4).labels, a.labels)
    assert len(a) == 200 and a.classes == ds.classes and a.name == "sample"
    assert len(set(a.labels.tolist())) == 10
    perm = np.random.default_rng(3).permutation(len(ds))[:200]
    np.testing.assert_array_equal(a.labels, ds.labels[perm])
    assert ds.subset(None) is ds and ds.subset(6000) is ds and ds.subset(10**9) is ds
    for bad in (0, -1):
        with pytest.raises(DataError):
            ds.subset(bad)


def test_imageset_validates():
    with pytest.raises(DataError):
        data.ImageSet(np.zeros((2, 28, 28), np.uint8), np.zeros(2), ["a"], (0,), (1,), "x")
    with pytest.raises(DataError):
        data.ImageSet(np.zeros((2, 1, 2, 2), np.uint8), np.zeros(3), ["a"], (0,), (1,), "x")


# --------------------------------------------------------------------------- real data


def test_real_mnist(shared_data):
    train = data.load("mnist", "train", data_dir=shared_data)
    test = data.load("mnist", "test", data_dir=shared_data)
    assert train.images.shape == (60000, 1, 28, 28)
    assert test.images.shape == (10000, 1, 28, 28)
    assert abs(train.images.mean() - 33.318) < 0.01  # as stated in the data README
    assert np.bincount(test.labels, minlength=10).min() > 800


def test_real_fashion_mnist(shared_data):
    test = data.load("fashion-mnist", "test", data_dir=shared_data)
    assert test.images.shape == (10000, 1, 28, 28) and len(test.classes) == 10


def test_cifar_pickle_old_numpy_module_name(tmp_path):
    """Official batches (numpy 1.x / Python 2) name numpy.core.multiarray._reconstruct."""
    folder = tmp_path / "cifar10"
    folder.mkdir()
    d = cifar_batch(2, 5)
    raw = pickle.dumps(d, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in raw
    (folder / "test_batch").write_bytes(raw)
    images, labels, _ = data.load_cifar_batches(folder, "test")
    np.testing.assert_array_equal(images.reshape(2, -1), d[b"data"])
