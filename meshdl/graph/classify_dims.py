"""Ops decided by the dims they touch: channel-only ops (spatially local) and global
reductions over the feature map (split into per-tile partials).

A feature map keeps its spatial axes H, W as its last two dims. An op is spatially local
when it provably leaves those two dims alone: it reduces, sorts, splits, selects or
regroups only other dims, and its output still ends with the same H, W. Such an op
commutes with cropping (op(crop(x)) == crop(op(x))), so a tile runs it on its own crop.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

_REQ = object()       # the dim argument is required
_SOFTMAX = object()   # F.softmax's implicit dim

# name -> (position of the dim argument, counting the tensor as 0; default when absent)
DIM_OPS: dict[str, tuple[int, Any]] = {
    "softmax": (1, _SOFTMAX), "log_softmax": (1, _SOFTMAX), "softmin": (1, _SOFTMAX),
    "sum": (1, None), "mean": (1, None), "nansum": (1, None), "nanmean": (1, None),
    "amax": (1, None), "amin": (1, None), "prod": (1, None), "max": (1, None),
    "min": (1, None), "argmax": (1, None), "argmin": (1, None), "median": (1, None),
    "std": (1, None), "var": (1, None), "all": (1, None), "any": (1, None),
    "count_nonzero": (1, None), "logsumexp": (1, _REQ), "cumsum": (1, _REQ),
    "cumprod": (1, _REQ), "cummax": (1, _REQ), "cummin": (1, _REQ), "sort": (1, -1),
    "argsort": (1, -1), "topk": (2, -1), "kthvalue": (2, -1), "norm": (2, None),
    "normalize": (2, 1), "chunk": (2, 0), "split": (2, 0), "tensor_split": (2, 0),
    "unbind": (1, 0), "index_select": (1, _REQ), "narrow": (1, _REQ), "select": (1, _REQ),
    "flip": (1, _REQ), "roll": (2, None), "glu": (1, -1), "repeat_interleave": (2, None),
    "transpose": (1, _REQ), "swapaxes": (1, _REQ), "swapdims": (1, _REQ),
    "movedim": (1, _REQ), "moveaxis": (1, _REQ), "local_response_norm": (None, 1),
    "channel_shuffle": (None, 1), "native_channel_shuffle": (None, 1),
}
_KW = {"flip": "dims", "roll": "dims", "transpose": "dim0", "swapaxes": "axis0",
       "swapdims": "dim0", "movedim": "source", "moveaxis": "source"}
# second dim argument of two-dim ops
_SECOND = {"transpose": (2, "dim1"), "swapaxes": (2, "axis1"), "swapdims": (2, "dim1"),
           "movedim": (2, "destination"), "moveaxis": (2, "destination")}

RESHAPES = {"view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as",
            "reshape_as"}
PERMUTES = {"permute"}

REDUCE_HOW = {"sum": "sum", "nansum": "sum", "mean": "mean", "nanmean": "mean",
              "amax": "amax", "amin": "amin", "max": "amax", "min": "amin"}


def op_name(target: Any) -> str | None:
    """The torch name of a function or method target (None for user functions)."""
    if isinstance(target, str):
        return target
    name = getattr(target, "__name__", None)
    if name is None:
        return None
    for ns in (torch, F, torch.Tensor, operator, torch.special, torch.linalg):
        if getattr(ns, name, None) is target:
            return name
    return None


def norm_dims(dim: Any, ndim: int) -> tuple[int, ...] | None:
    """Non-negative dims (None = every dim); None when ``dim`` is not a dim spec."""
    if dim is None:
        return tuple(range(ndim))
    if isinstance(dim, bool):
        return None
    if isinstance(dim, int):
        dim = (dim,)
    if not isinstance(dim, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in dim):
        return None
    out = tuple(sorted({d % ndim for d in dim})) if ndim else ()
    return out


def _arg(args: Sequence, kwargs: dict, pos: int | None, kw: str, default: Any) -> Any:
    if kw in kwargs:
        return kwargs[kw]
    if pos is not None and pos < len(args):
        return args[pos]
    return default


def touched_dims(name: str, args: Sequence, kwargs: dict, ndim: int
                 ) -> tuple[int, ...] | None:
    """Dims of the input (args[0]) that op ``name`` reads across; None if unknown."""
    if name not in DIM_OPS:
        return None
    pos, default = DIM_OPS[name]
    dim = _arg(args, kwargs, pos, _KW.get(name, "dim"), default)
    if dim is _REQ:
        return None
    if dim is _SOFTMAX:
        dim = 0 if ndim in (0, 1, 3) else 1
    dims = norm_dims(dim, ndim)
    if dims is None:
        return None
    if name in _SECOND:
        p2, kw2 = _SECOND[name]
        d2 = norm_dims(_arg(args, kwargs, p2, kw2, _REQ if p2 >= len(args) else None), ndim)
        if d2 is None:
            return None
        dims = tuple(sorted(set(dims) | set(d2)))
    return dims


def _spatial(ndim: int) -> set[int]:
    return {ndim - 2, ndim - 1}


def keeps_hw(in_shape: Sequence[int], out_shape: Sequence[int]) -> bool:
    return (len(in_shape) >= 3 and len(out_shape) >= 3
            and tuple(in_shape[-2:]) == tuple(out_shape[-2:]))


def channel_local(name: str | None, args: Sequence, kwargs: dict,
                  in_shape: Sequence[int], out_shape: Sequence[int]) -> str | None:
    """How op ``name`` on a feature map is spatially local: "reshape" (a pure reshape
    keeping H, W last: the tile reshapes its crop), "local" (commutes with cropping),
    or None (it touches H or W, or meshdl cannot tell)."""
    if name is None or not keeps_hw(in_shape, out_shape):
        return None
    ndim = len(in_shape)
    if name in RESHAPES:
        return "reshape"
    if name in PERMUTES:
        perm = args[1:] if len(args) > 1 else kwargs.get("dims", ())
        if len(perm) == 1 and isinstance(perm[0], (tuple, list, torch.Size)):
            perm = perm[0]
        perm = [int(p) % ndim for p in perm]
        return "local" if perm[-2:] == [ndim - 2, ndim - 1] else None
    if name == "getitem":
        return "local" if _index_keeps_hw(args[1] if len(args) > 1 else None, ndim) else None
    if name == "repeat":
        reps = args[1:]
        if len(reps) == 1 and isinstance(reps[0], (tuple, list, torch.Size)):
            reps = reps[0]
        return "local" if len(reps) == ndim and tuple(reps[-2:]) == (1, 1) else None
    if name == "pad":
        pad = _arg(args, kwargs, 1, "pad", None)
        mode = _arg(args, kwargs, 2, "mode", "constant")
        if pad is None or mode != "constant" or len(pad) < 6:
            return None
        return "local" if all(int(p) == 0 for p in pad[:4]) else None
    dims = touched_dims(name, args, kwargs, ndim)
    if dims is None or set(dims) & _spatial(ndim):
        return None
    return "local"


def _index_keeps_hw(index: Any, ndim: int) -> bool:
    """A basic index (ints, slices, ...) that leaves the last two dims whole."""
    if not isinstance(index, tuple):
        index = (index,)
    full = slice(None, None, None)
    for i in index:
        if i is None or isinstance(i, (torch.Tensor, list, bool)):
            return False
        if not (i is Ellipsis or isinstance(i, (int, slice))):
            return False
    if Ellipsis in index:
        k = index.index(Ellipsis)
        tail = index[k + 1:]
        return all(t == full for t in tail)
    if len(index) <= ndim - 2:
        return True
    return all(t == full for t in index[ndim - 2:])


@dataclass(frozen=True)
class ReduceSpec:
    """A reduction over dims that include both spatial dims of a feature map: every
    tile reduces its own part, the partials are combined in tile order."""

    how: str                    # "sum" | "mean" | "amax" | "amin"
    dims: tuple[int, ...]       # reduced dims of the input (non-negative)
    keepdim: bool
    count: int                  # elements reduced per output value (for "mean")

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This tile's part: the reduction kept as dims (sum for sums and means)."""
        if self.how in ("sum", "mean"):
            return x.sum(dim=self.dims, keepdim=True)
        fn = torch.amax if self.how == "amax" else torch.amin
        return fn(x, dim=self.dims, keepdim=True)

    def identity(self, in_shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
        """The partial of a tile that owns no part of the map (0, -inf or +inf)."""
        shape = [1 if d in self.dims else int(n) for d, n in enumerate(in_shape)]
        fill = {"sum": 0.0, "mean": 0.0, "amax": float("-inf"), "amin": float("inf")}
        return like.new_full(shape, fill[self.how])

    def combine(self, partials: Sequence[torch.Tensor]) -> torch.Tensor:
        """The op's exact output from all tiles' partials (in tile order)."""
        acc = partials[0]
        for p in partials[1:]:
            if self.how in ("sum", "mean"):
                acc = acc + p
            elif self.how == "amax":
                acc = torch.maximum(acc, p)
            else:
                acc = torch.minimum(acc, p)
        if self.how == "mean":
            acc = acc / self.count
        if not self.keepdim:
            acc = acc.squeeze(self.dims) if self.dims else acc
        return acc


def _full_pool(kernel: Any, stride: Any, padding: Any, shape: Sequence[int]) -> bool:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    k = pair(kernel)
    s = pair(stride if stride not in (None, [], ()) else kernel)
    return (tuple(int(v) for v in k) == tuple(shape[-2:]) and all(int(p) == 0 for p in pair(padding))
            and all(int(v) >= 1 for v in s))


def global_reduce(name: str | None, args: Sequence, kwargs: dict, in_shape: Sequence[int],
                  out_shape: Sequence[int], module: nn.Module | None = None
                  ) -> ReduceSpec | None:
    """A ReduceSpec when the op reduces over both spatial dims of its input."""
    if len(in_shape) < 3:
        return None
    ndim = len(in_shape)
    hw = (ndim - 2, ndim - 1)
    count = int(in_shape[-2]) * int(in_shape[-1])
    if module is not None:
        if isinstance(module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) and \
                tuple(out_shape[-2:]) == (1, 1) and ndim == 4:
            how = "mean" if isinstance(module, nn.AdaptiveAvgPool2d) else "amax"
            return ReduceSpec(how, hw, True, count)
        if isinstance(module, nn.AvgPool2d) and not module.ceil_mode and \
                module.divisor_override is None and tuple(out_shape[-2:]) == (1, 1) and \
                _full_pool(module.kernel_size, module.stride, module.padding, in_shape):
            return ReduceSpec("mean", hw, True, count)
        if isinstance(module, nn.MaxPool2d) and not module.ceil_mode and \
                not module.return_indices and tuple(out_shape[-2:]) == (1, 1) and \
                _full_pool(module.kernel_size, module.stride, module.padding, in_shape) \
                and module.dilation in (1, (1, 1)):
            return ReduceSpec("amax", hw, True, count)
        return None
    if name is None:
        return None
    if name in ("adaptive_avg_pool2d", "adaptive_max_pool2d"):
        if ndim == 4 and tuple(out_shape[-2:]) == (1, 1):
            return ReduceSpec("mean" if "avg" in name else "amax", hw, True, count)
        return None
    if name in ("avg_pool2d", "max_pool2d"):
        names = ["input", "kernel_size", "stride", "padding"]
        v = dict(zip(names, args))
        v.update(kwargs)
        extra_ok = (not v.get("ceil_mode") and not v.get("return_indices")
                    and v.get("divisor_override") is None and v.get("dilation", 1) in (1, (1, 1)))
        if extra_ok and tuple(out_shape[-2:]) == (1, 1) and "kernel_size" in v and \
                _full_pool(v["kernel_size"], v.get("stride"), v.get("padding", 0), in_shape):
            return ReduceSpec("mean" if name == "avg_pool2d" else "amax", hw, True, count)
        return None
    if name not in REDUCE_HOW:
        return None
    if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
        return None                       # elementwise maximum of two tensors
    dim = _arg(args, kwargs, 1, "dim", None)
    if name in ("max", "min") and dim is not None and not isinstance(dim, (tuple, list)):
        return None                       # (values, indices) over one dim
    dims = norm_dims(dim, ndim)
    if dims is None or not set(hw) <= set(dims):
        return None
    if kwargs.get("dtype") is not None:
        return None
    keepdim = bool(_arg(args, kwargs, 2, "keepdim", False))
    if name in ("max", "min"):
        keepdim = False
    count = int(math.prod(int(in_shape[d]) for d in dims))
    return ReduceSpec(REDUCE_HOW[name], dims, keepdim, count)
