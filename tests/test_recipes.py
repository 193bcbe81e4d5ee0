"""Recipes, compress_ on zoo and user models, and the cost model's worked check."""

import pytest
import torch
from torch import nn

import lowbit.recipes as R
from lowbit import models
from lowbit.codecs import Int, Int8Act, Ternary
from lowbit.cost import analyze
from lowbit.layers import QuantConv2d, QuantLinear
from lowbit.train import build_from_checkpoint, save_checkpoint


class UserNet(nn.Module):
    """A user model: residual connection and a grouped convolution."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.point = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + torch.relu(self.point(self.grouped(x)))  # residual
        return self.head(x.mean((2, 3)))


def test_compress_user_model_with_residual_and_groups():
    net = UserNet()
    x = torch.randn(4, 3, 8, 8)
    R.compress_(net, "prom", example_input=x[:1])
    assert isinstance(net.stem, QuantConv2d) and net.stem.weight_codec == Int(8)
    assert isinstance(net.point, QuantConv2d) and net.point.weight_codec == Ternary()
    assert isinstance(net.grouped, QuantConv2d) and net.grouped.weight_codec == Int(8)
    assert isinstance(net.head, QuantLinear)
    out = net(x)
    out.sum().backward()  # trains: gradients reach the shadow weights
    assert out.shape == (4, 5) and net.point.weight.grad is not None


def test_prom_ternary_rule_option():
    net = UserNet()
    R.compress_(
        net, R.recipe("prom", ternary_rule="twn", ternary_delta=0.6), torch.randn(1, 3, 8, 8)
    )
    assert net.point.weight_codec == Ternary(rule="twn", delta=0.6)
    assert net.grouped.weight_codec == Int(8)  # only the pointwise rule changes
    with pytest.raises(ValueError, match="rule must be one of"):
        R.recipe("prom", ternary_rule="bitnet")


def test_first_last_and_last_rule_wins():
    net = UserNet()
    recipe = R.Recipe(
        "custom",
        [
            R.Rule(select="all", weights="int8", activations="int8"),
            R.Rule(select="first", weights="float", activations="float"),
            R.Rule(select="last", weights="int4", activations="int8"),
        ],
    )
    kinds = R.layer_kinds(net, torch.zeros(1, 3, 8, 8))
    assert list(kinds) == ["stem", "grouped", "point", "head"]  # execution order
    assert kinds["point"] == {"pointwise"} and kinds["stem"] == {"conv", "first"}
    R.compress_(net, recipe, torch.zeros(1, 3, 8, 8))
    assert isinstance(net.stem, QuantConv2d) and str(net.stem.weight_codec).startswith("Float")
    assert net.head.weight_codec == Int(4)
    assert net.point.act.codec == Int8Act()


def test_rule_matching_nothing_is_an_error():
    net = models.create("lenet300")
    with pytest.raises(ValueError, match=r"rule 2 \(select='depthwise'\) matches no layer"):
        R.compress_(
            net,
            R.Recipe("x", [R.Rule(select="all", weights="int8", activations="float"),
                           R.Rule(select="depthwise", weights="ternary", activations="int8")]),
        )  # fmt: skip


def test_recipe_files(tmp_path):
    (tmp_path / "r.toml").write_text(
        'method = "custom"\n[[rules]]\nselect = "all"\nweights = "int8"\nactivations = "int8"\n'
        '[[rules]]\nname = "f?"\nweights = "ternary"\nactivations = "int8"\n'
    )
    recipe = R.Recipe.load(tmp_path / "r.toml")
    net = R.compress_(models.create("mobilenetv2", width=0.25), recipe)
    assert net.fc.weight_codec == Ternary()
    (tmp_path / "bad.toml").write_text('[[rules]]\nselect = "all"\nwieghts = "int8"\n')
    with pytest.raises(ValueError, match="unknown key.*wieghts"):
        R.Recipe.load(tmp_path / "bad.toml")
    (tmp_path / "bad2.yaml").write_text(
        "rules:\n- select: all\n  weights: int3x\n  activations: int8\n"
    )
    with pytest.raises(ValueError, match="unknown weight codec 'int3x'"):
        R.Recipe.load(tmp_path / "bad2.yaml")
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        R.recipe("nope")
    round_trip = R.Recipe.from_dict(R.recipe("prom").to_dict())
    assert round_trip.rules == R.recipe("prom").rules


def test_qat_checkpoint_rebuilds(tmp_path):
    net = R.compress_(models.create("lenet5"), "prom")
    net.train()
    net(torch.randn(8, 1, 28, 28))  # sets the activation ranges
    net.eval()
    save_checkpoint(
        tmp_path / "q.pt",
        {"model": {"name": "lenet5", "kwargs": {}, "num_classes": 10, "input_shape": [1, 28, 28]},
         "state_dict": net.state_dict(), "recipe": net.lowbit_recipe.to_dict()},
    )  # fmt: skip
    net2, _ = build_from_checkpoint(tmp_path / "q.pt")
    x = torch.randn(3, 1, 28, 28)
    torch.testing.assert_close(net2.eval()(x), net(x))


@pytest.mark.parametrize(
    "convention, expected", [("operand-width", 28.9), ("int32-accumulate", 12.3)]
)
def test_prom_energy_worked_check(convention, expected):
    """methods.md: MobileNetV2-224 under PROM against fp16."""
    net = R.compress_(models.create("mobilenetv2_224"), "prom")
    report = analyze(net, convention=convention)
    assert report["totals"]["macs"] == pytest.approx(300.8e6, rel=0.002)
    assert report["ratios"]["energy_vs_fp16"] == pytest.approx(expected, abs=0.06)


def test_storage_counts_everything():
    net = models.create("lenet300")
    fp = analyze(net)
    assert fp["totals"]["storage_bytes"] == 4 * 266_610  # fp32: every parameter
    R.compress_(net, R.Recipe("x", [R.Rule(select="all", weights="int8", activations="int8")]))
    q = analyze(net)
    expected_bits = 266_200 * 8 + 3 * (2 * 32) * 0  # weights
    expected_bits += (300 + 100 + 10) * 32  # per-channel scales
    expected_bits += (300 + 100 + 10) * 32  # int32 biases
    expected_bits += 3 * 32  # input scales
    assert q["totals"]["storage_bytes"] == expected_bits / 8
    assert q["ratios"]["storage_vs_fp32"] == pytest.approx(4 * 266_610 / (expected_bits / 8))
