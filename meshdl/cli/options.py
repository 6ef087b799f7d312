"""Options shared by several commands: one definition, one help text, one default.

    @broker_options(default=None)      # --broker --mesh --username --password
    def cmd(broker, mesh_name, ...):   #   --password-file --tls-ca
        conn = connection(broker, username, password, password_file, tls_ca)

Strategy and topology help is built from the registries (``meshdl.planner`` and the
shipped ``topologies/``), so a new strategy or topology shows up without a CLI edit.

Also the two waits of a command that launches a mesh (``mesh up``, its ``--netns``
form): ``wait_ready_or_stop`` and ``watch_until_stopped``.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import click

# One latency/energy weight for every command (infer, plan show, node start): 1 = the
# fastest answer. Leaders keep default plans at this alpha, so `meshdl infer` requests
# hit a plan that already exists; at 1 the objective is the latency the tables show.
DEFAULT_ALPHA = 1.0
DEFAULT_MESH = "default"
DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
ALPHA_HELP = ("Latency/energy trade-off of the plan: 1 = fastest answer, 0 = least energy "
              "(objective = alpha*latency/latency_local + (1-alpha)*energy/energy_local).")


class RegistryChoice(click.Choice):
    """A click.Choice whose choices come from a registry, loaded on first use
    (the strategy registry imports torch: not at ``meshdl --help`` time)."""

    def __init__(self, loader: Callable[[], list[str]], what: str,
                 always: tuple[str, ...] = ()) -> None:
        self._loader, self._loaded, self._what = loader, None, what
        self._always = always       # names that are always registered: no load to accept
        super().__init__([], case_sensitive=True)

    def convert(self, value, param, ctx):
        if self._loaded is None and value in self._always:
            return value
        return super().convert(value, param, ctx)

    @property
    def choices(self):          # type: ignore[override]
        if self._loaded is None:
            self._loaded = tuple(self._loader())
        return self._loaded

    @choices.setter
    def choices(self, value) -> None:       # click.Choice.__init__ assigns []
        pass

    def get_metavar(self, param, ctx=None) -> str:     # noqa: D401 (click API)
        return f"[{'|'.join(self.choices)}]"


def _strategies() -> list[str]:
    from meshdl.planner import strategies
    return strategies()


def shipped(kind: str) -> list[str]:
    """Names of the shipped topologies ("topologies") or device profiles ("nodes"),
    read from the package data directory (no YAML parsing, no heavy imports)."""
    from meshdl.data import data_dir
    return sorted(p.stem for p in data_dir(kind).glob("*.yaml"))


STRATEGY = RegistryChoice(_strategies, "strategy", always=("meshdl",))


def strategy_option(default: str = "meshdl", help_extra: str = "") -> Callable:
    return click.option("--strategy", type=STRATEGY, default=default, show_default=True,
                        help="Planning strategy (`meshdl strategies` describes each)."
                        + help_extra)


def alpha_option(f: Callable) -> Callable:
    return click.option("--alpha", type=click.FloatRange(0, 1), default=DEFAULT_ALPHA,
                        show_default=True, help=ALPHA_HELP)(f)


def topology_help(prefix: str) -> str:
    return (f"{prefix} A shipped topology ({', '.join(shipped('topologies'))}; "
            "`meshdl topologies` describes them) or a YAML file.")


def profile_help(prefix: str) -> str:
    return (f"{prefix} A shipped device profile ({', '.join(shipped('nodes'))}; "
            "`meshdl profiles` describes them) or a YAML file.")


@dataclass(frozen=True)
class Connection:
    """How to reach a broker: URL plus credentials (password never on argv if avoidable)."""
    url: str
    username: str | None = None
    password: str | None = None
    tls_ca: str | None = None
    bundle: str | None = None             # a meshdl bundle: certificate identity + keys

    @property
    def authenticated(self) -> bool:
        from meshdl.transport.urls import parse_url
        if self.bundle:
            return True
        u = parse_url(self.url)
        return bool(self.username or u.username) and (self.password is not None
                                                      or u.password is not None)

    def bus_options(self) -> dict:
        if self.bundle:
            return {"bundle": self.bundle}
        return {"username": self.username, "password": self.password, "tls_ca": self.tls_ca}


def bundle_identity(b, ident: str | None, mesh_name: str) -> tuple[str, str]:
    """(id, mesh) for a bundle: its own, and a clear error when --id/--mesh disagree."""
    if ident not in (None, b.id):
        raise click.UsageError(f"--id {ident} does not match the bundle's id {b.id}")
    if mesh_name not in (DEFAULT_MESH, b.mesh):
        raise click.UsageError(f"--mesh {mesh_name} does not match the bundle's mesh {b.mesh}")
    return b.id, b.mesh


def bundle_option(what: str, roles: tuple[str, ...] | None = None) -> Callable:
    """--bundle FILE (from `meshdl mesh add-device`/`add-client`): TLS client certificate,
    signed control messages, sealed tensors. Read when given, so a damaged file or one of
    the wrong role (``roles``, default ``what``) is named before anything connects."""
    want = roles or (what,)

    def check(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        if value is None:
            return None
        from meshdl.errors import MeshdlError
        from meshdl.security.bundle import Bundle
        try:
            b = Bundle.load(value)
        except MeshdlError as exc:
            raise click.BadParameter(str(exc)) from None
        if b.role not in want:
            raise click.BadParameter(
                f"{value} is the bundle of {b.role} {b.id!r}; this command needs a "
                f"{' or '.join(want)} bundle (`meshdl mesh add-{want[0]} ID`)")
        return value
    return click.option("--bundle", default=None, envvar="MESHDL_BUNDLE", callback=check,
                        type=click.Path(exists=True, dir_okay=False),
                        help=f"This {what}'s bundle file (`meshdl mesh add-{what}`): "
                        "authenticates with its certificate, signs control messages and "
                        "seals tensors. Needs an mqtts:// broker run by `meshdl broker`.")


def read_password_file(path: str | None) -> str | None:
    if path is None:
        return None
    from meshdl.errors import MeshdlError
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise MeshdlError(f"cannot read --password-file {path}: {exc.strerror}") from exc
    pw = text.splitlines()[0] if text else ""
    if not pw:
        raise MeshdlError(f"--password-file {path} is empty: put the password on its first "
                          "line")
    return pw


def connection(broker: str, username: str | None, password: str | None,
               password_file: str | None, tls_ca: str | None) -> Connection:
    from meshdl.errors import MeshdlError
    if password is not None and password_file is not None:
        raise click.UsageError("give --password (or MESHDL_PASSWORD) or --password-file, "
                               "not both")
    pw = password if password_file is None else read_password_file(password_file)
    if pw is not None and not username:
        from meshdl.transport.urls import parse_url
        if not parse_url(broker).username:
            raise MeshdlError("a password was given (--password, --password-file or "
                              "MESHDL_PASSWORD) but no --username")
    return Connection(broker, username or None, pw, tls_ca)


def broker_options(default: str | None = DEFAULT_BROKER, broker_help: str | None = None,
                   mesh: bool = True) -> Callable:
    """--broker, --mesh, --username, --password, --password-file, --tls-ca."""
    def deco(f: Callable) -> Callable:
        opts = [
            click.option("--broker", default=default, show_default=default is not None,
                         help=broker_help or "Broker URL: mqtt://host:port or mqtts://host:port "
                         "(TLS)."),
        ]
        if mesh:
            opts.append(click.option("--mesh", "mesh_name", default=DEFAULT_MESH,
                                     show_default=True, help="Mesh name (one broker can carry "
                                     "several meshes)."))
        opts += [
            click.option("--username", default=None, help="Broker user name."),
            click.option("--password", default=None, envvar="MESHDL_PASSWORD",
                         help="Broker password. Prefer the MESHDL_PASSWORD environment "
                         "variable or --password-file: a command-line argument shows in `ps`."),
            click.option("--password-file", default=None,
                         type=click.Path(exists=True, dir_okay=False),
                         help="Read the broker password from the first line of this file."),
            click.option("--tls-ca", default=None, type=click.Path(exists=True, dir_okay=False),
                         help="CA certificate (PEM) that signed the broker's certificate, "
                         "for mqtts://."),
        ]
        for opt in reversed(opts):
            f = opt(f)
        return f
    return deco


def fail_fast_if_refused(url: str, timeout: float = 2.0) -> None:
    """Raise at once when nothing listens at ``url`` (connection refused or no route),
    instead of letting an MQTT client retry for its whole connect timeout."""
    import socket

    from meshdl.errors import TransportError
    from meshdl.transport.urls import parse_url
    u = parse_url(url)
    try:
        with socket.create_connection((u.host, u.port), timeout=timeout):
            return
    except ConnectionRefusedError:
        why = "connection refused: nothing listens there"
    except socket.timeout:
        why = f"no answer within {timeout:g} s (a firewall, or the wrong host?)"
    except OSError as exc:
        why = exc.strerror or str(exc)
    raise TransportError(f"cannot reach the broker at {u.redacted()} ({why}); start one "
                         "(`meshdl mesh up home-4`, or mosquitto) or pass --broker with the "
                         "right host:port")


def require_live_mesh(conn: Connection, mesh_name: str, wait: float = 1.0,
                      protocol: str = "auto") -> None:
    """Fail within ~``wait`` s when the broker carries no live member of ``mesh_name``
    (naming the members seen, all offline, or none), before anything heavy loads.
    Its own short connection: retained records go to the first subscriber only once."""
    from meshdl.errors import JobError
    from meshdl.node.status import MeshWatcher
    from meshdl.transport.paho_bus import PahoBus
    from meshdl.transport.urls import parse_url
    with PahoBus(conn.url, protocol=protocol, connect_timeout=5.0,
                 **conn.bus_options()) as bus:
        w = MeshWatcher(bus, mesh_name)
        if w.wait_for(lambda s: bool(s.online), wait) is not None:
            return
        seen = sorted(w.snapshot().states)
    where = parse_url(conn.url).redacted()
    members = (f"its known member(s) {', '.join(seen[:8])}{', ...' if len(seen) > 8 else ''}"
               " are all offline" if seen else "no node has ever joined it")
    raise JobError(f"no live members on mesh {mesh_name!r} at {where}: {members}. Start nodes "
                   f"(`meshdl node start --broker {where} --mesh {mesh_name}` on each device), "
                   "check --mesh, or leave out --broker to use the embedded default")


def wait_ready_or_stop(launcher, timeout: float, stop: threading.Event):
    """``launcher.wait_ready(timeout)`` in a thread, so that ``stop`` (set on Ctrl-C or
    a signal) ends the wait at once. Returns the snapshot, or None when stopped first;
    an error of the wait is raised here."""
    ready = threading.Event()
    result: dict = {}

    def wait() -> None:
        try:
            result["snap"] = launcher.wait_ready(timeout)
        except Exception as exc:          # raised below; Ctrl-C must still work
            result["error"] = exc
        ready.set()
    threading.Thread(target=wait, daemon=True).start()
    while not stop.is_set() and not ready.wait(0.2):
        pass
    if "error" in result:
        raise result["error"]
    return result.get("snap")


def watch_until_stopped(launcher, stop: threading.Event, interval: float) -> None:
    """Until ``stop`` is set, check every ``interval`` s for launched nodes that exited;
    name them once (with the log dir) and stop watching them."""
    while not stop.is_set():
        stop.wait(interval)
        dead = [d for d, p in launcher.procs.items() if p.poll() is not None]
        if dead and not stop.is_set():
            click.secho(f"node(s) exited: {', '.join(dead)}; see {launcher.log_dir}",
                        fg="yellow", err=True)
            launcher.procs = {d: p for d, p in launcher.procs.items() if d not in dead}
