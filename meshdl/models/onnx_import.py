"""ONNX -> torch.fx: a GraphModule of plain torch functions, initializers as buffers.

The model is converted at one fixed input shape (meshdl traces and splits at a fixed
shape anyway): every node whose inputs are all constants (initializers, ``Shape`` of the
input, ...) is evaluated once here and becomes a buffer, so the graph keeps only ops on
activations: ``F.conv2d``, ``F.batch_norm``, ``F.max_pool2d``, ``operator.add``,
``torch.cat``, ``.reshape()`` ... the same ops meshdl's tracer and region rules know from
hand-written models. Op implementations live in :mod:`meshdl.models.onnx_ops`.

    convert(path_or_proto, input_shape=None) -> Converted(gm, input_shape, meta)
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from meshdl.errors import ModelError

log = logging.getLogger(__name__)


class Dyn:
    """A value computed from the model input: an fx node and its example value."""

    __slots__ = ("node", "example")

    def __init__(self, node: fx.Node, example: torch.Tensor) -> None:
        self.node, self.example = node, example

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.example.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.example.dtype


def example(v: Any) -> Any:
    """The concrete value of ``v`` (a Dyn's example, a constant as is), recursively."""
    if isinstance(v, Dyn):
        return v.example
    if isinstance(v, (list, tuple)):
        return type(v)(example(x) for x in v)
    if isinstance(v, dict):
        return {k: example(x) for k, x in v.items()}
    return v


def _has_dyn(v: Any) -> bool:
    if isinstance(v, Dyn):
        return True
    if isinstance(v, (list, tuple)):
        return any(_has_dyn(x) for x in v)
    if isinstance(v, dict):
        return any(_has_dyn(x) for x in v.values())
    return False


@dataclass
class Converted:
    gm: fx.GraphModule
    input_shape: tuple[int, ...]
    meta: dict[str, str] = field(default_factory=dict)   # metadata_props
    input_name: str = ""
    output_name: str = ""


class Builder:
    """Emits fx nodes for ops on activations and folds ops on constants."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.graph = fx.Graph()
        self.root = nn.Module()
        self._names: dict[int, str] = {}     # id(tensor) -> buffer name (dedup)
        self._keep: list[torch.Tensor] = []  # keeps ids valid
        self.node_desc = ""
        self.init_names: dict[int, str] = {}   # id(initializer tensor) -> its ONNX name

    # ---- constants
    def buffer(self, t: torch.Tensor, hint: str = "c") -> fx.Node:
        name = self._names.get(id(t))
        if name is None:
            base = re.sub(r"\W", "_", self.init_names.get(id(t), hint)).strip("_") or "c"
            if base[0].isdigit():
                base = "t_" + base
            name, k = base, 1
            while hasattr(self.root, name):
                k += 1
                name = f"{base}_{k}"
            self.root.register_buffer(name, t.detach().contiguous())
            self._names[id(t)] = name
            self._keep.append(t)
        return self.graph.get_attr(name)

    def _arg(self, v: Any, hint: str) -> Any:
        if isinstance(v, Dyn):
            return v.node
        if isinstance(v, torch.Tensor):
            if v.dim() == 0 and hint == "scalar":
                return v.item()
            return self.buffer(v, hint)
        if isinstance(v, (list, tuple)):
            return type(v)(self._arg(x, hint) for x in v)
        return v

    # ---- ops
    def call(self, fn: Callable, *args: Any, hint: str = "c", **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)``: folded when no argument depends on the input, else
        an fx call_function node (constant tensors become buffers)."""
        value = self._run(lambda: fn(*example(args), **example(kwargs)), fn)
        if not (_has_dyn(args) or _has_dyn(kwargs)):
            return value
        node = self.graph.call_function(fn, self._arg(args, hint), self._arg(kwargs, hint))
        return Dyn(node, value)

    def method(self, name: str, x: Any, *args: Any) -> Any:
        value = self._run(lambda: getattr(example(x), name)(*example(args)), name)
        if not isinstance(x, Dyn) and not _has_dyn(args):
            return value
        node = self.graph.call_method(name, (self._arg(x, "c"), *self._arg(args, "c")))
        return Dyn(node, value)

    def _run(self, thunk: Callable[[], Any], what: Any) -> Any:
        try:
            with torch.no_grad():
                return thunk()
        except ModelError:
            raise
        except Exception as exc:
            name = getattr(what, "__name__", str(what))
            raise ModelError(f"{self.source}: node {self.node_desc} failed while converting "
                             f"({name}: {str(exc).splitlines()[0][:200] if str(exc) else exc!r})"
                             ) from exc


# ------------------------------------------------------------------ loading
def load_proto(path: str | Path):
    """Parse an ONNX file; ModelError naming the file when it is not one."""
    import onnx
    from google.protobuf.message import DecodeError
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"model file {str(p)!r} does not exist (or is not a file)")
    try:
        proto = onnx.load(str(p))
    except (DecodeError, ValueError, RuntimeError, OSError) as exc:
        raise ModelError(f"{str(p)!r} is not a readable ONNX model (truncated or another "
                         f"format?): {str(exc).splitlines()[0][:200] if str(exc) else exc!r}"
                         ) from exc
    if not proto.graph.node:
        raise ModelError(f"{str(p)!r} is not an ONNX model: it holds no graph nodes "
                         "(truncated, or another format?)")
    return proto


def _tensor(t, source: str) -> torch.Tensor:
    from onnx import numpy_helper
    try:
        arr = numpy_helper.to_array(t)
    except Exception as exc:
        raise ModelError(f"{source}: initializer {t.name!r} cannot be read ({exc}); the file "
                         "may be truncated or use external data that is missing") from exc
    if arr.dtype == np.float16 or arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    if arr.dtype == np.uint64 or arr.dtype == np.uint32:
        arr = arr.astype(np.int64)
    return torch.from_numpy(np.array(arr, copy=True))


def _input_shape(value_info, override, source: str) -> tuple[int, ...]:
    dims = value_info.type.tensor_type.shape.dim
    shape = []
    for i, d in enumerate(dims):
        if d.HasField("dim_value") and d.dim_value > 0:
            shape.append(int(d.dim_value))
        elif i == 0:
            shape.append(1)          # batch: one image
        else:
            shape.append(-1)
    if override is not None:
        override = tuple(int(v) for v in override)
        if len(override) == 2 and len(shape) == 4:       # H x W
            if shape[3] in (1, 3) and shape[1] not in (1, 3):    # N, H, W, C
                shape = [shape[0], *override, shape[3]]
            else:
                shape = [shape[0], shape[1], *override]
        elif len(override) == len(shape):
            shape = list(override)
        else:
            raise ModelError(f"{source}: input size {override} does not fit the model's "
                             f"{len(shape)}-D input {tuple(shape)}")
    if any(v < 0 for v in shape) or not shape:
        raise ModelError(f"{source}: the model input {value_info.name!r} has a free size "
                         f"({tuple(shape)}); pass --input-size HxW (or input_shape=...)")
    return tuple(shape)


def convert(model: Any, input_shape: tuple[int, ...] | None = None,
            source: str | None = None) -> Converted:
    """Convert an ONNX file (path) or ModelProto to a GraphModule at ``input_shape``
    (default: the file's own input shape; a 2-tuple means H x W)."""
    from meshdl.models import onnx_ops
    if isinstance(model, (str, Path)):
        source = source or str(model)
        proto = load_proto(model)
    else:
        proto = model
        source = source or "<onnx model>"
    g = proto.graph
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    for o in proto.opset_import:
        if o.domain not in ("", "ai.onnx") and any(n.domain == o.domain for n in g.node):
            bad = next(n for n in g.node if n.domain == o.domain)
            raise ModelError(f"{source}: node {bad.name!r} uses op {o.domain}.{bad.op_type} "
                             "from a custom domain; meshdl runs standard ONNX ops only")
    values: dict[str, Any] = {}
    b = Builder(source)
    for t in g.initializer:
        values[t.name] = _tensor(t, source)
        b.init_names[id(values[t.name])] = t.name
    inputs = [i for i in g.input if i.name not in values]
    if len(inputs) != 1:
        raise ModelError(f"{source}: meshdl runs models with exactly one input; this one "
                         f"takes {len(inputs)} ({[i.name for i in inputs]})")
    shape = _input_shape(inputs[0], input_shape, source)
    elem = inputs[0].type.tensor_type.elem_type
    if elem not in (1, 10, 11, 0):     # float, float16, double, undefined
        raise ModelError(f"{source}: input {inputs[0].name!r} is not a float tensor "
                         f"(ONNX type {elem}); meshdl feeds images as float32")
    x = b.graph.placeholder("x")
    values[inputs[0].name] = Dyn(x, torch.zeros(shape))
    values[""] = None
    for i, node in enumerate(g.node):
        b.node_desc = f"{node.name or '#' + str(i)!r} (op {node.op_type})"
        fn = onnx_ops.OPS.get(node.op_type)
        if fn is None:
            raise ModelError(f"{source}: node {node.name or '#' + str(i)!r} uses op "
                             f"{node.op_type!r}, which meshdl cannot run (supported: "
                             f"{', '.join(sorted(onnx_ops.OPS))})")
        try:
            args = [values[n] for n in node.input]
        except KeyError as exc:
            raise ModelError(f"{source}: node {b.node_desc} reads {exc.args[0]!r}, which no "
                             "earlier node produces (a truncated or unsorted graph)") from None
        while args and args[-1] is None:
            args.pop()
        attrs = onnx_ops.attributes(node, source)
        out = fn(b, args, attrs, opset=opset, node=node)
        outs = out if isinstance(out, list) else [out]
        for name, v in zip(node.output, outs):
            values[name] = v
    if not g.output:
        raise ModelError(f"{source}: the graph declares no output")
    if len(g.output) > 1:
        log.warning("%s has %d outputs; meshdl uses the first (%s)", source, len(g.output),
                    g.output[0].name)
    out = values.get(g.output[0].name)
    if not isinstance(out, Dyn):
        raise ModelError(f"{source}: output {g.output[0].name!r} does not depend on the input")
    if out.example.dtype != torch.float32:
        out = b.method("float", out)
    b.graph.output(out.node)
    b.graph.eliminate_dead_code()
    gm = fx.GraphModule(b.root, b.graph, class_name="OnnxModel")
    _drop_unused(gm)
    meta = {p.key: p.value for p in proto.metadata_props}
    return Converted(gm.eval(), shape, meta, inputs[0].name, g.output[0].name)


def _drop_unused(gm: fx.GraphModule) -> None:
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [n for n, _ in gm.named_buffers() if n not in used]:
        delattr(gm, name)
