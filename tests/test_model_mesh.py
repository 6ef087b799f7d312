"""A user's own model on a real mesh: node processes on mosquitto, the model offered by
the client over MQTT, each node fetching only the weights of its own stages."""
from __future__ import annotations

import json
import os
import threading
import time

import pytest
import torch

import meshdl
from meshdl.client import MeshClient
from meshdl.models.store import ModelStore, build_module
from meshdl.node.model_store import _parse_want
from meshdl.transport.broker import EmbeddedBroker, mosquitto_binary
from meshdl.transport.paho_bus import PahoBus
from meshdl.wire import topics
from model_zoo_user import BranchyNet, export_onnx, ort_run, randomise_bn

pytestmark = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto not installed")
MESH = "um"
SHAPE = (1, 3, 128, 128)
# a tiled first stage on every device, the rest (with the SE block) on one: weights spread
# unevenly. test_onnx_se_block_tiled_on_mesh tiles the SE block itself (phased tasks).
STRATEGY = "deepthings"


def close(a, b, rel=1e-4) -> bool:
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-6)


class Wants:
    """Every chunk request on the mesh: (time, node, tensor sha256s)."""

    def __init__(self, url: str) -> None:
        self.log: list[tuple[float, str, set[str]]] = []
        self.bus = PahoBus(url, client_id="want-watch")
        self.bus.connect(10)
        self.bus.subscribe(topics.model_want_all(MESH), self._on, qos=1)

    def _on(self, topic, payload, retained=False):
        node, _, items = _parse_want(payload)
        self.log.append((time.time(), node, {str(i[0]) for i in items}))

    def by(self, node: str, since: float = 0.0) -> set[str]:
        return set().union(*[s for t, n, s in self.log if n == node and t >= since])


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from meshdl.node.launcher import MeshUp
    from tests.test_dataplane import broker_template
    d = tmp_path_factory.mktemp("umesh")
    env = {k: v for k, v in os.environ.items() if k != "MESHDL_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(d / "node-cache")
    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "MESHDL_CACHE_DIR")}
    os.environ["MESHDL_CACHE_DIR"] = str(d / "client-cache")      # the client's own cache
    try:
        with EmbeddedBroker(broker_template(d), backend="mosquitto", workdir=d / "b") as b:
            with MeshUp("home-4", broker=b.url, mesh=MESH, model="tiny_chain",
                        log_dir=d / "logs", verbose=False, env=env) as up:
                up.wait_ready(120)
                wants = Wants(b.url)
                with MeshClient(b.url, MESH) as c:
                    yield up, c, d / "node-cache" / "meshdl" / "nodes", wants
                wants.bus.close()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory):
    torch.manual_seed(11)
    model = randomise_bn(BranchyNet(width=64, classes=100))
    path = tmp_path_factory.mktemp("onnx") / "branchy.onnx"
    export_onnx(model, torch.zeros(SHAPE), path,
                metadata={"labels": json.dumps([f"k{i}" for i in range(100)])})
    return model, path


def expected_bytes(plan, manifest) -> dict[str, int]:
    """Per device: bytes of the distinct tensors its stages' ops read (from the graph)."""
    g = meshdl.trace(build_module(manifest, {}), tuple(manifest["input_shape"]))
    out: dict[str, set[str]] = {}
    for stage in plan.stages:
        names = {n.target for op in g.ops[stage.start:stage.end]
                 for n in op.node.all_input_nodes if n.op == "get_attr"}
        for t in stage.tasks:
            out.setdefault(t.device, set()).update(
                manifest["tensors"][k]["sha256"] for k in names)
    size = {i["sha256"]: i["bytes"] for i in manifest["tensors"].values()}
    return {dev: sum(size[s] for s in shas) for dev, shas in out.items()}


def test_onnx_model_on_mesh_fetches_only_own_stages(mesh, onnx_model):
    up, c, caches, wants = mesh
    model, path = onnx_model
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    r = c.infer(x, model=str(path), strategy=STRATEGY, timeout=180)
    assert close(r.output, ort_run(path, x)) and close(r.output, model(x))
    assert r.top5[0][1].startswith("k")
    manifest = ModelStore().manifest(r.plan.model)      # the client's cache
    want = expected_bytes(r.plan, manifest)
    total = sum(i["bytes"] for i in manifest["tensors"].values())
    held = {dev: ModelStore(caches / dev).bytes_held() for dev in up.devices}
    for dev in up.devices:
        assert held[dev] == want.get(dev, 0), (dev, held, want)
    assert sum(1 for v in held.values() if 0 < v) >= 2         # weights really spread
    assert any(v < total for v in held.values())               # and really partial
    t1 = time.time()
    r2 = c.infer(x, model=str(path), strategy=STRATEGY, timeout=60)
    assert close(r2.output, r.output) and r2.plan.model == r.plan.model
    assert not any(t >= t1 for t, _, _ in wants.log)           # warm: nothing fetched


def test_onnx_se_block_tiled_on_mesh(mesh, onnx_model):
    """modnn tiles every stage, the SE block's too: its global pool becomes a reduce point
    whose partial sums cross the mesh, and the answer still equals onnxruntime's."""
    up, c, caches, wants = mesh
    model, path = onnx_model
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    r = c.infer(x, model=str(path), strategy="modnn", timeout=180)
    assert any(s.reduces and len(s.tasks) > 1 for s in r.plan.stages), r.plan.stages
    assert close(r.output, ort_run(path, x)) and close(r.output, model(x))


def test_restarted_node_does_not_fetch_again(mesh, onnx_model):
    up, c, caches, wants = mesh
    model, path = onnx_model
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    ref = ort_run(path, x)
    r = c.infer(x, model=str(path), strategy=STRATEGY, timeout=120)
    leader, plan = r.plan.meta.get("leader"), r.plan
    victims = [d for d in plan.devices() if d not in (leader, plan.source, plan.sink)
               and ModelStore(caches / d).bytes_held() > 0]
    assert victims, plan.devices()
    dev = victims[0]
    store = ModelStore(caches / dev)
    before = {p.name: p.stat().st_mtime_ns for p in store.tensors_dir.iterdir()}
    results, errors, stop = [], [], threading.Event()

    def stream():
        while not stop.is_set():
            try:
                results.append((time.time(), c.infer(x, model=str(path), strategy=STRATEGY,
                                                     timeout=60)))
            except Exception as exc:   # jobs in flight when the node dies may fail
                errors.append(exc)

    th = threading.Thread(target=stream, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + 60
        while len(results) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        t_kill = time.time()
        up.kill(dev)
        deadline = time.monotonic() + 30
        while dev in c.online() and time.monotonic() < deadline:
            time.sleep(0.1)
        up.spawn(dev)
        deadline = time.monotonic() + 90
        done = None
        while time.monotonic() < deadline and done is None:
            done = next((res for t, res in results if t > t_kill and dev in res.plan.devices()
                         and res.plan.model == plan.model), None)
            time.sleep(0.2)
    finally:
        stop.set()
        th.join(90)
    assert done is not None, (errors[-3:], up.tails([dev]))
    assert close(done.output, ref)
    assert not (wants.by(dev, since=t_kill) & set(before))    # nothing it had, re-fetched
    after = {p.name: p.stat().st_mtime_ns for p in store.tensors_dir.iterdir()}
    assert all(after.get(k) == v for k, v in before.items())


def test_pt2_and_zoo_weights_on_mesh(mesh, tmp_path):
    up, c, caches, wants = mesh
    torch.manual_seed(7)
    model = randomise_bn(BranchyNet(width=16, classes=12))
    x = torch.randn(1, 3, 64, 64)
    path = tmp_path / "b.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(path))
    r = c.infer(x, model=str(path), strategy=STRATEGY, timeout=120)
    assert close(r.output, model(x))
    zoo = meshdl.models.build("tiny_cnn")
    with torch.no_grad():
        for p in zoo.parameters():
            p.mul_(1.5)
    torch.save(zoo.state_dict(), tmp_path / "tiny.pth")
    xz = torch.randn(1, 3, 32, 32)
    r = c.infer(xz, model="tiny_cnn", model_options={"weights": str(tmp_path / "tiny.pth")},
                strategy="modnn", timeout=120)      # tiny_cnn: no global reduction
    assert close(r.output, zoo(xz))
    assert not close(r.output, meshdl.models.build("tiny_cnn")(xz))


@pytest.mark.slow
def test_onnx_model_on_a_secure_mesh(tmp_path, onnx_model, monkeypatch):
    """TLS identities, generated ACL, signed messages: the model's offer, requests and
    chunks are signed and admitted, and each node caches its own stages' weights."""
    from meshdl.mesh.loader import load_topology
    from meshdl.node.launcher import MeshUp
    from meshdl.security.authority import init_authority, write_bundle
    from meshdl.security.broker import SecureBroker
    model, path = onnx_model
    a = init_authority("sm", tmp_path / "authority")
    topo = load_topology("home-4")
    bundles = {dev: write_bundle(a.issue(dev, "device", topo.devices[dev].profile),
                                 tmp_path / f"{dev}.bundle") for dev in sorted(topo.devices)}
    for name in ("watch", "alice"):
        write_bundle(a.issue(name, "client"), tmp_path / f"{name}.bundle")
    env = {k: v for k, v in os.environ.items() if k != "MESHDL_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "node-cache")
    monkeypatch.setenv("MESHDL_CACHE_DIR", str(tmp_path / "client-cache"))
    caches = tmp_path / "node-cache" / "meshdl" / "nodes"
    answers: list = []
    with SecureBroker(a) as br:
        with MeshUp("home-4", broker=br.url, mesh="sm", model="tiny_chain",
                    log_dir=tmp_path / "logs", verbose=False, bundles=bundles, env=env,
                    watch_bundle=tmp_path / "watch.bundle") as up:
            up.wait_ready(150)
            with MeshClient(br.url, "sm", bundle=str(tmp_path / "alice.bundle")) as c:
                x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))

                def job():
                    try:
                        answers.append(c.infer(x, model=str(path), strategy=STRATEGY,
                                               timeout=60, max_attempts=1))
                    except Exception as exc:     # the job's fate is the data plane's
                        answers.append(exc)
                th = threading.Thread(target=job, daemon=True)
                th.start()
                deadline = time.monotonic() + 90
                held: dict = {}
                while time.monotonic() < deadline:
                    held = {d: ModelStore(caches / d).bytes_held() for d in topo.devices}
                    if sum(1 for v in held.values() if v) >= 4:
                        break
                    time.sleep(0.5)
                th.join(90)
    (model_id,) = ModelStore().ids()
    manifest = ModelStore().manifest(model_id)
    total = sum(i["bytes"] for i in manifest["tensors"].values())
    assert all(held.values()) and min(held.values()) < total, held
    if answers and not isinstance(answers[0], Exception):
        assert close(answers[0].output, ort_run(path, x))
