"""The model zoo and the model registry.

>>> from lowbit import models
>>> net = models.create("resnet20")               # 10 classes, 3x32x32 input
>>> net = models.build("mypkg.nets:make_net", num_classes=10)   # your own factory
>>> models.count_params(net), models.count_macs(net)

Only torch is imported here.
"""

from __future__ import annotations

from . import lenet, mobilenetv2, resnet, vgg  # noqa: F401  (registers the zoo)
from .counting import count_macs, count_params, layer_table
from .lenet import LeNet5, LeNet300
from .mobilenetv2 import InvertedResidual, MobileNetV2, make_divisible
from .registry import (
    ModelError,
    available,
    build,
    create,
    default_input_shape,
    default_num_classes,
    describe,
    load_factory,
    register,
)
from .resnet import Add, BasicBlock, CifarResNet, PadShortcut
from .vgg import VGGSmall

__all__ = [
    "Add",
    "BasicBlock",
    "CifarResNet",
    "InvertedResidual",
    "LeNet300",
    "LeNet5",
    "MobileNetV2",
    "ModelError",
    "PadShortcut",
    "VGGSmall",
    "available",
    "build",
    "count_macs",
    "count_params",
    "create",
    "default_input_shape",
    "default_num_classes",
    "describe",
    "layer_table",
    "load_factory",
    "make_divisible",
    "register",
]
