"""MobileNetV2: ImageNet definition and the CIFAR variant.

Sandler, Howard, Zhu, Zhmoginov and Chen, "MobileNetV2: Inverted Residuals and Linear
Bottlenecks", CVPR 2018 (Table 2). A 3x3 stem conv with 32 filters, 17 inverted-residual
blocks given by the (t, c, n, s) table below, a 1x1 conv to 1280 channels, global average
pooling, (dropout) and a fully connected classifier. Every conv is followed by BN; ReLU6
after all of them except the linear 1x1 projection of each block. Channels scale with the
width multiplier and are rounded to multiples of 8 (``_make_divisible`` of the reference
code); the last conv keeps 1280 channels for widths below 1.

- ``mobilenetv2_224``: the ImageNet network (stem stride 2; 224x224 inputs, 1000
  classes, 3.50M parameters, ~300M MACs; dropout 0.2 before the classifier as in the
  reference implementations).
- ``mobilenetv2``: the usual CIFAR adaptation for 32x32 inputs: stem stride 1 and the
  second stage (c=24) at stride 1 instead of 2, so the final map is 4x4. No dropout by
  default.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import ModelError, opt_float, register
from .resnet import Add

__all__ = [
    "InvertedResidual",
    "MobileNetV2",
    "make_divisible",
    "mobilenet_tiny",
    "mobilenetv2",
    "mobilenetv2_224",
]

# t (expansion), c (output channels), n (repeats), s (stride of the first repeat)
IMAGENET_CFG = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
CIFAR_CFG = tuple((t, c, n, 1 if i == 1 else s) for i, (t, c, n, s) in enumerate(IMAGENET_CFG))


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (at least ``min_value``), never
    going more than 10% below ``v``."""
    min_value = divisor if min_value is None else min_value
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act=True):
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act:
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """Expand 1x1 (skipped when t == 1), depthwise 3x3, linear project 1x1; the input is
    added back when the stride is 1 and the channel count is unchanged."""

    def __init__(self, cin: int, cout: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(cin * expand_ratio))
        self.use_residual = stride == 1 and cin == cout
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn(cin, hidden, 1))  # expand
        layers.append(_conv_bn(hidden, hidden, 3, stride, groups=hidden))  # depthwise
        layers.append(_conv_bn(hidden, cout, 1, act=False))  # linear bottleneck
        self.conv = nn.Sequential(*layers)
        if self.use_residual:
            self.add = Add()

    def forward(self, x: Tensor) -> Tensor:
        if self.use_residual:
            return self.add(x, self.conv(x))
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        input_shape: tuple[int, int, int] = (3, 224, 224),
        width: float = 1.0,
        cfg=IMAGENET_CFG,
        stem_stride: int = 2,
        dropout: float = 0.2,
        stem_channels: int = 32,
        last_channels: int = 1280,
    ):
        super().__init__()
        cin = make_divisible(stem_channels * width)
        self.last_channels = make_divisible(last_channels * max(1.0, width))
        layers: list[nn.Module] = [_conv_bn(input_shape[0], cin, 3, stem_stride)]
        for t, c, n, s in cfg:
            cout = make_divisible(c * width)
            for i in range(n):
                layers.append(InvertedResidual(cin, cout, s if i == 0 else 1, t))
                cin = cout
        layers.append(_conv_bn(cin, self.last_channels, 1))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(self.last_channels, num_classes)
        # initialization of the reference implementation (torchvision / the paper's code)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(self.avgpool(self.features(x)))
        return self.fc(self.dropout(x))


def _dropout(value) -> float:
    p = opt_float("dropout", value, positive=False)
    if not 0.0 <= p < 1.0:
        raise ModelError(f"option dropout must be in [0, 1), got {value!r}")
    return p


@register(
    "mobilenetv2",
    "MobileNetV2 for CIFAR (Sandler et al. 2018): stem and stage-2 stride 1",
    input_shape=(3, 32, 32),
)
def mobilenetv2(
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    width: float = 1.0,
    dropout: float = 0.0,
) -> MobileNetV2:
    """``width``: channel multiplier (rounded to multiples of 8); ``dropout`` before fc."""
    return MobileNetV2(
        num_classes,
        input_shape,
        width=opt_float("width", width),
        cfg=CIFAR_CFG,
        stem_stride=1,
        dropout=_dropout(dropout),
    )


@register(
    "mobilenetv2_224",
    "MobileNetV2 ImageNet definition (Sandler et al. 2018), 224x224, 1000 classes",
    input_shape=(3, 224, 224),
    num_classes=1000,
)
def mobilenetv2_224(
    num_classes: int = 1000,
    input_shape: tuple[int, int, int] = (3, 224, 224),
    width: float = 1.0,
    dropout: float = 0.2,
) -> MobileNetV2:
    """``width``: channel multiplier (rounded to multiples of 8); ``dropout`` before fc."""
    return MobileNetV2(
        num_classes,
        input_shape,
        width=opt_float("width", width),
        cfg=IMAGENET_CFG,
        stem_stride=2,
        dropout=_dropout(dropout),
    )


# A small MobileNet-style net for quick runs (the demo's PROM row, tests): the same
# inverted-residual blocks, three short stages, a 128-channel head.
TINY_CFG = ((1, 16, 1, 1), (4, 24, 2, 2), (4, 32, 2, 2))


@register(
    "mobilenet_tiny",
    "small MobileNetV2-style net (3 stages of inverted residuals) for quick runs and the demo",
    input_shape=(1, 28, 28),
)
def mobilenet_tiny(
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (1, 28, 28),
    width: float = 1.0,
) -> MobileNetV2:
    """``width``: channel multiplier (rounded to multiples of 8)."""
    return MobileNetV2(
        num_classes,
        input_shape,
        width=opt_float("width", width),
        cfg=TINY_CFG,
        stem_stride=1,
        dropout=0.0,
        stem_channels=16,
        last_channels=128,
    )
