"""Tests of lowbit.transforms: shapes, dtypes, reproducibility and exact behaviour."""

from __future__ import annotations

import time

import pytest
import torch

from lowbit import data
from lowbit import transforms as T


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def batch(b=8, c=3, h=32, w=32, seed=0) -> torch.Tensor:
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=gen(seed))


RANDOM = [
    T.RandomCrop(32, padding=4),
    T.RandomHorizontalFlip(),
    T.RandomResizedCrop(24),
    T.ColorJitter(0.4, 0.4, 0.4, 0.1),
    T.RandomGrayscale(0.5),
    T.GaussianBlur(3),
    T.RandomApply(T.ColorJitter(0.4, 0.4), p=0.5),
]


def test_to_float_and_normalize_formula():
    x = batch()
    f = T.ToFloat()(x)
    assert f.dtype == torch.float32 and f.shape == x.shape
    assert torch.equal(f, x.float() / 255)
    assert T.ToFloat()(f) is f
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 2.0)
    y = T.Normalize(mean, std)(f)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(y, (f - m) / s)
    torch.testing.assert_close(T.Normalize(mean, std)(x), y)  # uint8 in: scaled first
    with pytest.raises(ValueError, match="channel"):
        T.Normalize((0.5,), (0.5,))(f)


@pytest.mark.parametrize("t", RANDOM, ids=lambda t: type(t).__name__)
def test_random_transforms_shapes_and_determinism(t):
    x = T.ToFloat()(batch())
    a = t(x, generator=gen(1))
    b = t(x, generator=gen(1))
    assert torch.equal(a, b)
    assert a.dtype == torch.float32
    want = (8, 3, 24, 24) if isinstance(t, T.RandomResizedCrop) else tuple(x.shape)
    assert tuple(a.shape) == want
    c = t(x, generator=gen(2))
    if not isinstance(t, T.GaussianBlur):  # blur of noise with other sigmas: differs too
        assert not torch.equal(a, c)
    assert torch.isfinite(a).all()


def test_crop_and_flip_keep_uint8():
    x = batch()
    for t in (T.RandomCrop(28, padding=2), T.RandomHorizontalFlip()):
        y = t(x, generator=gen())
        assert y.dtype == torch.uint8


def test_random_crop_shifts_content_with_zero_padding():
    p = 4
    x = batch(b=64, c=2, h=8, w=10, seed=3)
    y = T.RandomCrop((8, 10), padding=p)(x, generator=gen(5))
    padded = torch.nn.functional.pad(x, (p, p, p, p))
    offsets = set()
    for i in range(len(x)):
        hits = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if torch.equal(padded[i, :, dy : dy + 8, dx : dx + 10], y[i])
        ]
        assert hits, f"sample {i} is not a shifted window of the padded input"
        offsets.add(hits[0])
    assert len(offsets) > 10  # independent offsets per sample
    same = T.RandomCrop((8, 10), padding=0)(x, generator=gen())
    assert torch.equal(same, x)


def test_random_crop_uses_every_offset():
    x = torch.zeros(4000, 1, 1, 1, dtype=torch.uint8) + 1
    y = T.RandomCrop(1, padding=1)(x, generator=gen())  # 3x3 padded: 1 of 9 is the pixel
    frac = y.float().mean().item()
    assert 0.08 < frac < 0.14


def test_flip_flips():
    x = batch(b=200)
    y = T.RandomHorizontalFlip(0.5)(x, generator=gen(7))
    flipped = torch.tensor([torch.equal(y[i], x[i].flip(-1)) for i in range(len(x))])
    kept = torch.tensor([torch.equal(y[i], x[i]) for i in range(len(x))])
    assert (flipped | kept).all()
    assert 60 < flipped.sum() < 140
    assert torch.equal(T.RandomHorizontalFlip(1.0)(x), x.flip(-1))
    assert torch.equal(T.RandomHorizontalFlip(0.0)(x), x)


def test_generator_state_advances_and_resumes():
    t = T.Compose([T.RandomCrop(32, 4), T.RandomHorizontalFlip()])
    x = batch()
    g = gen(11)
    first, second = t(x, generator=g), t(x, generator=g)
    assert not torch.equal(first, second)
    g2 = gen(11)
    t(x, generator=g2)
    state = g2.get_state()
    g3 = torch.Generator()
    g3.set_state(state)
    assert torch.equal(t(x, generator=g3), second)


def test_random_resized_crop_full_scale_is_identity_like():
    x = T.ToFloat()(batch(b=4, h=16, w=16))
    t = T.RandomResizedCrop(16, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    torch.testing.assert_close(t(x, generator=gen()), x)
    y = T.RandomResizedCrop((8, 12))(x, generator=gen())
    assert y.shape == (4, 3, 8, 12)
    assert y.min() >= 0 and y.max() <= 1


def test_color_jitter_and_grayscale_properties():
    x = T.ToFloat()(batch())
    assert torch.equal(T.ColorJitter()(x, generator=gen()), x)
    y = T.ColorJitter(0.8, 0.8, 0.8, 0.5)(x, generator=gen())
    assert y.min() >= 0 and y.max() <= 1
    hue_zero = T.ColorJitter(hue=(0.0, 0.0))(x, generator=gen())
    assert torch.equal(hue_zero, x)
    g = T.RandomGrayscale(1.0)(x, generator=gen())
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    grey = T.ToFloat()(batch(c=1))
    assert T.ColorJitter(0.5, 0.5, 0.5, 0.2)(grey, generator=gen()).shape == grey.shape


def test_gaussian_blur_keeps_constant_and_smooths():
    const = torch.full((2, 3, 9, 9), 0.25)
    torch.testing.assert_close(T.GaussianBlur(5)(const, generator=gen()), const)
    x = T.ToFloat()(batch(b=4))
    y = T.GaussianBlur(5, sigma=(1.5, 2.0))(x, generator=gen())
    assert y.var() < x.var()
    torch.testing.assert_close(y.mean(), x.mean(), atol=0.01, rtol=0)
    with pytest.raises(ValueError):
        T.GaussianBlur(4)


def test_presets():
    x = batch(b=128)
    tr = T.train_transform("cifar10")
    te = T.test_transform("CIFAR10")
    names = [type(t).__name__ for t in tr.transforms]
    assert names == ["RandomCrop", "RandomHorizontalFlip", "ToFloat", "Normalize"]
    a = tr(x, generator=gen(1))
    assert a.dtype == torch.float32 and a.shape == x.shape
    assert torch.equal(a, tr(x, generator=gen(1)))
    mean, std = data.dataset_stats("cifar10")
    torch.testing.assert_close(te(x), T.Normalize(mean, std)(x.float() / 255))
    no_aug = T.train_transform("cifar10", augment=False)
    assert torch.equal(no_aug(x, generator=gen()), te(x))

    digits = batch(b=4, c=1, h=28, w=28)
    for name in ("sample", "mnist", "fashion_mnist"):
        t = T.train_transform(name)
        assert [type(s).__name__ for s in t.transforms] == ["ToFloat", "Normalize"]
        assert torch.equal(t(digits, generator=gen()), T.test_transform(name)(digits))

    ds = data.load("sample", "test").subset(16)
    y = T.train_transform(ds)(torch.from_numpy(ds.images))
    assert y.shape == (16, 1, 28, 28)
    assert abs(T.test_transform(ds)(torch.from_numpy(data.load("sample").images)).mean()) < 0.05
    with pytest.raises(ValueError, match="valid names"):
        T.train_transform("imagenet")


def test_cifar_train_transform_is_fast():
    x = batch(b=128)
    t = T.train_transform("cifar10")
    g = gen()
    t(x, generator=g)
    start = time.perf_counter()
    for _ in range(20):
        t(x, generator=g)
    per_batch = (time.perf_counter() - start) / 20
    assert per_batch < 0.02, f"{per_batch * 1000:.1f} ms per batch of 128"
