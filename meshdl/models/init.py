"""The seeded initialisation shared by the zoo's torchvision-style models."""
from __future__ import annotations

import torch.nn as nn


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convolutions (fan out), unit batch norms, small-normal linears,
    zero biases: torchvision's scheme for VGG, MobileNetV2 and EfficientNet."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
