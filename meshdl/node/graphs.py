"""Traced models on a node: built by name and traced once per (model, input shape) per
process, shared by the leader's planner and the data plane. torch loads on first use.

One weight copy per model per node: the module of a model is built once and every
input shape is traced from that same module (a traced graph references the
module's parameters, it does not copy them), so 24 input shapes of resnet18 cost
one set of weights plus 24 small graphs, not 24 models."""
from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable

from meshdl.errors import PlanError
from meshdl.graph.plan import Plan

log = logging.getLogger(__name__)


def build_module(model: str):
    """Build model ``model`` (pretrained when weights ship offline), in eval mode."""
    import meshdl
    info = meshdl.models.info(model)
    net = meshdl.models.build(model, pretrained=info.pretrained_available)
    return net.eval()


def build_traced(model: str, input_shape: tuple[int, ...], module=None):
    """Trace ``module`` (default: a fresh build of ``model``) at ``input_shape``."""
    import meshdl
    net = module if module is not None else build_module(model)
    return meshdl.trace(net, tuple(input_shape), name=model)


def trim_heap() -> bool:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``); False elsewhere.

    A trace runs the model once at its input shape: its activations (tens of MiB for a
    large shape) are freed afterwards, but glibc keeps the freed pages in its heap, so
    a node that traces shape after shape (more shapes than its graph LRU holds) grew
    by ~3.5 MiB per trace (resnet18) although nothing stayed referenced."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    return bool(trim(0))


def _fx_sources() -> tuple[dict, dict]:
    """torch.fx's cache of generated forward() sources, and linecache (both keep every
    traced module's source for tracebacks, forever)."""
    import linecache
    try:
        from torch.fx.graph_module import _loader
        return getattr(_loader, "eval_cache", {}), linecache.cache
    except ImportError:
        return {}, linecache.cache


def forget_sources(keys: set) -> None:
    """Drop the generated sources of a graph that left the cache."""
    for cache in _fx_sources():
        for k in keys:
            cache.pop(k, None)


# torch.fx patches torch.nn.Module.__call__ process-wide while it traces: two traces at
# once (the leader planning, the data plane warming) corrupt each other and can leave a
# shared module unusable, so a process traces one graph at a time
_TRACING = threading.Lock()


class GraphCache:
    """(model, input shape) -> ModelGraph, built once per process, thread-safe; at most
    ``max_graphs`` kept (least recently used dropped: requested input shapes are
    bounded per request, not in number)."""

    def __init__(self, builder: Callable = build_traced, max_graphs: int = 16,
                 max_models: int = 4) -> None:
        self._builder = builder
        self.max_graphs = max_graphs
        self.max_models = max_models
        self._modules: OrderedDict[str, object] = OrderedDict()   # model -> built module
        self._module_lock = threading.Lock()
        self._graphs: OrderedDict[tuple, object] = OrderedDict()
        self._sources: dict[tuple, set] = {}      # graph -> torch.fx source cache keys
        self._locks: dict[tuple, threading.Lock] = {}
        self.traces = 0                            # graphs built (a miss each)
        self._lock = threading.Lock()
        self.models = None      # NodeModels: user models by id (meshdl.node.model_store)

    def _user(self, model: str) -> bool:
        from meshdl.models.store import is_model_id
        return self.models is not None and is_model_id(model)

    def get(self, model: str, input_shape: tuple[int, ...] | None = None):
        """The graph of ``model`` at ``input_shape`` (default: the model's own)."""
        if input_shape is None and self._user(model):
            input_shape = self.models.input_shape(model)
        elif input_shape is None:
            import meshdl
            input_shape = meshdl.models.info(model).input_shape
        key = (model, tuple(int(v) for v in input_shape))
        with self._lock:
            g = self._graphs.get(key)
            if g is not None:
                self._graphs.move_to_end(key)
                return g
            lock = self._locks.setdefault(key, threading.Lock())
        with lock:
            with self._lock:
                g = self._graphs.get(key)
            if g is None:
                t0 = time.perf_counter()
                with _TRACING:
                    before = set(_fx_sources()[0])
                    g = (self.models.trace(*key) if self._user(model) else
                         self._builder(*key, module=self._module(model))
                         if self._builder is build_traced else self._builder(*key))
                    made = set(_fx_sources()[0]) - before
                log.info("traced %s at %s in %.2f s", key[0], key[1], time.perf_counter() - t0)
                dropped = []
                with self._lock:
                    self.traces += 1
                    self._graphs[key] = g
                    self._sources[key] = made
                    while len(self._graphs) > self.max_graphs:
                        old, _ = self._graphs.popitem(last=False)
                        self._locks.pop(old, None)
                        dropped.append(self._sources.pop(old, set()))
                        log.info("dropped the traced graph of %s at %s (cache full)", *old)
                for keys in dropped:          # what the dropped graph left behind
                    forget_sources(keys)
                if dropped:     # a dropped graph is cyclic garbage: collect, then trim
                    gc.collect()
                    trim_heap()
            return g

    def size(self) -> int:
        """Graphs held now (a method, not ``__len__``: an empty cache must stay truthy
        for ``graphs or GraphCache()``)."""
        with self._lock:
            return len(self._graphs)

    def sources(self) -> int:
        """torch.fx source cache entries held for the graphs in this cache."""
        with self._lock:
            return sum(len(v) for v in self._sources.values())

    def _module(self, model: str):
        """The one built module of ``model`` (weights shared by all its shapes); at most
        ``max_models`` kept, least recently used dropped."""
        with self._module_lock:
            net = self._modules.get(model)
            if net is None:
                net = build_module(model)
                self._modules[model] = net
                while len(self._modules) > self.max_models:
                    old, _ = self._modules.popitem(last=False)
                    log.info("dropped the built module of %s (more than %d models)", old,
                             self.max_models)
            self._modules.move_to_end(model)
            return net

    def for_plan(self, plan: Plan):
        g = self.get(plan.model, plan.input_shape)
        if self._user(plan.model):      # fetch the weights of this node's stages, once
            g2 = self.models.for_plan(plan, g)
            if g2 is not g:
                with self._lock:
                    self._graphs[(plan.model, tuple(int(v) for v in plan.input_shape))] = g2
                g = g2
        if len(g.ops) != plan.num_ops:
            raise PlanError(f"plan {plan.plan_id} was made for {plan.model} with {plan.num_ops} "
                            f"ops; this node traced {len(g.ops)}: node and leader run "
                            "different meshdl versions")
        return g
