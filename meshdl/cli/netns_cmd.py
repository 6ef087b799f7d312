"""``meshdl mesh up TOPOLOGY --netns``: the mesh in network namespaces over shaped links.

Prints ``broker: mqtt://ADDR:PORT``, one ``namespace DEVICE: NAME`` per device, then
``ready`` once every member, a leader and a plan are there. Runs a client with
``ip netns exec NAME meshdl infer IMAGE --broker mqtt://ADDR:PORT --mesh MESH``.
Ctrl-C, SIGTERM or SIGHUP (or the end of a --link-trace run with --exit-after-trace)
tears everything down: no namespace, veth, qdisc or process is left.
"""
from __future__ import annotations

import signal
import threading

import click

from meshdl.cli.options import wait_ready_or_stop, watch_until_stopped


def run_netns_up(topology: str, *, mesh_name: str, models: list[str], timeout: float,
                 log_dir: str | None, dataplane: bool, time_scale: float,
                 link_trace: str | None, telemetry_period: float | None) -> None:
    from meshdl.node.linktrace import TracePlayer, load_trace
    from meshdl.node.netns_up import NetnsMeshUp

    trace = load_trace(link_trace) if link_trace else None
    launcher = NetnsMeshUp(topology, mesh=mesh_name, models=models, log_dir=log_dir,
                           dataplane=dataplane, time_scale=time_scale, supervise=True,
                           stop_timeout=3.0, verbose=True, telemetry_period=telemetry_period)
    if trace is not None:
        trace.check(launcher.mesh_obj)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    player = None
    try:
        launcher.start()
        for line in launcher.describe():
            click.echo(line)
        click.echo(f"(time scale {time_scale:g}: devices and links run {time_scale:g}x "
                   "slower; divide measured times by it)" if time_scale != 1 else
                   "(links shaped to the topology's access links)", err=True)
        wait_ready_or_stop(launcher, timeout, stop)
        if stop.is_set():
            return
        click.echo("ready", nl=True)
        ns = launcher.namespace(launcher.mesh_obj.defaults.get("source")
                                or sorted(launcher.mesh_obj.devices)[0])
        click.echo(f"try: ip netns exec {ns} meshdl infer IMAGE --broker {launcher.url} "
                   f"--mesh {mesh_name}   (Ctrl-C stops everything; logs: "
                   f"{launcher.log_dir})", err=True)
        for line in launcher.link_lines():
            click.echo(line, err=True)
        if trace is not None:
            player = TracePlayer(trace, launcher.shape, time_scale=time_scale,
                                 on_event=lambda e: click.echo(f"link trace: {e}", err=True))
            player.start()
        watch_until_stopped(launcher, stop, 0.5)
    finally:
        if player is not None:
            player.stop()
        click.echo("stopping nodes, broker and namespaces...", err=True)
        launcher.stop()
