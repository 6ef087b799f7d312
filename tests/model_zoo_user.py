"""Torch models that are not in meshdl's zoo, for the model-file tests (ONNX / .pt2)."""
from __future__ import annotations

import io
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F


class SE(nn.Module):
    def __init__(self, c: int, r: int = 4) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(c, max(1, c // r), 1)
        self.fc2 = nn.Conv2d(max(1, c // r), c, 1)

    def forward(self, x):
        w = F.adaptive_avg_pool2d(x, 1)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(w))))


class BranchyNet(nn.Module):
    """Two branches joined by add and concat, depthwise convs, an SE block, odd sizes."""

    def __init__(self, width: int = 16, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(width, width, 3, 1, 1, groups=width, bias=False),
                                nn.BatchNorm2d(width), nn.Hardswish())
        self.se = SE(2 * width)
        self.b1 = nn.Conv2d(width, width, 1)
        self.b2 = nn.Sequential(nn.Conv2d(width, width, 3, padding=2, dilation=2),
                                nn.LeakyReLU(0.1))
        self.dw2 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 5, 2, 2, groups=2 * width),
                                 nn.BatchNorm2d(2 * width), nn.SiLU())
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.ap = nn.AvgPool2d(3, 1, 1, count_include_pad=False)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.dw(x)
        x = torch.cat([self.b1(x), self.b2(x)], 1)
        x = self.dw2(x)
        x = self.ap(self.pool(x))
        x = self.se(F.hardsigmoid(x) * x)
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial batch-norm statistics, so a wrong BN shows in the output."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)
    return model.eval()


def export_onnx(model: nn.Module, x: torch.Tensor, path, opset: int = 17,
                metadata: dict | None = None) -> None:
    """torch.onnx.export with the TorchScript exporter (no onnxscript needed)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), buf, dynamo=False, opset_version=opset)
    data = buf.getvalue()
    if metadata:
        import onnx
        proto = onnx.load_from_string(data)
        for k, v in metadata.items():
            p = proto.metadata_props.add()
            p.key, p.value = k, v
        data = proto.SerializeToString()
    with open(path, "wb") as f:
        f.write(data)


def ort_run(path, x: torch.Tensor):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
