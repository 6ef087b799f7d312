"""How well does a node's self-probe measure a shaped access link? (issue 11)

    sudo python tools/probe_accuracy.py [--rates 3,10,50] [--probes 5]

For each rate R (Mbit/s, both directions): one device namespace joined to a broker
namespace (mosquitto) by a veth shaped by htb (node/netns.py), then, in the device's
namespace over real MQTT:
- the probe's estimate of the access link (node.probe.Prober, as a node on shaped links
  runs it: a self-ping through the broker and its pong), median of --probes;
- a real 1 MiB publish to itself (uplink, broker, downlink: what a piece costs),
  timed from publish to arrival, as the rate it implies.
The series rate of up and down at R each is R/2. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1 << 20


def measure(rate_mbps: float, probes: int, sizes: list[int]) -> dict:
    from meshdl.node.netns import BROKER_ADDR, BROKER_PORT, Namespaces, in_netns, make_prefix
    from meshdl.node.probe import Probe, decode_probe, encode_probe
    from meshdl.node.probe import BROKER, Prober
    from meshdl.transport.broker import EmbeddedBroker
    from meshdl.transport.paho_bus import PahoBus
    from meshdl.wire.topics import node_probe

    bps = rate_mbps * 1e6
    ns = Namespaces(["dev"], {"dev": (bps, bps)}, prefix=make_prefix("n11p"))
    out: dict = {"rate_mbps": rate_mbps, "series_mbps": rate_mbps / 2}
    broker = bus = None
    try:
        ns.create()
        broker = in_netns(ns.broker_ns, lambda: EmbeddedBroker(
            None, host=BROKER_ADDR, port=BROKER_PORT, backend="mosquitto").start())
        url = f"mqtt://{BROKER_ADDR}:{BROKER_PORT}"
        bus = in_netns(ns.ports["dev"].namespace, lambda: PahoBus(url, protocol="auto"))
        mesh, me = "pa", "p1"
        prober = Prober(bus, mesh, me, 1, access_latency_s=0.0)

        def on_probe(topic, payload, retained):        # the node's probe handler
            p = decode_probe(payload)
            if p.kind == "ping":
                bus.publish(node_probe(mesh, p.sender),
                            encode_probe(Probe("pong", me, 1, p.nonce, time.time(), p.pad)))
            elif p.kind == "pong":
                prober.on_pong(p)
        bus.subscribe(node_probe(mesh, me), on_probe, qos=1)
        got: dict[str, float] = {}
        ev = threading.Event()

        def on_data(topic, payload, retained):
            got["t"] = time.perf_counter()
            ev.set()
        bus.subscribe("pa/data", on_data, qos=1)
        time.sleep(0.5)
        figs = []
        for _ in range(probes):
            f = prober.measure(BROKER)
            if f is not None:
                figs.append(prober._samples[BROKER][-1]["throughput_bps"])
        out["probe_mbps"] = statistics.median(figs) / 1e6 if figs else float("nan")
        out["probe_all"] = [round(f / 1e6, 2) for f in figs]
        for size in sizes:
            ts = []
            for _ in range(2):
                ev.clear()
                time.sleep(0.3)          # the bucket refills, as between pieces
                t0 = time.perf_counter()
                bus.publish("pa/data", b"\0" * size, qos=1)
                if not ev.wait(120):
                    raise RuntimeError("publish lost")
                ts.append(got["t"] - t0)
            out[f"pub_{size}_s"] = min(ts)
            out[f"pub_{size}_mbps"] = size * 8 / min(ts) / 1e6
    finally:
        if bus is not None:
            bus.close()
        if broker is not None:
            broker.stop()
        ns.destroy()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rates", default="3,10,50")
    ap.add_argument("--probes", type=int, default=5)
    ap.add_argument("--sizes", default=f"{MIB},{64 << 10}")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    print("| link Mbit/s (each way) | series Mbit/s | probe estimate | probes | "
          + " | ".join(f"{s >> 10} KiB publish Mbit/s (s)" for s in sizes) + " |")
    print("|" + "---|" * (4 + len(sizes)))
    for r in [float(x) for x in a.rates.split(",")]:
        o = measure(r, a.probes, sizes)
        print(f"| {r:g} | {o['series_mbps']:.2f} | {o['probe_mbps']:.2f} | {o['probe_all']} | "
              + " | ".join(f"{o[f'pub_{s}_mbps']:.2f} ({o[f'pub_{s}_s']:.3f})" for s in sizes)
              + " |", flush=True)


if __name__ == "__main__":
    main()
