"""The `meshdl` command: version, zoo, in-process split inference, clear errors."""
from __future__ import annotations

import json

from click.testing import CliRunner

import meshdl
from meshdl.cli import main
from meshdl.imaging import synthetic_image


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_version_and_zoo():
    r = run("--version")
    assert r.exit_code == 0 and meshdl.__version__ in r.output
    r = run("models")
    assert r.exit_code == 0
    for name in ("vgg16_bn", "resnet18", "mobilenet_v2", "efficientnet_lite0", "tiny_cnn"):
        assert name in r.output


def test_infer_in_process_reports_top5_and_the_split_difference(tmp_path):
    img = tmp_path / "pic.png"
    synthetic_image(3, 64).save(img)
    r = run("infer", str(img), "--in-process", "--model", "tiny_cnn", "--grid", "2x2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert len(out["top5"]) == 5 and out["same_top1"] is True
    assert out["relative_diff"] <= 1e-4
    assert out["tasks"] > out["stages"]          # it really was split


def test_infer_in_process_plans_on_a_topology(tmp_path):
    img = tmp_path / "pic.png"
    synthetic_image(4, 64).save(img)
    r = run("infer", str(img), "--in-process", "--model", "tiny_cnn", "--topology", "home-4",
            "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["relative_diff"] <= 1e-4


def test_corrupt_image_and_bad_flags_get_clear_errors(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    r = CliRunner().invoke(main, ["infer", str(bad), "--in-process", "--model", "tiny_cnn"])
    assert r.exit_code == 2 and "broken.jpg" in r.output
    r = CliRunner().invoke(main, ["infer", str(tmp_path / "missing.jpg"), "--in-process"])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = CliRunner().invoke(main, ["infer", str(bad), "--model", "no_such_model"])
    assert r.exit_code == 2 and "unknown model" in r.output
    r = CliRunner().invoke(main, ["infer", str(bad), "--in-process", "--grid", "2by2",
                                  "--model", "tiny_cnn"])
    assert r.exit_code == 2 and "ROWSxCOLS" in r.output
