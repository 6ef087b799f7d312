"""Node configuration: built once (from the CLI or by code) and passed down.

Every timing knob of the control plane lives here, so tests and benchmarks can
tighten them without touching module state.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from meshdl.errors import MeshdlError
from meshdl.wire.topics import validate_id
from meshdl.errors import WireError

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_MESH = "default"
DEFAULT_MODEL = "efficientnet_lite0"
DEFAULT_STRATEGY = "meshdl"


class NodeError(MeshdlError):
    """A node cannot start or keep running (bad configuration, duplicate id...)."""


class DuplicateNodeError(NodeError):
    """Another live process already is this node id in this mesh."""


@dataclass(frozen=True)
class Timing:
    """Control-plane timings (seconds)."""

    dup_window: float = 0.4        # wait for an "I am here" answer before birth
    settle: float = 0.4            # after birth, let retained states arrive before campaigning
    claim_window: float = 0.3      # a claim stands if no better claim for its term arrives
    rank_step: float = 0.4         # worse-ranked nodes wait rank * step before claiming
    leader_grace: float = 1.5      # a named leader not (yet) seen online counts as alive this long
    telemetry_period: float = 2.0  # periodic telemetry
    view_min_gap: float = 0.05     # min gap between "view changed" telemetry updates
    replan_debounce: float = 0.15  # collect membership changes before re-planning
    tick: float = 0.05             # election clock resolution
    heartbeat: float = 0.5         # heartbeat period on the control connection
    stall_after: float = 2.5       # a member unheard this long is out of plans and elections


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    broker: str = DEFAULT_BROKER
    mesh: str = DEFAULT_MESH
    profile: str | None = None          # name or path; None: generic / topology device
    emulate: bool = False
    topology: str | None = None         # name or path of the topology file
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    bundle: str | None = None          # meshdl.security bundle: cert identity, signing, sealing
    protocol: str = "auto"              # "auto", "5", "3.1.1" (amqtt: 3.1.1)
    models: tuple[str, ...] = ()        # default plan model(s); () -> mesh config or default
    strategy: str = DEFAULT_STRATEGY
    alpha: float = 0.5
    state_dir: str | None = None        # persists the session counter when given
    link_threshold: float = 0.3         # relative link change that triggers a re-plan
    probe_peers: int = 3                # peers probed per telemetry period (real nodes)
    max_requests: int = 32              # standing plan requests a leader keeps
    compression: str = "auto"           # tensor pieces: auto (per link), off, zstd, lz4
    time_scale: float = 1.0             # emulation: devices and links K times slower
    shaped_links: bool = False          # the kernel shapes links (mesh up --netns):
                                        # emulate link latency only, measure telemetry
    link_confirm_periods: int = 1       # the leader waits this many periods - 1 more
                                        # (nodes publish a link step only once two probes
                                        # in a row saw it: node/linkestimate.py)
    max_graphs: int = 16                # traced graphs (model, input shape) kept (LRU)
    held_bytes: int = 256 << 20         # acked pieces held before use: the node's credit
    timing: Timing = field(default_factory=Timing)

    def __post_init__(self) -> None:
        try:
            validate_id(self.node_id, "node id")
            validate_id(self.mesh, "mesh name")
        except WireError as exc:
            raise NodeError(f"{exc}; pass a plain --id / --mesh") from None
        if self.protocol not in ("auto", "5", "3.1.1"):
            raise NodeError(f"protocol must be auto, 5 or 3.1.1, not {self.protocol!r}")
        if self.compression not in ("auto", "off", "zstd", "lz4"):
            raise NodeError(f"compression must be auto, off, zstd or lz4, not "
                            f"{self.compression!r}")
        if self.max_graphs < 1 or self.held_bytes < (1 << 20):
            raise NodeError(f"max graphs {self.max_graphs} must be >= 1 and held bytes "
                            f"{self.held_bytes} >= 1 MiB")
        if not 0.0 <= self.alpha <= 1.0:
            raise NodeError(f"alpha {self.alpha} must be within [0, 1]")
        if not (isinstance(self.time_scale, (int, float)) and 0 < self.time_scale <= 1e4):
            raise NodeError(f"time scale {self.time_scale!r} must be a number in (0, 10000]; "
                            "e.g. --time-scale 4 makes every device and link 4x slower")


def next_session(state_dir: str | os.PathLike | None, node_id: str, mesh: str,
                 at_least: int = 0) -> int:
    """A session counter larger than every earlier one of this node.

    Time based (microseconds since the epoch), so it grows across restarts without
    storage; with ``state_dir`` the last value is also persisted, which keeps it
    monotonic if the wall clock steps back. ``at_least``: a session seen on the wire.
    """
    value = max(time.time_ns() // 1000, at_least + 1)
    if state_dir is None:
        return value
    path = Path(state_dir) / f"{mesh}.{node_id}.session"
    try:
        last = int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        last = 0
    value = max(value, last + 1)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(str(value))
        tmp.replace(path)
    except OSError as exc:
        raise NodeError(f"cannot persist the session counter in {path}: {exc}; fix "
                        "--state-dir or omit it") from exc
    return value
