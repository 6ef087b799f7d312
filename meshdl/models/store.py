"""Content-addressed user models: a canonical package (graph + tensor table) and the
on-disk cache under the user cache dir.

A model's id is the sha256 of its canonical form: the fx graph (plain torch functions,
serialised as JSON with functions named from a fixed allow-list), the input shape, and
for every tensor its name, dtype, shape and sha256. Tensors are stored by their own
sha256, so a node keeps exactly the tensors of the ops it runs, and two models sharing
a tensor store it once.

    package(loaded_model) -> Package          # id, manifest (no weights), tensor bytes
    build_module(manifest, tensors) -> GraphModule  # absent tensors: 1-element stand-ins
    ModelStore(root).put/has/get..., entries(), remove(id)

Layout: ``$XDG_CACHE_HOME/meshdl/models/{id}.json`` (manifest) and
``.../tensors/{sha256}`` (raw little-endian bytes). ``MESHDL_CACHE_DIR`` overrides the
root. No pickle anywhere: manifests are JSON, tensors raw bytes. The graph's JSON form
(``graph_spec``, ``build_module``, re-exported here) lives in ``models.graph_json``.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from meshdl.errors import ModelError
from meshdl.models.graph_json import build_module, graph_spec, method_ok  # re-exported

log = logging.getLogger(__name__)

HASH_RE = re.compile(r"[0-9a-f]{64}")
FORMAT = 1
_DTYPES = ("float32", "float64", "float16", "int64", "int32", "int16", "int8", "uint8",
           "bool")


def is_model_id(text: Any) -> bool:
    """Whether ``text`` is a user model's id (64 lowercase hex digits)."""
    return isinstance(text, str) and HASH_RE.fullmatch(text) is not None


def cache_root() -> Path:
    """``$MESHDL_CACHE_DIR``, else ``$XDG_CACHE_HOME/meshdl``, else ``~/.cache/meshdl``."""
    env = os.environ.get("MESHDL_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "meshdl"


def sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_bytes(t) -> bytes:
    import numpy as np
    arr = t.detach().contiguous().cpu().numpy()
    return np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()


def tensor_from_bytes(data: bytes | memoryview, info: dict):
    import numpy as np
    import torch
    dtype = np.dtype(info["dtype"]).newbyteorder("<")
    arr = np.frombuffer(data, dtype=dtype).reshape(tuple(info["shape"]))
    return torch.from_numpy(arr.astype(arr.dtype.newbyteorder("="), copy=True))


# ------------------------------------------------------------------ packages
@dataclass(frozen=True)
class Package:
    id: str
    manifest: dict             # graph, tensor table, input shape, meta (no weights)
    blobs: dict[str, bytes]    # tensor sha256 -> raw bytes


def canonical_id(manifest: dict) -> str:
    """sha256 over the graph, input shape and tensor table (names, dtypes, shapes,
    content hashes): the weights and the graph, not the metadata."""
    core = {"format": manifest.get("format"), "graph": manifest["graph"],
            "input_shape": manifest["input_shape"],
            "tensors": {k: [v["dtype"], v["shape"], v["sha256"]]
                        for k, v in sorted(manifest["tensors"].items())}}
    return sha256(json.dumps(core, sort_keys=True, separators=(",", ":")).encode())


def package(lm) -> Package:
    """Package a LoadedModel (file model or zoo model + weights) for the mesh."""
    import torch.fx as fx
    gm = lm.module
    if not isinstance(gm, fx.GraphModule) or _has_modules(gm):
        gm = _functionalise(gm, lm.input_shape)
    nodes, tensors = graph_spec(gm)
    table, blobs = {}, {}
    for name, t in tensors.items():
        data = tensor_bytes(t)
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ModelError(f"tensor {name} has dtype {dtype}; meshdl ships {_DTYPES}")
        h = sha256(data)
        table[name] = {"dtype": dtype, "shape": [int(s) for s in t.shape], "sha256": h,
                       "bytes": len(data)}
        blobs[h] = data
    for n in nodes:
        if n["op"] == "call_method" and not method_ok(n["target"]):
            raise ModelError(f"{lm.source}: the graph calls .{n['target']}(), which meshdl "
                             "does not ship to other devices")
    manifest = {"format": FORMAT, "graph": nodes, "tensors": table,
                "input_shape": [int(v) for v in lm.input_shape],
                "meta": {"name": lm.name, "kind": lm.kind, "origin": lm.source,
                         "mean": list(lm.mean), "std": list(lm.std), "resize": lm.resize,
                         "labels": list(lm.labels) if lm.labels else None}}
    return Package(canonical_id(manifest), manifest, blobs)


def _has_modules(gm) -> bool:
    return any(n.op == "call_module" for n in gm.graph.nodes)


def _functionalise(module, shape):
    """A module of nn layers (a zoo model) -> GraphModule of plain functions, by
    exporting it and normalising the ATen graph."""
    import torch
    from meshdl.graph.aten import normalise
    ep = torch.export.export(module.eval(), (torch.zeros(tuple(shape)),))
    return normalise(ep)


def manifest_bytes(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def parse_manifest(data: bytes | memoryview, expect_id: str | None = None) -> dict:
    """Decode and check a manifest; ModelError if it is malformed or does not hash to
    ``expect_id`` (a tampered or mismatched model is refused)."""
    try:
        manifest = json.loads(bytes(data))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelError(f"model manifest is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or \
            not isinstance(manifest.get("graph"), list) or \
            not isinstance(manifest.get("tensors"), dict) or \
            not isinstance(manifest.get("input_shape"), list):
        raise ModelError("model manifest lacks graph/tensors/input_shape (format "
                         f"{FORMAT}); sender and receiver run different meshdl versions?")
    for name, info in manifest["tensors"].items():
        if not isinstance(info, dict) or info.get("dtype") not in _DTYPES or \
                not HASH_RE.fullmatch(str(info.get("sha256", ""))) or \
                not isinstance(info.get("shape"), list) or not isinstance(info.get("bytes"), int):
            raise ModelError(f"model manifest: bad entry for tensor {name!r}")
    if expect_id is not None:
        got = canonical_id(manifest)
        if got != expect_id:
            raise ModelError(f"model manifest hashes to {got[:12]}..., not the requested "
                             f"{expect_id[:12]}...: refused (corrupt or tampered)")
    return manifest


# ------------------------------------------------------------------ the cache
@dataclass(frozen=True)
class Entry:
    id: str
    name: str
    kind: str
    origin: str
    tensors: int               # tensors in the model
    present: int               # tensors held here
    bytes_held: int            # bytes of the tensors held here
    bytes_total: int


class ModelStore:
    """Manifests and tensor blobs under ``root`` (default: ``cache_root()``)."""

    def __init__(self, root: str | Path | None = None) -> None:
        self.root = Path(root) if root is not None else cache_root()
        self.models_dir = self.root / "models"
        self.tensors_dir = self.root / "tensors"

    # ---- manifests
    def manifest_path(self, model_id: str) -> Path:
        if not is_model_id(model_id):
            raise ModelError(f"{model_id!r} is not a model id (64 hex digits)")
        return self.models_dir / f"{model_id}.json"

    def has_manifest(self, model_id: str) -> bool:
        return self.manifest_path(model_id).is_file()

    def manifest(self, model_id: str) -> dict:
        p = self.manifest_path(model_id)
        try:
            return parse_manifest(p.read_bytes(), model_id)
        except FileNotFoundError:
            raise ModelError(f"model {model_id[:12]}... is not in the cache {self.root}") \
                from None

    def put_manifest(self, model_id: str, manifest: dict) -> None:
        data = manifest_bytes(manifest)
        parse_manifest(data, model_id)
        _atomic_write(self.manifest_path(model_id), data)

    # ---- tensors
    def tensor_path(self, digest: str) -> Path:
        if not HASH_RE.fullmatch(digest):
            raise ModelError(f"bad tensor hash {digest!r}")
        return self.tensors_dir / digest

    def has_tensor(self, digest: str) -> bool:
        return self.tensor_path(digest).is_file()

    def read_tensor(self, digest: str) -> bytes:
        data = self.tensor_path(digest).read_bytes()
        if sha256(data) != digest:
            self.tensor_path(digest).unlink(missing_ok=True)
            raise ModelError(f"cached tensor {digest[:12]}... is corrupt; it was removed and "
                             "will be fetched again")
        return data

    def put_tensor(self, digest: str, data: bytes | memoryview) -> None:
        if sha256(data) != digest:
            raise ModelError(f"tensor data hashes to {sha256(data)[:12]}..., not "
                             f"{digest[:12]}...: refused")
        _atomic_write(self.tensor_path(digest), bytes(data))

    def put_package(self, pkg: Package) -> None:
        for digest, data in pkg.blobs.items():
            if not self.has_tensor(digest):
                self.put_tensor(digest, data)
        self.put_manifest(pkg.id, pkg.manifest)

    def load_tensors(self, manifest: dict, names: Iterable[str]) -> dict[str, Any]:
        out = {}
        for name in names:
            info = manifest["tensors"][name]
            out[name] = tensor_from_bytes(self.read_tensor(info["sha256"]), info)
        return out

    # ---- listing
    def ids(self) -> list[str]:
        if not self.models_dir.is_dir():
            return []
        return sorted(p.stem for p in self.models_dir.glob("*.json") if is_model_id(p.stem))

    def entries(self) -> list[Entry]:
        out = []
        for mid in self.ids():
            try:
                m = json.loads(self.manifest_path(mid).read_bytes())
            except (OSError, ValueError):
                continue
            meta = m.get("meta") or {}
            infos = list(m.get("tensors", {}).values())
            held = [i for i in infos if self.tensor_path(i["sha256"]).is_file()]
            out.append(Entry(mid, str(meta.get("name", "?")), str(meta.get("kind", "?")),
                             str(meta.get("origin", "?")), len(infos), len(held),
                             sum(i["bytes"] for i in held), sum(i["bytes"] for i in infos)))
        return out

    def bytes_held(self) -> int:
        if not self.tensors_dir.is_dir():
            return 0
        return sum(p.stat().st_size for p in self.tensors_dir.iterdir() if p.is_file())

    def remove(self, prefix: str) -> list[str]:
        """Remove the model(s) whose id starts with ``prefix`` and the tensors no other
        cached model uses. Returns the removed ids."""
        prefix = prefix.lower()
        matches = [m for m in self.ids() if m.startswith(prefix)]
        if not prefix or not matches:
            raise ModelError(f"no cached model id starts with {prefix!r} in {self.root}")
        if len(matches) > 1:
            raise ModelError(f"{prefix!r} matches {len(matches)} models; give more digits")
        keep: set[str] = set()
        for mid in self.ids():
            if mid not in matches:
                try:
                    m = json.loads(self.manifest_path(mid).read_bytes())
                    keep |= {i["sha256"] for i in m.get("tensors", {}).values()}
                except (OSError, ValueError):
                    continue
        for mid in matches:
            p = self.manifest_path(mid)
            try:
                m = json.loads(p.read_bytes())
                for i in m.get("tensors", {}).values():
                    if i["sha256"] not in keep:
                        self.tensor_path(i["sha256"]).unlink(missing_ok=True)
            except (OSError, ValueError):
                pass
            p.unlink(missing_ok=True)
        return matches


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".part-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
