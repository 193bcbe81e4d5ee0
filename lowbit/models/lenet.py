"""LeNet-300-100 and LeNet-5 (Caffe variant).

LeNet-300-100: LeCun, Bottou, Bengio and Haffner, "Gradient-based learning applied to
document recognition", Proc. IEEE 1998 -- the fully connected 784-300-100-10 network
used as the standard MNIST pruning/quantization benchmark (Han et al. 2015, Louizos et
al. 2017 "Bayesian Compression for Deep Learning").

LeNet-5-Caffe: the LeNet of Caffe's MNIST example (conv 20@5x5, max-pool 2, conv 50@5x5,
max-pool 2, fc 500, fc 10), 431,080 parameters on MNIST. As in the Bayesian-compression
code, a ReLU follows each convolution as well as the hidden fully connected layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from .registry import ModelError, register

__all__ = ["LeNet300", "LeNet5", "lenet300", "lenet5"]


class LeNet300(nn.Module):
    """LeNet-300-100: flatten, fc 300, ReLU, fc 100, ReLU, fc num_classes."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28)):
        super().__init__()
        c, h, w = input_shape
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(c * h * w, 300)
        self.relu1 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(300, 100)
        self.relu2 = nn.ReLU(inplace=True)
        self.fc3 = nn.Linear(100, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.flatten(x)
        x = self.relu1(self.fc1(x))
        x = self.relu2(self.fc2(x))
        return self.fc3(x)


class LeNet5(nn.Module):
    """LeNet-5-Caffe: conv 20@5x5, ReLU, max-pool 2, conv 50@5x5, ReLU, max-pool 2,
    fc 500, ReLU, fc num_classes. The flatten size follows the input shape."""

    def __init__(self, num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28)):
        super().__init__()
        c, h, w = input_shape
        # spatial size after conv5 (valid) -> pool2 -> conv5 -> pool2
        fh, fw = ((h - 4) // 2 - 4) // 2, ((w - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise ModelError(f"lenet5 needs inputs of at least 16x16 pixels, got {h}x{w}")
        self.conv1 = nn.Conv2d(c, 20, 5)
        self.relu1 = nn.ReLU(inplace=True)
        self.pool1 = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.relu2 = nn.ReLU(inplace=True)
        self.pool2 = nn.MaxPool2d(2, 2)
        self.flatten = nn.Flatten(1)
        self.fc1 = nn.Linear(50 * fh * fw, 500)
        self.relu3 = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.flatten(x)
        x = self.relu3(self.fc1(x))
        return self.fc2(x)


@register(
    "lenet300",
    "LeNet-300-100 fully connected MNIST net (LeCun et al. 1998)",
    input_shape=(1, 28, 28),
)
def lenet300(num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28)) -> LeNet300:
    return LeNet300(num_classes, input_shape)


@register(
    "lenet5",
    "LeNet-5-Caffe: conv20-pool-conv50-pool-fc500 (Caffe MNIST example)",
    input_shape=(1, 28, 28),
)
def lenet5(num_classes: int = 10, input_shape: tuple[int, int, int] = (1, 28, 28)) -> LeNet5:
    return LeNet5(num_classes, input_shape)
