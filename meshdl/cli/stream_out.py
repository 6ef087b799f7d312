"""``meshdl infer --stream``: frames through ``MeshClient.stream``, frames/s live."""
from __future__ import annotations

import json
import math
import time

import click


def _pct(values: list[float], q: float) -> float:
    from meshdl.planner.stream import percentile
    return percentile(values, q) if values else math.nan


def run_stream(client, paths, *, model_name: str, strategy: str, alpha: float,
               objective: str | None, timeout: float, as_json: bool, fps: float | None,
               window: int | None) -> None:
    err = click.get_text_stream("stderr")
    total = len(paths)
    t0 = time.monotonic()
    lat: list[float] = []
    failed = 0
    plans: set[str] = set()

    def progress(done: int, rate: float) -> None:
        if not as_json:
            err.write(f"\r  {done}/{total} frames  {rate:5.2f} frames/s  "
                      f"{failed} failed   ")
            err.flush()

    for r in client.stream(paths, model=model_name, window=window, strategy=strategy,
                           alpha=alpha, objective=objective, rate_fps=fps,
                           frame_timeout=timeout, progress=progress):
        path = str(paths[r.index])
        if r.error is not None:
            failed += 1
            row = {"index": r.index, "image": path, "error": r.error}
        else:
            lat.append(r.latency_s)
            plans.add(r.plan.plan_id)
            row = {"index": r.index, "image": path, "latency_s": r.latency_s,
                   "plan_id": r.plan.plan_id, "attempts": r.attempts,
                   "top5": [{"index": i, "label": lab, "p": round(p, 5)}
                            for i, lab, p in r.top5]}
        if as_json:
            click.echo(json.dumps(row))
        elif r.error is not None:
            err.write("\n")
            click.secho(f"{r.index:5d} {path}: FAILED: {r.error}", fg="red")
        else:
            i, lab, p = r.top5[0]
            err.write("\r" + " " * 60 + "\r")
            click.echo(f"{r.index:5d} {path}: {lab} ({p * 100:.1f}%)  "
                       f"{r.latency_s * 1e3:.0f} ms")
    elapsed = time.monotonic() - t0
    summary = (f"{total} frames in {elapsed:.2f} s: {total / elapsed:.2f} frames/s; frame "
               f"latency p50 {_pct(lat, 50) * 1e3:.0f} ms, p95 {_pct(lat, 95) * 1e3:.0f} ms; "
               f"{failed} failed; plan(s) {', '.join(sorted(plans)) or '-'}")
    if as_json:
        click.echo(json.dumps({"summary": {"frames": total, "seconds": elapsed,
                                           "fps": total / elapsed, "failed": failed,
                                           "latency_p50_s": _pct(lat, 50),
                                           "latency_p95_s": _pct(lat, 95),
                                           "plans": sorted(plans)}}))
    else:
        err.write("\n")
        click.echo(summary)
