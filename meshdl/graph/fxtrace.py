"""Trace a torch.nn.Module into a ModelGraph (torch.fx + shape propagation)."""
from __future__ import annotations

import logging
import operator
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from meshdl.errors import SplitWarning, TraceError
from meshdl.graph import regions as R
from meshdl.graph.classify import (POINTWISE_NAMES, OpInfo, classify_function, classify_item,
                                   classify_method, classify_module)
from meshdl.graph.classify_dims import op_name
from meshdl.graph.fxnormalize import normalize, whole_graph
from meshdl.graph import layout as L

log = logging.getLogger(__name__)

INPUT = -1   # producer index of the model input


@dataclass
class Op:
    """One traced operation."""

    index: int
    name: str
    kind: str
    spatial: bool
    out_shape: tuple[int, ...]
    flops: float
    weight_bytes: int
    out_bytes: int
    inputs: list[int]                       # producer op indices (INPUT = model input)
    rule: R.Rule = field(repr=False)
    call: Callable[..., torch.Tensor] = field(repr=False)   # call(*input tensors)
    reason: str = ""                         # why not spatial ("global", "unsupported ...")
    target: str = ""                         # module path or function name
    node: Any = field(default=None, repr=False, compare=False)   # the fx node
    hw: tuple[int, int] | None = None        # axes of H, W in the output (graph.layout)


def _user_frame(exc: BaseException) -> str:
    """The deepest traceback frame outside torch: the user's construct that failed."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if "/torch/" not in f.filename and "/meshdl/graph/" not in f.filename]
    if not frames:
        return ""
    f = frames[-1]
    return f" at {f.filename}:{f.lineno}: `{(f.line or '').strip()}`"


def symbolic_trace(model: nn.Module) -> fx.GraphModule:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
        raise TraceError(
            f"torch.fx cannot trace {type(model).__name__}{_user_frame(exc)}: {exc}. "
            "Make forward() free of data-dependent Python control flow (if/for on tensor "
            "values, len() of tensors), or wrap that part in a leaf module "
            "(torch.fx.wrap) so meshdl runs it whole.") from exc
    return gm


def example_input(model: nn.Module, shape: tuple[int, ...]) -> torch.Tensor:
    """A fixed pseudo-random input (global RNG untouched) in the model's float dtype."""
    dtype = next((p.dtype for p in list(model.parameters()) + list(model.buffers())
                  if p.is_floating_point()), torch.float32)
    return torch.randn(shape, generator=torch.Generator().manual_seed(0x5EED)).to(dtype)


def pure_graph(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """The model's fx graph with every in-place op made out of place (``fxnormalize``)
    and dead code removed; a model whose in-place aliasing cannot be rewritten exactly
    becomes one whole op, with a SplitWarning."""
    gm = symbolic_trace(model)
    try:
        reason = normalize(gm, x)
    except Exception as exc:   # an op the analysis run cannot execute: keep it exact
        reason = f"its in-place ops could not be analysed ({exc})"
        gm = symbolic_trace(model)
    if reason is not None:
        warnings.warn(f"{type(model).__name__}: {reason}; meshdl runs the whole model on "
                      "one device", SplitWarning, stacklevel=4)
        return whole_graph(gm, reason)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def _is_tensor(v: Any) -> bool:
    return isinstance(v, torch.Tensor)


def _contains_tensor(v: Any) -> bool:
    if _is_tensor(v):
        return True
    if isinstance(v, (list, tuple)):
        return any(_contains_tensor(x) for x in v)
    if isinstance(v, dict):
        return any(_contains_tensor(x) for x in v.values())
    return False


def _apply(node: fx.Node, modules: dict, args: tuple, kwargs: dict) -> Any:
    if node.op == "call_module":
        return modules[node.target](*args, **kwargs)
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    return getattr(args[0], node.target)(*args[1:], **kwargs)


# per-channel parameters by definition (on a channels-last tensor layout.py runs them whole)
_PER_CHANNEL = {"batch_norm", "prelu"}


def _wants_const_inputs(node: fx.Node) -> bool:
    """Elementwise consumers, whose tensor constants with spatial extent are cropped."""
    if node.op == "call_module":
        return False
    if node.op == "call_method":
        return node.target in POINTWISE_NAMES
    name = op_name(node.target)
    if name in _PER_CHANNEL:        # their vectors index dim 1 (C), not the trailing dims
        return False
    return name in POINTWISE_NAMES or name in ("cat", "concat", "stack", "iadd", "imul")


def _probe_local(call: Callable, x: Any, y: Any) -> bool:
    """Does an op meshdl does not know (a custom autograd function, an exotic
    activation) commute with cropping? Checked on the traced random input for a few
    crops, corners and single pixels included: an elementwise op passes bit for bit;
    anything reading across pixels or depending on the map's size fails and runs whole."""
    if not (_is_tensor(x) and _is_tensor(y) and x.dim() >= 3 and y.dim() >= 3
            and tuple(x.shape[-2:]) == tuple(y.shape[-2:]) and x.is_floating_point()):
        return False
    h, w = int(x.shape[-2]), int(x.shape[-1])
    if h < 3 or w < 3:
        return False
    crops = [(1, h - 1, 0, w // 2), (0, 1, w - 1, w), (h // 2, h, 1, 2), (0, h, 0, w - 1)]
    try:
        with torch.no_grad():
            for h0, h1, w0, w1 in crops:
                got = call(x[..., h0:h1, w0:w1])
                want = y[..., h0:h1, w0:w1]
                if not _is_tensor(got) or got.shape != want.shape or \
                        not torch.equal(got, want):
                    return False
    except Exception:      # the op cannot run on a smaller map: not local
        return False
    return True


class _Builder:
    """Runs the graph once on a real input, recording every node's value.

    Nodes whose value depends on the model input become ops when they produce one
    tensor; tuples and lists of such tensors (chunk, split, max over a dim...) are
    *virtual*: every op reading them recomputes them from their own inputs (getitem on
    a chunk is the op "chunk, then take item i")."""

    def __init__(self, gm: fx.GraphModule, x: torch.Tensor):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.x = x
        self.values: dict[fx.Node, Any] = {}
        self.op_index: dict[fx.Node, int] = {}
        self.virtual: dict[fx.Node, list[fx.Node]] = {}
        self.ops: list[Op] = []
        self.in_hw = L.standard(tuple(x.shape))
        self.in_read = False     # has an op read the input with in_hw as its H, W?

    def build(self) -> tuple[list[Op], tuple[int, ...]]:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise TraceError(f"meshdl splits models with exactly one tensor input; this one "
                             f"takes {len(placeholders)} ({[p.name for p in placeholders]})")
        out_shape: tuple[int, ...] = ()
        with torch.no_grad():
            for node in self.gm.graph.nodes:
                if node.op == "placeholder":
                    self.values[node] = self.x
                    self.op_index[node] = INPUT
                elif node.op == "get_attr":
                    self.values[node] = self._attr(node.target)
                elif node.op == "output":
                    out = node.args[0]
                    if not isinstance(out, fx.Node) or not _is_tensor(self.values.get(out)):
                        raise TraceError("meshdl splits models whose forward returns one "
                                         f"tensor; this one returns {type(out).__name__}")
                    out_shape = tuple(self.values[out].shape)
                    if self.op_index.get(out) != len(self.ops) - 1:
                        raise TraceError("the model output must be produced by its last op")
                else:
                    self._call(node)
        return self.ops, out_shape

    def _attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _deps(self, node: fx.Node) -> list[fx.Node]:
        """Activation inputs: op nodes read directly or through virtual nodes."""
        seen: list[fx.Node] = []
        for n in node.all_input_nodes:
            for d in ([n] if n in self.op_index else self.virtual.get(n, [])):
                if d not in seen:
                    seen.append(d)
        return seen

    def _consts_to_crop(self, node: fx.Node, out_shape) -> list[fx.Node]:
        """Tensor constants of an elementwise op that have spatial extent."""
        if len(out_shape) < 3 or not _wants_const_inputs(node):
            return []
        out = []
        for n in node.all_input_nodes:
            v = self.values.get(n)
            if (n not in self.op_index and n not in self.virtual and _is_tensor(v)
                    and v.dim() >= 2 and tuple(v.shape[-2:]) != (1, 1) and n not in out):
                out.append(n)
        return out

    def _call(self, node: fx.Node) -> None:
        args = fx.node.map_arg(node.args, lambda n: self.values[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.values[n])
        value = _apply(node, self.modules, args, kwargs)
        self.values[node] = value
        deps = self._deps(node)
        if not deps or not _contains_tensor(value):
            return      # a constant (x.size(0), a parameter expression): folded into users
        if not _is_tensor(value):
            self.virtual[node] = deps
            return
        out_shape = tuple(value.shape)
        consts = self._consts_to_crop(node, out_shape)
        const_ops = [self._const_op(c) for c in consts]
        slots = deps + consts
        call = self._make_call(node, slots)
        in_shapes = [tuple(self.values[n].shape) for n in slots]
        dep_hws = [self._hw(n) for n in deps]
        in_read = self.in_read or any(self.op_index[n] == INPUT for n in deps)
        dep_shapes = [tuple(self.values[n].shape) for n in deps]
        info = self._classify(node, args, kwargs, in_shapes, out_shape, call)
        out_hw = L.standard(out_shape)
        moved = self._moved(node, deps, dep_hws, consts, call)
        dep_hws = [self._hw(n) for n in deps]     # the move may have read the input's
        if moved is not None:
            info = OpInfo(info.kind, L.AxisRule(call, in_shapes, dep_hws, out_shape, moved),
                          0.0, 0)
            out_hw = moved
        elif any(h is not None and not L.is_standard(s, h)
                 for s, h in zip(dep_shapes, dep_hws)):
            info, out_hw = self._on_layout(node, args, kwargs, deps, dep_hws, consts, info,
                                           in_shapes, out_shape, call)
        elif not info.rule.spatial and info.rule.reduce is None and \
                getattr(info.rule, "reason", "").startswith("unsupported") and \
                len(slots) == 1 and _probe_local(call, self.values[slots[0]], value):
            info = OpInfo(info.kind, R.PointwiseRule(call, in_shapes, out_shape), info.flops,
                          info.weight_bytes)
        if isinstance(info.rule, R.PointwiseRule) and _wants_const_inputs(node) and \
                not self._consts_broadcast(
                node, consts, out_shape, out_hw):
            info = OpInfo(info.kind, R.NotSpatial(
                f"{info.kind} with a constant that does not broadcast over H, W"),
                info.flops, info.weight_bytes)
        if not info.rule.spatial and info.rule.reduce is None:
            out_hw = self._kept_frame(deps, out_shape, out_hw)
        self.in_read = in_read
        index = len(self.ops)
        self.op_index[node] = index
        self.ops.append(Op(
            index=index, name=node.name, kind=info.kind, spatial=info.rule.spatial,
            out_shape=out_shape, flops=float(info.flops), weight_bytes=int(info.weight_bytes),
            out_bytes=int(value.numel() * value.element_size()),
            inputs=[self.op_index[n] for n in deps] + const_ops, rule=info.rule, call=call,
            reason=getattr(info.rule, "reason", ""),
            target=str(getattr(node.target, "__name__", node.target)), node=node,
            hw=out_hw if len(out_shape) >= 3 else None))

    def _consts_broadcast(self, node, consts, out_shape, hw) -> bool:
        """Tensor constants baked into an elementwise op (not cropped per tile) must be
        size 1 along the output's H and W."""
        if hw is None:
            return True
        for n in node.all_input_nodes:
            v = self.values.get(n)
            if n not in self.op_index and n not in self.virtual and n not in consts and \
                    _is_tensor(v) and not L.broadcasts_off(tuple(v.shape), out_shape, hw):
                return False
        return True

    def _kept_frame(self, deps, out_shape, out_hw):
        """H, W of an op run whole: any choice is exact (tiled ranges start only at
        (N, C, H, W) positions); keeping its input's axes when they survive lets a
        channels-last block run whole up to its permute back, which then tiles."""
        for n in deps:
            h = self._hw(n)
            shape = tuple(self.values[n].shape)
            if h is not None and len(shape) == len(out_shape) and all(
                    int(shape[a]) == int(out_shape[a]) for a in h):
                return h
        return out_hw

    def _hw(self, n: fx.Node) -> tuple[int, int] | None:
        i = self.op_index[n]
        return self.in_hw if i == INPUT else self.ops[i].hw

    def _reads_virtual(self, node: fx.Node) -> bool:
        return any(n in self.virtual for n in node.all_input_nodes)

    def _moved(self, node, deps, dep_hws, consts, call) -> tuple[int, int] | None:
        """Output H, W axes of a pure axis move (permute, transpose, ...) of a map."""
        if node.op == "call_module" or len(deps) != 1 or consts or dep_hws[0] is None \
                or self._reads_virtual(node):
            return None
        name = node.target if node.op == "call_method" else op_name(node.target)
        if name not in L.MOVES:
            return None
        x = self.values[deps[0]]
        out = L.moved_axes(call, x, dep_hws[0])
        if self.op_index[deps[0]] == INPUT and not self.in_read and x.dim() == 4 and \
                out != (2, 3) and L.moved_axes(call, x, (1, 2)) == (2, 3):
            self.in_hw = (1, 2)        # a channels-last (N, H, W, C) model input
            return (2, 3)
        return out

    def _on_layout(self, node, args, kwargs, deps, dep_hws, consts, info, in_shapes,
                   out_shape, call) -> tuple[OpInfo, tuple[int, int] | None]:
        """An op reading a map whose H, W are not its last two dims (channels-last):
        tileable when it provably leaves the tracked axes alone, else run whole."""
        nd = len(out_shape)
        k = next((i for i, h in enumerate(dep_hws) if h is not None), 0)
        first = tuple(self.values[deps[k]].shape)
        hw = dep_hws[k]
        why = "moves, merges or reads across the spatial dims H, W of a channels-last map"
        ok = hw is not None and len(first) == nd and not self._reads_virtual(node)
        for n, h in zip(deps, dep_hws):
            shape = tuple(self.values[n].shape)
            if h is None:
                ok = ok and hw is not None and L.broadcasts_off(shape, out_shape, hw)
            else:
                off = nd - len(shape)
                ok = ok and (h[0] + off, h[1] + off) == hw
        module = self.modules[node.target] if node.op == "call_module" else None
        fn = None if module is not None else node.target
        name = node.target if node.op == "call_method" else op_name(node.target) \
            if module is None else None
        if name == "matmul":     # x @ W with a constant W: a Linear over the last dim
            w = args[1] if len(args) > 1 else None
            ok = ok and len(deps) == 1 and node.args[0] is deps[0] and _is_tensor(w) \
                and w.dim() == 2
        elif _wants_const_inputs(node):     # elementwise constants must broadcast over H, W
            ok = ok and hw is not None and self._consts_broadcast(node, (), out_shape, hw)
        if ok:
            ok = L.local_axes(module, fn, args, kwargs, first, out_shape, hw)
        if not ok:
            return OpInfo(info.kind, R.NotSpatial(why), info.flops, info.weight_bytes), \
                L.standard(out_shape)
        rule = L.AxisRule(call, in_shapes, dep_hws + [None] * len(consts), out_shape, hw)
        return OpInfo(info.kind, rule, info.flops, info.weight_bytes), hw

    def _const_op(self, n: fx.Node) -> int:
        """A leaf op holding constant ``n``, cropped to a tile like any input."""
        v = self.values[n]
        index = len(self.ops)
        self.ops.append(Op(
            index=index, name=f"{n.name}_const{index}", kind="const", spatial=True,
            out_shape=tuple(v.shape), flops=0.0, weight_bytes=int(v.numel() * v.element_size()),
            out_bytes=int(v.numel() * v.element_size()), inputs=[], rule=R.ConstRule(v),
            call=lambda v=v: v, reason="", target=str(n.target), node=n))
        return index

    def _classify(self, node, args, kwargs, in_shapes, out_shape, call) -> OpInfo:
        if node.op == "call_module":
            return classify_module(self.modules[node.target], in_shapes, out_shape, call)
        if node.op == "call_function":
            src = node.args[0] if node.args else None
            if node.target is operator.getitem and isinstance(src, fx.Node) and \
                    src in self.virtual:
                return self._classify_item(src, in_shapes, out_shape, call)
            return classify_function(node.target, args, kwargs, in_shapes, out_shape, call,
                                     _is_tensor)
        return classify_method(node.target, args, kwargs, in_shapes, out_shape, call)

    def _classify_item(self, src: fx.Node, in_shapes, out_shape, call) -> OpInfo:
        pargs = fx.node.map_arg(src.args, lambda n: self.values[n])
        pkw = fx.node.map_arg(src.kwargs, lambda n: self.values[n])
        first = pargs[0] if pargs and _is_tensor(pargs[0]) else None
        if src.op == "call_module" or first is None or len(in_shapes) != 1 or \
                any(isinstance(a, fx.Node) and a in self.virtual for a in src.all_input_nodes):
            name = None
        else:
            name = src.target if src.op == "call_method" else op_name(src.target)
        return classify_item(name, pargs, pkw, tuple(first.shape) if first is not None else
                             None, in_shapes, out_shape, call)

    def _make_call(self, node: fx.Node, slots_in: list[fx.Node]
                   ) -> Callable[..., torch.Tensor]:
        """A function of the activation inputs (and cropped constants) alone; other
        constants are baked in; virtual inputs are recomputed from their own inputs."""
        slots = {n: i for i, n in enumerate(slots_in)}
        values, virtual, modules = self.values, self.virtual, self.modules

        def evaluate(n: fx.Node, tensors, memo):
            if n in slots:
                return tensors[slots[n]]
            if n in virtual:
                if n not in memo:
                    a = fx.node.map_arg(n.args, lambda m: evaluate(m, tensors, memo))
                    k = fx.node.map_arg(n.kwargs, lambda m: evaluate(m, tensors, memo))
                    memo[n] = _apply(n, modules, a, k)
                return memo[n]
            return values[n]

        def call(*tensors):
            memo: dict = {}
            a = fx.node.map_arg(node.args, lambda m: evaluate(m, tensors, memo))
            k = fx.node.map_arg(node.kwargs, lambda m: evaluate(m, tensors, memo))
            return _apply(node, modules, a, k)
        return call


@dataclass
class Traced:
    ops: list[Op]
    output_shape: tuple[int, ...]
    gm: fx.GraphModule
    input_node: fx.Node
    constants: dict[fx.Node, Any]      # folded non-tensor values (x.size(0), shapes)
    virtual: dict[fx.Node, list[fx.Node]] = field(default_factory=dict)  # tuples of tensors
    in_hw: tuple[int, int] | None = None     # axes of H, W in the model input


def build_ops(model: nn.Module, input_shape: tuple[int, ...]) -> Traced:
    """Trace ``model``: its ops in execution order, output shape and fx graph."""
    from meshdl.graph.aten import as_module
    model = as_module(model)    # torch.export graphs: ATen ops -> plain torch functions
    if model.training:
        log.info("putting %s in eval mode for tracing", type(model).__name__)
        model.eval()
    x = example_input(model, tuple(input_shape))
    gm = pure_graph(model, x)
    builder = _Builder(gm, x)
    try:
        ops, out_shape = builder.build()
    except TraceError:
        raise
    except Exception as exc:
        raise TraceError(f"running {type(model).__name__} on input shape {tuple(input_shape)} "
                         f"failed{_user_frame(exc)}: {exc}. Check the input shape the model "
                         "expects.") from exc
    constants = {n: v for n, v in builder.values.items()
                 if n not in builder.op_index and n not in builder.virtual
                 and n.op not in ("get_attr", "placeholder") and not _contains_tensor(v)}
    # the ops' calls read only constants from builder.values (activations come in as
    # arguments, virtual nodes are recomputed): free the example run's activations,
    # which the calls' closures would otherwise keep (resnet18 at 224 px: 31 MiB a graph)
    for n in [n for n in builder.values if n in builder.op_index or n in builder.virtual]:
        del builder.values[n]
    input_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return Traced(ops, out_shape, gm, input_node, constants, builder.virtual, builder.in_hw)
