"""The ``meshdl`` command. This package alone configures logging and prints.

Each sub-command lives in its own module and is registered in ``main`` below.
"""
from __future__ import annotations

import logging
import sys

import click

from meshdl import __version__
from meshdl.errors import MeshdlError

log = logging.getLogger("meshdl")


class MeshdlGroup(click.Group):
    """Turns every MeshdlError into one clear line and exit status 2 (no traceback)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MeshdlError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else
                                           logging.INFO if verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)


@click.group(cls=MeshdlGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="meshdl")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def main(verbose: int, quiet: bool) -> None:
    """meshdl: exact DNN inference split across a mesh of edge devices over MQTT."""
    setup_logging(verbose, quiet)


def _register() -> None:
    from meshdl.cli import models_cmd, infer_cmd
    main.add_command(models_cmd.models)
    main.add_command(infer_cmd.infer)
    for module, names in (("meshdl.cli.node_cmd", ("node",)), ("meshdl.cli.mesh_cmd", ("mesh",)),
                          ("meshdl.cli.plan_cmd", ("plan",))):
        try:
            mod = __import__(module, fromlist=list(names))
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        for name in names:
            main.add_command(getattr(mod, name))


_register()
