"""A client's control-plane waits scale with the time scale of a dilated mesh (the
leader records K in ``plan.meta["time_scale"]``); an undilated mesh keeps the defaults."""
from __future__ import annotations

import time

import pytest

import meshdl
from meshdl.client_jobs import (NO_MESH_S, RESEND_S, STALL_S, plan_time_scale,
                                scaled_timeouts)
from meshdl.errors import JobError
from proc_util import wait_for


def _plan(k: float | None) -> "meshdl.Plan":
    g = meshdl.trace(meshdl.models.build("tiny_cnn"), input_shape=(1, 3, 32, 32),
                     name="tiny_cnn")
    mesh = meshdl.load_topology("home-wifi")
    if k is not None:
        mesh = mesh.dilated(k)
    src = mesh.defaults.get("source") or sorted(mesh.devices)[0]
    plan = meshdl.plan(g, mesh, strategy="meshdl", source=src, sink=src)
    if mesh.time_scale != 1.0:          # what LeaderDuties._plan records
        plan.meta["time_scale"] = mesh.time_scale
    return plan


def test_scaled_timeouts_keep_the_defaults_undilated():
    assert scaled_timeouts(1.0) == (RESEND_S, STALL_S, NO_MESH_S)
    assert scaled_timeouts(0.5) == (RESEND_S, STALL_S, NO_MESH_S)   # never shorter
    assert scaled_timeouts(float("nan")) == (RESEND_S, STALL_S, NO_MESH_S)
    assert scaled_timeouts(4.0) == pytest.approx((4 * RESEND_S, 4 * STALL_S, 4 * NO_MESH_S))


def test_plan_time_scale_reads_what_the_leader_records():
    assert plan_time_scale(None) == 1.0
    assert plan_time_scale(_plan(None)) == 1.0
    assert plan_time_scale(_plan(3.0)) == pytest.approx(3.0)
    bad = _plan(None)
    for v in ("3", -2.0, float("inf"), 1e9, True):
        bad.meta["time_scale"] = v
        assert plan_time_scale(bad) == 1.0, v


def _publish_plan(url: str, mesh: str, plan) -> None:
    from meshdl.transport.paho_bus import PahoBus
    from meshdl.wire import topics
    from meshdl.wire.control import PlanMessage, encode_control
    plan.plan_id = plan.plan_id or "p" + "0" * 11
    bus = PahoBus(url)
    try:
        bus.publish(topics.plan(mesh, plan.plan_id),
                    encode_control(PlanMessage(plan.plan_id, 1, plan.to_dict(), time.time())),
                    qos=1, retain=True)
    finally:
        bus.close()


def _wait(cond, timeout: float = 20.0) -> bool:
    return wait_for(cond, timeout, step=0.05)


@pytest.mark.parametrize("k", [1.0, 3.0])
def test_device_silence_scales_with_the_plans_time_scale(mosquitto, k):
    """A plan device unheard for 1.5 x STALL_S fails an attempt on an undilated mesh,
    but not on a mesh 3x dilated (its heartbeats cross links 3x slower)."""
    from meshdl.client import MeshClient
    plan = _plan(k if k != 1.0 else None)
    _publish_plan(mosquitto, "i11ts", plan)
    with MeshClient(mosquitto, "i11ts") as c:
        assert _wait(lambda: plan.plan_id in c._plans), "the retained plan never arrived"
        assert c._time_scale == pytest.approx(k)
        got = c._plans.get(plan.plan_id)
        silent = c._silent(got, time.monotonic() - 1.5 * STALL_S)
        if k == 1.0:
            assert silent is not None and silent[0] in plan.devices()
        else:
            assert silent is None
            assert c._silent(got, time.monotonic() - 1.5 * STALL_S * k) is not None


def test_no_mesh_wait_scales_with_the_last_plan_seen(mosquitto):
    """With no live member and no leader, a request gives up after NO_MESH_S on an
    undilated mesh and after K x NO_MESH_S when the mesh's plans say K."""
    from meshdl.client import MeshClient
    import torch
    x = torch.randn(1, 3, 32, 32)
    times = {}
    for mesh, k in (("i11nm1", None), ("i11nm3", 3.0)):
        if k is not None:
            _publish_plan(mosquitto, mesh, _plan(k))
        with MeshClient(mosquitto, mesh) as c:
            if k is not None:
                assert _wait(lambda: c._time_scale == k), "the retained plan never arrived"
            t0 = time.monotonic()
            with pytest.raises(JobError, match="no live members"):
                c.infer(x, model="tiny_cnn", timeout=60)
            times[mesh] = time.monotonic() - t0
    assert times["i11nm1"] < 3 * NO_MESH_S, times
    assert times["i11nm3"] >= 3 * NO_MESH_S - 0.3, times
