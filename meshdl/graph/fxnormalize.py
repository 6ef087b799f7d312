"""Make a traced graph free of in-place ops, without touching the user's model.

Every in-place statement (``x.relu_()``, ``x.add_(y)``, ``torch.relu_(x)``, ``x += y``,
``x[i] = v``, ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)`` ...) becomes its
out-of-place form, and every later use (in program order) of the mutated tensor, or of
a tensor sharing its storage with the same geometry, reads the new value instead. The
result is a pure dataflow graph: no task can mutate data another task or branch reads,
and dead-code elimination cannot drop a statement whose only effect was a mutation.

Aliasing is observed, not guessed: the original graph runs once on a real input, and
storage identity tells which nodes share the mutated tensor. A mutation that reaches a
partial view of a tensor used later, or a parameter/buffer of the model, cannot be
rewritten exactly; ``normalize`` then returns a reason, and the caller runs the model
whole (exact, just not split).
"""
from __future__ import annotations

import copy
import inspect
import logging
import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

log = logging.getLogger(__name__)

_INPLACE_OPERATORS = {operator.iadd: operator.add, operator.isub: operator.sub,
                      operator.imul: operator.mul, operator.itruediv: operator.truediv,
                      operator.ifloordiv: operator.floordiv, operator.ipow: operator.pow,
                      operator.imod: operator.mod, operator.iand: operator.and_,
                      operator.ior: operator.or_, operator.ixor: operator.xor,
                      operator.ilshift: operator.lshift, operator.irshift: operator.rshift,
                      operator.imatmul: operator.matmul}
_NOT_MUTATING = {"requires_grad_", "share_memory_", "retain_grad_"}


def setitem_out_of_place(x: Any, index: Any, value: Any) -> Any:
    """``x[index] = value`` as a new tensor (the out-of-place form of ``operator.setitem``)."""
    y = x.clone() if isinstance(x, torch.Tensor) else copy.copy(x)
    y[index] = value
    return y


def method_out_of_place(x: torch.Tensor, name: str, *args: Any, **kwargs: Any) -> Any:
    """An in-place method with no out-of-place twin, applied to a copy."""
    return getattr(x.clone(), name)(*args, **kwargs)


def function_out_of_place(fn: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """An in-place function with no out-of-place twin, applied to a copy."""
    return fn(x.clone(), *args, **kwargs)


def _bind_inplace(fn: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """(args, kwargs) with ``inplace=False`` when ``fn`` was called with inplace true."""
    if kwargs.get("inplace") is True:
        return args, {**kwargs, "inplace": False}
    try:
        sig = inspect.signature(fn)
        bound = sig.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    if bound.arguments.get("inplace") is not True:
        return None
    names = list(sig.parameters)
    pos = names.index("inplace")
    if pos < len(args):
        args = args[:pos] + (False,) + args[pos + 1:]
        return args, kwargs
    return args, {**kwargs, "inplace": False}


def _out_of_place_function(fn: Any) -> Any | None:
    name = getattr(fn, "__name__", "")
    if not name.endswith("_") or name.endswith("__"):
        return None
    for ns in (F, torch, torch.nn.functional):
        if getattr(ns, name, None) is fn:
            twin = getattr(ns, name[:-1], None)
            if callable(twin):
                return twin
    return None


class _Mutation:
    """How to rewrite one in-place node: the node and the argument it mutates."""

    def __init__(self, node: fx.Node, target: fx.Node, rewrite):
        self.node, self.target, self.rewrite = node, target, rewrite


def find_mutations(gm: fx.GraphModule) -> list[_Mutation]:
    """Every in-place node of ``gm``, in program order, with its rewrite."""
    modules = dict(gm.named_modules())
    out: list[_Mutation] = []
    for node in gm.graph.nodes:
        first = node.args[0] if node.args else None
        if not isinstance(first, fx.Node):
            continue
        if node.op == "call_method":
            name = node.target
            if not name.endswith("_") or name.endswith("__") or name in _NOT_MUTATING:
                continue
            twin = name[:-1]
            if callable(getattr(torch.Tensor, twin, None)):
                def rw(n, twin=twin):
                    n.target = twin
            else:
                def rw(n, name=name):
                    n.op, n.target = "call_function", method_out_of_place
                    n.args = (n.args[0], name, *n.args[1:])
            out.append(_Mutation(node, first, rw))
        elif node.op == "call_function":
            fn = node.target
            if fn in _INPLACE_OPERATORS:
                def rw(n, twin=_INPLACE_OPERATORS[fn]):
                    n.target = twin
                out.append(_Mutation(node, first, rw))
            elif fn is operator.setitem:
                def rw(n):
                    n.target = setitem_out_of_place
                out.append(_Mutation(node, first, rw))
            elif _out_of_place_function(fn) is not None:
                def rw(n, twin=_out_of_place_function(fn)):
                    n.target = twin
                out.append(_Mutation(node, first, rw))
            elif getattr(fn, "__name__", "").endswith("_") and not getattr(
                    fn, "__name__", "").endswith("__") and getattr(fn, "__module__", "") in (
                    "torch", "torch._C._VariableFunctions", "torch.nn.functional"):
                def rw(n, fn=fn):
                    n.target = function_out_of_place
                    n.args = (fn, *n.args)
                out.append(_Mutation(node, first, rw))
            else:
                bound = _bind_inplace(fn, tuple(node.args), dict(node.kwargs))
                if bound is not None:
                    def rw(n, fn=fn):       # from the args as rewired by earlier rewrites
                        n.args, n.kwargs = _bind_inplace(fn, tuple(n.args), dict(n.kwargs))
                    out.append(_Mutation(node, first, rw))
        elif node.op == "call_module":
            m = modules.get(node.target)
            if m is not None and getattr(m, "inplace", False) is True:
                def rw(n, m=m, gm=gm):
                    twin = copy.copy(m)            # shallow: shares parameters, not flags
                    twin.inplace = False
                    name = "_meshdl_oop_" + str(n.target).replace(".", "_")
                    k = 0
                    while hasattr(gm, f"{name}_{k}"):
                        k += 1
                    gm.add_submodule(f"{name}_{k}", twin)   # on gm itself, never the model
                    n.target = f"{name}_{k}"
                out.append(_Mutation(node, first, rw))
    return out


def run_values(gm: fx.GraphModule, x: torch.Tensor) -> dict[fx.Node, Any]:
    """Every node's value on input ``x``, all kept alive (storage identity stays
    meaningful). Parameters and buffers are read through copies, so a graph that
    mutates them leaves the model untouched."""
    modules = dict(gm.named_modules())
    values: dict[fx.Node, Any] = {}
    with torch.no_grad():
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                values[node] = x
            elif node.op == "get_attr":
                obj: Any = gm
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                values[node] = obj.clone() if isinstance(obj, torch.Tensor) else obj
            elif node.op == "output":
                values[node] = fx.node.map_arg(node.args[0], lambda n: values[n])
            else:
                args = fx.node.map_arg(node.args, lambda n: values[n])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: values[n])
                if node.op == "call_module":
                    values[node] = modules[node.target](*args, **kwargs)
                elif node.op == "call_function":
                    values[node] = node.target(*args, **kwargs)
                else:
                    values[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
    return values


def _geometry(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
            tuple(t.stride()), t.dtype)


def _tensors(v: Any):
    if isinstance(v, torch.Tensor):
        yield v
    elif isinstance(v, (list, tuple)):
        for x in v:
            yield from _tensors(x)
    elif isinstance(v, dict):
        for x in v.values():
            yield from _tensors(x)


def normalize(gm: fx.GraphModule, x: torch.Tensor) -> str | None:
    """Rewrite ``gm`` (a fresh trace) in place so it has no in-place ops. Returns None
    on success, else why the rewrite would not be exact (``gm`` is then untouched)."""
    muts = find_mutations(gm)
    if not muts:
        return None
    values = run_values(gm, x.clone())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    plan: list[tuple[_Mutation, list[fx.Node]]] = []
    for mut in muts:
        v = values.get(mut.target)
        if mut.target.op == "get_attr":
            return f"{mut.node.name} mutates model state {mut.target.target!r}"
        if not isinstance(v, torch.Tensor) or v.numel() == 0:
            plan.append((mut, [mut.target]))
            continue
        geo = _geometry(v)
        ptr = geo[0]
        at = order[mut.node]
        same: list[fx.Node] = []
        for n, val in values.items():
            if n.op == "output" or order[n] >= at:
                continue        # tensors made after the mutation already read its result
            for t in _tensors(val):
                if t.numel() == 0 or t.untyped_storage().data_ptr() != ptr:
                    continue
                later = [u for u in n.users if order[u] > at]
                if isinstance(val, torch.Tensor) and _geometry(t) == geo:
                    if n.op == "get_attr" and later:
                        return f"{mut.node.name} mutates model state {n.target!r}"
                    same.append(n)
                elif later:
                    return (f"{mut.node.name} ({mut.node.target}) mutates a tensor that "
                            f"{n.name} views partially")
        if mut.target not in same:
            same.append(mut.target)
        plan.append((mut, same))
    for mut, aliases in plan:
        at = order[mut.node]
        mut.rewrite(mut.node)
        for a in aliases:
            for user in list(a.users):
                if user is not mut.node and order[user] > at:
                    user.replace_input_with(a, mut.node)
    gm.graph.lint()
    gm.recompile()
    log.debug("rewrote %d in-place ops out of place", len(muts))
    return None


class WholeModel(nn.Module):
    """A model meshdl runs as one op (exact, never split): the fallback for graphs
    whose in-place aliasing cannot be rewritten."""

    def __init__(self, inner: nn.Module, reason: str):
        super().__init__()
        self.inner = inner
        self.reason = reason

    def forward(self, x):
        return self.inner(x)


def whole_graph(gm: fx.GraphModule, reason: str) -> fx.GraphModule:
    """A one-op graph running ``gm`` as is."""
    root = nn.Module()
    root.add_module("whole", WholeModel(gm, reason))
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_module("whole", (x,))
    graph.output(y)
    return fx.GraphModule(root, graph)
