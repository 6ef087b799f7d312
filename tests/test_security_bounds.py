"""Bounds on every control field (pure): decode rejects, the fold never breaks."""
from __future__ import annotations

import math

import msgpack
import pytest

from meshdl.errors import WireError
from meshdl.mesh.state import (MAX_MEMBERS, MeshState, NodeCleared, NodeOnline, Telemetry,
                               apply, fold)
from meshdl.security import bounds
from meshdl.security.bounds import BoundsError, sanitise, term_step_ok
from meshdl.wire.control import decode_control

GOOD_POWER = {"compute_w": 5.0, "tx_w": 1.0}


def raw(type_name: str, **fields) -> bytes:
    return msgpack.packb({"v": 1, "type": type_name, **fields}, use_bin_type=True)


def birth(**over) -> bytes:
    f = {"node": "n1", "online": True, "session": 1, "flops": 1e9, "memory_bytes": 1 << 30,
         "power": GOOD_POWER}
    f.update(over)
    return raw("state", **f)


def test_a_good_birth_decodes():
    st = decode_control(birth())
    assert st.flops == 1e9 and st.power == GOOD_POWER


@pytest.mark.parametrize("over, needle", [
    ({"flops": math.nan}, "finite"), ({"flops": math.inf}, "finite"),
    ({"flops": -1.0}, "within"), ({"flops": 1e30}, "within"),
    ({"memory_bytes": 1 << 60}, "within"),
    ({"power": {"compute_w": math.nan, "tx_w": 1.0}}, "finite"),
    ({"power": {"compute_w": 1.0, "tx_w": 1.0, "evil": 3}}, "unknown key"),
    ({"caps": {"flops": 0}}, "> 0"),
    ({"caps": {f"k{i}": i for i in range(1000)}}, "entries"),
    ({"session": 1 << 60}, r"2\*\*53"),
    ({"ts": math.inf}, "finite"),
])
def test_malformed_births_are_rejected_with_a_reason(over, needle):
    with pytest.raises(BoundsError, match=needle):
        decode_control(birth(**over))


@pytest.mark.parametrize("payload", [
    raw("leader", node="n1", term=2**64 - 1), raw("leader", node="n1", term=2**63),
    raw("plan", plan_id="p", term=2**63, plan={}),
    raw("election", node="n1", term=2**53, kind="campaign"),
    raw("job_status", job="j", state="failed", term=2**62),
])
def test_terms_beyond_2_53_are_rejected(payload):
    with pytest.raises(WireError):
        decode_control(payload)


def test_term_steps_are_bounded():
    assert term_step_ok(0, 5_000_000)              # a fresh node adopts the mesh's term
    assert term_step_ok(7, 7 + bounds.MAX_TERM_STEP)
    assert not term_step_ok(7, 8 + bounds.MAX_TERM_STEP)
    assert not term_step_ok(0, bounds.MAX_TERM)
    assert not term_step_ok(3, 2**64 - 1)


def test_telemetry_maps_and_figures_are_bounded():
    links = {f"n{i}": {"rtt_s": 0.01} for i in range(bounds.MAX_LINKS + 1)}
    with pytest.raises(BoundsError, match="entries"):
        decode_control(raw("telemetry", node="n1", ts=1.0, links=links))
    with pytest.raises(BoundsError, match="finite"):
        decode_control(raw("telemetry", node="n1", ts=1.0,
                           links={"n2": {"bps": math.inf}}))
    with pytest.raises(BoundsError):
        decode_control(raw("telemetry", node="n1", ts=1.0, load=math.nan))


def test_job_request_input_shape_product_is_capped():
    ok = raw("job_request", job="j", client="c", options={"input_shape": [1, 3, 224, 224]})
    assert decode_control(ok).options["input_shape"] == [1, 3, 224, 224]
    big = raw("job_request", job="j", client="c", options={"input_shape": [1, 3, 4096, 4096]})
    with pytest.raises(BoundsError, match="elements"):
        decode_control(big)


def test_ids_with_control_characters_are_rejected():
    with pytest.raises(WireError, match="printable"):
        decode_control(birth(node="n1\n[fake] leader is x"))


def test_sanitise_makes_names_one_safe_line():
    assert sanitise("rpi-1") == "rpi-1"
    s = sanitise("evil\nINFO forged\x1b[31m" + "x" * 200)
    assert "\n" not in s and "\x1b" not in s and len(s) < 260 and s.endswith("...'")


def test_unusable_members_are_left_out_not_fatal(caplog):
    good = NodeOnline("a", {"flops": 1e9, "memory_bytes": 1 << 30, "power": GOOD_POWER}, 1)
    bad = [NodeOnline("b", {"flops": None, "memory_bytes": 1, "power": GOOD_POWER}, 1),
           NodeOnline("c", {"flops": math.nan, "memory_bytes": 1, "power": GOOD_POWER}, 1),
           NodeOnline("d", {"flops": 1e9, "memory_bytes": 1, "power": {"tx_w": 1}}, 1)]
    st = fold([good, *bad])
    with caplog.at_level("WARNING"):
        mesh = st.to_mesh()
    assert set(mesh.devices) == {"a"}
    assert "left out node b" in caplog.text and "left out node d" in caplog.text


def test_an_empty_retained_record_clears_a_member():
    st = fold([NodeOnline("a", {"flops": 1.0}, 1), NodeOnline("b", {"flops": 1.0}, 1),
               Telemetry("a", 0.0, {"b": {"rtt_s": 0.01, "throughput_bps": 1e6}})])
    assert st.links
    st2 = apply(st, NodeCleared("b"))
    assert "b" not in st2.members and not st2.links
    assert apply(st2, NodeCleared("zzz")) is st2


def test_members_and_links_are_bounded():
    st = fold(NodeOnline(f"n{i}", {"flops": 1.0}, 1) for i in range(MAX_MEMBERS + 50))
    assert len(st.members) == MAX_MEMBERS
    st = fold([NodeOnline("a", {"flops": 1.0}, 1),
               Telemetry("a", 0.0, {f"ghost{i}": {"rtt_s": 0.1} for i in range(200)})])
    assert not st.links                      # links to unknown nodes are not kept
    assert isinstance(st, MeshState)


def test_rate_limiter_per_key_and_total():
    from meshdl.security.limits import RateLimiter
    lim = RateLimiter(rate=1.0, burst=3.0, max_keys=4, total_rate=10.0, total_burst=5.0)
    assert [lim.allow("a", 0.0) for _ in range(5)] == [True, True, True, False, False]
    assert lim.allow("b", 0.0) and lim.allow("b", 0.0)
    assert not lim.allow("c", 0.0)                     # total burst (5) spent
    assert lim.allow("a", 2.0)                         # refilled over time
    for i in range(20):
        lim.allow(f"k{i}", 3.0 + i)
    assert len(lim) == 4 and lim.refused >= 3


def test_relays_refuse_loops_and_unknown_next_hops():
    from meshdl.security.limits import relay_refusal
    members = {"a", "b", "c"}
    assert relay_refusal(("a", "b", "c"), members, set(), "j") is None
    assert "loop" in relay_refusal(("a", "b", "a", "b"), members, set(), "j")
    assert "not a live member" in relay_refusal(("a", "ghost1", "c"), members, set(), "j")
    assert "not a live member" in relay_refusal(("a", "client-1"), members, set(), "j")
    assert relay_refusal(("a", "client-1"), members, {"j"}, "j") is None


def test_graph_cache_is_bounded():
    from meshdl.node.graphs import GraphCache
    built = []
    gc = GraphCache(builder=lambda m, s: built.append((m, s)) or object(), max_graphs=3)
    for h in range(1, 7):
        gc.get("tiny_cnn", (1, 3, h, h))
    assert len(gc._graphs) == 3 and len(built) == 6
    gc.get("tiny_cnn", (1, 3, 6, 6))                     # still cached: no rebuild
    assert len(built) == 6
