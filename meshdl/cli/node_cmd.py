"""``meshdl node start``: run one mesh node until SIGINT/SIGTERM."""
from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from meshdl.cli.options import (bundle_identity, bundle_option, DEFAULT_BROKER, alpha_option, broker_options, connection,
                                profile_help, strategy_option, topology_help)
from meshdl.node.reaper import watch_parent

log = logging.getLogger(__name__)


@click.group()
def node() -> None:
    """Run a mesh node."""


@node.command("start")
@broker_options(default=DEFAULT_BROKER)
@bundle_option("device")
@click.option("--id", "node_id", default=None, help="Node id (default: the bundle's id, "
              "else the host name).")
@click.option("--profile", default=None, help=profile_help(
    "Device profile (compute, memory, power figures)."))
@click.option("--emulate", is_flag=True, help="Pace compute and links to the profile and "
              "topology figures instead of measuring this host.")
@click.option("--topology", default=None, help=topology_help(
    "Link figures, device figures, default source/sink/model."))
@click.option("--protocol", type=click.Choice(["auto", "5", "3.1.1"]), default="auto",
              show_default=True, help="MQTT version (amqtt needs 3.1.1).")
@click.option("--models", default="", help="Comma-separated models the leader keeps a "
              "default plan for (default: the topology's, else efficientnet_lite0).")
@strategy_option(help_extra=" Used for the default plans the leader keeps.")
@alpha_option
@click.option("--state-dir", default=None, type=click.Path(file_okay=False),
              help="Where to persist the session counter (optional).")
@click.option("--telemetry-period", default=2.0, show_default=True, type=float,
              help="Seconds between telemetry messages.")
@click.option("--no-dataplane", is_flag=True, help="Control plane only (no tensor traffic).")
@click.option("--compression", type=click.Choice(["auto", "off", "zstd", "lz4"]),
              default="auto", show_default=True,
              help="Lossless compression of tensor pieces: auto compresses on links slower "
                   "than the codec, never on fast ones.")
@click.option("--time-scale", default=1.0, show_default=True, type=float,
              help="With --emulate: every device and link K times slower (compute pacing "
                   "x K, bandwidth / K, latency x K), so this machine can emulate devices "
                   "faster than itself; reported times are K times longer.")
@click.option("--max-graphs", default=16, show_default=True, type=click.IntRange(1, 4096),
              help="Traced graphs (model, input shape) this node keeps; least recently "
                   "used dropped (memory: one graph per input shape in use).")
@click.option("--held-mb", default=256, show_default=True, type=click.IntRange(1, 1 << 20),
              help="MiB of received tensor pieces this node holds before they are used; "
                   "senders get credit for no more.")
@click.option("--shaped-links", is_flag=True, hidden=True,
              help="The kernel shapes this node's link (mesh up --netns): emulate latency "
                   "only and measure the links.")
def start(broker, mesh_name, username, password, password_file, tls_ca, bundle, node_id, profile,
          emulate, topology, protocol, models, strategy, alpha, state_dir, telemetry_period,
          no_dataplane, compression, time_scale, max_graphs, held_mb, shaped_links):
    """Join a mesh: birth state, telemetry, election, plans (and the data plane).
    Runs until Ctrl-C, SIGTERM or SIGHUP, then leaves the mesh cleanly."""
    import socket
    from dataclasses import replace

    from meshdl.node.agent import NodeAgent
    from meshdl.node.config import NodeConfig, Timing

    conn = connection(broker, username, password, password_file, tls_ca)
    username, password = conn.username, conn.password
    if bundle:
        from meshdl.security.bundle import Bundle
        b = Bundle.load(bundle)
        node_id, mesh_name = bundle_identity(b, node_id, mesh_name)
        if profile is None and b.entry_info.profile:
            profile = b.entry_info.profile
    node_id = node_id or socket.gethostname().split(".")[0]
    cfg = NodeConfig(node_id=node_id, broker=broker, mesh=mesh_name, profile=profile,
                     emulate=emulate, topology=topology, username=username,
                     password=password, tls_ca=tls_ca, bundle=bundle, protocol=protocol,
                     models=tuple(m.strip() for m in models.split(",") if m.strip()),
                     strategy=strategy, alpha=alpha, state_dir=state_dir,
                     compression=compression, time_scale=time_scale,
                     shaped_links=shaped_links, max_graphs=max_graphs,
                     held_bytes=held_mb << 20,
                     # measured links are noisier than declared ones: a larger change
                     # must persist before a re-plan
                     link_threshold=0.5 if shaped_links else 0.3,
                     timing=replace(Timing(), telemetry_period=telemetry_period,
                                    # a mesh K times slower: liveness waits K times longer
                                    stall_after=Timing().stall_after * (
                                        max(1.0, time_scale) if emulate else 1.0)))
    agent = NodeAgent(cfg, dataplane=not no_dataplane)
    stop = threading.Event()

    def on_signal(signum, frame):
        log.info("signal %d: leaving the mesh", signum)
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    # spawned by `meshdl infer` / `mesh up`: leave when that process is gone, however
    watch_parent(stop.set)
    agent.start()
    click.echo(f"node {node_id} joined mesh {mesh_name} at {agent.config.broker.split('@')[-1]} "
               f"(session {agent.session})", err=True)
    while not stop.is_set() and not agent.wait(0.2):
        pass
    agent.stop()
    if agent.exit_reason == "superseded":
        click.secho(f"error: node id {node_id} was taken over by another process", fg="red",
                    err=True)
        sys.exit(3)
