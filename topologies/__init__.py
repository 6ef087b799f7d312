"""Package data: topologies (installed as meshdl.topologies)."""
