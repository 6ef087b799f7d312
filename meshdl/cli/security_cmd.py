"""`meshdl mesh init/add-device/add-client` and `meshdl broker` (issue 12)."""
from __future__ import annotations

import signal
import threading
from pathlib import Path

import click


def register(main: click.Group, mesh: click.Group) -> None:
    mesh.add_command(init)
    mesh.add_command(add_device)
    mesh.add_command(add_client)
    mesh.add_command(revoke)
    main.add_command(broker)


@click.command("init")
@click.argument("name")
@click.option("--dir", "directory", default=None, type=click.Path(file_okay=False),
              help="Where to keep the authority (default: $XDG_CONFIG_HOME/meshdl/meshes/NAME).")
def init(name, directory):
    """Create a mesh authority: a CA for TLS and the mesh's Ed25519 signing key (0700 dir)."""
    from meshdl.security.authority import init_authority
    a = init_authority(name, directory)
    click.echo(f"mesh {a.name}: authority in {a.dir} (keep it private; back it up)")
    click.echo(f"next: meshdl mesh add-device ID --profile P --dir {a.dir}; "
               f"meshdl broker --dir {a.dir}")


def _issue(ident, role, profile, directory, mesh_name, output):
    from meshdl.security.authority import find_authority, write_bundle
    a = find_authority(directory, mesh_name)
    bundle = a.issue(ident, role, profile)
    out = Path(output or f"{ident}.bundle")
    write_bundle(bundle, out)
    what = f"profile {bundle['profile']}" if role == "device" else "client"
    click.echo(f"{role} {ident} enrolled in mesh {a.name} ({what}): {out} (0600; copy it to "
               f"the {role} over a private channel)")
    click.echo("a running `meshdl broker` picks the new identity up on SIGHUP or restart",
               err=True)


@click.command("add-device")
@click.argument("ident", metavar="ID")
@click.option("--profile", default=None, help="Enrolled device profile (rpi4, ...): caps the "
              "FLOP/s and link speed this device may claim. Default: generic.")
@click.option("--dir", "directory", default=None, type=click.Path(file_okay=False),
              help="Mesh authority directory (default: the only one in the user config dir).")
@click.option("--mesh", "mesh_name", default=None, help="Authority by mesh name.")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Bundle file to write (default: ID.bundle).")
def add_device(ident, profile, directory, mesh_name, output):
    """Enrol a device: one bundle file (certificate, keys, CA, mesh key, profile)."""
    _issue(ident, "device", profile, directory, mesh_name, output)


@click.command("add-client")
@click.argument("ident", metavar="ID")
@click.option("--dir", "directory", default=None, type=click.Path(file_okay=False),
              help="Mesh authority directory (default: the only one in the user config dir).")
@click.option("--mesh", "mesh_name", default=None, help="Authority by mesh name.")
@click.option("-o", "--output", default=None, type=click.Path(dir_okay=False),
              help="Bundle file to write (default: ID.bundle).")
def add_client(ident, directory, mesh_name, output):
    """Enrol a client (it may request jobs and read its results)."""
    _issue(ident, "client", None, directory, mesh_name, output)


@click.command("broker")
@click.option("--dir", "directory", default=None, type=click.Path(file_okay=False),
              help="Mesh authority directory (default: the only one in the user config dir).")
@click.option("--mesh", "mesh_name", default=None, help="Authority by mesh name.")
@click.option("--bind", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface).")
@click.option("--port", default=8883, show_default=True, type=int,
              help="TCP port to listen on (MQTT over TLS).")
@click.option("--memory-mb", default=None, type=click.IntRange(min=0),
              help="Heap the broker may hold, in MB (default: half this host's memory, at "
              "most 4096; 0: no limit). Past it a publish is dropped and its publisher "
              "disconnected, so a flood cannot take the host down.")
def broker(directory, mesh_name, bind, port, memory_mb):
    """Run mosquitto for a secure mesh: TLS, client certificates as identity, per-role ACL."""
    from meshdl.security.authority import find_authority
    from meshdl.security.broker import SecureBroker
    a = find_authority(directory, mesh_name)
    stop = threading.Event()
    b = SecureBroker(a, bind, port, memory_limit=None if memory_mb is None else memory_mb << 20)
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: b.reload())
    with b:
        heap = f"heap up to {b.memory_limit >> 20} MB" if b.memory_limit else "no heap limit"
        click.echo(f"{b.url}  (mesh {a.name}; {len(a.roster())} enrolled; {heap}; Ctrl-C "
                   "stops)", err=False)
        while not stop.wait(0.5):
            if b.proc is None or b.proc.poll() is not None:
                raise click.ClickException("mosquitto exited: " + b.log_text()[-500:])


@click.command("revoke")
@click.argument("ident", metavar="ID")
@click.option("--dir", "directory", default=None, type=click.Path(file_okay=False),
              help="Mesh authority directory (default: the only one in the user config dir).")
@click.option("--mesh", "mesh_name", default=None, help="Authority by mesh name.")
def revoke(ident, directory, mesh_name):
    """Revoke a device or client (a lost or stolen bundle): its certificate goes on the
    broker's CRL and it leaves the ACL. Restart `meshdl broker` (or send it SIGHUP)."""
    from meshdl.security.authority import find_authority
    a = find_authority(directory, mesh_name)
    a.revoke(ident)
    click.echo(f"{ident} revoked in mesh {a.name}; restart `meshdl broker` (or kill -HUP it) "
               "so the broker refuses its certificate")
