"""Where H and W are: the spatial axes of every tensor, followed from the model input.

The model input is (N, C, H, W): its spatial axes are its last two dims. Each op maps
its inputs' axes to its output's: a permute/transpose/movedim moves them (followed
exactly from the op's own strides on a meta tensor); a channel-only op (LayerNorm or
Linear over C, GELU, elementwise with per-channel constants, a reduction over C with
keepdim, ...) keeps them. A tensor whose H, W are not its last two dims (channels-last
N, H, W, C in a ConvNeXt block) is tiled along its tracked axes by ``AxisRule``; only
ops that provably leave those axes alone are tileable there, everything else runs
whole. Stage boundaries only ever carry tensors whose H, W are their last two dims.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from meshdl.graph import regions as R
from meshdl.graph.classify_dims import op_name, touched_dims
from meshdl.graph.plan import Region

HW = tuple[int, int] | None

MOVES = {"permute", "transpose", "swapaxes", "swapdims", "movedim", "moveaxis", "t", "T",
         "mT", "contiguous", "clone", "detach"}

# elementwise ops safe on any layout (no per-dim-1 "channel" parameters)
_LAYOUT_FREE_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU,
                        nn.SiLU, nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
                        nn.Hardtanh, nn.Softplus, nn.Identity, nn.Dropout, nn.LogSigmoid,
                        nn.Softsign, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink,
                        nn.Threshold)
_NOT_LAYOUT_FREE = {"batch_norm", "prelu", "dropout2d", "dropout3d", "feature_alpha_dropout",
                    "rrelu", "masked_fill"}


def standard(shape: Sequence[int]) -> HW:
    """The axes of a feature map laid out (..., H, W)."""
    return (len(shape) - 2, len(shape) - 1) if len(shape) >= 3 else None


def is_standard(shape: Sequence[int], hw: HW) -> bool:
    return hw is not None and hw == standard(shape)


def full_region(shape: Sequence[int], hw: HW) -> Region:
    if hw is None or len(shape) < 2:
        return Region.full(tuple(shape))
    return Region(0, int(shape[hw[0]]), 0, int(shape[hw[1]]))


def empty_tile(proto: torch.Tensor, shape: Sequence[int], hw: HW, r: Region) -> torch.Tensor:
    """An empty tile of a map of ``shape`` (a tile lying wholly in padding)."""
    dims = list(shape)
    ah, aw = hw if hw is not None else standard(shape)
    dims[ah], dims[aw] = max(0, r.rows), max(0, r.cols)
    return proto.new_empty(dims)


def crop_axes(t: torch.Tensor, held: Region, want: Region, hw: tuple[int, int]
              ) -> torch.Tensor:
    """Part ``want`` of a tensor holding ``held`` along its axes ``hw`` (a view)."""
    if held == want:
        return t
    r = want.relative_to(held)
    return t.narrow(hw[0], r.h0, r.rows).narrow(hw[1], r.w0, r.cols)


def moved_axes(call: Callable, x: torch.Tensor, hw: tuple[int, int]) -> HW:
    """Where a pure axis move (permute, transpose, ...) puts axes ``hw`` of ``x``: the op
    runs on a meta tensor with distinct strides, the output's strides name each axis."""
    nd = x.dim()
    strides = tuple(1 << (nd - 1 - i) for i in range(nd))
    probe = torch.empty_strided(tuple(x.shape), strides, dtype=x.dtype, device="meta")
    try:
        y = call(probe)
    except Exception:
        return None
    if not isinstance(y, torch.Tensor) or y.dim() != nd or sorted(y.stride()) != \
            sorted(strides) or sorted(y.shape) != sorted(x.shape):
        return None
    where = {s: j for j, s in enumerate(y.stride())}
    return where[strides[hw[0]]], where[strides[hw[1]]]


def _aligned(shape: Sequence[int], out_nd: int, axis: int) -> int | None:
    """Size of an input along output axis ``axis`` under right-aligned broadcasting."""
    k = axis - (out_nd - len(shape))
    return int(shape[k]) if 0 <= k < len(shape) else None


def broadcasts_off(shape: Sequence[int], out_shape: Sequence[int], hw: tuple[int, int]) -> bool:
    """An input (constant or vector) that is size 1 (or absent) along the output's H, W."""
    return all(_aligned(shape, len(out_shape), a) in (None, 1) for a in hw)


def _kind(module: nn.Module | None, fn: Any, name: str | None) -> str | None:
    """'pointwise', 'layernorm', 'linear', 'dims', or None (not known layout-free)."""
    from meshdl.graph.classify import _ACT_FUNCTIONS, _BINARY, POINTWISE_NAMES
    if module is not None:
        if isinstance(module, _LAYOUT_FREE_MODULES):
            return "pointwise"
        if isinstance(module, nn.LayerNorm):
            return "layernorm"
        if isinstance(module, nn.Linear):
            return "linear"
        return None
    if name in _NOT_LAYOUT_FREE or fn is F.batch_norm:
        return None
    if fn is F.layer_norm or name == "layer_norm":
        return "layernorm"
    if fn is F.linear or name in ("linear", "matmul"):
        return "linear"
    if fn in _BINARY or fn in _ACT_FUNCTIONS or name in POINTWISE_NAMES or \
            fn in (operator.pow, operator.neg):
        return "pointwise"
    return "dims"


def local_axes(module: nn.Module | None, fn: Any, args: Sequence, kwargs: dict,
               in_shape: Sequence[int], out_shape: Sequence[int], hw: tuple[int, int]
               ) -> bool:
    """Does this op on a tensor with spatial axes ``hw`` provably leave them alone
    (and keep them where they are in its output)?"""
    if len(out_shape) != len(in_shape) or any(
            int(in_shape[a]) != int(out_shape[a]) for a in hw):
        return False
    name = fn if isinstance(fn, str) else op_name(fn) if fn is not None else None
    kind = _kind(module, fn, name)
    nd = len(in_shape)
    if kind == "pointwise":
        if name in ("max", "min") and not (len(args) > 1 and isinstance(args[1], torch.Tensor)):
            return False
        return True
    if kind == "layernorm":
        if module is not None:
            k = len(module.normalized_shape)
        else:
            ns = kwargs.get("normalized_shape", args[1] if len(args) > 1 else None)
            k = len(ns) if isinstance(ns, (tuple, list, torch.Size)) else 1
        return all(a < nd - k for a in hw)
    if kind == "linear":
        return all(a < nd - 1 for a in hw)
    if name in ("cat", "concat", "concatenate"):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        return isinstance(dim, int) and dim % nd not in hw
    if name in ("getitem", "__getitem__"):
        return _slices_off(args[1] if len(args) > 1 else None, nd, hw)
    if kind == "dims" and name is not None:
        dims = touched_dims(name, args, kwargs, nd)
        return dims is not None and not (set(dims) & set(hw))
    return False


def _slices_off(index: Any, nd: int, hw: tuple[int, int]) -> bool:
    """A basic index of slices (and one Ellipsis) that keeps the rank and leaves the
    axes ``hw`` whole (``y[..., :4]`` on a channels-last map)."""
    items = list(index) if isinstance(index, tuple) else [index]
    if items.count(Ellipsis) > 1 or not all(i is Ellipsis or isinstance(i, slice)
                                            for i in items):
        return False
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = items[:k] + [slice(None)] * (nd - len(items) + 1) + items[k + 1:]
    items += [slice(None)] * (nd - len(items))
    return len(items) == nd and all(items[a] == slice(None) for a in hw)


class AxisRule(R.Rule):
    """An op that leaves the spatial axes alone (or only moves them), on tensors whose
    H, W are tracked axes: every input is cropped along its own H, W axes (an input of
    size 1 there broadcasts and is passed whole); ``fn`` runs on the crops."""

    def __init__(self, fn: Callable[..., torch.Tensor], in_shapes: Sequence[Sequence[int]],
                 in_hws: Sequence[HW], out_shape: Sequence[int], out_hw: tuple[int, int]):
        self.fn = fn
        self.shapes = [tuple(int(v) for v in s) for s in in_shapes]
        self.hws = list(in_hws)
        oh, ow = int(out_shape[out_hw[0]]), int(out_shape[out_hw[1]])
        self.flags = []
        for s, hw in zip(self.shapes, self.hws):
            if hw is None:
                self.flags.append((False, False))
            else:
                self.flags.append((s[hw[0]] != 1 and s[hw[0]] == oh,
                                   s[hw[1]] != 1 and s[hw[1]] == ow))

    def in_regions(self, out_r):
        out = []
        for s, hw, (ch, cw) in zip(self.shapes, self.hws, self.flags):
            if hw is None:     # a vector, or a constant that broadcasts: all of it
                out.append(Region.full(s) if len(s) >= 2 else Region(0, 1, 0, 1))
                continue
            out.append(Region(out_r.h0 if ch else 0, out_r.h1 if ch else s[hw[0]],
                              out_r.w0 if cw else 0, out_r.w1 if cw else s[hw[1]]))
        return out

    def compute(self, inputs, out_r):
        args = []
        for (t, held), hw, (ch, cw), want in zip(inputs, self.hws, self.flags,
                                                 self.in_regions(out_r)):
            whole = hw is None or held is None or not (ch or cw)
            args.append(t if whole else crop_axes(t, held, want, hw))
        return self.fn(*args)
