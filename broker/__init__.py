"""Package data: broker (installed as meshdl.broker_conf)."""
