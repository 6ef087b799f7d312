"""The ``meshdl`` command. This package alone configures logging and prints.

One module per command or command group, listed in ``COMMANDS`` below (add yours
there). Shared options (broker connection, strategy, alpha) live in ``options``.

Signals: SIGINT, SIGTERM and SIGHUP all unwind the command (context managers stop what
it started: nodes, broker, temp dirs); a second signal during that cleanup is ignored so
the cleanup finishes (it is bounded to ~2 s). Exit status 128 + signal number.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import click

from meshdl import __version__
from meshdl.errors import MeshdlError

log = logging.getLogger("meshdl")


class Interrupted(BaseException):
    """Raised in the main thread by the first SIGINT/SIGTERM/SIGHUP."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _Signals:
    """First signal: raise Interrupted (unwinds, cleanup runs). Later ones: noted only."""

    def __init__(self) -> None:
        self.received: int | None = None

    def handle(self, signum: int, frame) -> None:
        log.debug("signal %d", signum)
        if self.received is None:
            self.received = signum
            raise Interrupted(signum)
        try:
            sys.stderr.write("still stopping what this command started ...\n")
        except (OSError, ValueError):
            pass

    def install(self) -> dict:
        """Install the handlers; returns the previous ones (for ``restore``)."""
        prev = {}
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            try:
                prev[sig] = signal.signal(sig, self.handle)
            except (ValueError, OSError):      # not the main thread (e.g. CliRunner in a thread)
                break
        return prev

    @staticmethod
    def restore(prev: dict) -> None:
        for sig, handler in prev.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, OSError, TypeError):
                pass


def _exit_now(code: int) -> None:
    """Everything this command started is stopped: in a real process, run the atexit
    handlers, then skip the interpreter's slow teardown (torch's) so a signal returns
    at once; under a test runner (captured stdout), exit normally."""
    if sys.stdout is sys.__stdout__ and threading.current_thread() is threading.main_thread():
        import atexit
        run_exitfuncs = getattr(atexit, "_run_exitfuncs", None)
        if run_exitfuncs is not None:       # e.g. removing a bundle's temp TLS files
            run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


class MeshdlGroup(click.Group):
    """Turns every MeshdlError into one clear line and exit status 2 (no traceback), and
    a signal into a clean stop with exit status 128 + signal."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MeshdlError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)
        except Interrupted as exc:
            log.debug("unwound after signal %d", exc.signum)
            name = signal.Signals(exc.signum).name
            click.secho(f"interrupted by {name}: stopped everything this command started",
                        fg="yellow", err=True)
            _exit_now(128 + exc.signum)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else
                                           logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from meshdl.security.loggate import FloodFilter
    flood = FloodFilter()            # a flood of refused messages: a few lines per 10 s
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, FloodFilter) for f in handler.filters):
            handler.addFilter(flood)


@click.group(cls=MeshdlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshdl")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """meshdl: exact DNN inference split across a mesh of edge devices over MQTT.

    Start with `meshdl infer sample` (an embedded mesh, nothing to set up), then
    `meshdl models`, `meshdl topologies`, `meshdl profiles`, `meshdl strategies`.
    """
    setup_logging(verbose, quiet)
    sigs = _Signals()
    prev = sigs.install()
    click.get_current_context().call_on_close(lambda: sigs.restore(prev))


# (module, command names): one module per command or group
COMMANDS = (
    ("meshdl.cli.infer_cmd", ("infer",)),
    ("meshdl.cli.models_cmd", ("models",)),
    ("meshdl.cli.list_cmd", ("topologies", "profiles", "strategies")),
    ("meshdl.cli.plan_cmd", ("plan",)),
    ("meshdl.cli.mesh_cmd", ("mesh",)),
    ("meshdl.cli.node_cmd", ("node",)),
)


def _register() -> None:
    import importlib
    for module, names in COMMANDS:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for name in names:
            main.add_command(getattr(mod, name))
    from meshdl.cli import security_cmd
    if "mesh" in main.commands:
        security_cmd.register(main, main.commands["mesh"])


_register()
