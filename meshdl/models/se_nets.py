"""Squeeze-and-excitation CNNs laid out like torchvision: MobileNetV3 (small, large) and
EfficientNet-B0.

Keys follow torchvision: ``features.N`` (stem and last conv are Conv-BN-activation
Sequentials; blocks keep their layers in a Sequential named ``block``, the SE unit as
``avgpool/fc1/fc2``), ``classifier``. Activations are in place, as in torchvision, so
these models also exercise meshdl's out-of-place rewrite. Each SE unit is a global
average pool -> 1x1 conv -> activation -> 1x1 conv -> (hard) sigmoid gate multiplied
back onto the map: inside a tiled stage it becomes a reduce point.
"""
from __future__ import annotations

from functools import partial
from typing import Callable

import torch
from torch import nn

from meshdl.models.init import init_weights
from meshdl.models.mobilenet import make_divisible


def conv_norm_act(inp: int, out: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                  act: Callable[..., nn.Module] | None = nn.ReLU,
                  norm: Callable[[int], nn.Module] = nn.BatchNorm2d) -> nn.Sequential:
    """Conv (no bias, "half kernel" padding) -> norm -> in-place activation."""
    layers: list[nn.Module] = [nn.Conv2d(inp, out, kernel, stride, (kernel - 1) // 2,
                                         groups=groups, bias=False), norm(out)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """x * gate(fc2(act(fc1(avgpool(x)))))."""

    def __init__(self, channels: int, squeeze: int, act: Callable[..., nn.Module] = nn.ReLU,
                 gate: Callable[..., nn.Module] = nn.Sigmoid) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.activation = act()
        self.scale_activation = gate()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.scale_activation(self.fc2(self.activation(self.fc1(self.avgpool(x)))))
        return scale * x


# ----- MobileNetV3 ----------------------------------------------------------------------

# (input, kernel, expanded, output, SE, activation "RE"/"HS", stride)
V3_LARGE = ((16, 3, 16, 16, False, "RE", 1), (16, 3, 64, 24, False, "RE", 2),
            (24, 3, 72, 24, False, "RE", 1), (24, 5, 72, 40, True, "RE", 2),
            (40, 5, 120, 40, True, "RE", 1), (40, 5, 120, 40, True, "RE", 1),
            (40, 3, 240, 80, False, "HS", 2), (80, 3, 200, 80, False, "HS", 1),
            (80, 3, 184, 80, False, "HS", 1), (80, 3, 184, 80, False, "HS", 1),
            (80, 3, 480, 112, True, "HS", 1), (112, 3, 672, 112, True, "HS", 1),
            (112, 5, 672, 160, True, "HS", 2), (160, 5, 960, 160, True, "HS", 1),
            (160, 5, 960, 160, True, "HS", 1))
V3_SMALL = ((16, 3, 16, 16, True, "RE", 2), (16, 3, 72, 24, False, "RE", 2),
            (24, 3, 88, 24, False, "RE", 1), (24, 5, 96, 40, True, "HS", 2),
            (40, 5, 240, 40, True, "HS", 1), (40, 5, 240, 40, True, "HS", 1),
            (40, 5, 120, 48, True, "HS", 1), (48, 5, 144, 48, True, "HS", 1),
            (48, 5, 288, 96, True, "HS", 2), (96, 5, 576, 96, True, "HS", 1),
            (96, 5, 576, 96, True, "HS", 1))
_V3_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class V3Block(nn.Module):
    """MobileNetV3 bottleneck: [expand] -> depthwise -> [SE, hard sigmoid] -> project."""

    def __init__(self, inp, kernel, expanded, out, use_se, act_name, stride) -> None:
        super().__init__()
        act = nn.Hardswish if act_name == "HS" else nn.ReLU
        self.use_res_connect = stride == 1 and inp == out
        layers: list[nn.Module] = []
        if expanded != inp:
            layers.append(conv_norm_act(inp, expanded, 1, act=act, norm=_V3_NORM))
        layers.append(conv_norm_act(expanded, expanded, kernel, stride, groups=expanded,
                                    act=act, norm=_V3_NORM))
        if use_se:
            layers.append(SqueezeExcitation(expanded, make_divisible(expanded // 4, 8),
                                            gate=nn.Hardsigmoid))
        layers.append(conv_norm_act(expanded, out, 1, act=None, norm=_V3_NORM))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


class MobileNetV3(nn.Module):
    def __init__(self, setting, last_channel: int, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_norm_act(3, 16, 3, 2, act=nn.Hardswish,
                                                 norm=_V3_NORM)]
        layers += [V3Block(*row) for row in setting]
        last_in = setting[-1][3]
        layers.append(conv_norm_act(last_in, 6 * last_in, 1, act=nn.Hardswish, norm=_V3_NORM))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, last_channel),
                                        nn.Hardswish(inplace=True), nn.Dropout(0.2),
                                        nn.Linear(last_channel, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v3_large(num_classes: int = 1000) -> MobileNetV3:
    return MobileNetV3(V3_LARGE, 1280, num_classes)


def mobilenet_v3_small(num_classes: int = 1000) -> MobileNetV3:
    return MobileNetV3(V3_SMALL, 1024, num_classes)


# ----- EfficientNet-B0 ------------------------------------------------------------------

# (expansion, kernel, stride, input, output, layers)
B0 = ((1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
      (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1))


class MBConv(nn.Module):
    """EfficientNet block: [expand, SiLU] -> depthwise, SiLU -> SE (SiLU, sigmoid) ->
    project [+ input]; stochastic depth is the identity at inference."""

    def __init__(self, expand: int, kernel: int, stride: int, inp: int, out: int) -> None:
        super().__init__()
        self.use_res_connect = stride == 1 and inp == out
        hidden = inp * expand
        layers: list[nn.Module] = []
        if hidden != inp:
            layers.append(conv_norm_act(inp, hidden, 1, act=nn.SiLU))
        layers.append(conv_norm_act(hidden, hidden, kernel, stride, groups=hidden,
                                    act=nn.SiLU))
        layers.append(SqueezeExcitation(hidden, max(1, inp // 4), act=partial(nn.SiLU,
                                                                              inplace=True)))
        layers.append(conv_norm_act(hidden, out, 1, act=None))
        self.block = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        return y + x if self.use_res_connect else y


class EfficientNetB0(nn.Module):
    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        layers: list[nn.Module] = [conv_norm_act(3, 32, 3, 2, act=nn.SiLU)]
        for expand, kernel, stride, inp, out, n in B0:
            layers.append(nn.Sequential(*(
                MBConv(expand, kernel, stride if i == 0 else 1, inp if i == 0 else out, out)
                for i in range(n))))
        layers.append(conv_norm_act(320, 1280, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Dropout(0.2, inplace=True),
                                        nn.Linear(1280, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def efficientnet_b0(num_classes: int = 1000) -> EfficientNetB0:
    return EfficientNetB0(num_classes)
