"""freeze: the frozen (integer) model reproduces the QAT model; the packed file round-trips."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import data, transforms
from lowbit.errors import FormatError
from lowbit.fileformat import pack_base3, pack_bits, read, unpack_base3, unpack_bits
from lowbit.freeze import FreezeError, FrozenModel, freeze
from lowbit.packfile import load_frozen, save
from lowbit.recipes import Recipe, Rule, compress_


class ResGroupNet(nn.Module):
    """A user model: stem, a residual block with a grouped conv, BN, ReLU6, max-pool, a
    strided option-A style shortcut (slice + pad), global pooling, a linear head."""

    default_input_shape = (1, 28, 28)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 16, 1, bias=False)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pool(torch.relu(self.bn0(self.stem(x))))
        x = x + F.relu6(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(x)))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        y = torch.relu(self.pw(y) + short)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(y, 1), 1))


@pytest.fixture(scope="module")
def sample():
    train = data.load("sample", "train").subset(1024)
    test = data.load("sample", "test")
    tf = transforms.test_transform("sample")
    xtr = tf(torch.as_tensor(train.images))
    xte = tf(torch.as_tensor(test.images))
    return xtr, torch.as_tensor(train.labels).long(), xte, torch.as_tensor(test.labels).long()


def _train(net, x, y, steps=60, lr=0.05):
    torch.manual_seed(0)
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    net.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(net(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    return net


@pytest.fixture(scope="module")
def fp_net(sample):
    xtr, ytr, _, _ = sample
    torch.manual_seed(0)
    return _train(ResGroupNet(), xtr, ytr, steps=80)


CODECS = [
    ("int8", "int8"),
    ("int4", "int8"),
    ("ternary", "int8"),
    ({"_type": "ternary", "_data": {"packing": "base3", "per_channel": False}}, "int8"),
    ({"_type": "fixed", "_data": {"integer_bits": 0, "fraction_bits": 5}}, "int8"),
    ("binary", "sign"),
    ("binary01", "int8"),
    ("binaryab", "int8"),
    ("binaryab", "sign"),
    ("ternary", "float"),
    ("fp16", "float"),
]


def _recipe(w, a) -> Recipe:
    # first and last layers at int8 as the methods do; the codec under test elsewhere
    return Recipe("test", [
        Rule(select="all", weights=w, activations=a),
        Rule(select="first", weights="int8", activations="int8"),
        Rule(select="last", weights="int8", activations="int8"),
    ])  # fmt: skip


@pytest.mark.parametrize("w,a", CODECS, ids=[f"{json.dumps(w)}-{a}" for w, a in CODECS])
def test_frozen_model_reproduces_qat_model(fp_net, sample, tmp_path, w, a):
    xtr, ytr, xte, _ = sample
    net = compress_(copy.deepcopy(fp_net), _recipe(w, a))
    _train(net, xtr, ytr, steps=30, lr=0.01)
    before = copy.deepcopy(net.state_dict())
    frozen = freeze(net)
    # the QAT model is untouched and stays in its mode
    assert not net.training
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    with torch.no_grad():
        ref = net(xte)
    got = frozen(xte)
    agree = (ref.argmax(1) == got.argmax(1)).float().mean().item()
    assert agree >= 0.999, agree
    assert torch.allclose(got, ref, atol=0.05 * ref.abs().max().item())
    # the packed file gives the very same outputs
    path = tmp_path / "m.lowbit"
    info = save(frozen, path)
    assert info["bytes"] == path.stat().st_size
    again = load_frozen(path)
    assert torch.equal(again(xte[:64]), frozen(xte[:64]))


def test_integer_layers_use_fused_requantization(fp_net):
    net = compress_(copy.deepcopy(fp_net), _recipe("int8", "int8"))
    net.train()
    with torch.no_grad():
        net(torch.randn(32, 1, 28, 28))
    frozen = freeze(net)
    outs = {op.attrs["module"]: op.attrs["out"] for op in frozen.layers()}
    # conv2 -> BN -> ReLU -> pw: requantized to int8 inside conv2
    assert outs["conv2"] == "int"
    # the stem's output is read twice (conv1 and the residual addition); pw feeds an
    # addition: float outputs
    assert outs["stem"] == "float" and outs["pw"] == "float"
    # BatchNorm is folded: no affine op left
    assert not [op for op in frozen.ops if op.kind == "affine"]
    conv2 = next(op for op in frozen.layers() if op.attrs["module"] == "conv2")
    assert {"bias_q", "m", "n"} <= set(conv2.tensors) and conv2.attrs["lo"] == 0


@pytest.mark.filterwarnings("ignore:recipe rule")
def test_zoo_models_freeze(sample):
    from lowbit import models

    for name in ["lenet5", "resnet20", "mobilenet_tiny"]:
        net = compress_(models.create(name), "prom")
        net.train()
        shape = models.default_input_shape(name)
        with torch.no_grad():
            net(torch.randn(8, *shape))
        net.eval()
        frozen = freeze(net)
        x = torch.randn(4, *shape)
        with torch.no_grad():
            ref = net(x)
        assert torch.allclose(frozen(x), ref, atol=0.05 * ref.abs().max().item()), name


def test_freeze_before_any_data_is_a_clear_error(fp_net):
    net = compress_(copy.deepcopy(fp_net), "prom")
    with pytest.raises(FreezeError, match="never set"):
        freeze(net)


def test_unsupported_op_is_named(fp_net):
    class Odd(nn.Module):
        default_input_shape = (4,)

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return torch.sigmoid(self.fc(x))

    with pytest.raises(FreezeError, match="sigmoid"):
        freeze(Odd())

    class Branchy(nn.Module):
        default_input_shape = (4,)

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(FreezeError, match="trace"):
        freeze(Branchy())


def test_frozen_input_checks(fp_net):
    frozen = freeze(fp_net)
    with pytest.raises(ValueError, match="input shape"):
        frozen(torch.zeros(2, 3, 28, 28))
    with pytest.raises(TypeError, match="float"):
        frozen(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))


def test_graph_round_trip_through_json(fp_net):
    net = compress_(copy.deepcopy(fp_net), _recipe("ternary", "int8"))
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 1, 28, 28))
    frozen = freeze(net)
    graph = json.loads(json.dumps(frozen.graph()))
    again = FrozenModel.from_parts(graph, frozen.tensors())
    x = torch.randn(3, 1, 28, 28)
    assert torch.equal(again(x), frozen(x))
    assert "conv" in frozen.summary()


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 7, 8, 12])
def test_pack_bits_round_trip(bits):
    rng = np.random.default_rng(bits)
    lo = -(2 ** (bits - 1))
    codes = rng.integers(lo, lo + 2**bits, size=(5, 7, 3))
    packed = pack_bits(codes, lo, bits)
    assert packed.nbytes == -(-codes.size * bits // 8)
    assert np.array_equal(unpack_bits(packed, codes.size, lo, bits).reshape(codes.shape), codes)
    with pytest.raises(ValueError, match="cannot use"):
        pack_bits(np.array([lo + 2**bits]), lo, bits)


def test_pack_base3_round_trip():
    codes = np.random.default_rng(0).integers(-1, 2, size=1003)
    packed = pack_base3(codes)
    assert packed.nbytes == 201  # 5 trits per byte: 1.6 bits per weight
    assert np.array_equal(unpack_base3(packed, codes.size), codes)


def test_packed_file_is_as_small_as_the_codes(fp_net, tmp_path):
    net = compress_(copy.deepcopy(fp_net), Recipe("t", [Rule(select="all", weights="binary",
                                                             activations="sign")]))  # fmt: skip
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 1, 28, 28))
    frozen = freeze(net)
    save(frozen, tmp_path / "b.lowbit")
    from safetensors.numpy import load_file

    arrays = load_file(tmp_path / "b.lowbit")
    for op in frozen.layers():
        n = op.tensors["codes"].numel()
        assert arrays[f"{op.name}/codes"].nbytes == -(-n // 8), op.name  # one bit per weight
    loaded = read(tmp_path / "b.lowbit")
    assert loaded.graph["format_version"] == 1 and loaded.meta["input_shape"] == [1, 28, 28]


def test_bad_files_are_clear_errors(tmp_path, fp_net):
    with pytest.raises(FileNotFoundError):
        load_frozen(tmp_path / "missing.lowbit")
    junk = tmp_path / "junk.lowbit"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(FormatError, match="not a lowbit file"):
        load_frozen(junk)
    from safetensors.numpy import save_file

    other = tmp_path / "other.safetensors"
    save_file({"a": np.zeros(3, np.float32)}, other)
    with pytest.raises(FormatError, match="marker"):
        load_frozen(other)
    # a newer file version is refused with a hint
    path = tmp_path / "m.lowbit"
    save(freeze(fp_net), path)
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    header["__metadata__"]["lowbit.format_version"] = "99.0"
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    newer = tmp_path / "newer.lowbit"
    newer.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    with pytest.raises(FormatError, match="newer"):
        load_frozen(newer)
    with pytest.raises(TypeError, match="FrozenModel"):
        save(fp_net, tmp_path / "x.lowbit")


def test_functional_pooling_freezes():
    class M(nn.Module):
        default_input_shape = (1, 8, 8)

        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(1, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 2 * 2, 3)

        def forward(self, x):
            x = F.max_pool2d(torch.relu(self.c(x)), 2)
            x = F.avg_pool2d(x, kernel_size=2, stride=2)
            return self.fc(torch.flatten(x, 1))

    m = M().eval()
    frozen = freeze(m)
    assert [op.kind for op in frozen.ops][1:4] == ["relu", "maxpool", "avgpool"]
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(frozen(x), m(x), atol=1e-6)


@pytest.mark.parametrize("gamma", [1.0, 1e-9, -1e-9, 1e-12, 0.0])
def test_tiny_batchnorm_gamma_and_one_sided_clamp(gamma):
    """A BN gamma near 0 makes a channel constant: the fused requantization must not
    overflow (it used to wrap in int64); clamp(max=6) alone must freeze."""

    class M(nn.Module):
        default_input_shape = (2, 6, 6)

        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(2, 4, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(4)
            self.c2 = nn.Conv2d(4, 3, 1)
            self.fc = nn.Linear(3 * 36, 2)

        def forward(self, x):
            x = self.c2(torch.relu(self.bn(self.c1(x)))).clamp(max=6)
            return self.fc(x.flatten(1))

    torch.manual_seed(0)
    m = compress_(M(), Recipe("t", [Rule(select="all", weights="int8", activations="int8")]))
    m.train()
    with torch.no_grad():
        for _ in range(3):
            m(torch.randn(16, 2, 6, 6))
        m.bn.weight[0] = gamma
        m.bn.bias[0] = 2.0
    m.eval()
    frozen = freeze(m)
    assert [op.attrs["out"] for op in frozen.layers()] == ["int", "int", "float"]
    x = torch.randn(8, 2, 6, 6)
    with torch.no_grad():
        assert torch.allclose(frozen(x), m(x), atol=1e-5)
    with pytest.raises(FreezeError, match="mean"):

        class G(M):
            def forward(self, x):
                return self.fc(self.c2(self.c1(x)).flatten(1)) + x.mean(3).mean(2).sum()

        freeze(G())
