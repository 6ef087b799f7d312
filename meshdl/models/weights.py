"""Reading a user's checkpoint and loading it into a model, with errors that explain.

Only tensors are unpickled (``torch.load(..., weights_only=True)``). Accepted layouts: a
raw state dict, or a dict holding one under ``"state_dict"`` / ``"model_state_dict"`` /
``"model"``. A ``"module."`` prefix on every key (saved from DataParallel) is stripped.
"""
from __future__ import annotations

import logging
from pickle import UnpicklingError   # what torch.load(weights_only=True) raises
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import nn

from meshdl.errors import ModelError

log = logging.getLogger(__name__)

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# name -> {key: shape} of a known architecture, for guessing what a checkpoint is
Signature = dict[str, tuple[int, ...]]


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``path`` (tensors only); ModelError when it is not one."""
    p = Path(path)
    if not p.exists():
        raise ModelError(f"weights file {str(p)!r} does not exist: check the path "
                         "(a torchvision-style .pth state dict is expected)")
    if p.is_dir():
        raise ModelError(f"weights path {str(p)!r} is a directory: pass the .pth file itself")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except UnpicklingError as exc:
        detail = _unpickler_detail(exc)
        if "Unsupported global" not in detail:
            raise ModelError(f"{str(p)!r} is not a PyTorch checkpoint (corrupt, truncated or "
                             f"another format): {detail}") from exc
        raise ModelError(
            f"{str(p)!r} holds Python objects other than tensors, e.g. a whole model saved "
            "with torch.save(model); meshdl only loads state dicts: re-save it with "
            f"torch.save(model.state_dict(), path) ({detail})") from exc
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise ModelError(f"{str(p)!r} is not a readable PyTorch checkpoint (truncated or not "
                         f"made by torch.save?): {_first_line(exc)}") from exc
    return unwrap_state_dict(obj, str(p))


def unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The ``{key: tensor}`` mapping inside a loaded checkpoint object."""
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and _all_tensors(inner):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise ModelError(f"{source!r} does not contain a state dict (found "
                         f"{type(obj).__name__}); save one with torch.save(model.state_dict(), "
                         "path)")
    if not _all_tensors(obj):
        bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)][:5]
        raise ModelError(f"{source!r} is a dict but not a state dict: entries {bad} are not "
                         f"tensors (top-level keys: {_preview(obj.keys())}); pass a file saved "
                         "with torch.save(model.state_dict(), path)")
    state = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in state):
        log.info("stripping the 'module.' prefix (DataParallel) from %s", source)
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_into(model: nn.Module, state: Mapping[str, torch.Tensor], name: str, source: str,
              guess: Callable[[Signature], str] | None = None, assign: bool = False) -> None:
    """Copy ``state`` into ``model`` (strict). ModelError names missing, unexpected and
    mis-shaped keys and, through ``guess``, what the checkpoint seems to be.

    ``assign=True`` makes the model's tensors *be* the loaded ones (for a model built on
    the meta device: no second copy of the weights in memory).
    """
    own = model.state_dict()
    signature = {k: tuple(v.shape) for k, v in state.items()}
    state = dict(state)
    for key, value in own.items():  # pre-2018 checkpoints lack BatchNorm's counter
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros((), dtype=value.dtype)
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) (e.g. {_preview(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) (e.g. {_preview(unexpected)})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es) ({'; '.join(mismatched[:3])})")
        hint = guess(signature) if guess is not None else ""
        raise ModelError(f"weights {source!r} do not fit model {name!r}: {', '.join(parts)}. "
                         f"{hint or describe_keys(signature)}")
    state = {k: v.to(own[k].dtype) for k, v in state.items()}
    model.load_state_dict(state, strict=True, assign=assign)


def describe_keys(signature: Signature) -> str:
    """A short description of an unrecognised checkpoint, for error messages."""
    n = sum(1 for k in signature if not k.endswith("num_batches_tracked"))
    hints = []
    if any(k.startswith("_blocks.") for k in signature):
        hints.append("its '_blocks.N' keys look like an EfficientNet (efficientnet_pytorch "
                     "style) checkpoint")
    if any(k.startswith(("backbone.", "encoder.", "model.")) for k in signature):
        hints.append("its keys carry a wrapper prefix (backbone./encoder./model.): strip it "
                     "and re-save")
    text = f"The file holds {n} tensors, first keys {_preview(signature)}"
    return text + (f"; {'; '.join(hints)}." if hints else ".")


def closest_match(signature: Signature, known: Iterable[tuple[str, Signature]]) -> str:
    """Explain which known architecture ``signature`` matches, if any (for error messages)."""
    signature = _without_counters(signature)
    keys = set(signature)
    best, best_score = "", 0.0
    for name, sig in known:
        sig = _without_counters(sig)
        if set(sig) == keys:
            diff = [k for k in sig if sig[k] != signature[k]]
            if not diff:
                return f"The file is a {name!r} checkpoint: build({name!r}, weights=...)."
            classes = _classifier_classes(sig, signature, diff)
            if classes:
                return (f"The file is a {name!r} checkpoint with {classes} classes: pass "
                        f"num_classes={classes}.")
        score = len(keys & set(sig)) / max(len(keys | set(sig)), 1)
        if score > best_score:
            best, best_score = name, score
    if best_score >= 0.5:
        return (f"The file looks closest to {best!r} ({best_score:.0%} of keys in common); "
                f"{describe_keys(signature)}")
    return describe_keys(signature)


def _classifier_classes(sig: Signature, other: Signature, diff: list[str]) -> int | None:
    """Number of classes when only the last layer's output size differs."""
    if len(diff) != 2 or not all(k.endswith((".weight", ".bias")) for k in diff):
        return None
    if len({k.rsplit(".", 1)[0] for k in diff}) != 1:
        return None
    shapes = [other[k] for k in diff]
    if all(s and s[0] != sig[k][0] and s[1:] == sig[k][1:] for s, k in zip(shapes, diff)):
        return shapes[0][0]
    return None


def _without_counters(signature: Signature) -> Signature:
    """Drop BatchNorm's ``num_batches_tracked`` (absent from old checkpoints)."""
    return {k: v for k, v in signature.items() if not k.endswith("num_batches_tracked")}


def _all_tensors(obj: Mapping) -> bool:
    return all(isinstance(v, torch.Tensor) for v in obj.values())


def _preview(keys: Iterable[object], n: int = 4) -> str:
    items = [str(k) for k in keys]
    shown = ", ".join(repr(k) for k in items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}]"


def _unpickler_detail(exc: BaseException) -> str:
    """The useful part of torch's long "Weights only load failed" message."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        rest = text.split(marker, 1)[1].strip()
        return rest.split(". Please", 1)[0].splitlines()[0][:200] if rest else text[:200]
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
