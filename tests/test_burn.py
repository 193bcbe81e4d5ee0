"""BURN (lowbit.methods.burn): gradients, the lambda schedule, the loss against a hand
computation, the two stages, the augmentations, collapse signals, resume, options, and the
CLI end to end down to the runtime."""

from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from lowbit import data
from lowbit.cli import main
from lowbit.codecs import Binary, Float, SignAct
from lowbit.errors import TrainingInterrupted
from lowbit.layers import QuantConv2d, QuantLinear
from lowbit.methods import burn
from lowbit.methods.burn import (
    BURNConfig,
    BURNObjective,
    FeatureExtractor,
    burn_loss,
    collapse_stats,
    lambda_at,
    nt_xent,
    two_view_transforms,
)
from lowbit.train import TrainConfig, build_from_checkpoint


class Tiny(nn.Module):
    """A small conv net with BatchNorm: conv-BN-ReLU x2, pool, fc."""

    default_input_shape = (1, 12, 12)

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        return self.fc(self.flatten(self.pool(x)))


EX = torch.zeros(1, 1, 12, 12)


def _cfg(**kw) -> BURNConfig:
    return BURNConfig(**{"head_hidden": 16, "head_dim": 8, **kw})


def _teacher(seed=1) -> FeatureExtractor:
    torch.manual_seed(seed)
    net = Tiny().eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return FeatureExtractor(net, None, EX)


def _objective(objective="burn", stage1=True) -> tuple[BURNObjective, nn.Module]:
    cfg = _cfg(objective=objective)
    torch.manual_seed(0)
    student = Tiny()
    ext = FeatureExtractor(student, None, EX)
    recipe = burn.stage1_recipe(cfg) if stage1 else burn.burn_recipe(**cfg.__dict__)
    from lowbit.recipes import compress_

    compress_(student, recipe, EX)
    teacher = _teacher() if cfg.needs_teacher else None
    return BURNObjective(ext, 16, cfg, teacher, 16 if teacher else None), student


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("stage1", [True, False])
def test_gradients_reach_fp_head_and_student_never_fp_encoder(stage1):
    obj, student = _objective(stage1=stage1)
    obj.train()
    x1, x2 = torch.randn(6, 1, 12, 12), torch.randn(6, 1, 12, 12)
    loss, stats = obj.loss(x1, x2, 3, 10)
    loss.backward()
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert all(not p.requires_grad for p in obj.teacher.parameters())
    fp_head = [p.grad for p in obj.head_fp.parameters()]
    assert all(g is not None for g in fp_head) and sum(float(g.abs().sum()) for g in fp_head) > 0
    assert all(p.grad is not None for p in obj.head_b.parameters())
    # the binarized layer behind the sign activations gets a gradient too
    conv2 = student.conv2
    assert isinstance(conv2, QuantConv2d) and isinstance(conv2.act.codec, SignAct)
    assert float(conv2.weight.grad.abs().sum()) > 0
    assert set(obj.trainable()) == {"student", "head_b", "head_fp"}
    assert 0 <= stats["spread_b"] <= 1 and 0 <= stats["entropy_fp"] <= 1
    assert 0 < stats["spread_enc"] <= 1
    assert stats["lambda"] == pytest.approx(lambda_at(3, 10))


def test_teacher_batchnorm_stays_frozen_in_training():
    obj, _ = _objective()
    before = copy.deepcopy(obj.teacher.net.state_dict())
    obj.train()
    assert not obj.teacher.net.training and obj.student.net.training
    obj.loss(torch.randn(6, 1, 12, 12), torch.randn(6, 1, 12, 12), 0, 1)[0].backward()
    after = obj.teacher.net.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fixed_target_has_no_trainable_fp_head():
    obj, _ = _objective("fixed")
    obj.train()
    assert not obj.head_fp.training
    loss, _ = obj.loss(torch.randn(6, 1, 12, 12), torch.randn(6, 1, 12, 12), 0, 4)
    loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in obj.head_fp.parameters())
    from lowbit.train import make_optimizer

    n_opt = sum(
        p.numel()
        for g in make_optimizer(obj.trainable(), TrainConfig()).param_groups
        for p in g["params"]
    )
    n_student = sum(p.numel() for m in (obj.student.net, obj.head_b) for p in m.parameters())
    assert n_opt == n_student


def test_simclr_objective_needs_no_teacher():
    obj, _ = _objective("simclr")
    loss, stats = obj.loss(torch.randn(6, 1, 12, 12), torch.randn(6, 1, 12, 12), 0, 1)
    assert torch.isfinite(loss) and "spread_b" in stats
    assert set(obj.trainable()) == {"student", "head_b"}


# ----------------------------------------------------------------------------- schedule, loss


def test_lambda_schedule():
    total = 100
    lams = [lambda_at(i, total) for i in range(total + 1)]
    assert lams[0] == pytest.approx(0.1) and lams[-1] == pytest.approx(0.3)
    assert lams[50] == pytest.approx(0.2)
    assert all(b >= a for a, b in zip(lams, lams[1:]))
    i = 17
    expect = 0.3 - (0.3 - 0.1) * (math.cos(math.pi * i / total) + 1) / 2
    assert lams[i] == pytest.approx(expect)
    assert lambda_at(25, 100, 0.2, 0.6) == pytest.approx(
        0.6 - 0.4 * (math.cos(math.pi / 4) + 1) / 2
    )


def _hand_loss(zb1, zb2, zf1, zf2, lam, t, feature=True):
    """An independent per-sample numpy computation of the symmetrized loss."""

    def one(zb, zf):
        total = 0.0
        for b, f in zip(zb, zf):
            cos = float(b @ f / (np.linalg.norm(b) * np.linalg.norm(f)))
            feat = 2 - 2 * cos
            pf = np.exp(f / t) / np.exp(f / t).sum()
            pb = np.exp(b / t) / np.exp(b / t).sum()
            kl = float((pf * np.log(pf / pb)).sum())
            total += ((1 - lam) * feat + lam * kl) if feature else kl
        return total / len(zb)

    return one(zb1, zf2) + one(zb2, zf1)


@pytest.mark.parametrize("feature", [True, False])
def test_loss_matches_hand_computation(feature):
    zb1 = np.array([[1.0, 0.5, -0.3], [0.2, -1.0, 0.4]])
    zb2 = np.array([[0.3, 0.1, 0.9], [-0.5, 0.7, 0.2]])
    zf1 = np.array([[0.8, -0.2, 0.1], [0.0, 0.3, -0.6]])
    zf2 = np.array([[0.1, 0.9, -0.4], [0.6, -0.1, 0.2]])
    t = [torch.tensor(a, dtype=torch.float64) for a in (zb1, zb2, zf1, zf2)]
    loss, terms = burn_loss(*t, lam=0.17, temperature=0.2, feature_term=feature)
    assert float(loss) == pytest.approx(
        _hand_loss(zb1, zb2, zf1, zf2, 0.17, 0.2, feature), rel=1e-9
    )
    assert terms["feat"] >= 0 and terms["kl"] >= 0


def test_loss_is_zero_when_student_equals_target():
    z = torch.randn(5, 7)
    loss, _ = burn_loss(z, z, z, z, lam=0.3)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)


def test_nt_xent_matches_a_loop():
    torch.manual_seed(0)
    p1, p2 = torch.randn(4, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    z = torch.nn.functional.normalize(torch.cat([p1, p2]), dim=1)
    n, t, total = 4, 0.5, 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        den = sum(math.exp(float(z[i] @ z[k]) / t) for k in range(2 * n) if k != i)
        total += -math.log(math.exp(float(z[i] @ z[j]) / t) / den)
    assert float(nt_xent(p1, p2, t)) == pytest.approx(total / (2 * n), rel=1e-9)


def test_collapse_stats_and_warning():
    same = torch.tensor([[3.0, 0, 0, 0, 0, 0, 0, 0]]).repeat(16, 1)
    st = collapse_stats(same)
    assert st["spread"] == pytest.approx(0.0, abs=1e-6) and st["entropy"] < 0.1
    torch.manual_seed(0)
    st = collapse_stats(torch.randn(256, 8) * 5)
    assert st["spread"] > 0.9 and st["entropy"] > 0.8
    logs = []
    check = burn._collapse_warning(_cfg(), "x", logs.append)
    m = {"epoch": 1, "spread_b": 0.01, "entropy_b": 0.5, "spread_fp": 0.5, "entropy_fp": 0.5}
    with pytest.warns(UserWarning, match="collapsed"):
        check(m)
    assert m["collapse"] and "b spread" in logs[0]
    m = {"epoch": 2, "spread_b": 0.6, "entropy_b": 0.5, "spread_enc": 0.001}
    with pytest.warns(UserWarning, match="enc spread"):
        check(m)
    ok = {"epoch": 1, "spread_b": 0.6, "entropy_b": 0.5, "spread_enc": 0.3}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check(ok)
    assert ok["collapse"] is False


def test_output_batchnorm_keeps_a_nearly_constant_head_spread():
    torch.manual_seed(0)
    x = torch.randn(32, 6)
    for out_bn, expect_high in ((True, True), (False, False)):
        head = burn.MLPHead(6, 16, 8, out_bn=out_bn).train()
        last = head.net[3]
        with torch.no_grad():  # a head drifting to a constant: tiny weights, fixed offset
            last.weight.mul_(1e-3)
            if last.bias is not None:
                last.bias.fill_(1.0)
        st = collapse_stats(head(x))
        assert (st["spread"] > 0.9) == expect_high, (out_bn, st)
    z = burn.MLPHead(6, 16, 8, out_bn=True).train()(x)
    assert torch.allclose(z.mean(0), torch.zeros(8), atol=1e-5)
    assert torch.allclose(z.var(0, unbiased=False), torch.ones(8), atol=1e-3)


# ----------------------------------------------------------------------------- augmentations


def _batch(n=8, c=3, s=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("c", [1, 3])
def test_augmentations_shapes_ranges_and_seeds(c):
    from lowbit import transforms as T

    x = _batch(c=c)
    parts = [
        T.RandomResizedCrop(16, scale=(0.2, 1.0)),
        T.ColorJitter(0.4, 0.4, 0.2, 0.1),
        T.RandomGrayscale(0.5),
        T.GaussianBlur(3, (0.1, 2.0)),
        T.RandomHorizontalFlip(0.5),
    ]
    for t in parts:
        g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
        inp = x if isinstance(t, T.RandomResizedCrop) else x.float() / 255
        a, b = t(inp, generator=g1), t(inp, generator=g2)
        assert a.shape == (8, c, 16, 16) and a.dtype == torch.float32, t
        assert float(a.min()) >= 0 and float(a.max()) <= 1 + 1e-6, t
        assert torch.equal(a, b), t
    v1, v2 = two_view_transforms((0.5,) * c, (0.25,) * c, 16)
    a = v1(x, generator=torch.Generator().manual_seed(1))
    b = v1(x, generator=torch.Generator().manual_seed(1))
    d = v1(x, generator=torch.Generator().manual_seed(2))
    e = v2(x, generator=torch.Generator().manual_seed(1))
    assert a.shape == (8, c, 16, 16) and torch.equal(a, b)
    assert not torch.equal(a, d) and not torch.equal(a, e)
    # normalized: (x - 0.5) / 0.25 of values in [0, 1]
    assert float(a.min()) >= -2 - 1e-5 and float(a.max()) <= 2 + 1e-5


def test_grayscale_makes_channels_equal():
    from lowbit import transforms as T

    x = _batch().float() / 255
    y = T.RandomGrayscale(1.0)(x, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(y[:, 0], y[:, 1]) and torch.allclose(y[:, 1], y[:, 2])


# ----------------------------------------------------------------------------- feature layers


def test_feature_extractor_layers_and_errors():
    torch.manual_seed(0)
    net = Tiny()
    x = torch.randn(3, 1, 12, 12)
    f = FeatureExtractor(net, None, EX)
    assert f.target_name == "fc" and f(x).shape == (3, 16)
    g = FeatureExtractor(net, "relu1", EX)  # a 4-D map: average-pooled
    ref = torch.relu(net.bn1(net.conv1(x))).mean((2, 3))
    assert torch.allclose(g(x), ref)
    with pytest.raises(ValueError, match="feature_layer 'nope'.*modules: conv1"):
        FeatureExtractor(net, "nope", EX)


# ----------------------------------------------------------------------------- stages, resume


def _images(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 12, 12), generator=g, dtype=torch.uint8)


def _views():
    return two_view_transforms((0.5,), (0.25,), 12)


def _tc(**kw) -> TrainConfig:
    return TrainConfig(
        **{
            "epochs": 1,
            "batch_size": 16,
            "optimizer": "adam",
            "lr": 1e-3,
            "weight_decay": 0.0,
            "progress": False,
            "device": "cpu",
            **kw,
        }
    )


def test_stage2_starts_from_stage1(monkeypatch, tmp_path):
    seen = []
    real = burn.train_two_view

    def spy(name, loss_fn, modules, trainable, *a, **kw):
        start = copy.deepcopy(trainable.state_dict())
        codecs = {
            n: type(m.weight_codec).__name__
            for n, m in trainable["student"].named_modules()
            if isinstance(m, QuantConv2d | QuantLinear)
        }
        hist = real(name, loss_fn, modules, trainable, *a, **kw)
        seen.append((name, start, copy.deepcopy(trainable.state_dict()), codecs))
        return hist

    monkeypatch.setattr(burn, "train_two_view", spy)
    torch.manual_seed(0)
    student = Tiny()
    obj, hist = burn.train_burn(
        student,
        _images(),
        _views(),
        _tc(),
        _cfg(),
        _teacher(),
        tmp_path,
        {"model": {"name": "tiny"}},
        lambda s: None,
        EX,
    )
    (n1, start1, end1, c1), (n2, start2, end2, c2) = seen
    assert (n1, n2) == ("burn-stage1", "burn-stage2")
    assert c1["conv2"] == "Float" and c2["conv2"] == "Binary"
    assert c1["conv1"] == c2["conv1"] == "Int" and c2["fc"] == "Int"
    # stage 2 starts from every tensor stage 1 ended with (student, both heads); the
    # latent weights are only clamped to the STE window
    assert start2.keys() == end1.keys()
    for k in end1:
        if k == "student.conv2.weight":
            assert torch.equal(start2[k], end1[k].clamp(-1.5, 1.5))
        else:
            assert torch.equal(start2[k], end1[k]), k
    assert any(k.startswith("head_fp.") for k in end1) and any(
        k.startswith("head_b.") for k in end1
    )
    assert not torch.equal(start1["student.conv2.weight"], end1["student.conv2.weight"])
    assert [h["stage"] for h in hist] == [1, 2]
    # stage 2's forward uses sign(w) * mean|w| of those weights
    w = student.conv2.weight
    q = torch.sign(w) * w.abs().mean((1, 2, 3), keepdim=True)
    assert torch.allclose(student.conv2.quantized_weight(), torch.where(w > 0, q.abs(), -q.abs()))
    assert isinstance(student.conv2.weight_codec, Binary) and student.lowbit_recipe.method == "burn"
    assert float(student.conv2.weight.detach().abs().max()) <= 1.5


def test_two_view_loop_resumes_exactly(tmp_path):
    def run(out, interrupt_at=None):
        obj, _ = _objective()
        count = [0]

        def loss_fn(*a):  # Ctrl-C in the middle of the 4th step's forward
            count[0] += 1
            if count[0] == interrupt_at:
                raise KeyboardInterrupt
            return obj.loss(*a)

        return obj, obj.trainable(), loss_fn, dict(out_dir=out, log=lambda s: None)

    cfg = _tc(epochs=2)
    obj, tr, fn, kw = run(tmp_path / "a")
    burn.train_two_view("r", fn, obj, tr, _images(48), _views(), cfg, **kw)
    ref = copy.deepcopy(tr.state_dict())
    obj, tr, fn, kw = run(tmp_path / "b", interrupt_at=5)
    with pytest.raises(TrainingInterrupted) as e:
        burn.train_two_view("r", fn, obj, tr, _images(48), _views(), cfg, **kw)
    assert (e.value.epoch, e.value.step) == (1, 1)
    obj, tr, fn, kw = run(tmp_path / "b")
    hist = burn.train_two_view("r", fn, obj, tr, _images(48), _views(), cfg, **kw)
    assert len(hist) == 2
    got = tr.state_dict()
    for k in ref:
        assert torch.allclose(ref[k].float(), got[k].float(), atol=1e-6), k


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"objective": "moco"}, "objective must be one of"),
        ({"pretrain": "byol"}, "pretrain must be one of simclr"),
        ({"teacher": "a.pt", "pretrain": "simclr"}, "not both"),
        ({"temperature": 0}, "temperature must be > 0"),
        ({"stages": 3}, "stages must be 1 or 2"),
        ({"head_dim": 0}, "head_dim must be a positive integer"),
        ({"finetune_fractions": [0.0]}, "finetune_fractions must lie in"),
        ({"lambda_end": 2}, "lambda_base and lambda_end"),
    ],
)
def test_bad_options_name_the_option(kw, match):
    with pytest.raises(ValueError, match=match):
        BURNConfig(**kw)


def test_recipe_registered_and_round_trips():
    from lowbit.recipes import Recipe, make_recipe

    r = make_recipe("burn", finetune_fractions=[0.05])
    assert r.options["finetune_fractions"] == (0.05,)
    back = Recipe.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back.method == "burn" and back.options == r.options
    assert isinstance(r.rules[0].weights, Binary) and isinstance(r.rules[0].activations, SignAct)
    assert isinstance(burn.stage1_recipe(BURNConfig()).rules[0].weights, Float)


def test_few_label_subset_is_balanced():
    labels = np.repeat(np.arange(10), 50)
    idx = burn.few_label_subset(labels, 0.1, 10)
    assert len(idx) == 50 and np.bincount(labels[idx], minlength=10).tolist() == [5] * 10
    assert len(burn.few_label_subset(labels, 0.001, 10)) == 10  # at least one per class


# ----------------------------------------------------------------------------- end to end


def _main(argv: list[str]) -> tuple[int, str, str]:
    import contextlib
    import io

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


BASE = (
    "compress --method burn --model resnet20 --model-arg width=0.25 --data sample --epochs 1 "
    "--limit-train 96 --limit-test 64 --batch-size 32 --json --quiet --method-arg "
    "probe_epochs=20 --method-arg finetune_steps=2 --method-arg head_hidden=64 "
    "--method-arg head_dim=32"
).split()


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """One tiny CLI compress run (SimCLR teacher pre-trained here), shared by the tests."""
    out = tmp_path_factory.mktemp("burn") / "c"
    code, stdout, err = _main([*BASE, "--out", str(out)])
    assert code == 0, err
    return json.loads(stdout), err, out


def test_cli_compress_run_and_runtime_reproduce(compressed):
    res, err, out = compressed
    for k in ("method", "model", "test_accuracy", "fp_test_accuracy", "storage_bytes",
              "compression_vs_fp32", "energy_vs_fp16", "density", "out"):  # fmt: skip
        assert res[k] is not None, k
    assert res["method"] == "burn" and res["labels_in_training"] is False
    assert "pre-training the default self-supervised teacher" in err
    assert res["frozen_agreement"] == 1.0
    assert {f["fraction"] for f in res["finetune"]} == {0.01, 0.1}
    assert [h["stage"] for h in res["history"]] == [1, 2]
    assert (out / "model.lowbit").is_file() and (out / "pretrain" / "encoder.pt").is_file()

    # the packed file: binary encoder + the probe; lowbit run reports the probe's accuracy
    argv = ["run", str(out / "model.lowbit"), "--data", "sample", "--limit-test", "64"]
    code, stdout, err = _main([*argv, "--json", "--check"])
    assert code == 0, err
    ran = json.loads(stdout)
    assert ran["method"] == "burn" and ran["agreement_with_reference"] == 1.0
    assert ran["test_accuracy"] == pytest.approx(res["test_accuracy"])

    # freeze -> save -> load -> runtime Engine reproduces the QAT model's predictions
    from lowbit import runtime, transforms

    net, ckpt = build_from_checkpoint(out / "model.pt")
    assert ckpt["recipe"]["method"] == "burn"
    test = data.load("sample", "test").subset(64, seed=0)
    x = transforms.test_transform("sample")(torch.from_numpy(test.images))
    with torch.no_grad():
        want = net.eval()(x).argmax(1).numpy()
    got = runtime.load(out / "model.lowbit", threads=1)(x.numpy()).argmax(1)
    assert (got == want).mean() >= 0.999
    binl = [
        n for n, m in net.named_modules() if isinstance(getattr(m, "weight_codec", None), Binary)
    ]
    assert binl and "conv1" not in binl and "fc" not in binl


def test_cli_teacher_from_checkpoint_and_errors(compressed, tmp_path):
    _, _, out = compressed
    enc = str(out / "pretrain" / "encoder.pt")
    base = [*BASE, "--out", str(tmp_path / "t"), "--method-arg", "finetune_fractions=[]"]
    code, stdout, err = _main([*base, "--from", enc])
    assert code == 0, err
    res = json.loads(stdout)
    assert res["teacher"] == enc and res["pretrain"] is None
    assert "pre-training" not in err and res["finetune"] == []
    assert not (tmp_path / "t" / "pretrain").exists()
    # errors: one JSON object naming the option, no traceback, before any training
    for extra, match in [
        (["--pretrain", "byol"], "pretrain must be one of simclr"),
        (["--teacher", str(tmp_path / "none.pt")], "--teacher: checkpoint not found"),
        (["--teacher", str(out / "model.pt")], "give an FP checkpoint"),
        (["--teacher", enc, "--from", str(out / "model.pt")], "--from and --teacher"),
        (["--teacher", enc, "--pretrain", "simclr"], "not both"),
        (["--method-arg", "feature_layer=nope"], "feature_layer 'nope'"),
        (["--method-arg", "no_such_option=1"], "bad option for method 'burn'"),
        (["--method-arg", "objective=moco"], "objective must be one of"),
    ]:
        code, stdout, err = _main([*base, *extra])
        assert code != 0 and "Traceback" not in err, extra
        assert match in json.loads(stdout)["error"], stdout
        assert not (tmp_path / "t" / "pretrain").exists(), extra


def test_packed_probe_matches_probe_layer(tmp_path):
    """linear_probe writes the probe into the int8 last layer: its accuracy is the FP
    probe's up to int8 rounding, and the layer's input scale is set."""
    torch.manual_seed(0)
    net = Tiny()
    ext = FeatureExtractor(net, None, EX)
    from lowbit.recipes import compress_

    cfg = _cfg(probe_epochs=30)
    compress_(net, burn.burn_recipe(**{**cfg.__dict__}), EX)
    imgs = _images(200)
    labels = (imgs.float().mean((1, 2, 3)) > 127.5).long()  # a learnable toy label
    tf = lambda x: (x.float() / 255 - 0.5) / 0.25  # noqa: E731
    net.train()
    with torch.no_grad():
        ext(tf(imgs))
    res = burn.linear_probe(
        ext, imgs[:150], labels[:150], imgs[150:], labels[150:], tf, 10, cfg, layer=net.fc
    )
    assert float(net.fc.act.scale) > 0
    assert abs(res["test_accuracy"] - res["probe_fp_accuracy"]) <= 0.1
    with torch.no_grad():
        pred = net.eval()(tf(imgs[150:])).argmax(1)
    assert float((pred == labels[150:]).float().mean()) == pytest.approx(res["test_accuracy"])
    assert replace(cfg, stages=1).stages == 1
