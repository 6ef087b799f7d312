"""``meshdl infer`` on a mesh: send each image as a job, print top-5, latency, the plan
and predicted vs measured time per stage.

With no ``--broker`` and nothing listening at the default address, an embedded
default starts: a broker plus an emulated home-4 mesh (one process per device).
"""
from __future__ import annotations

import json
import statistics
from contextlib import ExitStack
from pathlib import Path

import click

from meshdl.errors import JobError

DEFAULT_BROKER = "mqtt://127.0.0.1:1883"
DEFAULT_TOPOLOGY = "home-4"


def _reachable(url: str) -> bool:
    from meshdl.transport.broker import port_open
    from meshdl.transport.urls import parse_url
    u = parse_url(url)
    return port_open(u.host, u.port, timeout=0.5)


def _embedded(stack: ExitStack, model_name: str, timeout: float) -> tuple[str, str]:
    from meshdl.node.launcher import MeshUp
    click.echo(f"no broker at {DEFAULT_BROKER}: starting an embedded broker and an emulated "
               f"{DEFAULT_TOPOLOGY} mesh (one node process per device; takes a few seconds)",
               err=True)
    up = stack.enter_context(MeshUp(DEFAULT_TOPOLOGY, model=model_name, verbose=False))
    up.wait_ready(max(60.0, timeout))
    click.echo(f"embedded mesh {up.mesh_name!r} ready at {up.url}", err=True)
    return up.url, up.mesh_name


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
        "predicted_s": p.latency_s, "plan_id": p.plan_id, "source": p.source, "sink": p.sink,
        "stages": [{"index": s.index, "ops": list(s.ops), "devices": s.devices,
                    "predicted_s": s.predicted_s, "measured_s": s.measured_s}
                   for s in r.stages],
    }


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v * 1e3:9.1f}"


def _print(s: dict) -> None:
    click.secho(f"{s['image']}  ({s['model']}, strategy {s['strategy']}, plan {s['plan_id']}, "
                f"{s['source']} -> {s['sink']})", bold=True)
    for k, t in enumerate(s["top5"], 1):
        click.echo(f"  {k}. {t['label']:40s} {t['p'] * 100:6.2f}%")
    rep = f" (median of {s['repeat']}, best {s['latency_min_s'] * 1e3:.1f} ms)" \
        if s["repeat"] > 1 else ""
    pred = "" if s["predicted_s"] is None else f"; predicted {s['predicted_s'] * 1e3:.1f} ms"
    click.echo(f"  latency {s['latency_s'] * 1e3:.1f} ms{rep}{pred}; with planning "
               f"{s['total_s'] * 1e3:.1f} ms; attempts {s['attempts']}")
    click.echo("  stage  ops          devices                        predicted ms  measured ms")
    for st in s["stages"]:
        devs = ",".join(st["devices"])
        devs = devs if len(devs) <= 30 else devs[:27] + "..."
        click.echo(f"  {st['index']:5d}  [{st['ops'][0]:3d},{st['ops'][1]:3d})  {devs:30s} "
                   f"{_ms(st['predicted_s'])}    {_ms(st['measured_s'])}")


def run(paths, *, model_name: str, weights, strategy: str, alpha: float, broker: str | None,
        mesh_name: str, repeat: int, timeout: float, as_json: bool) -> None:
    from meshdl import imaging
    from meshdl.client import MeshClient
    if weights is not None:
        raise JobError("--weights works only with --in-process: mesh nodes build models by "
                       "name (efficientnet_lite0 with its shipped weights)")
    prep = imaging.preprocess_for(model_name)
    images = [(p, imaging.load_image(p, preprocessing=prep)) for p in paths]
    with ExitStack() as stack:
        url = broker or DEFAULT_BROKER
        embedded = broker is None and not _reachable(url)
        if embedded:
            url, mesh_name = _embedded(stack, model_name, timeout)
        client = stack.enter_context(MeshClient(url, mesh_name))
        if embedded:    # fresh node processes still load and trace the model: warm them
            click.echo("warming up the mesh with one untimed job ...", err=True)
            client.infer(images[0][1], model=model_name, strategy=strategy, alpha=alpha,
                         timeout=max(120.0, timeout))
        results = []
        total = len(images) * repeat
        with click.progressbar(length=total, label="inferring", file=click.get_text_stream(
                "stderr"), hidden=total == 1 or as_json) as bar:
            for path, x in images:
                runs = []
                for _ in range(repeat):
                    runs.append(client.infer(x, model=model_name, strategy=strategy,
                                             alpha=alpha, timeout=timeout))
                    bar.update(1)
                results.append(_summary(path, runs))
    if as_json:
        click.echo(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return
    for s in results:
        _print(s)
