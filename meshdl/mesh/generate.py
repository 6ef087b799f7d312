"""Random meshes: devices scattered on a square, linked when closer than a radius
(a random geometric graph, as in distributedCNNs), made connected.

``random_mesh(500, seed=1)`` takes a few milliseconds: neighbours come from a
scipy KD-tree, components from scipy's sparse graph routines.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping

import numpy as np

from meshdl.errors import TopologyError
from meshdl.mesh.model import Device, Link, Mesh
from meshdl.mesh.profiles import Profile, load_profile

log = logging.getLogger(__name__)

# distributedCNNs' default: 45% BeagleBone AI, 45% OrangePi Zero, 10% Pi 3B+,
# positions in [-15, 15]^2 for 50 units, link iff distance < 7.5, 72.2 Mbit/s.
DISTCNN_MIX = (("beaglebone_ai", 0.45), ("orangepi_zero", 0.45), ("rpi3bplus_seed", 0.10))
DISTCNN_RADIUS = 7.5
DISTCNN_HALF_WIDTH = 15.0
DISTCNN_UNITS = 50


def mix_counts(n: int, mix: Mapping[str, float]) -> dict[str, int]:
    """Split n devices by the fractions in ``mix`` (largest remainder; ties go to the
    profile listed first). ``mix_counts(50, 45/45/10)`` -> 23/22/5."""
    if n < 1:
        raise TopologyError(f"a mesh needs at least one device, got n={n}")
    total = float(sum(mix.values()))
    if not mix or total <= 0 or any(f < 0 for f in mix.values()):
        raise TopologyError(f"profile mix {dict(mix)!r} must have non-negative fractions "
                            "with a positive sum")
    exact = {name: n * f / total for name, f in mix.items()}
    counts = {name: math.floor(x) for name, x in exact.items()}
    order = sorted(mix, key=lambda k: (-(exact[k] - counts[k]), list(mix).index(k)))
    for name in order[:n - sum(counts.values())]:
        counts[name] += 1
    return counts


def _connect(points: np.ndarray, pairs: set[tuple[int, int]]) -> list[tuple[int, int]]:
    """Extra pairs that join every component to the rest, each the shortest
    bridge out of a component (Boruvka rounds). Deterministic."""
    n = len(points)
    added: list[tuple[int, int]] = []
    while True:
        from scipy.sparse import coo_matrix          # scipy loads only when generating
        from scipy.sparse.csgraph import connected_components
        from scipy.spatial import cKDTree
        all_pairs = list(pairs) + added
        if all_pairs:
            i, j = np.array(all_pairs).T
            adj = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
        else:
            adj = coo_matrix((n, n))
        count, labels = connected_components(adj, directed=False)
        if count <= 1:
            return added
        bridges = set()
        for comp in range(count):
            inside = np.flatnonzero(labels == comp)
            outside = np.flatnonzero(labels != comp)
            dist, idx = cKDTree(points[outside]).query(points[inside])
            k = int(np.argmin(dist))
            u, v = int(inside[k]), int(outside[idx[k]])
            bridges.add((min(u, v), max(u, v)))
        added.extend(sorted(bridges))


def random_mesh(n: int, seed: int, mix: Mapping[str, float] | None = None,
                radius: float | None = None, area: float | None = None,
                bandwidth_mbps: tuple[float, float] = (20.0, 100.0),
                latency_ms: tuple[float, float] = (1.0, 5.0), *,
                profiles: Mapping[str, Profile] | None = None, connect: bool = True,
                prefix: str = "n", name: str | None = None) -> Mesh:
    """A random geometric mesh of ``n`` devices.

    mix: profile name -> fraction (default distributedCNNs' 45/45/10 mix); exact
    counts by largest remainder, shuffled. area: half-width of the square
    [-area, area]^2 (default keeps distributedCNNs' density, 15*sqrt(n/50)).
    radius: link iff distance < radius (default 7.5). Bandwidth and latency are
    uniform in the given (lo, hi) ranges. connect: add the shortest bridging links
    until the mesh is connected. profiles: Profile objects to use instead of
    loading the installed ones. Device ids are ``{prefix}{index}`` zero-padded.
    """
    mix = dict(mix) if mix is not None else dict(DISTCNN_MIX)
    radius = DISTCNN_RADIUS if radius is None else float(radius)
    area = DISTCNN_HALF_WIDTH * math.sqrt(n / DISTCNN_UNITS) if area is None else float(area)
    if radius <= 0 or area <= 0:
        raise TopologyError(f"radius ({radius}) and area ({area}) must be positive")
    lo, hi = (float(x) for x in bandwidth_mbps)
    if not 0 < lo <= hi:
        raise TopologyError(f"bandwidth_mbps range {bandwidth_mbps!r} must be 0 < lo <= hi")
    lat_lo, lat_hi = (float(x) for x in latency_ms)
    if not 0 <= lat_lo <= lat_hi:
        raise TopologyError(f"latency_ms range {latency_ms!r} must be 0 <= lo <= hi")
    counts = mix_counts(n, mix)
    chosen = {k: (profiles[k] if profiles and k in profiles else load_profile(k))
              for k, c in counts.items() if c}

    rng = np.random.default_rng(seed)
    points = rng.uniform(-area, area, size=(n, 2))
    kinds = np.array([k for k, c in counts.items() for _ in range(c)], dtype=object)
    kinds = kinds[rng.permutation(n)]
    from scipy.spatial import cKDTree
    tree = cKDTree(points)
    found = tree.query_pairs(radius, output_type="ndarray").reshape(-1, 2)
    close = np.linalg.norm(points[found[:, 0]] - points[found[:, 1]], axis=1) < radius
    pairs = {(int(min(i, j)), int(max(i, j))) for i, j in found[close]}
    extra = _connect(points, pairs) if connect else []
    if extra:
        log.info("random_mesh(n=%d, seed=%d): added %d bridging links to connect it",
                 n, seed, len(extra))
    edges = sorted(pairs) + extra
    bw = rng.uniform(lo, hi, size=len(edges)) if hi > lo else np.full(len(edges), lo)
    lat = rng.uniform(lat_lo, lat_hi, size=len(edges)) if lat_hi > lat_lo \
        else np.full(len(edges), lat_lo)

    width = len(str(n - 1))
    ids = [f"{prefix}{i:0{width}d}" for i in range(n)]
    devices = {}
    for i, dev_id in enumerate(ids):
        prof = chosen[kinds[i]]
        devices[dev_id] = Device(id=dev_id, profile=prof.name, flops=prof.flops,
                                 memory_bytes=prof.memory_bytes, power=prof.power,
                                 meta={"pos": (float(points[i, 0]), float(points[i, 1]))})
    links = tuple(Link(ids[i], ids[j], bandwidth_bps=float(b) * 1e6,
                       latency_s=float(t) / 1e3)
                  for (i, j), b, t in zip(edges, bw, lat))
    return Mesh(name=name or f"random-{n}-s{seed}", devices=devices, links=links,
                meta={"generator": {"n": n, "seed": seed, "mix": mix, "radius": radius,
                                    "area": area, "bandwidth_mbps": [lo, hi],
                                    "latency_ms": [lat_lo, lat_hi],
                                    "bridging_links": len(extra)}})
