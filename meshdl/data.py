"""Where installed package data lives (device profiles, topologies, broker configs)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

_PACKAGES = {"nodes": "meshdl.nodes", "topologies": "meshdl.topologies",
             "broker": "meshdl.broker_conf"}


def data_dir(kind: str) -> Path:
    """Directory of one kind of package data: "nodes", "topologies" or "broker"."""
    return Path(str(resources.files(_PACKAGES[kind])))
