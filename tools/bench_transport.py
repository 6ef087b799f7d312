"""Transport throughput of tensor pieces through mosquitto: sealed vs unsealed.

    python tools/bench_transport.py [--mb 64] [--chunk-mb 1] [--repeats 3] [--out results]

One mosquitto run by meshdl's secure setup (`meshdl broker`: TLS, client
certificates, ACL) and two enrolled devices. Each run sends ``--mb`` MB of real
float32 tensor frames (codec frames of ``--chunk-mb``) from d1 to d2's route inbox
and waits until d2 has received (and, sealed, opened) every byte:

- unsealed: the frames as they are (TLS to the broker only; the broker reads them);
- sealed: the same frames through a SecureBus (AES-256-GCM per (pair, job) key; only
  d2 can open them).

Runs alternate so both see the same machine load. Prints a markdown table (median
MB/s and the sealed/unsealed ratio; target >= 0.90) and writes
``bench_transport.csv`` under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshdl.security.authority import init_authority, write_bundle  # noqa: E402
from meshdl.security.broker import SecureBroker  # noqa: E402
from meshdl.security.bundle import Bundle  # noqa: E402
from meshdl.security.securebus import SecureBus  # noqa: E402
from meshdl.transport.paho_bus import PahoBus  # noqa: E402
from meshdl.wire import topics  # noqa: E402
from meshdl.wire.codec import encode_chunks  # noqa: E402

MESH = "bench"


def frames(mb: int, chunk_mb: float, job: str) -> list[bytes]:
    arr = np.random.default_rng(0).standard_normal(mb * (1 << 20) // 4).astype(np.float32)
    return list(encode_chunks(job, "p", arr, chunk_bytes=int(chunk_mb * (1 << 20))))


def one_run(tx, rx_sub, job: str, payloads: list[bytes], timeout: float = 120.0) -> float:
    total = len(payloads)
    got = [0]
    done = threading.Event()

    def on(topic, payload, retained):
        got[0] += 1
        if got[0] >= total:
            done.set()
    inbox = topics.route_inbox(MESH, "d2")
    rx_sub.subscribe(inbox, on, qos=1)
    time.sleep(0.3)
    topic = topics.route_topic(MESH, ["d2"], job, "p")
    t0 = time.perf_counter()
    for p in payloads:
        tx.publish(topic, p, qos=1)
    if not done.wait(timeout):
        raise SystemExit(f"only {got[0]}/{total} frames arrived within {timeout:.0f} s")
    dt = time.perf_counter() - t0
    rx_sub.unsubscribe(inbox)
    return dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=64)
    ap.add_argument("--chunk-mb", type=float, default=1.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="meshdl-bench-") as d:
        auth = init_authority(MESH, Path(d) / "ca")
        b = {k: Bundle.load(write_bundle(auth.issue(k, "device", "rpi4"), Path(d) / k))
             for k in ("d1", "d2")}
        rows = []
        with SecureBroker(auth) as br:
            buses = {k: PahoBus(br.url, client_id=f"bench-{k}", **b[k].tls_files())
                     for k in ("d1", "d2")}
            sec = {k: SecureBus(buses[k], b[k]) for k in ("d1", "d2")}
            sec["d1"]._learn(b["d2"].entry_info)      # as if d2's birth had been seen
            try:
                for r in range(a.repeats):
                    order = ("unsealed", "sealed") if r % 2 == 0 else ("sealed", "unsealed")
                    for mode in order:
                        job = f"j{r}{mode[0]}"
                        payloads = frames(a.mb, a.chunk_mb, job)
                        tx = buses["d1"] if mode == "unsealed" else sec["d1"]
                        rx = buses["d2"] if mode == "unsealed" else sec["d2"]
                        dt = one_run(tx, rx, job, payloads)
                        rows.append({"mode": mode, "repeat": r, "mb": a.mb,
                                     "chunk_mb": a.chunk_mb, "seconds": round(dt, 4),
                                     "mb_per_s": round(a.mb / dt, 2)})
                        print(f"  {mode:9s} run {r}: {a.mb / dt:7.1f} MB/s", file=sys.stderr)
                opened = sec["d2"].sealed_in
            finally:
                for bus in buses.values():
                    bus.close()
    med = {m: statistics.median(x["mb_per_s"] for x in rows if x["mode"] == m)
           for m in ("unsealed", "sealed")}
    ratio = med["sealed"] / med["unsealed"]
    print(f"\n### Transport: sealed vs unsealed pieces ({a.mb} MB in {a.chunk_mb:g} MB frames, "
          f"median of {a.repeats}, TLS broker by `meshdl broker`)\n")
    print("| mode | MB/s |\n|---|---|")
    print(f"| unsealed (TLS to broker only) | {med['unsealed']:.1f} |")
    print(f"| sealed (AES-256-GCM end to end) | {med['sealed']:.1f} |")
    print(f"\nsealed / unsealed = **{ratio:.2f}** (target >= 0.90); frames opened by d2: "
          f"{opened}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_transport.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
