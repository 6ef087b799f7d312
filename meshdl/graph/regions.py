"""Region algebra: for each spatial op, which input region an output tile needs,
and how to compute exactly that tile from a (possibly larger) held input region.

A rule is an object with
- ``in_regions(out_r) -> list[Region]``: the region of each tensor input needed for
  output region ``out_r`` (clipped to the input's extent);
- ``compute(inputs, out_r) -> Tensor``: ``inputs`` is a list of (tensor, held_region)
  whose held regions contain what ``in_regions`` asked for; the result is exactly
  ``out_r`` of the op's output.

Zero (or -inf, or the F.pad value) padding is applied only where a window crosses
the true border of the feature map; everywhere else the halo is real data.
Adding an op = writing one rule class and registering it in ``trace.classify``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from meshdl.graph.plan import Region

Held = tuple[torch.Tensor, Region]


def crop(t: torch.Tensor, held: Region, want: Region) -> torch.Tensor:
    """The part ``want`` of a tensor that holds region ``held`` (a view, no copy)."""
    if held == want:
        return t
    r = want.relative_to(held)
    return t[..., r.h0:r.h1, r.w0:r.w1]


def pad_border(x: torch.Tensor, left: int, right: int, top: int, bottom: int,
               value: float = 0.0) -> torch.Tensor:
    """Constant padding of the last two dims. Same result as ``F.pad(x, (left, right,
    top, bottom), value=value)`` for non-negative pads, but an allocation plus copies:
    F.pad on a cropped view is over 10x slower here, and tiles are cropped views."""
    if not (left or right or top or bottom):
        return x
    *lead, h, w = x.shape
    out = x.new_empty((*lead, h + top + bottom, w + left + right))
    if top:
        out[..., :top, :] = value
    if bottom:
        out[..., top + h:, :] = value
    if left:
        out[..., top:top + h, :left] = value
    if right:
        out[..., top:top + h, left + w:] = value
    out[..., top:top + h, left:left + w] = x
    return out


def clip_span(start: int, end: int, size: int) -> tuple[int, int, int, int]:
    """Split the span [start, end) over an axis of ``size`` into the real part [lo, hi)
    and the padding before and after it (a span may lie wholly in padding)."""
    lo = min(max(start, 0), size)
    hi = max(min(max(end, 0), size), lo)
    pad_before = min(max(0, start), end) - start
    pad_after = end - max(min(size, end), start)
    return lo, hi, pad_before, pad_after


@dataclass(frozen=True)
class Axis:
    """One spatial axis of a sliding-window op: kernel, stride, dilation, pad before."""

    k: int
    s: int
    d: int
    p: int      # padding before (top or left)
    size: int   # input extent along this axis

    def window(self, o0: int, o1: int) -> tuple[int, int]:
        """Unclipped input span [start, end) feeding outputs [o0, o1)."""
        return o0 * self.s - self.p, (o1 - 1) * self.s - self.p + self.d * (self.k - 1) + 1

    def clip(self, o0: int, o1: int) -> tuple[int, int, int, int]:
        """(lo, hi, pad_before, pad_after): the real input span and the border padding."""
        return clip_span(*self.window(o0, o1), self.size)


class Rule:
    """Base rule: spatial ops override; ``spatial = False`` marks ops that end a run."""

    spatial = True
    reduce = None       # a ReduceSpec on global reductions (ReduceRule)

    def in_regions(self, out_r: Region) -> list[Region]:
        raise NotImplementedError

    def compute(self, inputs: Sequence[Held], out_r: Region) -> torch.Tensor:
        raise NotImplementedError


class WindowRule(Rule):
    """Sliding-window ops: convolutions and pooling."""

    pad_value = 0.0

    def __init__(self, in_shape: Sequence[int], k, s, d, p):
        h, w = int(in_shape[-2]), int(in_shape[-1])
        self.ah = Axis(k[0], s[0], d[0], p[0], h)
        self.aw = Axis(k[1], s[1], d[1], p[1], w)

    def _spans(self, out_r: Region):
        return self.ah.clip(out_r.h0, out_r.h1), self.aw.clip(out_r.w0, out_r.w1)

    def in_regions(self, out_r: Region) -> list[Region]:
        (h0, h1, _, _), (w0, w1, _, _) = self._spans(out_r)
        return [Region(h0, h1, w0, w1)]

    def _padded(self, inputs: Sequence[Held], out_r: Region):
        """Cropped input and (top, bottom, left, right) border padding still to apply."""
        (h0, h1, pt, pb), (w0, w1, pl, pr) = self._spans(out_r)
        t, held = inputs[0]
        return crop(t, held, Region(h0, h1, w0, w1)), (pt, pb, pl, pr)

    def compute(self, inputs: Sequence[Held], out_r: Region) -> torch.Tensor:
        x, (pt, pb, pl, pr) = self._padded(inputs, out_r)
        if pt == pb and pl == pr and self.pad_value == 0.0:
            return self.kernel(x, (pt, pl))           # the op pads symmetrically itself
        return self.kernel(pad_border(x, pl, pr, pt, pb, self.pad_value), (0, 0))

    def kernel(self, x: torch.Tensor, padding: tuple[int, int]) -> torch.Tensor:
        raise NotImplementedError


class ConvRule(WindowRule):
    def __init__(self, in_shape, weight, bias, stride, pad_before, dilation, groups):
        super().__init__(in_shape, tuple(weight.shape[-2:]), stride, dilation, pad_before)
        self.weight, self.bias, self.groups = weight, bias, groups
        self.stride, self.dilation = tuple(stride), tuple(dilation)

    def kernel(self, x, padding):
        return F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation,
                        self.groups)


class MaxPoolRule(WindowRule):
    pad_value = float("-inf")

    def __init__(self, in_shape, k, s, p, d):
        super().__init__(in_shape, k, s, d, p)
        self.k, self.s, self.d = k, s, d

    def compute(self, inputs, out_r):
        x, (pt, pb, pl, pr) = self._padded(inputs, out_r)
        x = pad_border(x, pl, pr, pt, pb, float("-inf"))
        return F.max_pool2d(x, self.k, self.s, 0, self.d)


class AvgPoolRule(WindowRule):
    """Average pooling: a window sum over zero padding, divided by PyTorch's own divisor
    (count_include_pad and ceil_mode decide it per output position)."""

    def __init__(self, in_shape, k, s, p, ceil_mode, count_include_pad, divisor_override):
        super().__init__(in_shape, k, s, (1, 1), p)
        self.k, self.s = k, s
        self.pad = p
        self.include_pad, self.override = count_include_pad, divisor_override

    def _counts(self, axis: Axis, o0: int, o1: int, pad: int) -> torch.Tensor:
        out = []
        for o in range(o0, o1):
            start = o * axis.s - pad
            end = min(start + axis.k, axis.size + pad)
            if self.include_pad:
                out.append(end - start)
            else:
                out.append(min(end, axis.size) - max(start, 0))
        return torch.tensor(out, dtype=torch.float32)

    def compute(self, inputs, out_r):
        x, (pt, pb, pl, pr) = self._padded(inputs, out_r)
        x = pad_border(x, pl, pr, pt, pb)
        summed = F.avg_pool2d(x, self.k, self.s, 0, False, True, divisor_override=1)
        if self.override:
            return summed / self.override
        rows = self._counts(self.ah, out_r.h0, out_r.h1, self.pad[0])
        cols = self._counts(self.aw, out_r.w0, out_r.w1, self.pad[1])
        return summed / (rows[:, None] * cols[None, :]).to(summed.dtype)


class PadRule(Rule):
    """Constant padding (ZeroPad2d, ConstantPad2d, F.pad constant): a shift plus a fill."""

    def __init__(self, in_shape, left, right, top, bottom, value=0.0):
        self.h, self.w = int(in_shape[-2]), int(in_shape[-1])
        self.top, self.left, self.value = top, left, value

    def _span(self, o0, o1, before, size):
        return clip_span(o0 - before, o1 - before, size)

    def in_regions(self, out_r):
        h0, h1, _, _ = self._span(out_r.h0, out_r.h1, self.top, self.h)
        w0, w1, _, _ = self._span(out_r.w0, out_r.w1, self.left, self.w)
        return [Region(h0, h1, w0, w1)]

    def compute(self, inputs, out_r):
        h0, h1, pt, pb = self._span(out_r.h0, out_r.h1, self.top, self.h)
        w0, w1, pl, pr = self._span(out_r.w0, out_r.w1, self.left, self.w)
        t, held = inputs[0]
        return pad_border(crop(t, held, Region(h0, h1, w0, w1)), pl, pr, pt, pb, self.value)


def _axis_flags(s: Sequence[int], out_shape: Sequence[int] | None) -> tuple[bool, bool]:
    """(crop rows, crop columns) of an input of shape ``s`` broadcast to the output:
    an axis of size 1 (or absent) broadcasts and is read whole."""
    oh = int(out_shape[-2]) if out_shape is not None and len(out_shape) >= 2 else None
    ow = int(out_shape[-1]) if out_shape is not None and len(out_shape) >= 1 else None
    ch = len(s) >= 2 and int(s[-2]) != 1 and (oh is None or int(s[-2]) == oh)
    cw = len(s) >= 2 and int(s[-1]) != 1 and (ow is None or int(s[-1]) == ow)
    return ch, cw


class PointwiseRule(Rule):
    """Elementwise and channel-only ops (activations, batch norm in eval, add, mul, cat
    and split along channels, channel shuffles, ...): ``fn(*crops) == crop(fn(*x))``.

    ``fn(*tensors)`` applies the op; an input axis of size 1 broadcasts and is passed
    whole; all other axes are cropped to the output region.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], in_shapes: Sequence[Sequence[int]],
                 out_shape: Sequence[int] | None = None):
        self.fn = fn
        self.shapes = [tuple(s) for s in in_shapes]
        self.flags = [_axis_flags(s, out_shape) for s in self.shapes]
        self.broadcast = [not (ch or cw) for ch, cw in self.flags]

    def in_regions(self, out_r):
        out = []
        for s, (ch, cw) in zip(self.shapes, self.flags):
            if len(s) < 2:
                out.append(Region(0, 1, 0, 1))
                continue
            out.append(Region(out_r.h0 if ch else 0, out_r.h1 if ch else int(s[-2]),
                              out_r.w0 if cw else 0, out_r.w1 if cw else int(s[-1])))
        return out

    def compute(self, inputs, out_r):
        args = []
        for (t, held), (ch, cw), want in zip(inputs, self.flags, self.in_regions(out_r)):
            args.append(t if not (ch or cw) or held is None else crop(t, held, want))
        return self.fn(*args)


class ReshapeRule(Rule):
    """A reshape that keeps H, W as the last two dims (channel shuffle's view, flatten
    of channel groups, unsqueeze, ...): the crop is reshaped to the tile's size."""

    def __init__(self, out_shape: Sequence[int]):
        self.lead = tuple(int(v) for v in out_shape[:-2])

    def in_regions(self, out_r):
        return [out_r]

    def compute(self, inputs, out_r):
        t, held = inputs[0]
        return crop(t, held, out_r).reshape(*self.lead, out_r.rows, out_r.cols)


class ConstRule(Rule):
    """A constant (parameter, buffer, or an expression of them) with spatial extent:
    cropped to the tile like any input."""

    def __init__(self, value: torch.Tensor):
        self.value = value

    def in_regions(self, out_r):
        return []

    def compute(self, inputs, out_r):
        return self.value[..., out_r.h0:out_r.h1, out_r.w0:out_r.w1]


class ReduceRule(Rule):
    """A global reduction over the feature map (global pooling, mean over H and W, ...).
    Not tileable as such: inside a stage it becomes a reduce point (each tile reduces
    the part of the map it owns, partials are combined, see ``graph.phased``)."""

    spatial = False
    reason = "global"

    def __init__(self, spec):
        self.reduce = spec


class UpsampleNearestRule(Rule):
    """Nearest-neighbour upsampling by integer factors."""

    def __init__(self, in_shape, fh: int, fw: int):
        self.fh, self.fw = fh, fw
        self.h, self.w = int(in_shape[-2]), int(in_shape[-1])

    def in_regions(self, out_r):
        return [Region(out_r.h0 // self.fh, (out_r.h1 - 1) // self.fh + 1,
                       out_r.w0 // self.fw, (out_r.w1 - 1) // self.fw + 1)]

    def compute(self, inputs, out_r):
        (src,) = self.in_regions(out_r)
        t, held = inputs[0]
        x = crop(t, held, src)
        y = x.repeat_interleave(self.fh, dim=-2).repeat_interleave(self.fw, dim=-1)
        oh, ow = out_r.h0 - src.h0 * self.fh, out_r.w0 - src.w0 * self.fw
        return y[..., oh:oh + out_r.rows, ow:ow + out_r.cols]


class NotSpatial(Rule):
    """An op that ends a spatial run: global reach, or an op meshdl cannot tile."""

    spatial = False
    reduce = None

    def __init__(self, reason: str):
        self.reason = reason
