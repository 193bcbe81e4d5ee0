"""SST (lowbit.methods.sst, lowbit.sstcode): codebook, projection optimality, packing,
gradual pruning, BatchNorm insertion, freeze -> file -> runtime."""

from __future__ import annotations

import contextlib
import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import lowbit
from lowbit import data, models, sstcode, transforms
from lowbit.fileformat import FormatError, read
from lowbit.freeze import freeze
from lowbit.methods.sst import (
    SST,
    SSTConfig,
    SSTSchedule,
    add_batchnorm_,
    group_nonzeros,
    sst_layers,
    sst_project,
    sst_recipe,
    support_for_delta,
)
from lowbit.packfile import load_frozen, save
from lowbit.recipes import Recipe, compress_
from lowbit.runtime import _cext, engine
from lowbit.runtime import kernels as K
from lowbit.train import TrainConfig, Trainer, build_from_checkpoint

needs_c = pytest.mark.skipif(not _cext.available(), reason=f"C kernels: {_cext.why_not()}")

# ----------------------------------------------------------------------------- codebook


@pytest.mark.parametrize("n,k", [(8, 2), (4, 1), (8, 1), (1, 1), (5, 5), (16, 2), (12, 3)])
def test_codebook_size_order_and_patterns(n, k):
    book = sstcode.codebook(n, k)
    expect = sum(math.comb(n, j) * 2**j for j in range(k + 1))
    assert book.shape == (expect, n) == (sstcode.codebook_size(n, k), n)
    assert sstcode.index_bits(n, k) == max(1, math.ceil(math.log2(expect)))
    assert len({tuple(r) for r in book.tolist()}) == expect  # all distinct
    nz = (book != 0).sum(1)
    assert nz.max() == k and np.all(np.diff(nz) >= 0)  # fewer non-zeros first
    assert set(np.unique(book).tolist()) <= {-1, 0, 1}
    assert not book[0].any()
    if n >= 1:
        assert book[1].tolist() == [1] + [0] * (n - 1)
        assert book[2].tolist() == [-1] + [0] * (n - 1)


def test_presets_have_the_published_sizes():
    assert [sstcode.codebook_size(n, k) for n, k in [(8, 2), (4, 1), (8, 1)]] == [129, 9, 17]
    assert [SST(n, k).weight_bits() for n, k in [(8, 2), (4, 1), (8, 1)]] == [1.0, 1.0, 0.625]


@pytest.mark.parametrize("n,k", [(17, 1), (0, 1), (8, 0), (8, 9), (16, 8), (2.5, 1), (8, True)])
def test_bad_n_k_are_clear_errors(n, k):
    with pytest.raises(ValueError, match="SST"):
        SST(n, k)


def test_random_encode_decode_round_trip(tmp_path):
    from lowbit.fileformat import pack, write

    rng = np.random.default_rng(0)
    for i in range(30):
        n = int(rng.integers(1, 13))
        k = int(rng.integers(1, min(n, 4) + 1))
        rows, fan_in = int(rng.integers(1, 7)), int(rng.integers(1, 40))
        w = torch.from_numpy(rng.standard_normal((rows, fan_in)).astype(np.float32))
        t, _ = sst_project(w, n, k)
        idx = sstcode.encode_groups(t.numpy(), n, k)
        assert idx.shape == (rows, -(-fan_in // n))
        back = sstcode.decode_groups(idx, n, k, fan_in)
        assert np.array_equal(back, t.numpy().astype(np.int8))
        # through the file: indices packed at ceil(log2(codebook)) bits
        spec = {**SST(n, k).file_packing(), "shape": [rows, fan_in], "dtype": "int8"}
        packed = pack(t.numpy(), spec)
        assert packed.nbytes == -(-idx.size * sstcode.index_bits(n, k) // 8)
        write(tmp_path / f"{i}.lowbit", {"w": packed}, {"ops": []}, {}, {"w": spec})
        assert np.array_equal(read(tmp_path / f"{i}.lowbit").tensors["w"], t.numpy())


def test_encode_refuses_too_many_nonzeros_and_bad_codes():
    with pytest.raises(ValueError, match="3 non-zeros"):
        sstcode.encode_groups(np.array([[1, 1, -1, 0]]), 4, 2)
    with pytest.raises(ValueError, match="-1, 0, 1"):
        sstcode.encode_groups(np.array([[2, 0, 0, 0]]), 4, 2)
    with pytest.raises(ValueError, match="out of range"):
        sstcode.decode_groups(np.array([[9]]), 4, 1, 4)


# ----------------------------------------------------------------------------- projection


def test_projection_keeps_largest_and_ties_by_position():
    w = torch.tensor([[0.1, -0.5, 0.5, 0.2, 0.0, 0.0, 0.3, -0.3]])
    t, delta = sst_project(w, 4, 2)
    assert t.tolist() == [[0, -1, 1, 0, 0, 0, 1, -1]]
    assert delta.item() == pytest.approx((0.5 + 0.5 + 0.3 + 0.3) / 4)
    assert group_nonzeros(t, 4).tolist() == [[2, 2]]


def test_fixed_support_delta_is_l2_optimal():
    """Fix the support the projection chose; brute-force Delta: the mean |w| wins."""
    g = torch.Generator().manual_seed(1)
    for per_channel in (True, False):
        w = torch.randn(3, 12, generator=g)
        t, delta = sst_project(w, 4, 2, per_channel=per_channel)
        grid = torch.linspace(0.01, 3.0, 3000)
        for c in range(3) if per_channel else [None]:
            ws, ts = (w[c], t[c]) if c is not None else (w.flatten(), t.flatten())
            d_best = delta[c if c is not None else 0]
            errs = ((ws[None] - grid[:, None] * ts[None]) ** 2).sum(1)
            err_ours = ((ws - d_best * ts) ** 2).sum()
            assert err_ours <= errs.min() + 1e-6


def test_fixed_delta_support_is_l2_optimal():
    """Fix Delta; brute-force every pattern of at most k non-zeros: the threshold rule
    (the k largest with |w| >= Delta / 2) reaches the minimum error."""
    g = torch.Generator().manual_seed(2)
    n, k = 5, 2
    book = torch.from_numpy(sstcode.codebook(n, k).astype(np.float32))
    for _ in range(200):
        w = torch.randn(n, generator=g)
        delta = float(torch.rand((), generator=g) * 2 + 0.05)
        a = w.abs()[None, None]
        from lowbit.methods.sst import _topk_mask

        top = _topk_mask(a, k)
        s = support_for_delta(a, top, torch.tensor(delta))[0, 0]
        ours = ((w - delta * torch.sign(w) * s) ** 2).sum()
        brute = ((w[None] - delta * book) ** 2).sum(1).min()
        assert ours <= brute + 1e-5


def test_threshold_option_drops_small_weights():
    w = torch.tensor([[1.0, 0.05, 0.0, 0.0, 1.0, 0.9, 0.0, 0.0]])
    t, _ = sst_project(w, 4, 2, threshold=True)
    assert t.tolist() == [[1, 0, 0, 0, 1, 1, 0, 0]]
    t2, _ = sst_project(w, 4, 2, threshold=False)
    assert t2.tolist() == [[1, 1, 0, 0, 1, 1, 0, 0]]


def test_codec_encode_decode_equals_fake_quant_and_ste():
    codec = SST(8, 2)
    w = torch.randn(6, 5, 3, 3, requires_grad=True)
    q = codec.fake_quant(w)
    enc = codec.encode(w)
    assert torch.equal(codec.decode(enc), q.detach())
    assert group_nonzeros(enc.codes, 8).max() <= 2
    q.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # identity STE
    d = codec.to_dict()
    assert "k_active" not in d["_data"]
    assert lowbit.codecs.codec_from_dict(json.loads(json.dumps(d))) == codec
    assert codec.code_bits((6, 5, 3, 3)) == 6 * 6 * 8  # 45 weights -> 6 groups of 8 bits
    assert codec.file_packing() == {"kind": "sst", "n": 8, "k": 2, "bits": 8}


# ----------------------------------------------------------------------------- recipe


def test_recipe_layers_and_bn_insertion():
    torch.manual_seed(0)
    net = models.create("lenet300")
    compress_(net, sst_recipe())
    names = [n for n, _ in sst_layers(net)]
    assert names == ["fc1.0", "fc2.0", "fc3"]  # all SST, BN after all but the last
    assert isinstance(net.fc1[1], nn.BatchNorm1d) and isinstance(net.fc3, nn.Linear)
    vgg = models.create("vgg_small", width=0.125)
    compress_(vgg, sst_recipe(first="auto"))
    assert not isinstance(vgg.features.conv0.weight_codec, SST)  # first conv: int8
    assert isinstance(vgg.features.conv1.weight_codec, SST)
    assert add_batchnorm_(models.create("vgg_small", width=0.125)) == []  # has BN already
    with pytest.raises(ValueError, match="first must be one of"):
        sst_recipe(first="maybe")
    with pytest.raises(ValueError, match="start_k"):
        SSTConfig(n=4, k=1, start_k=8)
    with pytest.raises(ValueError, match="patterns, more than"):
        sst_recipe(n=16, k=8)


def test_inserted_bn_starts_as_identity():
    torch.manual_seed(0)
    net = models.create("lenet300")
    ref = models.create("lenet300")
    ref.load_state_dict(net.state_dict())
    add_batchnorm_(net)
    net.train()
    x = torch.randn(64, 1, 28, 28)
    with torch.no_grad():
        assert torch.allclose(net(x), ref(x), atol=1e-4)  # first training batch: identity
        net.eval()
        assert torch.allclose(net(x), ref(x), atol=1e-3)  # running stats from that batch


def test_schedule_lowers_k_to_target():
    net = compress_(models.create("lenet300"), sst_recipe(n=8, k=2, prune_end=0.5))
    hook = SSTSchedule(net, 8, 0.0, 0.5)
    ks = [hook.k_at(p, 2) for p in (0.0, 0.1, 0.25, 0.4, 0.5, 0.9)]
    assert ks[0] == 8 and ks[-2:] == [2, 2] and ks == sorted(ks, reverse=True)

    class T:
        config = TrainConfig(epochs=2)
        steps_per_epoch = 10
        global_step = 0

    hook.on_epoch_start(T(), 0)
    assert all(m.weight_codec.k_active == 8 for _, m in sst_layers(net))
    # a dense ternary start: at k_active = n the forward value is the threshold-rule ternary
    layer = sst_layers(net)[0][1]
    assert layer.weight_codec.ternary_active
    w = layer.weight.detach()
    t, delta = sst_project(w, 8, 8, threshold=True)
    assert torch.equal(layer.quantized_weight().detach(), t * delta[:, None])
    assert 0 < (t == 0).float().mean() < 0.9
    T.global_step = 9
    hook.after_step(T())  # progress 0.5: the target
    assert all(m.weight_codec.k_active is None for _, m in sst_layers(net))


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """LeNet-300-100 on the built-in sample, SST(8, 2) QAT for 2 short epochs."""
    tr = data.load("sample", "train").subset(512, seed=0)
    te = data.load("sample", "test").subset(200, seed=0)
    torch.manual_seed(0)
    rec = sst_recipe()
    net = compress_(models.create("lenet300"), rec, torch.zeros(1, 1, 28, 28))
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, progress=False, seed=0)
    out = tmp_path_factory.mktemp("sst")
    meta = {"model": {"name": "lenet300", "input_shape": [1, 28, 28]}, "recipe": rec.to_dict()}
    trainer = Trainer(
        net, cfg, hooks=rec.hooks(net), out_dir=out, meta=meta,
        train_transform=transforms.train_transform("sample"),
        test_transform=transforms.test_transform("sample"), log=lambda s: None,
    )  # fmt: skip
    res = trainer.fit(tr, te)
    x = transforms.test_transform("sample")(torch.as_tensor(te.images))
    return net.eval(), x, res, out


def test_trained_model_freezes_packs_and_runs(trained, tmp_path):
    net, x, res, out = trained
    assert res.history[-1]["sst_k"] == 2
    frozen = freeze(net, torch.zeros(1, 1, 28, 28))
    for op in frozen.layers():
        if op.attrs["weight_codec"]["_type"] == "sst":
            assert group_nonzeros(op.tensors["codes"], 8).max() <= 2  # every group
    with torch.no_grad():
        same = (frozen(x).argmax(1) == net(x).argmax(1)).float().mean().item()
    assert same >= 0.99
    path = tmp_path / "m.lowbit"
    info = save(frozen, path)
    # the payload is the cost model's storage figure
    report = lowbit.analyze(frozen)
    assert info["payload_bytes"] == pytest.approx(report["totals"]["storage_bytes"], rel=0.01)
    f = read(path)
    assert f.packing["fc1_0/codes"]["kind"] == "sst"
    # 300 rows x 98 groups x 8 bits
    assert f.tensors["fc1_0/codes"].shape == (300, 784)
    back = load_frozen(path)
    assert torch.equal(back(x), frozen(x))
    xs = x.numpy()
    y_gemm = engine.load(path)(xs)
    y_lut = engine.load(path, sst_kernel="lut")(xs)
    assert np.array_equal(y_gemm, y_lut)
    assert np.allclose(y_gemm, frozen(x).numpy(), atol=1e-5)
    # the QAT checkpoint rebuilds with its BatchNorms
    rebuilt, _ = build_from_checkpoint(out / "last.pt")
    with torch.no_grad():
        assert torch.allclose(rebuilt.eval()(x), net(x))


def test_conv_lut_kernel_matches_reference(tmp_path):
    torch.manual_seed(0)
    net = models.create("vgg_small", width=0.125)
    compress_(net, sst_recipe(n=4, k=1))
    net.train()
    with torch.no_grad():
        net(torch.randn(8, 3, 32, 32))  # sets the activation ranges and BN stats
    net.eval()
    frozen = freeze(net, torch.zeros(1, 3, 32, 32))
    save(frozen, tmp_path / "v.lowbit")
    x = torch.randn(3, 3, 32, 32)
    e = engine.load(tmp_path / "v.lowbit", sst_kernel="lut")
    assert "sst-lut" in e.kernels().values()
    y = e(x.numpy())
    assert np.array_equal(y, engine.load(tmp_path / "v.lowbit")(x.numpy()))
    assert np.allclose(y, frozen(x).numpy(), atol=1e-4)


@pytest.mark.parametrize("use_c", [True, False], ids=["c", "numba"])
def test_lut_matmul_equals_integer_matmul(use_c):
    """Both look-up paths (C: register tables of the group's values; numba: pattern sums over
    16 rows) against the integer matmul: odd sizes, both input types, a codebook of 4,091
    patterns (C) and a group above 15 weights (numba even where C runs)."""
    if use_c and not _cext.available():
        pytest.skip(f"C kernels not available: {_cext.why_not()}")
    rng = np.random.default_rng(3)
    cases = [
        (8, 2, np.uint8, 21, 19, 37),
        (4, 1, np.int8, 1, 70, 45),
        (8, 1, np.uint8, 2, 129, 64),
        (3, 3, np.int8, 5, 33, 10),
        (8, 2, np.int8, 1, 300, 1024),
        (16, 2, np.uint8, 3, 40, 50),
        (15, 3, np.int8, 2, 17, 31),
    ]
    for n, k, dt, p, o, f in cases:
        w = torch.from_numpy(rng.standard_normal((o, f)).astype(np.float32))
        t = sst_project(w, n, k)[0].numpy().astype(np.int8)
        lo, hi = (0, 256) if dt == np.uint8 else (-128, 128)
        x = rng.integers(lo, hi, (p, f)).astype(dt)
        x[0, :] = hi - 1 if dt == np.uint8 else lo  # the extreme input: int16 sums must hold
        packed = K.prepare_sst(t, n, k)
        assert (packed.c_taps is not None) == (n <= 15)
        with contextlib.nullcontext() if use_c else _cext.disabled():
            out = K.sst_lut_matmul(x, packed)
        assert np.array_equal(out, x.astype(np.int64) @ t.T.astype(np.int64)), (n, k, p, o, f)


@needs_c
def test_sst_taps_c_checks_its_arguments():
    t = np.zeros((40, 16), np.int8)
    t[:, 0] = 1
    pk = K.prepare_sst(t, 8, 2)
    G, k, Op = pk.c_taps.shape
    x, out = np.zeros((2, 16), np.int8), np.zeros((2, 40), np.int32)
    f = _cext.lib().sst_taps
    i0, f0 = np.zeros(1, np.int64), np.zeros(1, np.float32)
    # x, signed, P, F, colmap, G, n, taps, Op, O, k, mode, pre_shift, bias, m, n, half, lo, hi,
    # isz, scale, fbias, out, r0, r1 (mode 4: the int32 sums)
    args = [x, True, 2, 16, pk.colmap, G, 8, pk.c_taps, Op, 40, k, 4, 0, i0, i0, i0, i0, 0, 0, 4,
            f0, f0, out, 0, 2]  # fmt: skip
    f(*args)
    assert out[:, 0].tolist() == [0, 0]
    # Op, n, O, r1, F, mode (2, NCHW, is GEMM only), isz
    for i, bad in ((8, 96), (6, 16), (9, 41), (24, 3), (3, 8), (11, 2), (19, 3)):
        with pytest.raises(ValueError, match="_lbk"):
            f(*(args[:i] + [bad] + args[i + 1 :]))
    with pytest.raises(ValueError, match="taps has"):
        f(*(args[:7] + [pk.c_taps[:1]] + args[8:]))
    with pytest.raises(ValueError, match="out has"):
        f(*(args[:22] + [out[:1]] + args[23:]))
    with pytest.raises(ValueError, match="scale has"):  # mode 1 reads the float epilogue
        f(*(args[:11] + [1] + args[12:]))


def test_damaged_sst_packing_is_a_format_error(trained, tmp_path):
    net = trained[0]
    path = tmp_path / "m.lowbit"
    save(freeze(net, torch.zeros(1, 1, 28, 28)), path)
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    meta = header["__metadata__"]
    packing = json.loads(meta["lowbit.packing"])
    for bad in ({"bits": 7}, {"n": 40}, {"k": 0}):
        p2 = {**packing, "fc1_0/codes": {**packing["fc1_0/codes"], **bad}}
        h2 = {**header, "__metadata__": {**meta, "lowbit.packing": json.dumps(p2)}}
        body = json.dumps(h2).encode()
        body += b" " * ((-len(body)) % 8)
        (tmp_path / "bad.lowbit").write_bytes(len(body).to_bytes(8, "little") + body + raw[8 + n :])
        with pytest.raises(FormatError):
            load_frozen(tmp_path / "bad.lowbit")


def test_recipe_file_round_trip_keeps_prepare():
    rec = sst_recipe(n=4, k=1)
    back = Recipe.from_dict(json.loads(json.dumps(rec.to_dict())))
    assert back.prepare and back.hook_factories
    net = compress_(models.create("lenet300"), back)
    assert isinstance(net.fc1, nn.Sequential)
    assert all(isinstance(m.weight_codec, SST) and m.weight_codec.n == 4
               for _, m in sst_layers(net))  # fmt: skip


def test_every_pattern_index_decodes_to_itself():
    for n, k in [(4, 2), (6, 1)]:
        book = sstcode.codebook(n, k)
        idx = sstcode.encode_groups(book, n, k)
        assert idx[:, 0].tolist() == list(range(len(book)))
        combos = sum(1 for j in range(k + 1) for _ in itertools.combinations(range(n), j))
        assert combos <= len(book)


def test_resume_mid_schedule_is_exact(tmp_path):
    from lowbit.errors import TrainingInterrupted
    from lowbit.train import TrainHook

    class StopAt(TrainHook):
        def __init__(self, at):
            self.at = at

        def after_step(self, trainer):
            if trainer.global_step == self.at:
                raise KeyboardInterrupt

    train = data.load("sample", "train").subset(256, seed=0)
    cfg = TrainConfig(epochs=2, batch_size=64, lr=0.05, progress=False, seed=0)
    meta = {"model": {"name": "lenet300", "kwargs": {}, "num_classes": 10,
                      "input_shape": [1, 28, 28]}}  # fmt: skip
    tf = transforms.train_transform("sample")

    def fresh():
        torch.manual_seed(0)
        rec = sst_recipe(n=4, k=1, prune_end=0.9)
        return compress_(models.create("lenet300"), rec, torch.zeros(1, 1, 28, 28)), rec

    full, rec = fresh()
    Trainer(full, cfg, hooks=rec.hooks(full), train_transform=tf, log=lambda s: None).fit(train)
    part, rec2 = fresh()
    meta["recipe"] = rec2.to_dict()
    t = Trainer(part, cfg, hooks=[*rec2.hooks(part), StopAt(1)], out_dir=tmp_path, meta=meta,
                train_transform=tf, log=lambda s: None)  # fmt: skip
    with pytest.raises(TrainingInterrupted):
        t.fit(train)  # stops at step 2 of 4 of epoch 1, inside the schedule (k = 2)
    net, ckpt = build_from_checkpoint(tmp_path / "last.pt")
    ckpt["hooks"] = ckpt["hooks"][:-1]
    ckpt["step"] += 1  # the interrupt came inside after_step, before the step was counted
    ckpt["global_step"] += 1
    rec3 = net.lowbit_recipe
    Trainer(net, cfg, hooks=rec3.hooks(net), train_transform=tf, log=lambda s: None).fit(
        train, resume=ckpt
    )
    a, b = full.state_dict(), net.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
