"""User model files in process: ONNX (own converter, checked against onnxruntime), .pt2
(torch.export, ATen normalisation) and zoo + state dict; errors name the file and op."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from click.testing import CliRunner

import meshdl
from meshdl.errors import ModelError
from model_zoo_user import BranchyNet, export_onnx, ort_run, randomise_bn

SHAPE = (1, 3, 45, 53)


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    return (a - b).abs().max().item() <= rel * max(b.abs().max().item(), 1e-6)


@pytest.fixture(scope="module")
def branchy(tmp_path_factory):
    torch.manual_seed(3)
    model = randomise_bn(BranchyNet())
    path = tmp_path_factory.mktemp("onnx") / "branchy.onnx"
    x = torch.randn(SHAPE)
    export_onnx(model, x, path, metadata={"labels": json.dumps([f"c{i}" for i in range(10)]),
                                          "mean": "0.5,0.5,0.5", "std": "0.25,0.25,0.25"})
    return model, path, x


def test_onnx_matches_onnxruntime_and_torch_split(branchy):
    model, path, x = branchy
    lm = meshdl.models.load(path)
    assert lm.kind == "onnx" and lm.input_shape == SHAPE
    assert lm.labels[0] == "c0" and lm.mean == (0.5, 0.5, 0.5) and lm.std == (0.25,) * 3
    with torch.no_grad():
        y = lm.module(x)
        ref = model(x)
    assert close(y, ort_run(path, x)) and close(y, ref)
    g = lm.trace()
    plan = meshdl.manual_plan(g, grids=[(2, 2)])
    assert sum(len(s.tasks) for s in plan.stages) > len(plan.stages)   # really tiled
    assert close(meshdl.execute(plan, g, x), ref)


class OpSoup(nn.Module):
    """Ops beyond the plain CNN set: auto-pad style asymmetric pads, reshape/transpose,
    split, slice, gemm, pad, resize, reductions, clip, prelu, softmax."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2)
        self.c2 = nn.Conv2d(4, 4, 1)
        self.prelu = nn.PReLU(4)
        self.fc = nn.Linear(8 * 3, 7)

    def forward(self, x):
        x = F.pad(x, (0, 1, 1, 0))
        x = self.c1(x)
        a, b = torch.split(x, 4, dim=1)
        a = F.interpolate(self.c2(a), scale_factor=2, mode="nearest")
        a = F.avg_pool2d(a, 2)
        x = torch.cat([a, self.prelu(b)], 1)
        x = torch.clamp(x, -1.0, 2.0)[:, :, 1:-1:2, :]
        x = F.max_pool2d(x, 2, ceil_mode=True)
        n, c, h, w = x.shape
        x = x.reshape(n, c, h * w).transpose(1, 2)
        x = x.mean(dim=1, keepdim=True).squeeze(1)
        x = torch.cat([x, x.abs(), x * x], 1)
        return F.softmax(self.fc(x), dim=-1)


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_onnx_op_soup_matches_onnxruntime(tmp_path, opset):
    torch.manual_seed(opset)
    model = OpSoup().eval()
    x = torch.randn(1, 3, 33, 29)
    path = tmp_path / "soup.onnx"
    export_onnx(model, x, path, opset=opset)
    lm = meshdl.models.load(path)
    with torch.no_grad():
        y = lm.module(x)
        ref = model(x)
    assert close(y, ort_run(path, x)) and close(y, ref)
    g = lm.trace()
    assert close(meshdl.execute(meshdl.manual_plan(g, grids=[(2, 1)]), g, x), ref)


def test_pt2_matches_torch_and_splits(tmp_path):
    torch.manual_seed(5)
    model = randomise_bn(BranchyNet(width=8, classes=6))
    x = torch.randn(SHAPE)
    ep = torch.export.export(model, (x,))
    path = tmp_path / "branchy.pt2"
    torch.export.save(ep, str(path), extra_files={"meshdl.json": json.dumps(
        {"labels": ["a", "b", "c", "d", "e", "f"], "resize": 60})})
    lm = meshdl.models.load(path)
    assert lm.kind == "pt2" and lm.input_shape == SHAPE and lm.labels[2] == "c"
    assert lm.resize == 60
    targets = {n.target for n in lm.module.graph.nodes if n.op == "call_function"}
    assert not any(isinstance(t, torch._ops.OpOverload) for t in targets), targets
    with torch.no_grad():
        ref = model(x)
        assert close(lm.module(x), ref)
    g = lm.trace()
    plan = meshdl.manual_plan(g, grids=[(2, 2)])
    assert sum(len(s.tasks) for s in plan.stages) > len(plan.stages)
    assert close(meshdl.execute(plan, g, x), ref)
    # the decomposed (core ATen) form too: convolution, native batch norm, addmm ...
    core = ep.run_decompositions()
    g2 = meshdl.trace(core, SHAPE)
    assert close(meshdl.execute(meshdl.manual_plan(g2, grids=[(2, 1)]), g2, x), ref)


def test_zoo_with_weights_and_their_errors(tmp_path):
    ref_model = meshdl.models.build("tiny_cnn")
    with torch.no_grad():
        for p in ref_model.parameters():
            p.add_(0.01)
    state = ref_model.state_dict()
    path = tmp_path / "tiny.pth"
    torch.save(state, path)
    lm = meshdl.models.load("tiny_cnn", weights=path)
    x = torch.randn(lm.input_shape)
    with torch.no_grad():
        assert torch.equal(lm.module(x), ref_model(x))
    bad = dict(state)
    key = next(iter(bad))
    bad.pop(key)
    bad["extra.weight"] = torch.zeros(1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ModelError, match=r"missing key.*unexpected key"):
        meshdl.models.load("tiny_cnn", weights=tmp_path / "bad.pth")
    wrong = dict(state)
    wrong[key] = torch.zeros(2, 2)
    torch.save(wrong, tmp_path / "wrong.pth")
    with pytest.raises(ModelError, match="shape mismatch"):
        meshdl.models.load("tiny_cnn", weights=tmp_path / "wrong.pth")


def test_bad_files_name_the_file_and_the_op(tmp_path, branchy):
    _, path, _ = branchy
    data = path.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 3])
    (tmp_path / "text.onnx").write_text("not a model")
    (tmp_path / "cut.pt2").write_bytes(b"PK\x03\x04" + b"\0" * 50)
    for name in ("cut.onnx", "text.onnx", "cut.pt2"):
        with pytest.raises(ModelError, match=name):
            meshdl.models.load(tmp_path / name)
    import onnx
    from onnx import TensorProto, helper
    node = helper.make_node("NonMaxSuppression", ["x"], ["y"], name="nms_1")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 3, 8, 8])])
    onnx.save(helper.make_model(graph), tmp_path / "nms.onnx")
    with pytest.raises(ModelError, match=r"nms\.onnx.*nms_1.*NonMaxSuppression"):
        meshdl.models.load(tmp_path / "nms.onnx")


def test_free_input_size_needs_the_flag(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten()).eval()
    path = tmp_path / "free.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 20, 20),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}})
    with pytest.raises(ModelError, match="--input-size"):
        meshdl.models.load(path)
    lm = meshdl.models.load(path, input_size="24x30")
    assert lm.input_shape == (1, 1, 24, 30)
    x = torch.randn(1, 1, 24, 30)
    assert close(lm.module(x), ort_run(path, x))


def test_cli_infer_model_file_json_output(tmp_path, branchy):
    _, path, _ = branchy
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"name{i}" for i in range(10)))
    from meshdl.cli import main
    res = CliRunner().invoke(main, ["infer", "sample", "--model", str(path), "--in-process",
                                    "--grid", "2x2", "--labels", str(labels), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    assert len(out["output"]) == 10 and out["top5"][0]["label"].startswith("name")
    assert out["same_top1"] and out["relative_diff"] <= 1e-5
    lm = meshdl.models.load(path)
    x = lm.image(out["image"])
    assert close(torch.tensor(out["output"]).reshape(1, -1), ort_run(path, x))


def test_models_lists_cached_user_models_and_rm_frees_them(tmp_path, monkeypatch, branchy):
    from meshdl.cli import main
    from meshdl.models.store import ModelStore, package
    _, path, _ = branchy
    monkeypatch.setenv("MESHDL_CACHE_DIR", str(tmp_path / "cache"))
    pkg = package(meshdl.models.load(path))
    ModelStore().put_package(pkg)
    node = ModelStore(tmp_path / "cache" / "nodes" / "pi3")
    node.put_manifest(pkg.id, pkg.manifest)                 # a node holding part of it
    first = next(iter(pkg.blobs))
    node.put_tensor(first, pkg.blobs[first])
    runner = CliRunner()
    res = runner.invoke(main, ["models"])
    assert res.exit_code == 0, res.output
    assert "tiny_cnn" in res.output and pkg.id[:16] in res.output
    assert "node pi3" in res.output and f"1/{len(pkg.manifest['tensors'])}" in res.output
    total = sum(map(len, pkg.blobs.values()))
    assert ModelStore().bytes_held() == total
    res = runner.invoke(main, ["models", "rm", pkg.id[:8]])
    assert res.exit_code == 0, res.output
    assert ModelStore().bytes_held() == 0 and node.bytes_held() == 0
    assert ModelStore().entries() == [] and node.entries() == []
    res = runner.invoke(main, ["models", "rm", pkg.id[:8]])
    assert res.exit_code != 0 and "no cached model" in res.output


def test_channels_last_onnx_and_trace_of_a_loaded_model(tmp_path):
    """A TensorFlow-style N,H,W,C input: images are fed channels-last, sizes override H,W."""
    class NHWC(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return F.adaptive_avg_pool2d(F.relu(self.c(x.permute(0, 3, 1, 2))), 1).flatten(1)
    model = NHWC().eval()
    path = tmp_path / "nhwc.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 20, 24, 3),), str(path), dynamo=False,
                          input_names=["x"], dynamic_axes={"x": {1: "h", 2: "w"}})
    lm = meshdl.models.load(path, input_size="30x26")
    assert lm.input_shape == (1, 30, 26, 3) and len(lm.mean) == 3
    from meshdl.cli.infer_cmd import sample_image
    x = lm.image(sample_image())
    assert tuple(x.shape) == (1, 30, 26, 3)
    assert close(lm.module(x), ort_run(path, x)) and close(lm.module(x), model(x))
    g = meshdl.trace(lm)                     # a LoadedModel traces at its own shape
    assert g.input_shape == (1, 30, 26, 3)
