"""Benchmark streams of frames on an emulated mesh, and compression on the wire.

    python tools/bench_stream.py [--models resnet18,mobilenet_v2,efficientnet_lite0]
                                 [--topology home-4] [--frames 40] [--out results/stream]

1. Streams (one emulated node process per device, mosquitto, a MeshClient), per model:
   - meshdl streaming: ``MeshClient.stream`` on the leader's throughput plan (frames/s
     in steady state = the slope of answer times over the middle half of the stream,
     and overall = frames / elapsed; p50/p95 frame latency at the client);
   - predicted: ``simulate_stream`` of the same plan(s), window and frame count;
   - one-at-a-time meshdl: ``MeshClient.infer`` frame after frame (objective latency);
   - best single device: a stream on the whole model on the fastest device (the
     ``local`` strategy there, window 2), measured and predicted;
   - RSS of every node process sampled through the stream (first tenth vs last tenth).
2. Wire (in-process emulated data planes, links capped at 10, 20 and 50 Mbit/s), per
   model: bytes on the wire per inference and mesh latency with compression off and
   auto on the same latency plan, measured and predicted (``WireModel``), whether the
   answers are bit-identical, and a plan made counting on compression (what the
   leader of an emulated mesh plans).

Prints markdown tables, writes stream.csv and wire.csv under --out. Honest pacing needs
this machine to compute faster than the emulated devices; on a loaded machine measured
rates fall below the predictions (the table says how far).
"""
from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench_stream")
MODELS = ["mobilenet_v2", "resnet18", "efficientnet_lite0"]


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


class RssSampler(threading.Thread):
    def __init__(self, pids: dict[str, int], period: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pids, self.period = pids, period
        self.samples: dict[str, list[tuple[float, float]]] = {d: [] for d in pids}
        self.stop_evt = threading.Event()

    def run(self) -> None:
        while not self.stop_evt.is_set():
            now = time.monotonic()
            for d, pid in self.pids.items():
                v = rss_mb(pid)
                if v is not None:
                    self.samples[d].append((now, v))
            self.stop_evt.wait(self.period)

    def summary(self) -> dict[str, tuple[float, float, float]]:
        """device -> (median RSS of the first tenth, of the last tenth, max), MB."""
        out = {}
        for d, s in self.samples.items():
            if len(s) < 4:
                continue
            k = max(1, len(s) // 10)
            out[d] = (statistics.median(v for _, v in s[:k]),
                      statistics.median(v for _, v in s[-k:]), max(v for _, v in s))
        return out


def sample_input(model: str):
    from meshdl import imaging
    from meshdl.cli.infer_cmd import sample_image
    return imaging.load_image(sample_image(), preprocessing=imaging.preprocess_for(model))


def frames_of(x, n: int):
    """n distinct frames: the sample photo with a little noise (a camera's frames)."""
    import torch
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        yield x + 0.01 * torch.randn(x.shape, generator=g)


def run_stream(c, model, n, **kw):
    from meshdl.planner.stream import percentile, steady_fps
    t0 = time.monotonic()
    times, lat, plans, failed, order = [], [], set(), 0, []
    for r in c.stream(frames_of(sample_input(model), n), model=model, **kw):
        times.append(time.monotonic() - t0)
        order.append(r.index)
        if r.error:
            failed += 1
            continue
        lat.append(r.latency_s)
        plans.add(r.plan.plan_id)
    assert order == list(range(n)), "stream answered out of order"
    elapsed = time.monotonic() - t0
    return {"fps": steady_fps(times), "fps_overall": n / elapsed,
            "p50": percentile(lat, 50), "p95": percentile(lat, 95), "failed": failed,
            "plans": len(plans), "elapsed": elapsed}


def bench_streams(models, topology, frames_for, single_frames, one_frames, out_rows,
                  k: float = 1.0):
    """``k``: time dilation (every emulated device and link k times slower, so this
    machine keeps up); every figure is reported scaled back (fps x k, seconds / k)."""
    import meshdl
    from meshdl.client import MeshClient
    from meshdl.node.launcher import MeshUp
    from meshdl.planner import simulate_stream
    from meshdl.planner.throughput import replicas, stream_window
    topo = meshdl.load_topology(topology)
    if k != 1.0:
        topo = topo.dilated(k)
    best = max(topo.devices, key=lambda d: (topo.devices[d].flops, d))
    for m in models:
        n_frames = frames_for(m)
        x = sample_input(m)
        g = meshdl.trace(meshdl.models.build(m), tuple(x.shape), name=m)
        log.info("%s: starting %s", m, topology)
        with MeshUp(topology, model=m, verbose=False, mesh=f"bs{m[:6]}",
                    node_args=["--time-scale", str(k)] if k != 1.0 else ()) as up:
            up.wait_ready(240)
            pids = {d: p.pid for d, p in up.procs.items()}
            with MeshClient(up.url, up.mesh_name) as c:
                c.infer(x, model=m, timeout=180)                        # warm every node
                plan = c.request_plan(m, input_shape=tuple(x.shape), objective="throughput",
                                      timeout=120)
                plans, weights = replicas(plan)
                window = stream_window(len(plans))
                run_stream(c, m, min(6, n_frames), window=window)   # warm the replicas
                pred = simulate_stream(plans, g, topo, n_frames=min(n_frames, 160),
                                       window=window, weights=weights)   # steady state
                sampler = RssSampler(pids)
                sampler.start()
                meas = run_stream(c, m, n_frames, window=window, frame_timeout=180)
                sampler.stop_evt.set()
                sampler.join()
                rss = sampler.summary()
                # one at a time (latency plans, as meshdl answered before streams)
                t0 = time.monotonic()
                for fx in frames_of(x, one_frames):
                    c.infer(fx, model=m, timeout=180, objective="latency")
                one_fps = one_frames / (time.monotonic() - t0)
                # the best single device: the whole model there, fed as fast as it takes
                single = run_stream(c, m, single_frames, window=2, strategy="local",
                                    objective=None, source=best, sink=best,
                                    frame_timeout=180)
                splan = c.request_plan(m, "local", input_shape=tuple(x.shape), source=best,
                                       sink=best)
                spred = simulate_stream(splan, g, topo, n_frames=single_frames, window=2)
        growth = max((e - s for s, e, _ in rss.values()), default=0.0)
        row = {"model": m, "topology": topology, "time_scale": k, "frames": n_frames,
               "replicas": len(plans), "window": window,
               "stream_fps": meas["fps"] * k, "stream_fps_overall": meas["fps_overall"] * k,
               "pred_fps": pred.fps * k, "meas_over_pred": meas["fps"] / pred.fps,
               "p50_s": meas["p50"] / k, "p95_s": meas["p95"] / k,
               "pred_p50_s": pred.latency_p50_s / k,
               "pred_p95_s": pred.latency_p95_s / k, "failed": meas["failed"],
               "one_at_a_time_fps": one_fps * k, "single_device": best,
               "single_fps": single["fps_overall"] * k, "single_pred_fps": spred.fps * k,
               "speedup_vs_single": meas["fps"] / single["fps_overall"],
               "speedup_vs_one": meas["fps"] / one_fps,
               "rss_growth_mb": growth,
               "rss": "; ".join(f"{d} {s:.0f}->{e:.0f} (max {mx:.0f})"
                                for d, (s, e, mx) in sorted(rss.items())),
               "bottleneck": pred.bottleneck}
        out_rows.append(row)
        print_stream_rows([row], header=len(out_rows) == 1)


def print_stream_rows(rows, header=True):
    if header:
        print("| model | frames | plans | W | stream fps (pred) | meas/pred | overall fps | "
              "p50 / p95 s (pred) | one-at-a-time fps | best single fps (pred) | x single | "
              "x one | RSS growth MB |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['frames']} | {r['replicas']} | {r['window']} | "
              f"{r['stream_fps']:.2f} ({r['pred_fps']:.2f}) | {r['meas_over_pred']:.2f} | "
              f"{r['stream_fps_overall']:.2f} | "
              f"{r['p50_s']:.2f} / {r['p95_s']:.2f} ({r['pred_p50_s']:.2f} / "
              f"{r['pred_p95_s']:.2f}) | {r['one_at_a_time_fps']:.2f} | "
              f"{r['single_fps']:.2f} ({r['single_pred_fps']:.2f}) on {r['single_device']} | "
              f"{r['speedup_vs_single']:.2f} | {r['speedup_vs_one']:.2f} | "
              f"{r['rss_growth_mb']:.1f} |")
    for r in rows:
        print(f"<!-- {r['model']}: RSS MB first->last tenth: {r['rss']}; bottleneck "
              f"{r['bottleneck']} -->")


def bench_wire(models, topology, caps, out_rows, repeats: int = 4, k: float = 1.0):
    import torch
    import meshdl
    from meshdl.client import MeshClient
    from meshdl.node.harness import InProcessMesh, finish_plan
    from meshdl.planner import simulate
    from meshdl.planner.wiremodel import WireModel, measure_ratios
    from meshdl.transport.broker import EmbeddedBroker
    from meshdl.wire.compress import CodecPolicy
    base = meshdl.load_topology(topology)
    with EmbeddedBroker(backend="mosquitto") as broker:
        for m in models:
            x = sample_input(m)
            g = meshdl.trace(meshdl.models.build(m), tuple(x.shape), name=m)
            ratios = measure_ratios(g, x)
            for cap in caps:
                mesh = base.with_bandwidth_cap(cap)
                plan = meshdl.plan(g, mesh, alpha=1.0)       # a latency plan for the link
                aware = meshdl.plan(g, mesh, alpha=1.0,      # one that counts on compression
                                    wire=WireModel("auto", ratios))
                if k != 1.0:
                    mesh = mesh.dilated(k)
                finish_plan(plan, g, mesh, 1)
                finish_plan(aware, g, mesh, 1)
                modes = {"off": (plan, "off"), "auto": (plan, "auto"), "aware": (aware, "auto")}
                name = f"w{m[:5]}{int(cap)}"
                res = {}
                with InProcessMesh(broker.url, mesh, mesh_name=name, emulate=True,
                                   fixed={m: plan}) as im:
                    with MeshClient(broker.url, name) as c:
                        for warm in (aware, plan):
                            im.leader.fixed[m] = warm
                            c.infer(x, model=m, timeout=300)           # warm both plans
                        runs = {mode: {"lat": [], "out": None, "raw": 0, "wire": 0}
                                for mode in modes}
                        for rep in range(repeats):       # interleaved: load hits all alike
                            order = list(modes) if rep % 2 == 0 else list(modes)[::-1]
                            for mode in order:
                                im.leader.fixed[m] = modes[mode][0]
                                for p in im.planes.values():
                                    p.codecs = CodecPolicy(modes[mode][1])
                                r = c.infer(x, model=m, timeout=300)
                                got = runs[mode]
                                got["lat"].append(r.mesh_latency_s or r.latency_s)
                                got["out"] = got["out"] or r.output.numpy().tobytes()
                                got["same"] = got.get("same", True) and \
                                    got["out"] == r.output.numpy().tobytes()
                                got["raw"] += sum(p.codecs.raw_bytes for p in im.planes.values())
                                got["wire"] += sum(p.codecs.wire_bytes
                                                   for p in im.planes.values())
                        for mode, got in runs.items():
                            pred = simulate(modes[mode][0], g, mesh,
                                            wire=WireModel(modes[mode][1], ratios)).latency_s
                            res[mode] = (got["raw"] / repeats, got["wire"] / repeats,
                                         statistics.median(got["lat"]) / k, pred / k,
                                         got["out"], min(got["lat"]) / k, got["same"])
                row = {"model": m, "cap_mbps": cap, "stages": len(plan.stages),
                       "raw_bytes": res["off"][0], "wire_bytes_off": res["off"][1],
                       "wire_bytes_auto": res["auto"][1],
                       "ratio": res["off"][1] / max(1.0, res["auto"][1]),
                       "latency_off_s": res["off"][2], "latency_auto_s": res["auto"][2],
                       "min_off_s": res["off"][5], "min_auto_s": res["auto"][5],
                       "wire_bytes_aware": res["aware"][1], "latency_aware_s": res["aware"][2],
                       "min_aware_s": res["aware"][5], "pred_aware_s": res["aware"][3],
                       "aware_devices": len(aware.devices()),
                       "pred_off_s": res["off"][3], "pred_auto_s": res["auto"][3],
                       "bit_identical": res["off"][4] == res["auto"][4] and res["off"][6]
                       and res["auto"][6]}
                out_rows.append(row)
                print_wire_rows([row], header=len(out_rows) == 1)


def print_wire_rows(rows, header=True):
    if header:
        print("| model | Mbit/s | stages | wire KiB/inference off -> auto | ratio | mesh "
              "latency s off -> auto: median (best) | predicted | bit-identical | plan "
              "counting on compression: KiB, latency median (best), predicted |")
        print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['cap_mbps']:g} | {r['stages']} | "
              f"{r['wire_bytes_off'] / 1024:.0f} -> {r['wire_bytes_auto'] / 1024:.0f} | "
              f"{r['ratio']:.2f} | {r['latency_off_s']:.3f} ({r['min_off_s']:.3f}) -> "
              f"{r['latency_auto_s']:.3f} ({r['min_auto_s']:.3f}) | "
              f"{r['pred_off_s']:.3f} -> {r['pred_auto_s']:.3f} | {r['bit_identical']} | "
              f"{r['wire_bytes_aware'] / 1024:.0f}, {r['latency_aware_s']:.3f} "
              f"({r['min_aware_s']:.3f}), {r['pred_aware_s']:.3f} |")


def write_csv(path: Path, rows) -> None:
    if not rows:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--topology", default="home-4")
    ap.add_argument("--frames", default="40", help="frames per stream: N, or MODEL=N,... "
                    "with an optional default N (e.g. 300,mobilenet_v2=1000)")
    ap.add_argument("--single-frames", type=int, default=8)
    ap.add_argument("--one-frames", type=int, default=5)
    ap.add_argument("--caps", default="10,20,50")
    ap.add_argument("--time-scale", type=float, default=1.0,
                    help="emulate every device and link K times slower (so a loaded machine "
                    "keeps up); figures are reported scaled back")
    ap.add_argument("--skip-streams", action="store_true")
    ap.add_argument("--skip-wire", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "results" / "stream"))
    ap.add_argument("-v", action="store_true")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.v else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    if not a.v:       # per-task pacing warnings on a loaded machine: counted in the ratio
        logging.getLogger("meshdl.node.emulation").setLevel(logging.ERROR)
    models = [m for m in a.models.split(",") if m]
    out = Path(a.out)
    if not a.skip_streams:
        rows: list[dict] = []
        spec = dict(kv.split("=", 1) if "=" in kv else ("", kv) for kv in a.frames.split(","))
        default = int(spec.pop("", "40"))

        def frames_for(m: str) -> int:
            return int(spec.get(m, default))
        print(f"## Streams on {a.topology} (time scale {a.time_scale:g}; figures scaled "
              "back to real time)\n")
        bench_streams(models, a.topology, frames_for, a.single_frames, a.one_frames, rows,
                      a.time_scale)
        write_csv(out / "stream.csv", rows)
    if not a.skip_wire:
        rows = []
        print(f"\n## Bytes on the wire and latency, {a.topology} capped\n")
        bench_wire(models, a.topology, [float(c) for c in a.caps.split(",")], rows,
                   k=a.time_scale)
        write_csv(out / "wire.csv", rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
