"""Dynamics: a stream of jobs while a link trace reshapes the links under a netns mesh.

    python tools/bench_dynamics.py [--topology home-jetson] [--model resnet18]
        [--trace FILE] [--time-scale K] [--out results/dynamics]

Runs ``NetnsMeshUp`` (root, iproute2) and plays the trace three times with ``tc class
change`` (the links reset to the topology's figures between passes), once per arm,
every arm measured for real on the same mesh:
- meshdl: a client sends jobs back to back; the leader plans from its measured
  telemetry (``MeshClient.infer``);
- fixed: the same jobs, released at the meshdl pass's start times relative to the
  trace (a job waits for the one before it), each on the plan made at the start for
  the topology's links, pinned: issued to the mesh as the leader issues plans and run
  through ``MeshClient.run_on_plan`` (tools/dynamics_arms.py);
- oracle: the same jobs and release times, each on the plan the planner makes for
  the trace's links of its start moment (knows the trace: every segment's plan is
  issued, and so warmed by the nodes, before the pass).
Measured: source holds the input -> sink holds the answer, / K. Each arm's plans are
also scored by the cost model on the links of each job's start moment (second
column). Re-plan delay (meshdl pass): per trace event, the time until the target
device published a link step, the leader a plan other than the one in use, and the
first job ran on it, in telemetry periods. Writes dynamics.csv (per job, per arm)
and dynamics.md.
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
sys.path.insert(0, str(ROOT / "tools"))

log = logging.getLogger("bench_dynamics")

DEFAULT_TRACE = """# time_s, device, bandwidth_mbps   (real-world seconds from the stream's start)
3.0, jetson, 4
7.0, jetson, 900
"""
ARMS = ("meshdl", "fixed", "oracle")


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
    ap.add_argument("--arms", default=",".join(ARMS),
                    help="arms to run (diagnosis: 'meshdl' alone writes only the raw "
                    "passes and the per-job timeline)")
    args = ap.parse_args()
    arms = [a for a in ARMS if a in args.arms.split(",")]
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
    from dynamics_arms import PassResult, Pinner, plan_for, reset_links, run_pinned

    mesh = meshdl.load_topology(args.topology)
    trace = (load_trace(args.trace) if args.trace else parse_trace(DEFAULT_TRACE)).check(mesh)
    src = mesh.defaults.get("source") or sorted(mesh.devices)[0]
    g = meshdl.trace(meshdl.models.build(args.model), input_shape=(1, 3, 224, 224),
                     name=args.model)
    start_plan = meshdl.plan(g, mesh, strategy="meshdl", source=src, sink=src, alpha=1.0)
    k = args.time_scale
    if k is None:
        from bench_mesh_netns import pick_time_scale, real_forward_s, task_time_scale
        k = max(pick_time_scale(mesh, {args.model: g}, {args.model: real_forward_s(args.model)}),
                task_time_scale(g, start_plan, mesh))
    log.info("time scale %g", k)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tele = args.telemetry_period
    appeared: list[tuple[float, str]] = []   # (monotonic time, plan id) a plan appeared
    job_starts: list[tuple[float, str]] = []  # (monotonic start, plan id), meshdl pass
    res: dict[str, PassResult] = {}
    pacing: dict[str, int] = {}
    schedule: list[float] = []                # real-world release times (meshdl pass)
    seg_t = [-1.0] + trace.times              # the oracle's plan per link segment
    oracle_plans: dict[float, object] = {}
    with NetnsMeshUp(args.topology, time_scale=k, mesh="dyn", models=[args.model],
                     log_dir=out / "logs", verbose=True, telemetry_period=tele) as up:
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
        pinner = Pinner(c, up.watcher, "dyn")
        pinner.start()
        x = torch.randn(1, 3, 224, 224)
        leader = pinner.leader()[0]

        def oracle_at(t: float):
            seg = max(s for s in seg_t if s <= t)
            if seg not in oracle_plans:
                oracle_plans[seg] = plan_for(g, trace.mesh_at(mesh, seg), k, args.model,
                                             leader)
            return oracle_plans[seg]
        fixed_plan = oracle_at(-1.0)
        try:
            for arm in arms:
                log.info("pass %s", arm)
                reset_links(up, mesh, trace)
                pinner.clear()
                if arm == "fixed":
                    pinner.issue(fixed_plan)
                elif arm == "oracle":                  # knows the trace: issued (warmed) early
                    for s in seg_t:
                        pinner.issue(oracle_at(s))
                settle = time.monotonic() + 4 * tele   # estimates settle, plans warm
                while time.monotonic() < settle:
                    c.infer(x, model=args.model, alpha=1.0, timeout=600)        # warm-up
                marks = {f: f.stat().st_size for f in (out / "logs").glob("*.log")}
                player = TracePlayer(trace, up.shape, time_scale=k)
                player.start()
                while player.t0 is None:
                    time.sleep(0.01)
                t0 = player.t0
                if arm == "meshdl":
                    r = res[arm] = PassResult()
                    t0_meshdl, applied = t0, player.applied
                    while (time.monotonic() - t0) / k < args.duration:
                        mono = time.monotonic()
                        started = (mono - t0) / k
                        schedule.append(started)
                        try:
                            ans = c.infer(x, model=args.model, alpha=1.0,
                                          timeout=max(60.0, 20 * k))
                        except MeshdlError as exc:
                            r.failed.append((started, str(exc)))
                            log.warning("t=%.2f s: job failed: %s", started, exc)
                            r.jobs.append((started, None, None))
                            continue
                        # attempts before the one that answered: their time is lost
                        # (the pinned arms count re-runs the same way)
                        lost = max(0.0, time.monotonic() - mono - ans.total_s) \
                            if ans.attempts > 1 else 0.0
                        if lost:
                            res[arm].reruns += ans.attempts - 1
                        meas = ((ans.mesh_latency_s if ans.mesh_latency_s is not None
                                 else ans.latency_s) + lost) / k
                        r.jobs.append((started, meas, ans.plan))
                        r.wall[len(r.jobs) - 1] = (time.monotonic() - mono) / k
                        r.marks[len(r.jobs) - 1] = ans.marks
                        job_starts.append((mono, ans.plan.plan_id))
                        log.info("t=%.2f s: %.3f s on %s (%s); client wall %.3f s: %s",
                                 started, meas, ans.plan.plan_id,
                                 "+".join(sorted(ans.plan.devices())), r.wall[len(r.jobs) - 1],
                                 timeline(ans.marks, k))
                    t_end_meshdl = time.monotonic()
                else:
                    res[arm] = run_pinned(
                        c, pinner, x, schedule, t0, k,
                        (lambda t: fixed_plan) if arm == "fixed" else oracle_at,
                        timeout=max(60.0, 20 * k))
                player.stop()
                pacing[arm] = sum(f.read_bytes()[at:].count(b"emulated device")
                                  for f, at in marks.items())
        finally:
            stop.set()
            pinner.stop()
            pinner.clear()
            c.__exit__(None, None, None)
    # ---------------------------------------------------------------- figures
    import json
    (out / "dynamics_raw.json").write_text(json.dumps({   # the passes, before any figure
        "time_scale": k, "schedule": schedule, "pacing": pacing,
        "jobs": {arm: [[t, m, None if p is None else p.plan_id,
                        None if p is None else simulate(p, g, trace.mesh_at(mesh, t)).latency_s]
                       for t, m, p in res[arm].jobs] for arm in arms},
        "wall": {arm: res[arm].wall for arm in arms},
        "marks": {arm: res[arm].marks for arm in arms},
        "failed": {arm: res[arm].failed for arm in arms}}, indent=1))
    shift = time.time() - time.monotonic()   # node log lines carry wall-clock times
    delays = []
    if "meshdl" in arms:
        steps = step_lines(out / "logs", since=t0_meshdl + shift)
        delays = replan_delays([(e, t) for t, e in applied], appeared, steps, shift,
                               job_starts, end=t_end_meshdl)
    if arms != list(ARMS):
        print(f"arms {', '.join(arms)} only: no comparison; raw passes in "
              f"{out / 'dynamics_raw.json'}")
        for d in delays:
            print(f"{d['event']}: link step published {_f(d['step_s'], tele)}, new plan "
                  f"{_f(d['plan_s'], tele)}, first job on it {_f(d['job_s'], tele)} periods")
        return
    per: dict[str, dict[int, tuple]] = {}
    for arm in ARMS:
        done = {i: j for i, j in enumerate(res[arm].jobs) if j[1] is not None}
        per[arm] = {i: (t, meas, plan, simulate(plan, g, trace.mesh_at(mesh, t)).latency_s)
                    for i, (t, meas, plan) in done.items()}
    common = sorted(set.intersection(*(set(p) for p in per.values())))
    tot = {arm: (sum(per[arm][i][1] for i in common), sum(per[arm][i][3] for i in common))
           for arm in ARMS}
    wall = {arm: sum(res[arm].wall.get(i, 0.0) for i in common) for arm in ARMS}
    # response: release -> answer. A pinned job that waits for the one before it starts
    # late, maybe on links the trace has restored meanwhile; leaving its wait out would
    # credit a slow arm with the better links its own queue pushed it onto (coordinated
    # omission). meshdl's releases are its own starts (late 0).
    resp = {arm: sum(res[arm].wall.get(i, 0.0) + late_of(res[arm], i) for i in common)
            for arm in ARMS}
    rows = []
    for i in common:
        row = {"job": i, "release_s": round(schedule[i], 3)}
        for arm in ARMS:
            t, meas, plan, model_s = per[arm][i]
            row.update({f"{arm}_t_s": round(t, 3), f"{arm}_plan": plan.plan_id,
                        f"{arm}_devices": "+".join(sorted(plan.devices())),
                        f"{arm}_measured_s": round(meas, 4), f"{arm}_model_s": round(model_s, 4)})
        rows.append(row)
    with open(out / "dynamics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    flaps = stable_plan_changes([t for t, _ in applied], job_starts, settle_s=3 * tele)
    mo, mf = tot["oracle"], tot["fixed"]
    lines = [f"# dynamics: {args.model} on {args.topology}, time scale {k:g}\n",
             f"`python tools/bench_dynamics.py {' '.join(sys.argv[1:])}`\n",
             f"{len(schedule)} jobs over {args.duration:g} s (real-world) per arm, {len(common)} "
             "completed in every arm; trace: " + "; ".join(str(e) for e in trace.events)
             + f"; telemetry period {tele:g} s wall ({tele / k:.3g} s real-world)\n",
             "Each arm ran for real, one pass of the trace each on the same netns mesh: "
             "meshdl back to back (its start times are the release times), fixed and oracle "
             "on pinned plans released at the same moments of the trace (a job waits for the "
             "one before it). Totals over the jobs completed in every arm; the cost-model "
             "columns score each arm's plans on the links of each job's start moment; "
             "response: from a job's release to its answer (client wall plus the time it "
             "waited for the job before it).\n",
             "Measured: source holds the input -> sink holds the answer (plus attempts "
             "lost); client wall: the client's whole job (meshdl: its plan request to the "
             "leader included; pinned arms: no request).\n",
             "| arm | measured total s | / oracle | / fixed | cost model total s | / oracle "
             "| / fixed | client wall total s | / oracle | / fixed | response total s "
             "| / oracle | / fixed | failed jobs | re-runs | pacing warnings | max late s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm in ARMS:
        r = res[arm]
        m, cm = tot[arm]
        lines.append(f"| {arm} | {m:.3f} | {m / mo[0]:.3f} | {m / mf[0]:.3f} | {cm:.3f} | "
                     f"{cm / mo[1]:.3f} | {cm / mf[1]:.3f} | {wall[arm]:.3f} | "
                     f"{wall[arm] / wall['oracle']:.3f} | {wall[arm] / wall['fixed']:.3f} | "
                     f"{resp[arm]:.3f} | {resp[arm] / resp['oracle']:.3f} | "
                     f"{resp[arm] / resp['fixed']:.3f} | "
                     f"{len(r.failed)} | {r.reruns} | "
                     f"{pacing[arm]} | {max(r.late, default=0.0):.3f} |")
    lines.append(f"\nmeshdl / oracle measured {tot['meshdl'][0] / mo[0]:.3f} (target <= 1.20), "
                 f"meshdl / fixed measured {tot['meshdl'][0] / mf[0]:.3f} (target < 1); client "
                 f"wall: {wall['meshdl'] / wall['oracle']:.3f} / "
                 f"{wall['meshdl'] / wall['fixed']:.3f}; response (release -> answer): "
                 f"{resp['meshdl'] / resp['oracle']:.3f} / {resp['meshdl'] / resp['fixed']:.3f}"
                 f"; pinned "
                 f"plans re-issued after the leader cleared them: {pinner.reissued}")
    lines.append("\n| trace event (meshdl pass) | link step published (periods) | new plan "
                 "(periods) | first job on it (periods) | new plan, real-world s |\n"
                 "|---|---|---|---|---|")
    for d in delays:
        lines.append(f"| {d['event']} | {_f(d['step_s'], tele)} | {_f(d['plan_s'], tele)} | "
                     f"{_f(d['job_s'], tele)} | "
                     f"{_f(d['plan_s'], k, 3)} |")
    ratios = [per["meshdl"][i][1] / per["meshdl"][i][3] for i in common]
    lines.append(f"\nplans used by meshdl: {len({r['meshdl_plan'] for r in rows})}; plan "
                 f"changes between jobs on stable stretches (no trace event within 3 periods): "
                 f"{flaps}; median job measured/model: meshdl "
                 f"{statistics.median(ratios):.3f}, fixed "
                 f"{statistics.median(per['fixed'][i][1] / per['fixed'][i][3] for i in common):.3f}"
                 f", oracle "
                 f"{statistics.median(per['oracle'][i][1] / per['oracle'][i][3] for i in common):.3f}")
    text = "\n".join(lines) + "\n"
    (out / "dynamics.md").write_text(text)
    print(text)


def late_of(r, i: int) -> float:
    """Real-world seconds job ``i`` started after its release (0 where not recorded)."""
    return r.late[i] if i < len(r.late) else 0.0


def timeline(marks: dict, k: float) -> str:
    """A job's client moments as real-world seconds from its request (``InferResult.marks``)."""
    t0 = marks.get("request")
    if t0 is None:
        return "-"
    return " ".join(f"{name} {(v - t0) / k:+.3f}" for name, v in
                    sorted(((n, v) for n, v in marks.items() if n != "requests"),
                           key=lambda nv: nv[1])) + f" ({marks.get('requests', 0):g} request(s))"


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


def replan_delays(events, appeared, steps, shift: float, job_starts,
                  end: float = float("inf")):
    """Per trace event (event, monotonic time applied): seconds until the target device
    published a link step (``steps``: wall time, device), until the leader issued a
    plan other than the one the last job before the event ran on (``appeared``:
    monotonic time, id) and until the first job started on it (``job_starts``:
    monotonic time, plan id); None: not before the next event."""
    out = []
    for i, (e, t) in enumerate(events):
        nxt = events[i + 1][1] if i + 1 < len(events) else end
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
