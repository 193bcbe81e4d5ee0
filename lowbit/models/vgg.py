"""VGG-Small, the CIFAR-10 VGG of the binary/low-bit network literature.

Zhang, Yang, Ye and Hua, "LQ-Nets: Learned Quantization for Highly Accurate and Compact
Deep Neural Networks", ECCV 2018, and Qin et al., "Forward and Backward Information
Retention for Accurate Binary Neural Networks" (IR-Net), CVPR 2020: six 3x3 convolutions
128-128-M-256-256-M-512-512-M and one fully connected classifier on the 512x4x4 map.
The order follows the IR-Net code: conv, [max-pool], BN, activation. Convolutions carry
no bias (BN follows); with ``bn=False`` they do.
"""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from .registry import ModelError, opt_bool, opt_choice, opt_float, register, scale_channels

__all__ = ["VGGSmall", "vgg_small"]

# (out channels, max-pool after the conv)
_CFG = ((128, False), (128, True), (256, False), (256, True), (512, False), (512, True))


class VGGSmall(nn.Module):
    def __init__(
        self,
        num_classes: int = 10,
        input_shape: tuple[int, int, int] = (3, 32, 32),
        width: float = 1.0,
        bn: bool = True,
        activation: str = "relu",
    ):
        super().__init__()
        c, h, w = input_shape
        if h < 8 or w < 8:
            raise ModelError(f"vgg_small needs inputs of at least 8x8 pixels, got {h}x{w}")
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        cin = c
        for i, (cout, pool) in enumerate(_CFG):
            cout = scale_channels(cout, width)
            layers[f"conv{i}"] = nn.Conv2d(cin, cout, 3, padding=1, bias=not bn)
            if pool:
                layers[f"pool{i}"] = nn.MaxPool2d(2, 2)
            if bn:
                layers[f"bn{i}"] = nn.BatchNorm2d(cout)
            layers[f"act{i}"] = nn.ReLU(inplace=True) if activation == "relu" else nn.Hardtanh()
            cin = cout
        self.features = nn.Sequential(layers)
        self.flatten = nn.Flatten(1)
        self.fc = nn.Linear(cin * (h // 8) * (w // 8), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.flatten(self.features(x)))


@register(
    "vgg_small",
    "VGG-Small CIFAR net of the BNN literature (LQ-Nets, IR-Net): 128-128-M-256-256-M-512-512-M",
    input_shape=(3, 32, 32),
)
def vgg_small(
    num_classes: int = 10,
    input_shape: tuple[int, int, int] = (3, 32, 32),
    width: float = 1.0,
    bn: bool = True,
    activation: str = "relu",
) -> VGGSmall:
    """``width`` scales every layer's channels (0.25: 32-32-M-64-64-M-128-128-M);
    ``activation`` is ``relu`` or ``hardtanh`` (as in IR-Net)."""
    return VGGSmall(
        num_classes,
        input_shape,
        width=opt_float("width", width),
        bn=opt_bool("bn", bn),
        activation=opt_choice("activation", activation, ("relu", "hardtanh")),
    )
