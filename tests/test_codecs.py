"""Contract tests over every codec, checked against independent numpy references."""

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.codecs import (
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
