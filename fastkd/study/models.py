"""Teacher and student models by name.

Digits: multilayer perceptrons over the 64 pixels. CIFAR: torchvision's ResNets and MobileNetV2
with the stem adapted to 32x32 inputs (3x3 stride-1 first convolution, no max-pool), as is usual
for CIFAR; ``resnet10`` is a narrow ResNet (one BasicBlock per stage) for quick runs.
"""
from __future__ import annotations

import math

from torch import nn

MODELS = ("mlp-large", "mlp-small", "mlp-tiny", "resnet10", "resnet18", "resnet34", "resnet50",
          "mobilenet_v2")
DEFAULTS = {"digits": ("mlp-large", "mlp-tiny"), "cifar10": ("resnet18", "mobilenet_v2"),
            "cifar100": ("resnet18", "mobilenet_v2")}


def mlp(in_features: int, hidden: list[int], num_classes: int) -> nn.Sequential:
    layers, width = [nn.Flatten()], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _cifar_resnet(depth: str, num_classes: int) -> nn.Module:
    from torchvision import models
    from torchvision.models.resnet import BasicBlock, ResNet

    if depth == "resnet10":
        net = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)
    else:
        net = getattr(models, depth)(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


def _cifar_mobilenet_v2(num_classes: int) -> nn.Module:
    from torchvision import models

    net = models.mobilenet_v2(weights=None, num_classes=num_classes)
    stem = net.features[0][0]
    net.features[0][0] = nn.Conv2d(3, stem.out_channels, 3, stride=1, padding=1, bias=False)
    return net


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    if name.startswith("mlp"):
        if len(input_shape) != 1:
            raise ValueError(f"{name} takes flat feature vectors; use a CNN for images {input_shape}")
        hidden = {"mlp-large": [512, 512], "mlp-small": [64], "mlp-tiny": [16]}[name]
        return mlp(math.prod(input_shape), hidden, num_classes)
    if len(input_shape) != 3:
        raise ValueError(f"{name} takes images (C, H, W); got inputs of shape {input_shape}")
    if name == "mobilenet_v2":
        return _cifar_mobilenet_v2(num_classes)
    return _cifar_resnet(name, num_classes)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
