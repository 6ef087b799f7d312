"""Memory of node processes over many jobs of many input shapes (issue 8: "RSS flat
over 500 jobs of 24 shapes").

    python tools/bench_memory.py [--model resnet18] [--shapes 24] [--jobs 500]
                                 [--topology home-4] [--max-graphs 16] [--out results]

A real mesh: mosquitto started here and one ``meshdl node start --emulate`` process
per device of ``--topology`` (``MeshUp``), and one client sending ``--jobs`` jobs back
to back, cycling through ``--shapes`` square input sizes (``--min-size`` upwards in
steps of ``--step``). Every answer is checked against the local model. Each node's
resident memory (``/proc/PID/status`` VmRSS) is sampled after the warm-up (the first
pass over every shape), every ``--sample-every`` jobs, and at the end.

Prints per node: RSS after warm-up, after all jobs, the growth in MiB and %, the peak,
and the jobs exact / total; writes ``bench_memory.csv`` (every sample) under --out.
Target: growth after warm-up small (< 5 % or < 30 MiB per node).
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1024


def rss_kb(pid: int) -> int:
    """VmRSS of a live process in KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run(args) -> tuple[list[dict], dict]:
    import torch
    import meshdl
    from meshdl.client import MeshClient
    from meshdl.data import data_dir
    from meshdl.errors import MeshdlError
    from meshdl.node.launcher import MeshUp
    from meshdl.transport.broker import EmbeddedBroker
    sizes = [args.min_size + args.step * i for i in range(args.shapes)]
    model = meshdl.models.build(args.model).eval()
    gen = torch.Generator().manual_seed(3)
    inputs = []
    with torch.no_grad():
        for s in sizes:
            x = torch.randn(1, 3, s, s, generator=gen)
            inputs.append((x, model(x)))
    tmp = tempfile.TemporaryDirectory(prefix="meshdl-mem-")   # removed at exit, also on error
    work = Path(tmp.name)
    conf = work / "broker.conf"
    conf.write_text((data_dir("broker") / "plain.conf").read_text())
    samples: list[dict] = []
    tally = {"exact": 0, "wrong": 0, "failed": 0, "reasons": {}}
    node_args = ["--max-graphs", str(args.max_graphs)]
    with EmbeddedBroker(str(conf), backend="mosquitto", workdir=work / "b") as b:
        up = MeshUp(args.topology, broker=b.url, mesh="memory", model=args.model,
                    log_dir=work / "logs", verbose=False, node_args=node_args,
                    env=dict(os.environ))
        with up:
            up.wait_ready(300)
            pids = {d: p.pid for d, p in up.procs.items()}

            def sample(job: int, phase: str) -> None:
                for d, pid in sorted(pids.items()):
                    samples.append({"job": job, "phase": phase, "node": d,
                                    "rss_kb": rss_kb(pid)})
            sample(0, "start")
            with MeshClient(b.url, "memory") as c:
                t0 = time.monotonic()
                for i in range(args.jobs):
                    x, ref = inputs[i % len(inputs)]
                    try:
                        r = c.infer(x, model=args.model, timeout=args.deadline)
                        ok = (r.output - ref).abs().max().item() <= \
                            1e-3 * max(1.0, ref.abs().max().item())
                        tally["exact" if ok else "wrong"] += 1
                    except MeshdlError as exc:
                        tally["failed"] += 1
                        why = str(exc)[:80]
                        tally["reasons"][why] = tally["reasons"].get(why, 0) + 1
                    done = i + 1
                    if done == len(inputs):
                        sample(done, "warm")
                        print(f"warm-up: {done} jobs in {time.monotonic() - t0:.0f} s",
                              flush=True)
                    elif done > len(inputs) and (done % args.sample_every == 0
                                                 or done == args.jobs):
                        sample(done, "end" if done == args.jobs else "run")
                        print(f"{done} jobs, {time.monotonic() - t0:.0f} s, exact "
                              f"{tally['exact']}", flush=True)
                tally["seconds"] = time.monotonic() - t0
            dead = [d for d, p in up.procs.items() if p.poll() is not None]
            tally["dead"] = dead
    return samples, tally


def summary(samples: list[dict], tally: dict, args) -> list[dict]:
    rows = []
    for node in sorted({s["node"] for s in samples}):
        mine = [s for s in samples if s["node"] == node]
        warm = next((s["rss_kb"] for s in mine if s["phase"] == "warm"), 0)
        end = next((s["rss_kb"] for s in mine if s["phase"] == "end"), 0)
        start = next((s["rss_kb"] for s in mine if s["phase"] == "start"), 0)
        peak = max(s["rss_kb"] for s in mine)
        growth = (end - warm) / MIB
        rows.append({"node": node, "start_MiB": round(start / MIB, 1),
                     "warm_MiB": round(warm / MIB, 1), "end_MiB": round(end / MIB, 1),
                     "growth_MiB": round(growth, 1),
                     "growth_pct": round(100.0 * (end - warm) / warm, 1) if warm else None,
                     "peak_MiB": round(peak / MIB, 1),
                     "ok": bool(warm) and (growth < 30 or (end - warm) / warm < 0.05)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--shapes", type=int, default=24)
    ap.add_argument("--min-size", type=int, default=64)
    ap.add_argument("--step", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--topology", default="home-4")
    ap.add_argument("--max-graphs", type=int, default=16,
                    help="each node's traced-graph LRU (node start --max-graphs)")
    ap.add_argument("--deadline", type=float, default=60.0)
    ap.add_argument("--sample-every", type=int, default=50)
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    if args.jobs <= args.shapes:
        ap.error("--jobs must exceed --shapes (the first pass over the shapes is warm-up)")
    samples, tally = run(args)
    rows = summary(samples, tally, args)
    print(f"\n{args.model}, {args.shapes} shapes ({args.min_size}..."
          f"{args.min_size + args.step * (args.shapes - 1)} px), {args.jobs} jobs on "
          f"{args.topology}, graph LRU {args.max_graphs}: exact {tally['exact']}, wrong "
          f"{tally['wrong']}, failed {tally['failed']} in {tally.get('seconds', 0):.0f} s"
          + (f"; nodes died: {tally['dead']}" if tally.get("dead") else "") + "\n")
    for why, n in tally["reasons"].items():
        print(f"- failed x{n}: {why}")
    print("| node | start MiB | after warm-up MiB | after all jobs MiB | growth MiB | "
          "growth % | peak MiB | flat |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['node']} | {r['start_MiB']} | {r['warm_MiB']} | {r['end_MiB']} | "
              f"{r['growth_MiB']} | {r['growth_pct']} | {r['peak_MiB']} | "
              f"{'yes' if r['ok'] else 'NO'} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_memory.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["job", "phase", "node", "rss_kb"])
        w.writeheader()
        w.writerows(samples)
    sys.exit(0 if all(r["ok"] for r in rows) and not tally["wrong"] else 1)


if __name__ == "__main__":
    main()
