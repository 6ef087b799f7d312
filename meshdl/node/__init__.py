"""The node runtime: ``NodeAgent`` (control plane) + ``DataPlane`` (tensor traffic).

Control plane modules: ``config`` (NodeConfig, Timing, sessions), ``election`` (pure
state machine), ``membership`` (MeshState fold, duplicate-id rules), ``telemetry`` and
``probe`` (link figures), ``leader`` (planning duties), ``agent`` (wiring),
``status`` (MeshWatcher, read_status), ``launcher`` (MeshUp). Nothing is imported
here, so ``import meshdl.node.election`` stays light.
"""
