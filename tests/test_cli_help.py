"""The CLI explains itself: help on every option, the shipped registries listed, bad
input refused before anything starts, one alpha default, plan output as asked."""
from __future__ import annotations

import time

import click
import pytest
from click.testing import CliRunner

from meshdl.cli import main
from meshdl.cli.options import DEFAULT_ALPHA, shipped
from meshdl.imaging import synthetic_image


def run(*args, **kw):
    return CliRunner().invoke(main, list(args), catch_exceptions=False, **kw)


def commands(group: click.Group, prefix=()):
    ctx = click.Context(group)
    for name in group.list_commands(ctx):
        cmd = group.get_command(ctx, name)
        yield prefix + (name,), cmd
        if isinstance(cmd, click.Group):
            yield from commands(cmd, prefix + (name,))


def test_every_option_of_every_command_has_help():
    missing = []
    for path, cmd in commands(main):
        assert cmd.help, f"meshdl {' '.join(path)} has no help text"
        for p in cmd.params:
            if isinstance(p, click.Option) and not p.help:
                missing.append(f"meshdl {' '.join(path)} {p.opts[0]}")
    assert not missing, f"options without help: {missing}"


def test_choices_and_shipped_names_are_in_the_help():
    import meshdl
    h = run("infer", "--help").output
    for s in meshdl.strategies():
        assert s in h
    for t in shipped("topologies"):
        assert t in " ".join(h.split()).replace("- ", "-")
    assert "embedded" in h and "Leave it out" in h           # leaving out --broker
    for opt in ("--username", "--password", "--password-file", "--tls-ca", "--repeat"):
        assert opt in h
    h = run("plan", "show", "--help").output
    assert "-o, --output" in h and "required" not in h.lower()
    h = run("mesh", "status", "--help").output
    for opt in ("--broker", "--mesh", "--username", "--tls-ca", "--protocol", "--json"):
        assert opt in h


def test_topologies_and_profiles_list_what_ships_with_descriptions():
    import yaml

    from meshdl.data import data_dir
    for cmd, kind in (("topologies", "topologies"), ("profiles", "nodes")):
        r = run(cmd)
        assert r.exit_code == 0
        names = shipped(kind)
        assert len(names) >= 5
        for name in names:
            desc = yaml.safe_load((data_dir(kind) / f"{name}.yaml").read_text())["description"]
            line = next(ln for ln in r.output.splitlines() if ln.split()[0] == name)
            assert desc in line
    r = run("strategies")
    assert "meshdl" in r.output and "disnet" in r.output


def test_one_alpha_default_everywhere():
    seen = {}
    for path, cmd in commands(main):
        for p in cmd.params:
            if p.name == "alpha":
                seen[" ".join(path)] = p.default
    assert {"infer", "plan show", "node start"} <= set(seen)
    assert set(seen.values()) == {DEFAULT_ALPHA}


def test_bad_input_is_refused_before_anything_starts(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    t0 = time.monotonic()
    r = run("infer", str(empty), "--model", "tiny_cnn")
    assert r.exit_code == 2 and "is empty" in r.output
    r = run("infer", "sample", "--strategy", "bogus")
    assert r.exit_code == 2 and "bogus" in r.output and "meshdl" in r.output
    r = run("infer", "sample", "--model", "bogus")
    assert r.exit_code == 2 and "unknown model" in r.output
    r = run("infer", "sample", "--grid", "2x2")
    assert r.exit_code == 2 and "--grid works only with --in-process" in r.output
    r = run("infer", "sample", "--topology", "home-4")
    assert r.exit_code == 2 and "--in-process" in r.output
    r = run("infer", "sample", "--in-process", "--grid", "0x2", "--model", "tiny_cnn")
    assert r.exit_code == 2 and "at least 1" in r.output
    # none of these started a broker or a mesh: they fail in parse/validation time
    assert time.monotonic() - t0 < 60


def test_a_grid_larger_than_the_map_says_it_shrank(tmp_path):
    img = tmp_path / "pic.png"
    synthetic_image(3, 64).save(img)
    r = run("infer", str(img), "--in-process", "--model", "tiny_cnn", "--grid", "300x300")
    assert r.exit_code == 0
    assert "300x300 grid does not fit" in r.output and "shrank" in r.stdout


def test_untrained_models_warn_that_labels_are_meaningless(tmp_path):
    img = tmp_path / "pic.png"
    synthetic_image(3, 64).save(img)
    r = run("infer", str(img), "--in-process", "--model", "tiny_chain")
    assert r.exit_code == 0 and "labels are meaningless" in r.stderr
    assert "labels are meaningless" not in r.stdout


def test_models_say_flops_with_sensible_digits():
    from meshdl.cli.models_cmd import flops_text
    assert flops_text(30.96e9).strip() == "30.96 GFLOPs"
    assert flops_text(183_000).strip() == "183 kFLOPs"
    r = run("models")
    assert "15.5 GFLOPs" not in r.output and "GMACs" in r.output


def test_compare_shows_the_objective_and_meshdl_wins_at_the_default_alpha():
    r = run("plan", "show", "--topology", "home-4", "--model", "tiny_cnn", "--compare")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert f"objective at alpha={DEFAULT_ALPHA:g}" in lines[0]
    obj = {}
    for ln in lines[2:]:
        cells = ln.split()
        if cells and cells[1] != "skipped" and len(cells) >= 8 and cells[0] != "objective":
            obj[cells[0]] = float(cells[-2] if cells[-1] == "*" else cells[-1])
    assert obj["local"] == pytest.approx(1.0)
    best = min(obj.values())
    assert obj["meshdl"] <= best * 1.05          # best or within 5% of the exhaustive optimum
    assert obj["meshdl"] < obj["disnet"] and obj["meshdl"] < obj["modnn"]


def test_plan_picture_colours_every_stage_a_device_runs(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Wedge

    import meshdl
    from meshdl.planner.report import _draw, _layout
    g = meshdl.trace(meshdl.models.build("tiny_cnn"), (1, 3, 32, 32))
    mesh = meshdl.load_topology("home-4")
    plan = meshdl.manual_plan(g, cuts=[3, 7], grids=[(2, 2), (1, 1), (1, 1)])
    devs = sorted(mesh.devices)
    # a hand-placed plan where one device runs several stages
    for s, stage in enumerate(plan.stages):
        for k, t in enumerate(stage.tasks):
            t.device = devs[(s + k) % len(devs)]
    plan.source = plan.sink = devs[0]
    fig, ax = plt.subplots()
    _draw(ax, plan, mesh, _layout(mesh), None)
    wedges = [p for p in ax.patches if isinstance(p, Wedge)]
    runs = {d: {t.stage for t in plan.tasks() if t.device == d} for d in devs}
    assert len(wedges) == sum(len(v) for v in runs.values())
    faces = {tuple(w.get_facecolor()) for w in wedges}
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert any(lb.startswith("source") for lb in labels)
    assert any(lb.startswith("sink") for lb in labels)
    stage_entries = [h for h, lb in zip(legend.legend_handles, labels) if lb.startswith("stage")]
    assert len(stage_entries) == len(plan.stages)
    for h in stage_entries:                 # every legend colour is drawn somewhere
        assert tuple(matplotlib.colors.to_rgba(h.get_color())) in faces
    plt.close(fig)
    out = tmp_path / "exact.png"
    r = run("plan", "show", "--topology", "home-4", "--model", "tiny_cnn", "-o", str(out))
    assert r.exit_code == 0 and out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exact.png"]
