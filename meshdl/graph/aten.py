"""ATen graphs (``torch.export``) -> plain torch functions, so the tracer and region
rules see the same ops as in a hand-written model.

``torch.export`` graphs hold ATen overloads (``aten.conv2d.default``,
``aten.convolution.default``, ``aten._native_batch_norm_legit_no_training.default`` +
``getitem``, ``aten.max_pool2d_with_indices.default`` ...). ``normalise`` rewrites
each to the function meshdl's classifier knows (``F.conv2d``, ``F.batch_norm``,
``F.max_pool2d`` ...). An ATen op without a mapping is kept as it is: it runs exactly,
on one device (not split).

    as_module(obj) -> nn.Module     # ExportedProgram / ATen GraphModule -> normalised
"""
from __future__ import annotations

import logging
import operator
import re
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from meshdl.errors import TraceError

log = logging.getLogger(__name__)
aten = torch.ops.aten


def is_aten_graph(obj: Any) -> bool:
    """Whether ``obj`` is an ExportedProgram or a GraphModule that calls ATen overloads."""
    if isinstance(obj, torch.export.ExportedProgram):
        return True
    if not isinstance(obj, fx.GraphModule):
        return False
    return any(n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
               for n in obj.graph.nodes)


def as_module(obj: Any) -> Any:
    """``obj`` unchanged unless it is an ATen graph; then its normalised GraphModule."""
    return normalise(obj) if is_aten_graph(obj) else obj


def _val_shape(node: fx.Node) -> tuple[int, ...] | None:
    v = node.meta.get("val")
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


class _Rewriter:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.src = gm
        self.graph = fx.Graph()
        self.root = nn.Module()
        self.env: dict[fx.Node, Any] = {}
        self.multi: dict[fx.Node, Callable[[int], Any]] = {}   # tuple-returning nodes

    def attr(self, target: str) -> fx.Node:
        obj: Any = self.src
        for part in target.split("."):
            obj = getattr(obj, part)
        name = re.sub(r"\W", "_", target)
        if not hasattr(self.root, name):
            if isinstance(obj, torch.Tensor):
                self.root.register_buffer(name, obj.detach())
            else:
                setattr(self.root, name, obj)
        return self.graph.get_attr(name)

    def a(self, v: Any) -> Any:
        return fx.node.map_arg(v, lambda n: self.env[n])

    def fn(self, f: Callable, *args: Any, **kwargs: Any) -> fx.Node:
        return self.graph.call_function(f, self.a(args), self.a(kwargs))

    def method(self, name: str, *args: Any) -> fx.Node:
        return self.graph.call_method(name, self.a(args))

    def run(self) -> fx.GraphModule:
        out = None
        for node in self.src.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self.graph.placeholder(node.name)
            elif node.op == "get_attr":
                self.env[node] = self.attr(node.target)
            elif node.op == "call_function":
                self.env[node] = self.call(node)
            elif node.op == "output":
                out = node.args[0]
            elif node.op == "call_method":   # left by ExportedProgram.module() (views)
                self.env[node] = self.graph.call_method(node.target, self.a(node.args),
                                                        self.a(dict(node.kwargs)))
            elif node.op == "call_module" and not node.users:
                continue                 # export's input guards (_guards_fn)
            else:
                raise TraceError(f"unexpected {node.op} node {node.name} in an exported graph")
        while isinstance(out, (tuple, list)):
            if not out:
                raise TraceError("the exported program returns nothing")
            out = out[0]
        self.graph.output(self.env[out])
        self.graph.eliminate_dead_code()
        return fx.GraphModule(self.root, self.graph, class_name="ExportedModel").eval()

    # ------------------------------------------------------------ one op
    def call(self, node: fx.Node) -> Any:
        t, args, kw = node.target, list(node.args), dict(node.kwargs)
        if t is operator.getitem:
            src, i = args
            if src in self.multi:
                return self.multi[src](i)
            return self.fn(operator.getitem, src, i)
        packet = getattr(t, "overloadpacket", None)
        name = getattr(packet, "__name__", "")
        h = _HANDLERS.get(name)
        if h is not None:
            r = h(self, node, args, kw)
            if r is not NotImplemented:
                return r
        return self.fn(t, *args, **kw)    # runs exactly, classified as unsupported


def _arg(args: list, kw: dict, i: int, key: str, default: Any = None) -> Any:
    if key in kw:
        return kw[key]
    return args[i] if len(args) > i else default


def _conv(r: _Rewriter, node, args, kw):
    x, w = args[0], args[1]
    b = _arg(args, kw, 2, "bias")
    stride = _arg(args, kw, 3, "stride", 1)
    padding = _arg(args, kw, 4, "padding", 0)
    dilation = _arg(args, kw, 5, "dilation", 1)
    groups = _arg(args, kw, 6, "groups", 1)
    shape = _val_shape(w) if isinstance(w, fx.Node) else None
    fn = {3: F.conv1d, 4: F.conv2d, 5: F.conv3d}.get(len(shape) if shape else 4)
    return r.fn(fn, x, w, b, stride, padding, dilation, groups)


def _convolution(r: _Rewriter, node, args, kw):
    x, w, b, stride, padding, dilation, transposed, out_pad, groups = args[:9]
    shape = _val_shape(w)
    n = len(shape) - 2 if shape else 2
    if transposed:
        fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[n]
        return r.fn(fn, x, w, b, stride, padding, out_pad, groups, dilation)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[n]
    return r.fn(fn, x, w, b, stride, padding, dilation, groups)


def _batch_norm(r: _Rewriter, node, args, kw):
    x, w, b, mean, var = args[:5]
    training = _arg(args, kw, 5, "training", False)
    eps = _arg(args, kw, 7, "eps", 1e-5)
    if training:
        return NotImplemented
    return r.fn(F.batch_norm, x, mean, var, w, b, False, 0.0, eps)


def _bn_no_training(r: _Rewriter, node, args, kw):
    x, w, b, mean, var, _momentum, eps = args[:7]
    y = r.fn(F.batch_norm, x, mean, var, w, b, False, 0.0, eps)
    r.multi[node] = lambda i: y if i == 0 else _no_extra(node, i)
    return y


def _no_extra(node: fx.Node, i: int):
    raise TraceError(f"exported node {node.name} ({node.target}): output {i} (statistics or "
                     "indices) is used by the model; meshdl runs inference graphs only")


def _max_pool(r: _Rewriter, node, args, kw):
    x, k = args[0], args[1]
    s = _arg(args, kw, 2, "stride", None) or k
    p = _arg(args, kw, 3, "padding", 0)
    d = _arg(args, kw, 4, "dilation", 1)
    ceil = _arg(args, kw, 5, "ceil_mode", False)
    fn = F.max_pool2d if len(k) == 2 else (F.max_pool1d if len(k) == 1 else F.max_pool3d)
    y = r.fn(fn, x, k, s, p, d, ceil)
    if "with_indices" in str(node.target):
        r.multi[node] = lambda i: y if i == 0 else _no_extra(node, i)
    return y


def _avg_pool(r: _Rewriter, node, args, kw):
    x, k = args[0], args[1]
    s = _arg(args, kw, 2, "stride", None) or k
    p = _arg(args, kw, 3, "padding", 0)
    ceil = _arg(args, kw, 4, "ceil_mode", False)
    include = _arg(args, kw, 5, "count_include_pad", True)
    div = _arg(args, kw, 6, "divisor_override", None)
    if len(k) != 2:
        return NotImplemented
    return r.fn(F.avg_pool2d, x, k, s, p, ceil, include, div)


def _binary(op: Callable) -> Callable:
    def h(r: _Rewriter, node, args, kw):
        x, y = args[0], args[1]
        alpha = kw.get("alpha", 1)
        if alpha != 1:
            y = r.graph.call_function(operator.mul, (r.a(y), alpha))
            return r.graph.call_function(op, (r.a(x), y))
        return r.fn(op, x, y)
    return h


def _simple(f: Callable, nargs: int | None = None) -> Callable:
    def h(r: _Rewriter, node, args, kw):
        a = args if nargs is None else args[:nargs]
        return r.fn(f, *a, **{k: v for k, v in kw.items() if k != "inplace"})
    return h


def _method(name: str) -> Callable:
    def h(r: _Rewriter, node, args, kw):
        return r.method(name, *args)
    return h


def _alias(r: _Rewriter, node, args, kw):
    return r.env[args[0]]


def _dropout(r: _Rewriter, node, args, kw):
    return r.env[args[0]]


def _hardtanh(r: _Rewriter, node, args, kw):
    lo, hi = _arg(args, kw, 1, "min_val", -1.0), _arg(args, kw, 2, "max_val", 1.0)
    if lo == 0 and hi == 6:
        return r.fn(F.relu6, args[0])
    return r.fn(F.hardtanh, args[0], float(lo), float(hi))


def _linear(r: _Rewriter, node, args, kw):
    return r.fn(F.linear, args[0], args[1], _arg(args, kw, 2, "bias"))


def _transposed_param(node: Any) -> Any:
    """The weight under ``aten.t``/``permute([1, 0])`` of a get_attr, else None."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    name = getattr(getattr(node.target, "overloadpacket", None), "__name__", "")
    if name in ("t", "numpy_T") or (name == "permute" and list(node.args[1]) == [1, 0]):
        src = node.args[0]
        if isinstance(src, fx.Node) and src.op == "get_attr":
            return src
    return None


def _addmm(r: _Rewriter, node, args, kw):
    bias, x, m = args[:3]
    if kw.get("beta", 1) != 1 or kw.get("alpha", 1) != 1:
        return NotImplemented
    w = _transposed_param(m)
    if w is not None:
        return r.fn(F.linear, x, w, bias)
    return NotImplemented


def _mm(r: _Rewriter, node, args, kw):
    w = _transposed_param(args[1])
    if w is not None:
        return r.fn(F.linear, args[0], w)
    return r.fn(torch.matmul, args[0], args[1])


def _mean(r: _Rewriter, node, args, kw):
    dims = _arg(args, kw, 1, "dim", None)
    keep = _arg(args, kw, 2, "keepdim", False)
    if dims is None:
        return NotImplemented
    return r.fn(torch.mean, args[0], tuple(dims), keepdim=keep)


def _softmax(f: Callable) -> Callable:
    def h(r: _Rewriter, node, args, kw):
        return r.fn(f, args[0], _arg(args, kw, 1, "dim", -1))
    return h


def _upsample_nearest(r: _Rewriter, node, args, kw):
    shape = _val_shape(node)
    if shape is None:
        return NotImplemented
    return r.fn(F.interpolate, args[0], shape[2:], None, "nearest")


def _slice(r: _Rewriter, node, args, kw):
    x = args[0]
    dim = _arg(args, kw, 1, "dim", 0)
    start = _arg(args, kw, 2, "start", None)
    end = _arg(args, kw, 3, "end", None)
    step = _arg(args, kw, 4, "step", 1)
    shape = _val_shape(x)
    if shape is None or isinstance(start, fx.Node) or isinstance(end, fx.Node):
        return NotImplemented
    dim %= len(shape)
    if end is not None and end > shape[dim]:
        end = shape[dim]
    if (start in (None, 0)) and (end is None or end >= shape[dim]) and step == 1:
        return r.env[x]
    return r.fn(operator.getitem, x, tuple([slice(None)] * dim + [slice(start, end, step)]))


def _select(r: _Rewriter, node, args, kw):
    x, dim, index = args[:3]
    shape = _val_shape(x)
    if shape is None:
        return NotImplemented
    return r.fn(operator.getitem, x, tuple([slice(None)] * (dim % len(shape)) + [index]))


def _split(r: _Rewriter, node, args, kw):
    x = args[0]
    shape = _val_shape(x)
    dim = _arg(args, kw, 2, "dim", 0)
    if shape is None:
        return NotImplemented
    dim %= len(shape)
    size = args[1]
    total = shape[dim]
    sizes = list(size) if isinstance(size, (list, tuple)) else \
        [min(size, total - i) for i in range(0, total, size)]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    xs = r.env[x]

    def part(i: int):
        idx = tuple([slice(None)] * dim + [slice(starts[i], starts[i] + sizes[i])])
        return r.graph.call_function(operator.getitem, (xs, idx))
    r.multi[node] = part
    return None


def _pad(r: _Rewriter, node, args, kw):
    return r.fn(F.pad, args[0], list(args[1]), "constant", float(_arg(args, kw, 2, "value", 0)))


def _to_copy(r: _Rewriter, node, args, kw):
    dtype = kw.get("dtype")
    src = _val_shape(args[0])
    if dtype is None or (isinstance(args[0], fx.Node) and src is not None
                         and args[0].meta["val"].dtype == dtype):
        return r.env[args[0]]
    return r.method("to", args[0], dtype)


_HANDLERS: dict[str, Callable] = {
    "conv2d": _conv, "conv1d": _conv, "convolution": _convolution,
    "batch_norm": _batch_norm, "_native_batch_norm_legit_no_training": _bn_no_training,
    "max_pool2d": _max_pool, "max_pool2d_with_indices": _max_pool, "avg_pool2d": _avg_pool,
    "adaptive_avg_pool2d": _simple(F.adaptive_avg_pool2d, 2),
    "_adaptive_avg_pool2d": _simple(F.adaptive_avg_pool2d, 2),
    "add": _binary(operator.add), "add_": _binary(operator.add),
    "sub": _binary(operator.sub), "mul": _binary(operator.mul), "mul_": _binary(operator.mul),
    "div": lambda r, n, a, k: (NotImplemented if k.get("rounding_mode")
                               else r.fn(operator.truediv, a[0], a[1])),
    "relu": _simple(F.relu, 1), "relu_": _simple(F.relu, 1),
    "relu6": _simple(F.relu6, 1), "hardtanh": _hardtanh, "hardtanh_": _hardtanh,
    "hardswish": _simple(F.hardswish, 1), "hardswish_": _simple(F.hardswish, 1),
    "hardsigmoid": _simple(F.hardsigmoid, 1), "hardsigmoid_": _simple(F.hardsigmoid, 1),
    "sigmoid": _simple(torch.sigmoid, 1), "sigmoid_": _simple(torch.sigmoid, 1),
    "silu": _simple(F.silu, 1), "silu_": _simple(F.silu, 1),
    "tanh": _simple(torch.tanh, 1), "gelu": _simple(F.gelu), "elu": _simple(F.elu, 2),
    "leaky_relu": _simple(F.leaky_relu, 2), "leaky_relu_": _simple(F.leaky_relu, 2),
    "clamp": _simple(torch.clamp), "clamp_min": _simple(torch.clamp, 2),
    "exp": _simple(torch.exp, 1), "sqrt": _simple(torch.sqrt, 1), "abs": _simple(torch.abs, 1),
    "neg": _simple(torch.neg, 1), "maximum": _simple(torch.maximum, 2),
    "minimum": _simple(torch.minimum, 2),
    "linear": _linear, "addmm": _addmm, "mm": _mm, "matmul": _simple(torch.matmul, 2),
    "view": _method("reshape"), "reshape": _method("reshape"),
    "_unsafe_view": _method("reshape"), "flatten": _simple(torch.flatten),
    "permute": _method("permute"), "t": _method("t"), "transpose": _method("transpose"),
    "squeeze": _method("squeeze"), "unsqueeze": _method("unsqueeze"),
    "cat": _simple(torch.cat), "concat": _simple(torch.cat),
    "clone": _alias, "contiguous": _alias, "alias": _alias, "detach": _alias,
    "lift_fresh_copy": _alias, "dropout": _dropout, "feature_dropout": _dropout,
    "_to_copy": _to_copy, "to": _to_copy,
    "mean": _mean, "softmax": _softmax(F.softmax), "_softmax": _softmax(F.softmax),
    "log_softmax": _softmax(F.log_softmax), "_log_softmax": _softmax(F.log_softmax),
    "upsample_nearest2d": _upsample_nearest, "slice": _slice, "select": _select,
    "split": _split, "split_with_sizes": _split, "constant_pad_nd": _pad,
}


def normalise(obj: Any) -> fx.GraphModule:
    """An ExportedProgram or ATen GraphModule -> GraphModule of plain torch functions."""
    if isinstance(obj, torch.export.ExportedProgram):
        gm = obj.module()
    else:
        gm = obj
    gm = _strip_pytree(gm)
    out = _Rewriter(gm).run()
    log.debug("normalised an ATen graph: %d nodes", len(out.graph.nodes))
    return out


def _strip_pytree(gm: fx.GraphModule) -> fx.GraphModule:
    """``ExportedProgram.module()`` wraps forward in pytree (un)flattening; meshdl calls
    the graph with one tensor, so keep the bare graph (same nodes, plain codegen)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        env[node] = graph.node_copy(node, lambda n: env[n])
    new = fx.GraphModule(gm, graph)
    return new
