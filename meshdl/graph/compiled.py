"""Whole ranges of ops compiled into one fx GraphModule, so a whole (untiled) task runs
as fast as the model's own forward pass."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
import torch.fx as fx

log = logging.getLogger(__name__)

_LITERALS = (int, float, bool, str, type(None), torch.dtype, torch.device)


class _NotCompilable(Exception):
    pass


def _literal(v: Any) -> Any:
    if isinstance(v, torch.Size):
        return tuple(v)
    if isinstance(v, (tuple, list)):
        return type(v)(_literal(x) for x in v)
    if isinstance(v, _LITERALS):
        return v
    raise _NotCompilable(type(v).__name__)


def compile_range(traced, a: int, b: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """ops[a:b] of a traced model as one callable of the tensor at position a, or None
    when the range reads something that cannot be baked in (then ops run one by one)."""
    ops = traced.ops
    if b <= a:
        return None
    src_node = traced.input_node if a == 0 else ops[a - 1].node
    graph = fx.Graph()
    env: dict[fx.Node, Any] = {src_node: graph.placeholder("x")}

    def lookup(n: fx.Node):
        if n in env:
            return env[n]
        if n.op == "get_attr":
            env[n] = graph.get_attr(n.target)
            return env[n]
        if n in traced.constants:
            return _literal(traced.constants[n])
        if n in getattr(traced, "virtual", {}):
            env[n] = graph.node_copy(n, lookup)
            return env[n]
        raise _NotCompilable(f"{n.name} comes from before position {a}")

    try:
        for op in ops[a:b]:
            if op.node in env and op.kind == "const":
                continue
            env[op.node] = graph.node_copy(op.node, lookup)
        graph.output(env[ops[b - 1].node])
        return fx.GraphModule(traced.gm, graph)
    except _NotCompilable as exc:
        log.debug("ops [%d, %d) run op by op: %s", a, b, exc)
        return None
