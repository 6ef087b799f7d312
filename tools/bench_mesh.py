"""Benchmark the mesh runtime on emulated meshes, and its raw piece transport.

    python tools/bench_mesh.py [--quick] [--out results/mesh] [--runs 2]
    python tools/bench_mesh.py --netns [--topologies home-wifi,...] [--models ...]

``--netns`` (root, iproute2): realistic star meshes over real shaped links side by side
with the plain emulator (tools/bench_mesh_netns.py), instead of 1. and 2. below; each
row also runs the best single device (input shipped to it) in the same mesh, jobs
alternating with meshdl's, and reports measured / measured. ``--modes emulator`` runs
the plain emulator only (no root needed).

1. Latency: every device of a topology runs as an emulated DataPlane (compute paced
   to the device's FLOP/s, every hop to its link) in this process, on a mosquitto
   started here; a MeshClient sends jobs. Per (mesh, bandwidth cap, model, strategy):
   measured latency (the source holds the input -> the sink holds the answer, what the
   cost model predicts), end to end (input sent by the client -> answer received),
   predicted latency (the cost model), their ratios, the predicted energy per inference, and for meshdl the speedup
   over the fastest single device (its FLOPs / that device's FLOP/s) and that speedup
   as a share of the ideal one (sum of FLOP/s over the fastest device's).
2. Transport: 1 MiB pieces between two processes with the data plane's reliable
   sender (acks, window) vs bare paho + mosquitto publishing 1 MiB payloads (QoS 1),
   measured in the same run: the same number of pieces, interleaved runs (order
   alternating), the median of --transport-runs runs of each, every run reported
   with the sender's and receiver's CPU time per MiB.

Writes bench_mesh.csv, transport.csv, bench_mesh.md and bench_mesh.png to --out.
Honest pacing needs this machine to compute each task faster than the emulated
device would; the log warns for every task where it did not.
"""
from __future__ import annotations

import argparse
import csv
import logging
import multiprocessing as mp
import statistics
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_mesh")

FULL = {"configs": [("home-4", None), ("disnet-net0", 10), ("disnet-net0", 15),
                    ("disnet-net0", 50)],
        "models": ["vgg16_bn", "resnet18", "mobilenet_v2"],
        "strategies": ["meshdl", "disnet", "modnn", "local"]}
QUICK = {"configs": [("home-4", None), ("disnet-net0", 50)],
         "models": ["resnet18", "mobilenet_v2"],
         "strategies": ["meshdl", "disnet", "local"]}
MIB = 1 << 20


class PacingCounter(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        if "emulated device" in record.getMessage():
            self.count += 1


# ----------------------------------------------------------------- latency
def bench_latency(spec: dict, runs: int, url: str, pacing: PacingCounter) -> list[dict]:
    import torch
    import meshdl
    from meshdl.client import MeshClient
    from meshdl.node.harness import InProcessMesh
    rows = []
    for topo, cap in spec["configs"]:
        mesh = meshdl.load_topology(topo)
        if cap:
            mesh = mesh.with_bandwidth_cap(cap)
        flops = [d.flops for d in mesh.devices.values()]
        ideal = sum(flops) / max(flops)
        name = f"b{topo.replace('-', '')}{cap or 0}"
        with InProcessMesh(url, mesh, mesh_name=name, emulate=True) as m, \
                MeshClient(url, name) as c:
            for model in spec["models"]:
                x = torch.randn(1, 3, 224, 224)
                for strategy in spec["strategies"]:
                    before = pacing.count
                    try:
                        c.infer(x, model=model, strategy=strategy, alpha=1.0, timeout=600)
                        res = [c.infer(x, model=model, strategy=strategy, alpha=1.0,
                                       timeout=600) for _ in range(runs)]
                    except meshdl.MeshdlError as exc:
                        log.warning("%s %s %s: %s", topo, model, strategy, exc)
                        continue
                    plan = res[-1].plan
                    # like for like with the cost model: source holds the input -> sink
                    # holds the answer; e2e_s adds client -> source and sink -> client
                    measured = statistics.median(
                        r.mesh_latency_s if r.mesh_latency_s is not None else r.latency_s
                        for r in res)
                    e2e = statistics.median(r.latency_s for r in res)
                    g = m.graphs.get(model, (1, 3, 224, 224))
                    single = g.flops / max(flops)
                    row = {"mesh": topo, "cap_mbps": cap or "", "model": model,
                           "strategy": strategy, "devices": len(plan.devices()),
                           "measured_s": round(measured, 4),
                           "predicted_s": round(plan.latency_s, 4),
                           "ratio": round(measured / plan.latency_s, 3),
                           "e2e_s": round(e2e, 4),
                           "e2e_ratio": round(e2e / plan.latency_s, 3),
                           "energy_j": round(plan.energy_j, 3),
                           "speedup_vs_fastest": round(single / measured, 3),
                           "ideal_speedup": round(ideal, 3),
                           "share_of_ideal": round(single / measured / ideal, 3),
                           "pacing_warnings": pacing.count - before}
                    rows.append(row)
                    log.info("%s", row)
    return rows


# ----------------------------------------------------------------- transport
def _cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _bare_receiver(url: str, topic: str, n: int, q) -> None:
    from meshdl.transport.paho_bus import PahoBus
    import threading
    got = [0]
    done = threading.Event()

    def on(t, p, r):
        got[0] += 1
        if got[0] >= n:
            done.set()
    with PahoBus(url, max_inbound=100000) as bus:
        bus.subscribe(topic, on, qos=1)
        q.put("ready")
        c0 = _cpu()
        done.wait(300)
        q.put((time.time(), _cpu() - c0, got[0]))


def _piece_receiver(url: str, mesh: str, me: str, n: int, q, stop) -> None:
    """The data plane's receive path (as ``DataPlane._on_piece``): verify the crc,
    reassemble, dedupe, ack back (``flow.Acker``, batched)."""
    from meshdl.node.credit import Acker, CreditLedger
    from meshdl.node.flow import ReceiveLog
    from meshdl.transport.paho_bus import PahoBus
    from meshdl.wire import topics
    from meshdl.wire.codec import PieceFrame, decode_frame
    from meshdl.wire.reassembly import Reassembler
    import threading
    reasm, seen = Reassembler(), ReceiveLog()
    got = [0]
    done = threading.Event()
    with PahoBus(url, max_inbound=100000) as bus:
        acker = Acker(me, lambda hop, topic, payload: bus.publish(topic, payload, qos=1),
                      credit=CreditLedger().grant)     # grants as a node's data plane does

        def on(topic, payload, retained):
            step = topics.next_hop(topic, me)
            f = decode_frame(payload)
            if not isinstance(f, PieceFrame) or seen.seen((f.job, f.piece)):
                return
            if reasm.add(f) is not None and seen.mark((f.job, f.piece)):
                back = [f.src_task[1:]]
                acker.ack(back[0], topics.route_topic(mesh, back, step.job, step.piece),
                          f.job, f.piece, f.term, peer=back[0])
                got[0] += 1
                if got[0] >= n:
                    done.set()
        bus.subscribe(topics.route_inbox(mesh, me), on, qos=1)
        q.put("ready")
        c0 = _cpu()
        done.wait(300)
        cpu = _cpu() - c0
        q.put((time.time(), cpu, got[0]))
        stop.wait(60)              # keep acking retransmissions until the sender is done
        acker.stop()


def _run_bare(ctx, url: str, n: int, payload) -> dict:
    from meshdl.transport.paho_bus import PahoBus
    q = ctx.Queue()
    p = ctx.Process(target=_bare_receiver, args=(url, "bench/bare", n, q))
    p.start()
    q.get(timeout=60)
    with PahoBus(url) as bus:
        time.sleep(0.3)
        c0, t0 = _cpu(), time.time()
        for _ in range(n):
            bus.publish("bench/bare", payload.tobytes(), qos=1)   # one copy, as encode makes
        tx_cpu = _cpu() - c0
        t1, rx_cpu, got = q.get(timeout=300)
    p.join(10)
    return {"path": "bare paho+mosquitto", "pieces": got, "seconds": t1 - t0,
            "tx_cpu_s": tx_cpu, "rx_cpu_s": rx_cpu, "retransmissions": 0}


def _run_pieces(ctx, url: str, n: int, payload) -> dict:
    from meshdl.node.emulation import Links
    from meshdl.node.flow import ReliableSender
    from meshdl.transport.paho_bus import PahoBus
    from meshdl.wire import topics
    from meshdl.wire.codec import AckFrame, decode_frame, encode_frames
    q, stop, mesh = ctx.Queue(), ctx.Event(), "bench"
    p = ctx.Process(target=_piece_receiver, args=(url, mesh, "rx", n, q, stop))
    p.start()
    q.get(timeout=60)
    with PahoBus(url) as bus:
        links = Links("tx", lambda t, b: bus.publish(t, b, qos=1))
        sender = ReliableSender("tx", lambda tr, fr, done: links.send(tr.path[1], fr, done),
                                window_bytes=64 * MIB)

        def on_ack(topic, data, retained):
            f = decode_frame(data)
            if isinstance(f, AckFrame):
                sender.on_ack_frame(f)          # the receiver's credit, then its pieces
        bus.subscribe(topics.route_inbox(mesh, "tx"), on_ack, qos=1)
        time.sleep(0.3)
        c0, t0 = _cpu(), time.time()
        trs = []
        for i in range(n):
            piece = f"p{i}"
            topic = topics.route_topic(mesh, ["rx"], "bench", piece)
            frames = [(topic, f) for f in encode_frames("bench", piece, payload, src_task="@tx")]
            trs.append(sender.send("bench", piece, "rx", ["tx", "rx"], frames, 0.01,
                                   lambda msg: log.error(msg)))
        for tr in trs:
            tr.acked.wait(120)
        t1, tx_cpu = time.time(), _cpu() - c0
        resent = sender.retransmissions
        acked = sum(tr.acked.is_set() for tr in trs)
        sender.stop()
        links.stop()
    _, rx_cpu, _ = q.get(timeout=60)
    stop.set()
    p.join(10)
    return {"path": "meshdl pieces (acked)", "pieces": acked, "seconds": t1 - t0,
            "tx_cpu_s": tx_cpu, "rx_cpu_s": rx_cpu, "retransmissions": resent}


def bench_transport(url: str, n: int, reps: int = 3) -> list[dict]:
    """``reps`` interleaved runs of each path (the order alternates), ``n`` 1 MiB pieces
    each, after one short warm-up run of each; rows for every run plus the medians."""
    import numpy as np
    ctx = mp.get_context("spawn")
    payload = np.random.default_rng(0).integers(0, 255, MIB, dtype=np.uint8)
    runs = {"bare": _run_bare, "pieces": _run_pieces}
    for fn in runs.values():
        fn(ctx, url, max(10, n // 10), payload)
    rows = []
    for rep in range(reps):
        for name in (("bare", "pieces") if rep % 2 == 0 else ("pieces", "bare")):
            r = runs[name](ctx, url, n, payload)
            mib = r["pieces"]
            rows.append({"path": r["path"], "run": rep + 1, "pieces": mib,
                         "MiB_per_s": round(mib / r["seconds"], 1),
                         "tx_cpu_ms_per_MiB": round(r["tx_cpu_s"] / max(1, mib) * 1e3, 3),
                         "rx_cpu_ms_per_MiB": round(r["rx_cpu_s"] / max(1, mib) * 1e3, 3),
                         "retransmissions": r["retransmissions"]})
            log.info("transport run: %s", rows[-1])
    out = list(rows)
    for path in ("bare paho+mosquitto", "meshdl pieces (acked)"):
        mine = [r for r in rows if r["path"] == path]
        out.append({"path": path, "run": "median", "pieces": n,
                    **{k: round(statistics.median(r[k] for r in mine), 3)
                       for k in ("MiB_per_s", "tx_cpu_ms_per_MiB", "rx_cpu_ms_per_MiB")},
                    "retransmissions": sum(r["retransmissions"] for r in mine)})
    out[-1]["share_of_bare"] = round(out[-1]["MiB_per_s"] / out[-2]["MiB_per_s"], 3)
    return out


# ----------------------------------------------------------------- output
def write(out: Path, rows: list[dict], trans: list[dict], cmd: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, data in (("bench_mesh.csv", rows), ("transport.csv", trans)):
        if data:
            keys = list(dict.fromkeys(k for r in data for k in r))
            with open(out / name, "w", newline="") as f:
                w = csv.DictWriter(f, keys)
                w.writeheader()
                w.writerows(data)
    lines = [f"# meshdl mesh benchmark\n\n`{cmd}`\n"]
    if rows:
        keys = list(rows[0])
        lines += ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
        ratios = [r["ratio"] for r in rows]
        lines.append(f"\nmedian measured/predicted: {statistics.median(ratios):.3f} "
                     f"(target within 15%: 0.85-1.15; end to end incl. client hops: "
                     f"{statistics.median(r['e2e_ratio'] for r in rows):.3f}); pacing "
                     f"warnings: {sum(r['pacing_warnings'] for r in rows)}")
    if trans:
        lines.append("\n| transport | run | pieces | MiB/s | sender CPU ms/MiB | receiver CPU "
                     "ms/MiB | retransmissions | share of bare (medians) |\n"
                     "|---|---|---|---|---|---|---|---|")
        lines += [f"| {t['path']} | {t['run']} | {t['pieces']} | {t['MiB_per_s']} | "
                  f"{t['tx_cpu_ms_per_MiB']} | {t['rx_cpu_ms_per_MiB']} | "
                  f"{t['retransmissions']} | {t.get('share_of_bare', '')} |" for t in trans]
    (out / "bench_mesh.md").write_text("\n".join(lines) + "\n")
    if rows:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 5))
        for s in sorted({r["strategy"] for r in rows}):
            pts = [(r["predicted_s"], r["measured_s"]) for r in rows if r["strategy"] == s]
            ax.scatter(*zip(*pts), label=s)
        hi = max(max(r["predicted_s"], r["measured_s"]) for r in rows) * 1.2
        lo = min(min(r["predicted_s"], r["measured_s"]) for r in rows) / 1.2
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="predicted latency (s)",
               ylabel="measured latency (s)", title="emulated meshes: measured vs predicted")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "bench_mesh.png", dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="home-4 + one disnet cap, 2 models")
    ap.add_argument("--out", default=str(ROOT / "results" / "mesh"))
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--pieces", type=int, default=200, help="1 MiB pieces for the transport")
    ap.add_argument("--transport-runs", type=int, default=3,
                    help="interleaved runs of each transport path (median reported)")
    ap.add_argument("--skip-latency", action="store_true")
    ap.add_argument("--models", help="comma-separated models (override)")
    ap.add_argument("--strategies", help="comma-separated strategies (override)")
    ap.add_argument("--configs", help="comma-separated TOPOLOGY[:CAP_MBPS] (override)")
    ap.add_argument("--netns", action="store_true", help="realistic star meshes over "
                    "shaped links (network namespaces) vs the emulator, side by side")
    ap.add_argument("--topologies", help="with --netns: comma-separated star topologies")
    ap.add_argument("--max-time-scale", type=float, default=1e4,
                    help="with --netns: cap the time scale picked per row (keeps runs short; "
                    "rows over the cap may show pacing warnings)")
    ap.add_argument("--min-job-s", type=float, default=2.0,
                    help="with --netns: a time scale at least this over the predicted job "
                    "time (fixed per-piece costs of this machine stay small against it)")
    ap.add_argument("--time-scale", type=float, help="with --netns: this time scale for "
                    "every row (default: picked per row)")
    ap.add_argument("--modes", default="netns,emulator", help="with --netns: comma-separated "
                    "meshes to run, of netns (shaped links, root) and emulator (loopback)")
    args = ap.parse_args()
    if args.netns:
        return main_netns(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("meshdl", "meshdl.transport"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    pacing = PacingCounter()
    logging.getLogger("meshdl.node.emulation").addHandler(pacing)
    from meshdl.transport.broker import EmbeddedBroker
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = dict(QUICK if args.quick else FULL)
    if args.models:
        spec["models"] = args.models.split(",")
    if args.strategies:
        spec["strategies"] = args.strategies.split(",")
    if args.configs:
        spec["configs"] = [(c.split(":")[0], float(c.split(":")[1]) if ":" in c else None)
                           for c in args.configs.split(",")]
    with EmbeddedBroker("plain", backend="mosquitto") as b:
        trans = bench_transport(b.url, 50 if args.quick else args.pieces, args.transport_runs)
        log.info("transport: %s", trans)
        rows = [] if args.skip_latency else bench_latency(spec, args.runs, b.url, pacing)
    write(out, rows, trans, " ".join(["python tools/bench_mesh.py", *sys.argv[1:]]))
    print((out / "bench_mesh.md").read_text())


def main_netns(args) -> None:
    import signal

    def interrupt(*_):
        raise KeyboardInterrupt      # unwind: every mesh and namespace is torn down
    signal.signal(signal.SIGTERM, interrupt)
    sys.path.insert(0, str(ROOT / "tools"))
    from bench_mesh_netns import MODELS, TOPOLOGIES, bench_star, write_star
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("meshdl").setLevel(logging.WARNING)
    warnings.simplefilter("ignore")
    out = Path(args.out)
    topologies = args.topologies.split(",") if args.topologies else TOPOLOGIES
    models = args.models.split(",") if args.models else MODELS
    cmd = " ".join(["python tools/bench_mesh.py", *sys.argv[1:]])
    bad = set(args.modes.split(",")) - {"netns", "emulator"}
    if bad:
        raise SystemExit(f"--modes: unknown mode(s) {', '.join(sorted(bad))}; "
                         "use netns and/or emulator")
    rows = bench_star(topologies, models, args.runs, out, max_k=args.max_time_scale,
                      on_rows=lambda r: write_star(out, r, cmd), min_job_s=args.min_job_s,
                      time_scale=args.time_scale, modes=tuple(args.modes.split(",")))
    print(write_star(out, rows, cmd))


if __name__ == "__main__":
    main()
