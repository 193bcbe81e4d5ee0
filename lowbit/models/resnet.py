"""CIFAR ResNets: ResNet-20 and ResNet-18.

He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition", CVPR 2016.

- ``resnet20``: the paper's CIFAR-10 network (Sec. 4.2): a 3x3 conv with 16 filters, three
  stages of n=3 BasicBlocks on 16, 32 and 64 channels (the first block of stages 2 and 3
  has stride 2), global average pooling and a fully connected layer. The shortcut that
  changes shape is option A (parameter free: subsample and zero-pad the new channels), as
  in the paper's CIFAR experiments; ``shortcut="B"`` uses a 1x1 conv + BN instead. Weight
  init: Kaiming normal on the conv and fc weights.
- ``resnet18``: the ImageNet ResNet-18 layout (2-2-2-2 BasicBlocks on 64-128-256-512
  channels, option-B 1x1 projection shortcuts) with the CIFAR stem used throughout the
  quantization literature: a 3x3 stride-1 conv instead of the 7x7 stride-2 conv and no
  max-pool.

The residual addition is the ``add`` module of each block (an :class:`Add`), so it shows up
by name in hooks and ``torch.fx`` graphs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from .registry import ModelError, opt_choice, opt_float, register, scale_channels

__all__ = ["Add", "BasicBlock", "CifarResNet", "PadShortcut", "resnet18", "resnet20"]


class Add(nn.Module):
    """Elementwise sum of two tensors: the residual addition, as a named op."""

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        return x + y


class PadShortcut(nn.Module):
    """Option-A shortcut: take every ``stride``-th pixel and zero-pad the channels from
    ``in_planes`` to ``planes`` (half the new channels in front, half behind). No
    parameters."""

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        if planes < in_planes:
            raise ModelError(f"option-A shortcut cannot shrink {in_planes} to {planes} channels")
        self.in_planes, self.planes, self.stride = in_planes, planes, stride
        self.pad_front = (planes - in_planes) // 2
        self.pad_back = planes - in_planes - self.pad_front

    def forward(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad_front, self.pad_back))

    def extra_repr(self) -> str:
        return f"{self.in_planes}, {self.planes}, stride={self.stride}"


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        self.add = Add()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(self.add(out, self.shortcut(x)))


class CifarResNet(nn.Module):
    """3x3 stem conv (stride 1) + BN + ReLU, stages of BasicBlocks (the first stage at
    stride 1, the others halving the resolution), global average pool, fc."""

    def __init__(
        self,
        num_blocks: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        shortcut: str = "A",
        kaiming_init: bool = False,
    ):
        super().__init__()
        in_channels = input_shape[0]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, (n, planes) in enumerate(zip(num_blocks, widths)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride, shortcut))
                in_planes = planes
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(in_planes, num_classes)
        if kaiming_init:
            for m in self.modules():
                if isinstance(m, nn.Conv2d | nn.Linear):
                    nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(self.flatten(self.avgpool(x)))


def _widths(base: Sequence[int], width: float) -> list[int]:
    return [scale_channels(c, width) for c in base]


@register(
    "resnet20",
    "ResNet-20 for CIFAR (He et al. 2016), 16-32-64 channels, option-A shortcuts",
    input_shape=(3, 32, 32),
)
def resnet20(
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    width: float = 1.0,
    shortcut: str = "A",
) -> CifarResNet:
    """``shortcut``: ``A`` (zero-pad, no parameters) or ``B`` (1x1 conv + BN)."""
    return CifarResNet(
        [3, 3, 3],
        _widths((16, 32, 64), opt_float("width", width)),
        num_classes,
        input_shape,
        shortcut=opt_choice("shortcut", shortcut, ("A", "B")),
        kaiming_init=True,
    )


@register(
    "resnet18",
    "ResNet-18, CIFAR stem (3x3 conv, no max-pool), 64-128-256-512 channels",
    input_shape=(3, 32, 32),
)
def resnet18(
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    width: float = 1.0,
    shortcut: str = "B",
) -> CifarResNet:
    """``shortcut``: ``B`` (1x1 conv + BN, the standard) or ``A`` (zero-pad)."""
    return CifarResNet(
        [2, 2, 2, 2],
        _widths((64, 128, 256, 512), opt_float("width", width)),
        num_classes,
        input_shape,
        shortcut=opt_choice("shortcut", shortcut, ("A", "B")),
    )
