"""SBNN (lowbit.methods.sbnn): entropy constraint, domains, hooks, the density remedy,
resume and freeze."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lowbit import data, models, transforms
from lowbit.codecs import Binary, SignAct
from lowbit.errors import TrainingInterrupted
from lowbit.freeze import freeze
from lowbit.layers import QuantLinear
from lowbit.methods import sbnn
from lowbit.methods.sbnn import (
    EntropyConstraint,
    IRNetSchedule,
    LatentClamp,
    MaskedBinary,
    bnn_pruned_recipe,
    kernel_patterns,
    latent_density,
    layer_report,
    plot_kernel_patterns,
    project_density_,
    prune_bnn_,
    published_gamma,
    sbnn_recipe,
    sign_fed_relus,
    weight_density,
)
from lowbit.recipes import Recipe, compress_, make_recipe
from lowbit.train import TrainConfig, Trainer, TrainHook, build_from_checkpoint, set_lr


def _mlp(recipe, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32),
        nn.ReLU(), nn.Linear(32, 4),
    )  # fmt: skip
    return compress_(net, recipe, torch.zeros(1, 8))


def _lenet(recipe, seed=0) -> nn.Module:
    torch.manual_seed(seed)
    return compress_(models.create("lenet5"), recipe, torch.zeros(1, 1, 28, 28))


@pytest.fixture(scope="module")
def sample():
    tr = data.load("sample", "train").subset(512, seed=0)
    te = data.load("sample", "test").subset(200, seed=0)
    return tr, te


def _cfg(**kw) -> TrainConfig:
    d = dict(epochs=3, batch_size=128, optimizer="adam", lr=1e-3, weight_decay=0.0,
             progress=False, seed=0)  # fmt: skip
    d.update(kw)
    return TrainConfig(**d)


def _trainer(net, recipe, cfg, **kw) -> Trainer:
    return Trainer(
        net, cfg, hooks=recipe.hooks(net), train_transform=transforms.train_transform("sample"),
        test_transform=transforms.test_transform("sample"), log=lambda s: None, **kw,
    )  # fmt: skip


# ----------------------------------------------------------------------------- options


def test_published_gamma_and_interpolation():
    assert published_gamma(0.05) == pytest.approx(0.07)
    assert published_gamma(0.10) == pytest.approx(0.04)
    assert published_gamma(0.5) == 0.0
    assert published_gamma(0.075) == pytest.approx(0.055)  # halfway between 0.05 and 0.10
    assert published_gamma(0.001) == pytest.approx(0.10)
    assert sbnn_recipe(density=0.05).options["gamma"] == pytest.approx(0.07)
    assert sbnn_recipe(density=0.05, gamma=0.2).options["gamma"] == 0.2


@pytest.mark.parametrize(
    "opts, words",
    [
        ({"density": 0.7}, "density"),
        ({"density": 0.0}, "density"),
        ({"domain": "x"}, "domain"),
        ({"domain": "pm1", "density": 0.05}, "bnn-pruned"),
        ({"estimator": "tanh"}, "estimator"),
        ({"gamma": 1.0}, "gamma"),
        ({"lambda_cap": 0}, "lambda_cap"),
        ({"remedy": "magic"}, "remedy"),
        ({"project_start": 0.8, "project_end": 0.5}, "project_start"),
        ({"project_scope": "net"}, "project_scope"),
        ({"relu": "gelu"}, "relu"),
        ({"clip": -1}, "clip"),
    ],
)
def test_bad_options_raise_clear_errors(opts, words):
    with pytest.raises(ValueError, match=words):
        sbnn_recipe(**opts)
    with pytest.raises(ValueError, match="bnn-pruned"):
        bnn_pruned_recipe(prune_scope="net")


def test_recipe_round_trip_and_layers():
    rec = sbnn_recipe(density=0.1, estimator="irnet")
    again = Recipe.from_dict(rec.to_dict())
    assert again.options == rec.options and len(again.hook_factories) == len(rec.hook_factories)
    net = _lenet(rec)
    assert [n for n, _ in sbnn.binarized_layers(net)] == ["conv2", "fc1"]
    assert isinstance(net.conv2.act.codec, SignAct) and net.conv1.weight_codec.bits == 8
    net = _lenet(sbnn_recipe(binarize_first_last=True))
    assert len(sbnn.binarized_layers(net)) == 4


# ----------------------------------------------------------------------------- codecs


@pytest.mark.parametrize("domain", ["01", "ab", "pm1"])
def test_domain_value_sets(domain):
    net = _mlp(sbnn_recipe(density=0.5, domain=domain))
    layer = net[2]
    q = layer.quantized_weight().detach()
    if domain == "pm1":  # +-a per output channel, a = mean |w|
        a = layer.weight.detach().abs().mean(1, keepdim=True)
        assert torch.equal(q, torch.where(layer.weight > 0, a, -a))
    else:
        vals = sorted(set(q.flatten().tolist()))
        assert len(vals) == 2
        enc = layer.weight_codec.encode(layer.weight, dict(layer.codec_params))
        alpha, beta = float(enc.params["alpha"]), float(enc.params["beta"])
        assert vals == pytest.approx(sorted([alpha, beta]))
        if domain == "01":
            assert alpha == 0.0
            assert torch.equal(q != 0, layer.weight > 0)


def test_masked_binary_values_and_gradient():
    c = MaskedBinary(clip=1.0)
    w = torch.tensor([[0.5, -0.25, 0.0, 2.0], [0.0, 0.0, -0.1, 0.3]], requires_grad=True)
    q = c.fake_quant(w)
    a0, a1 = (0.5 + 0.25 + 2.0) / 3, (0.1 + 0.3) / 2
    assert torch.allclose(q, torch.tensor([[a0, -a0, 0, a0], [0, 0, -a1, a1]]))
    q.sum().backward()
    window = torch.tensor([[1.0, 1, 1, 0], [1, 1, 1, 1]])  # the clip window, times a
    assert torch.allclose(w.grad, window * torch.tensor([[a0], [a1]]))
    enc = c.encode(w)
    assert torch.allclose(c.decode(enc), q.detach())
    assert set(enc.codes.unique().tolist()) <= {-1, 0, 1}


# ----------------------------------------------------------------------------- hooks


def _set_weights(layer, pos: int, neg_value=-0.5, pos_value=0.5):
    with torch.no_grad():
        flat = torch.full((layer.weight.numel(),), neg_value)
        flat[:pos] = pos_value
        layer.weight.copy_(flat.view_as(layer.weight))


def test_entropy_hook_lambda_and_hinge():
    net = _mlp(sbnn_recipe(density=0.05))  # binarized: net[2], net[4] (2 x 1024 weights)
    layers = [m for _, m in sbnn.binarized_layers(net)]
    assert len(layers) == 2
    _set_weights(layers[0], 512)
    _set_weights(layers[1], 100)
    hook = EntropyConstraint(net, density=0.05, gamma=0.07, lambda_cap=1e6)
    task = torch.tensor(0.8)
    term, p, h, lam = hook.penalty(task)
    assert float(p) == pytest.approx(612 / 2048)
    assert float(h) == pytest.approx(612 / 2048 - 0.05)
    assert float(lam) == pytest.approx(0.07 * 0.8 / (float(h) * 0.93))
    # the penalty's value is gamma / (1 - gamma) of the task loss while violated
    assert float(term.detach()) == pytest.approx(0.07 / 0.93 * 0.8, rel=1e-5)
    # the cap
    capped = EntropyConstraint(net, density=0.05, gamma=0.07, lambda_cap=0.1)
    assert float(capped.penalty(task)[3]) == pytest.approx(0.1)
    # below and at the target (h <= 1e-4): lambda = 0
    _set_weights(layers[0], 100)
    _set_weights(layers[1], 2)
    term, p, h, lam = hook.penalty(task)
    assert float(h) == 0 and float(lam) == 0 and float(term.detach()) == 0
    # violated by less than the cut: h > 0 but lambda = 0
    _set_weights(layers[0], 103)
    _set_weights(layers[1], 0)
    near = EntropyConstraint(net, density=103 / 2048 - 5e-5, gamma=0.07)
    term, p, h, lam = near.penalty(task)
    assert 0 < float(h) <= 1e-4 and float(lam) == 0 and float(term.detach()) == 0
    far = EntropyConstraint(net, density=103 / 2048 - 2e-4, gamma=0.07)
    assert float(far.penalty(task)[3]) > 0


def test_entropy_gradient_reaches_latent_weights():
    net = _mlp(sbnn_recipe(density=0.05))
    layers = [m for _, m in sbnn.binarized_layers(net)]
    with torch.no_grad():
        layers[1].weight.view(-1)[:3] = torch.tensor([2.0, -2.0, 1.2])  # outside / inside clip
    hook = EntropyConstraint(net, density=0.05, gamma=0.07)
    x = torch.randn(16, 8)
    task = nn.functional.cross_entropy(net(x), torch.randint(0, 4, (16,)))
    for p in net.parameters():
        p.grad = None
    term, p, h, lam = hook.penalty(task)
    term.backward()
    n = sum(m.weight.numel() for m in layers)
    g = layers[1].weight.grad.view(-1)
    assert float(lam) > 0
    # d(lambda h)/dw = lambda * dp/dw = lambda / (2 N) inside the clip window, 0 outside
    assert g[2].item() == pytest.approx(float(lam) / (2 * n), rel=1e-5)
    assert g[0].item() == 0 and g[1].item() == 0
    assert torch.allclose(layers[0].weight.grad, torch.full_like(layers[0].weight, g[2].item()))
    # and through the full loss: the latent weights get the penalty's push
    assert latent_density(net).requires_grad


def test_clamp_after_step_and_irnet_schedule():
    net = _mlp(sbnn_recipe(density=0.05, estimator="irnet", clip=1.5))
    layers = [m for _, m in sbnn.binarized_layers(net)]
    with torch.no_grad():
        layers[0].weight.mul_(100)
    LatentClamp(net, 1.5).after_step(None)
    assert layers[0].weight.abs().max() <= 1.5
    sched = IRNetSchedule(net)
    assert len(sched.acts) == 2  # the two sign-quantized layers
    assert sched.set_epoch(0, 10) == pytest.approx((0.1, 10.0))
    assert layers[0].act.irnet_t == pytest.approx(0.1) and layers[0].act.irnet_k == 10
    t, k = sched.set_epoch(5, 10)
    assert (t, k) == pytest.approx((1.0, 1.0))
    t, k = sched.set_epoch(9, 10)
    assert t == pytest.approx(10**0.8) and k == 1.0


@pytest.mark.parametrize("scope", ["proportional", "layer", "global"])
def test_projection_meets_density(scope):
    net = _mlp(sbnn_recipe(density=0.05))
    layers = [m for _, m in sbnn.binarized_layers(net)]
    _set_weights(layers[0], 700)
    with torch.no_grad():
        layers[0].weight.view(-1)[:700] = torch.linspace(0.01, 1, 700)
    d = project_density_(net, 0.05, scope, "value")
    assert d <= 0.05 and d > 0.05 - 2 / 2048
    assert weight_density(net) == pytest.approx(d)
    if scope == "proportional":  # each layer shrinks by the same factor
        assert layer_report(net)[0]["nonzero"] > layer_report(net)[1]["nonzero"]
    # the largest latent values are the ones kept
    kept = layers[0].weight.view(-1)[:700] > 0
    assert kept[-1] and not kept[0]


@pytest.mark.parametrize("scope", ["proportional", "layer", "global"])
def test_projection_floor_revives_the_largest_off_weights(scope):
    net = _mlp(sbnn_recipe(density=0.05))
    layers = [m for _, m in sbnn.binarized_layers(net)]
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(-torch.rand_like(m.weight) - 0.1)  # every weight off
            m.weight.view(-1)[:10] = 0.5  # a few on
        layers[0].weight.view(-1)[10:20] = -0.01  # the off weights closest to turning on
    on_before = [m.weight.detach().clone() > 0 for m in layers]
    total = sum(m.weight.numel() for m in layers)
    d = project_density_(net, 0.05, scope, "value", floor=0.05)
    assert 0.05 <= d <= 0.05 + len(layers) / total
    for m, before in zip(layers, on_before):
        assert bool((m.weight[before] == 0.5).all())  # the on weights are untouched
    if scope != "layer":  # per layer, the layer's own top candidates are the ones revived
        assert bool((layers[0].weight.view(-1)[10:20] > 0).all())
    # no floor: the density stays where it is (a cap only)
    with torch.no_grad():
        for m in layers:
            m.weight.copy_(-torch.rand_like(m.weight) - 0.1)
            m.weight.view(-1)[:10] = 0.5
    assert project_density_(net, 0.05, scope, "value") == pytest.approx(10 * len(layers) / total)


def test_relu_bypass_keeps_forward_values():
    net = _lenet(sbnn_recipe(density=0.5))
    assert sign_fed_relus(net) == ["relu1", "relu2"]  # relu3 feeds the int8 classifier
    x = torch.randn(4, 1, 28, 28)
    net.train()
    net(x)  # sets the int8 input scales
    net.eval()
    before = net(x)
    rec = net.lowbit_recipe
    rec.hooks(net)
    assert isinstance(net.relu1, nn.Identity) and isinstance(net.relu3, nn.ReLU)
    assert torch.equal(net(x), before)
    rn = compress_(models.create("resnet20"), sbnn_recipe(density=0.5))
    names = sign_fed_relus(rn)
    assert names and all(n.endswith(".relu1") for n in names)  # block outputs feed the adds


# ----------------------------------------------------------------------------- training


def test_remedy_meets_density_and_freezes(sample, tmp_path):
    train, test = sample
    rec = sbnn_recipe(density=0.05)
    net = _lenet(rec)
    trainer = _trainer(net, rec, _cfg(epochs=3))
    res = trainer.fit(train, test)
    hist = res.history
    assert "sbnn_p" in hist[0] and "sbnn_lambda" in hist[0]
    d = weight_density(net)
    assert abs(d - 0.05) <= 0.01, d
    assert hist[-1]["density"] == pytest.approx(d)
    rows = layer_report(net)
    assert sum(r["nonzero"] for r in rows) / sum(r["weights"] for r in rows) == pytest.approx(d)
    # freeze round trip: the frozen model predicts what the QAT model predicts
    net.eval()
    x = transforms.test_transform("sample")(torch.as_tensor(test.images))
    frozen = freeze(net, torch.zeros(1, 1, 28, 28))
    with torch.no_grad():
        same = (frozen(x).argmax(1) == net(x).argmax(1)).float().mean().item()
    assert same >= 0.99
    conv = [op for op in frozen.layers() if op.name == "conv2"][0]
    assert set(conv.tensors["codes"].unique().tolist()) <= {0, 1}


def test_published_penalty_alone_stays_above_target(sample):
    train, _ = sample
    rec = sbnn_recipe(density=0.05, remedy="none")
    net = _lenet(rec)
    _trainer(net, rec, _cfg(epochs=1)).fit(train)
    assert weight_density(net) > 0.15  # the stall the remedy exists for


class _StopAt(TrainHook):
    def __init__(self, step):
        self.step = step

    def after_step(self, trainer):  # the last hook: this step's update is complete
        if trainer.global_step + 1 == self.step:
            raise KeyboardInterrupt


def test_resume_is_exact(sample, tmp_path):
    train, _ = sample
    opts = dict(density=0.05, estimator="irnet", project_start=0.3, project_end=0.6)
    cfg = _cfg(epochs=2)
    meta = {"model": {"name": "lenet5", "kwargs": {}, "num_classes": 10,
                      "input_shape": [1, 28, 28]}}  # fmt: skip
    rec = make_recipe("sbnn", **opts)
    full = _lenet(rec)
    t_full = _trainer(full, rec, cfg)
    t_full.fit(train)
    rec2 = make_recipe("sbnn", **opts)
    part = _lenet(rec2)
    t_part = _trainer(part, rec2, cfg, out_dir=tmp_path, meta={**meta, "recipe": rec2.to_dict()})
    t_part.hooks.append(_StopAt(6))  # mid-epoch 2, inside the projection ramp
    with pytest.raises(TrainingInterrupted):
        t_part.fit(train)
    net, ckpt = build_from_checkpoint(tmp_path / "last.pt")
    rec3 = net.lowbit_recipe
    t_res = Trainer(net, cfg, hooks=rec3.hooks(net), log=lambda s: None,
                    train_transform=transforms.train_transform("sample"))  # fmt: skip
    ckpt["hooks"] = ckpt["hooks"][:-1]  # without _StopAt's
    # Ctrl-C came inside after_step, before the trainer counted the step: count it here
    ckpt["step"] += 1
    ckpt["global_step"] += 1
    t_res.fit(train, resume=ckpt)
    a, b = full.state_dict(), net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h.state_dict() for h in t_full.hooks] == [h.state_dict() for h in t_res.hooks]


def test_scale_lr_puts_the_domain_scalars_in_their_own_group():
    rec = sbnn_recipe(density=0.05)  # scale_lr 0.01 by default
    net = _lenet(rec)
    trainer = Trainer(net, _cfg(), hooks=rec.hooks(net), log=lambda s: None)
    scalars = {id(m.codec_params[k]) for _, m in sbnn.binarized_layers(net) for k in ("tau", "phi")}
    groups = trainer.optimizer.param_groups
    slow = [g for g in groups if g["lr_mult"] != 1.0]
    assert len(slow) == 1 and slow[0]["lr_mult"] == 0.01
    assert {id(p) for p in slow[0]["params"]} == scalars
    set_lr(trainer.optimizer, 0.1)
    assert slow[0]["lr"] == pytest.approx(0.001)
    assert all(g["lr"] == 0.1 for g in groups if g is not slow[0])
    # pm1 has no learned scalars: the usual two groups
    rec = sbnn_recipe(domain="pm1", density=0.5)
    net = _lenet(rec)
    trainer = Trainer(net, _cfg(), hooks=rec.hooks(net), log=lambda s: None)
    assert [g["lr_mult"] for g in trainer.optimizer.param_groups] == [1.0, 1.0]


def test_bn_free_lenet5_from_an_sgd_model_trains():
    """Regression: LeNet-5 (no BatchNorm) from an SGD-trained FP model stayed near chance
    under Adam 1e-3, because tau (a gain of 0.003 in fc1) moved by lr per step and killed
    fc1's ReLUs within a few steps (ScaleLR's docstring). Measured here: 63% with the
    default scale_lr, 22% with scale_lr=1 (chance: 10%)."""
    tr = data.load("sample", "train").subset(1024, seed=0)
    te = data.load("sample", "test").subset(300, seed=0)
    torch.manual_seed(0)
    fp = models.create("lenet5")
    sgd = _cfg(epochs=3, batch_size=64, optimizer="sgd", lr=0.1, weight_decay=5e-4)
    tf = transforms.train_transform("sample")
    Trainer(fp, sgd, train_transform=tf, log=lambda s: None).fit(tr)
    rec = sbnn_recipe(density=0.5)
    net = compress_(fp, rec, torch.zeros(1, 1, 28, 28))
    res = _trainer(net, rec, _cfg(epochs=2, batch_size=64)).fit(tr, te)
    assert res.history[-1]["test_accuracy"] >= 0.45, res.history


def test_bnn_pruned_baseline(sample):
    train, test = sample
    rec = bnn_pruned_recipe(density=0.05)
    net = _lenet(rec)
    assert isinstance(net.fc1.weight_codec, MaskedBinary)
    _trainer(net, rec, _cfg(epochs=2)).fit(train)
    d = weight_density(net)
    assert abs(d - 0.05) <= 0.01
    assert [r["density"] for r in layer_report(net)] == pytest.approx([0.05, 0.05], abs=1e-3)
    net.eval()
    x = transforms.test_transform("sample")(torch.as_tensor(test.images[:100]))
    frozen = freeze(net, torch.zeros(1, 1, 28, 28))
    with torch.no_grad():
        assert (frozen(x).argmax(1) == net(x).argmax(1)).float().mean() >= 0.99


def test_prune_bnn_converts_a_pm1_model():
    net = _lenet(sbnn_recipe(density=0.5, domain="pm1"))
    d = prune_bnn_(net, 0.1)
    assert abs(d - 0.1) <= 0.001
    assert isinstance(net.fc1.weight_codec, MaskedBinary)
    assert net.lowbit_recipe.method == "bnn-pruned"
    again = Recipe.from_dict(net.lowbit_recipe.to_dict())
    fresh = compress_(models.create("lenet5"), again)
    fresh.load_state_dict(net.state_dict())
    assert weight_density(fresh) == pytest.approx(d)


# ----------------------------------------------------------------------------- reports


def test_kernel_patterns_and_plot(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(2 * 8 * 8, 3),
    )  # fmt: skip
    compress_(net, sbnn_recipe(density=0.05), torch.zeros(1, 3, 8, 8))
    conv = net[3]
    with torch.no_grad():
        conv.weight.fill_(-0.5)
        conv.weight[0, 0] = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 1.0]])  # bits 0 and 8
        conv.weight[1, :] = 0.5  # a full filter: pattern 511 four times
        conv.weight[0, 1, 1, 1] = 0.3  # the centre: bit 4
    rep = kernel_patterns(net)
    assert rep["layers"] == ["3"] and rep["kernels"] == 8
    assert rep["patterns"][1 + 256] == 1 and rep["patterns"][16] == 1
    assert rep["patterns"][511] == 4 and rep["patterns"][0] == 2
    assert rep["hamming"] == [2, 1, 1, 0, 0, 0, 0, 0, 0, 4]
    assert rep["top"][0] == [511, 4]
    rows = layer_report(net)
    assert rows[0]["zero_filters"] == 0 and rows[0]["density"] == pytest.approx((2 + 1 + 36) / 72)
    with torch.no_grad():
        conv.weight[0] = -1.0
    assert layer_report(net)[0]["zero_filters"] == 1
    path = plot_kernel_patterns(rep, tmp_path / "k.png")
    assert (tmp_path / "k.png").stat().st_size > 1000 and path.endswith("k.png")


def test_binary_codec_is_the_sbnn_codec():
    net = _mlp(sbnn_recipe(density=0.05, domain="ab"))
    assert isinstance(net[2].weight_codec, Binary) and net[2].weight_codec.domain == "ab"
    assert isinstance(net[0], nn.Module) and not isinstance(net[0].weight_codec, Binary)
    assert isinstance(net[2], QuantLinear)
    assert math.isclose(sbnn_recipe().options["lambda_cap"], 10.0)
