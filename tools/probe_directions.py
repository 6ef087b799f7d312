"""Per-direction access-link readings under one-way tc shaping (issue 11).

    python tools/probe_directions.py [--topology home-wifi] [--device pi4-b] [--slow-mbps 6]

Runs ``mesh up TOPOLOGY --netns`` (root, iproute2; telemetry every 0.5 s), then shapes
the device's downlink alone, its uplink alone, and both back, and prints what the
node's telemetry reports for each direction of its access link (``up_bps`` /
``down_bps``, node/probe_dir.py) 6 s after each change. Tears everything down on exit.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topology", default="home-wifi")
    ap.add_argument("--device", default="pi4-b")
    ap.add_argument("--slow-mbps", type=float, default=6.0)
    args = ap.parse_args()
    import meshdl
    from meshdl.node.netns_up import NetnsMeshUp
    acc = meshdl.load_topology(args.topology).star.link_of(args.device)
    slow = args.slow_mbps * 1e6
    steps = [("declared", None, None), ("downlink alone slowed", None, slow),
             ("uplink alone slowed", slow, acc.down_bps),
             ("both back", acc.up_bps, acc.down_bps)]
    with tempfile.TemporaryDirectory(prefix="meshdl-dirs-") as tmp, \
            NetnsMeshUp(args.topology, mesh="dirs", log_dir=Path(tmp),
                        telemetry_period=0.5) as up:
        up.wait_ready(300)
        print(f"{args.device}: declared {acc.up_bps / 1e6:g} up / {acc.down_bps / 1e6:g} "
              "down Mbit/s")
        for label, u, d in steps:
            if u is not None or d is not None:
                up.shape(args.device, up_bps=u, down_bps=d)
            time.sleep(6.0)
            t = up.watcher.snapshot().telemetry.get(args.device)
            fig = (t.links or {}).get("@broker", {}) if t is not None else {}
            shaped = (f"tc {(u or acc.up_bps) / 1e6:g} / {(d or acc.down_bps) / 1e6:g}")
            print(f"{label:24} {shaped:14} read up {fig.get('up_bps', 0) / 1e6:6.1f} "
                  f"down {fig.get('down_bps', 0) / 1e6:6.1f} series "
                  f"{fig.get('throughput_bps', 0) / 1e6:6.1f} Mbit/s")


if __name__ == "__main__":
    main()
