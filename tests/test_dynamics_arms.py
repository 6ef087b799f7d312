"""bench_dynamics' comparison arms run for real (tools/dynamics_arms.py): a plan that
is not the leader's, issued under the leader's term, is adopted by the nodes and a job
runs on it (exact answer, on that plan's device); when the leader clears it, the
pinner issues it again. Emulated home-4 on a real mosquitto and real node processes."""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


def test_a_pinned_plan_runs_for_real_and_is_reissued_when_cleared(mosquitto, tmp_path):
    import torch
    import meshdl
    from meshdl.client import MeshClient
    from meshdl.node.launcher import MeshUp
    from meshdl.planner.local import whole_plan
    from meshdl.transport.paho_bus import PahoBus
    from meshdl.wire import topics
    from dynamics_arms import Pinner, run_pinned
    mesh = meshdl.load_topology("home-4")
    g = meshdl.trace(meshdl.models.build("tiny_cnn"), input_shape=(1, 3, 32, 32),
                     name="tiny_cnn")
    up = MeshUp("home-4", broker=mosquitto, mesh="i11pin", model="tiny_cnn",
                log_dir=tmp_path / "logs", telemetry_period=1.0)
    with up, MeshClient(mosquitto, "i11pin") as c:
        snap = up.wait_ready(120)
        theirs = c.request_plan("tiny_cnn", alpha=1.0, input_shape=(1, 3, 32, 32))
        src = theirs.source
        other = next(d for d in sorted(mesh.devices) if {d, src} != set(theirs.devices()))
        pinner = Pinner(c, up.watcher, "i11pin")
        pinner.start()
        try:
            plan = whole_plan(g, other, src, src)
            x = torch.randn(1, 3, 32, 32)
            res = run_pinned(c, pinner, x, [0.0], time.monotonic(), 1.0,
                             lambda t: plan, timeout=60.0)
            assert not res.failed, res.failed
            (_, meas, used), = res.jobs
            assert used.plan_id != theirs.plan_id and set(used.devices()) == {other, src}
            assert used.term == snap.leader.term and meas > 0
            # cleared as the leader clears a plan it does not serve: issued again
            assert up.wait_for(lambda s: used.plan_id in s.plans, 20, "the pinned plan")
            with PahoBus(mosquitto) as bus:
                bus.publish(topics.plan("i11pin", used.plan_id), b"", qos=1, retain=True)
                bus.flush()
            up.wait_for(lambda s: pinner.reissued >= 1 and used.plan_id in s.plans, 20,
                        "the pinned plan issued again")
            res = run_pinned(c, pinner, x, [0.0], time.monotonic(), 1.0,
                             lambda t: plan, timeout=60.0)
            assert not res.failed and res.jobs[0][2].plan_id == used.plan_id
            r = c.run_on_plan(c.job_id("exact"), x, used, time.monotonic() + 60)
        finally:
            pinner.stop()
    with torch.no_grad():
        want = meshdl.models.build("tiny_cnn")(x)
    assert (r.output - want).abs().max().item() <= 1e-4 * want.abs().max().item()
    assert r.plan.plan_id == used.plan_id
