"""Throughput of the reliable piece flow with the credit window on and off.

    python tools/bench_flow.py [--pieces 200] [--piece-mb 1] [--runs 3] [--out results]

Two processes on one mosquitto started here. The receiver runs the data plane's
receive path (decode, CRC, reassemble, dedupe, batched acks by ``credit.Acker``) and
grants credit from a ``credit.CreditLedger`` of ``--held-mb`` (the node default:
256 MiB); with ``--hold-ms`` it also holds each piece that long before releasing it
(a slow consumer). The sender is the data plane's ``ReliableSender``:

- credit: within the receiver's grants (``AckFrame.credit``), as nodes now run;
- window only: the grants ignored (``credit=False``), the 256 MiB sender window
  that nodes ran before.

Runs alternate (order flipping) so both see the same machine load. Prints a markdown
table (median MiB/s per mode, the credit/window ratio, the peak bytes in flight to
the receiver and its peak held bytes) and writes ``bench_flow.csv`` under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MIB = 1 << 20
MESH = "benchflow"


def _receiver(url: str, n: int, held_mb: float, hold_ms: float, q, stop) -> None:
    from meshdl.node.credit import Acker, CreditLedger
    from meshdl.node.flow import ReceiveLog
    from meshdl.transport.paho_bus import PahoBus
    from meshdl.wire import topics
    from meshdl.wire.codec import PieceFrame, decode_frame
    from meshdl.wire.reassembly import Reassembler
    reasm, seen = Reassembler(), ReceiveLog()
    ledger = CreditLedger(int(held_mb * MIB))
    got, done = [0], threading.Event()
    timers: list[threading.Timer] = []
    with PahoBus(url, max_inbound=100000) as bus:
        acker = Acker("rx", lambda hop, topic, payload: bus.publish(topic, payload, qos=1),
                      credit=ledger.grant)

        def used(job: str, piece: str) -> None:
            ledger.release(job, piece)
            for peer in ledger.stale():
                acker.refresh(peer)

        def on(topic, payload, retained):
            step = topics.next_hop(topic, "rx")
            f = decode_frame(payload)
            if not isinstance(f, PieceFrame) or seen.seen((f.job, f.piece)):
                return
            arr = reasm.add(f)
            if arr is not None and seen.mark((f.job, f.piece)):
                ledger.hold(f.job, f.piece, arr.nbytes)
                back = [f.src_task[1:]]
                acker.ack(back[0], topics.route_topic(MESH, back, step.job, step.piece),
                          f.job, f.piece, f.term, peer=back[0])
                if hold_ms > 0:
                    t = threading.Timer(hold_ms / 1e3, used, (f.job, f.piece))
                    t.daemon = True
                    t.start()
                    timers.append(t)
                else:
                    used(f.job, f.piece)
                got[0] += 1
                if got[0] >= n:
                    done.set()
        bus.subscribe(topics.route_inbox(MESH, "rx"), on, qos=1)
        q.put("ready")
        done.wait(600)
        q.put((time.time(), got[0], ledger.peak_held))
        stop.wait(60)
        acker.stop()


def one_run(ctx, url: str, n: int, payload, credit: bool, held_mb: float,
            hold_ms: float, initial_mb: float = 16.0) -> dict:
    from meshdl.node.emulation import Links
    from meshdl.node.flow import ReliableSender
    from meshdl.transport.paho_bus import PahoBus
    from meshdl.wire import topics
    from meshdl.wire.codec import AckFrame, decode_frame, encode_frames
    q, stop = ctx.Queue(), ctx.Event()
    p = ctx.Process(target=_receiver, args=(url, n, held_mb, hold_ms, q, stop))
    p.start()
    q.get(timeout=60)
    failures: list[str] = []
    with PahoBus(url) as bus:
        links = Links("tx", lambda t, b: bus.publish(t, b, qos=1))
        sender = ReliableSender("tx", lambda tr, fr, done: links.send(tr.path[1], fr, done),
                                credit=credit, initial_grant=int(initial_mb * MIB))

        def on_ack(topic, data, retained):
            f = decode_frame(data)
            if isinstance(f, AckFrame):
                sender.on_ack_frame(f)
        bus.subscribe(topics.route_inbox(MESH, "tx"), on_ack, qos=1)
        time.sleep(0.3)
        peak, sampling = [0], threading.Event()

        def sample():
            while not sampling.is_set():
                peak[0] = max(peak[0], sender.inflight_to("rx"))
                time.sleep(0.002)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        t0 = time.time()
        trs = []
        for i in range(n):
            piece = f"p{i}"
            topic = topics.route_topic(MESH, ["rx"], "bench", piece)
            frames = [(topic, f) for f in encode_frames("bench", piece, payload,
                                                         src_task="@tx")]
            trs.append(sender.send("bench", piece, "rx", ["tx", "rx"], frames, 0.01,
                                   failures.append, wait_s=300))
        for tr in trs:
            tr.acked.wait(300)
        t1 = time.time()
        sampling.set()
        th.join()
        acked = sum(tr.acked.is_set() for tr in trs)
        resent, waits = sender.retransmissions, sender.credit_waits
        sender.stop()
        links.stop()
    _, got, peak_held = q.get(timeout=60)
    stop.set()
    p.join(10)
    mib = acked * payload.nbytes / MIB
    return {"mode": "credit" if credit else "window only", "pieces": acked,
            "MiB_per_s": round(mib / (t1 - t0), 1), "peak_inflight_MiB":
            round(peak[0] / MIB, 1), "peak_held_MiB": round(peak_held / MIB, 1),
            "credit_waits": waits, "retransmissions": resent, "failures": len(failures)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pieces", type=int, default=200)
    ap.add_argument("--piece-mb", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--held-mb", type=float, default=256.0,
                    help="the receiver's held-pieces cap (its credit)")
    ap.add_argument("--hold-ms", type=float, default=0.0,
                    help="the receiver keeps each piece this long before it is used")
    ap.add_argument("--initial-mb", type=float, default=16.0,
                    help="what the sender may have in flight before the first grant")
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    import numpy as np
    from meshdl.data import data_dir
    from meshdl.transport.broker import EmbeddedBroker
    payload = np.random.default_rng(0).integers(0, 255, int(args.piece_mb * MIB),
                                                dtype=np.uint8)
    ctx = mp.get_context("spawn")
    rows = []
    with EmbeddedBroker(str(data_dir("broker") / "plain.conf"), backend="mosquitto") as b:
        for credit in (True, False):                              # warm-up
            one_run(ctx, b.url, max(5, args.pieces // 10), payload, credit, args.held_mb,
                    args.hold_ms, args.initial_mb)
        for rep in range(args.runs):
            for credit in ((True, False) if rep % 2 == 0 else (False, True)):
                r = one_run(ctx, b.url, args.pieces, payload, credit, args.held_mb,
                            args.hold_ms, args.initial_mb)
                r["run"] = rep + 1
                rows.append(r)
                print(r, flush=True)
    med = {m: statistics.median(r["MiB_per_s"] for r in rows if r["mode"] == m)
           for m in ("credit", "window only")}
    print(f"\n{args.pieces} pieces of {args.piece_mb} MiB, receiver cap {args.held_mb} MiB, "
          f"hold {args.hold_ms} ms, initial grant {args.initial_mb} MiB, {args.runs} interleaved "
          "runs per mode\n")
    print("| mode | run | MiB/s | peak in flight MiB | peak held MiB | credit waits | "
          "retransmissions | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['run']} | {r['MiB_per_s']} | {r['peak_inflight_MiB']} | "
              f"{r['peak_held_MiB']} | {r['credit_waits']} | {r['retransmissions']} | "
              f"{r['failures']} |")
    print(f"\nmedian MiB/s: credit {med['credit']}, window only {med['window only']}, "
          f"ratio {med['credit'] / med['window only']:.2f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_flow.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
