"""A user's own model: an ONNX file, a ``torch.export`` .pt2 file, or a zoo name with a
state dict, loaded into one ``LoadedModel`` (module + input shape + preprocessing + labels).

    load("net.onnx") / load("net.pt2") / load("resnet18", weights="r18.pth") -> LoadedModel
    is_model_file(text) -> bool          # a path meshdl should load rather than a zoo name

Metadata (ONNX ``metadata_props``; for any file also a JSON sidecar ``FILE.meshdl.json``;
for .pt2 also ``extra_files={"meshdl.json": ...}`` given to ``torch.export.save``), all
optional: ``input_size`` ("HxW"), ``mean`` / ``std`` ("0.485,0.456,0.406"), ``resize``
(shorter side before the centre crop), ``labels`` (JSON list or one per line), ``name``.
Explicit arguments (CLI flags) override metadata; without either, ImageNet mean/std and
``resize = round(256 / 224 * min(H, W))`` apply and outputs are class indices.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from meshdl.errors import ImageError, ModelError

log = logging.getLogger(__name__)

SUFFIXES = (".onnx", ".pt2")
SIDECAR = ".meshdl.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to trace and feed: ``module(x)`` with ``x`` of ``input_shape``."""
    module: Any                         # nn.Module (fx GraphModule for files)
    name: str
    kind: str                           # "onnx" | "pt2" | "zoo"
    source: str                         # the file (or zoo name)
    input_shape: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: int | None                  # shorter side before the centre crop
    labels: tuple[str, ...] | None

    def image(self, path: Any):
        """An image file (or bytes) -> normalised tensor of ``input_shape``."""
        return prepare_image(path, self.input_shape, self.mean, self.std, self.resize)

    def trace(self, name: str | None = None):
        import meshdl
        return meshdl.trace(self.module, self.input_shape, name=name or self.name)

    def topk(self, output, k: int = 5) -> list[tuple[int, str, float]]:
        from meshdl import imaging
        flat = output.detach().float().reshape(-1)
        labels = list(self.labels) if self.labels and len(self.labels) == flat.numel() \
            else [str(i) for i in range(flat.numel())]
        return imaging.topk(flat, k, labels=labels)


def is_model_file(text: str | Path) -> bool:
    """Whether ``text`` names a model file (by suffix, or an existing file)."""
    p = Path(str(text))
    return p.suffix.lower() in SUFFIXES or p.is_file()


def load(model: str | Path, *, weights: str | Path | None = None,
         input_size: Sequence[int] | str | None = None, labels: Any = None,
         mean: Sequence[float] | str | None = None, std: Sequence[float] | str | None = None,
         num_classes: int | None = None) -> LoadedModel:
    """Load a model file (.onnx / .pt2) or a zoo name (optionally with ``weights``)."""
    size = parse_size(input_size) if input_size is not None else None
    text = str(model)
    if not is_model_file(text):
        return _zoo(text, weights, size, labels, mean, std, num_classes)
    if weights is not None:
        raise ModelError(f"--weights goes with a zoo model name; {text!r} is a model file "
                         "that holds its own weights")
    p = Path(text)
    if not p.exists():
        raise ModelError(f"model file {text!r} does not exist: check the path")
    suffix = p.suffix.lower()
    if suffix == ".pt2":
        module, shape, meta = _load_pt2(p, size)
        kind = "pt2"
    elif suffix == ".onnx" or _looks_onnx(p):
        from meshdl.models.onnx_import import convert, load_proto
        proto = load_proto(p)
        meta = {k.removeprefix("meshdl."): v for k, v in
                ((q.key, q.value) for q in proto.metadata_props)}
        meta.update(_sidecar(p))
        if size is None and meta.get("input_size"):
            size = parse_size(meta["input_size"])
        c = convert(proto, size, source=text)
        module, shape, kind = c.gm, c.input_shape, "onnx"
    else:
        raise ModelError(f"{text!r}: unknown model format; meshdl loads .onnx (ONNX) and "
                         ".pt2 (torch.export.save) files, or a zoo name with --weights")
    return _finish(module, p.stem if not meta.get("name") else str(meta["name"]), kind,
                   text, shape, meta, labels, mean, std)


def channels_last(shape: Sequence[int]) -> bool:
    """A 4-D image input laid out N, H, W, C (TensorFlow-converted models)."""
    return len(shape) == 4 and shape[3] in (1, 3) and shape[1] not in (1, 3)


def _finish(module, name, kind, source, shape, meta, labels, mean, std) -> LoadedModel:
    channels = (shape[3] if channels_last(shape) else shape[1]) if len(shape) == 4 else 3
    m = _floats(mean if mean is not None else meta.get("mean"), "mean", source) \
        or IMAGENET_MEAN
    s = _floats(std if std is not None else meta.get("std"), "std", source) or IMAGENET_STD
    if len(m) == 1:
        m = m * channels
    if len(s) == 1:
        s = s * channels
    if len(m) != channels or len(s) != channels:
        if mean is None and std is None and not meta.get("mean") and channels != 3:
            m, s = (0.5,) * channels, (0.5,) * channels
        else:
            raise ModelError(f"{source}: mean/std have {len(m)}/{len(s)} values but the model "
                             f"takes {channels} channels")
    if any(v == 0 for v in s):
        raise ModelError(f"{source}: std values must be non-zero, got {s}")
    resize = meta.get("resize")
    lab = read_labels(labels) if labels is not None else \
        (read_labels(meta["labels"], inline=True) if meta.get("labels") else None)
    return LoadedModel(module, name, kind, source, tuple(int(v) for v in shape), m, s,
                       int(resize) if resize else None, lab)


def _zoo(name, weights, size, labels, mean, std, num_classes) -> LoadedModel:
    from meshdl import imaging, models
    info = models.info(name)      # ModelError naming the known models
    pretrained = info.pretrained_available and weights is None
    module = models.build(name, pretrained=pretrained, weights=weights,
                          num_classes=num_classes)
    shape = tuple(info.input_shape)
    if size is not None:
        shape = (*shape[:2], *size)
    zm, zs = imaging.NORMALISATIONS[info.preprocessing]
    lab = read_labels(labels) if labels is not None else None
    if lab is None and (num_classes or info.num_classes) == 1000:
        lab = tuple(imaging.imagenet_labels())
    return LoadedModel(module, name, "zoo", str(weights or name), shape,
                       _floats(mean, "mean", name) or tuple(zm),
                       _floats(std, "std", name) or tuple(zs), None, lab)


# ------------------------------------------------------------------ .pt2
def _load_pt2(p: Path, size: tuple[int, int] | None):
    import zipfile
    import torch
    from meshdl.graph.aten import normalise
    extra = {"meshdl.json": ""}
    if not zipfile.is_zipfile(p):
        raise ModelError(f"{str(p)!r} is not a .pt2 file (torch.export.save writes a zip "
                         "archive; this one is truncated or another format)")
    try:
        ep = torch.export.load(str(p), extra_files=extra)
    except Exception as exc:
        raise ModelError(f"{str(p)!r} could not be loaded by torch.export.load (truncated, "
                         f"another torch version, or custom ops not registered here): "
                         f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from exc
    meta = {}
    if extra.get("meshdl.json"):
        meta = _json_meta(extra["meshdl.json"], f"{p} (meshdl.json)")
    meta.update(_sidecar(p))
    users = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    if len(users) != 1:
        raise ModelError(f"{str(p)!r}: meshdl runs models with exactly one input; this "
                         f"exported program takes {len(users)}")
    node = next(n for n in ep.graph.nodes if n.op == "placeholder"
                and n.name == users[0].arg.name)
    val = node.meta.get("val")
    shape = []
    for d in getattr(val, "shape", ()):
        try:
            shape.append(int(d))
        except (TypeError, ValueError):
            shape.append(-1)
    if size is None and meta.get("input_size"):
        size = parse_size(meta["input_size"])
    if size is not None and len(shape) == 4:
        shape = [shape[0] if shape[0] > 0 else 1, shape[1], *size]
    if shape and shape[0] < 0:
        shape[0] = 1
    if not shape or any(v < 0 for v in shape):
        raise ModelError(f"{str(p)!r}: the exported input has a free size {tuple(shape)}; "
                         "pass --input-size HxW")
    try:
        gm = normalise(ep)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"{str(p)!r}: its exported graph cannot be converted: {exc}") from exc
    return gm, tuple(shape), meta


# ------------------------------------------------------------------ metadata helpers
def _looks_onnx(p: Path) -> bool:
    try:
        with open(p, "rb") as f:
            head = f.read(4)
        return head[:1] == b"\x08"          # ModelProto field 1 (ir_version), varint
    except OSError:
        return False


def _sidecar(p: Path) -> dict:
    side = p.with_name(p.name + SIDECAR)
    if not side.is_file():
        return {}
    return _json_meta(side.read_text(), str(side))


def _json_meta(text: str, source: str) -> dict:
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ModelError(f"{source} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise ModelError(f"{source} must hold a JSON object of metadata")
    return {str(k).removeprefix("meshdl."): v for k, v in meta.items()}


def parse_size(value: Any) -> tuple[int, int]:
    """``"224"``, ``"224x160"``, ``(224, 160)`` -> (H, W)."""
    try:
        if isinstance(value, str):
            parts = [int(v) for v in value.lower().replace(",", "x").split("x") if v.strip()]
        else:
            parts = [int(v) for v in value]
        if len(parts) == 1:
            parts = parts * 2
        h, w = parts
        if h < 1 or w < 1:
            raise ValueError
        return h, w
    except (TypeError, ValueError):
        raise ModelError(f"input size {value!r} is not HxW (e.g. 224x224)") from None


def _floats(value: Any, what: str, source: str) -> tuple[float, ...] | None:
    if value is None or value == "":
        return None
    try:
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else value.split(",")
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError, json.JSONDecodeError):
        raise ModelError(f"{source}: {what} {value!r} is not a list of numbers, e.g. "
                         "0.485,0.456,0.406") from None
    if not out:
        return None
    return out


def read_labels(value: Any, inline: bool = False) -> tuple[str, ...]:
    """Labels from a file path (one per line, or a JSON list), inline text, or a list."""
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value)
    text = str(value)
    if not inline:
        p = Path(text)
        if not p.is_file():
            raise ModelError(f"labels file {text!r} does not exist")
        text = p.read_text(encoding="utf-8", errors="replace")
    if text.lstrip().startswith("["):
        try:
            return tuple(str(v) for v in json.loads(text))
        except json.JSONDecodeError as exc:
            raise ModelError(f"labels {value!r} look like JSON but do not parse: {exc}") \
                from exc
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """``{key: str}`` for ONNX metadata_props from Python values (for exporters)."""
    return {k: (json.dumps(v) if isinstance(v, (list, tuple)) else str(v))
            for k, v in meta.items()}


# ------------------------------------------------------------------ images
def prepare_image(source: Any, shape: Sequence[int], mean: Sequence[float],
                  std: Sequence[float], resize: int | None = None):
    """Resize the shorter side, centre-crop to the model's H x W, normalise."""
    import numpy as np
    import torch
    from PIL import Image
    from meshdl import imaging
    if len(shape) != 4:
        raise ImageError(f"the model takes a {len(shape)}-D input {tuple(shape)}, not an "
                         "image; pass a tensor")
    nhwc = channels_last(shape)
    _, c, h, w = (int(v) for v in ((shape[0], shape[3], shape[1], shape[2]) if nhwc
                                   else shape))
    if c not in (1, 3):
        raise ImageError(f"the model takes {c} channels; images have 1 or 3: pass a tensor")
    img = imaging.open_image(source)
    if c == 1:
        img = img.convert("L")
    shorter = resize or int(round(256 * min(h, w) / 224))
    shorter = max(shorter, h, w) if resize is None and max(h, w) > shorter else shorter
    iw, ih = img.size
    scale = shorter / min(iw, ih)
    nw, nh = max(w, round(iw * scale)), max(h, round(ih * scale))
    img = img.resize((nw, nh), Image.BILINEAR)
    left, top = (nw - w) // 2, (nh - h) // 2
    img = img.crop((left, top, left + w, top + h))
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = (arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    if nhwc:
        return torch.from_numpy(np.ascontiguousarray(arr))[None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]
