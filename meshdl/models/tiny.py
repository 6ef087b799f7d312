"""Small CNNs for fast tests of the split engine (well under a few MFLOPs at 1x3x32x32).

``tiny_cnn`` is a DAG that exercises what the tiling rules must get right: odd sizes,
a stride-2 conv without padding, max pool with ``ceil_mode``, a residual add, a channel
concat, depthwise and grouped convs, a padded average pool, then global pool + linear.
``tiny_chain`` is a plain chain (every position is a cut point) ending in flatten + linear.
"""
from __future__ import annotations

import torch
from torch import nn

TINY_INPUT = (1, 3, 32, 32)
TINY_CLASSES = 10


class TinyCNN(nn.Module):
    """32x32 -> 15x15 (conv k3 s2) -> 8x8 (maxpool k2 s2 ceil) -> DAG -> 4x4 (avgpool)
    -> 3x3 (conv k2) -> global pool -> linear."""

    def __init__(self, num_classes: int = TINY_CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, kernel_size=3, stride=2)
        self.stem_bn = nn.BatchNorm2d(8)
        self.stem_relu = nn.ReLU()
        self.pool1 = nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True)
        # residual branch: depthwise 3x3 -> BN -> ReLU -> pointwise 1x1, added to its input
        self.dw = nn.Conv2d(8, 8, kernel_size=3, padding=1, groups=8, bias=False)
        self.dw_bn = nn.BatchNorm2d(8)
        self.dw_relu = nn.ReLU6()
        self.pw = nn.Conv2d(8, 8, kernel_size=1)
        self.res_relu = nn.ReLU()
        # side branch: grouped 3x3 conv with dilation, same size
        self.grouped = nn.Conv2d(8, 8, kernel_size=3, padding=2, dilation=2, groups=2)
        self.grouped_relu = nn.ReLU()
        self.pool2 = nn.AvgPool2d(kernel_size=3, stride=2, padding=1)
        self.mix = nn.Conv2d(16, 16, kernel_size=2)
        self.mix_relu = nn.ReLU()
        self.head_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.stem_relu(self.stem_bn(self.stem(x))))
        a = self.pw(self.dw_relu(self.dw_bn(self.dw(x))))
        a = self.res_relu(a + x)
        b = self.grouped_relu(self.grouped(x))
        x = torch.cat([a, b], dim=1)
        x = self.mix_relu(self.mix(self.pool2(x)))
        x = self.head_pool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


class TinyChain(nn.Module):
    """32x32 -> conv s2 (16) -> maxpool (8) -> conv (8) -> avgpool (4) -> flatten -> linear."""

    def __init__(self, num_classes: int = TINY_CLASSES) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, kernel_size=3, stride=2, padding=1), nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2),
            nn.Conv2d(8, 8, kernel_size=3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AvgPool2d(kernel_size=2, stride=2),
        )
        self.classifier = nn.Linear(8 * 4 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _randomise_bn(model: nn.Module) -> None:
    """Give BatchNorm non-trivial statistics so eval-mode BN is not an identity in tests."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)


def tiny_cnn(num_classes: int = TINY_CLASSES) -> TinyCNN:
    model = TinyCNN(num_classes)
    _randomise_bn(model)
    return model


def tiny_chain(num_classes: int = TINY_CLASSES) -> TinyChain:
    model = TinyChain(num_classes)
    _randomise_bn(model)
    return model
