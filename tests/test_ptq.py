"""Post-training quantization: calibration rules, BatchNorm re-estimation, the PTQ job."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.cli import main
from lowbit.codecs import Int, Ternary
from lowbit.freeze import freeze
from lowbit.methods.sst import IdentityInitBatchNorm2d
from lowbit.ptq import (
    Calibration,
    _mse_clip,
    activations_in_float,
    calibrate_activations,
    correct_batchnorm,
    parse_weight_codec,
    ptq_,
    uniform_recipe,
)
from lowbit.recipes import Recipe, Rule, compress_


def _linear_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))


def _recipe(act="int8"):
    return Recipe("t", [Rule(Int(8), act, select="all")])


def test_minmax_scale_and_sign_from_the_data():
    net = _linear_model()
    x = torch.randn(200, 1, 4, 4)
    compress_(net, _recipe(), x[:1])
    rep = calibrate_activations(net, x, Calibration(method="minmax"))
    first, second = rep["1"], rep["3"]
    assert first["signed"] and first["clip"] == pytest.approx(float(x.abs().max()))
    assert net[1].act.scale.item() == pytest.approx(float(x.abs().max()) / 127, rel=1e-6)
    with torch.no_grad(), activations_in_float(net):  # what calibration observed
        hidden = torch.relu(net[1](x.flatten(1)))
    assert not second["signed"]  # ReLU output: unsigned grid 0..255
    assert second["clip"] == pytest.approx(float(hidden.max()), rel=1e-5)
    assert net[3].act.qrange() == (0, 255)


def test_percentile_ignores_an_outlier_that_minmax_keeps():
    net = _linear_model()
    x = torch.randn(400, 1, 4, 4)
    x[0, 0, 0, 0] = 500.0  # one huge value
    mm = calibrate_activations(compress_(_linear_model(), _recipe(), x[:1]), x,
                               Calibration(method="minmax"))["1"]["clip"]  # fmt: skip
    compress_(net, _recipe(), x[:1])
    pc = calibrate_activations(net, x, Calibration(method="percentile", percentile=99.9))
    assert mm == pytest.approx(500.0)
    # the 99.9th percentile of |N(0,1)| is about 3.3: the histogram bin holding it
    assert 2.5 < pc["1"]["clip"] < 4.5


def _real_mse(v: torch.Tensor, clip: float, qmax: int) -> float:
    s = clip / qmax
    q = torch.clamp(torch.round(v / s), 0, qmax) * s
    return float(((q - v) ** 2).sum())


def test_mse_clip_is_near_the_brute_force_optimum():
    torch.manual_seed(1)
    v = torch.randn(20000).abs() ** 1.5  # a heavy-ish tailed magnitude sample
    vmax, bins, qmax = float(v.max()), 2048, 127
    h = torch.histc(v, bins=bins, min=0, max=vmax).double()
    width = vmax / bins
    edges = torch.arange(1, bins + 1, dtype=torch.float64) * width
    chosen = _mse_clip(h, edges, width, qmax)
    grid = torch.linspace(0.05 * vmax, vmax, 400)
    best = min(_real_mse(v, float(c), qmax) for c in grid)
    assert _real_mse(v, chosen, qmax) <= 1.05 * best
    assert chosen < vmax  # clipping the tail pays on this sample
    assert _real_mse(v, chosen, qmax) < _real_mse(v, vmax, qmax)


def test_batchnorm_reestimated_under_quantized_weights_and_untrained_bn_left_alone():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
                        nn.Conv2d(6, 4, 1), IdentityInitBatchNorm2d(4))  # fmt: skip
    x = torch.randn(64, 3, 8, 8)
    net[:3].train()
    for _ in range(5):  # give the first BN trained statistics (the identity one: none)
        net[:3](x + 1.0)
    net.eval()
    untouched = net[4].running_mean.clone(), int(net[4].num_batches_tracked)
    compress_(net, Recipe("t", [Rule(Ternary(), "float", select="all")]), x[:1])
    n = correct_batchnorm(net, x, batch_size=16)
    assert n == 1  # only the trained BatchNorm
    with torch.no_grad():
        y = net[0](x)  # the ternary conv's output
    assert torch.allclose(net[1].running_mean, y.mean((0, 2, 3)), atol=1e-4)
    # BatchNorm averages the per-batch variances (batches of 16): close to the total one
    assert torch.allclose(net[1].running_var, y.var((0, 2, 3), unbiased=True), rtol=1e-2)
    assert torch.equal(net[4].running_mean, untouched[0])
    assert int(net[4].num_batches_tracked) == untouched[1]
    assert net[1].momentum == 0.1 and not net.training


def test_ptq_then_freeze_agrees_and_keeps_int8_accuracy(fp_lenet):
    from lowbit import data
    from lowbit.transforms import test_transform

    net, _ = fp_lenet
    te = data.load("sample", "test").subset(300, seed=0)
    tf = test_transform("sample")
    x, y = tf(torch.as_tensor(te.images)), torch.as_tensor(te.labels)
    calib = tf(torch.as_tensor(data.load("sample", "train").subset(256, seed=0).images))
    with torch.no_grad():
        fp_acc = float((net(x).argmax(1) == y).float().mean())
    info = ptq_(net, uniform_recipe("int8", "int8"), calib, Calibration(method="mse"))
    assert info["batchnorms_reestimated"] == 0  # auto: off at 8 bits (and LeNet has none)
    with torch.no_grad():
        q = net(x)
        acc = float((q.argmax(1) == y).float().mean())
    assert acc >= fp_acc - 0.01
    frozen = freeze(net, x[:1])
    assert float((frozen(x).argmax(1) == q.argmax(1)).float().mean()) >= 0.99


def test_ptq_input_errors(fp_lenet):
    net, _ = fp_lenet
    with pytest.raises(ValueError, match="float"):
        ptq_(net, uniform_recipe(), torch.zeros(4, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="non-empty"):
        ptq_(net, uniform_recipe(), torch.zeros(0, 1, 28, 28))
    with pytest.raises(ValueError, match="calibration must be one of"):
        Calibration(method="kl")
    with pytest.raises(ValueError, match="forms"):
        parse_weight_codec("int1")
    assert parse_weight_codec("sst-4-1").n == 4 and parse_weight_codec("int5").bits == 5


@pytest.fixture(scope="module")
def fp_lenet(tmp_path_factory):
    """A LeNet-5 trained briefly on the built-in sample: (model, checkpoint path)."""
    from lowbit.train import TrainConfig, build_from_checkpoint
    from lowbit.workflow import train_model

    out = tmp_path_factory.mktemp("fp")
    cfg = TrainConfig(epochs=1, batch_size=64, lr=0.05, progress=False, seed=0)
    res = train_model("lenet5", "sample", out, cfg, limit_train=2000, limit_test=300)
    net, _ = build_from_checkpoint(res["checkpoint"])
    return net.eval(), res["checkpoint"]


def _cli(capsys, *argv):
    code = main([*argv, "--json"])
    out, err = capsys.readouterr()
    return code, (json.loads(out) if out.strip() else None), err


def test_cli_ptq_writes_a_runnable_file_and_a_qat_start(fp_lenet, tmp_path, capsys):
    _, ckpt = fp_lenet
    code, res, err = _cli(capsys, "ptq", ckpt, "--out", str(tmp_path / "p"), "--weights",
                          "ternary", "--first", "int8", "--last", "int8", "--calib-images",
                          "128", "--limit-test", "300")  # fmt: skip
    assert code == 0, err
    for key in ("method", "model", "test_accuracy", "fp_test_accuracy", "storage_bytes",
                "compression_vs_fp32", "energy_vs_fp16", "density", "out"):  # fmt: skip
        assert key in res
    assert res["ptq"] and res["calibration_images"] == 128
    assert res["frozen_agreement"] >= 0.99 and Path(res["packed"]).is_file()
    assert res["compression_vs_fp32"] > 8  # ternary inside, int8 at the ends
    code, ev, err = _cli(capsys, "eval", "--checkpoint", res["checkpoint"], "--limit-test", "300")
    assert code == 0, err
    assert ev["test_accuracy"] == pytest.approx(res["test_accuracy"])
    # fine-tuning the PTQ checkpoint needs its own recipe's method
    code, out, err = _cli(capsys, "compress", "--method", "prom", "--model", "lenet5",
                          "--data", "sample", "--from", res["checkpoint"],
                          "--out", str(tmp_path / "q"))  # fmt: skip
    assert code != 0 and "lowbit ptq" in out["error"]


def test_cli_ptq_method_then_qat_from_it(fp_lenet, tmp_path, capsys):
    _, ckpt = fp_lenet
    code, res, err = _cli(capsys, "ptq", ckpt, "--out", str(tmp_path / "p"), "--method", "sst",
                          "--calib-images", "64", "--limit-test", "200")  # fmt: skip
    assert code == 0, err
    assert res["method"] == "sst" and res["batchnorms_reestimated"] == 0
    code, q, err = _cli(capsys, "compress", "--method", "sst", "--model", "lenet5", "--data",
                        "sample", "--from", res["checkpoint"], "--epochs", "1",
                        "--limit-train", "512", "--limit-test", "200", "--quiet",
                        "--out", str(tmp_path / "q"))  # fmt: skip
    assert code == 0, err
    assert q["fp_test_accuracy"] == pytest.approx(res["fp_test_accuracy"])
    assert q["fp_checkpoint"] == ckpt
    code, out, err = _cli(capsys, "ptq", ckpt, "--out", str(tmp_path / "x"), "--method", "sst",
                          "--recipe", "r.toml")  # fmt: skip
    assert code != 0 and "one of --recipe and --method" in out["error"]
