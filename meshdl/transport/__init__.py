"""Transport: the ``Bus`` protocol, PahoBus (paho-mqtt), MemoryBus, EmbeddedBroker.

Import the concrete classes from their modules (``meshdl.transport.paho_bus`` etc.)
or from here; nothing is imported until used.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "Bus": "meshdl.transport.bus", "Will": "meshdl.transport.bus",
    "Handler": "meshdl.transport.bus",
    "MemoryBroker": "meshdl.transport.memory", "MemoryBus": "meshdl.transport.memory",
    "PahoBus": "meshdl.transport.paho_bus",
    "EmbeddedBroker": "meshdl.transport.broker",
    "BrokerURL": "meshdl.transport.urls", "parse_url": "meshdl.transport.urls",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'meshdl.transport' has no attribute {name!r}")
    return getattr(importlib.import_module(_LAZY[name]), name)
