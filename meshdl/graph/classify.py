"""Classify one traced fx node: its kind, its region rule, its FLOPs and weight bytes.

``classify(node, module, in_shapes, out_shape, args)`` returns an ``OpInfo``. To teach
meshdl a new op, add a branch here (and a rule in ``regions`` if it is spatial).
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from meshdl.graph import regions as R
from meshdl.graph.classify_dims import channel_local, global_reduce, op_name


@dataclass
class OpInfo:
    kind: str
    rule: R.Rule
    flops: float
    weight_bytes: int


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return (int(v[0]), int(v[-1])) if len(v) else (1, 1)
    return int(v), int(v)


def _numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if shape else 1


def _param_bytes(module: nn.Module) -> int:
    n = sum(p.numel() * p.element_size() for p in module.parameters(recurse=True))
    n += sum(b.numel() * b.element_size() for b in module.buffers(recurse=True))
    return int(n)


_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
                nn.Mish, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh,
                nn.Softplus, nn.PReLU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout,
                nn.BatchNorm2d, nn.Threshold, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink,
                nn.RReLU, nn.Hardshrink, nn.Softshrink, nn.BatchNorm3d, nn.BatchNorm1d,
                nn.Dropout1d, nn.Dropout3d, nn.FeatureAlphaDropout, nn.GLU)

_ACT_FUNCTIONS = {F.relu, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish,
                  F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh, F.softplus,
                  F.dropout, F.dropout2d, torch.relu, torch.sigmoid, torch.tanh, torch.clamp,
                  torch.clip, torch.abs, torch.neg, torch.exp, torch.sqrt, F.relu_,
                  torch.nn.functional.batch_norm}

_BINARY = {operator.add: "add", operator.mul: "mul", operator.sub: "sub",
           operator.truediv: "div", operator.iadd: "add", operator.imul: "mul",
           torch.add: "add", torch.mul: "mul", torch.sub: "sub", torch.div: "div",
           torch.maximum: "maximum", torch.minimum: "minimum"}

# elementwise ops by torch name (functions of torch / F / operator, and Tensor methods)
POINTWISE_NAMES = {
    "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "gelu", "silu", "mish", "sigmoid",
    "tanh", "hardswish", "hardsigmoid", "hardtanh", "softplus", "softsign", "logsigmoid",
    "tanhshrink", "hardshrink", "softshrink", "threshold", "rrelu", "prelu", "dropout",
    "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
    "clamp", "clip", "clamp_min", "clamp_max", "abs", "neg", "exp", "expm1", "log", "log1p",
    "log2", "sqrt", "rsqrt", "square", "pow", "reciprocal", "sign", "floor", "ceil", "round",
    "trunc", "frac", "erf", "erfc", "sin", "cos", "add", "sub", "rsub", "mul", "div",
    "true_divide", "floor_divide", "maximum", "minimum", "fmax", "fmin", "where",
    "masked_fill", "lerp", "addcmul", "addcdiv", "contiguous", "clone", "detach", "float",
    "double", "half", "bfloat16", "to", "type_as", "nan_to_num", "logit", "heaviside",
    "batch_norm", "truediv", "mod", "neg", "pos", "abs", "eq", "ne", "lt", "le", "gt", "ge",
    "logical_and", "logical_or", "logical_not", "bitwise_and", "bitwise_or", "xlogy",
    "hypot", "atan2", "sinh", "cosh", "asinh", "acosh", "atanh", "sgn", "exp2",
}
_POINTWISE_METHODS = {n for n in POINTWISE_NAMES} | {
    "relu_", "sigmoid_", "tanh_", "clamp_", "add_", "mul_", "hardtanh_"}

_GLOBAL_FUNCTIONS = {torch.flatten: "flatten", F.linear: "linear", F.softmax: "softmax",
                     torch.softmax: "softmax", F.log_softmax: "log_softmax",
                     F.adaptive_avg_pool2d: "adaptive_avgpool2d", torch.mean: "mean",
                     torch.matmul: "matmul", F.adaptive_max_pool2d: "adaptive_maxpool2d"}
_GLOBAL_METHODS = {"view": "view", "reshape": "reshape", "flatten": "flatten", "mean": "mean",
                   "softmax": "softmax", "permute": "permute", "transpose": "transpose",
                   "squeeze": "squeeze", "unsqueeze": "unsqueeze", "sum": "sum"}


def _is_4d(shape) -> bool:
    return shape is not None and len(shape) == 4


def _not_spatial(kind: str, reason: str, flops: float, wbytes: int = 0) -> OpInfo:
    return OpInfo(kind, R.NotSpatial(reason), flops, wbytes)


def _pointwise(kind: str, fn: Callable, in_shapes, out_shape, flops_per=1.0, wbytes=0):
    """A pointwise op is spatial when its output is a feature map (H, W its last two
    dims) and every input either matches the output along H and W or broadcasts (size
    1) along them."""
    ok = out_shape is not None and len(out_shape) >= 3 and all(
        s is not None and _broadcasts(s, out_shape) for s in in_shapes)
    flops = flops_per * _numel(out_shape) if out_shape else 0.0
    if not ok:
        reason = "global"
        if out_shape is not None and len(out_shape) >= 3:
            reason = f"{kind} of tensors that do not broadcast tile by tile over H, W"
        return _not_spatial(kind, reason, flops, wbytes)
    return OpInfo(kind, R.PointwiseRule(fn, [s or () for s in in_shapes], out_shape),
                  flops, wbytes)


def _broadcasts(s, out_shape) -> bool:
    if len(s) == 0:
        return True
    if len(s) == 1:
        return int(s[0]) == 1
    return all(int(a) in (1, int(b)) for a, b in zip(s[-2:], out_shape[-2:]))


def _local(kind: str, how: str | None, call, in_shapes, out_shape) -> OpInfo | None:
    """A channel-only op's OpInfo (None when ``how`` says it is not one)."""
    if how == "reshape" and len(in_shapes) == 1:
        return OpInfo(kind, R.ReshapeRule(out_shape), 0.0, 0)
    if how == "local":
        info = _pointwise(kind, call, in_shapes, out_shape, 1.0)
        return info if info.rule.spatial else None
    return None


def _reduce(kind: str, spec, in_shape) -> OpInfo:
    return OpInfo(kind, R.ReduceRule(spec), float(_numel(in_shape)), 0)


def _conv_pads(padding, k, d) -> tuple[int, int]:
    """Padding before (top, left); 'same' pads asymmetrically like PyTorch does."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0
        return tuple((dd * (kk - 1)) // 2 for kk, dd in zip(k, d))  # 'same'
    return _pair(padding)


def _conv(in_shape, out_shape, weight, bias, stride, padding, dilation, groups, wbytes):
    k = tuple(int(v) for v in weight.shape[-2:])
    d = _pair(dilation)
    cin_per_group = int(weight.shape[1])
    flops = 2.0 * _numel(out_shape) * cin_per_group * k[0] * k[1]
    rule = R.ConvRule(in_shape, weight, bias, _pair(stride), _conv_pads(padding, k, d), d,
                      int(groups))
    return OpInfo("conv2d", rule, flops, wbytes)


def classify_module(m: nn.Module, in_shapes, out_shape, call: Callable) -> OpInfo:
    wbytes = _param_bytes(m)
    if type(m).__name__ == "WholeModel" and hasattr(m, "reason"):
        return _not_spatial("whole_model", str(m.reason), 0.0, wbytes)
    x_shape = in_shapes[0] if in_shapes else None
    spec = global_reduce(None, (), {}, x_shape or (), out_shape or (), module=m)
    if spec is not None and len(in_shapes) == 1:
        return _reduce(type(m).__name__.lower(), spec, x_shape)
    x_shape = in_shapes[0] if in_shapes else None
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            return _not_spatial("conv2d", f"conv with padding_mode={m.padding_mode!r}",
                                2.0 * _numel(out_shape) * m.weight[0].numel(), wbytes)
        return _conv(x_shape, out_shape, m.weight, m.bias, m.stride, m.padding, m.dilation,
                     m.groups, wbytes)
    if isinstance(m, nn.MaxPool2d):
        if m.return_indices:
            return _not_spatial("maxpool2d", "max pooling that returns indices", 0, 0)
        k = _pair(m.kernel_size)
        s = _pair(m.stride if m.stride is not None else m.kernel_size)
        rule = R.MaxPoolRule(x_shape, k, s, _pair(m.padding), _pair(m.dilation))
        return OpInfo("maxpool2d", rule, float(_numel(out_shape) * k[0] * k[1]), 0)
    if isinstance(m, nn.AvgPool2d):
        k = _pair(m.kernel_size)
        s = _pair(m.stride if m.stride is not None else m.kernel_size)
        rule = R.AvgPoolRule(x_shape, k, s, _pair(m.padding), m.ceil_mode,
                             m.count_include_pad, m.divisor_override)
        return OpInfo("avgpool2d", rule, float(_numel(out_shape) * k[0] * k[1]), 0)
    if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return _adaptive(m, x_shape, out_shape)
    if isinstance(m, (nn.ZeroPad2d, nn.ConstantPad2d)):
        left, right, top, bottom = m.padding
        value = float(getattr(m, "value", 0.0))
        if not _is_4d(out_shape):
            return _not_spatial("pad", "padding of a non-4D tensor", 0, 0)
        return OpInfo("pad", R.PadRule(x_shape, left, right, top, bottom, value), 0.0, 0)
    if isinstance(m, nn.Upsample) and m.mode == "nearest":
        return _upsample(x_shape, out_shape)
    if isinstance(m, _ACT_MODULES):
        kind = "batchnorm" if isinstance(m, nn.BatchNorm2d) else type(m).__name__.lower()
        per = 2.0 if isinstance(m, nn.BatchNorm2d) else 1.0
        return _pointwise(kind, call, in_shapes, out_shape, per, wbytes)
    if isinstance(m, (nn.ChannelShuffle, nn.LocalResponseNorm, nn.Softmax2d)) or (
            isinstance(m, (nn.Softmax, nn.LogSoftmax, nn.Softmin)) and m.dim is not None):
        name = {nn.ChannelShuffle: "channel_shuffle", nn.LocalResponseNorm:
                "local_response_norm"}.get(type(m), "softmax")
        dim = -3 if isinstance(m, nn.Softmax2d) else getattr(m, "dim", 1)
        info = _local(type(m).__name__.lower(),
                      channel_local(name, (None, dim) if name == "softmax" else (None,), {},
                                    x_shape or (), out_shape or ()),
                      call, in_shapes, out_shape)
        if info is not None:
            return info
    if isinstance(m, nn.Flatten) and x_shape is not None:
        info = _local("flatten", channel_local("flatten", (), {}, x_shape, out_shape or ()),
                      call, in_shapes, out_shape)
        if info is not None:
            return info
    if isinstance(m, nn.Linear):
        return _not_spatial("linear", "global", 2.0 * m.in_features * m.out_features
                            * (_numel(out_shape) // max(1, m.out_features)), wbytes)
    if isinstance(m, nn.Flatten):
        return _not_spatial("flatten", "global", 0.0, 0)
    if isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        return _not_spatial("softmax", "global", 3.0 * _numel(out_shape), 0)
    return _not_spatial(type(m).__name__.lower(),
                        f"unsupported module {type(m).__name__}", _numel(out_shape), wbytes)


def _adaptive(m, x_shape, out_shape) -> OpInfo:
    is_avg = isinstance(m, nn.AdaptiveAvgPool2d)
    kind = "adaptive_avgpool2d" if is_avg else "adaptive_maxpool2d"
    flops = float(_numel(x_shape)) if x_shape else 0.0
    if not (_is_4d(x_shape) and _is_4d(out_shape)):
        return _not_spatial(kind, "global", flops)
    (h, w), (oh, ow) = x_shape[-2:], out_shape[-2:]
    if (oh, ow) == (1, 1) or h % oh or w % ow:
        return _not_spatial(kind, "global", flops)
    k = (h // oh, w // ow)   # divides exactly: a plain pool with kernel = stride
    rule = (R.AvgPoolRule(x_shape, k, k, (0, 0), False, True, None) if is_avg
            else R.MaxPoolRule(x_shape, k, k, (0, 0), (1, 1)))
    return OpInfo(kind, rule, flops, 0)


def _upsample(x_shape, out_shape) -> OpInfo:
    if not (_is_4d(x_shape) and _is_4d(out_shape)):
        return _not_spatial("upsample", "upsampling of a non-4D tensor", 0)
    (h, w), (oh, ow) = x_shape[-2:], out_shape[-2:]
    if oh % h or ow % w:
        return _not_spatial("upsample", "nearest upsampling by a non-integer factor", 0)
    return OpInfo("upsample_nearest", R.UpsampleNearestRule(x_shape, oh // h, ow // w),
                  0.0, 0)


def classify_function(fn, args: tuple, kwargs: dict, in_shapes, out_shape,
                      call: Callable, is_tensor: Callable[[Any], bool]) -> OpInfo:
    """``args``/``kwargs`` hold real values (tensors or constants) from shape propagation."""
    name = getattr(fn, "__name__", str(fn))
    x_shape = in_shapes[0] if in_shapes else None
    if fn is F.conv2d:
        a = list(args) + [None] * 7
        w = kwargs.get("weight", a[1])
        b = kwargs.get("bias", a[2])
        stride = kwargs.get("stride", a[3] if a[3] is not None else 1)
        padding = kwargs.get("padding", a[4] if a[4] is not None else 0)
        dilation = kwargs.get("dilation", a[5] if a[5] is not None else 1)
        groups = kwargs.get("groups", a[6] if a[6] is not None else 1)
        wb = sum(t.numel() * t.element_size() for t in (w, b) if is_tensor(t))
        return _conv(x_shape, out_shape, w, b, stride, padding, dilation, groups, int(wb))
    if fn in (F.max_pool2d, F.avg_pool2d):
        spec = global_reduce(op_name(fn), args, kwargs, x_shape or (), out_shape or ())
        if spec is not None and len(in_shapes) == 1:
            return _reduce(op_name(fn), spec, x_shape)
        return _functional_pool(fn, args, kwargs, x_shape, out_shape)
    if fn is F.pad:
        pad = kwargs.get("pad", args[1] if len(args) > 1 else None)
        mode = kwargs.get("mode", args[2] if len(args) > 2 else "constant")
        value = kwargs.get("value", args[3] if len(args) > 3 else None) or 0.0
        if len(pad) >= 6 and all(int(v) == 0 for v in pad[:4]):
            info = _local("pad", channel_local("pad", args, kwargs, tuple(args[0].shape),
                                               out_shape), call, in_shapes, out_shape)
            if info is not None:
                return info
        if mode != "constant" or len(pad) != 4 or not out_shape or len(out_shape) < 3:
            return _not_spatial("pad", f"F.pad with mode={mode!r} over {len(pad)//2} dims", 0)
        left, right, top, bottom = (int(v) for v in pad)
        return OpInfo("pad", R.PadRule(x_shape, left, right, top, bottom, float(value)), 0, 0)
    if fn in (torch.cat, torch.concat, torch.stack):
        dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
        nd = len(out_shape) if out_shape else 0
        if nd >= 3 and isinstance(dim, int) and dim % nd < nd - 2:
            return _pointwise("cat" if fn is not torch.stack else "stack", call, in_shapes,
                              out_shape, 0.0)
        return _not_spatial("cat", f"concatenation along dim {dim}", 0)
    pname = op_name(fn)
    if fn in _BINARY:
        return _pointwise(_BINARY[fn], call, in_shapes, out_shape)
    if fn in _ACT_FUNCTIONS or (pname in POINTWISE_NAMES and not _reduces(pname, args)):
        return _pointwise(name, call, in_shapes, out_shape)
    if fn is F.interpolate:
        mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
        if mode == "nearest":
            return _upsample(x_shape, out_shape)
        return _not_spatial("interpolate", f"interpolate mode={mode!r}", _numel(out_shape))
    first = args[0] if args and is_tensor(args[0]) else None
    if first is not None:
        info = _dims_op(name, pname, args, kwargs, tuple(first.shape), in_shapes, out_shape,
                        call)
        if info is not None:
            return info
    if fn in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d):
        m = (nn.AdaptiveAvgPool2d if fn is F.adaptive_avg_pool2d else nn.AdaptiveMaxPool2d)(
            tuple(out_shape[-2:]) if _is_4d(out_shape) else 1)
        return _adaptive(m, x_shape, out_shape)
    if fn in _GLOBAL_FUNCTIONS:
        flops = _numel(out_shape)
        if fn in (F.linear, torch.matmul) and len(in_shapes) >= 2 and in_shapes[1]:
            flops = 2.0 * _numel(out_shape) * int(in_shapes[0][-1])
        return _not_spatial(_GLOBAL_FUNCTIONS[fn], _global_reason(pname, x_shape, out_shape),
                            flops)
    return _not_spatial(name, f"unsupported function {name}", _numel(out_shape))


def _reduces(name: str, args) -> bool:
    """max/min/... with one tensor argument reduce; with two they are elementwise."""
    return name in ("max", "min") and not (len(args) > 1 and isinstance(args[1], torch.Tensor))


def _spatial_slice(index, in_shape) -> tuple[int, int, int, int] | None:
    """``x[..., h0:h1, w0:w1]`` (steps of 1, other dims whole) as (top, bottom, left,
    right) rows/columns cut off: a crop, i.e. padding by negative amounts."""
    if not isinstance(index, tuple) or len(in_shape) < 3:
        return None
    full = slice(None, None, None)
    items = list(index)
    if Ellipsis in items:
        k = items.index(Ellipsis)
        items = [full] * (len(in_shape) - (len(items) - 1)) + items[k + 1:] \
            if k == 0 else items[:k] + [full] * (len(in_shape) - len(items) + 1) + items[k + 1:]
    if len(items) != len(in_shape) or any(i != full for i in items[:-2]):
        return None
    out = []
    for sl, n in zip(items[-2:], in_shape[-2:]):
        if not isinstance(sl, slice) or sl.step not in (None, 1):
            return None
        start, stop, _ = sl.indices(int(n))
        if stop <= start:
            return None
        out += [start, int(n) - stop]
    return out[0], out[1], out[2], out[3]


def _dims_op(kind, pname, args, kwargs, in_shape, in_shapes, out_shape, call) -> OpInfo | None:
    """Channel-only ops and global reductions, decided by the dims they touch."""
    if out_shape is None:
        return None
    if pname == "getitem" and len(in_shapes) == 1 and len(args) > 1:
        cut = _spatial_slice(args[1], in_shape)
        if cut is not None and cut != (0, 0, 0, 0):
            top, bottom, left, right = cut
            return OpInfo("slice", R.PadRule(in_shape, -left, -right, -top, -bottom), 0.0, 0)
    spec = global_reduce(pname, args, kwargs, in_shape, out_shape)
    if spec is not None and len(in_shapes) == 1:
        return _reduce(kind, spec, in_shape)
    how = channel_local(pname, args, kwargs, in_shape, out_shape)
    return _local(kind, how, call, in_shapes, out_shape)


def _global_reason(name: str | None, x_shape, out_shape) -> str:
    """Flattening a map into a vector (a classifier head) is a known global op; any
    other reshuffle of the spatial dims is named as such."""
    if name in ("view", "reshape", "flatten", "permute", "transpose", "squeeze",
                "unsqueeze", "movedim", "swapaxes", "unflatten") and x_shape is not None \
            and len(x_shape) >= 3 and out_shape is not None and len(out_shape) > 2:
        return f".{name}() that moves or merges the spatial dims H, W"
    return "global"


def classify_item(producer: str | None, args, kwargs, in_shape, in_shapes, out_shape,
                  call: Callable) -> OpInfo:
    """One element of a tuple-returning op (chunk, split, max over a dim, sort, ...)."""
    kind = f"{producer}[i]"
    how = channel_local(producer, args, kwargs, in_shape, out_shape) \
        if producer and in_shape else None
    info = _local(kind, how, call, in_shapes, out_shape) if how == "local" else None
    if info is not None:
        return info
    return _not_spatial(kind, f"unsupported tuple op {producer}", _numel(out_shape))


def _functional_pool(fn, args, kwargs, x_shape, out_shape) -> OpInfo:
    names = (["input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
              "return_indices"] if fn is F.max_pool2d else
             ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad",
              "divisor_override"])
    v = dict(zip(names, args))
    v.update(kwargs)
    k = _pair(v["kernel_size"])
    s = _pair(v.get("stride") or v["kernel_size"])
    p = _pair(v.get("padding", 0))
    flops = float(_numel(out_shape) * k[0] * k[1])
    if fn is F.max_pool2d:
        if v.get("return_indices"):
            return _not_spatial("maxpool2d", "max pooling that returns indices", 0)
        return OpInfo("maxpool2d", R.MaxPoolRule(x_shape, k, s, p, _pair(v.get("dilation", 1))),
                      flops, 0)
    rule = R.AvgPoolRule(x_shape, k, s, p, bool(v.get("ceil_mode", False)),
                         bool(v.get("count_include_pad", True)), v.get("divisor_override"))
    return OpInfo("avgpool2d", rule, flops, 0)


def classify_method(method: str, args, kwargs, in_shapes, out_shape,
                    call: Callable) -> OpInfo:
    if method in _POINTWISE_METHODS and not _reduces(method, args):
        return _pointwise(method.rstrip("_"), call, in_shapes, out_shape)
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    if first is not None:
        if method == "__getitem__":
            method = "getitem"
        info = _dims_op(method, method, args, kwargs, tuple(first.shape), in_shapes,
                        out_shape, call)
        if info is not None:
            return info
        if method in _GLOBAL_METHODS or method in ("max", "min", "amax", "amin"):
            return _not_spatial(_GLOBAL_METHODS.get(method, method),
                                _global_reason(method, tuple(first.shape), out_shape), 0)
    if method in _GLOBAL_METHODS:
        return _not_spatial(_GLOBAL_METHODS[method], "global", 0)
    return _not_spatial(method, f"unsupported method .{method}()", _numel(out_shape))
