"""ONNX layer ops (conv, norm, pooling, dense, reductions, pad, resize) for
:mod:`meshdl.models.onnx_ops`."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from meshdl.models.onnx_import import Dyn, example
from meshdl.models.onnx_ops import _axes, _fail, ints, op, rank, shape

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONVT = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _pads(b, attrs, in_spatial, kernel, strides, dilations, ceil: bool = False):
    """ONNX pads/auto_pad -> (begin, end) per spatial dim."""
    n = len(kernel)
    auto = attrs.get("auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for size, k, s, d in zip(in_spatial, kernel, strides, dilations):
            out = -(-size // s)
            total = max(0, (out - 1) * s + (k - 1) * d + 1 - size)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return begin, end
    if auto == "VALID":
        return [0] * n, [0] * n
    pads = list(attrs.get("pads", [0] * (2 * n)))
    return pads[:n], pads[n:]


def _spatial_attrs(x, w_shape, attrs):
    n = rank(x) - 2
    kernel = list(attrs.get("kernel_shape") or w_shape)
    strides = list(attrs.get("strides") or [1] * n)
    dilations = list(attrs.get("dilations") or [1] * n)
    return n, kernel, strides, dilations


def _torch_pad(begin, end) -> list[int]:
    """(begin, end) per spatial dim (first dim first) -> F.pad order (last dim first)."""
    out: list[int] = []
    for bb, ee in zip(reversed(begin), reversed(end)):
        out += [bb, ee]
    return out


@op("Conv")
def _conv(b, args, attrs, **_):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    if isinstance(w, Dyn):
        raise _fail(b, "Conv with weights computed from the input is not supported")
    n, kernel, strides, dilations = _spatial_attrs(x, list(w.shape[2:]), attrs)
    if n not in _CONV:
        raise _fail(b, f"{n}-D convolution is not supported")
    begin, end = _pads(b, attrs, shape(x)[2:], kernel, strides, dilations)
    if begin != end:
        x = b.call(F.pad, x, _torch_pad(begin, end))
        pad = [0] * n
    else:
        pad = begin
    pad_arg = tuple(pad) if n > 1 else pad[0]
    return b.call(_CONV[n], x, w, bias, tuple(strides), pad_arg, tuple(dilations),
                  int(attrs.get("group", 1)))


@op("ConvTranspose")
def _conv_t(b, args, attrs, **_):
    x, w = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    n, kernel, strides, dilations = _spatial_attrs(x, list(w.shape[2:]), attrs)
    if n not in _CONVT or attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID") \
            or "output_shape" in attrs:
        raise _fail(b, "this ConvTranspose form (auto_pad SAME / output_shape) is not "
                    "supported")
    begin, end = _pads(b, attrs, shape(x)[2:], kernel, strides, dilations)
    outpad = list(attrs.get("output_padding") or [0] * n)
    extra = [e - bb for bb, e in zip(begin, end)]
    if any(v < 0 for v in extra):
        raise _fail(b, "ConvTranspose with begin pads larger than end pads")
    y = b.call(_CONVT[n], x, w, bias, tuple(strides), tuple(begin),
               tuple(o for o in outpad), int(attrs.get("group", 1)), tuple(dilations))
    if any(extra):                   # crop the extra end padding
        idx = (slice(None), slice(None)) + tuple(
            slice(0, shape(y)[2 + i] - extra[i]) for i in range(n))
        import operator
        y = b.call(operator.getitem, y, idx)
    return y


@op("BatchNormalization")
def _bn(b, args, attrs, **_):
    x, scale, bias, mean, var = args[:5]
    return b.call(F.batch_norm, x, mean, var, scale, bias, False, 0.0,
                  float(attrs.get("epsilon", 1e-5)))


@op("InstanceNormalization")
def _instance_norm(b, args, attrs, **_):
    x, scale, bias = args
    return b.call(F.instance_norm, x, None, None, scale, bias, eps=float(attrs.get("epsilon", 1e-5)))


@op("LayerNormalization")
def _layer_norm(b, args, attrs, **_):
    x, scale = args[0], args[1]
    bias = args[2] if len(args) > 2 else None
    axis = attrs.get("axis", -1) % rank(x)
    return b.call(F.layer_norm, x, shape(x)[axis:], scale, bias,
                  float(attrs.get("epsilon", 1e-5)))


@op("LRN")
def _lrn(b, args, attrs, **_):
    return b.call(F.local_response_norm, args[0], int(attrs["size"]),
                  float(attrs.get("alpha", 1e-4)), float(attrs.get("beta", 0.75)),
                  float(attrs.get("bias", 1.0)))


def _pool_prepare(b, x, attrs, pad_value: float):
    n, kernel, strides, dilations = _spatial_attrs(x, None, attrs)
    begin, end = _pads(b, attrs, shape(x)[2:], kernel, strides, dilations)
    return n, kernel, strides, dilations, begin, end


@op("MaxPool")
def _maxpool(b, args, attrs, node, **_):
    x = args[0]
    if len(node.output) > 1 and node.output[1]:
        raise _fail(b, "MaxPool with an Indices output is not supported")
    n, kernel, strides, dilations, begin, end = _pool_prepare(b, x, attrs, -math.inf)
    ceil = bool(attrs.get("ceil_mode", 0))
    if n != 2:
        fn = {1: F.max_pool1d, 3: F.max_pool3d}[n]
    else:
        fn = F.max_pool2d
    sym = begin == end and all(p <= k // 2 for p, k in zip(begin, kernel))
    if not sym:
        x = b.call(F.pad, x, _torch_pad(begin, end), "constant", -math.inf)
        begin = [0] * n
    return b.call(fn, x, tuple(kernel), tuple(strides), tuple(begin), tuple(dilations), ceil)


@op("AveragePool")
def _avgpool(b, args, attrs, **_):
    x = args[0]
    n, kernel, strides, dilations, begin, end = _pool_prepare(b, x, attrs, 0.0)
    ceil = bool(attrs.get("ceil_mode", 0))
    include = bool(attrs.get("count_include_pad", 0))
    if any(d != 1 for d in dilations):
        raise _fail(b, "AveragePool with dilations is not supported")
    fn = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}.get(n)
    if fn is None:
        raise _fail(b, f"{n}-D AveragePool is not supported")
    sym = begin == end and all(p <= k // 2 for p, k in zip(begin, kernel))
    if sym:
        return b.call(fn, x, tuple(kernel), tuple(strides), tuple(begin), ceil, include)
    if include and not ceil:     # pads count: zero-pad, then pool with no padding
        x = b.call(F.pad, x, _torch_pad(begin, end))
        return b.call(fn, x, tuple(kernel), tuple(strides), 0, ceil, True)
    # asymmetric pads that do not count: sum over the window / number of real cells
    xp = b.call(F.pad, x, _torch_pad(begin, end))
    total = b.call(fn, xp, tuple(kernel), tuple(strides), 0, ceil, True)
    ones = torch.ones((1, 1, *shape(x)[2:]))
    count = fn(F.pad(ones, _torch_pad(begin, end)), tuple(kernel), tuple(strides), 0, ceil, True)
    import operator
    return b.call(operator.truediv, total, count)


@op("GlobalAveragePool")
def _gap(b, args, attrs, **_):
    x = args[0]
    if rank(x) == 4:
        return b.call(F.adaptive_avg_pool2d, x, 1)
    return b.call(torch.mean, x, tuple(range(2, rank(x))), keepdim=True)


@op("GlobalMaxPool")
def _gmp(b, args, attrs, **_):
    x = args[0]
    if rank(x) == 4:
        return b.call(F.adaptive_max_pool2d, x, 1)
    return b.call(torch.amax, x, tuple(range(2, rank(x))), keepdim=True)


_REDUCE = {"ReduceMean": torch.mean, "ReduceSum": torch.sum, "ReduceMax": torch.amax,
           "ReduceMin": torch.amin, "ReduceProd": None, "ReduceL2": None}


@op("ReduceProd", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp")
def _reduce_other(b, args, attrs, opset, node, **_):
    x = args[0]
    axes = _axes(b, args, attrs, opset)
    keep = bool(attrs.get("keepdims", 1))
    axes = tuple(sorted(a % rank(x) for a in (axes or range(rank(x)))))
    kind = node.op_type
    if kind == "ReduceProd":
        y = x
        for a in reversed(axes):
            y = b.call(torch.prod, y, a, keepdim=keep)
        return y
    if kind == "ReduceLogSumExp":
        return b.call(torch.logsumexp, x, axes, keepdim=keep)
    if kind == "ReduceL1":
        return b.call(torch.sum, b.call(torch.abs, x), axes, keepdim=keep)
    sq = b.call(torch.sum, b.call(torch.mul, x, x), axes, keepdim=keep)
    return sq if kind == "ReduceSumSquare" else b.call(torch.sqrt, sq)


@op("GroupNormalization")
def _group_norm(b, args, attrs, **_):
    x, scale, bias = args
    groups = int(attrs["num_groups"])
    c = shape(x)[1]
    s, t = example(scale), example(bias)
    if s.numel() == groups and groups != c:      # opset 18: one scale per group
        s = s.repeat_interleave(c // groups)
        t = t.repeat_interleave(c // groups)
    return b.call(F.group_norm, x, groups, s, t, float(attrs.get("epsilon", 1e-5)))


@op("ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin")
def _reduce(b, args, attrs, opset, node, **_):
    x = args[0]
    axes = _axes(b, args, attrs, opset)
    keep = bool(attrs.get("keepdims", 1))
    if not axes:
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = list(range(rank(x)))
    axes = tuple(sorted(a % rank(x) for a in axes))
    if node.op_type == "ReduceMean" and rank(x) == 4 and axes == (2, 3) and keep:
        return b.call(F.adaptive_avg_pool2d, x, 1)
    return b.call(_REDUCE[node.op_type], x, axes, keepdim=keep)


@op("Gemm")
def _gemm(b, args, attrs, **_):
    a, w = args[0], args[1]
    c = args[2] if len(args) > 2 else None
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if attrs.get("transA", 0):
        a = b.method("t", a)
    if isinstance(w, torch.Tensor):
        w = w if attrs.get("transB", 0) else w.t().contiguous()
        if alpha != 1.0:
            w = w * alpha
        if isinstance(c, torch.Tensor):
            c = c * beta if beta != 1.0 else c
            if c.dim() == 2 and c.shape[0] == 1:
                c = c.reshape(-1)
            if c.dim() <= 1:
                return b.call(F.linear, a, w, c.expand(w.shape[0]).contiguous())
        y = b.call(F.linear, a, w)
    else:
        wt = b.method("t", w) if attrs.get("transB", 0) else w
        y = b.call(torch.matmul, a, wt)
        if alpha != 1.0:
            import operator
            y = b.call(operator.mul, y, alpha)
    if c is not None:
        import operator
        y = b.call(operator.add, y, c if beta == 1.0 else b.call(operator.mul, c, beta))
    return y


@op("MatMul")
def _matmul(b, args, attrs, **_):
    a, w = args
    if isinstance(w, torch.Tensor) and w.dim() == 2 and isinstance(a, Dyn):
        return b.call(F.linear, a, w.t().contiguous())
    return b.call(torch.matmul, a, w)


@op("Pad")
def _pad(b, args, attrs, opset, **_):
    x = args[0]
    r = rank(x)
    if opset < 11:
        pads, value = list(attrs["pads"]), float(attrs.get("value", 0.0))
        axes = list(range(r))
    else:
        pads = ints(b, args[1], "pads")
        value = example(args[2]).item() if len(args) > 2 and args[2] is not None else 0.0
        axes = ints(b, args[3], "axes") if len(args) > 3 and args[3] is not None \
            else list(range(r))
    axes = [a % r for a in axes]
    k = len(axes)
    begin, end = [0] * r, [0] * r
    for i, a in enumerate(axes):
        begin[a], end[a] = pads[i], pads[k + i]
    first = next((i for i in range(r) if begin[i] or end[i]), r)
    tp = _torch_pad(begin[first:], end[first:]) if first < r else [0, 0]
    mode = attrs.get("mode", "constant")
    if mode == "constant":
        return b.call(F.pad, x, tp, "constant", float(value))
    tmode = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}.get(mode)
    if tmode is None:
        raise _fail(b, f"Pad mode {mode!r} is not supported")
    return b.call(F.pad, x, tp, tmode)


@op("Resize", "Upsample")
def _resize(b, args, attrs, opset, node, **_):
    x = args[0]
    s = shape(x)
    sizes = None
    if node.op_type == "Upsample":
        scales = [float(v) for v in (attrs.get("scales") or example(args[1]).tolist())]
    else:
        scale_arg = args[2] if len(args) > 2 else (args[1] if opset == 10 else None)
        scales = [float(v) for v in example(scale_arg).tolist()] \
            if scale_arg is not None and example(scale_arg).numel() else None
        if len(args) > 3 and args[3] is not None and example(args[3]).numel():
            sizes = ints(b, args[3], "sizes")
    if sizes is None:
        if scales is None:
            raise _fail(b, "Resize without scales or sizes")
        sizes = [int(math.floor(d * f)) for d, f in zip(s, scales)]
    if list(sizes[:2]) != list(s[:2]):
        raise _fail(b, "Resize of the batch or channel dimension is not supported")
    mode = attrs.get("mode", "nearest")
    out = tuple(sizes[2:])
    if mode == "nearest":
        integral = all(o % i == 0 for o, i in zip(out, s[2:]))
        ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
        if integral or ctm == "asymmetric":
            return b.call(F.interpolate, x, out, None, "nearest")
        return b.call(F.interpolate, x, out, None, "nearest-exact")
    if mode in ("linear", "bilinear", "cubic"):
        tmode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(out)] if mode != "cubic" \
            else "bicubic"
        ctm = attrs.get("coordinate_transformation_mode", "half_pixel")
        align = ctm == "align_corners"
        if ctm not in ("half_pixel", "pytorch_half_pixel", "align_corners"):
            raise _fail(b, f"Resize coordinate_transformation_mode={ctm!r} not supported")
        return b.call(F.interpolate, x, out, None, tmode, align)
    raise _fail(b, f"Resize mode {mode!r} is not supported")


@op("DepthToSpace", "SpaceToDepth")
def _depth_space(b, args, attrs, node, **_):
    bs = int(attrs["blocksize"])
    if node.op_type == "SpaceToDepth":
        return b.call(F.pixel_unshuffle, args[0], bs)
    if attrs.get("mode", "DCR") == "CRD":
        return b.call(F.pixel_shuffle, args[0], bs)
    n, c, h, w = shape(args[0])
    y = b.method("reshape", args[0], (n, bs, bs, c // (bs * bs), h, w))
    y = b.method("permute", y, 0, 3, 4, 1, 5, 2)
    return b.method("reshape", y, (n, c // (bs * bs), h * bs, w * bs))


@op("ArgMax", "ArgMin")
def _argmax(b, args, attrs, node, **_):
    fn = torch.argmax if node.op_type == "ArgMax" else torch.argmin
    return b.call(fn, args[0], attrs.get("axis", 0), bool(attrs.get("keepdims", 1)))
