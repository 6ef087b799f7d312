"""Trace a torch.nn.Module into a ModelGraph (torch.fx + shape propagation)."""
from __future__ import annotations

import logging
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn

from meshdl.errors import SplitWarning, TraceError
from meshdl.graph import regions as R
from meshdl.graph.classify import OpInfo, classify_function, classify_method, classify_module

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


class _Builder:
    """Runs the graph once on a real input, recording every node's value."""

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...]):
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.input_shape = input_shape
        self.values: dict[fx.Node, Any] = {}
        self.op_index: dict[fx.Node, int] = {}
        self.ops: list[Op] = []

    def build(self) -> tuple[list[Op], tuple[int, ...]]:
        placeholders = [n for n in self.gm.graph.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise TraceError(f"meshdl splits models with exactly one tensor input; this one "
                             f"takes {len(placeholders)} ({[p.name for p in placeholders]})")
        x = torch.zeros(self.input_shape)
        out_shape: tuple[int, ...] = ()
        with torch.no_grad():
            for node in self.gm.graph.nodes:
                if node.op == "placeholder":
                    self.values[node] = x
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

    def _tensor_inputs(self, node: fx.Node) -> list[fx.Node]:
        """Activation inputs: nodes that produce tensors computed from the model input."""
        seen: list[fx.Node] = []
        for n in node.all_input_nodes:
            if n in self.op_index and n not in seen:
                seen.append(n)
        return seen

    def _call(self, node: fx.Node) -> None:
        args = fx.node.map_arg(node.args, lambda n: self.values[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: self.values[n])
        if node.op == "call_module":
            fn = self.modules[node.target]
            value = fn(*args, **kwargs)
        elif node.op == "call_function":
            value = node.target(*args, **kwargs)
        else:  # call_method
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        self.values[node] = value
        inputs = self._tensor_inputs(node)
        if not inputs or not _contains_tensor(value):
            return      # a constant (x.size(0), a parameter expression): folded into users
        if not _is_tensor(value):
            raise TraceError(f"op {node.name} ({node.target}) returns "
                             f"{type(value).__name__}; meshdl needs ops that return one "
                             "tensor (wrap that part in a leaf module)")
        call = self._make_call(node, inputs)
        in_shapes = [tuple(self.values[n].shape) for n in inputs]
        out_shape = tuple(value.shape)
        info = self._classify(node, args, kwargs, in_shapes, out_shape, call)
        index = len(self.ops)
        self.op_index[node] = index
        self.ops.append(Op(
            index=index, name=node.name, kind=info.kind, spatial=info.rule.spatial,
            out_shape=out_shape, flops=float(info.flops), weight_bytes=int(info.weight_bytes),
            out_bytes=int(value.numel() * value.element_size()),
            inputs=[self.op_index[n] for n in inputs], rule=info.rule, call=call,
            reason=getattr(info.rule, "reason", ""),
            target=str(getattr(node.target, "__name__", node.target)), node=node))

    def _classify(self, node, args, kwargs, in_shapes, out_shape, call) -> OpInfo:
        if node.op == "call_module":
            return classify_module(self.modules[node.target], in_shapes, out_shape, call)
        if node.op == "call_function":
            return classify_function(node.target, args, kwargs, in_shapes, out_shape, call,
                                     _is_tensor)
        return classify_method(node.target, in_shapes, out_shape, call)

    def _make_call(self, node: fx.Node, inputs: list[fx.Node]) -> Callable[..., torch.Tensor]:
        """A function of the activation inputs alone; constants are baked in."""
        slots = {n: i for i, n in enumerate(inputs)}
        consts = {n: self.values[n] for n in node.all_input_nodes if n not in slots}

        def fill(tensors):
            def sub(n: fx.Node):
                return tensors[slots[n]] if n in slots else consts[n]
            return (fx.node.map_arg(node.args, sub), fx.node.map_arg(node.kwargs, sub))

        if node.op == "call_module":
            module = self.modules[node.target]

            def call(*tensors):
                a, k = fill(tensors)
                return module(*a, **k)
        elif node.op == "call_function":
            fn = node.target

            def call(*tensors):
                a, k = fill(tensors)
                return fn(*a, **k)
        else:
            method = node.target

            def call(*tensors):
                a, k = fill(tensors)
                return getattr(a[0], method)(*a[1:], **k)
        return call


@dataclass
class Traced:
    ops: list[Op]
    output_shape: tuple[int, ...]
    gm: fx.GraphModule
    input_node: fx.Node
    constants: dict[fx.Node, Any]      # folded non-tensor values (x.size(0), shapes)


def build_ops(model: nn.Module, input_shape: tuple[int, ...]) -> Traced:
    """Trace ``model``: its ops in execution order, output shape and fx graph."""
    from meshdl.graph.aten import as_module
    model = as_module(model)    # torch.export graphs: ATen ops -> plain torch functions
    if model.training:
        log.info("putting %s in eval mode for tracing", type(model).__name__)
        model.eval()
    gm = symbolic_trace(model)
    builder = _Builder(gm, tuple(input_shape))
    try:
        ops, out_shape = builder.build()
    except TraceError:
        raise
    except Exception as exc:
        raise TraceError(f"running {type(model).__name__} on input shape {tuple(input_shape)} "
                         f"failed{_user_frame(exc)}: {exc}. Check the input shape the model "
                         "expects.") from exc
    unsupported = [op for op in ops if not op.spatial and op.reason != "global"]
    for op in unsupported:
        warnings.warn(f"op {op.name} ({op.reason}) cannot be split spatially: the part of "
                      f"the model around it runs whole on one device", SplitWarning,
                      stacklevel=3)
    constants = {n: v for n, v in builder.values.items()
                 if n not in builder.op_index and n.op not in ("get_attr", "placeholder")
                 and not _contains_tensor(v)}
    input_node = next(n for n in gm.graph.nodes if n.op == "placeholder")
    return Traced(ops, out_shape, gm, input_node, constants)
