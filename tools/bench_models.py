"""Benchmark a user's own model on an emulated mesh: time to the first answer, cold and warm.

    python tools/bench_models.py [--topology home-wifi] [--repeat 2] [--out results/models]

An ONNX file of ~19 MB (EfficientNet-Lite0 with its shipped ImageNet weights, exported
here with torch.onnx.export; meshdl sees only the file) runs on a fresh emulated mesh
(mosquitto, one ``meshdl node start --emulate`` process per device; on a star topology
every chunk crosses the receiving node's emulated downlink, shaped as the topology says):

- cold: ``meshdl infer IMAGE --model new.onnx --broker URL --json`` (a fresh process)
  against nodes with empty caches: conversion, offer, each node fetching its stages'
  weights, planning and the job, until the answer prints;
- warm: the same command again (nodes hold their weights; the CLI converts the file
  again, which is part of its time);
- restarted: every node process killed and started again, then the command: the
  node caches survive, so nothing is fetched.

Also reports the bytes each node cached (vs the model's total), the in-process
conversion time and the onnxruntime / mesh agreement. Prints markdown, writes CSV.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def export_model(path: Path) -> None:
    import torch
    import meshdl
    from meshdl.models.files import metadata
    model = meshdl.models.build("efficientnet_lite0", pretrained=True)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, 224, 224),), buf, dynamo=False,
                          opset_version=17)
    import onnx
    from meshdl import imaging
    proto = onnx.load_from_string(buf.getvalue())
    meta = metadata({"mean": ",".join(str(v) for v in imaging.TF_LITE_MEAN),
                     "std": ",".join(str(v) for v in imaging.TF_LITE_STD),
                     "labels": imaging.imagenet_labels(), "name": "lite0-onnx"})
    for k, v in meta.items():
        p = proto.metadata_props.add()
        p.key, p.value = k, v
    onnx.save(proto, str(path))


def run_cli(model: Path, image: Path, url: str, mesh: str, env: dict, timeout: float,
            strategy: str):
    cmd = [sys.executable, "-m", "meshdl.cli", "infer", str(image), "--model", str(model),
           "--broker", url, "--mesh", mesh, "--json", "--timeout", str(timeout),
           "--strategy", strategy]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout + 120)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"meshdl infer failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return wall, json.loads(p.stdout[p.stdout.index("{"):])


def api_rows(model: Path, work: Path, url: str, strategy: str, timeout: float, image,
             ref) -> list[dict]:
    """First and next MeshClient.infer of a new model id (the first includes delivery)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    from meshdl.client import MeshClient
    import meshdl
    proto = onnx.load(str(model))
    init = max(proto.graph.initializer, key=lambda t: len(t.raw_data or b""))
    arr = numpy_helper.to_array(init).copy()
    arr.reshape(-1)[0] += 1e-6               # a new content hash, same answer within 1e-4
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    other = work / "new2.onnx"
    onnx.save(proto, str(other))
    lm = meshdl.models.load(other)
    x = lm.image(image)
    rows = []
    with MeshClient(url, "bm") as c:
        for run in ("API first answer (cold)", "API next answer (warm)"):
            t0 = time.perf_counter()
            r = c.infer(x, model=lm, strategy=strategy, timeout=timeout)
            rows.append({"run": run, "wall_s": time.perf_counter() - t0,
                         "latency_s": r.latency_s, "rel_diff_vs_ort": float(
                             np.abs(r.output.reshape(-1).numpy() - ref).max()
                             / np.abs(ref).max()),
                         "top1": r.top5[0][1], "stages": len(r.stages)})
    return rows


def node_bytes(cache: Path, devices) -> dict[str, int]:
    from meshdl.models.store import ModelStore
    return {d: ModelStore(cache / "meshdl" / "nodes" / d).bytes_held() for d in devices}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--topology", default="home-wifi")
    ap.add_argument("--repeat", type=int, default=2, help="warm runs")
    ap.add_argument("--strategy", default="meshdl",
                    help="planning strategy (modnn tiles every stage over all devices)")
    ap.add_argument("--timeout", type=float, default=300.0)
    ap.add_argument("--out", default=str(ROOT / "results" / "models"))
    args = ap.parse_args()
    import numpy as np
    import meshdl
    from meshdl.cli.infer_cmd import sample_image
    from meshdl.models.store import package
    from meshdl.node.launcher import MeshUp
    from meshdl.transport.broker import EmbeddedBroker
    from meshdl.data import data_dir

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.TemporaryDirectory(prefix="bench-models-")   # removed at exit, also on error
    work = Path(tmp.name)
    os.environ["MESHDL_CACHE_DIR"] = str(work / "client-cache")   # not the user's cache
    model = work / "new.onnx"
    export_model(model)
    size = model.stat().st_size
    t0 = time.perf_counter()
    lm = meshdl.models.load(model)
    pkg = package(lm)
    t_convert = time.perf_counter() - t0
    total = sum(map(len, pkg.blobs.values()))
    image = sample_image()
    import onnxruntime as ort
    x = lm.image(image)
    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0].reshape(-1)

    env = {k: v for k, v in os.environ.items() if k != "MESHDL_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(work / "node-cache")
    cli_env = dict(env, MESHDL_CACHE_DIR=str(work / "client-cache"))
    conf = work / "broker.conf"
    conf.write_text((data_dir("broker") / "plain.conf").read_text())
    rows = []
    with EmbeddedBroker(str(conf), backend="mosquitto", workdir=work / "b") as b:
        with MeshUp(args.topology, broker=b.url, mesh="bm", log_dir=work / "logs",
                    verbose=False, env=env) as up:
            up.wait_ready(180)
            wall, res = run_cli(model, image, b.url, "bm", cli_env, args.timeout,
                                 args.strategy)
            held = node_bytes(work / "node-cache", up.devices)
            diff = float(np.abs(np.asarray(res["output"]) - ref).max() / np.abs(ref).max())
            rows.append({"run": "cold (empty node caches)", "wall_s": wall,
                         "latency_s": res["latency_s"], "rel_diff_vs_ort": diff,
                         "top1": res["top5"][0]["label"], "stages": len(res["stages"])})
            for k in range(args.repeat):
                wall, res = run_cli(model, image, b.url, "bm", cli_env, args.timeout,
                                 args.strategy)
                rows.append({"run": f"warm {k + 1}", "wall_s": wall,
                             "latency_s": res["latency_s"], "rel_diff_vs_ort": float(
                                 np.abs(np.asarray(res["output"]) - ref).max()
                                 / np.abs(ref).max()),
                             "top1": res["top5"][0]["label"], "stages": len(res["stages"])})
            api = api_rows(model, work, b.url, args.strategy, args.timeout, image, ref)
            for d in up.devices:            # restart every node: caches survive
                up.kill(d)
            for d in up.devices:
                up.spawn(d)
            up.wait_ready(180)
            wall, res = run_cli(model, image, b.url, "bm", cli_env, args.timeout,
                                 args.strategy)
            held2 = node_bytes(work / "node-cache", up.devices)
            rows.append({"run": "all nodes restarted (re-planned)", "wall_s": wall,
                         "latency_s": res["latency_s"], "rel_diff_vs_ort": float(
                             np.abs(np.asarray(res["output"]) - ref).max() / np.abs(ref).max()),
                         "top1": res["top5"][0]["label"], "stages": len(res["stages"])})
    print(f"\n### User model on the emulated {args.topology} mesh, strategy "
          f"{args.strategy}\n")
    print(f"model: {model.name}, {size / 1e6:.1f} MB ONNX, {len(pkg.blobs)} tensors, "
          f"{total / 1e6:.1f} MB of weights; convert + package in process "
          f"{t_convert:.2f} s\n")
    print("| run | `meshdl infer` wall s | job latency s | rel. diff vs onnxruntime | "
          "top-1 | stages |")
    print("|---|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['run']} | {r['wall_s']:.2f} | {r['latency_s']:.3f} | "
              f"{r['rel_diff_vs_ort']:.1e} | {r['top1']} | {r['stages']} |")
    print("\nMeshClient.infer in one process (no CLI start-up or conversion in the time), "
          "a fresh model id (one weight changed), so the nodes start cold:\n")
    print("| call | s to the answer | job latency s | rel. diff vs onnxruntime |")
    print("|---|---:|---:|---:|")
    for r in api:
        print(f"| {r['run']} | {r['wall_s']:.2f} | {r['latency_s']:.3f} | "
              f"{r['rel_diff_vs_ort']:.1e} |")
    print("\n| node | weights cached MB | of the model | after restart MB |")
    print("|---|---:|---:|---:|")
    for d in sorted(held):
        print(f"| {d} | {held[d] / 1e6:.2f} | {held[d] / total:.0%} | {held2[d] / 1e6:.2f} |")
    cold, warm = rows[0]["wall_s"], min(r["wall_s"] for r in rows[1:-1])
    print(f"\ncold / warm = {cold / warm:.2f}x (cold includes delivery of "
          f"{sum(held.values()) / 1e6:.1f} MB to the nodes)")
    rows += api
    for r in rows:
        r.update(topology=args.topology, strategy=args.strategy, model_mb=size / 1e6)
    with open(out / f"models_{args.strategy}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / f"models_nodes_{args.strategy}.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["node", "bytes_cached", "bytes_total", "bytes_after_restart"])
        for d in sorted(held):
            w.writerow([d, held[d], total, held2[d]])


if __name__ == "__main__":
    main()
