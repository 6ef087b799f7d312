"""ONNX op implementations for :mod:`meshdl.models.onnx_import`.

Each entry of ``OPS`` is ``fn(b, args, attrs, opset=, node=)``: ``args`` are the node's
inputs (``Dyn`` activations, constant tensors, or None for an omitted optional input),
``b`` the Builder; it returns the output value (or a list for several outputs). Through
``b.call``/``b.method`` an op on constants is folded and an op on activations becomes
one fx node of a plain torch function.
"""
from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.nn.functional as F

from meshdl.errors import ModelError
from meshdl.models.onnx_import import Dyn, example

OPS: dict[str, Any] = {}
_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
           7: torch.int64, 9: torch.bool, 10: torch.float32, 11: torch.float32,
           12: torch.int64, 13: torch.int64, 4: torch.int32}


def attributes(node, source: str) -> dict[str, Any]:
    from onnx import helper
    out = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif hasattr(v, "dims") and hasattr(v, "data_type"):      # a TensorProto
            from meshdl.models.onnx_import import _tensor
            v = _tensor(v, source)
        elif isinstance(v, list):
            v = [x.decode() if isinstance(x, bytes) else x for x in v]
        out[a.name] = v
    return out


def op(*names: str):
    def deco(fn):
        for n in names:
            OPS[n] = fn
        return fn
    return deco


def _fail(b, what: str) -> ModelError:
    return ModelError(f"{b.source}: node {b.node_desc}: {what}")


def ints(b, v: Any, what: str = "shape") -> list[int]:
    """A constant int tensor/list as Python ints (error if it depends on the input)."""
    if v is None:
        return []
    if isinstance(v, Dyn):
        raise _fail(b, f"its {what} is computed from the input at run time; meshdl needs "
                    "it constant at the model's input size")
    if isinstance(v, torch.Tensor):
        return [int(x) for x in v.reshape(-1).tolist()]
    return [int(x) for x in v]


def rank(v: Any) -> int:
    return example(v).dim()


def shape(v: Any) -> tuple[int, ...]:
    return tuple(example(v).shape)


# ------------------------------------------------------------------ plumbing
@op("Identity", "Dropout")
def _identity(b, args, attrs, **_):
    return args[0]


@op("Constant")
def _constant(b, args, attrs, **_):
    for key in ("value", "value_float", "value_int", "value_floats", "value_ints"):
        if key in attrs:
            v = attrs[key]
            if isinstance(v, torch.Tensor):
                return v
            if isinstance(v, float) or (isinstance(v, list) and v and isinstance(v[0], float)):
                return torch.tensor(v, dtype=torch.float32)
            return torch.tensor(v, dtype=torch.int64)
    raise _fail(b, f"unsupported Constant attributes {sorted(attrs)}")


@op("Shape")
def _shape(b, args, attrs, **_):
    s = list(shape(args[0]))
    start, end = attrs.get("start", 0), attrs.get("end", len(s))
    return torch.tensor(s[slice(start, end)], dtype=torch.int64)


@op("Size")
def _size(b, args, attrs, **_):
    return torch.tensor(example(args[0]).numel(), dtype=torch.int64)


@op("ConstantOfShape")
def _const_of_shape(b, args, attrs, **_):
    v = attrs.get("value", torch.zeros(1))
    return torch.full(ints(b, args[0]), v.reshape(-1)[0].item(), dtype=v.dtype)


@op("Cast")
def _cast(b, args, attrs, **_):
    dt = _DTYPES.get(int(attrs["to"]))
    if dt is None:
        raise _fail(b, f"Cast to ONNX type {attrs['to']} is not supported")
    if isinstance(args[0], Dyn) and args[0].dtype == dt:
        return args[0]
    return b.method("to", args[0], dt)


@op("Range")
def _range(b, args, attrs, **_):
    s, e, d = (example(a).item() for a in args)
    return torch.arange(s, e, d, dtype=example(args[0]).dtype)


@op("Reshape")
def _reshape(b, args, attrs, **_):
    x, target = args[0], ints(b, args[1])
    src = shape(x)
    if not attrs.get("allowzero", 0):
        target = [src[i] if v == 0 and i < len(src) else v for i, v in enumerate(target)]
    return b.method("reshape", x, tuple(target))


@op("Flatten")
def _flatten(b, args, attrs, **_):
    s = shape(args[0])
    axis = attrs.get("axis", 1)
    axis = axis + len(s) if axis < 0 else axis
    return b.method("reshape", args[0], (math.prod(s[:axis]), math.prod(s[axis:])))


@op("Transpose")
def _transpose(b, args, attrs, **_):
    perm = attrs.get("perm") or list(range(rank(args[0])))[::-1]
    return b.method("permute", args[0], *perm)


def _axes(b, args, attrs, opset, at=1) -> list[int] | None:
    if "axes" in attrs:
        return list(attrs["axes"])
    if len(args) > at and args[at] is not None:
        return ints(b, args[at], "axes")
    return None


@op("Squeeze")
def _squeeze(b, args, attrs, opset, **_):
    axes = _axes(b, args, attrs, opset)
    s = shape(args[0])
    if axes is None:
        axes = [i for i, v in enumerate(s) if v == 1]
    axes = sorted({a % len(s) for a in axes})
    out = [v for i, v in enumerate(s) if i not in axes]
    return b.method("reshape", args[0], tuple(out))


@op("Unsqueeze")
def _unsqueeze(b, args, attrs, opset, **_):
    axes = _axes(b, args, attrs, opset)
    s = list(shape(args[0]))
    n = len(s) + len(axes)
    for a in sorted(x % n for x in axes):
        s.insert(a, 1)
    return b.method("reshape", args[0], tuple(s))


@op("Concat")
def _concat(b, args, attrs, **_):
    items = [a for a in args if a is not None and example(a).numel() > 0] or args[:1]
    if not any(isinstance(a, Dyn) for a in items):
        return torch.cat([example(a) for a in items], attrs["axis"])
    axis = attrs["axis"] % rank(items[0])
    return b.call(torch.cat, list(items), axis)


@op("Split")
def _split(b, args, attrs, opset, node, **_):
    x = args[0]
    axis = attrs.get("axis", 0) % rank(x)
    total = shape(x)[axis]
    if "split" in attrs:
        sizes = list(attrs["split"])
    elif len(args) > 1 and args[1] is not None:
        sizes = ints(b, args[1], "split sizes")
    else:
        n = attrs.get("num_outputs", len(node.output))
        per = -(-total // n)
        sizes = [min(per, total - i * per) for i in range(n)]
    outs, start = [], 0
    for size in sizes:
        outs.append(_narrow(b, x, axis, start, size))
        start += size
    return outs


def _narrow(b, x, axis: int, start: int, length: int):
    if start == 0 and length == shape(x)[axis]:
        return x
    idx = tuple([slice(None)] * axis + [slice(start, start + length)])
    return b.call(operator.getitem, x, idx)


@op("Slice")
def _slice(b, args, attrs, opset, **_):
    x = args[0]
    if opset < 10:
        starts, ends = attrs["starts"], attrs["ends"]
        axes, steps = attrs.get("axes"), None
    else:
        starts, ends = ints(b, args[1]), ints(b, args[2])
        axes = ints(b, args[3]) if len(args) > 3 and args[3] is not None else None
        steps = ints(b, args[4]) if len(args) > 4 and args[4] is not None else None
    r = rank(x)
    axes = list(range(len(starts))) if axes is None else [a % r for a in axes]
    steps = steps or [1] * len(starts)
    idx: list[Any] = [slice(None)] * r
    flips = []
    for a, s, e, st in zip(axes, starts, ends, steps):
        n = shape(x)[a]
        if st > 0:
            s = max(0, min(n, s + n if s < 0 else s))
            e = max(0, min(n, e + n if e < 0 else e))
            idx[a] = slice(s, e, st)
        else:   # negative step: flip then slice forwards
            s = max(-1, min(n - 1, s + n if s < 0 else s))
            e = max(-1, min(n - 1, e + n if e < -1 or (e < 0 and e != -1) else e)) \
                if e >= -n else -1
            idx[a] = slice(n - 1 - s, n - 1 - e, -st)
            flips.append(a)
    if flips:
        x = b.call(torch.flip, x, flips)
    if all(i == slice(None) for i in idx):
        return x
    return b.call(operator.getitem, x, tuple(idx))


@op("Gather")
def _gather(b, args, attrs, **_):
    x, idx = args
    axis = attrs.get("axis", 0) % rank(x)
    if isinstance(idx, Dyn):
        raise _fail(b, "Gather with indices computed from the input is not supported")
    n = shape(x)[axis]
    idx = torch.where(idx < 0, idx + n, idx)
    if idx.dim() == 0:
        return b.call(operator.getitem, x, tuple([slice(None)] * axis + [int(idx)]))
    flat = b.call(torch.index_select, x, axis, idx.reshape(-1))
    s = list(shape(x))
    out = tuple(s[:axis] + list(idx.shape) + s[axis + 1:])
    return flat if shape(flat) == out else b.method("reshape", flat, out)


@op("Expand")
def _expand(b, args, attrs, **_):
    target = ints(b, args[1])
    out = torch.broadcast_shapes(shape(args[0]), tuple(target))
    return b.method("expand", args[0], *out)


@op("Tile")
def _tile(b, args, attrs, **_):
    return b.method("repeat", args[0], *ints(b, args[1], "repeats"))


@op("Where")
def _where(b, args, attrs, **_):
    return b.call(torch.where, *args)


@op("Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or")
def _logic(b, args, attrs, node, **_):
    fn = {"Equal": torch.eq, "Greater": torch.gt, "Less": torch.lt, "GreaterOrEqual": torch.ge,
          "LessOrEqual": torch.le, "Not": torch.logical_not, "And": torch.logical_and,
          "Or": torch.logical_or}[node.op_type]
    return b.call(fn, *args)


# ------------------------------------------------------------------ arithmetic
_BIN = {"Add": operator.add, "Sub": operator.sub, "Mul": operator.mul, "Div": operator.truediv}


@op("Add", "Sub", "Mul", "Div")
def _binary(b, args, attrs, node, **_):
    x, y = args
    ex, ey = example(x), example(y)
    if node.op_type == "Div" and not ex.is_floating_point() and not ey.is_floating_point():
        return b.call(torch.div, x, y, rounding_mode="trunc")
    if isinstance(y, torch.Tensor) and y.numel() == 1 and isinstance(x, Dyn) and \
            y.dim() <= x.example.dim() and y.is_floating_point() == ex.is_floating_point():
        y = y.item()                     # scalar constant: a plain number
    elif isinstance(x, torch.Tensor) and x.numel() == 1 and isinstance(y, Dyn) and \
            x.dim() <= y.example.dim() and x.is_floating_point() == ey.is_floating_point():
        x = x.item()
    return b.call(_BIN[node.op_type], x, y)


@op("Sum", "Max", "Min", "Mean")
def _variadic(b, args, attrs, node, **_):
    fn = {"Sum": operator.add, "Max": torch.maximum, "Min": torch.minimum,
          "Mean": operator.add}[node.op_type]
    acc = args[0]
    for a in args[1:]:
        acc = b.call(fn, acc, a)
    if node.op_type == "Mean" and len(args) > 1:
        acc = b.call(operator.truediv, acc, float(len(args)))
    return acc


@op("Mod")
def _mod(b, args, attrs, **_):
    fn = torch.fmod if attrs.get("fmod", 0) else torch.remainder
    return b.call(fn, *args)


@op("Einsum")
def _einsum(b, args, attrs, **_):
    return b.call(torch.einsum, attrs["equation"], *args)


@op("Trilu")
def _trilu(b, args, attrs, **_):
    k = int(example(args[1]).item()) if len(args) > 1 and args[1] is not None else 0
    return b.call(torch.triu if attrs.get("upper", 1) else torch.tril, args[0], k)


@op("CumSum")
def _cumsum(b, args, attrs, **_):
    if attrs.get("exclusive", 0) or attrs.get("reverse", 0):
        raise _fail(b, "CumSum with exclusive/reverse is not supported")
    return b.call(torch.cumsum, args[0], int(example(args[1]).item()))


@op("IsNaN", "IsInf")
def _isnan(b, args, attrs, node, **_):
    return b.call(torch.isnan if node.op_type == "IsNaN" else torch.isinf, args[0])


@op("Celu", "ThresholdedRelu")
def _celu(b, args, attrs, node, **_):
    if node.op_type == "Celu":
        return b.call(F.celu, args[0], float(attrs.get("alpha", 1.0)))
    return b.call(F.threshold, args[0], float(attrs.get("alpha", 1.0)), 0.0)


@op("Pow")
def _pow(b, args, attrs, **_):
    x, y = args
    if isinstance(y, torch.Tensor) and y.numel() == 1:
        e = y.item()
        if e == 2:
            return b.call(operator.mul, x, x)
        if e == 1:
            return x
        return b.call(torch.pow, x, float(e))
    return b.call(torch.pow, x, y)


_UNARY = {"Relu": F.relu, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Exp": torch.exp,
          "Log": torch.log, "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg,
          "Erf": torch.erf, "Reciprocal": torch.reciprocal, "Floor": torch.floor,
          "Ceil": torch.ceil, "Softsign": F.softsign, "Sin": torch.sin, "Cos": torch.cos,
          "Round": torch.round, "Sign": torch.sign, "HardSwish": F.hardswish,
          "Tan": torch.tan, "Atan": torch.atan, "Asin": torch.asin, "Acos": torch.acos,
          "Sinh": torch.sinh, "Cosh": torch.cosh}


@op(*_UNARY)
def _unary(b, args, attrs, node, **_):
    return b.call(_UNARY[node.op_type], args[0])


@op("LeakyRelu")
def _leaky(b, args, attrs, **_):
    return b.call(F.leaky_relu, args[0], float(attrs.get("alpha", 0.01)))


@op("Elu")
def _elu(b, args, attrs, **_):
    return b.call(F.elu, args[0], float(attrs.get("alpha", 1.0)))


@op("Selu")
def _selu(b, args, attrs, **_):
    a, g = attrs.get("alpha", 1.67326319217681884765625), attrs.get("gamma", 1.05070102214813232421875)
    if abs(a - 1.6732632) < 1e-6 and abs(g - 1.0507010) < 1e-6:
        return b.call(F.selu, args[0])
    return b.call(operator.mul, b.call(F.elu, args[0], float(a)), float(g))


@op("Softplus")
def _softplus(b, args, attrs, **_):
    return b.call(F.softplus, args[0])


@op("Gelu")
def _gelu(b, args, attrs, **_):
    return b.call(F.gelu, args[0], approximate=attrs.get("approximate", "none"))


@op("Mish")
def _mish(b, args, attrs, **_):
    return b.call(F.mish, args[0])


@op("PRelu")
def _prelu(b, args, attrs, **_):
    x, slope = args
    s = example(slope)
    if s.numel() == 1 or (s.dim() >= 1 and s.numel() == shape(x)[1] and rank(x) >= 2):
        return b.call(F.prelu, x, s.reshape(-1))
    return b.call(torch.where, b.call(torch.gt, x, 0.0), x, b.call(operator.mul, x, slope))


@op("Clip")
def _clip(b, args, attrs, opset, **_):
    if opset < 11:
        lo, hi = attrs.get("min"), attrs.get("max")
    else:
        lo = example(args[1]).item() if len(args) > 1 and args[1] is not None else None
        hi = example(args[2]).item() if len(args) > 2 and args[2] is not None else None
    x = args[0]
    if lo == 0.0 and hi == 6.0:
        return b.call(F.relu6, x)
    if lo is not None and hi is not None:
        return b.call(F.hardtanh, x, float(lo), float(hi))
    if lo == 0.0 and hi is None:
        return b.call(F.relu, x)
    return b.call(torch.clamp, x, lo, hi)


@op("HardSigmoid")
def _hardsigmoid(b, args, attrs, **_):
    alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
    if abs(alpha - 1 / 6) < 1e-6 and beta == 0.5:
        return b.call(F.hardsigmoid, args[0])
    y = b.call(operator.add, b.call(operator.mul, args[0], alpha), beta)
    return b.call(F.hardtanh, y, 0.0, 1.0)


@op("Softmax", "LogSoftmax")
def _softmax(b, args, attrs, opset, node, **_):
    x = args[0]
    r = rank(x)
    axis = attrs.get("axis", -1 if opset >= 13 else 1) % r
    fn = F.softmax if node.op_type == "Softmax" else F.log_softmax
    if opset >= 13 or axis == r - 1:
        return b.call(fn, x, axis)
    s = shape(x)        # before opset 13: softmax over the flattened trailing dims
    flat = b.method("reshape", x, (math.prod(s[:axis]), math.prod(s[axis:])))
    return b.method("reshape", b.call(fn, flat, 1), s)


# ------------------------------------------------------------------ layers
from meshdl.models import onnx_layers  # noqa: E402,F401  (registers conv/pool/... ops)
