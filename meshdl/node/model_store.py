"""User models over MQTT (issue 13): offer, serve and fetch manifests and weights.

A client offers a model by publishing its manifest (graph + tensor table, no weights)
retained on ``model/{id}/manifest`` and serving its tensors. A node that plans or runs
the model reads the manifest (the leader plans with it alone) and fetches only the
tensors of the ops in its own stages: it asks on ``model/{id}/want`` for the chunks it
lacks (a selective ack: the request names exactly the missing chunks), a provider answers
with data-plane piece frames (CRC-32 per chunk, see :mod:`meshdl.wire.codec`) on
``model/{id}/data/{node}``, the node reassembles them, checks each tensor's sha256 and
stores it in its cache. A corrupt chunk is dropped and asked for again; a tensor or
manifest whose hash does not match is refused. Cached tensors survive restarts, and
every node serves what it holds to others (``to: "*"`` requests).

    NodeModels(bus, mesh, node_id)      # a node: GraphCache hook (trace / for_plan)
    ClientModels(bus, mesh, client_id)  # a client: offer(path or LoadedModel)

torch is imported lazily (a node's control plane stays torch-free).
"""
from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import msgpack

from meshdl.security.bounds import sanitise
from meshdl.errors import ModelError, WireError
from meshdl.models.store import (ModelStore, cache_root, is_model_id, manifest_bytes,
                                 parse_manifest, sha256)
from meshdl.wire import topics

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 << 10        # protocol constant: chunk i covers [i*C, (i+1)*C)
WINDOW_BYTES = 4 << 20         # requested but not yet received, per fetch
STALL_S = 3.0                  # no chunk for this long: ask again for what is missing
MAX_REFUSALS = 3               # wrong-hash deliveries of one tensor before giving up
MANIFEST_WAIT_S = 30.0         # an offer not seen by then: the job fails, naming the model
JOB = "model"                  # job id of model frames (the piece id is the tensor sha256)


def nchunks(nbytes: int) -> int:
    return max(1, -(-nbytes // CHUNK_BYTES))


def _want(node: str, to: str, items: list) -> bytes:
    return msgpack.packb({"v": 1, "node": node, "to": to, "want": items})


def _parse_want(payload: bytes) -> tuple[str, str, list]:
    try:
        m = msgpack.unpackb(bytes(payload), raw=False, max_bin_len=0, max_str_len=256,
                            max_array_len=1 << 16)
        node, to, items = m["node"], m["to"], m["want"]
        topics.validate_id(node, "node id")
        if not isinstance(items, list) or not isinstance(to, str):
            raise ValueError("bad fields")
        return node, to, items
    except (ValueError, TypeError, KeyError, msgpack.UnpackException, WireError) as exc:
        raise WireError(f"malformed model request: {exc}") from None


def sender_problem(kind: str | None, sender: str, body: bytes) -> str:
    """Why a signed model message from ``sender`` is not admissible ("" if it is): a
    request must be in the sender's own name; offers and chunks are checked against
    their content hashes by the receiver, so any enrolled identity may send them."""
    if kind == "want":
        try:
            node, _, _ = _parse_want(body)
        except WireError as exc:
            return str(exc)
        if node != sender:
            return f"asked for model chunks in the name of {node!r}"
    return ""


# ------------------------------------------------------------------ serving
class Provider:
    """Answers chunk requests for tensors held in ``store`` (or pinned in memory), on
    one sender thread (publishing never blocks the bus dispatcher)."""

    def __init__(self, bus: Any, mesh: str, node_id: str, store: ModelStore) -> None:
        self.bus, self.mesh, self.node_id, self.store = bus, mesh, node_id, store
        self._pinned: dict[str, bytes] = {}
        self._last: tuple[str, bytes] = ("", b"")
        self._q: queue.Queue = queue.Queue(maxsize=256)
        self._stop = threading.Event()
        self.chunks_sent = 0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"model-serve-{node_id}")

    def start(self) -> "Provider":
        self._thread.start()
        self.bus.subscribe(topics.model_want_all(self.mesh), self._on_want, qos=1)
        return self

    def stop(self, wait: float = 1.0) -> None:
        self._stop.set()
        try:
            self.bus.unsubscribe(topics.model_want_all(self.mesh))
        except Exception:   # the bus may be closed already
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(wait)

    def offer(self, model_id: str, manifest: dict, blobs: dict[str, bytes]) -> None:
        """Pin ``blobs`` and publish the manifest retained (the mesh can fetch it)."""
        self._pinned.update(blobs)
        payload = msgpack.packb({"v": 1, "provider": self.node_id,
                                 "manifest": manifest_bytes(manifest)})
        self.bus.publish(topics.model_manifest(self.mesh, model_id), payload, qos=1,
                         retain=True)

    def _on_want(self, topic: str, payload: bytes, retained: bool = False) -> None:
        if retained:
            return
        try:
            node, to, items = _parse_want(payload)
        except WireError as exc:
            log.info("dropped a model request on %s: %s", sanitise(topic, 160), exc)
            return
        if to not in (self.node_id, "*") or node == self.node_id:
            return
        model_id = topic.split("/")[-2]
        try:
            self._q.put_nowait((model_id, node, items))
        except queue.Full:
            log.warning("model request queue full; %s will ask again", node)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                model_id, node, items = self._q.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                self._serve(model_id, node, items)
            except Exception as exc:   # a bad request or a closed bus must not kill us
                log.warning("serving %s to %s failed: %s", model_id[:12], node, exc)

    def _serve(self, model_id: str, node: str, items: list) -> None:
        import numpy as np
        from meshdl.wire.codec import encode_frames
        topic = topics.model_data(self.mesh, model_id, node)
        for item in items[:1024]:
            digest, chunks, seq = str(item[0]), item[1], int(item[2]) if len(item) > 2 else 0
            data = self._pinned.get(digest)
            if data is None and self._last[0] == digest:
                data = self._last[1]          # windows of one tensor: read (and hash) once
            if data is None:
                try:
                    if not self.store.has_tensor(digest):
                        continue
                    data = self.store.read_tensor(digest)
                except ModelError:
                    continue
                self._last = (digest, data)
            frames = encode_frames(JOB, digest, np.frombuffer(data, dtype=np.uint8),
                                   chunk_bytes=CHUNK_BYTES, seq=seq)
            wanted = range(len(frames)) if chunks is None else \
                [int(c) for c in chunks if 0 <= int(c) < len(frames)]
            for i in wanted:
                self.bus.publish(topic, self._mutate(bytes(frames[i])), qos=1)
                self.chunks_sent += 1

    def _mutate(self, frame: bytes) -> bytes:
        """The frame as sent (a seam for fault-injection tests)."""
        return frame


# ------------------------------------------------------------------ fetching
@dataclass
class _Want:
    info: dict
    seq: int = 0
    refusals: int = 0
    inflight: dict[int, float] = field(default_factory=dict)


class Fetcher:
    """Fetches manifests and tensors into ``store``; counters for tests and logs."""

    def __init__(self, bus: Any, mesh: str, node_id: str, store: ModelStore,
                 links: Callable[[], Any] | None = None) -> None:
        from meshdl.wire.reassembly import Reassembler
        self.bus, self.mesh, self.node_id, self.store = bus, mesh, node_id, store
        self._links = links      # -> emulation.Links: chunks cross this node's downlink
        self._reasm = Reassembler(ttl_s=600.0)
        self._cv = threading.Condition()
        self._wants: dict[str, _Want] = {}
        self._done: set[str] = set()
        self._providers: dict[str, str] = {}
        self.corrupt_chunks = 0
        self.refused = 0
        self.fetched_bytes = 0
        self.requests = 0

    # ---- manifests
    def manifest(self, model_id: str, timeout: float) -> dict:
        if self.store.has_manifest(model_id):
            return self.store.manifest(model_id)
        box: dict[str, Any] = {}
        ev = threading.Event()

        def on_offer(topic: str, payload: bytes, retained: bool = False) -> None:
            if not payload:
                return
            try:
                m = msgpack.unpackb(bytes(payload), raw=False)
                box["manifest"] = parse_manifest(m["manifest"], model_id)
                box["provider"] = str(m.get("provider") or "*")
            except (ModelError, ValueError, TypeError, KeyError,
                    msgpack.UnpackException) as exc:
                box["error"] = str(exc)
            ev.set()

        topic = topics.model_manifest(self.mesh, model_id)
        self.bus.subscribe(topic, on_offer, qos=1)
        try:
            if not ev.wait(timeout):
                raise ModelError(f"model {model_id[:12]}... was not offered on mesh "
                                 f"{self.mesh!r} within {timeout:g} s: the client that "
                                 "runs it offers it (MeshClient.infer(x, model=PATH))")
        finally:
            self.bus.unsubscribe(topic)
        if "manifest" not in box:
            self.refused += 1
            raise ModelError(f"model {model_id[:12]}...: offer refused: {box.get('error')}")
        self.store.put_manifest(model_id, box["manifest"])
        self._providers[model_id] = box["provider"]
        log.info("model %s: manifest from %s (%d tensors)", model_id[:12], box["provider"],
                 len(box["manifest"]["tensors"]))
        return box["manifest"]

    # ---- tensors
    def fetch(self, model_id: str, manifest: dict, names, timeout: float) -> int:
        """Make every tensor in ``names`` present in the store. Returns bytes fetched."""
        todo: dict[str, dict] = {}
        for name in names:
            info = manifest["tensors"][name]
            if not self.store.has_tensor(info["sha256"]):
                todo[info["sha256"]] = info
        if not todo:
            return 0
        topic = topics.model_data(self.mesh, model_id, self.node_id)
        with self._cv:
            for digest, info in todo.items():
                self._wants.setdefault(digest, _Want(info))
                self._done.discard(digest)
        self.bus.subscribe(topic, self._on_data, qos=1)
        provider = self._providers.get(model_id, "*")
        total = sum(i["bytes"] for i in todo.values())
        t0 = time.monotonic()
        deadline = t0 + timeout
        last_progress, stalls, got = t0, 0, 0
        try:
            while True:
                with self._cv:
                    left = [d for d in todo if d not in self._done]
                    if not left:
                        break
                    now = time.monotonic()
                    if now >= deadline:
                        raise ModelError(
                            f"model {model_id[:12]}...: {len(left)} tensor(s) "
                            f"({sum(todo[d]['bytes'] for d in left)} bytes) did not arrive "
                            f"within {timeout:g} s from {provider!r} or any node holding them")
                    failed = [d for d in left if self._wants[d].refusals >= MAX_REFUSALS]
                    if failed:
                        raise ModelError(f"model {model_id[:12]}...: tensor {failed[0][:12]}"
                                         f"... arrived {MAX_REFUSALS} times with the wrong "
                                         "sha256: refused (a corrupt or tampered source)")
                    if now - last_progress > STALL_S:      # resume: ask again for the rest
                        for d in left:
                            self._wants[d].inflight.clear()
                        stalls += 1
                        last_progress = now
                    to = provider if stalls < 2 else "*"
                    items = self._requests(left)
                progressed = got
                if items:
                    self.requests += 1
                    self.bus.publish(topics.model_want(self.mesh, model_id),
                                     _want(self.node_id, to, items), qos=1)
                with self._cv:
                    self._cv.wait(0.25)
                    got = self.fetched_bytes
                if got != progressed:
                    last_progress = time.monotonic()
        finally:
            self.bus.unsubscribe(topic)
        log.info("model %s: fetched %d tensor(s), %d bytes in %.2f s (%d corrupt chunk(s) "
                 "re-asked, %d refused)", model_id[:12], len(todo), total,
                 time.monotonic() - t0, self.corrupt_chunks, self.refused)
        return total

    def _requests(self, left: list[str]) -> list:
        """Chunks to ask for now (missing, not in flight), within the window."""
        budget = WINDOW_BYTES // CHUNK_BYTES - sum(len(self._wants[d].inflight) for d in left)
        items, now = [], time.monotonic()
        for d in left:
            if budget <= 0:
                break
            w = self._wants[d]
            missing = self._reasm.missing(JOB, d) or list(range(nchunks(w.info["bytes"])))
            ask = [c for c in missing if c not in w.inflight][:max(0, budget)]
            if ask:
                for c in ask:
                    w.inflight[c] = now
                budget -= len(ask)
                items.append([d, ask, w.seq])
        return items

    def _on_data(self, topic: str, payload: bytes, retained: bool = False) -> None:
        links = self._links() if self._links is not None else None
        if links is None:
            self._handle(payload)
            return
        data = bytes(payload)      # an emulated star mesh: held for the downlink first
        links.downlink(len(data), False, lambda: self._handle(data))

    def _handle(self, payload: bytes) -> None:
        from meshdl.wire.codec import PieceFrame, decode_frame
        try:
            frame = decode_frame(payload)
        except WireError as exc:
            with self._cv:
                self.corrupt_chunks += 1
            log.info("model chunk dropped (%s); it will be asked for again", exc)
            return
        if not isinstance(frame, PieceFrame) or frame.job != JOB:
            return
        with self._cv:
            w = self._wants.get(frame.piece)
            if w is None or frame.piece in self._done or frame.seq != w.seq:
                return
            w.inflight.pop(frame.chunk, None)
        try:
            arr = self._reasm.add(frame)
        except WireError as exc:
            log.info("model chunk rejected: %s", exc)
            return
        with self._cv:
            self.fetched_bytes += len(frame.data)
            if arr is not None:
                self._complete(frame.piece, w, arr.tobytes())
            self._cv.notify_all()

    def _complete(self, digest: str, w: _Want, data: bytes) -> None:
        if sha256(data) != digest:
            w.refusals += 1
            w.seq += 1                 # a fresh attempt: the reassembler starts over
            w.inflight.clear()
            self.refused += 1
            log.warning("tensor %s... arrived with the wrong sha256: refused (%d)",
                        digest[:12], w.refusals)
            return
        self.store.put_tensor(digest, data)
        self._done.add(digest)
        self._wants.pop(digest, None)


# ------------------------------------------------------------------ node side
def needed_tensors(g, plan, node_id: str) -> frozenset[str]:
    """Names of the graph tensors the ops of ``node_id``'s stages read."""
    op_nodes = {op.node for op in g.ops}
    names: set[str] = set()
    for stage in plan.stages:
        if not any(t.device == node_id for t in stage.tasks):
            continue
        for op in g.ops[stage.start:stage.end]:
            stack = list(op.node.all_input_nodes)
            seen = set()
            while stack:
                n = stack.pop()
                if n in seen or n in op_nodes:
                    continue
                seen.add(n)
                if n.op == "get_attr":
                    names.add(n.target)
                elif n.op != "placeholder":
                    stack.extend(n.all_input_nodes)
    return frozenset(names)


class NodeModels:
    """A node's user models: manifest for planning, weights of its own stages only."""

    def __init__(self, bus: Any, mesh: str, node_id: str, root: str | Path | None = None,
                 timeout: float = 300.0, links: Callable[[], Any] | None = None) -> None:
        self.node_id = node_id
        self.store = ModelStore(root or cache_root() / "nodes" / node_id)
        self.fetcher = Fetcher(bus, mesh, node_id, self.store, links)
        self.provider = Provider(bus, mesh, node_id, self.store).start()
        self.timeout = timeout
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def stop(self) -> None:
        self.provider.stop()

    def _model_lock(self, model_id: str) -> threading.Lock:
        with self._lock:
            return self._locks.setdefault(model_id, threading.Lock())

    def input_shape(self, model_id: str) -> tuple[int, ...]:
        return tuple(self.fetcher.manifest(model_id, MANIFEST_WAIT_S)["input_shape"])

    def trace(self, model_id: str, input_shape) -> Any:
        """The model's graph with stand-in weights: structure and shapes for planning."""
        import meshdl
        from meshdl.models.store import build_module
        manifest = self.fetcher.manifest(model_id, MANIFEST_WAIT_S)
        shape = tuple(int(v) for v in manifest["input_shape"])
        if input_shape is not None and tuple(input_shape) != shape:
            raise ModelError(f"model {model_id[:12]}... takes input {shape}, not "
                             f"{tuple(input_shape)}")
        g = meshdl.trace(build_module(manifest, {}), shape, name=model_id)
        g.held_tensors = frozenset()
        return g

    def for_plan(self, plan, g) -> Any:
        """``g`` with real weights for every op of this node's stages (fetched once)."""
        import meshdl
        from meshdl.models.store import build_module
        names = needed_tensors(g, plan, self.node_id)
        held = getattr(g, "held_tensors", frozenset())
        if names <= held:
            return g
        with self._model_lock(plan.model):
            manifest = self.fetcher.manifest(plan.model, MANIFEST_WAIT_S)
            self.fetcher.fetch(plan.model, manifest, names - held, self.timeout)
            keep = held | names
            gm = build_module(manifest, self.store.load_tensors(manifest, keep))
            from meshdl.node import graphs   # fx patches globally: one trace at a time
            with getattr(graphs, "_TRACING", None) or contextlib.nullcontext():
                g2 = meshdl.trace(gm, tuple(manifest["input_shape"]), name=plan.model)
            if len(g2.ops) != len(g.ops):
                raise ModelError(f"model {plan.model[:12]}... traced to {len(g2.ops)} ops "
                                 f"with its weights, {len(g.ops)} without")
            g2.held_tensors = keep
            log.info("%s holds %d of %d tensors of model %s", self.node_id, len(keep),
                     len(manifest["tensors"]), plan.model[:12])
            return g2


def attach(agent: Any) -> None:
    """Give a node agent's GraphCache the user-model source (called once the buses are
    up); bulk model traffic uses the data connection when there is one."""
    bus = getattr(agent, "data_bus", None) or agent.bus
    agent.graphs.models = NodeModels(
        bus, agent.mesh_name, agent.node_id,
        links=lambda: getattr(getattr(agent, "dataplane", None), "links", None))


# ------------------------------------------------------------------ client side
class ClientModels:
    """A client's offered models: loaded, packaged, cached, served."""

    def __init__(self, bus: Any, mesh: str, client_id: str,
                 root: str | Path | None = None) -> None:
        self.store = ModelStore(root)
        self.provider = Provider(bus, mesh, client_id, self.store).start()
        self._offers: dict[Any, tuple[Any, str]] = {}
        self._lock = threading.Lock()

    def offer(self, model: Any, **opts: Any) -> tuple[Any, str]:
        """(LoadedModel, model id) of a path / LoadedModel, offered to the mesh."""
        import meshdl
        from meshdl.models.files import LoadedModel
        from meshdl.models.store import package
        key = id(model) if isinstance(model, LoadedModel) else \
            (str(model), tuple(sorted((k, str(v)) for k, v in opts.items())))
        with self._lock:
            hit = self._offers.get(key)
            if hit is not None:
                return hit
            lm = model if isinstance(model, LoadedModel) else meshdl.models.load(model, **opts)
            pkg = package(lm)
            self.store.put_package(pkg)
            self.provider.offer(pkg.id, pkg.manifest, pkg.blobs)
            log.info("offered model %s (%s, %d tensors, %.1f MB)", pkg.id[:12], lm.name,
                     len(pkg.blobs), sum(map(len, pkg.blobs.values())) / 1e6)
            self._offers[key] = (lm, pkg.id)
            return lm, pkg.id

    def stop(self) -> None:
        self.provider.stop()


def model_label(model_id: str) -> str:
    return f"{model_id[:12]}..." if is_model_id(model_id) else model_id
