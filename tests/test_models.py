"""The model zoo, the registry and the cost counting."""

from __future__ import annotations

import pickle
import sys
import textwrap

import pytest
import torch
import torch.fx
from torch import nn

from lowbit import models
from lowbit.models import ModelError

ZOO = [
    "lenet300",
    "lenet5",
    "mobilenet_tiny",
    "mobilenetv2",
    "mobilenetv2_224",
    "resnet18",
    "resnet20",
    "vgg_small",
]


def test_available_is_sorted_zoo():
    assert models.available() == ZOO
    for name in ZOO:
        assert models.describe(name)
        assert len(models.default_input_shape(name)) == 3


@pytest.mark.parametrize("name", ZOO)
def test_forward_default_shape(name):
    torch.manual_seed(0)
    net = models.create(name)
    shape = models.default_input_shape(name)
    assert net.default_input_shape == shape
    n = 1000 if name == "mobilenetv2_224" else 10
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(2, *shape))
    assert out.shape == (2, n)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ZOO)
def test_fx_traceable_and_picklable(name):
    net = models.create(name).eval()
    gm = torch.fx.symbolic_trace(net)
    x = torch.randn(1, *models.default_input_shape(name))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), net(x))
    net2 = pickle.loads(pickle.dumps(net))
    with torch.no_grad():
        torch.testing.assert_close(net2(x), net(x))


def test_counts_lenet():
    assert models.count_params(models.create("lenet300")) == 266_610
    assert models.count_params(models.create("lenet5")) == 431_080
    # lenet300: 784*300 + 300*100 + 100*10 MACs
    assert models.count_macs(models.create("lenet300")) == 784 * 300 + 300 * 100 + 100 * 10


def test_counts_resnet20():
    net = models.create("resnet20")
    params, macs = models.count_params(net), models.count_macs(net)
    print(f"resnet20: {params:,} params, {macs:,} MACs")
    assert abs(params - 0.27e6) / 0.27e6 < 0.01
    assert abs(macs - 41e6) / 41e6 < 0.05
    # option A shortcuts are parameter free; option B adds two 1x1 conv + BN
    assert not any(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in net.modules())
    b = models.create("resnet20", shortcut="B")
    assert models.count_params(b) - params == (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)


def test_counts_resnet18_vgg_small():
    r18 = models.create("resnet18")
    assert abs(models.count_params(r18) - 11.17e6) / 11.17e6 < 0.01
    assert abs(models.count_macs(r18) - 0.56e9) / 0.56e9 < 0.02
    vgg = models.create("vgg_small")
    assert abs(models.count_params(vgg) - 4.66e6) / 4.66e6 < 0.01
    assert abs(models.count_macs(vgg) - 0.61e9) / 0.61e9 < 0.01


def test_counts_mobilenetv2():
    net = models.create("mobilenetv2_224")
    params, macs = models.count_params(net), models.count_macs(net)
    print(f"mobilenetv2_224: {params:,} params, {macs:,} MACs")
    assert abs(params - 3.5e6) / 3.5e6 < 0.02
    assert abs(macs - 300e6) / 300e6 < 0.05
    cifar = models.create("mobilenetv2")
    assert abs(models.count_params(cifar) - 2.24e6) / 2.24e6 < 0.01
    # same weights but the classifier: 1280*(1000-10) + (1000-10)
    assert params - models.count_params(cifar) == 1281 * 990


def test_width_multiplier_shrinks():
    for name in ("vgg_small", "resnet20", "resnet18", "mobilenetv2"):
        full = models.count_params(models.create(name))
        half = models.count_params(models.create(name, width=0.5))
        assert half < full, name
    q = models.create("vgg_small", width=0.25)
    convs = [m.out_channels for m in q.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [32, 32, 64, 64, 128, 128]
    assert q.fc.in_features == 128 * 4 * 4
    # strings from the command line are accepted
    assert models.count_params(models.create("vgg_small", width="0.25")) == models.count_params(q)


def test_mobilenetv2_channels_divisible_by_8():
    net = models.create("mobilenetv2", width=0.35)
    for m in net.modules():
        if isinstance(m, nn.Conv2d) and m.groups == 1 and m.in_channels != 3:
            assert m.out_channels % 8 == 0


def test_lenet5_other_input_shape():
    net = models.create("lenet5", num_classes=7, input_shape=(3, 32, 32))
    assert net.default_input_shape == (3, 32, 32)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    assert net.fc1.in_features == 50 * 5 * 5
    with pytest.raises(ModelError, match="16x16"):
        models.create("lenet5", input_shape=(1, 12, 12))


def test_other_shapes_and_classes():
    net = models.create("resnet20", num_classes=100, input_shape=(1, 28, 28))
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 100)
    net = models.create("lenet300", input_shape=(3, 32, 32))
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    net = models.create("vgg_small", width=0.125, input_shape=(1, 28, 28))
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert models.create("mobilenetv2_224", num_classes=10).fc.out_features == 10


def test_layer_table():
    rows = models.layer_table(models.create("mobilenetv2"))
    kinds = {r["kind"] for r in rows}
    assert kinds == {"conv", "pointwise", "depthwise", "linear"}
    assert rows[0]["name"] == "features.0.0" and rows[0]["in_shape"] == (3, 32, 32)
    assert rows[-1]["name"] == "fc" and rows[-1]["kind"] == "linear"
    assert sum(r["macs"] for r in rows) == models.count_macs(models.create("mobilenetv2"))
    r20 = models.layer_table(models.create("resnet20"))
    assert [r["name"] for r in r20][:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert r20[0]["macs"] == 32 * 32 * 16 * 27
    assert r20[0]["params"] == 16 * 27
    assert r20[-1]["out_shape"] == (10,)
    # an explicit shape overrides the default; the training mode survives the count
    net = models.create("resnet20").train()
    fc = 64 * 10  # the only cost that does not scale with the image size
    assert (models.count_macs(net, (3, 16, 16)) - fc) * 4 == models.count_macs(net) - fc
    assert net.training and net.bn1.training


def test_count_needs_a_shape():
    with pytest.raises(ModelError, match="input_shape"):
        models.count_macs(nn.Sequential(nn.Linear(4, 2)))
    assert models.count_macs(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), (1, 2, 2)) == 8


def test_unknown_name_lists_valid_names():
    with pytest.raises(ModelError) as e:
        models.create("resnet21")
    msg = str(e.value)
    assert "resnet21" in msg and "resnet20" in msg and "package.module:factory" in msg
    with pytest.raises(ModelError, match="lenet300"):
        models.build("nope")
    assert isinstance(e.value, ValueError)
    for fn in (models.describe, models.default_input_shape):
        with pytest.raises(ModelError):
            fn("nope")


def test_bad_kwarg_names_it_and_the_valid_ones():
    with pytest.raises(ModelError) as e:
        models.create("resnet20", widht=0.5)
    msg = str(e.value)
    assert "widht" in msg and "width" in msg and "shortcut" in msg
    with pytest.raises(ModelError, match="width"):
        models.create("vgg_small", width=-1)
    with pytest.raises(ModelError, match="shortcut"):
        models.create("resnet20", shortcut="C")
    with pytest.raises(ModelError, match="option"):
        models.create("lenet5", bn=True)
    with pytest.raises(ModelError, match="input_shape"):
        models.create("lenet5", input_shape=(28, 28))
    with pytest.raises(ModelError, match="num_classes"):
        models.create("lenet5", num_classes=0)


USER_MODULE = """
from torch import nn

def make(num_classes, input_shape=(1, 8, 8), hidden=16):
    c, h, w = input_shape
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * w, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))

def only_classes(num_classes):
    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))

def anything(**kw):
    make.seen = kw
    return nn.Linear(2, kw.get("num_classes", 3))

def broken(num_classes):
    return len(num_classes)  # a TypeError from inside the factory

NOT_CALLABLE = 3

def not_a_module(num_classes):
    return "model"
"""


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    pkg = tmp_path / "myzoo"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "myzoo.nets"
    for mod in ("myzoo.nets", "myzoo"):
        sys.modules.pop(mod, None)


def test_user_factory(user_pkg):
    net = models.build(f"{user_pkg}:make", num_classes=4, input_shape=(2, 4, 4), hidden=8)
    assert net(torch.randn(2, 2, 4, 4)).shape == (2, 4)
    assert net.default_input_shape == (2, 4, 4)
    # no shape given: the factory's own default is recorded for cost analysis
    net = models.build(f"{user_pkg}:make", num_classes=3)
    assert net.default_input_shape == (1, 8, 8)
    assert models.count_macs(net) == 64 * 16 + 16 * 3
    # a factory that takes no input_shape still gets the attribute
    net = models.build(f"{user_pkg}:only_classes", num_classes=5, input_shape=(1, 8, 8))
    assert net(torch.randn(2, 1, 8, 8)).shape == (2, 5)
    assert net.default_input_shape == (1, 8, 8)
    # **kwargs factories get everything that is given
    mod = sys.modules[user_pkg]
    models.build(f"{user_pkg}:anything", num_classes=2, input_shape=(1, 1, 2), x=1)
    assert mod.make.seen == {"num_classes": 2, "input_shape": (1, 1, 2), "x": 1}
    models.build(f"{user_pkg}:anything")
    assert mod.make.seen == {}
    # create() hands specs to build(), and load_factory returns the callable
    assert models.create(f"{user_pkg}:make", num_classes=2)[-1].out_features == 2
    assert models.load_factory(f"{user_pkg}:make") is mod.make


def test_user_factory_errors(user_pkg):
    with pytest.raises(ModelError, match="no_such_module"):
        models.build("no_such_module.x:make", num_classes=2)
    with pytest.raises(ModelError, match="no attribute 'missing'"):
        models.build(f"{user_pkg}:missing", num_classes=2)
    with pytest.raises(ModelError, match="not a callable"):
        models.load_factory(f"{user_pkg}:NOT_CALLABLE")
    with pytest.raises(ModelError, match="package.module:factory"):
        models.load_factory(f"{user_pkg}:")
    with pytest.raises(ModelError, match="hiden"):
        models.build(f"{user_pkg}:make", num_classes=2, hiden=3)
    with pytest.raises(ModelError, match="cannot build"):
        models.build(f"{user_pkg}:broken", num_classes=2)
    with pytest.raises(ModelError, match="not a torch.nn.Module"):
        models.build(f"{user_pkg}:not_a_module", num_classes=2)


def test_state_dict_roundtrip_through_build():
    torch.manual_seed(0)
    a = models.build("resnet20", num_classes=10, input_shape=(3, 32, 32), width=0.5)
    b = models.build("resnet20", num_classes=10, input_shape=(3, 32, 32), width=0.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(a.eval()(x), b.eval()(x))
