"""Chaos benchmark: real mosquitto, one node process per device, faults injected while
clients stream jobs. Every job is checked against the local model.

    python tools/bench_chaos.py [--quick] [--topology home-4] [--jobs 12] [--out results/chaos]

Scenarios (one mesh for all, in this order):
  baseline        jobs back to back, no fault
  concurrent      3 clients at once
  worker-churn    SIGKILL a worker every few jobs and start it again
  worker-stall    SIGSTOP a worker for 6 s mid-stream, then SIGCONT
  leader-kill     SIGKILL the leader, send jobs at once (fail-over), restart it
  leader-stall    SIGSTOP the leader for 6 s mid-stream (a zombie), then SIGCONT
  broker-restart  stop and start mosquitto on the same port mid-stream

Per scenario: jobs exact / wrong / failed (reasons) / past deadline, latency p50/p95 of
the exact ones, and the scenario's timing: leader fail-over (kill -> new leader
record), broker restart -> first good job, stall -> node out of the leader's plans.
Targets: 0 wrong, 0 past deadline, >= 98% exact under worker churn, 100% of jobs sent
during a fail-over answered, first good job <= 5 s after a broker restart, a stalled
node out of plans <= 3 s. Prints markdown; writes chaos.csv and chaos.md to --out.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KEEPALIVE = 10          # the node default: a frozen node's will fires after 15 s
SLACK_S = 1.0           # a job returning later than deadline + this is "past deadline"


@dataclass
class Outcome:
    kind: str            # exact / wrong / failed / late
    latency: float
    reason: str = ""


@dataclass
class Scenario:
    name: str
    outcomes: list[Outcome] = field(default_factory=list)
    timing: dict[str, float | None] = field(default_factory=dict)

    def count(self, kind: str) -> int:
        return sum(o.kind == kind for o in self.outcomes)


class Runner:
    def __init__(self, url: str, mesh: str, deadline: float, shapes: list[int]) -> None:
        import torch
        import meshdl
        self.url, self.mesh, self.deadline = url, mesh, deadline
        self.model = meshdl.models.build("tiny_cnn")
        gen = torch.Generator().manual_seed(7)
        self.inputs = []
        for s in shapes:
            x = torch.randn(1, 3, s, s, generator=gen)
            with torch.no_grad():
                self.inputs.append((x, self.model(x)))

    def job(self, client, i: int) -> Outcome:
        from meshdl.errors import MeshdlError
        x, ref = self.inputs[i % len(self.inputs)]
        t0 = time.monotonic()
        try:
            r = client.infer(x, model="tiny_cnn", timeout=self.deadline)
        except MeshdlError as exc:
            took = time.monotonic() - t0
            kind = "late" if took > self.deadline + SLACK_S else "failed"
            return Outcome(kind, took, _reason(str(exc)))
        took = time.monotonic() - t0
        if took > self.deadline + SLACK_S:
            return Outcome("late", took)
        diff = (r.output - ref).abs().max().item()
        ok = diff <= 1e-4 * ref.abs().max().item() and int(r.output.argmax()) == int(ref.argmax())
        return Outcome("exact" if ok else "wrong", took, "" if ok else f"max diff {diff:.3g}")


def _reason(msg: str) -> str:
    """A short named reason from a JobError message."""
    for key in ("stopped responding", "went offline", "superseded", "no live members",
                "no answer from the leader", "no answer before the deadline",
                "refused", "not connected", "could not"):
        if key in msg:
            return key
    return msg[:60]


def _stream(runner: Runner, client, sc: Scenario, n: int, gap: float = 0.0,
            during=None) -> None:
    for i in range(n):
        if during is not None:
            during(i)
        sc.outcomes.append(runner.job(client, i))
        if gap:
            time.sleep(gap)


STALL_S = 6.0       # how long a stalled process stays stopped (well past liveness, < keepalive)


@contextmanager
def _frozen(pid: int, hold_s: float):
    """SIGSTOP ``pid`` for the block, and at least ``hold_s`` in all; SIGCONT always."""
    os.kill(pid, signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        yield
        time.sleep(max(0.0, hold_s - (time.monotonic() - t0)))
    finally:
        os.kill(pid, signal.SIGCONT)


def _wait(pred, timeout: float, step: float = 0.05) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if pred():
            return time.monotonic() - t0
        time.sleep(step)
    return None


def _planned_without(snap, node: str) -> bool:
    """The leader's current plans (per standing request, the one it published last in
    its term) leave ``node`` out. A superseded plan stays retained a few seconds so
    jobs on it finish (``leader.RETIRE_S``): it is not a current plan."""
    if snap.leader is None:
        return False
    newest: dict[str, object] = {}
    for m in snap.plans.values():
        if m.term != snap.leader.term:
            continue
        key = json.dumps((m.plan.get("meta") or {}).get("request"), sort_keys=True,
                         default=str)
        if key not in newest or m.ts > newest[key].ts:
            newest[key] = m
    return bool(newest) and all(node not in (m.plan.get("meta") or {}).get("members", [node])
                                for m in newest.values())


def run(args) -> list[Scenario]:
    from meshdl.client import MeshClient
    from meshdl.node.launcher import MeshUp
    from meshdl.transport.broker import EmbeddedBroker
    from meshdl.data import data_dir
    work = Path(tempfile.mkdtemp(prefix="meshdl-chaos-"))
    conf = work / "broker.conf"
    conf.write_text((data_dir("broker") / "plain.conf").read_text())
    env = dict(os.environ, MESHDL_KEEPALIVE=str(KEEPALIVE))
    shapes = [32, 40, 48, 56] if args.quick else [32, 40, 48, 56, 64, 72]
    n = args.jobs
    out: list[Scenario] = []
    rnd = random.Random(1)
    with EmbeddedBroker(str(conf), backend="mosquitto", workdir=work / "b") as b:
        up = MeshUp(args.topology, broker=b.url, mesh="chaos", model="tiny_cnn",
                    log_dir=work / "logs", verbose=True, env=env)
        with up:
            up.wait_ready(180)
            runner = Runner(b.url, "chaos", args.deadline, shapes)
            source = up.mesh_obj.defaults.get("source")
            with MeshClient(b.url, "chaos") as c:
                for i in range(len(shapes)):          # warm: every shape traced once
                    runner.job(c, i)

                def leader() -> str:
                    snap = up.watcher.snapshot()
                    return snap.leader.node if snap.leader else ""

                def workers() -> list[str]:
                    return [d for d in up.alive() if d not in (leader(), source)]

                # -------------------------------------------------- baseline
                sc = Scenario("baseline")
                _stream(runner, c, sc, n)
                out.append(sc)

                # -------------------------------------------------- concurrent clients
                sc = Scenario("concurrent")
                clients = [MeshClient(b.url, "chaos") for _ in range(3)]
                try:
                    ts = [threading.Thread(target=_stream, args=(runner, cl, sc, max(2, n // 3)))
                          for cl in clients]
                    for t in ts:
                        t.start()
                    for t in ts:
                        t.join()
                finally:
                    for cl in clients:
                        cl.close()
                out.append(sc)

                # -------------------------------------------------- worker churn
                sc = Scenario("worker-churn")
                killed: list[str] = []

                def churn(i: int) -> None:
                    for d in list(killed):
                        if d not in up.alive():
                            up.spawn(d)
                        killed.remove(d)
                    if i % 3 == 1:
                        ws = workers()
                        if ws:
                            v = rnd.choice(ws)
                            up.kill(v)
                            killed.append(v)
                _stream(runner, c, sc, 2 * n, during=churn)
                for d in killed:
                    up.spawn(d)
                up.wait_ready(120)
                out.append(sc)

                # -------------------------------------------------- worker stall
                sc = Scenario("worker-stall")
                v = (workers() or [""])[0]
                if v:       # stall a device the leader plans with
                    _wait(lambda: not _planned_without(up.watcher.snapshot(), v) and all(
                        v in (m.plan.get("meta") or {}).get("members", [])
                        for m in up.watcher.snapshot().plans.values()
                        if up.watcher.snapshot().leader
                        and m.term == up.watcher.snapshot().leader.term), 20)
                    with _frozen(up.procs[v].pid, STALL_S):
                        sc.timing["stall_to_dropped_s"] = _wait(
                            lambda: _planned_without(up.watcher.snapshot(), v), 12)
                        _stream(runner, c, sc, max(2, n // 3))
                    _stream(runner, c, sc, max(2, n // 3))
                up.wait_ready(120)
                out.append(sc)

                # -------------------------------------------------- leader kill
                sc = Scenario("leader-kill")
                old = leader()
                up.kill(old)
                res: list[Outcome] = []
                ts = [threading.Thread(target=lambda: res.append(runner.job(c, 0)))
                      for _ in range(3)]                   # sent during the fail-over
                for t in ts:
                    t.start()
                sc.timing["failover_s"] = _wait(lambda: leader() not in ("", old), 30)
                for t in ts:
                    t.join()
                sc.outcomes.extend(res)
                sc.timing["failover_answered_pct"] = 100.0 * sum(
                    o.kind == "exact" for o in res) / len(res)
                _stream(runner, c, sc, max(2, n // 3))
                up.spawn(old)
                up.wait_ready(120)
                out.append(sc)

                # -------------------------------------------------- leader stall (zombie)
                sc = Scenario("leader-stall")
                old = leader()
                with _frozen(up.procs[old].pid, STALL_S):
                    res = []
                    t = threading.Thread(target=lambda: res.append(runner.job(c, 1)))
                    t.start()
                    sc.timing["failover_s"] = _wait(lambda: leader() not in ("", old), 30)
                    t.join()
                    sc.outcomes.extend(res)
                _stream(runner, c, sc, max(2, n // 3))
                up.wait_ready(120)
                out.append(sc)

                # -------------------------------------------------- broker restart
                sc = Scenario("broker-restart")
                _stream(runner, c, sc, 2)
                b.restart()
                t0 = time.monotonic()
                first = None
                while time.monotonic() - t0 < 60:
                    o = runner.job(c, 2)
                    sc.outcomes.append(o)
                    if o.kind == "exact":
                        first = time.monotonic() - t0
                        break
                sc.timing["restart_to_first_good_s"] = first
                _stream(runner, c, sc, max(2, n // 3))
                out.append(sc)
    if not args.keep:
        import shutil
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"logs kept in {work}")
    return out


def report(scs: list[Scenario], out_dir: Path) -> str:
    rows = []
    for sc in scs:
        lat = sorted(o.latency for o in sc.outcomes if o.kind == "exact")
        p = (lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else None)
        reasons: dict[str, int] = {}
        for o in sc.outcomes:
            if o.kind in ("failed", "wrong", "late") and o.reason:
                reasons[o.reason] = reasons.get(o.reason, 0) + 1
        total = len(sc.outcomes)
        rows.append({
            "scenario": sc.name, "jobs": total, "exact": sc.count("exact"),
            "exact_pct": round(100.0 * sc.count("exact") / total, 1) if total else None,
            "wrong": sc.count("wrong"), "failed": sc.count("failed"),
            "past_deadline": sc.count("late"),
            "reasons": "; ".join(f"{k} x{v}" for k, v in reasons.items()),
            "p50_s": None if not lat else round(statistics.median(lat), 3),
            "p95_s": None if not lat else round(p(0.95), 3),
            **{k: (None if v is None else round(v, 2)) for k, v in sc.timing.items()}})
    keys = ["scenario", "jobs", "exact", "exact_pct", "wrong", "failed", "past_deadline",
            "p50_s", "p95_s", "failover_s", "failover_answered_pct",
            "restart_to_first_good_s", "stall_to_dropped_s", "reasons"]
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "chaos.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k) for k in keys})
    fmt = lambda v: "-" if v is None else str(v)
    md = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    md += ["| " + " | ".join(fmt(r.get(k)) for k in keys) + " |" for r in rows]
    text = "\n".join(md)
    (out_dir / "chaos.md").write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes and jobs")
    ap.add_argument("--topology", default="home-4", help="topology name or file")
    ap.add_argument("--jobs", type=int, default=None, help="jobs per scenario (base count)")
    ap.add_argument("--deadline", type=float, default=30.0, help="per-job deadline, s")
    ap.add_argument("--out", default=str(ROOT / "results" / "chaos"))
    ap.add_argument("--keep", action="store_true", help="keep the node logs")
    args = ap.parse_args()
    if args.jobs is None:
        args.jobs = 6 if args.quick else 15
    import logging
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    t0 = time.monotonic()
    scs = run(args)
    print(report(scs, Path(args.out)))
    print(f"\n({time.monotonic() - t0:.0f} s; --jobs {args.jobs}, deadline {args.deadline:g} s, "
          f"topology {args.topology})")


if __name__ == "__main__":
    main()
