"""The .lowbit container: round trip, sizes, and every malformed file -> FormatError."""

from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit.cost import analyze
from lowbit.errors import FormatError
from lowbit.fileformat import read
from lowbit.freeze import freeze
from lowbit.packfile import load_frozen, save
from lowbit.recipes import Recipe, Rule, compress_


class Tiny(nn.Module):
    default_input_shape = (2, 8, 8)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 1)
        self.c3 = nn.Conv2d(6, 6, 3, stride=2, padding=1, groups=6)
        self.fc = nn.Linear(6 * 4 * 4, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c2(x))
        return self.fc(torch.flatten(self.c3(x), 1))


def _tiny_frozen(seed=0):
    torch.manual_seed(seed)
    net = compress_(Tiny(), Recipe("t", [
        Rule(select="all", weights="int8", activations="int8"),
        Rule(select="pointwise", weights="ternary", activations="int8"),
        Rule(select="depthwise", weights="binary01", activations="int8"),
        Rule(select="last", weights="int4", activations="int8"),
    ]))  # fmt: skip
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(16, 2, 8, 8))
    net.eval()
    return net, freeze(net, meta={"classes": list("abcde")})


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    net, frozen = _tiny_frozen()
    path = tmp_path_factory.mktemp("ff") / "tiny.lowbit"
    info = save(frozen, path)
    return net, frozen, path, info


def test_round_trip_and_sizes(saved):
    net, frozen, path, info = saved
    assert info["bytes"] == path.stat().st_size == info["header_bytes"] + info["payload_bytes"]
    f = read(path)
    assert f.meta["classes"] == list("abcde") and f.meta["lowbit_version"] == lowbit.__version__
    x = torch.randn(4, 2, 8, 8)
    assert torch.equal(load_frozen(path)(x), frozen(x))
    # the cost model's storage figure for the frozen model is what the file's tensors take
    report = analyze(frozen)
    assert (
        abs(report["totals"]["storage_bytes"] - info["payload_bytes"])
        <= 0.01 * info["payload_bytes"]
    )
    assert analyze(str(path))["totals"] == report["totals"]


def test_safetensors_can_read_it(saved):
    from safetensors.numpy import load_file

    _, frozen, path, _ = saved
    arrays = load_file(path)
    assert set(arrays) == set(frozen.tensors())


def test_runtime_side_reads_without_torch(saved):
    _, _, path, _ = saved
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "from lowbit.fileformat import read\n"
        f"f = read({str(path)!r})\n"
        "assert 'torch' not in sys.modules\n"
        "print(len(f.tensors))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) > 0


def _header(raw: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _assemble(header: dict, payload: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * ((-len(text)) % 8)
    return len(text).to_bytes(8, "little") + text + payload


def _structural_mutations(raw: bytes, rng: random.Random) -> bytes:
    """A mutation of the JSON header that keeps it parseable."""
    header, payload = _header(raw)
    meta = header["__metadata__"]
    names = [k for k in header if k != "__metadata__"]
    choice = rng.randrange(12)
    name = rng.choice(names)
    huge = rng.choice([2**40, 2**62, -1, 10**30, 3.5, "x", None, True])
    if choice == 0:
        header[name]["shape"] = [huge] if rng.random() < 0.5 else [2**20, 2**20, 2**20]
    elif choice == 1:
        header[name]["data_offsets"] = [0, huge]
    elif choice == 2:
        header[name]["dtype"] = rng.choice(["F99", "I8", "F64", "U8", None, ["I8"], {"a": 1}])
    elif choice == 3:
        meta["lowbit.format_version"] = rng.choice(["2.0", "0.1", "x", "1", "", "1.9"])
    elif choice == 4:
        del meta[rng.choice(sorted(meta))]
    elif choice == 5:
        packing = json.loads(meta["lowbit.packing"])
        key = rng.choice(sorted(packing))
        field = rng.choice(["bits", "lo", "step", "shape", "kind", "dtype"])
        packing[key][field] = rng.choice(
            [huge, 0, 33, "bits", [1, 2], [2**31, 2**31], "float64", ">i4", "float128", ["i"]]
        )
        meta["lowbit.packing"] = json.dumps(packing)
    elif choice == 6:
        graph = json.loads(meta["lowbit.graph"])
        op = rng.choice(graph["ops"])
        key = rng.choice(["kind", "inputs", "output", "attrs", "tensors", "name"])
        op[key] = rng.choice([huge, [], {}, "nonsense", ["nowhere"]])
        meta["lowbit.graph"] = json.dumps(graph)
    elif choice == 7:
        meta[rng.choice(sorted(meta))] = rng.choice(["{", "[]", "null", "1e999", '"s"', "9" * 5000])
    elif choice == 8:
        checks = json.loads(meta["lowbit.checksums"])
        checks[name] = "deadbeef"
        meta["lowbit.checksums"] = json.dumps(checks)
    elif choice == 9:
        del header[name]
    elif choice == 10:
        header[name]["data_offsets"] = list(reversed(header[name]["data_offsets"]))
    else:
        meta["lowbit.format"] = "something-else"
    return _assemble(header, payload)


def _byte_mutation(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    kind = rng.randrange(5)
    if kind == 0:  # truncate
        return bytes(data[: rng.randrange(len(data))])
    if kind == 1:  # flip bytes anywhere
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        return bytes(data)
    if kind == 2:  # a wild header length
        n = rng.choice([0, 1, 7, 2**63 - 1, 2**40, len(data), len(data) - 8])
        return n.to_bytes(8, "little") + bytes(data[8:])
    if kind == 3:  # append junk
        return bytes(data) + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    # random garbage
    return bytes(rng.randrange(256) for _ in range(rng.randint(0, 256)))


def test_fuzz_mutated_files_are_format_errors_or_correct_loads(saved, tmp_path):
    """2,000+ mutated files: each raises FormatError or loads (never another exception)."""
    net, frozen, path, _ = saved
    raw = path.read_bytes()
    rng = random.Random(1234)
    x = torch.randn(2, 2, 8, 8)
    expected = frozen(x)
    outcomes = {"error": 0, "loaded": 0}
    target = tmp_path / "m.lowbit"
    for i in range(2100):
        blob = _structural_mutations(raw, rng) if i % 2 else _byte_mutation(raw, rng)
        target.write_bytes(blob)
        try:
            loaded = load_frozen(target)
        except FormatError:
            outcomes["error"] += 1
            continue
        outcomes["loaded"] += 1
        # a file that loads either computes the same function or fails cleanly when run
        try:
            got = loaded(x)
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError):
            continue
        if blob[8:] == raw[8:] or i % 2 == 0:
            assert torch.equal(got, expected)
    print(outcomes)
    assert outcomes["error"] > 1500, outcomes


def test_damaged_payload_is_caught_by_checksum(saved, tmp_path):
    _, _, path, info = saved
    raw = bytearray(path.read_bytes())
    raw[info["header_bytes"] + 3] ^= 0xFF
    bad = tmp_path / "bad.lowbit"
    bad.write_bytes(bytes(raw))
    with pytest.raises(FormatError, match="checksum"):
        read(bad)


def test_newer_major_version_names_both(saved, tmp_path):
    _, _, path, _ = saved
    header, payload = _header(path.read_bytes())
    header["__metadata__"]["lowbit.format_version"] = "7.3"
    newer = tmp_path / "newer.lowbit"
    newer.write_bytes(_assemble(header, payload))
    with pytest.raises(FormatError, match=r"7\.3.*1\.0"):
        read(newer)


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError):
        read(tmp_path / "nope.lowbit")


def test_save_is_atomic(saved, tmp_path, monkeypatch):
    _, frozen, _, _ = saved
    target = tmp_path / "keep.lowbit"
    target.write_bytes(b"old contents")
    import lowbit.fileformat as ff

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(ff.zlib, "crc32", boom)
    with pytest.raises(RuntimeError):
        save(frozen, target)
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.lowbit"]


def test_unpacked_codes_match(saved):
    _, frozen, path, _ = saved
    f = read(path)
    for key, t in frozen.tensors().items():
        assert np.array_equal(f.tensors[key], t.numpy()), key


# ----------------------------------------------------------------------------- empty rows


@pytest.mark.parametrize(
    "spec,values",
    [
        ({"kind": "bits", "bits": 1, "lo": 0}, (0, 1)),
        ({"kind": "bits", "bits": 2, "lo": -1}, (-1, 0, 1)),
        ({"kind": "base3"}, (-1, 0, 1)),
        ({"kind": "sst", "n": 4, "k": 1, "bits": 4}, None),
    ],
)
def test_row_mask_round_trip(spec, values, tmp_path):
    from lowbit.fileformat import pack, write

    rng = np.random.default_rng(0)
    for rows, dead in [(11, [0, 3, 10]), (8, list(range(8))), (5, [])]:
        if values is None:  # one +-1 per group of 4
            codes = np.zeros((rows, 3, 3), np.int8)
            flat = codes.reshape(rows, -1)
            for r in range(rows):
                for g in range(0, 9, 4):
                    flat[r, g] = rng.choice([-1, 1])
        else:
            codes = rng.choice(values, (rows, 3, 3)).astype(np.int8)
            codes[:, 0, 0] = values[-1]  # no row empty by chance
        codes[dead] = 0
        full = {**spec, "shape": list(codes.shape), "dtype": "int8"}
        masked = {**full, "row_mask": True}
        packed = pack(codes, masked)
        assert packed.nbytes == -(-rows // 8) + pack(codes[[r not in dead for r in range(rows)]],
                                                     full).nbytes  # fmt: skip
        p = tmp_path / f"m{rows}.lowbit"
        write(p, {"w/codes": packed}, {"ops": []}, {}, {"w/codes": masked})
        back = read(p).tensors["w/codes"]
        assert back.shape == codes.shape and np.array_equal(back, codes)


def test_empty_filters_are_not_stored():
    """A binary {0, 1} layer with empty filters: the file leaves them out, and the cost
    model's storage is the payload."""
    net, _ = _tiny_frozen()
    with torch.no_grad():
        net.c3.weight[:4] = -1.0  # {0, beta}: weights <= 0 are 0 -> 4 empty filters
    frozen = freeze(net)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        info = save(frozen, Path(d) / "e.lowbit")
        f = read(Path(d) / "e.lowbit")
        assert f.packing["c3/codes"].get("row_mask") is True
        back = load_frozen(Path(d) / "e.lowbit")
    x = torch.randn(4, 2, 8, 8)
    assert torch.equal(back(x), frozen(x))
    assert info["payload_bytes"] == analyze(frozen)["totals"]["storage_bytes"]
