"""MobileNetV2 (width 1.0), laid out like torchvision.

Keys: ``features.0.{0,1}`` stem ConvBNReLU, ``features.1..17`` InvertedResidual blocks whose
layers live in a Sequential named ``conv``, ``features.18`` the 1x1 head ConvBNReLU and
``classifier.1`` the Linear layer.
"""
from __future__ import annotations

import torch
from torch import nn

from meshdl.models.init import init_weights
from torch.nn import functional as F

# (expansion t, output channels c, repeats n, first stride s)
MOBILENET_V2_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
    (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` without losing more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def conv_bn_relu(inp: int, out: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1) -> nn.Sequential:
    """Sequential(Conv2d, BatchNorm2d, ReLU6) with "half kernel" symmetric padding."""
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                  bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU6(),
    )


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.stride = stride
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_relu(inp, hidden, kernel_size=1))
        layers += [
            conv_bn_relu(hidden, hidden, stride=stride, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 1000, width_mult: float = 1.0) -> None:
        super().__init__()
        channels = make_divisible(32 * width_mult)
        last = make_divisible(1280 * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn_relu(3, channels, stride=2)]
        for t, c, n, s in MOBILENET_V2_SETTING:
            out = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        layers.append(conv_bn_relu(channels, last, kernel_size=1))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(p=0.2), nn.Linear(last, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = F.adaptive_avg_pool2d(x, (1, 1))
        x = torch.flatten(x, 1)
        return self.classifier(x)


def mobilenet_v2(num_classes: int = 1000) -> MobileNetV2:
    return MobileNetV2(num_classes)
