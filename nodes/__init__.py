"""Package data: nodes (installed as meshdl.nodes)."""
