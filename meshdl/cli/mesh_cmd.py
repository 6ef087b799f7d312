"""``meshdl mesh up`` (a local emulated mesh) and ``meshdl mesh status`` (the live mesh)."""
from __future__ import annotations

import json
import signal
import threading

import click

from meshdl.cli.options import (DEFAULT_BROKER, broker_options, bundle_identity, bundle_option,
                                 connection, fail_fast_if_refused, wait_ready_or_stop,
                                 watch_until_stopped)


@click.group()
def mesh() -> None:
    """Run a local emulated mesh, or look at a live one."""


@mesh.command("up")
@click.argument("topology")
@click.option("--broker", default=None, help="Use this broker instead of starting one "
              "(default: an embedded broker on a free loopback port, with random "
              "credentials).")
@click.option("--mesh", "mesh_name", default="default", show_default=True,
              help="Mesh name.")
@click.option("--model", "models", default="", help="Model(s) to keep a plan for "
              "(comma-separated; default: the topology's, else efficientnet_lite0).")
@click.option("--backend", type=click.Choice(["auto", "mosquitto", "amqtt"]), default="auto",
              show_default=True, help="Embedded broker: mosquitto, or amqtt (pure Python); "
              "auto = mosquitto when installed.")
@click.option("--timeout", default=120.0, show_default=True, help="Seconds to wait for "
              "all members, a leader and a plan.")
@click.option("--log-dir", default=None, type=click.Path(file_okay=False),
              help="Where node logs go (default: a temp dir, removed at exit).")
@click.option("--no-dataplane", is_flag=True, help="Control plane only.")
@click.option("--netns", is_flag=True, help="Real network: the broker and each device's "
              "node in their own network namespace, joined by veth pairs shaped (tc htb, "
              "both ways) to the device's access link; needs root and iproute2 and a "
              "topology with a broker (e.g. home-wifi).")
@click.option("--time-scale", default=1.0, show_default=True, type=click.FloatRange(
              min=0.001, max=10000), help="Every device and link K times slower (compute "
              "pacing x K, bandwidth / K, latency x K) so this machine can emulate devices "
              "faster than itself; divide measured times by K.")
@click.option("--link-trace", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Reshape links during the run: lines 'time_s, device, bandwidth_mbps"
              "[, latency_ms]' (--netns: tc class change; else the emulated figures).")
@click.option("--secure", is_flag=True, help="A secure mesh: `meshdl broker` (TLS, client "
              "certificates, per-role ACL), one bundle per device, signed control messages, "
              "sealed tensors. Bundles come from the mesh authority (see --dir).")
@click.option("--dir", "authority_dir", default=None, type=click.Path(file_okay=False),
              help="With --secure: the mesh authority to use or create (default: "
              "$XDG_CONFIG_HOME/meshdl/meshes/MESH).")
def up(topology, broker, mesh_name, models, backend, timeout, log_dir, no_dataplane, netns,
       time_scale, link_trace, secure, authority_dir):
    """Start a broker and one emulated node process per device of TOPOLOGY (a shipped
    topology, see `meshdl topologies`, or a YAML file). Ctrl-C, SIGTERM or SIGHUP stops
    everything; so does the death of this process."""
    from meshdl.node.launcher import MeshUp

    model_list = [m.strip() for m in models.split(",") if m.strip()]
    if netns:
        from meshdl.cli.netns_cmd import run_netns_up
        if broker is not None:
            raise click.UsageError("--netns starts its own broker in the mesh's namespaces; "
                                   "leave out --broker")
        run_netns_up(topology, mesh_name=mesh_name, models=model_list, timeout=timeout,
                     log_dir=log_dir, dataplane=not no_dataplane, time_scale=time_scale,
                     link_trace=link_trace, telemetry_period=None)
        return
    trace = None
    if link_trace:
        from meshdl.node.linktrace import load_trace
        trace = load_trace(link_trace)
    secure_broker = local = secure_reaper = None
    if secure:
        if broker is not None:
            raise click.UsageError("--secure starts its own `meshdl broker`; leave out --broker")
        from meshdl.mesh.loader import load_topology
        from meshdl.security.broker import SecureBroker
        from meshdl.security.local import prepare
        mesh_obj = load_topology(topology)
        local = prepare(mesh_name, {d: mesh_obj.devices[d].profile for d in mesh_obj.devices},
                        authority_dir)
        from meshdl.node.reaper import Reaper
        secure_reaper = Reaper().start()        # gone with us even on SIGKILL
        try:
            secure_broker = SecureBroker(local.authority, reaper=secure_reaper).start()
        except BaseException:
            secure_reaper.close()
            raise
        broker = secure_broker.url
    launcher = MeshUp(topology, broker=broker, mesh=mesh_name,
                      models=model_list,
                      backend=backend, log_dir=log_dir, dataplane=not no_dataplane,
                      credentials=not secure, supervise=True, stop_timeout=1.0,
                      node_args=["--time-scale", repr(time_scale)] if time_scale != 1 else (),
                      bundles=local.devices if local else None,
                      watch_bundle=local.watch if local else None)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())
    try:
        launcher.start()
    except BaseException:
        if secure_broker is not None:
            secure_broker.stop()
            secure_reaper.close()
        raise
    try:
        login = f" --bundle {local.client}" if local else ""
        if launcher.password:
            pw_file = launcher.log_dir / "password"
            pw_file.write_text(launcher.password + "\n")
            pw_file.chmod(0o600)
            login = f" --username {launcher.username} --password-file {pw_file}"
        click.echo(f"broker: {launcher.url}   mesh: {mesh_name}   nodes: "
                   f"{len(launcher.devices)}   logs: {launcher.log_dir}")
        click.echo(f"waiting up to {timeout:g} s for members, a leader and a plan...")
        snap = wait_ready_or_stop(launcher, timeout, stop)
        if snap is not None:
            click.echo(render_status(snap.to_dict()))
            click.echo(f"\nmesh is up. Try: meshdl mesh status --broker {launcher.url} "
                       f"--mesh {mesh_name}{login}   (Ctrl-C stops everything)")
            if local:
                click.echo(f"secure mesh: meshdl infer sample --broker {launcher.url} "
                           f"--bundle {local.client}   (authority: {local.authority.dir})")
        if trace is not None and snap is not None:      # emulated links: set_link probes
            from meshdl.node.linktrace import TracePlayer, emulator_apply
            trace.check(launcher.mesh_obj)
            player = TracePlayer(trace, emulator_apply(launcher._watch_bus, mesh_name,
                                                       time_scale),
                                 time_scale=time_scale, latency=True,
                                 on_event=lambda e: click.echo(f"link trace: {e}", err=True))
            player.start()
        watch_until_stopped(launcher, stop, 0.2)
    finally:
        click.echo("stopping nodes and broker...", err=True)
        launcher.stop()
        if secure_broker is not None:
            secure_broker.stop()
            secure_reaper.close()


@mesh.command("status")
@broker_options(default=DEFAULT_BROKER)
@click.option("--protocol", type=click.Choice(["auto", "5", "3.1.1"]), default="auto",
              show_default=True, help="MQTT version (auto: 5, else 3.1.1).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@bundle_option("client", roles=("client", "device"))
def status(broker, mesh_name, username, password, password_file, tls_ca, protocol, as_json,
           bundle):
    """Members, leader and term, link figures and current plans (from retained records).
    Fails at once when nothing listens at --broker."""
    from meshdl.node.status import read_status

    conn = connection(broker, username, password, password_file, tls_ca)
    fail_fast_if_refused(conn.url)
    if bundle:
        from meshdl.security.bundle import Bundle
        mesh_name = bundle_identity(Bundle.load(bundle), None, mesh_name)[1]
    snap = read_status(conn.url, mesh_name, username=conn.username, password=conn.password,
                       bundle=bundle,
                       tls_ca=conn.tls_ca, protocol=protocol)
    data = snap.to_dict()
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        click.echo(render_status(data))


def _gflops(x) -> str:
    return "-" if not x else f"{x / 1e9:.2f}"


def render_status(d: dict) -> str:
    lines = [f"mesh {d['mesh']}: "
             + (f"leader {d['leader']['node']} (term {d['leader']['term']})" if d["leader"]
                else "no leader")]
    rows = [["node", "state", "profile", "GFLOP/s", "load", "links (Mbit/s, rtt ms)"]]
    for n, m in d["members"].items():
        links = ", ".join(
            f"{nb} {(f.get('throughput_bps') or f.get('bps') or 0) / 1e6:.0f}/"
            f"{(f.get('rtt_s') or 0) * 1e3:.1f}" for nb, f in sorted(m["links"].items()))
        rows.append([n, "online" if m["online"] else "offline", m["profile"],
                     _gflops(m["flops"]), "-" if m["load"] is None else f"{m['load']:.2f}",
                     links or "-"])
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if not d["members"]:
        lines.append("(no members: is this the right --broker and --mesh?)")
    lines.append("plans:" if d["plans"] else "plans: none")
    for pid, p in d["plans"].items():
        lat = p.get("latency_s")
        lines.append(f"  {pid} term {p['term']}: {p['model']} by {p['strategy']}, "
                     f"{p['source']} -> {p['sink']}, on {', '.join(p['devices'])}"
                     + (f", predicted {lat * 1e3:.1f} ms" if lat else ""))
    return "\n".join(lines)
