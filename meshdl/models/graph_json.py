"""A user model's fx graph <-> JSON (the ``graph`` of its manifest; see
``models.store``): functions are named from a fixed allow-list, Tensor methods from a
deny-list, so a shipped graph can call nothing else.

    graph_spec(gm) -> (JSON node list, {tensor name: tensor})
    build_module(manifest, tensors) -> GraphModule  # absent tensors: 1-element stand-ins
"""
from __future__ import annotations

import math
import operator
from typing import Any

from meshdl.errors import ModelError


_DENY = frozenset({"load", "save", "from_file", "compile", "manual_seed", "seed",
                   "initial_seed", "use_deterministic_algorithms", "import_ir_module",
                   "import_ir_module_from_buffer", "fork", "wait", "vmap", "cond"})


def _callables() -> dict[str, Any]:
    """The allow-list of functions a serialised graph may call, by qualified name."""
    import torch
    import torch.nn.functional as F
    table: dict[str, Any] = {}
    for prefix, mod in (("operator", operator), ("torch", torch), ("F", F),
                        ("torch._C._nn", torch._C._nn)):
        for name in dir(mod):
            if name.startswith(("_", "set_")) or name in _DENY:
                continue
            fn = getattr(mod, name, None)
            if callable(fn) and not isinstance(fn, type):
                table.setdefault(f"{prefix}.{name}", fn)
    return table


def _fn_name(fn: Any, reverse: dict[int, str]) -> str:
    import torch
    if isinstance(fn, torch._ops.OpOverload):
        return f"aten:{fn.overloadpacket.__name__}.{fn._overloadname}"
    name = reverse.get(id(fn))
    if name is None:
        raise ModelError(f"the graph calls {fn!r}, which meshdl cannot name portably")
    return name


def _resolve(name: str, table: dict[str, Any]) -> Any:
    import torch
    if name.startswith("aten:"):
        packet, _, overload = name[5:].rpartition(".")
        try:
            return getattr(getattr(torch.ops.aten, packet), overload)
        except AttributeError:
            raise ModelError(f"model graph calls ATen op {name[5:]!r}, unknown to this "
                             "torch") from None
    fn = table.get(name)
    if fn is None:
        raise ModelError(f"model graph calls {name!r}, which is not on meshdl's allow-list "
                         "(a newer meshdl made it, or the manifest was tampered with)")
    return fn


def _enc(v: Any, names: dict) -> Any:
    import torch
    import torch.fx as fx
    if isinstance(v, fx.Node):
        return {"$n": names[v]}
    if v is None or isinstance(v, (bool, int, str)):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else {"$f": repr(v)}
    if isinstance(v, tuple):
        return {"$t": [_enc(x, names) for x in v]}
    if isinstance(v, list):
        return [_enc(x, names) for x in v]
    if isinstance(v, dict):
        return {"$d": [[k, _enc(x, names)] for k, x in v.items()]}
    if isinstance(v, slice):
        return {"$s": [_enc(v.start, names), _enc(v.stop, names), _enc(v.step, names)]}
    if v is Ellipsis:
        return {"$e": 1}
    if isinstance(v, torch.dtype):
        return {"$dt": str(v).removeprefix("torch.")}
    if isinstance(v, torch.device):
        return {"$dev": str(v)}
    if isinstance(v, torch.memory_format):
        return {"$mf": str(v).removeprefix("torch.")}
    if isinstance(v, torch.layout):
        return {"$ly": str(v).removeprefix("torch.")}
    raise ModelError(f"cannot serialise graph argument {v!r} ({type(v).__name__})")


def _dec(v: Any, env: dict) -> Any:
    import torch
    if isinstance(v, list):
        return [_dec(x, env) for x in v]
    if not isinstance(v, dict):
        return v
    if "$n" in v:
        return env[v["$n"]]
    if "$t" in v:
        return tuple(_dec(x, env) for x in v["$t"])
    if "$d" in v:
        return {k: _dec(x, env) for k, x in v["$d"]}
    if "$s" in v:
        return slice(*(_dec(x, env) for x in v["$s"]))
    if "$f" in v:
        return float(v["$f"])
    if "$e" in v:
        return Ellipsis
    for key, kind in (("$dt", torch.dtype), ("$mf", torch.memory_format),
                      ("$ly", torch.layout)):
        if key in v:
            val = getattr(torch, str(v[key]), None)
            if not isinstance(val, kind):
                raise ModelError(f"bad {key} {v[key]!r} in a model graph")
            return val
    if "$dev" in v:
        return torch.device(str(v["$dev"]))
    raise ModelError(f"bad value {str(v)[:80]} in a model graph")


def graph_spec(gm) -> tuple[list, dict[str, Any]]:
    """(JSON node list, {tensor name: tensor}) of a GraphModule of plain functions."""
    import torch
    table = _callables()
    reverse: dict[int, str] = {}
    for name, fn in sorted(table.items(), key=lambda kv: (len(kv[0]), kv[0])):
        reverse.setdefault(id(fn), name)
    names: dict = {}
    nodes, tensors = [], {}
    for n in gm.graph.nodes:
        names[n] = n.name
        if n.op == "placeholder":
            nodes.append({"op": "placeholder", "name": n.name})
        elif n.op == "get_attr":
            obj: Any = gm
            for part in n.target.split("."):
                obj = getattr(obj, part)
            if not isinstance(obj, torch.Tensor):
                raise ModelError(f"graph attribute {n.target} is not a tensor")
            tensors[n.target] = obj
            nodes.append({"op": "get_attr", "name": n.name, "target": n.target})
        elif n.op in ("call_function", "call_method"):
            target = _fn_name(n.target, reverse) if n.op == "call_function" else str(n.target)
            nodes.append({"op": n.op, "name": n.name, "target": target,
                          "args": _enc(n.args, names), "kwargs": _enc(dict(n.kwargs), names)})
        elif n.op == "output":
            nodes.append({"op": "output", "name": n.name, "args": _enc(n.args, names)})
        else:
            raise ModelError(f"graph node {n.name} ({n.op}) cannot be packaged: only "
                             "plain functions on tensors can travel to other devices")
    return nodes, tensors


_DUNDER_OK = frozenset({"__getitem__", "__add__", "__radd__", "__sub__", "__rsub__",
                        "__mul__", "__rmul__", "__truediv__", "__rtruediv__", "__neg__",
                        "__matmul__", "__pow__", "__and__", "__or__", "__invert__"})
_METHOD_DENY = frozenset({"set_", "resize_", "resize_as_", "storage", "untyped_storage",
                          "share_memory_", "data_ptr", "pin_memory", "record_stream",
                          "cuda", "to_sparse", "backward", "register_hook", "retain_grad",
                          "requires_grad_", "apply_", "map_", "map2_", "tolist", "numpy"})


def method_ok(name: str) -> bool:
    """A Tensor method a shipped graph may call: public compute methods only."""
    import torch
    if name in _METHOD_DENY or not hasattr(torch.Tensor, name):
        return False
    return not name.startswith("_") or name in _DUNDER_OK


def build_module(manifest: dict, tensors: dict[str, Any]):
    """GraphModule from a manifest; ``tensors`` maps name -> tensor for those present.
    An absent tensor is a stand-in of its shape backed by ONE element (no memory)."""
    import torch
    import torch.fx as fx
    from torch import nn
    table = _callables()
    root = nn.Module()
    for name, info in manifest["tensors"].items():
        t = tensors.get(name)
        if t is None:
            dtype = getattr(torch, info["dtype"])
            t = torch.zeros((), dtype=dtype).expand(tuple(info["shape"]))
        _set_attr(root, name, t)
    graph = fx.Graph()
    env: dict[str, Any] = {}
    for n in manifest["graph"]:
        op = n["op"]
        if op == "placeholder":
            env[n["name"]] = graph.placeholder(n["name"])
        elif op == "get_attr":
            if n["target"] not in manifest["tensors"]:
                raise ModelError(f"model graph reads tensor {n['target']!r} missing from its "
                                 "tensor table")
            env[n["name"]] = graph.get_attr(n["target"])
        elif op == "call_function":
            env[n["name"]] = graph.call_function(_resolve(n["target"], table),
                                                 _dec(n["args"], env), _dec(n["kwargs"], env))
        elif op == "call_method":
            if not method_ok(str(n["target"])):
                raise ModelError(f"model graph calls method .{n['target']}(), not on "
                                 "meshdl's allow-list")
            env[n["name"]] = graph.call_method(n["target"], _dec(n["args"], env),
                                               _dec(n["kwargs"], env))
        elif op == "output":
            graph.output(_dec(n["args"], env)[0])
        else:
            raise ModelError(f"bad node kind {op!r} in a model graph")
    return fx.GraphModule(root, graph, class_name="UserModel").eval()


def _set_attr(root, name: str, t) -> None:
    from torch import nn
    *path, leaf = name.split(".")
    mod = root
    for part in path:
        if not hasattr(mod, part):
            mod.add_module(part, nn.Module())
        mod = getattr(mod, part)
    mod.register_buffer(leaf, t)


__all__ = ["graph_spec", "build_module", "method_ok"]
