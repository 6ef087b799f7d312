"""Control-plane benchmark: emulated meshes of 5, 10 and 20 node processes.

For each size (a ``random_mesh(n, seed)`` topology, one ``meshdl node start`` process
per device, one local mosquitto):
  ready_s      start -> every node reports the same leader, term and plan(s)
  failover_s   SIGKILL the leader -> a new leader record
  agree_s      SIGKILL the leader -> every survivor reports the new leader's plan(s)
  drop_s       SIGKILL a worker -> a plan planned without it (plan meta "members")
  msgs_per_s   messages on meshdl/v1/{mesh}/# at rest (over --rest seconds)

    python tools/bench_control.py [--sizes 5,10,20] [--model tiny_cnn] [--rest 5]

Writes results/control/bench_control.{csv,md}.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import threading
import time
from pathlib import Path

from meshdl.mesh import random_mesh
from meshdl.node.launcher import MeshUp
from meshdl.transport.paho_bus import PahoBus
from meshdl.wire import topics

FIELDS = ["nodes", "ready_s", "failover_s", "agree_s", "drop_s", "msgs_per_s", "leader",
          "new_leader", "model"]


def count_messages(url: str, mesh: str, seconds: float) -> float:
    n = [0]
    lock = threading.Lock()

    def on(topic, payload, retained):
        if not retained:
            with lock:
                n[0] += 1
    with PahoBus(url) as bus:
        bus.subscribe(topics.mesh_all(mesh), on)
        time.sleep(0.5)                       # retained replay is over
        with lock:
            n[0] = 0
        time.sleep(seconds)
        with lock:
            return n[0] / seconds


def members_of(snap, pid):
    return set((snap.plans[pid].plan.get("meta") or {}).get("members") or ())


def run_size(n: int, model: str, rest: float, seed: int, log_root: Path | None) -> dict:
    mesh = random_mesh(n, seed=seed, name=f"bench-{n}")
    row = {"nodes": n, "model": model}
    t0 = time.monotonic()
    with MeshUp(mesh, mesh="bench", model=model, dataplane=False, verbose=True,
                log_dir=None if log_root is None else log_root / f"n{n}") as up:
        snap = up.wait_ready(180)
        row["ready_s"] = time.monotonic() - t0
        row["msgs_per_s"] = count_messages(up.url, "bench", rest)
        leader = snap.leader.node
        row["leader"] = leader

        t1 = time.monotonic()
        up.kill(leader)
        snap = up.wait_for(lambda s: s.leader is not None and s.leader.node != leader, 30,
                           "a new leader")
        row["failover_s"] = time.monotonic() - t1
        row["new_leader"] = snap.leader.node
        survivors = [d for d in up.alive()]
        snap = up.wait_for(lambda s: s.agreed(survivors) and all(
            leader not in members_of(s, p) for p in s.plans), 120, "agreement")
        row["agree_s"] = time.monotonic() - t1

        victim = next(d for d in sorted(survivors) if d != snap.leader.node)
        t2 = time.monotonic()
        up.kill(victim)
        up.wait_for(lambda s: s.plans and all(victim not in members_of(s, p)
                                              for p in s.plans), 60, "a plan without "
                    + victim)
        row["drop_s"] = time.monotonic() - t2
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="5,10,20")
    ap.add_argument("--model", default="tiny_cnn")
    ap.add_argument("--rest", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="results/control")
    ap.add_argument("--logs", default=None, help="Keep node logs in this directory.")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        print(f"--- {n} nodes", flush=True)
        row = run_size(n, args.model, args.rest, args.seed,
                       Path(args.logs) if args.logs else None)
        rows.append(row)
        print("  " + "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in row.items()), flush=True)
    with open(out / "bench_control.csv", "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)
    lines = [f"# Control-plane benchmark ({os.cpu_count()} cores, mosquitto on loopback, "
             f"model {args.model})", "",
             f"Command: `python tools/bench_control.py --sizes {args.sizes} --model "
             f"{args.model} --rest {args.rest:g}`", "",
             "| nodes | start -> agreed leader+plan (s) | leader failover (s) | failover -> "
             "agreed new plan (s) | worker death -> plan without it (s) | msgs/s at rest |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['nodes']} | {r['ready_s']:.2f} | {r['failover_s']:.3f} | "
                     f"{r['agree_s']:.2f} | {r['drop_s']:.2f} | {r['msgs_per_s']:.1f} |")
    (out / "bench_control.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
