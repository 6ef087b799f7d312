"""``bench_mesh.py --netns``: realistic star meshes over real shaped links, side by side
with the plain emulator.

For each topology (default home-wifi, home-wifi-n, home-jetson) one mesh per mode:
- netns: ``NetnsMeshUp`` (broker and each node in its own network namespace, veth pairs
  shaped by htb to the access links, real TCP through mosquitto's queues);
- emulator: ``MeshUp`` (the same node processes on loopback, links emulated by the
  nodes: uplink / downlink queues).
Both run at one time scale K per (topology, model), picked so this machine computes
every task of the plan faster than the (K times slower) emulated device: each task of
the plan is timed here on one thread (as the nodes run) and K = ceil(SAFETY x the worst
real / emulated ratio), and so a job lasts at least ``min_job_s`` dilated (this
machine's fixed per-piece costs stay small against it); a row whose node logs show
pacing warnings anyway (other load) runs again at 2K, once. ``--time-scale`` fixes K.
Reported times are divided by K.

Per (topology, model, mode): measured median (source holds the input -> sink holds
the answer), the plan's prediction, their ratio, pacing warnings (from the node logs),
the best single device with the input shipped to it (cost model, every device that
holds the model tried) and meshdl's speed-up over it. The best single device is also
RUN, in the same mesh, by the same client, jobs alternating with meshdl's (meshdl,
single, single, meshdl, ...: load hits both arms alike): a job of strategy ``local``
with that device as its source and the real source as its sink (the whole model on
the device, the answer shipped back to the source, measured by the nodes' clocks like
meshdl's jobs). When the device is not the source, the input's hop source -> device
(the source's uplink + the device's downlink, store and forward) is measured on netns:
that arm's client runs in the source's namespace and times its input from the send to
the device holding it (``shipped_s``); on the emulator (the client sits on no device)
it is added from the cost model (``input_hop_s``). Reported: measured meshdl / measured best single
(``vs_best_single``), the old measured meshdl / predicted best single
(``speedup_measured``) and predicted / predicted (``speedup_predicted``), and the share
of the ideal speed-up (sum of FLOP/s over the fastest device's).
"""
from __future__ import annotations

import csv
import logging
import math
import statistics
import time
from pathlib import Path

log = logging.getLogger("bench_mesh.netns")

TOPOLOGIES = ["home-wifi", "home-wifi-n", "home-jetson"]
MODELS = ["vgg16_bn", "resnet18", "mobilenet_v2", "efficientnet_lite0"]
SAFETY = 3.0


def real_forward_s(model: str) -> float:
    """This machine's 1-thread forward time (the node processes run 1 thread each)."""
    import torch
    import meshdl
    torch.set_num_threads(1)
    m = meshdl.models.build(model)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        m(x)
        best = math.inf
        for _ in range(2):
            t0 = time.perf_counter()
            m(x)
            best = min(best, time.perf_counter() - t0)
    return best


def pick_time_scale(mesh, graphs: dict, real: dict, safety: float = SAFETY) -> float:
    fastest = max(d.flops for d in mesh.devices.values())
    need = max(safety * real[m] / (g.flops / fastest) for m, g in graphs.items())
    return float(max(1, math.ceil(need)))


def task_time_scale(g, plan, mesh, safety: float = SAFETY, slack_s: float = 0.002) -> float:
    """K such that every task of ``plan``, timed here on one thread, takes at most
    1/safety of its emulated time x K (the pacing check allows ``slack_s``)."""
    import torch
    torch.set_num_threads(1)
    worst = 1.0
    with torch.no_grad():
        for s in plan.stages:
            full = g.tensor_shape(s.start)
            for t in s.tasks:
                shape = full
                r = t.in_region
                if r is not None and len(full) == 4:
                    shape = (full[0], full[1], r.h1 - r.h0, r.w1 - r.w0)
                x = torch.randn(*shape)
                best = math.inf
                for _ in range(2):
                    t0 = time.perf_counter()
                    g.run_range(s.start, s.end, x, in_region=t.in_region,
                                out_region=t.out_region)
                    best = min(best, time.perf_counter() - t0)
                emu = t.flops / mesh.devices[t.device].flops
                if emu > 0:
                    worst = max(worst, (safety * best - slack_s) / emu)
    return float(math.ceil(worst))


def best_single(g, mesh, source: str) -> tuple[str, float]:
    """The device that runs the whole model fastest with the input shipped to it from
    ``source`` and the answer back (cost model), among those that hold the model."""
    from meshdl.planner.local import local_fits, whole_plan
    from meshdl.planner.simulate import simulate
    best = min((simulate(whole_plan(g, d, source, source), g, mesh).latency_s, d)
               for d in mesh.devices if local_fits(g, mesh, d) or d == source)
    return best[1], best[0]


def input_hop_s(g, mesh, source: str, device: str) -> float:
    """The cost model's time for the input's hop ``source`` -> ``device`` (0 when they
    are the same): the best-single plan with the input at the source, minus the same
    plan with the input already on the device."""
    from meshdl.planner.local import whole_plan
    from meshdl.planner.simulate import simulate
    if device == source:
        return 0.0
    return (simulate(whole_plan(g, device, source, source), g, mesh).latency_s
            - simulate(whole_plan(g, device, device, source), g, mesh).latency_s)


def arm_order(i: int) -> tuple[str, str]:
    """Job ``i``'s order of the two arms: meshdl first on even jobs, the best single
    device first on odd ones (meshdl, single, single, meshdl, ...)."""
    return ("meshdl", "single") if i % 2 == 0 else ("single", "meshdl")


def shipped_s(t_send: float, stage0_end: float, stage0_s: float, mesh_s: float
              ) -> tuple[float, float]:
    """(input sent at the source -> sink held the answer, the input's hop) of a job
    whose client sat on the source (its namespace) and sent the input at ``t_send``:
    the device held the input ``stage0_s`` (stage 0's measured time) before stage 0
    ended at ``stage0_end``, and the sink held the answer ``mesh_s`` after that. Wall
    clocks of one machine."""
    held_in = stage0_end - stage0_s
    return held_in + mesh_s - t_send, held_in - t_send


def _send_clock(client) -> dict:
    """{job: wall time its input was handed to the client's reliable sender} (the
    benchmark times the input's hop from the client it runs on the source)."""
    sent: dict = {}
    send = client._sender.send

    def timed(job, *a, **kw):
        sent.setdefault(job, time.time())
        return send(job, *a, **kw)
    client._sender.send = timed
    return sent


def pacing_warnings(log_dir: Path) -> int:
    """Pacing warnings in the node logs after the warm-up job (``*.warm`` holds each
    log as it was when the timed jobs began)."""
    n = 0
    for f in log_dir.glob("*.log"):
        warm = f.with_suffix(".warm")
        before = warm.read_text(errors="replace").count("emulated device") \
            if warm.exists() else 0
        n += f.read_text(errors="replace").count("emulated device") - before
    return n


def run_mode(mode: str, topo: str, models: list[str], k: float, runs: int,
             log_dir: Path, singles: dict | None = None) -> dict:
    """{model: (meshdl measured_s list in real units, plan, plan ids, best single
    measured_s list, its measured input hops or None)} for one mesh; ``singles``:
    {model: (device, source)} adds the best-single arm (strategy local on the device,
    answer to the source), its jobs alternating with meshdl's. On netns, when the
    device is not the source, that arm's client runs in the source's namespace, so its
    input crosses the source's shaped uplink and the device's downlink (measured);
    otherwise the input's hop is left to the caller (cost model)."""
    import torch
    import meshdl
    from meshdl.client import MeshClient
    from meshdl.node.launcher import MeshUp
    from meshdl.node.netns import in_netns
    from meshdl.node.netns_up import NetnsMeshUp
    name = f"bn{mode[:2]}"
    # verbose node logs: probe steps and plannings, to explain a row afterwards
    kw = dict(mesh=name, models=models, log_dir=log_dir, verbose=True, supervise=True)
    up = (NetnsMeshUp(topo, time_scale=k, **kw) if mode == "netns"
          else MeshUp(topo, node_args=["--time-scale", repr(k)], backend="mosquitto", **kw))
    out = {}
    with up:
        up.wait_ready(600)
        make = lambda: MeshClient(up.url, name).__enter__()      # noqa: E731
        c = in_netns(up.ns.broker_ns, make) if mode == "netns" else make()
        clients = [c]
        try:
            x = torch.randn(1, 3, 224, 224)
            for model in models:
                arms = {"meshdl": dict(model=model, alpha=1.0, timeout=300)}
                by = {"meshdl": c}
                sent = None
                if singles and model in singles:
                    dev, src = singles[model]
                    arms["single"] = dict(model=model, strategy="local", source=dev,
                                          sink=src, alpha=1.0, timeout=300)
                    by["single"] = c
                    if mode == "netns" and dev != src:
                        cs = in_netns(up.namespace(src), make)
                        clients.append(cs)
                        sent, by["single"] = _send_clock(cs), cs
                for arm, opts in arms.items():
                    try:
                        by[arm].infer(x, **opts)                           # warm-up
                    except meshdl.MeshdlError as exc:                      # once more
                        log.warning("%s %s %s warm-up failed (%s); again", mode, model,
                                    arm, exc)
                        by[arm].infer(x, **opts)
                for f in log_dir.glob("*.log"):       # count the timed jobs' warnings only
                    f.with_suffix(".warm").write_text(f.read_text(errors="replace"))
                res: dict[str, list] = {a: [] for a in arms}
                for i in range(runs):
                    for arm in arm_order(i):
                        if arm in arms:
                            res[arm].append(by[arm].infer(x, **arms[arm]))

                def meas(rs):
                    return [(r.mesh_latency_s if r.mesh_latency_s is not None
                             else r.latency_s) / k for r in rs]
                m = meas(res["meshdl"])
                single = meas(res["single"]) if "single" in res else None
                hops = None
                if sent is not None:
                    got = [shipped_s(sent[r.job], max(t["end"] for t in r.tasks
                                                      if t["stage"] == 0),
                                     r.stages[0].measured_s, r.mesh_latency_s)
                           for r in res["single"]]
                    single = [a / k for a, _ in got]
                    hops = [h / k for _, h in got]
                out[model] = (m, res["meshdl"][-1].plan,
                              {r.plan.plan_id for r in res["meshdl"]}, single, hops)
                log.info("%s %s %s: meshdl %s single %s hop %s", mode, topo, model,
                         [round(v, 3) for v in m], single and [round(v, 3) for v in single],
                         hops and [round(v, 3) for v in hops])
        finally:
            for cl in clients:
                cl.__exit__(None, None, None)
    return out


def bench_star(topologies: list[str], models: list[str], runs: int, out: Path,
               modes: tuple[str, ...] = ("netns", "emulator"),
               max_k: float = 1e4, on_rows=None, min_job_s: float = 0.0,
               time_scale: float | None = None, retries: int = 1) -> list[dict]:
    import meshdl
    rows = []
    real = {m: real_forward_s(m) for m in models}
    log.info("1-thread forward times here: %s", {m: round(v, 3) for m, v in real.items()})
    for topo in topologies:
        mesh = meshdl.load_topology(topo)
        src = mesh.defaults.get("source") or sorted(mesh.devices)[0]
        graphs = {m: meshdl.trace(meshdl.models.build(m), input_shape=(1, 3, 224, 224),
                                  name=m) for m in models}
        flops = [d.flops for d in mesh.devices.values()]
        ideal = sum(flops) / max(flops)
        for model in models:
            g = graphs[model]
            plan0 = meshdl.plan(g, mesh, strategy="meshdl", source=src, sink=src, alpha=1.0)
            # K: every task computes here faster than its (dilated) device, and a job
            # lasts at least min_job_s dilated, so fixed per-piece costs of this machine
            # (Python, MQTT, thread hops: milliseconds) stay small against it
            want = time_scale or max(pick_time_scale(mesh, {model: g}, real),
                                     task_time_scale(g, plan0, mesh),
                                     math.ceil(min_job_s / plan0.latency_s))
            k = min(want, max_k)
            log.info("%s %s: time scale %g%s", topo, model, k,
                     f" (capped; {want:g} wanted)" if k < want else "")
            single_dev, single_s = best_single(g, mesh, src)
            hop = input_hop_s(g, mesh, src, single_dev)
            for attempt in range(retries + 1):
                results = {}
                for mode in modes:
                    log_dir = out / "logs" / f"{topo}-{model}-{mode}"
                    log_dir.mkdir(parents=True, exist_ok=True)
                    for f in [*log_dir.glob("*.log"), *log_dir.glob("*.warm")]:
                        f.unlink()
                    try:
                        results[mode] = run_mode(mode, topo, [model], k, runs, log_dir,
                                                 {model: (single_dev, src)})
                    except meshdl.MeshdlError as exc:
                        log.warning("%s %s %s failed: %s", topo, model, mode, exc)
                        results[mode] = {}
                    results[mode]["_pacing"] = pacing_warnings(log_dir)
                warned = sum(r["_pacing"] for r in results.values())
                if not warned or time_scale or k >= max_k or attempt == retries:
                    break
                # this machine was slower than K allowed (other load): dilate more
                k = min(2 * k, max_k)
                log.info("%s %s: %d pacing warning(s); again at time scale %g", topo, model,
                         warned, k)
            for mode in modes:
                got = results[mode].get(model)
                if got is None:
                    continue
                meas, plan, ids, smeas, hops = got
                measured = statistics.median(meas)
                # the input's hop measured (netns: client on the source), else predicted
                single_m = (None if not smeas else statistics.median(smeas) if hops
                            else statistics.median(smeas) + hop)
                predicted = plan.latency_s / k
                rows.append({
                    "mesh": topo, "model": model, "mode": mode, "time_scale": k,
                    "plan": "+".join(sorted(plan.devices())), "plan_ids": len(ids),
                    "measured_s": round(measured, 4), "predicted_s": round(predicted, 4),
                    # the same plan request on the topology's declared links: differs
                    # when the leader planned on measured figures that are off
                    "predicted_declared_s": round(plan0.latency_s, 4),
                    "ratio": round(measured / predicted, 3),
                    "best_single": single_dev, "best_single_pred_s": round(single_s, 4),
                    "best_single_measured_s": None if single_m is None else round(single_m, 4),
                    "best_single_input_hop_pred_s": round(hop, 4),
                    "best_single_input_hop_measured_s":
                        round(statistics.median(hops), 4) if hops else "",
                    "vs_best_single": None if single_m is None else round(single_m / measured, 3),
                    "speedup_measured": round(single_s / measured, 3),
                    "speedup_predicted": round(single_s / predicted, 3),
                    "ideal_speedup": round(ideal, 3),
                    "share_of_ideal": round(single_s / measured / ideal, 3),
                    "pacing_warnings_mesh": results[mode]["_pacing"],
                    "k_wanted": want})
                log.info("%s", rows[-1])
            if on_rows is not None:
                on_rows(rows)            # partial results survive an interrupted run
    return rows


def plan_label(plan: str, best: str) -> str:
    """The plan column: the devices, marked when they are the best single device (then
    both arms run the same plan and measured / measured is ~1.0 by construction)."""
    return f"{plan} (= best single)" if plan == best else plan


def below_on_other_plan(rows: list[dict]) -> int:
    """Rows where meshdl measured slower than the best single device while running a
    different plan (on the same plan both arms run one plan: ~1.0 by construction)."""
    return sum(1 for r in rows if r.get("vs_best_single") is not None
               and float(r["vs_best_single"]) < 1.0 and r["plan"] != r["best_single"])


def write_star(out: Path, rows: list[dict], cmd: str) -> str:
    out.mkdir(parents=True, exist_ok=True)
    if rows:
        keys = list(dict.fromkeys(k for r in rows for k in r))
        with open(out / "bench_mesh_netns.csv", "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(rows)
    lines = [f"# realistic star meshes: shaped links (netns) vs emulator\n\n`{cmd}`\n",
             "| mesh | model | K | plan | netns measured s | emulator measured s | "
             "predicted s | netns ratio | emulator ratio | best single (pred s) | "
             "best single measured s netns / emu | vs best single netns / emu "
             "(measured/measured) | predicted vs best single | vs predicted best single "
             "netns / emu | share of ideal (netns / emu) | pacing warn netns/emu |",
             "|" + "---|" * 16]
    by = {(r["mesh"], r["model"], r["mode"]): r for r in rows}
    for (mesh, model) in dict.fromkeys((r["mesh"], r["model"]) for r in rows):
        n, e = by.get((mesh, model, "netns")), by.get((mesh, model, "emulator"))
        a = n or e

        def f(r, key):
            return "-" if r is None else r[key]
        hop = float(a.get("best_single_input_hop_pred_s") or 0)
        hop_m = n.get("best_single_input_hop_measured_s") if n else ""
        hop_txt = f"; input hop {hop:.3f} pred" if hop else ""
        hop_txt += f", {float(hop_m):.3f} netns" if hop_m not in ("", None) else ""
        lines.append(f"| {mesh} | {model} | {a['time_scale']:g} | "
                     f"{plan_label(a['plan'], a['best_single'])} | "
                     f"{f(n, 'measured_s')} | {f(e, 'measured_s')} | {a['predicted_s']} | "
                     f"{f(n, 'ratio')} | {f(e, 'ratio')} | {a['best_single']} "
                     f"({a['best_single_pred_s']}{hop_txt}) | "
                     f"{f(n, 'best_single_measured_s')} / {f(e, 'best_single_measured_s')} | "
                     f"{f(n, 'vs_best_single')} / {f(e, 'vs_best_single')} | "
                     f"{a['speedup_predicted']} | "
                     f"{f(n, 'speedup_measured')} / {f(e, 'speedup_measured')} | "
                     f"{f(n, 'share_of_ideal')} / {f(e, 'share_of_ideal')} | "
                     f"{f(n, 'pacing_warnings_mesh')}/{f(e, 'pacing_warnings_mesh')} |")
    if rows:
        for mode in ("netns", "emulator"):
            mine = [r for r in rows if r["mode"] == mode]
            vs = [r["vs_best_single"] for r in mine if r.get("vs_best_single") is not None]
            if mine:
                lines.append(
                    f"\n{mode}: median measured/predicted {statistics.median(r['ratio'] for r in mine):.3f}"
                    f" (rows within 15%: {sum(abs(r['ratio'] - 1) <= 0.15 for r in mine)}/"
                    f"{len(mine)}); min meshdl vs best single device, measured side by "
                    f"side: {min(vs) if vs else float('nan'):.3f} (rows >= 1.0: "
                    f"{sum(v >= 1.0 for v in vs)}/{len(vs)}; below 1.0 on a plan other "
                    f"than the best single device's own: {below_on_other_plan(mine)}); "
                    f"pacing warnings: {sum(r['pacing_warnings_mesh'] for r in mine)}")
    text = "\n".join(lines) + "\n"
    (out / "bench_mesh_netns.md").write_text(text)
    return text
