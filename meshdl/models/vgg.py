"""VGG-16 (with and without batch norm) and AlexNet, laid out like torchvision.

State-dict keys match torchvision's checkpoints (``features.N.*``, ``classifier.N.*``),
so a user's ``vgg16-*.pth`` / ``alexnet-*.pth`` loads with ``build(name, weights=PATH)``.
"""
from __future__ import annotations

import torch
from torch import nn

from meshdl.models.init import init_weights

# VGG configuration "D": channel counts, "M" = 2x2 max pool
VGG16_LAYOUT: tuple[int | str, ...] = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
                                       512, 512, 512, "M", 512, 512, 512, "M")


def vgg_features(layout: tuple[int | str, ...], batch_norm: bool) -> nn.Sequential:
    """Conv/ReLU (optionally Conv/BN/ReLU) stack with 3x3 convs, padding 1."""
    layers: list[nn.Module] = []
    channels = 3
    for item in layout:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        layers.append(nn.Conv2d(channels, int(item), kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(int(item)))
        layers.append(nn.ReLU())
        channels = int(item)
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """features -> AdaptiveAvgPool2d((7, 7)) -> flatten -> 3-layer classifier."""

    def __init__(self, features: nn.Sequential, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096), nn.ReLU(), nn.Dropout(p=0.5),
            nn.Linear(4096, 4096), nn.ReLU(), nn.Dropout(p=0.5),
            nn.Linear(4096, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def vgg16(num_classes: int = 1000) -> VGG:
    return VGG(vgg_features(VGG16_LAYOUT, batch_norm=False), num_classes)


def vgg16_bn(num_classes: int = 1000) -> VGG:
    return VGG(vgg_features(VGG16_LAYOUT, batch_norm=True), num_classes)


class AlexNet(nn.Module):
    """The one-tower AlexNet variant torchvision ships (64-192-384-256-256 channels)."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, kernel_size=3, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=3, stride=2),
        )
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier = nn.Sequential(
            nn.Dropout(p=0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(),
            nn.Dropout(p=0.5), nn.Linear(4096, 4096), nn.ReLU(),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def alexnet(num_classes: int = 1000) -> AlexNet:
    return AlexNet(num_classes)
