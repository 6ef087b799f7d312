"""``meshdl infer`` on a mesh: send each image as a job, print top-5, latency, the plan
and predicted vs measured time per stage.

With no ``--broker`` an embedded default starts (a broker with random credentials plus
an emulated home-wifi mesh, one process per device), unless credentials are given and a
broker listens at the default address: see ``choose_broker``.
"""
from __future__ import annotations

import json
import statistics
from contextlib import ExitStack
from pathlib import Path

import click

from meshdl.cli.options import DEFAULT_BROKER, Connection, fail_fast_if_refused
from meshdl.errors import JobError

DEFAULT_TOPOLOGY = "home-wifi"


def _reachable(url: str) -> bool:
    from meshdl.transport.broker import port_open
    from meshdl.transport.urls import parse_url
    u = parse_url(url)
    return port_open(u.host, u.port, timeout=0.5)



def choose_broker(conn: Connection | None, explicit: bool,
                  default: str = DEFAULT_BROKER) -> Connection | None:
    """The broker to send images to, or None for the embedded default.

    An explicit --broker is used as given. Without one, a broker at the default address
    is used only with credentials: any local user can listen on 127.0.0.1:1883, and an
    image must not go to a broker meshdl did not start unless it authenticated us."""
    from meshdl.transport.urls import is_loopback, parse_url
    if explicit:
        u = parse_url(conn.url)
        if not conn.authenticated and not u.tls and not is_loopback(u.host):
            click.secho(f"WARNING: sending images to {u.redacted()} without credentials or "
                        "TLS: anyone on that network can read them or pose as the broker; "
                        "use --username/--password-file and mqtts:// with --tls-ca.",
                        fg="red", bold=True, err=True)
        fail_fast_if_refused(conn.url)
        return conn
    if conn is not None and conn.authenticated and _reachable(conn.url):
        return conn
    if _reachable(default):
        click.echo(f"note: a broker listens at {default} but no credentials were "
                   "given, and meshdl sends images only to a broker it started or one that "
                   "authenticates it; starting the embedded default instead (use that broker "
                   "with --broker, or give --username and --password-file).", err=True)
    return None


def _embedded(stack: ExitStack, model_name: str | None, timeout: float) -> tuple[Connection, str,
                                                                        str]:
    from meshdl.node.launcher import MeshUp
    click.echo(f"starting the embedded default: a local broker and an emulated "
               f"{DEFAULT_TOPOLOGY} mesh (one node process per device; a few seconds)",
               err=True)
    up = stack.enter_context(MeshUp(DEFAULT_TOPOLOGY, model=model_name, verbose=False,
                                    credentials=True, supervise=True, stop_timeout=0.5))
    up.wait_ready(max(60.0, timeout))
    click.echo(f"embedded mesh {up.mesh_name!r} ready at {up.url} ({up.broker.kind})",
               err=True)
    return (Connection(up.url, up.username, up.password), up.mesh_name,
            up.protocol or "auto")


def _summary(path: Path, runs: list) -> dict:
    r = runs[-1]
    lat = [x.latency_s for x in runs]
    p = r.plan
    return {
        "image": str(path), "model": p.model, "strategy": p.strategy, "job": r.job,
        "attempts": max(x.attempts for x in runs), "repeat": len(runs),
        "top5": [{"index": i, "label": lab, "p": round(pr, 5)} for i, lab, pr in r.top5],
        "latency_s": statistics.median(lat), "latency_min_s": min(lat),
        "total_s": statistics.median(x.total_s for x in runs),
        # source holds the input -> sink holds the answer: what "predicted" covers
        "mesh_latency_s": _median([x.mesh_latency_s for x in runs]),
        "predicted_s": p.latency_s, "plan_id": p.plan_id, "source": p.source, "sink": p.sink,
        "output": [float(v) for v in r.output.detach().reshape(-1).tolist()],
        "stages": [{"index": s.index, "ops": list(s.ops), "devices": s.devices,
                    "predicted_s": s.predicted_s, "measured_s": s.measured_s}
                   for s in r.stages],
        # a mesh run K times slower (mesh up --time-scale K): times above are K x real
        "time_scale": float(p.meta.get("time_scale", 1.0)),
    }


def _median(vs: list) -> float | None:
    known = [v for v in vs if v is not None]
    return statistics.median(known) if known else None


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:9.1f}"


def _print(s: dict) -> None:
    click.secho(f"{s['image']}  ({s['model']}, strategy {s['strategy']}, plan {s['plan_id']}, "
                f"{s['source']} -> {s['sink']})", bold=True)
    for k, t in enumerate(s["top5"], 1):
        click.echo(f"  {k}. {t['label']:40s} {t['p'] * 100:6.2f}%")
    rep = f" (median of {s['repeat']}, best {s['latency_min_s'] * 1e3:.1f} ms)" \
        if s["repeat"] > 1 else ""
    mesh = s.get("mesh_latency_s")
    pred = "" if s["predicted_s"] is None else f"predicted {s['predicted_s'] * 1e3:.1f} ms"
    # the plan predicts source -> sink; the client's hops to the source and back (through
    # the broker, also from the source's own device) come on top
    inside = "" if mesh is None and not pred else \
        " (in the mesh, source to sink: " + "; ".join(
            x for x in ((f"{mesh * 1e3:.1f} ms" if mesh is not None else ""), pred) if x) + ")"
    click.echo(f"  latency {s['latency_s'] * 1e3:.1f} ms{rep}{inside}; with planning "
               f"{s['total_s'] * 1e3:.1f} ms; attempts {s['attempts']}")
    k = s.get("time_scale", 1.0)
    if k != 1.0:
        click.echo(f"  time scale {k:g}: the mesh runs {k:g}x slower; real-world latency "
                   f"{s['latency_s'] / k * 1e3:.1f} ms, predicted "
                   f"{(s['predicted_s'] or 0) / k * 1e3:.1f} ms")
    click.echo("  stage  ops          devices                        predicted ms  measured ms")
    for st in s["stages"]:
        devs = ",".join(st["devices"])
        devs = devs if len(devs) <= 30 else devs[:27] + "..."
        click.echo(f"  {st['index']:5d}  [{st['ops'][0]:3d},{st['ops'][1]:3d})  {devs:30s} "
                   f"{_ms(st['predicted_s'])}    {_ms(st['measured_s'])}")


def run(paths, *, model_name: str, weights, model_opts: dict | None = None, strategy: str,
        alpha: float, conn: Connection | None, explicit: bool, mesh_name: str, repeat: int, timeout: float,
        as_json: bool, stream: dict | None = None, objective: str | None = None) -> None:
    from meshdl import imaging
    from meshdl.client import MeshClient
    from meshdl.models.files import is_model_file
    opts = {k: v for k, v in (model_opts or {}).items() if v is not None}
    if weights is not None:
        opts["weights"] = weights
    user = bool(opts) or is_model_file(model_name)
    if user and stream is not None:
        raise JobError("--stream runs zoo models; a model file or --weights runs without "
                       "--stream (each image is one job)")
    if user:        # a file or zoo + weights: offered to the mesh by content hash
        import meshdl
        lm = meshdl.models.load(model_name, **opts)
        images = [(p, lm.image(p)) for p in paths]
        model_arg: object = lm
    else:
        prep = imaging.preprocess_for(model_name)
        if stream is not None:       # frames are read as they are sent (memory stays flat)
            images = [(paths[0], imaging.load_image(paths[0], preprocessing=prep))]
        else:
            images = [(p, imaging.load_image(p, preprocessing=prep)) for p in paths]
        model_arg = model_name
    with ExitStack() as stack:
        chosen = choose_broker(conn, explicit)
        protocol, embedded = "auto", chosen is None
        if embedded:
            chosen, mesh_name, protocol = _embedded(stack, None if user else model_name,
                                                    timeout)
        client = stack.enter_context(MeshClient(chosen.url, mesh_name, protocol=protocol,
                                                **chosen.bus_options()))
        # a broker with no live member of the mesh: MeshClient.infer fails in ~2 s,
        # naming the mesh and the members it saw
        if embedded:    # fresh node processes still load and trace the model: warm them
            click.echo("warming up the mesh with one untimed job ...", err=True)
            client.infer(images[0][1], model=model_arg, strategy=strategy, alpha=alpha,
                         timeout=max(120.0, timeout))
        if stream is not None:
            from meshdl.cli.stream_out import run_stream
            run_stream(client, paths, model_name=model_name, strategy=strategy, alpha=alpha,
                       objective=objective, timeout=timeout, as_json=as_json, **stream)
            return
        results = []
        total = len(images) * repeat
        with click.progressbar(length=total, label="inferring", file=click.get_text_stream(
                "stderr"), hidden=total == 1 or as_json) as bar:
            for path, x in images:
                runs = []
                for _ in range(repeat):
                    runs.append(client.infer(x, model=model_arg, strategy=strategy,
                                             alpha=alpha, timeout=timeout,
                                             objective=objective))
                    bar.update(1)
                results.append(_summary(path, runs))
    if as_json:
        click.echo(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return
    for s in results:
        _print(s)
