"""Contract tests over every codec, checked against independent numpy references."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.codecs import (
    INT8_ACT_MODES,
    Binary,
    FixedPoint,
    Float,
    FloatAct,
    Int,
    Int8Act,
    SignAct,
    Ternary,
    act_codec,
    codec_from_dict,
    weight_codec,
)
from lowbit.layers import ActQuantizer, QuantConv2d, QuantLinear, sign_with_estimator

WEIGHT_CODECS = [
    Float(),
    Int(8),
    Int(4, per_channel=False),
    Ternary(),
    Ternary(per_channel=False, packing="base3"),
    Ternary(rule="twn"),
    Ternary(per_channel=False, rule="twn", delta=0.5),
    Binary("pm1"),
    Binary("01"),
    Binary("ab"),
    FixedPoint(1, 6),
]


def _params(codec, w):
    return {k: v.clone().requires_grad_(True) for k, v in codec.init_params(w).items()}


def _reference(codec, w: np.ndarray) -> np.ndarray:
    """Independent numpy implementation of each codec's quantized value."""
    flat = w.reshape(w.shape[0], -1)
    if isinstance(codec, Float):
        return w
    if isinstance(codec, Int):
        q = 2 ** (codec.bits - 1) - 1
        m = np.abs(flat).max(1) if codec.per_channel else np.abs(flat).max()
        s = np.maximum(m, 1e-8) / q
        s = s.reshape(-1, *[1] * (w.ndim - 1)) if codec.per_channel else s
        return np.clip(np.round(w / s), -q, q) * s
    if isinstance(codec, Ternary) and codec.rule == "twn":
        rows = flat if codec.per_channel else flat.reshape(1, -1)
        out = np.zeros_like(rows)
        for i, r in enumerate(rows):  # one threshold and one scale per row
            keep = np.abs(r) > codec.delta * np.abs(r).mean()
            out[i] = np.sign(r) * keep * (np.abs(r[keep]).mean() if keep.any() else 1.0)
        return out.reshape(w.shape)
    if isinstance(codec, Ternary):
        m = np.abs(flat).mean(1) if codec.per_channel else np.abs(flat).mean()
        s = m.reshape(-1, *[1] * (w.ndim - 1)) if codec.per_channel else m
        return np.clip(np.round(w / (s + codec.eps)), -1, 1) * s
    if isinstance(codec, Binary):
        sign = np.where(w > 0, 1.0, -1.0)
        if codec.domain == "pm1":
            return sign * np.abs(flat).mean(1).reshape(-1, *[1] * (w.ndim - 1))
        beta = w[w > 0].mean()
        alpha = 0.0 if codec.domain == "01" else w[w <= 0].mean()
        return np.where(w > 0, beta, alpha)
    if isinstance(codec, FixedPoint):
        q = 2 ** (codec.integer_bits + codec.fraction_bits) - 1
        return np.clip(np.round(w * 2**codec.fraction_bits), -q, q) / 2**codec.fraction_bits
    raise AssertionError(codec)


@pytest.mark.parametrize("codec", WEIGHT_CODECS, ids=str)
def test_value_matches_reference(codec):
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, 3, dtype=torch.float64) * 0.3
    got = codec.fake_quant(w, codec.init_params(w)).detach().numpy()
    np.testing.assert_allclose(got, _reference(codec, w.numpy()), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("codec", WEIGHT_CODECS, ids=str)
def test_value_set(codec):
    torch.manual_seed(1)
    w = torch.randn(5, 16)
    enc = codec.encode(w, codec.init_params(w))
    codes = enc.codes
    if isinstance(codec, Ternary):
        assert set(codes.unique().tolist()) <= {-1, 0, 1}
    elif isinstance(codec, Binary):
        assert set(codes.unique().tolist()) <= {0, 1}
        per_row = codec.decode(enc).unique(dim=None)
        assert len(per_row) <= (2 * 5 if codec.domain == "pm1" else 2)
    elif isinstance(codec, Int):
        q = 2 ** (codec.bits - 1) - 1
        assert codes.abs().max() <= q
    elif isinstance(codec, FixedPoint):
        assert codes.abs().max() <= 2 ** (codec.integer_bits + codec.fraction_bits) - 1


@pytest.mark.parametrize("codec", WEIGHT_CODECS, ids=str)
def test_encode_decode_equals_fake_quant(codec):
    torch.manual_seed(2)
    w = torch.randn(8, 3, 3, 3) * 0.5
    p = codec.init_params(w)
    assert torch.allclose(codec.decode(codec.encode(w, p)), codec.fake_quant(w, p), atol=1e-6)


@pytest.mark.parametrize("codec", WEIGHT_CODECS, ids=str)
def test_ste_gradient(codec):
    """Identity STE (clipped to |w| <= clip for binary codecs) on the latent weights."""
    torch.manual_seed(3)
    w = (torch.randn(4, 10) * 1.2).requires_grad_(True)
    g = torch.randn(4, 10)
    params = _params(codec, w.detach())
    (codec.fake_quant(w, params) * g).sum().backward()
    if isinstance(codec, Binary):
        inside = (w.detach().abs() <= codec.clip).float()
        if codec.domain == "pm1":
            a = w.detach().abs().mean(1, keepdim=True)
            expected = g * a * inside
        else:
            tau = params["tau"].detach()
            expected = g * tau * inside
        torch.testing.assert_close(w.grad, expected)
    else:
        torch.testing.assert_close(w.grad, g)


def test_ternary_twn_threshold_and_scale():
    w = torch.tensor([[1.0, -0.2, 0.5, -2.0, 0.0, 0.3]])  # mean|w| = 4/6
    t = Ternary(rule="twn").encode(w).codes
    # threshold 0.7 * 4/6 = 0.467: 1.0, 0.5 and -2.0 are kept, the rest are zero
    assert t.tolist() == [[1, 0, 1, -1, 0, 0]]
    got = Ternary(rule="twn").fake_quant(w)
    s = (1.0 + 0.5 + 2.0) / 3
    torch.testing.assert_close(got, torch.tensor([[s, 0, s, -s, 0, 0]]))
    # the absmean rule thresholds at mean|w| / 2 = 0.333 on the same row
    assert Ternary().encode(w).codes.tolist() == [[1, 0, 1, -1, 0, 0]]
    assert Ternary(rule="twn", delta=0.4).encode(w).codes.tolist() == [[1, 0, 1, -1, 0, 1]]
    zero = Ternary(rule="twn").fake_quant(torch.zeros(2, 3))  # no weight kept: all zero
    assert torch.equal(zero, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="rule must be one of absmean, twn"):
        Ternary(rule="bitnet")
    with pytest.raises(ValueError, match="delta"):
        Ternary(rule="twn", delta=0)


@pytest.mark.parametrize("codec", WEIGHT_CODECS, ids=str)
def test_json_round_trip(codec):
    d = json.loads(json.dumps(codec.to_dict()))
    assert d["_version"] == 1
    assert codec_from_dict(d) == codec


def test_bits():
    assert Float().weight_bits() == 32 and Float(16).weight_bits() == 16
    assert Int(8).weight_bits() == 8 and Int(3).weight_bits() == 3
    assert Ternary().weight_bits() == 2 and Ternary(packing="base3").weight_bits() == 1.6
    assert Binary("01").weight_bits() == 1
    assert FixedPoint(2, 5).weight_bits() == 8  # sign + integer + fraction


def test_mac_kinds():
    assert Ternary().mac_kind(Int8Act()) == "int_add"
    assert Int(8).mac_kind(Int8Act()) == "int_mac"
    assert Binary().mac_kind(SignAct()) == "xnor"
    assert Float().mac_kind(FloatAct()) == "fp32_mac"


def test_validation_errors():
    with pytest.raises(ValueError, match="bits"):
        Int(1)
    with pytest.raises(ValueError, match="domain"):
        Binary("xy")
    with pytest.raises(ValueError, match="unknown weight codec 'int7'.*ternary"):
        weight_codec("int7")
    with pytest.raises(ValueError, match="unknown codec type"):
        codec_from_dict({"_type": "nope"})
    with pytest.raises(ValueError, match="newer"):
        codec_from_dict({"_type": "int", "_version": 9, "_data": {}})
    with pytest.raises(ValueError, match="no options"):
        codec_from_dict({"_type": "int", "_data": {"bitz": 3}})
    assert act_codec("sign") == SignAct()


@settings(max_examples=30, deadline=None)
@given(
    out_ch=st.integers(1, 8),
    fan_in=st.integers(1, 40),
    scale=st.floats(1e-3, 10.0),
    codec=st.sampled_from(WEIGHT_CODECS),
)
def test_property_random_shapes(out_ch, fan_in, scale, codec):
    w = torch.randn(out_ch, fan_in) * scale
    p = codec.init_params(w)
    q = codec.fake_quant(w, p)
    assert q.shape == w.shape and torch.isfinite(q).all()
    assert torch.allclose(codec.decode(codec.encode(w, p)), q, atol=1e-5 * scale)


def test_approxsign_and_irnet_gradients():
    x = torch.tensor([-1.5, -0.5, -0.0, 0.25, 0.9, 2.0], requires_grad=True)
    y = sign_with_estimator(x, "approxsign")
    assert y.tolist() == [-1, -1, -1, 1, 1, 1]  # sign(0) = -1
    y.sum().backward()
    expected = [0.0, 2 + 2 * -0.5, 2.0, 2 - 2 * 0.25, 2 - 2 * 0.9, 0.0]
    torch.testing.assert_close(x.grad, torch.tensor(expected))
    x.grad = None
    t, k = 2.0, 1.0
    sign_with_estimator(x, "irnet", t, k).sum().backward()
    torch.testing.assert_close(x.grad, k * t * (1 - torch.tanh(t * x.detach()) ** 2))


def test_int8_activation_ema_and_freeze():
    q = ActQuantizer(Int8Act(momentum=0.5))
    x = torch.rand(4, 3) * 2.0  # non-negative: unsigned
    y = q(x)
    assert not q.signed and q.scale.item() == pytest.approx(x.max().item() / 255)
    assert ((y / q.scale).round() - y / q.scale).abs().max() < 1e-4
    q.eval()
    s = q.scale.item()
    q(torch.rand(4, 3) * 10)
    assert q.scale.item() == s  # frozen in eval
    big = q(torch.tensor([100.0]))
    assert big.item() == pytest.approx(255 * s)  # clipped at the range


def test_quant_layers_share_fp_weights():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1, groups=2, bias=True)
    q = QuantConv2d.from_float(conv, "int8", "float")
    assert q.weight is conv.weight and q.groups == 2
    x = torch.randn(2, 4, 5, 5)
    ref = torch.nn.functional.conv2d(x, Int(8).fake_quant(conv.weight), conv.bias, padding=1,
                                     groups=2)  # fmt: skip
    torch.testing.assert_close(q(x), ref)
    lin = QuantLinear.from_float(torch.nn.Linear(5, 3), "ternary", "float")
    assert lin(torch.randn(2, 5)).shape == (2, 3)


# ----------------------------------------------------------------------------- fast paths
# The fake-quant forward paths are fused autograd Functions; these references are the
# plain autograd formulation (every step an ordinary op, the STE as ``x + (q - x).detach()``)
# that they must reproduce: the same values and the same gradients.


class _RefInt8Act:
    """Straightforward int8 activation quantizer: state in float32 tensors, read back freely."""

    def __init__(self, codec: Int8Act):
        self.codec = codec
        self.scale = torch.tensor(-1.0)
        self.data_signed = None
        self.lsq = torch.tensor(1.0, requires_grad=True) if codec.learned else None

    def __call__(self, x: torch.Tensor, training: bool = True) -> torch.Tensor:
        c = self.codec
        if self.data_signed is None:
            self.data_signed = bool((x < 0).any())
            if c.learned:
                qmax = 255 if not self._signed() else 127
                with torch.no_grad():
                    self.lsq.fill_(2 * x.abs().mean().item() / np.sqrt(qmax))
        qmin, qmax = (-127, 127) if self._signed() else (0, 255)
        if c.learned:
            g = 1.0 / np.sqrt(x.numel() / x.shape[0] * qmax)
            scaled = self.lsq * g
            s = (scaled + (self.lsq - scaled).detach()).abs().clamp_min(1e-8)
            self.scale = s.detach().clone()
        else:
            if training:
                xd = x.detach()
                r = (xd.abs().max() if self._signed() else xd.clamp_min(0).max()).clamp_min(1e-8)
                if self.scale.item() < 0:
                    self.scale = torch.tensor(float(r) / qmax)
                else:
                    self.scale = self.scale * (1 - c.momentum) + c.momentum * float(r) / qmax
            s = self.scale.clamp_min(1e-8)
        if c.mode == "lsq":  # Esser et al.: clip, then round by STE: d/ds = round(x/s) - x/s
            xs = torch.clamp(x / s, qmin, qmax)
            return (xs + (torch.round(xs) - xs).detach()) * s
        q = torch.clamp(torch.round(x / s), qmin, qmax) * s
        inside = (x >= qmin * s) & (x <= qmax * s)
        through = x + (q - x).detach()  # identity gradient inside the range
        return torch.where(inside, through, q.detach() if c.mode == "ema" else q)

    def _signed(self) -> bool:
        return self.data_signed if self.codec.signed is None else self.codec.signed


@pytest.mark.parametrize("scalar_bounds", [True, False], ids=["scalar-bounds", "tensor-mask"])
@pytest.mark.parametrize("mode", ["ema", "lsq", "lsq-clip"])
@pytest.mark.parametrize("signed", [None, True, False])
@pytest.mark.parametrize("data", ["relu6", "normal"])
def test_int8_activation_matches_reference(monkeypatch, scalar_bounds, mode, signed, data):
    import lowbit.layers

    monkeypatch.setattr(lowbit.layers, "_SCALAR_BOUNDS", scalar_bounds)
    codec = Int8Act(signed=signed, mode=mode, momentum=0.3)
    fast, ref = ActQuantizer(codec), _RefInt8Act(codec)
    gen = torch.Generator().manual_seed(7)
    for step in range(6):
        training = step < 4
        fast.train(training)
        x = torch.randn(4, 3, 5, 5, generator=gen) * (1 + step)
        if data == "relu6":
            x = x.clamp(0, 6)
        x[0, 0, 0, :4] = torch.tensor([0.0, -0.0, 1e6, -1e6])  # zeros and far outside
        if step == 2:
            x[0, 0, 1, 0] = ref.scale * 255  # exactly on the unsigned upper bound
        x_fast, x_ref = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y_fast, y_ref = fast(x_fast), ref(x_ref, training)
        assert torch.equal(y_fast, y_ref.detach()), step
        torch.testing.assert_close(fast.scale, ref.scale, rtol=0, atol=0)
        g = torch.randn(x.shape, generator=gen)
        (y_fast * g).sum().backward()
        (y_ref * g).sum().backward()
        if mode == "lsq":  # the reference's dx is g * (1/s) * s, rounded
            torch.testing.assert_close(x_fast.grad, x_ref.grad, rtol=1e-6, atol=0)
        else:
            assert torch.equal(x_fast.grad, x_ref.grad), step
        if codec.learned:
            torch.testing.assert_close(fast.lsq_scale.grad, ref.lsq.grad, rtol=1e-5, atol=1e-6)
            with torch.no_grad():  # a learning step, the same on both
                fast.lsq_scale.sub_(0.05 * ref.lsq.grad.sign() * ref.lsq.detach())
                ref.lsq.sub_(0.05 * ref.lsq.grad.sign() * ref.lsq.detach())
            fast.lsq_scale.grad, ref.lsq.grad = None, None
    assert fast.signed == ref._signed()


def test_int8_activation_no_grad_and_first_layer_paths():
    """Without a graph (no_grad, or an input that needs no gradient) the value is the same."""
    x = torch.randn(2, 3, 4, 4)
    a, b = ActQuantizer(Int8Act()), ActQuantizer(Int8Act())
    with torch.no_grad():
        ya = a(x)
    yb = b(x.clone().requires_grad_(True))
    assert not ya.requires_grad and yb.requires_grad
    assert torch.equal(ya, yb.detach()) and torch.equal(a.scale, b.scale)


def test_int8_activation_reads_nothing_back_after_first_batch(monkeypatch):
    """After the first batch the training step keeps its state in tensors (no .item())."""
    import lowbit.layers

    monkeypatch.setattr(lowbit.layers, "_SCALAR_BOUNDS", False)
    calls = []
    real_item = torch.Tensor.item

    def item(t):
        calls.append(t)
        return real_item(t)

    for mode in INT8_ACT_MODES:
        q = ActQuantizer(Int8Act(mode=mode))
        q(torch.randn(2, 8, requires_grad=True)).sum().backward()  # first batch: decides
        calls.clear()
        monkeypatch.setattr(torch.Tensor, "item", item)
        for _ in range(3):
            q(torch.randn(2, 8, requires_grad=True)).sum().backward()
        monkeypatch.setattr(torch.Tensor, "item", real_item)
        assert calls == [], mode


def test_int8_activation_sign_follows_the_buffer():
    """The cached sign is re-read when ``signed_flag`` changes (load_state_dict, fill_)."""
    q = ActQuantizer(Int8Act())
    q(torch.rand(2, 5))
    assert q.qrange() == (0, 255)
    other = ActQuantizer(Int8Act())
    other(torch.randn(2, 5) - 3)
    q.load_state_dict(other.state_dict())
    assert q.signed and torch.equal(q.scale, other.scale)
    x = torch.randn(2, 5) - 3
    assert torch.equal(q(x), other(x))  # signed range now: negatives are kept
    q.signed_flag.fill_(-1.0)  # reset: the next batch decides again
    q(torch.rand(2, 5))
    assert not q.signed


def _ref_weight_value(codec, w: torch.Tensor) -> torch.Tensor:
    """Plain torch formula of the quantized weight (Int / Ternary)."""
    w = w.detach()
    flat = w.abs().reshape(w.shape[0], -1)
    shape = [-1] + [1] * (w.ndim - 1)
    if isinstance(codec, Int):
        q = 2 ** (codec.bits - 1) - 1
        m = flat.amax(1).reshape(shape) if codec.per_channel else w.abs().amax()
        s = m.clamp_min(1e-8) / q
        return torch.clamp(torch.round(w / s), -q, q) * s
    s = flat.mean(1).reshape(shape) if codec.per_channel else w.abs().mean()
    return torch.clamp(torch.round(w / (s + codec.eps)), -1, 1) * s


@pytest.mark.parametrize(
    "codec",
    [Int(8), Int(4, per_channel=False), Ternary(), Ternary(per_channel=False)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_weight_fake_quant_matches_reference(codec, dtype):
    torch.manual_seed(11)
    w = torch.randn(16, 8, 3, 3, dtype=dtype) * 0.2
    w[0, 0, 0, 0] = 3.0  # an outlier (clipped to the scale for ternary)
    w[1] = 0.0  # an all-zero channel
    value = _ref_weight_value(codec, w)
    w_fast = w.clone().requires_grad_(True)
    w_ref = w.clone().requires_grad_(True)
    y_fast = codec.fake_quant(w_fast)
    y_ref = w_ref + (value - w_ref).detach()  # the plain STE
    assert torch.equal(y_fast.detach(), value)  # exactly the quantized value
    torch.testing.assert_close(y_fast.detach(), y_ref.detach(), rtol=0, atol=1e-6)
    g = torch.randn(w.shape, dtype=dtype)
    (y_fast * g).sum().backward()
    (y_ref * g).sum().backward()
    assert torch.equal(w_fast.grad, w_ref.grad)
    with torch.no_grad():
        assert torch.equal(codec.fake_quant(w), value)
    enc = codec.encode(w.float())
    assert torch.equal(codec.decode(enc), _ref_weight_value(codec, w.float()))


@pytest.mark.parametrize("method", ["prom", "sst", "burn", "sbnn"])
def test_act_mode_is_checked_by_every_method(method):
    import lowbit

    with pytest.raises(ValueError, match="act_mode must be one of ema, lsq, lsq-clip, got 'lsqq'"):
        lowbit.recipe(method, act_mode="lsqq")
    with pytest.raises(ValueError, match="mode must be one of"):
        Int8Act(mode="lsqq")
