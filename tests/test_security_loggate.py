"""A flood of refused messages is counted in full but logged at a bounded rate, and the
tally of reasons does not grow with the ids a sender picks."""
from __future__ import annotations

import logging

import numpy as np

from meshdl.security.loggate import OTHER, LogGate, Refusals, kind_of

MESH = "m"


def test_the_gate_logs_a_burst_per_kind_and_window_then_tells_what_it_held_back():
    gate = LogGate(burst=3, total=5, window=10.0)
    said = [gate.admit("bad signature", t * 0.01) for t in range(100)]
    assert said[:3] == ["", "", ""] and said[3:] == [None] * 97
    other = [gate.admit("unsealed piece", 1.0 + t * 0.01) for t in range(5)]
    # its own burst, within the total; its first line tells what was held back so far
    assert other == [" (97 more refusals were not logged: bad signature x97)", "", None,
                     None, None]
    line = gate.admit("bad signature", 10.5)                  # a new window
    assert line == " (3 more refusals were not logged: unsealed piece x3)"
    assert gate.admit("bad signature", 10.6) == ""            # told once


def test_made_up_ids_do_not_make_new_kinds_of_refusal():
    reasons = [f"device pi3 sent a piece of P.in of job thief~j{i}, whose producer is a"
               for i in range(50)] + \
        [f"sealed frame (aegis128l) from 't' for x~{i}/P.in does not open" for i in range(50)]
    assert len({kind_of(r) for r in reasons}) == 2


def test_the_tally_keeps_every_count_under_a_bounded_number_of_reasons():
    r = Refusals(keys=4)
    for i in range(1000):
        r.add(f"piece of job j{i}")
    assert sum(r.counts.values()) == 1000
    assert len(r.counts) == 5 and r.counts[OTHER] == 996
    assert r.add("piece of job j1") == "piece of job j1"      # a known reason stays its own


class _Inner:
    connected = True

    def publish(self, *a, **k) -> None:
        pass

    def subscribe(self, *a, **k) -> None:
        pass


def test_a_flood_of_forged_pieces_is_counted_and_logged_at_a_bounded_rate(tmp_path, caplog):
    """A stolen device seals 3,000 pieces of made-up jobs to a node: every one is refused
    and counted, the log gets at most one burst of lines, and the tally stays small."""
    from meshdl.security import frames as F
    from meshdl.security.authority import init_authority, write_bundle
    from meshdl.security.bundle import Bundle
    from meshdl.security.securebus import SecureBus
    from meshdl.wire import topics
    from meshdl.wire.codec import encode_frames
    a = init_authority(MESH, tmp_path / "ca")
    b = {i: Bundle.load(write_bundle(a.issue(i, "device", "rpi4_seed"), tmp_path / i))
         for i in ("me", "thief")}
    me, thief = SecureBus(_Inner(), b["me"]), SecureBus(_Inner(), b["thief"])
    thief._learn(b["me"].entry_info)
    arr = np.zeros(16, np.float32)
    n = 3000
    with caplog.at_level(logging.WARNING, logger="meshdl.security.securebus"):
        for i in range(n):
            job = f"thief~j{i}"
            t = topics.route_topic(MESH, ["me"], job, "P.in")
            frame = encode_frames(job, "P.in", arr)[0]
            assert F.is_sealed(thief.wrap(t, frame))
            assert me.unwrap(t, thief.wrap(t, frame)) is None
    lines = [r for r in caplog.records if "rejected a message" in r.getMessage()]
    assert sum(me.rejected.values()) == n
    assert 1 <= len(lines) <= me._gate.burst
    assert "P.in" in lines[0].getMessage()                     # the first ones say why
    assert len(me.rejected) <= me._refusals.keys + 1


def test_the_cli_log_holds_back_a_flood_of_one_warning_line_and_says_so():
    """Installed on a command's log handler: 500 'dropped a frame' warnings from one line
    of the code (a malformed-frame flood on a plain mesh) give one burst and no more,
    other lines and info lines are untouched, and the next window tells the count."""
    import io
    from meshdl.security.loggate import FloodFilter
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    now = [0.0]
    f = FloodFilter(burst=5, window=10.0, clock=lambda: now[0])
    handler.addFilter(f)
    lg = logging.getLogger("meshdl.test.flood")
    lg.addHandler(handler)
    lg.setLevel(logging.INFO)
    lg.propagate = False
    try:
        for i in range(500):
            lg.warning("n1 dropped a frame on %s: %s", f"route/{i}", "bad crc")
        lg.warning("another line %d", 1)
        lg.info("job %d done", 1)
        text = out.getvalue().splitlines()
        assert len(text) == 5 + 2 and text[0] == "n1 dropped a frame on route/0: bad crc"
        assert text[-2:] == ["another line 1", "job 1 done"]
        now[0] = 10.0                                   # the window ends
        lg.warning("n1 dropped a frame on %s: %s", "route/x", "bad crc")
        assert out.getvalue().splitlines()[-1] == (
            "n1 dropped a frame on route/x: bad crc (495 more like it were not logged)")
    finally:
        lg.removeHandler(handler)
