"""Multi-process mesh: real node processes (meshdl node start --emulate) on mosquitto,
driven through MeshClient and `meshdl infer`. One mesh for the whole module."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import meshdl
from meshdl.cli import main
from meshdl.client import MeshClient
from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary
from meshdl.wire import topics
from meshdl.wire.control import JobStatus, decode_control

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")

def _photo() -> Path:
    """A real photo that ships with an installed package (matplotlib's Grace Hopper)."""
    from meshdl.cli.infer_cmd import sample_image
    return sample_image()


def close_enough(y: torch.Tensor, ref: torch.Tensor) -> None:
    diff = (y - ref).abs().max().item()
    assert diff <= 1e-4 * ref.abs().max().item(), diff
    assert int(y.argmax()) == int(ref.argmax())


@pytest.fixture(scope="module")
def mesh4(tmp_path_factory):
    from meshdl.node.launcher import MeshUp
    from tests.test_dataplane import broker_template
    d = tmp_path_factory.mktemp("mesh4")
    with EmbeddedBroker(broker_template(d), backend="mosquitto", workdir=d / "b") as b:
        up = MeshUp("home-4", broker=b.url, mesh="t4", model="tiny_cnn", log_dir=d / "logs",
                    verbose=False)
        with up:
            up.wait_ready(120)
            with MeshClient(b.url, "t4") as c:
                yield up, c


@pytest.mark.parametrize("strategy", ["meshdl", "local"])
def test_tiny_mesh_equals_local(mesh4, strategy):
    up, c = mesh4
    model = meshdl.models.build("tiny_cnn")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    r = c.infer(x, model="tiny_cnn", strategy=strategy, timeout=60)
    close_enough(r.output, model(x))
    assert r.plan.strategy == strategy


def test_efficientnet_lite0_answers_a_photo(mesh4):
    up, c = mesh4
    from meshdl import imaging
    photo = _photo()
    model = meshdl.models.build("efficientnet_lite0", pretrained=True)
    x = imaging.load_image(photo, preprocessing=imaging.preprocess_for("efficientnet_lite0"))
    r = c.infer(photo, model="efficientnet_lite0", timeout=120)
    ref = model(x)
    close_enough(r.output, ref)
    assert r.top5[0][1] == imaging.topk(ref, 1)[0][1]
    r = c.infer(photo, model="efficientnet_lite0", timeout=60)     # warm: honest timing
    assert r.plan.latency_s and 0.5 < r.latency_s / r.plan.latency_s < 2.0
    assert all(s.measured_s is not None for s in r.stages)


def test_cli_infer_json_and_table(mesh4):
    up, c = mesh4
    runner = CliRunner()
    res = runner.invoke(main, ["infer", str(_photo()), "--model", "tiny_cnn", "--broker", up.url,
                               "--mesh", "t4", "--json", "--timeout", "60"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert len(out["top5"]) == 5 and out["stages"] and out["latency_s"] > 0
    # the mesh's part (source to sink, what the plan predicts) lies inside the client's
    assert 0 < out["mesh_latency_s"] <= out["latency_s"]
    res = runner.invoke(main, ["infer", str(_photo()), "--model", "tiny_cnn", "--broker", up.url,
                               "--mesh", "t4", "--repeat", "3"])
    assert res.exit_code == 0, res.output
    assert "predicted ms" in res.stdout and "median of 3" in res.stdout
    assert "in the mesh, source to sink:" in res.stdout


def test_cli_corrupt_image_is_a_clear_error(mesh4, tmp_path):
    up, _ = mesh4
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(_photo().read_bytes()[:300])
    res = CliRunner().invoke(main, ["infer", str(bad), "--broker", up.url, "--mesh", "t4"])
    assert res.exit_code == 2
    assert "broken.jpg" in res.output


def test_killed_device_mid_job_still_exact(mesh4):
    """SIGKILL a worker while a job is in flight: the leader re-plans, the client
    retries on the new plan and still returns the exact answer."""
    up, c = mesh4
    model = meshdl.models.build("resnet18")
    x = torch.randn(1, 3, 224, 224)
    ref = model(x)
    warm = c.infer(x, model="resnet18", alpha=1.0, timeout=120)   # nodes build + warm it
    leader = up.watcher.snapshot().leader
    plan = warm.plan
    victims = [d for d in plan.devices()
               if d not in (plan.source, plan.sink, leader.node if leader else None)]
    if not victims:
        pytest.skip(f"plan {plan.summary()} uses only the source/sink/leader")
    planned: list[JobStatus] = []
    got = threading.Event()

    def on_status(topic, payload, retained):
        try:
            st = decode_control(payload, JobStatus)
        except meshdl.MeshdlError:
            return
        if st.state == "task" and not got.is_set():
            planned.append(st)
            got.set()

    c.bus.subscribe(topics.job_all("t4", "status"), on_status)
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=c.infer(x, model="resnet18",
                                                                alpha=1.0, timeout=120)))
    t.start()
    assert got.wait(60), "no task of the job started"
    up.kill(victims[-1])
    t.join(150)
    assert not t.is_alive()
    r = result["r"]
    close_enough(r.output, ref)
    assert victims[-1] not in r.plan.devices()
    assert r.attempts >= 2


def test_three_hop_route_across_node_processes(tmp_path):
    """Source a, sink d on a line a-b-c-d: the answer crosses b and c, which relay it."""
    from meshdl.node.launcher import MeshUp
    from tests.test_dataplane import LINE_YAML, broker_template
    topo = tmp_path / "line.yaml"
    topo.write_text(LINE_YAML)
    model = meshdl.models.build("tiny_cnn")
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with EmbeddedBroker(broker_template(tmp_path), backend="mosquitto",
                        workdir=tmp_path / "b") as b:
        with MeshUp(topo, broker=b.url, mesh="line", model="tiny_cnn",
                    log_dir=tmp_path / "logs", verbose=False) as up:
            up.wait_ready(120)
            seen: set[str] = set()
            from meshdl.transport.paho_bus import PahoBus
            with PahoBus(b.url) as spy, MeshClient(b.url, "line") as c:
                spy.subscribe(f"{topics.PREFIX}/line/route/#",
                              lambda t, p, r: seen.add(topics.parse_route(t)[1][0]), qos=1)
                ready = threading.Event()     # the retained leader record proves the
                spy.subscribe(topics.leader("line"), lambda t, p, r: ready.set(), qos=1)
                assert ready.wait(10)          # spy's subscriptions are live
                r = c.infer(x, model="tiny_cnn", strategy="local", source="a", sink="d",
                            timeout=60)
    close_enough(r.output, model(x))
    assert r.plan.source == "a" and r.plan.sink == "d"
    last = r.plan.stages[-1].tasks[0].device
    assert r.plan.route(last, "d") == ["a", "b", "c", "d"]
    assert {"b", "c", "d"} <= seen      # each relay received the answer on its own inbox
