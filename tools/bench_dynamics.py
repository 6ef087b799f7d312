"""Dynamics: a stream of jobs while a link trace reshapes the links under a netns mesh.

    python tools/bench_dynamics.py [--topology home-jetson] [--model resnet18]
        [--trace FILE] [--time-scale K] [--out results/dynamics]

Runs ``NetnsMeshUp`` (root, iproute2), plays the trace with ``tc class change`` while a
client sends jobs back to back, and compares, job by job, over the same stream:
- meshdl: measured (source holds the input -> sink holds the answer, / K), with the
  plan the leader chose from its measured telemetry;
- fixed: the plan made at the start, kept fixed, scored by the cost model on the links
  of each job's moment (``Trace.mesh_at``);
- oracle: a plan made for the links of each job's moment, scored the same way;
- meshdl (model): the plan meshdl used, scored the same way (like for like with the
  two above).
Re-plan delay: for each trace event, the time until the leader published a plan for
the new links (the first new plan id seen on the broker), in seconds and in telemetry
periods. Writes dynamics.csv (per job) and dynamics.md.
"""
from __future__ import annotations

import argparse
import csv
import logging
import re
import statistics
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_dynamics")

DEFAULT_TRACE = """# time_s, device, bandwidth_mbps   (real-world seconds from the stream's start)
3.0, jetson, 4
7.0, jetson, 900
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", default="home-jetson")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--trace", default=None, help="link trace file (default: the jetson's "
                    "Ethernet drops to 4 Mbit/s at 3 s and is back at 7 s)")
    ap.add_argument("--time-scale", type=float, default=None,
                    help="default: picked like bench_mesh --netns (no pacing warnings)")
    ap.add_argument("--duration", type=float, default=10.0, help="real-world seconds")
    ap.add_argument("--telemetry-period", type=float, default=1.0,
                    help="wall-clock seconds between telemetry messages")
    ap.add_argument("--out", default=str(ROOT / "results" / "dynamics"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("meshdl").setLevel(logging.WARNING)

    import torch
    import meshdl
    from meshdl.errors import MeshdlError
    from meshdl.client import MeshClient
    from meshdl.node.linktrace import TracePlayer, load_trace, parse_trace
    from meshdl.node.netns import in_netns
    from meshdl.node.netns_up import NetnsMeshUp
    from meshdl.planner.simulate import simulate

    mesh = meshdl.load_topology(args.topology)
    trace = (load_trace(args.trace) if args.trace else parse_trace(DEFAULT_TRACE)).check(mesh)
    src = mesh.defaults.get("source") or sorted(mesh.devices)[0]
    g = meshdl.trace(meshdl.models.build(args.model), input_shape=(1, 3, 224, 224),
                     name=args.model)
    start_plan = meshdl.plan(g, mesh, strategy="meshdl", source=src, sink=src, alpha=1.0)
    k = args.time_scale
    if k is None:
        sys.path.insert(0, str(ROOT / "tools"))
        from bench_mesh_netns import pick_time_scale, real_forward_s, task_time_scale
        k = max(pick_time_scale(mesh, {args.model: g}, {args.model: real_forward_s(args.model)}),
                task_time_scale(g, start_plan, mesh))
    log.info("time scale %g", k)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    appeared: list[tuple[float, str]] = []   # (wall time, plan id) a plan appeared
    jobs = []
    job_starts: list[tuple[float, str]] = []  # (monotonic start, plan id) per timed job
    failed: list[tuple[float, str]] = []      # (start, error) of jobs that failed
    with NetnsMeshUp(args.topology, time_scale=k, mesh="dyn", models=[args.model],
                     log_dir=out / "logs", verbose=True,
                     telemetry_period=args.telemetry_period) as up:
        up.wait_ready(600)
        c = in_netns(up.ns.broker_ns, lambda: MeshClient(up.url, "dyn").__enter__())
        stop = threading.Event()

        def watch() -> None:        # every plan the leader issues (id, publication)
            prev: set[tuple[str, float]] = set()
            while not stop.wait(0.05):
                cur = {(pid, m.ts) for pid, m in up.watcher.snapshot().plans.items()}
                appeared.extend((time.monotonic(), pid) for pid, _ in sorted(cur - prev))
                prev = cur
        threading.Thread(target=watch, daemon=True).start()
        x = torch.randn(1, 3, 224, 224)
        try:
            settle = time.monotonic() + 4 * args.telemetry_period   # estimates settle
            while time.monotonic() < settle:
                c.infer(x, model=args.model, alpha=1.0, timeout=600)        # warm-up
            player = TracePlayer(trace, up.shape, time_scale=k)
            player.start()
            while player.t0 is None:
                time.sleep(0.01)
            t0 = player.t0
            marks = {f: f.stat().st_size for f in (out / "logs").glob("*.log")}
            while (time.monotonic() - t0) / k < args.duration:
                mono = time.monotonic()
                started = (mono - t0) / k
                try:
                    r = c.infer(x, model=args.model, alpha=1.0, timeout=max(60.0, 20 * k))
                except MeshdlError as exc:
                    failed.append((started, str(exc)))
                    log.warning("t=%.2f s: job failed: %s", started, exc)
                    continue
                meas = (r.mesh_latency_s if r.mesh_latency_s is not None else r.latency_s) / k
                jobs.append((started, meas, r.plan))
                job_starts.append((mono, r.plan.plan_id))
                log.info("t=%.2f s: %.3f s on %s (%s)", started, meas, r.plan.plan_id,
                         "+".join(sorted(r.plan.devices())))
            t_last = time.monotonic()
            player.stop()
        finally:
            stop.set()
            c.__exit__(None, None, None)
    rows = []
    oracle_cache: dict[float, tuple] = {}
    for started, meas, plan in jobs:
        links_t = max([e.t for e in trace.events if e.t <= started], default=-1.0)
        now = trace.mesh_at(mesh, started)
        if links_t not in oracle_cache:
            best = meshdl.plan(g, now, strategy="meshdl", source=src, sink=src, alpha=1.0)
            oracle_cache[links_t] = (best, best.latency_s)
        rows.append({"t_s": round(started, 3), "plan": plan.plan_id,
                     "devices": "+".join(sorted(plan.devices())),
                     "meshdl_measured_s": round(meas, 4),
                     "meshdl_model_s": round(simulate(plan, g, now).latency_s, 4),
                     "fixed_model_s": round(simulate(start_plan, g, now).latency_s, 4),
                     "oracle_model_s": round(oracle_cache[links_t][1], 4)})
    tele = args.telemetry_period
    # trace events on the wall clock (the nodes' log lines carry wall-clock times)
    shift = time.time() - time.monotonic()
    applied = [(t, e) for t, e in player.applied]
    steps = step_lines(out / "logs", since=t0 + shift)
    delays = replan_delays([(e, t) for t, e in applied], appeared, steps, shift, job_starts)
    flaps = stable_plan_changes([t for t, _ in applied], job_starts, settle_s=3 * tele)
    pacing = sum(f.read_bytes()[at:].count(b"emulated device") for f, at in marks.items())
    with open(out / "dynamics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    tot = {key: sum(r[key] for r in rows) for key in
           ("meshdl_measured_s", "meshdl_model_s", "fixed_model_s", "oracle_model_s")}
    lines = [f"# dynamics: {args.model} on {args.topology}, time scale {k:g}\n",
             f"`python tools/bench_dynamics.py {' '.join(sys.argv[1:])}`\n",
             f"{len(rows)} jobs back to back over {args.duration:g} s (real-world); trace: "
             + "; ".join(str(e) for e in trace.events) + f"; telemetry period {tele:g} s "
             f"wall ({tele / k:.3g} s real-world); pacing warnings: {pacing}; failed "
             f"jobs: {len(failed)}\n",
             "Every arm is scored on the same jobs (start times of the measured stream), "
             "each by the cost model on the links of the job's start moment; the measured "
             "row is the real stream (it also pays for jobs caught by a change mid-way).\n",
             "| total over the stream | seconds | / oracle | / fixed |", "|---|---|---|---|"]
    for key, label in (("meshdl_measured_s", "meshdl, measured"),
                       ("meshdl_model_s", "meshdl's plans, cost model on the moment's links"),
                       ("fixed_model_s", "fixed start plan, cost model"),
                       ("oracle_model_s", "oracle (plan per moment), cost model")):
        lines.append(f"| {label} | {tot[key]:.3f} | {tot[key] / tot['oracle_model_s']:.3f} | "
                     f"{tot[key] / tot['fixed_model_s']:.3f} |")
    lines.append("\n| trace event | link step published (periods) | new plan (periods) | "
                 "first job on it (periods) | new plan, real-world s |\n|---|---|---|---|---|")
    for d in delays:
        lines.append(f"| {d['event']} | {_f(d['step_s'], tele)} | {_f(d['plan_s'], tele)} | "
                     f"{_f(d['job_s'], tele)} | "
                     f"{_f(d['plan_s'], k, 3)} |")
    lines.append(f"\nplans used: {len({r['plan'] for r in rows})}; plan changes between "
                 f"jobs on stable stretches (no trace event within 3 periods): {flaps}; median job "
                 "measured/model: "
                 f"{statistics.median(r['meshdl_measured_s'] / r['meshdl_model_s'] for r in rows):.3f}")
    text = "\n".join(lines) + "\n"
    (out / "dynamics.md").write_text(text)
    print(text)


def _f(v: float | None, unit: float, digits: int = 2) -> str:
    return "-" if v is None else f"{v / unit:.{digits}f}"


STEP_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .*link (\S+) of (\S+): step to")


def step_lines(log_dir: Path, since: float) -> list[tuple[float, str]]:
    """(wall time, device) of every confirmed link step in the node logs after ``since``."""
    out = []
    for f in sorted(log_dir.glob("*.log")):
        for line in f.read_text(errors="replace").splitlines():
            m = STEP_RE.match(line)
            if m:
                ts = datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                if ts >= since:
                    out.append((ts, m.group(3)))
    return sorted(out)


def replan_delays(events, appeared, steps, shift: float, job_starts):
    """Per trace event (event, monotonic time applied): seconds until the target device
    published a link step (``steps``: wall time, device), until the leader issued a
    plan other than the one the last job before the event ran on (``appeared``:
    monotonic time, id) and until the first job started on it (``job_starts``:
    monotonic time, plan id); None: not before the next event."""
    out = []
    for i, (e, t) in enumerate(events):
        nxt = events[i + 1][1] if i + 1 < len(events) else float("inf")
        dev = e.target.split("-")[0]
        step = next((ts - shift for ts, d in steps if d == dev and t <= ts - shift < nxt), None)
        was = next((pid for ts, pid in reversed(job_starts) if ts <= t), None)
        plan = next(((ts, pid) for ts, pid in appeared if t < ts < nxt and pid != was), None)
        job = None if plan is None else next(
            (ts for ts, pid in job_starts if pid == plan[1] and t < ts < nxt), None)
        out.append({"event": str(e), "step_s": None if step is None else step - t,
                    "plan_s": None if plan is None else plan[0] - t,
                    "job_s": None if job is None else job - t})
    return out


def stable_plan_changes(event_times: list[float], job_starts: list[tuple[float, str]],
                        settle_s: float) -> int:
    """Jobs whose plan differs from the job before with no trace event since
    ``settle_s`` before that job started (``job_starts``: monotonic start, plan id)."""
    n = 0
    for (t_prev, p_prev), (t, p) in zip(job_starts, job_starts[1:]):
        if p != p_prev and not any(t_prev - settle_s <= e <= t for e in event_times):
            n += 1
    return n


if __name__ == "__main__":
    main()
