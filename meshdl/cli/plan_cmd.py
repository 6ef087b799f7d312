"""``meshdl plan show``: a plan computed here (offline) or the live mesh's retained plans."""
from __future__ import annotations

import click

from meshdl.cli.options import (alpha_option, broker_options, connection,
                                fail_fast_if_refused, strategy_option, topology_help)


@click.group()
def plan() -> None:
    """Show plans: computed offline for a topology, or the live mesh's current ones."""


@plan.command("show")
@broker_options(default=None, broker_help="Live mode: read the retained plans of the mesh "
                "at this broker URL (mqtt://host:port or mqtts://).")
@click.option("--topology", default=None, help=topology_help("Offline mode: plan for this "
              "mesh."))
@click.option("--model", default="efficientnet_lite0", show_default=True,
              help="Offline mode: model from the zoo (`meshdl models`).")
@strategy_option(help_extra=" Offline mode.")
@click.option("--source", default=None, help="Offline mode: device holding the input "
              "(default: the topology's).")
@click.option("--sink", default=None, help="Offline mode: device receiving the answer "
              "(default: the topology's, else the source).")
@alpha_option
@click.option("--bandwidth-cap", "cap", default=None, type=click.FloatRange(min=0,
              min_open=True), help="Offline mode: cap every link at this many Mbit/s.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "png"]), default=None,
              help="Output format (default: from the -o suffix: .png, .json, else table).")
@click.option("--output", "-o", default=None, type=click.Path(dir_okay=False),
              help="Write to this file instead of printing (a PNG always goes to a file: "
              "plan.png when -o is left out). Several plans (--compare, or several live "
              "plans) are drawn as panels of this one file.")
@click.option("--compare", is_flag=True, help="Offline mode: every strategy side by side "
              "(latency, energy and the objective each minimises at --alpha).")
@click.option("--objective", type=click.Choice(["latency", "energy", "throughput"]),
              default=None, help="Offline mode: plan for one frame's latency (alpha 1), "
              "energy (alpha 0) or a stream's frames/s (pipelines, replicated stages); "
              "default: the --alpha mix.")
def show(broker, mesh_name, username, password, password_file, tls_ca, topology, model,
         strategy, source, sink, alpha, cap, fmt, output, compare, objective):
    """Show a plan as a table, JSON or a PNG of the mesh: computed here for --topology
    (offline), or the live mesh's current plans (--broker)."""
    from meshdl.errors import MeshdlError
    if (broker is None) == (topology is None):
        raise click.UsageError("give either --topology (offline) or --broker (live)")
    if fmt is None:
        suffix = (output or "").lower().rsplit(".", 1)[-1]
        fmt = {"png": "png", "json": "json"}.get(suffix, "table")
    if broker is not None:
        if compare:
            raise click.UsageError("--compare works offline only (with --topology)")
        conn = connection(broker, username, password, password_file, tls_ca)
        fail_fast_if_refused(conn.url)
        plans, mesh = _live(conn.url, mesh_name, conn.username, conn.password, conn.tls_ca)
        if not plans:
            raise MeshdlError(f"mesh {mesh_name!r} at {broker} has no retained plan; is a "
                              "leader running (meshdl mesh status)?")
        graphs = {}
    else:
        import meshdl
        from meshdl.cli.infer_cmd import check_model
        check_model(model)
        mesh = meshdl.load_topology(topology)
        info = meshdl.models.info(model)
        with _progress(f"tracing {model}"):
            g = meshdl.trace(meshdl.models.build(model), info.input_shape, name=model)
        from meshdl.node.leader import make_plan     # the leader's plan-issuing path
        from meshdl.node.leaderproto import StandingRequest
        names = meshdl.strategies() if compare else [strategy]
        plans = {}
        for name in names:
            try:
                req = StandingRequest(model, name, alpha, source, sink, None, objective)
                plans[name] = make_plan(req, mesh, g, bandwidth_cap_mbps=cap)
            except MeshdlError as exc:
                if not compare:
                    raise
                click.echo(f"{name}: skipped ({exc})", err=True)
                plans[name] = None
        graphs = {name: g for name in names}
        if compare and fmt == "table":
            from meshdl.planner.report import compare_table
            _emit(compare_table(plans, alpha=alpha), output)
            return
    _render(plans, mesh, graphs, fmt, output)


def _progress(label: str):
    import contextlib

    @contextlib.contextmanager
    def cm():
        click.echo(f"{label}...", err=True)
        yield
    return cm()


def _live(broker, mesh_name, username, password, tls_ca):
    from meshdl.errors import MeshdlError
    from meshdl.node.planstore import IssuedPlan
    from meshdl.node.status import read_status
    snap = read_status(broker, mesh_name, username=username, password=password, tls_ca=tls_ca)
    plans = {pid: IssuedPlan.from_message(msg).plan for pid, msg in sorted(snap.plans.items())}
    mesh = None
    try:
        from meshdl.mesh import MeshState, apply
        from meshdl.node.membership import state_event, telemetry_event
        state = MeshState()
        for st in snap.states.values():
            state = apply(state, state_event(st))
        for t in snap.telemetry.values():
            state = apply(state, telemetry_event(t))
        mesh = state.to_mesh(name=mesh_name)
    except MeshdlError as exc:
        click.echo(f"cannot rebuild the live mesh for drawing: {exc}", err=True)
    return plans, mesh


def _emit(text: str, output: str | None) -> None:
    if output:
        with open(output, "w") as f:
            f.write(text + "\n")
        click.echo(f"wrote {output}", err=True)
    else:
        click.echo(text)


def _render(plans, mesh, graphs, fmt, output) -> None:
    from meshdl.planner.report import plan_json, plan_png, plan_table
    items = [(k, p) for k, p in plans.items() if p is not None]
    if fmt == "table":
        _emit("\n\n".join(plan_table(p, graphs.get(k)) for k, p in items), output)
    elif fmt == "json":
        if len(items) == 1:
            _emit(plan_json(items[0][1]), output)
        else:
            import json
            _emit(json.dumps({k: json.loads(plan_json(p)) for k, p in items}, indent=2,
                             sort_keys=True), output)
    else:
        if mesh is None:
            raise click.UsageError("cannot draw: the mesh is unknown")
        for k, p in items:
            if not set(p.devices()) <= set(mesh.devices):
                raise click.UsageError(f"plan {k} uses devices that are not in the mesh")
        if not items:
            raise click.UsageError("no plan to draw")
        path = output or "plan.png"
        click.echo(f"wrote {plan_png([p for _, p in items], mesh, path)}", err=True)
