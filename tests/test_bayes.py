"""Bayesian compression: KL terms, bit precision, pruning removal, freeze/runtime, CLI."""

import json
import math

import pytest
import torch
from torch import nn

from lowbit import load_frozen, models
from lowbit.cli import main
from lowbit.methods import bayes
from lowbit.methods.bayes import (
    BayesConfig,
    BayesConv2d,
    BayesLinear,
    FeatureSelect,
    authors_exponent_bits,
    bayesian_,
    deterministic_,
    fixed_point_for,
    gnj_kl,
    kl_lognormal_gamma,
    kl_lognormal_invgamma,
    layer_bits,
    remove_pruned,
)

EULER = 0.5772156649015329


# ----------------------------------------------------------------------------- KL terms


def _true_gnj_kl(log_alpha: float) -> float:
    """``KL(N(mu, alpha mu^2) || p ~ 1/|z|) = -0.5 log alpha + E log|e| + C``, ``e ~ N(1,
    alpha)``, with ``C = (gamma + ln 2) / 2`` so that the KL vanishes as alpha -> inf.
    ``E log|e|`` by the trapezoid rule on ``x = +-exp(t)`` (no singularity at 0)."""
    a = math.exp(log_alpha)
    s = math.sqrt(a)
    t = torch.linspace(-60.0, math.log(1 + 40 * s), 400_001, dtype=torch.float64)
    x = t.exp()

    def pdf(v):
        return torch.exp(-0.5 * ((v - 1) / s) ** 2) / (s * math.sqrt(2 * math.pi))

    e_log = torch.trapezoid(t * (pdf(x) + pdf(-x)) * x, t).item()
    return -(0.5 * log_alpha - e_log - (EULER + math.log(2)) / 2)


@pytest.mark.parametrize("log_alpha", [-8.0, -4.0, -2.0, 0.0, 1.0, 2.0, 4.0, 8.0])
def test_gnj_kl_approximation_matches_numerical_integration(log_alpha):
    # Molchanov et al. report the approximation as tight; measured here the largest
    # absolute gap over these points is 0.0085 nats (at log alpha = -4): tolerance 0.012
    true = _true_gnj_kl(log_alpha)
    approx = gnj_kl(torch.tensor(log_alpha)).item()
    assert approx == pytest.approx(true, abs=0.012)


def test_k1_is_the_constant_that_makes_the_kl_vanish():
    assert bayes.K1 == pytest.approx((EULER + math.log(2)) / 2, abs=1e-3)  # a fitted constant
    assert gnj_kl(torch.tensor(30.0)).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("mu", "logvar", "kind", "shape", "param"),
    [
        (0.3, math.log(0.5), "gamma", 0.5, 1.0),
        (-2.0, math.log(0.1), "gamma", 0.5, 4.0),
        (1.0, math.log(0.8), "invgamma", 0.5, 1.0),
        (-1.5, math.log(0.05), "invgamma", 0.5, 1.0),
    ],
)
def test_ghs_lognormal_kls_match_monte_carlo(mu, logvar, kind, shape, param):
    g = torch.Generator().manual_seed(0)
    n = 400_000
    y = mu + math.exp(0.5 * logvar) * torch.randn(n, generator=g, dtype=torch.float64)
    f64 = torch.float64
    q = torch.distributions.LogNormal(
        torch.tensor(mu, dtype=f64), torch.tensor(math.exp(0.5 * logvar), dtype=f64)
    )
    x = y.exp()
    if kind == "gamma":
        p = torch.distributions.Gamma(torch.tensor(shape, dtype=torch.float64),
                                      torch.tensor(param, dtype=torch.float64))  # fmt: skip
        closed = kl_lognormal_gamma(torch.tensor(mu), torch.tensor(logvar), shape, param)
    else:  # InvGamma(a, b): 1/x ~ Gamma(a, rate b); log p(x) = log p_G(1/x) - 2 log x
        pg = torch.distributions.Gamma(torch.tensor(shape, dtype=torch.float64),
                                       torch.tensor(param, dtype=torch.float64))  # fmt: skip
        p = None
        closed = kl_lognormal_invgamma(torch.tensor(mu), torch.tensor(logvar), shape, param)
    log_p = p.log_prob(x) if p is not None else pg.log_prob(1 / x) - 2 * torch.log(x)
    terms = q.log_prob(x) - log_p
    mc, se = terms.mean().item(), terms.std().item() / math.sqrt(n)
    assert closed.item() == pytest.approx(mc, abs=4 * se + 1e-3)


def test_half_cauchy_decomposition():
    """sqrt(Gamma(1/2, rate 1/b^2) * InvGamma(1/2, 1)) is C+(0, b): median b, P(<3b) = 0.795."""
    g = torch.Generator().manual_seed(1)
    b = 0.3
    a = torch.distributions.Gamma(0.5, 1 / b**2).sample((200_000,))
    c = 1 / torch.distributions.Gamma(0.5, 1.0).sample((200_000,))
    del g
    s = (a * c).sqrt()
    assert s.median().item() == pytest.approx(b, rel=0.02)
    assert (s < 3 * b).double().mean().item() == pytest.approx(
        2 / math.pi * math.atan(3), abs=0.005
    )


def test_kl_is_positive_and_prefers_pruning_noise():
    la = torch.linspace(-10, 10, 41)
    kl = gnj_kl(la)
    assert (kl > -1e-6).all() and (kl[1:] <= kl[:-1] + 1e-6).all()  # more noise, less KL


# ----------------------------------------------------------------------------- bit precision


def test_unit_roundoff_rule_on_hand_made_posteriors():
    # 2 Var = 2^-9: t = 1..8 have 2^-t > 2^-9 -> 8 bits
    assert layer_bits(torch.full((10,), 2.0**-10)) == 8
    # half the weights at 8, half at 2 (2 Var = 2^-3: t = 1, 2) -> mean 5
    v = torch.cat([torch.full((5,), 2.0**-10), torch.full((5,), 2.0**-4)])
    assert layer_bits(v) == 5
    # mean 8 / 3 * ... -> ceil: one weight at 8, two at 2 -> mean 4 -> 4; add one at 3 -> 3.75 -> 4
    v = torch.tensor([2.0**-10, 2.0**-4, 2.0**-4, 2.0**-5])
    assert layer_bits(v) == 4
    assert layer_bits(torch.full((3,), 1.0)) == 0  # all noise: no significand bit
    assert layer_bits(torch.full((3,), 1e-30)) == 23  # capped at float32's 23


def test_std_rule_on_hand_made_posteriors():
    # std = 2^-6: 2^-t > 2^-6 for t = 1..5
    assert layer_bits(torch.full((4,), 2.0**-12), rule="std") == 5
    # std_k = 4: 2^-t > 2^-4 -> t = 1..3
    assert layer_bits(torch.full((4,), 2.0**-12), rule="std", std_k=4.0) == 3
    with pytest.raises(ValueError, match="bits_rule"):
        layer_bits(torch.ones(2), rule="nope")


def test_fixed_point_codec_choice():
    w = torch.tensor([0.5, -0.25, 0.01])
    c = fixed_point_for(w, t=3)
    assert (c.integer_bits, c.fraction_bits) == (0, 3)
    # a layer of small weights is not rounded to zero: f rises until max|w| spans 4 steps
    small = torch.tensor([0.004, -0.002])
    c = fixed_point_for(small, t=2, min_levels=4)
    assert round(0.004 * 2**c.fraction_bits) >= 4 and c.fraction_bits == 10
    assert c.fake_quant(small).abs().max() > 0
    # large weights get integer bits
    c = fixed_point_for(torch.tensor([3.2, -1.0]), t=2)
    assert c.integer_bits == 2 and c.fake_quant(torch.tensor([3.2])).item() == 3.25


def test_authors_exponent_bits():
    assert authors_exponent_bits(0.5) == (1, True)  # log2(log2(0.5) + 1) undefined
    assert authors_exponent_bits(0.6) == (1, True)  # 0 before the floor
    assert authors_exponent_bits(0.75) == (1, False)  # ceil(0.23) = 1 itself
    assert authors_exponent_bits(4.0) == (3, False)  # ceil(log2(3) + 1)


# ----------------------------------------------------------------------------- layers


def _set_z(layer, idx, value):
    """Set GNJ group means (stored divided by the layer's lr scale)."""
    layer.z_mu_p.data[idx] = value / layer.lv_scale


def test_bayesian_and_back_is_the_identity_at_unit_scales():
    torch.manual_seed(0)
    net = models.create("lenet5")
    x = torch.randn(4, 1, 28, 28)
    ref = net.eval()(x)
    bayesian_(net)
    kinds = [type(m) for m in net.modules() if isinstance(m, BayesConv2d | BayesLinear)]
    assert kinds == [BayesConv2d, BayesConv2d, BayesLinear, BayesLinear]
    for m in bayes.bayes_layers(net).values():
        _set_z(m, slice(None), 1.0)
    back = deterministic_(net).eval()
    assert torch.allclose(back(x), ref, atol=1e-5)
    assert not any(isinstance(m, BayesConv2d | BayesLinear) for m in back.modules())


@pytest.mark.parametrize("prior", ["gnj", "ghs"])
def test_training_forward_is_centred_on_the_mean(prior):
    torch.manual_seed(0)
    fc = BayesLinear(nn.Linear(20, 5), prior=prior)
    conv = BayesConv2d(nn.Conv2d(3, 4, 3, padding=1), prior=prior)
    x, xc = torch.randn(512, 20), torch.randn(512, 3, 6, 6)
    for layer, inp in ((fc, x), (conv, xc)):
        layer.eval()
        mean = layer(inp)
        layer.train()
        with torch.no_grad():
            draws = torch.stack([layer(inp) for _ in range(64)])
        assert draws.std(0).mean() > 1e-4  # the training forward samples
        assert (draws.mean(0) - mean).abs().mean() < 0.01  # ... around the posterior mean
        kl = layer.kl()
        assert torch.isfinite(kl) and kl.item() > 0
        kl.backward()
        assert layer.weight_mu.grad is not None


def test_ghs_group_scales_start_at_the_fp_weights():
    torch.manual_seed(0)
    lin = nn.Linear(30, 7)
    b = BayesLinear(lin, prior="ghs").eval()
    w, _ = b.posterior_mean()
    # E[theta] = exp(m + v/2) with v tiny: within 1e-3 of the FP weights
    assert torch.allclose(w, lin.weight, rtol=1e-3, atol=1e-6)


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="prior"):
        BayesConfig(prior="laplace")
    with pytest.raises(ValueError, match="bits_rule"):
        BayesConfig(bits_rule="x")
    with pytest.raises(ValueError, match="thresholds"):
        BayesConfig(thresholds="fc1:-3")
    with pytest.raises(ValueError, match="tau0"):
        BayesConfig(tau0=0)
    with pytest.raises(ValueError, match="bad option for method 'bayes'"):
        from lowbit.recipes import make_recipe

        make_recipe("bayes", nope=1)
    assert BayesConfig(thresholds="fc1=-2.8, fc3=-5").thresholds == {"fc1": -2.8, "fc3": -5.0}


# ----------------------------------------------------------------------------- removal


def _zero_filters(conv: nn.Conv2d, idx):
    with torch.no_grad():
        conv.weight[idx] = 0
        if conv.bias is not None:
            conv.bias[idx] = 0


class _BNNet(nn.Module):
    """conv-BN-ReLU-pool, conv-BN-ReLU (padded), flatten, fc-BN1d-ReLU, fc."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 8, 3)
        self.b1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 6, 3, padding=1)
        self.b2 = nn.BatchNorm2d(6)
        self.f1 = nn.Linear(6 * 6 * 6, 12)
        self.b3 = nn.BatchNorm1d(12)
        self.f2 = nn.Linear(12, 3)

    def forward(self, x):
        x = nn.functional.max_pool2d(torch.relu(self.b1(self.c1(x))), 2)
        x = torch.relu(self.b2(self.c2(x)))
        x = x.view(x.size(0), -1)
        return self.f2(torch.relu(self.b3(self.f1(x))))


def _randomize_bn(net):
    g = torch.Generator().manual_seed(3)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


def test_removal_through_batchnorm_pooling_and_flatten_keeps_predictions():
    torch.manual_seed(0)
    net = _BNNet().eval()
    _randomize_bn(net)
    _zero_filters(net.c1, [1, 4, 5])  # dead filters: BN(0) != 0 -> folded into c2? padded: kept
    _zero_filters(net.c2, [0, 3])  # dead before an unpadded flatten -> folded into f1's bias
    with torch.no_grad():
        net.f2.weight[:, [2, 7, 8]] = 0  # f1 outputs nobody reads
        net.f1.weight[:, 36 * 5 : 36 * 5 + 10] = 0  # some features of channel 5
    x = torch.randn(16, 1, 14, 14)
    small, info = remove_pruned(net, x[:1])
    assert torch.allclose(small(x), net(x), atol=1e-5)
    assert small.c2.out_channels == 4 and small.b2.num_features == 4
    assert small.f1[1].out_features == 9 and small.b3.num_features == 9
    assert isinstance(small.f1[0], FeatureSelect)
    # a dead c1 filter gives relu(BN(0)) everywhere: removable where that is 0; a non-zero
    # constant meets c2's zero padding (position-dependent), so that filter stays
    b1 = net.b1
    const = torch.relu(b1.bias - b1.weight * b1.running_mean / (b1.running_var + b1.eps).sqrt())
    zero_dead = int((const[[1, 4, 5]] == 0).sum())
    assert 0 < zero_dead < 3  # the test exercises both cases
    assert small.c1.out_channels == 8 - zero_dead
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())


def test_removal_on_lenet300_drops_pixels_and_neurons():
    torch.manual_seed(0)
    net = models.create("lenet300").eval()
    with torch.no_grad():
        net.fc1.weight[:, :100] = 0  # the first 100 pixels
        net.fc1.weight[:, 300:310] = 0
        net.fc2.weight[:, 10:50] = 0  # 40 fc1 outputs unused
        net.fc3.weight[:, :90] = 0  # 90 fc2 outputs unused
    x = torch.randn(32, 1, 28, 28)
    small, info = remove_pruned(net, x[:1])
    assert torch.allclose(small(x), net(x), atol=1e-5)
    assert small.fc1[1].weight.shape == (260, 674)
    assert small.fc2.weight.shape == (10, 260)
    assert small.fc3.weight.shape == (10, 10)
    assert info["in_idx"]["fc1"].tolist() == list(range(100, 300)) + list(range(310, 784))


def test_removal_in_a_resnet_leaves_residual_layers_whole():
    torch.manual_seed(0)
    net = models.create("resnet20").eval()
    _randomize_bn(net)
    convs = [m for n, m in net.named_modules() if isinstance(m, nn.Conv2d)]
    for c in convs:
        _zero_filters(c, [0, 1])
    x = torch.randn(4, 3, 32, 32)
    small, info = remove_pruned(net, x[:1])
    assert torch.allclose(small(x), net(x), atol=1e-4)
    assert info["left_whole"], "convs feeding residual additions must be reported"
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in net.parameters())


def test_masked_bayesian_model_and_removed_model_agree():
    torch.manual_seed(0)
    net = models.create("lenet5")
    bayesian_(net)
    layers = bayes.bayes_layers(net)
    _set_z(layers["conv1"], slice(None, 12), 1e-4)  # log alpha >> 0: pruned
    _set_z(layers["conv2"], slice(5, 45), 1e-4)
    _set_z(layers["fc1"], slice(None, 700), 1e-4)
    _set_z(layers["fc2"], slice(100, None), 1e-4)
    cfg = BayesConfig()
    ex = torch.zeros(1, 1, 28, 28)
    pq = bayes.prune_and_quantize(net, cfg, ex, list(layers))
    arch = [r["kept_groups"] for r in pq["layers"]]
    # fc1 reads features 700..799 = filters 43 (4 positions) and 44..49 of conv2, of which the
    # conv2 mask keeps 45..49: 5 filters, 80 features
    assert arch == [8, 5, 80, 100]
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(pq["small"](x), pq["masked"](x), atol=1e-5)
        assert torch.allclose(net.eval()(x), pq["masked"](x), atol=1e-5)


# ----------------------------------------------------------------------------- freeze / runtime


def test_freeze_save_load_runtime_agree_with_the_fixed_point_model(tmp_path):
    from lowbit.freeze import freeze
    from lowbit.packfile import load_frozen, save
    from lowbit.runtime import load

    torch.manual_seed(0)
    net = models.create("lenet5")
    bayesian_(net)
    layers = bayes.bayes_layers(net)
    _set_z(layers["conv1"], slice(None, 10), 1e-4)
    _set_z(layers["fc1"], slice(None, 600), 1e-4)
    ex = torch.zeros(1, 1, 28, 28)
    pq = bayes.prune_and_quantize(net, BayesConfig(), ex, list(layers))
    q = pq["quant"].eval()
    frozen = freeze(q, ex)
    path = tmp_path / "m.lowbit"
    save(frozen, path)
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        ref = q(x)
    back = load_frozen(path)(x)
    assert torch.allclose(back, ref, atol=1e-4)
    engine = load(path, threads=1)
    out = torch.from_numpy(engine(x.numpy()))
    assert (out.argmax(1) == ref.argmax(1)).all()
    assert torch.allclose(out, ref, atol=1e-3)


# ----------------------------------------------------------------------------- CLI


def test_cli_compress_run_bench_end_to_end(tmp_path, capsys):
    out = tmp_path / "b"
    code = main([
        "compress", "--method", "bayes", "--prior", "ghs", "--model", "lenet300", "--data",
        "sample", "--epochs", "1", "--limit-train", "256", "--limit-test", "128", "--out",
        str(out), "--json", "--quiet",
    ])  # fmt: skip
    stdout, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(stdout)
    for key in ("method", "model", "test_accuracy", "fp_test_accuracy", "storage_bytes",
                "compression_vs_fp32", "energy_vs_fp16", "density", "out"):  # fmt: skip
        assert key in res
    assert res["method"] == "bayes" and res["bayes"]["prior"] == "ghs"
    assert res["frozen_agreement"] >= 0.99
    assert (out / "model.lowbit").is_file() and (out / "summary.md").is_file()
    # everything is counted against the original 266,610 fp32 parameters
    assert res["fp32_storage_bytes"] == 4 * 266_610
    code = main(["run", str(out / "model.lowbit"), "--data", "sample", "--limit-test", "128",
                 "--json"])  # fmt: skip
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert json.loads(stdout)["test_accuracy"] == pytest.approx(
        res["frozen_test_accuracy"], abs=0.01
    )
    code = main(["bench", str(out / "model.lowbit"), "--threads", "1", "--batch", "1", "--json"])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    json.loads(stdout)


def test_fixed_point_qat_keeps_bits_and_architecture_and_freezes(tmp_path, capsys):
    """qat_epochs trains the pruned fixed-point model itself: the bits and the pruned
    architecture stay those the posterior chose, the frozen file is that trained model."""
    out = tmp_path / "q"
    code = main([
        "compress", "--method", "bayes", "--model", "lenet300", "--data", "sample",
        "--epochs", "1", "--limit-train", "256", "--limit-test", "128", "--out", str(out),
        "--method-arg", "qat_epochs=1", "--json", "--quiet",
    ])  # fmt: skip
    stdout, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(stdout)
    b = res["bayes"]
    assert b["qat_epochs"] == 1 and 0 <= b["accuracy_fixed_point_before_qat"] <= 1
    assert res["test_accuracy"] == b["accuracy_fixed_point"]
    # the QAT run trained and checkpointed; its weights are what the file holds
    ck = torch.load(out / "bayes-qat" / "last.pt", weights_only=True)
    assert ck["epoch"] == 1 and res["epochs"] >= 2
    assert res["frozen_agreement"] >= 0.99
    frozen = load_frozen(out / "model.lowbit")
    fixed = {op.attrs["module"]: op.attrs["weight_codec"]["_data"] for op in frozen.ops
             if op.attrs.get("weight_codec", {}).get("_type") == "fixed"}  # fmt: skip
    assert set(fixed) == {row["layer"] for row in b["layers"]} == {"fc1", "fc2", "fc3"}
    for row in b["layers"]:
        assert fixed[row["layer"]]["fraction_bits"] == row["fraction_bits"], row["layer"]
        assert fixed[row["layer"]]["integer_bits"] == row["integer_bits"], row["layer"]
    # the file holds the QAT-trained weights: fc1's codes are its checkpoint weights on the grid
    w = ck["state_dict"]["fc1.weight"]
    f, lim = (
        fixed["fc1"]["fraction_bits"],
        2 ** (fixed["fc1"]["integer_bits"] + fixed["fc1"]["fraction_bits"]) - 1,
    )
    fc1 = next(op for op in frozen.ops if op.attrs.get("module") == "fc1")
    expect = torch.clamp(torch.round(w * 2.0**f), -lim, lim).to(torch.int64)
    assert torch.equal(fc1.tensors["codes"].to(torch.int64), expect)
    with pytest.raises(ValueError, match="qat_epochs"):
        BayesConfig(qat_epochs=-1)


def test_cli_bad_bayes_option_is_a_clear_error(tmp_path, capsys):
    code = main([
        "compress", "--method", "bayes", "--model", "lenet300", "--data", "sample", "--epochs",
        "1", "--out", str(tmp_path), "--method-arg", "bits_rule=bogus", "--json",
    ])  # fmt: skip
    stdout, _ = capsys.readouterr()
    assert code != 0 and "bits_rule" in json.loads(stdout)["error"]


def test_cli_threshold_for_an_unknown_layer_fails_before_training(tmp_path, capsys):
    code = main([
        "compress", "--method", "bayes", "--model", "lenet300", "--data", "sample", "--epochs",
        "1", "--out", str(tmp_path / "x"), "--method-arg", "thresholds=fc9=-2", "--json",
    ])  # fmt: skip
    stdout, _ = capsys.readouterr()
    assert code != 0 and "fc9" in json.loads(stdout)["error"]
    assert not (tmp_path / "x" / "fp").exists()  # nothing was trained
