"""Batch-wise image transforms in torch (no torchvision), run on the training device.

Every transform maps a whole batch ``(B, C, H, W)`` at once and is called as
``t(x, generator=None)``; random ones draw all their numbers from ``generator`` (a
``torch.Generator``, any device) so that a run is exactly reproducible and resumable. Random
numbers are drawn on the generator's device and then moved to ``x``'s device.

Geometric transforms (``RandomCrop``, ``RandomHorizontalFlip``) work on uint8 or float input;
``ToFloat`` maps uint8 to float32 in [0, 1]; the colour/blur transforms for self-supervised
work expect float input in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "ColorJitter",
    "Compose",
    "GaussianBlur",
    "Normalize",
    "RandomApply",
    "RandomCrop",
    "RandomGrayscale",
    "RandomHorizontalFlip",
    "RandomResizedCrop",
    "ToFloat",
    "Transform",
    "test_transform",
    "train_transform",
]


def _rand(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """``n`` uniform [0, 1) float32 numbers from ``generator``, moved to ``device``."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=gdev).to(device)


def _uniform(lo: float, hi: float, n: int, generator, device) -> torch.Tensor:
    return lo + (hi - lo) * _rand(n, generator, device)


def _randint(high: int, n: int, generator, device) -> torch.Tensor:
    """``n`` integers in ``[0, high)``."""
    gdev = generator.device if generator is not None else torch.device("cpu")
    return torch.randint(0, high, (n,), generator=generator, device=gdev).to(device)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = size
    return (int(h), int(w))


def _check_batch(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} expects a batch (B, C, H, W), got shape {tuple(x.shape)}")


def _to_float(x: torch.Tensor) -> torch.Tensor:
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x if x.dtype == torch.float32 else x.float()


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma (ITU-R 601) of an RGB float batch, shape (B, 1, H, W); grey input is returned."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return 0.299 * r + 0.587 * g + 0.114 * b


class Transform:
    """Base class: ``__call__(x, generator=None)`` maps a batch (B, C, H, W) to a batch."""

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None):
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """Apply ``transforms`` in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, x, generator=None):
        for t in self.transforms:
            x = t(x, generator=generator)
        return x

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"Compose([{inner}])"


class ToFloat(Transform):
    """uint8 (B, C, H, W) -> float32 in [0, 1]; float input is returned as float32."""

    def __call__(self, x, generator=None):
        return _to_float(x)


class Normalize(Transform):
    """``(x - mean[c]) / std[c]`` per channel, float32 out (uint8 input is scaled to [0, 1])."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError("Normalize: mean and std need the same, non-zero length")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"Normalize: std must be positive, got {self.std}")
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, x, generator=None):
        _check_batch(x, "Normalize")
        x = _to_float(x)
        if x.shape[1] != len(self.mean):
            raise ValueError(
                f"Normalize has {len(self.mean)} channel(s), the batch has {x.shape[1]}"
            )
        if x.device not in self._cache:
            m = torch.tensor(self.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
            self._cache[x.device] = (m, 1.0 / s)
        m, inv = self._cache[x.device]
        return (x - m) * inv


class RandomCrop(Transform):
    """Pad each side with ``padding`` zeros, then crop ``size`` at an independent random offset
    per sample. (B, C, H, W) -> (B, C, size, size); keeps the dtype."""

    def __init__(self, size: int | Sequence[int], padding: int = 0):
        self.size = _pair(size)
        self.padding = int(padding)
        if self.padding < 0:
            raise ValueError(f"RandomCrop: padding must be >= 0, got {padding}")

    def __call__(self, x, generator=None):
        _check_batch(x, "RandomCrop")
        p = self.padding
        if p:
            x = F.pad(x, (p, p, p, p))
        b, c, h, w = x.shape
        th, tw = self.size
        if th > h or tw > w:
            raise ValueError(f"RandomCrop: crop {th}x{tw} larger than padded image {h}x{w}")
        oy = _randint(h - th + 1, b, generator, x.device)
        ox = _randint(w - tw + 1, b, generator, x.device)
        # One gather over flattened pixels: index of output (i, j) = (oy + i) * w + ox + j.
        rows = torch.arange(th, device=x.device).view(th, 1)
        cols = torch.arange(tw, device=x.device).view(1, tw)
        idx = (oy * w + ox).view(b, 1) + (rows * w + cols).view(1, -1)
        out = x.reshape(b, c, h * w).gather(2, idx.view(b, 1, -1).expand(b, c, th * tw))
        return out.view(b, c, th, tw)


class RandomHorizontalFlip(Transform):
    """Mirror each sample left-right with probability ``p``. Keeps shape and dtype."""

    def __init__(self, p: float = 0.5):
        self.p = float(p)

    def __call__(self, x, generator=None):
        _check_batch(x, "RandomHorizontalFlip")
        mask = _rand(x.shape[0], generator, x.device) < self.p
        return torch.where(mask.view(-1, 1, 1, 1), x.flip(-1), x)


class RandomApply(Transform):
    """Apply ``transform`` to each sample with probability ``p`` (others pass unchanged).

    The transform runs on the whole batch; shapes must be preserved by it.
    """

    def __init__(self, transform: Callable, p: float = 0.5):
        self.transform = transform
        self.p = float(p)

    def __call__(self, x, generator=None):
        _check_batch(x, "RandomApply")
        mask = _rand(x.shape[0], generator, x.device) < self.p
        y = self.transform(x, generator=generator)
        return torch.where(mask.view(-1, 1, 1, 1), y, x.to(y.dtype))


class RandomResizedCrop(Transform):
    """Crop a random area (fraction in ``scale``, aspect ratio in ``ratio``) of each sample and
    resize it bilinearly to ``size``. (B, C, H, W) -> float32 (B, C, size, size).

    Like the usual recipe: 10 tries per sample, then a centre crop with the ratio clamped.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        tries: int = 10,
    ):
        self.size = _pair(size)
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.tries = int(tries)
        if not 0 < self.scale[0] <= self.scale[1] or not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"RandomResizedCrop: bad scale {scale} or ratio {ratio}")

    def params(self, b: int, h: int, w: int, generator, device):
        """Crop boxes (top, left, height, width) as float tensors of shape (B,)."""
        t = self.tries
        area = h * w * _uniform(*self.scale, b * t, generator, device).view(b, t)
        logr = _uniform(math.log(self.ratio[0]), math.log(self.ratio[1]), b * t, generator, device)
        r = torch.exp(logr).view(b, t)
        cw = torch.sqrt(area * r).round()
        ch = torch.sqrt(area / r).round()
        ok = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
        first = torch.where(ok.any(1), ok.float().argmax(1), t)  # first valid try, else t
        # Fallback: the whole image, ratio clamped into range.
        in_ratio = w / h
        if in_ratio < self.ratio[0]:
            fw, fh = float(w), round(w / self.ratio[0])
        elif in_ratio > self.ratio[1]:
            fw, fh = round(h * self.ratio[1]), float(h)
        else:
            fw, fh = float(w), float(h)
        cw = torch.cat([cw, torch.full_like(cw[:, :1], fw)], 1).gather(1, first[:, None])[:, 0]
        ch = torch.cat([ch, torch.full_like(ch[:, :1], fh)], 1).gather(1, first[:, None])[:, 0]
        u = _rand(2 * b, generator, device).view(2, b)
        top = torch.floor(u[0] * (h - ch + 1))
        left = torch.floor(u[1] * (w - cw + 1))
        return top, left, ch, cw

    def __call__(self, x, generator=None):
        _check_batch(x, "RandomResizedCrop")
        x = _to_float(x)
        b, c, h, w = x.shape
        top, left, ch, cw = self.params(b, h, w, generator, x.device)
        theta = torch.zeros(b, 2, 3, device=x.device, dtype=x.dtype)
        theta[:, 0, 0] = cw / w
        theta[:, 0, 2] = (2 * left + cw) / w - 1
        theta[:, 1, 1] = ch / h
        theta[:, 1, 2] = (2 * top + ch) / h - 1
        grid = F.affine_grid(theta, [b, c, *self.size], align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out


def _range(value, name: str, center: float, bound: tuple[float, float]):
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError(f"ColorJitter: {name} must be >= 0, got {value}")
        lo, hi = center - value, center + value
    else:
        lo, hi = (float(v) for v in value)
    lo, hi = max(lo, bound[0]), min(hi, bound[1])
    if lo > hi:
        raise ValueError(f"ColorJitter: empty range for {name}: {value}")
    return (lo, hi)


class ColorJitter(Transform):
    """Random brightness, contrast, saturation and hue per sample, in that order.

    Float input in [0, 1] (B, C, H, W) -> same shape, clamped to [0, 1]. A float ``v`` means a
    factor in ``[max(0, 1 - v), 1 + v]`` (hue: a shift in ``[-v, v]`` of a full turn, v <= 0.5,
    done as a rotation of the chroma plane in YIQ space). Saturation and hue need 3 channels
    and are skipped for grey batches.
    """

    def __init__(self, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0):
        inf = float("inf")
        self.brightness = _range(brightness, "brightness", 1.0, (0.0, inf))
        self.contrast = _range(contrast, "contrast", 1.0, (0.0, inf))
        self.saturation = _range(saturation, "saturation", 1.0, (0.0, inf))
        self.hue = _range(hue, "hue", 0.0, (-0.5, 0.5))

    def __call__(self, x, generator=None):
        _check_batch(x, "ColorJitter")
        x = _to_float(x)
        b = x.shape[0]

        def factor(rng):
            return _uniform(*rng, b, generator, x.device).view(b, 1, 1, 1)

        if self.brightness != (1.0, 1.0):
            x = (x * factor(self.brightness)).clamp_(0, 1)
        if self.contrast != (1.0, 1.0):
            m = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
            x = ((x - m) * factor(self.contrast) + m).clamp_(0, 1)
        if x.shape[1] == 3 and self.saturation != (1.0, 1.0):
            g = _grey(x)
            x = ((x - g) * factor(self.saturation) + g).clamp_(0, 1)
        if x.shape[1] == 3 and self.hue != (0.0, 0.0):
            x = self._hue(x, _uniform(*self.hue, b, generator, x.device))
        return x

    @staticmethod
    def _hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        to_yiq = torch.tensor(
            [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
            dtype=x.dtype,
            device=x.device,
        )
        from_yiq = torch.linalg.inv(to_yiq)
        a = 2 * math.pi * shift
        cos, sin = torch.cos(a), torch.sin(a)
        rot = torch.zeros(x.shape[0], 3, 3, dtype=x.dtype, device=x.device)
        rot[:, 0, 0] = 1
        rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
        rot[:, 2, 1], rot[:, 2, 2] = sin, cos
        m = from_yiq @ rot @ to_yiq  # (B, 3, 3)
        return torch.einsum("bij,bjhw->bihw", m, x).clamp_(0, 1)


class RandomGrayscale(Transform):
    """Replace each RGB sample by its luma (in all 3 channels) with probability ``p``."""

    def __init__(self, p: float = 0.1):
        self.p = float(p)

    def __call__(self, x, generator=None):
        _check_batch(x, "RandomGrayscale")
        x = _to_float(x)
        mask = _rand(x.shape[0], generator, x.device) < self.p
        if x.shape[1] == 1:
            return x
        g = _grey(x).expand_as(x)
        return torch.where(mask.view(-1, 1, 1, 1), g, x)


class GaussianBlur(Transform):
    """Gaussian blur with a random ``sigma`` in the given range per sample (reflect padding).

    ``kernel_size`` odd. Float (B, C, H, W) -> same shape.
    """

    def __init__(self, kernel_size: int, sigma: tuple[float, float] | float = (0.1, 2.0)):
        self.kernel_size = int(kernel_size)
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"GaussianBlur: kernel_size must be odd and >= 1, got {kernel_size}")
        if isinstance(sigma, int | float):
            sigma = (float(sigma), float(sigma))
        self.sigma = (float(sigma[0]), float(sigma[1]))
        if not 0 < self.sigma[0] <= self.sigma[1]:
            raise ValueError(f"GaussianBlur: bad sigma range {sigma}")

    def __call__(self, x, generator=None):
        _check_batch(x, "GaussianBlur")
        x = _to_float(x)
        b, c, h, w = x.shape
        k = self.kernel_size
        sigma = _uniform(*self.sigma, b, generator, x.device)
        half = k // 2
        if half == 0:
            return x
        t = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
        kern = torch.exp(-(t[None, :] ** 2) / (2 * sigma[:, None] ** 2))
        kern = (kern / kern.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, k)
        mode = "reflect" if half < h and half < w else "replicate"
        y = F.pad(x.reshape(1, b * c, h, w), (half, half, half, half), mode=mode)
        y = F.conv2d(y, kern.view(b * c, 1, 1, k), groups=b * c)
        y = F.conv2d(y, kern.view(b * c, 1, k, 1), groups=b * c)
        return y.view(b, c, h, w)


# --------------------------------------------------------------------------- presets


def _describe(name_or_imageset) -> tuple[str, tuple[float, ...], tuple[float, ...], int]:
    """(canonical name, mean, std, image height) of a data set name or ImageSet."""
    from .data import canonical_name, dataset_stats

    if isinstance(name_or_imageset, str):
        name = canonical_name(name_or_imageset)
        mean, std = dataset_stats(name)
        height = 32 if name == "cifar10" else 28
        return name, mean, std, height
    ds = name_or_imageset
    name = canonical_name(ds.name)
    return name, tuple(ds.mean), tuple(ds.std), ds.shape[1]


def train_transform(name_or_imageset, augment: bool = True) -> Compose:
    """The training input pipeline for a data set (name or ``ImageSet``).

    CIFAR-10: random crop (pad 4) + horizontal flip + normalize. Digits and clothes
    (sample, MNIST, Fashion-MNIST): normalize only. ``augment=False``: as ``test_transform``.
    """
    name, mean, std, height = _describe(name_or_imageset)
    if augment and name == "cifar10":
        return Compose(
            [
                RandomCrop(height, padding=4),
                RandomHorizontalFlip(0.5),
                ToFloat(),
                Normalize(mean, std),
            ]
        )
    return Compose([ToFloat(), Normalize(mean, std)])


def test_transform(name_or_imageset) -> Compose:
    """The evaluation input pipeline: uint8 -> float in [0, 1] -> normalize."""
    _, mean, std, _ = _describe(name_or_imageset)
    return Compose([ToFloat(), Normalize(mean, std)])


test_transform.__test__ = False  # not a pytest test, even when imported into a test module
