"""The runtime Engine reproduces the frozen model's reference executor.

Integer layers must agree bit for bit (logits included: float32 dequantization is exact
arithmetic on both sides); float-path layers (float weights or float inputs) and float
ops that reduce (global/average pooling) agree within a tight tolerance."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit.errors import FormatError
from lowbit.freeze import FrozenModel, FrozenOp, freeze
from lowbit.packfile import load_frozen, save
from lowbit.recipes import Recipe, Rule, compress_
from lowbit.runtime import _cext, load
from lowbit.runtime import kernels as K

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float paths: float32 im2col + matmul against PyTorch's conv (different summation order)
RTOL, ATOL = 1e-4, 1e-4


class ChainNet(nn.Module):
    """conv-BN-ReLU-maxpool, strided conv (70 channels: not a multiple of 64), pointwise,
    flatten (NCHW order), linear: every op exact on the integer path."""

    default_input_shape = (3, 16, 16)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(12)
        self.pool = nn.MaxPool2d(2)
        self.c2 = nn.Conv2d(12, 70, 3, stride=2, padding=1)
        self.b2 = nn.BatchNorm2d(70)
        self.c3 = nn.Conv2d(70, 16, 1, bias=False)
        self.b3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.b1(self.c1(x))))
        x = torch.relu(self.b2(self.c2(x)))
        x = torch.relu(self.b3(self.c3(x)))
        return self.fc(torch.flatten(x, 1))


class GraphNet(nn.Module):
    """Residual add, grouped conv, ReLU6, a strided slice + channel pad shortcut, cat,
    average and global pooling."""

    default_input_shape = (3, 16, 16)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 16, 1, bias=False)
        self.avg = nn.AvgPool2d(3, 2, padding=1, ceil_mode=True, count_include_pad=False)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        x = x + F.relu6(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        y = torch.relu(self.pw(y) + short)
        z = torch.cat([self.avg(y), self.avg(short)], dim=1)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


class SignChain(nn.Module):
    """conv -> BN -> (sign) binary conv -> BN -> (sign) binary conv -> BN -> linear: the
    float outputs feeding sign quantizers are packed by their producers (fused)."""

    default_input_shape = (3, 16, 16)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 70, 3, padding=1, bias=False)
        self.b1 = nn.BatchNorm2d(70)
        self.c2 = nn.Conv2d(70, 130, 3, stride=2, padding=1, bias=False)
        self.b2 = nn.BatchNorm2d(130)
        self.c3 = nn.Conv2d(130, 16, 3, padding=1, bias=False)
        self.b3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = self.b2(self.c2(self.b1(self.c1(x))))
        return self.fc(torch.flatten(self.b3(self.c3(x)), 1))


CODECS = [
    ("int8", "int8"),
    ("int4", "int8"),
    ("ternary", "int8"),
    ({"_type": "fixed", "_data": {"integer_bits": 0, "fraction_bits": 5}}, "int8"),
    ("binary", "sign"),
    ("binary01", "int8"),
    ("binary01", "sign"),
    ("binaryab", "int8"),
    ("binaryab", "sign"),
    ("int8", "sign"),
    ("ternary", "float"),
    ("fp16", "float"),
]


def _ids(codecs):
    return [f"{json.dumps(w) if not isinstance(w, str) else w}-{a}" for w, a in codecs]


def _recipe(w, a, last="int8") -> Recipe:
    return Recipe("test", [
        Rule(select="all", weights=w, activations=a),
        Rule(select="first", weights="int8", activations="int8"),
        Rule(select="last", weights=last, activations="int8"),
    ])  # fmt: skip


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(256, 3, 16, 16, generator=g), torch.randint(0, 10, (256,), generator=g)


def _trained(cls, w, a, steps=4, last="int8"):
    torch.manual_seed(0)
    x, y = _data()
    net = compress_(cls(), _recipe(w, a, last))
    opt = torch.optim.SGD(net.parameters(), lr=0.02, momentum=0.9)
    net.train()
    for i in range(steps):
        idx = slice(64 * i, 64 * (i + 1))
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def _roundtrip(frozen, tmp_path, name="m.lowbit", **kw):
    path = tmp_path / name
    save(frozen, path)
    return load_frozen(path), load(path, **kw)


def _x(n=8, shape=(3, 16, 16), seed=1):
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


@pytest.mark.parametrize("w,a", CODECS, ids=_ids(CODECS))
def test_engine_matches_reference(w, a, tmp_path):
    ref, eng = _roundtrip(freeze(_trained(ChainNet, w, a)), tmp_path)
    x = _x()
    want = ref(torch.from_numpy(x)).numpy()
    got = eng(x)
    assert got.dtype == np.float32 and got.shape == want.shape
    with _cext.disabled():  # the numba kernels give exactly what the C ones give
        np.testing.assert_array_equal(eng(x), got)
    layers = [op for op in ref.layers()]
    if all(op.attrs["path"] == "int" for op in layers):
        np.testing.assert_array_equal(got, want)
    else:
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    kernels = eng.kernels()
    if a == "sign" and w in ("binary", "binary01", "binaryab"):
        assert kernels["c2"] == kernels["c3"] == "xnor"
    elif a != "float":
        assert set(kernels.values()) == {"gemm-int8"}
    else:
        assert kernels["c2"] == "float"


@pytest.mark.parametrize("w", ["binary", "binary01", "binaryab"])
def test_sign_packing_fused_into_producer(w, tmp_path):
    ref, eng = _roundtrip(freeze(_trained(SignChain, w, "sign")), tmp_path)
    x = _x()
    np.testing.assert_array_equal(eng(x), ref(torch.from_numpy(x)).numpy())
    fused = {s.name for s in eng.steps if s.layer is not None and s.layer.sign_out}
    assert "c1" in fused and eng.kernels()["c2"] == "xnor"


@pytest.mark.parametrize("w,a", [("int8", "int8"), ("binaryab", "sign"), ("fp16", "float")],
                         ids=["int8", "binaryab-sign", "fp16"])  # fmt: skip
def test_engine_graph_ops(w, a, tmp_path):
    ref, eng = _roundtrip(freeze(_trained(GraphNet, w, a)), tmp_path)
    kinds = {op.kind for op in ref.ops}
    assert {"add", "pad", "slice", "cat", "avgpool", "gap", "clamp"} <= kinds
    x = _x(4)
    # a float last layer: every op but the pooling is exact, the logits within tolerance
    np.testing.assert_allclose(eng(x), ref(torch.from_numpy(x)).numpy(), rtol=RTOL, atol=ATOL)


def test_float_output_layer(tmp_path):
    frozen = freeze(_trained(ChainNet, "ternary", "float", last="fp16"))
    ref, eng = _roundtrip(frozen, tmp_path)
    assert ref.layers()[-1].attrs["path"] == "float"
    x = _x(4)
    np.testing.assert_allclose(eng(x), ref(torch.from_numpy(x)).numpy(), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------ random single layers


def _single_layer_model(rng, cin, cout, k, stride, pad, groups, codes_kind, act, conv=True):
    """quantize -> conv/linear (integer path) -> (requant -> quantize ->) output."""
    cg = cin // groups
    if codes_kind == "int8":
        codes = rng.integers(-127, 128, (cout, cg, k, k))
    elif codes_kind == "ternary":
        codes = rng.integers(-1, 2, (cout, cg, k, k))
    elif codes_kind == "pm1":
        codes = rng.choice([-1, 1], (cout, cg, k, k))
    elif codes_kind == "01":
        codes = rng.integers(0, 2, (cout, cg, k, k))
    else:  # wide fixed point
        codes = rng.integers(-3000, 3001, (cout, cg, k, k))
    if not conv:
        codes = codes.reshape(cout, -1)
    dt = torch.int8 if np.abs(codes).max() < 128 else torch.int16
    q = {"mode": "sign", "scale": 1.0, "lo": -1, "hi": 1}
    if act == "int8":
        q = {"mode": "int8", "scale": 0.05, "lo": -127, "hi": 127}
    elif act == "uint8":
        q = {"mode": "int8", "scale": 0.02, "lo": 0, "hi": 255}
    attrs = {"path": "int", "out": "float", "in_quant": q, "module": "layer",
             "weight_codec": {"_type": "int"}, "act_codec": {"_type": act}}  # fmt: skip
    if conv:
        attrs.update(stride=[stride, stride], padding=[pad, pad], dilation=[1, 1], groups=groups)
    tensors = {
        "codes": torch.from_numpy(codes).to(dt),
        "out_scale": torch.from_numpy(rng.uniform(1e-4, 1e-2, cout).astype(np.float32)),
        "bias": torch.from_numpy(rng.standard_normal(cout).astype(np.float32)),
    }
    if rng.random() < 0.3:
        tensors["offset_scale"] = torch.from_numpy(
            rng.uniform(-1e-3, 1e-3, cout).astype(np.float32)
        )
    ops = [FrozenOp("quantize", "q", ["x"], "q", q),
           FrozenOp("conv" if conv else "linear", "layer", ["q"], "y", attrs, tensors)]  # fmt: skip
    return FrozenModel(ops, "x", "y", {"input_shape": [cin, 9, 11] if conv else [cin * k * k]})


@settings(deadline=None, max_examples=25)
@given(
    seed=st.integers(0, 2**31 - 1),
    cin_mult=st.integers(1, 5),
    cout=st.integers(1, 40),
    k=st.sampled_from([1, 3]),
    stride=st.sampled_from([1, 2]),
    pad=st.sampled_from([0, 1]),
    grouping=st.sampled_from(["none", "groups", "depthwise"]),
    codes_kind=st.sampled_from(["int8", "ternary", "pm1", "01", "wide"]),
    act=st.sampled_from(["int8", "uint8", "sign"]),
    conv=st.booleans(),
)
def test_random_single_layers(
    tmp_path_factory, seed, cin_mult, cout, k, stride, pad, grouping, codes_kind, act, conv
):
    rng = np.random.default_rng(seed)
    groups = 1
    if conv and grouping == "groups":
        groups = int(rng.choice([2, 3]))
        cout = groups * max(1, cout // groups)
    cin = groups * cin_mult * int(rng.choice([1, 13]))
    if conv and grouping == "depthwise":
        groups, cin, cout = cout, cout, cout
    frozen = _single_layer_model(rng, cin, cout, k, stride, pad, groups, codes_kind, act, conv)
    path = tmp_path_factory.mktemp("single") / "m.lowbit"
    save(frozen, path)
    eng = load(path)
    x = rng.standard_normal((2, *frozen.meta["input_shape"])).astype(np.float32) * 3
    want = load_frozen(path)(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(eng(x), want)
    with _cext.disabled():  # the portable numba kernels: the same results
        np.testing.assert_array_equal(eng(x), want)


def test_fused_requant_and_portable_gemm(tmp_path, monkeypatch):
    net = _trained(ChainNet, "ternary", "int8")
    ref, eng = _roundtrip(freeze(net), tmp_path)
    assert [op.attrs["out"] for op in ref.layers()] == ["int", "int", "int", "float"]
    x = _x()
    want = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(eng(x), want)
    with _cext.disabled():  # the numba kernels (the C ones ran above where available)
        np.testing.assert_array_equal(eng(x), want)
        monkeypatch.setattr(K, "HAS_VNNI", False)  # the portable GEMM, same results
        np.testing.assert_array_equal(eng(x), want)


# ------------------------------------------------------------------ zoo models


@pytest.mark.parametrize("name", ["lenet5", "mobilenet_tiny", "resnet20"])
def test_zoo_prom(name, tmp_path):
    from lowbit import models

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        net = compress_(models.create(name), "prom")
    shape = models.default_input_shape(name)
    net.train()
    with torch.no_grad():  # calibrate the int8 activation scales
        for _ in range(3):
            net(torch.randn(16, *shape))
    net.eval()
    ref, eng = _roundtrip(freeze(net), tmp_path)
    x = _x(4, shape)
    want = ref(torch.from_numpy(x)).numpy()
    got = eng(x)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL * np.abs(want).max())
    assert (got.argmax(1) == want.argmax(1)).all()
    prof = eng.profile(x)
    assert [r["name"] for r in prof] == [op.name for op in ref.ops]
    assert all(r["ms"] >= 0 for r in prof)
    assert sum(r.get("macs", 0) for r in prof) > 0


class ConvOut(nn.Module):
    """Ends in a conv: the Engine writes that layer's output NCHW."""

    default_input_shape = (3, 8, 8)

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 6, 1, stride=2)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)))


def test_profile_counts_macs_of_nchw_outputs(tmp_path):
    net = compress_(ConvOut(), _recipe("int8", "int8"))
    with torch.no_grad():  # int8 activation ranges
        net.train()(torch.randn(8, 3, 8, 8))
    _, eng = _roundtrip(freeze(net.eval()), tmp_path)
    macs = {r["name"]: r["macs"] for r in eng.profile(_x(2, (3, 8, 8))) if "macs" in r}
    assert eng.steps[-1].layer.nchw_out  # the case the count once got wrong
    assert macs == {"c1": 2 * 8 * 8 * 8 * 27, "c2": 2 * 4 * 4 * 6 * 8}


# ------------------------------------------------------------------ errors and isolation


def test_input_checks_and_bad_files(tmp_path):
    _, eng = _roundtrip(freeze(_trained(ChainNet, "int8", "int8", steps=1)), tmp_path)
    assert eng.input_shape == (3, 16, 16) and eng.meta["input_shape"] == [3, 16, 16]
    with pytest.raises(ValueError, match="input shape"):
        eng(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="float32"):
        eng(np.zeros((1, 3, 16, 16), np.int64))
    with pytest.raises(ValueError, match="numpy"):
        eng([[0.0]])
    bad = tmp_path / "bad.lowbit"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(FormatError):
        load(bad)


def test_unsupported_op_is_named(tmp_path, monkeypatch):
    from lowbit import freeze as fz

    frozen = freeze(_trained(ChainNet, "int8", "int8", steps=1))
    frozen.ops[-1].kind = "softmax"
    monkeypatch.setattr(fz, "KINDS", (*fz.KINDS, "softmax"))
    path = tmp_path / "m.lowbit"
    save(frozen, path)
    with pytest.raises(FormatError, match="'fc'.*softmax"):
        load(path)


def test_runs_without_torch(tmp_path):
    """import lowbit.runtime and run an engine with torch unimportable and the portable
    (VNNI-less) GEMM; the result equals the in-process reference."""
    ref, _ = _roundtrip(freeze(_trained(ChainNet, "binary", "sign", steps=2)), tmp_path,
                        warmup=False)  # fmt: skip
    x = _x(3)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "want.npy", ref(torch.from_numpy(x)).numpy())
    code = textwrap.dedent(f"""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, _Block())
        import numpy as np
        import lowbit.runtime as rt
        from lowbit.runtime import kernels
        assert not kernels.HAS_VNNI
        eng = rt.load({str(tmp_path / "m.lowbit")!r})
        got = eng(np.load({str(tmp_path / "x.npy")!r}))
        np.testing.assert_array_equal(got, np.load({str(tmp_path / "want.npy")!r}))
        assert "torch" not in sys.modules
        print("ok", sorted(set(eng.kernels().values())))
    """)
    env = {**os.environ, "LOWBIT_NO_VNNI": "1"}
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    assert "ok" in r.stdout and "xnor" in r.stdout


def test_threads_same_result(tmp_path, monkeypatch):
    monkeypatch.setattr(_cext, "PARALLEL_MIN_NS", 0)  # split even these small layers
    path = tmp_path / "m.lowbit"
    save(freeze(_trained(ChainNet, "ternary", "int8", steps=1)), path)
    x = _x(4)
    a = load(path, threads=1)(x)
    b = load(path, threads=min(2, K.numba.config.NUMBA_NUM_THREADS))(x)
    np.testing.assert_array_equal(a, b)


def test_bench_compare(tmp_path):
    from lowbit.runtime.bench import compare

    path = tmp_path / "m.lowbit"
    save(freeze(_trained(ChainNet, "int8", "int8", steps=1)), path)
    r = compare(path, repeats=3, warmup=1, onnx=False, per_layer=True)
    assert r["lowbit_ms"] > 0 and r["torch_fp32_ms"] > 0 and r["onnxruntime_int8_ms"] is None
    assert r["speedup_vs_torch_fp32"] > 0 and r["machine"]["threads"] == 1
    assert r["agreement_top1_vs_fp32"] is not None and r["peak_rss_mb"] > 0
    assert {row["name"] for row in r["per_layer"]} >= {"c1", "fc"}


def test_bench_onnxruntime_peers(tmp_path):
    """The ONNX Runtime columns: the file's network exported to ONNX, run in fp32 and
    statically quantized to int8; both timed, and the fp32 export agrees with lowbit."""
    pytest.importorskip("onnxruntime", reason="pip install 'lowbit[onnx]'")
    from lowbit.runtime.bench import compare

    path = tmp_path / "m.lowbit"
    save(freeze(_trained(ChainNet, "int8", "int8", steps=1)), path)
    r = compare(path, repeats=2, warmup=1, onnx=True)
    assert r["onnxruntime_fp32_ms"] > 0 and r["onnxruntime_int8_ms"] > 0
    assert r["speedup_vs_onnxruntime_int8"] == pytest.approx(
        r["onnxruntime_int8_ms"] / r["lowbit_ms"], rel=0.01
    )
    assert "static QDQ" in r["notes"]["onnxruntime_int8"]
    assert r["machine"]["versions"]["onnxruntime"]
