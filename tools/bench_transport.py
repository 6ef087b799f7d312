"""Transport throughput of tensor pieces through mosquitto: sealed vs unsealed.

    python tools/bench_transport.py [--mb 64] [--chunk-mb 1] [--repeats 3]
        [--cipher aegis128l,aes256gcm] [--openssl] [--link-mbps 100] [--out results]

One mosquitto run by meshdl's secure setup (`meshdl broker`: TLS, client
certificates, ACL) and two enrolled devices. Each run sends ``--mb`` MB of real
float32 tensor frames (codec frames of ``--chunk-mb``) from d1 to d2's route inbox
and waits until d2 has received (and, sealed, opened) every byte. The frames are what
nodes and clients publish: codec ``OutFrame``s (a header and a view of the tensor,
joined by the publish: by paho's bus unsealed, straight into the sealed buffer
sealed); ``--joined`` hands both modes bytes joined beforehand instead (sealing then
costs one more pass over each MB: the cipher cannot work in the caller's buffer).

- unsealed: the frames as they are (TLS to the broker only; the broker reads them);
- sealed-CIPHER: the same frames through a SecureBus, sealed with each ``--cipher``
  (AEGIS-128L, the default, and AES-256-GCM, the fallback; one key per (pair, job,
  cipher); only d2 can open them); ``--openssl`` adds AES-256-GCM through
  cryptography's OpenSSL backend (holds the GIL).

Runs alternate (the order rotates each repeat) so every mode sees the same machine
load. Prints a markdown table (median MB/s, the sealed/unsealed ratio of medians and
the median of the per-repeat ratios; target >= 0.90) and the CPU time each MB cost
this process (sender and receiver) and the broker together: that ratio is what the
throughput ratio tends to when the run is CPU-bound, and other processes' load
moves it much less than wall time. Writes
``bench_transport.csv`` under ``--out``.
"""
from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meshdl.security.aead import CIPHERS, has_aegis  # noqa: E402
from meshdl.security.authority import init_authority, write_bundle  # noqa: E402
from meshdl.security.broker import SecureBroker  # noqa: E402
from meshdl.security.policy import PlanInfo  # noqa: E402
from meshdl.security.bundle import Bundle  # noqa: E402
from meshdl.security.securebus import SecureBus  # noqa: E402
from meshdl.transport.paho_bus import PahoBus  # noqa: E402
from meshdl.wire import topics  # noqa: E402
from meshdl.wire.codec import encode_chunks, encode_frames  # noqa: E402

MESH = "bench"
PIECE = "P.src.t0"        # plan P's source (d1) sends task t0's input to d2
CIPHER_OF = {"unsealed": None, "sealed-openssl": "aes256gcm",
             **{f"sealed-{c}": c for c in CIPHERS}}
NAMES = {"sealed-aegis128l": "AEGIS-128L", "sealed-aes256gcm": "AES-256-GCM (libsodium)",
         "sealed-openssl": "AES-256-GCM (OpenSSL, GIL held)"}


def frames(mb: int, chunk_mb: float, job: str, joined: bool = False) -> list:
    """Pieces as nodes and clients publish them: codec ``OutFrame``s (a header and a view
    of the tensor, joined by the publish); ``joined``: bytes frames joined beforehand."""
    arr = np.random.default_rng(0).standard_normal(mb * (1 << 20) // 4).astype(np.float32)
    chunk = int(chunk_mb * (1 << 20))
    if joined:
        return list(encode_chunks(job, PIECE, arr, chunk_bytes=chunk))
    return encode_frames(job, PIECE, arr, chunk_bytes=chunk)


def cipher_ms_per_mb(cipher: str, openssl: bool = False, reps: int = 50) -> float:
    """Seconds per MB of one seal call alone (warm buffers, best of 5), in ms."""
    from meshdl.security.aead import Aead, out_buffer
    if openssl:
        os.environ["MESHDL_AEAD"] = "openssl"
    try:
        spec = CIPHERS[cipher]
        a = Aead(os.urandom(spec.key_bytes), cipher)
    finally:
        os.environ.pop("MESHDL_AEAD", None)
    data, nonce = os.urandom(1 << 20), os.urandom(spec.nonce_bytes)
    out = out_buffer((1 << 20) + spec.tag_bytes)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            a.encrypt_into(nonce, data, b"aad", out)
        best = min(best, (time.perf_counter() - t) / reps)
    return best * 1e3


def side_costs(sec: dict, cipher: str, chunk_mb: float, joined: bool, mb: int = 64,
               reps: int = 5) -> dict[str, float]:
    """Each side's cost per MB, in ms (best of ``reps`` passes over ``mb`` MB of a fresh
    tensor, no broker): sealing a frame (d1's ``SecureBus.wrap``) beside the join every
    publish makes anyway (``bytes(frame)``), and opening one (d2's ``unwrap``) beside a
    plain copy of it. The end-to-end ratio moves with how the threads of one process
    share the GIL on two cores; these are the CPU a device spends. Run before the
    end-to-end runs, on a fresh heap: how often a freed megabyte goes back to the kernel
    (and faults in again) depends on what the process allocated before."""
    sec["d1"].ring.cipher = cipher
    topic = topics.route_topic(MESH, ["d2"], "side", PIECE)
    fr = frames(mb, chunk_mb, "side", joined)
    sealed = [bytes(sec["d1"].wrap(topic, f)) for f in fr]
    best = {"seal": float("inf"), "join": float("inf"), "open": float("inf"),
            "copy": float("inf")}
    for _ in range(reps):
        for name, run in (("seal", lambda: (sec["d1"].wrap(topic, f) for f in fr)),
                          ("join", lambda: (bytes(f) for f in fr)),
                          ("open", lambda: (sec["d2"].unwrap(topic, x) for x in sealed)),
                          ("copy", lambda: (bytearray(x) for x in sealed))):
            t = time.perf_counter()
            for out in run():          # each result dropped at once, as a publish does
                del out
            best[name] = min(best[name], (time.perf_counter() - t) / mb * 1e3)
    return best


def cpu_seconds(broker_pid: int) -> float:
    """CPU time used so far by this process (all its threads) and by the broker."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    with open(f"/proc/{broker_pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return r.ru_utime + r.ru_stime + \
        (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(tx, rx_sub, job: str, payloads: list[bytes], rate_bps: float = 0.0,
            timeout: float = 300.0) -> float:
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
    topic = topics.route_topic(MESH, ["d2"], job, PIECE)
    t0 = time.perf_counter()
    sent = 0
    for p in payloads:
        if rate_bps:                      # a link of this rate: never ahead of it
            ahead = t0 + sent * 8 / rate_bps - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        tx.publish(topic, p, qos=1)
        sent += len(p)
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
    ap.add_argument("--link-mbps", type=float, default=100.0,
                    help="Also measure with the sender paced to a link of this rate "
                    "(a home network); 0 skips it.")
    ap.add_argument("--cipher", default="aegis128l,aes256gcm",
                    help="Comma-separated sealing ciphers to measure side by side.")
    ap.add_argument("--openssl", action="store_true",
                    help="Also seal with cryptography's OpenSSL AES (holds the GIL) instead "
                    "of libsodium's (releases it).")
    ap.add_argument("--joined", action="store_true",
                    help="Send bytes frames joined beforehand instead of the unjoined "
                    "codec frames nodes and clients publish.")
    ap.add_argument("--out", default="results")
    a = ap.parse_args()
    ciphers = [c.strip() for c in a.cipher.split(",") if c.strip()]
    for c in ciphers:
        if c not in CIPHERS:
            ap.error(f"--cipher {c!r}: one of {', '.join(CIPHERS)}")
        if c == "aegis128l" and not has_aegis():
            ap.error("this libsodium has no AEGIS-128L (PyNaCl >= 1.6 has it)")
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
            # as if the leader's plan P had been verified: d2 takes P's pieces from d1
            sec["d2"].adm.plans["P"] = PlanInfo("d2", frozenset({"d1", "d2"}), "d1", "d1",
                                                {"t0": "d2"})
            modes = ["unsealed"] + [f"sealed-{c}" for c in ciphers] + \
                (["sealed-openssl"] if a.openssl else [])
            try:
                # first, on this process's fresh heap (as a node's is); the runs reshape it
                sides = {c: side_costs(sec, c, a.chunk_mb, a.joined) for c in ciphers}
                opened0 = sec["d2"].sealed_in
                links = [0.0] + ([a.link_mbps * 1e6] if a.link_mbps else [])
                for link in links:
                    for r in range(a.repeats):
                        order = modes[r % len(modes):] + modes[:r % len(modes)]
                        for mode in order:
                            job = f"j{r}{mode}{int(link)}"
                            payloads = frames(a.mb, a.chunk_mb, job, a.joined)
                            # the AES backend is picked when a job's key is made
                            if mode == "sealed-openssl":
                                os.environ["MESHDL_AEAD"] = "openssl"
                            else:
                                os.environ.pop("MESHDL_AEAD", None)
                            sec["d1"].ring.cipher = CIPHER_OF[mode]
                            tx = buses["d1"] if mode == "unsealed" else sec["d1"]
                            rx = buses["d2"] if mode == "unsealed" else sec["d2"]
                            cpu0 = cpu_seconds(br.proc.pid)
                            dt = one_run(tx, rx, job, payloads, link)
                            cpu = cpu_seconds(br.proc.pid) - cpu0
                            rows.append({"link_mbps": link / 1e6, "mode": mode, "repeat": r,
                                         "mb": a.mb, "chunk_mb": a.chunk_mb,
                                         "seconds": round(dt, 4),
                                         "mb_per_s": round(a.mb / dt, 2),
                                         "cpu_ms_per_mb": round(cpu / a.mb * 1e3, 3)})
                            print(f"  link {link / 1e6 or 'unlimited'} {mode:16s} run {r}: "
                                  f"{a.mb / dt:7.1f} MB/s, {cpu / a.mb * 1e3:.2f} CPU ms/MB",
                                  file=sys.stderr)
                opened = sec["d2"].sealed_in - opened0
            finally:
                for bus in buses.values():
                    bus.close()
    kind = "bytes frames joined beforehand" if a.joined else "unjoined codec frames"
    print(f"\n### Transport: sealed vs unsealed pieces ({a.mb} MB in {a.chunk_mb:g} MB {kind}, "
          f"median of {a.repeats}, TLS broker by `meshdl broker`)\n")
    print("| link | sealing | unsealed MB/s (TLS to broker only) | sealed MB/s (end to end) "
          "| sealed / unsealed (medians) | median of paired ratios (same repeat) "
          "| CPU ms per MB, unsealed / sealed (process + broker) | CPU ratio |\n"
          "|---|---|---|---|---|---|---|---|")
    for link in sorted({x["link_mbps"] for x in rows}):
        here = [x for x in rows if x["link_mbps"] == link]
        unsealed = statistics.median(x["mb_per_s"] for x in here if x["mode"] == "unsealed")
        cpu = {m: statistics.median(x["cpu_ms_per_mb"] for x in here if x["mode"] == m)
               for m in modes}
        by = {(x["repeat"], x["mode"]): x["mb_per_s"] for x in here}
        name = f"{link:g} Mbit/s" if link else "loopback, unpaced (CPU-bound)"
        for mode in modes[1:]:
            m = statistics.median(x["mb_per_s"] for x in here if x["mode"] == mode)
            paired = statistics.median(by[(r, mode)] / by[(r, "unsealed")]
                                       for r in range(a.repeats))
            print(f"| {name} | {NAMES[mode]} | {unsealed:.1f} | {m:.1f} | "
                  f"**{m / unsealed:.2f}** | {paired:.2f} | {cpu['unsealed']:.2f} / "
                  f"{cpu[mode]:.2f} | {cpu['unsealed'] / cpu[mode]:.2f} |")
    alone = ", ".join(f"{NAMES[m]} {cipher_ms_per_mb(CIPHER_OF[m], m == 'sealed-openssl'):.3f}"
                      for m in modes[1:])
    print("\n| each side, per MB (no broker) | seal a frame (d1) | the join alone | open it "
          "(d2) | a copy alone |\n|---|---|---|---|---|")
    for c, b in sides.items():
        print(f"| {NAMES['sealed-' + c]} | {b['seal']:.3f} ms | {b['join']:.3f} ms | "
              f"{b['open']:.3f} ms | {b['copy']:.3f} ms |")
    print(f"\ntarget: sealed >= 0.90 x unsealed; frames opened by d2: {opened}; "
          f"one seal call alone, ms per MB (warm): {alone}")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "bench_transport.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    main()
