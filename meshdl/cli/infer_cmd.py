"""``meshdl infer``: classify images, split across the mesh (or in this process)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

from meshdl.cli.options import (bundle_option, DEFAULT_BROKER, alpha_option, broker_options, connection,
                                fail_fast_if_refused, require_live_mesh,
                                strategy_option, topology_help)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def sample_image() -> Path:
    """A photo that ships with an installed package (matplotlib's Grace Hopper)."""
    import matplotlib.cbook
    return Path(matplotlib.cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))


def image_paths(target: str) -> list[Path]:
    """A file, the images of a directory (sorted), or ``sample`` (a bundled photo)."""
    from meshdl.errors import ImageError
    if target == "sample" and not Path(target).exists():
        return [sample_image()]
    p = Path(target)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageError(f"directory {p} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files
    if not p.exists():
        raise ImageError(f"image {p} does not exist; give a path to a .jpg/.png file or a "
                         "directory of images")
    if p.stat().st_size == 0:
        raise ImageError(f"image {p} is empty (0 bytes); give a JPEG/PNG file")
    return [p]


def stream_paths(target: str) -> list[Path]:
    """The frames of ``--stream``: a directory's images or a glob's, in name order.
    (Video files need a decoder meshdl does not ship; extract frames to images first.)"""
    import glob
    from meshdl.errors import ImageError
    if any(ch in target for ch in "*?[") and not Path(target).exists():
        files = sorted(Path(f) for f in glob.glob(target)
                       if Path(f).suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ImageError(f"no images match {target!r}")
        return files
    p = Path(target)
    if p.is_file() and p.suffix.lower() not in IMAGE_SUFFIXES:
        raise ImageError(f"{p} is not an image; --stream takes a directory of frames or a "
                         "glob ('frames/*.jpg'). Video files need a decoder meshdl does not "
                         "ship: extract frames first (e.g. ffmpeg -i in.mp4 frames/%05d.jpg)")
    return image_paths(target)


def parse_grid(text: str | None):
    if not text:
        return None
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not ROWSxCOLS, e.g. 2x2",
                                 param_hint="--grid") from None
    if rows < 1 or cols < 1:
        raise click.BadParameter(f"{text!r}: rows and columns must be at least 1",
                                 param_hint="--grid")
    return rows, cols


def check_model(model_name: str) -> None:
    """Refuse an unknown model before anything starts (a zoo name or a model file)."""
    import meshdl
    from meshdl.models.files import is_model_file
    if model_name not in meshdl.models.names() and not is_model_file(model_name):
        raise click.BadParameter(f"unknown model {model_name!r}; choose one of "
                                 f"{', '.join(meshdl.models.names())} (`meshdl models`), or "
                                 "give a model file (.onnx, .pt2)", param_hint="--model")


def warn_untrained(model_name: str, weights) -> None:
    """Random weights give meaningless labels: say so before the user reads them."""
    import meshdl
    if model_name not in meshdl.models.names():
        return          # a model file holds its own weights
    info = meshdl.models.info(model_name)
    if weights is None and not info.pretrained_available:
        click.secho(f"warning: {model_name} has no pretrained weights here (seeded random "
                    "initialisation): its labels are meaningless. The split is still exact; "
                    "for real labels use efficientnet_lite0 or load weights "
                    "(--weights FILE).", fg="yellow", err=True)


def load_model(model_name, weights, input_size=None, labels=None, mean=None, std=None):
    """The model ``--model`` names (zoo name or .onnx/.pt2 file) with the user's flags."""
    import meshdl
    return meshdl.models.load(model_name, weights=weights, input_size=input_size,
                              labels=labels, mean=mean, std=std)


def run_in_process(paths, lm, topology, strategy, grid, alpha, as_json, repeat):
    """Split inference inside this process: the same task and stitch code as the mesh.
    ``lm`` is a ``meshdl.models.LoadedModel``."""
    import torch
    import meshdl

    model = lm.module
    g = lm.trace()
    if grid:
        plan = meshdl.manual_plan(g, grids=[grid])
        how = f"manual {grid[0]}x{grid[1]} tiles"
        for note in plan.notes:         # e.g. a grid larger than the map shrank to fit
            click.secho(f"note: {note}", fg="yellow", err=True)
        if any("does not fit" in n for n in plan.notes):
            how += " (shrank to fit the feature map)"
    else:
        mesh = meshdl.load_topology(topology)
        plan = meshdl.plan(g, mesh, strategy=strategy, alpha=alpha)
        how = f"strategy {strategy} on {topology}"
    results = []
    with click.progressbar(length=len(paths) * repeat, label="inferring",
                           hidden=len(paths) * repeat == 1 or as_json) as bar:
        for path in paths:
            x = lm.image(path)
            with torch.no_grad():
                t0 = time.perf_counter()
                ref = model(x)
                t_ref = time.perf_counter() - t0
                times = []
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    y = meshdl.execute(plan, g, x)
                    times.append(time.perf_counter() - t0)
                    bar.update(1)
            diff = (y - ref).abs().max().item()
            results.append({
                "image": str(path), "model": lm.name, "plan": how,
                "tasks": sum(len(s.tasks) for s in plan.stages), "stages": len(plan.stages),
                "top5": [{"index": i, "label": lab, "p": round(p, 5)}
                         for i, lab, p in lm.topk(y, 5)],
                "max_abs_diff_vs_unsplit": diff,
                "relative_diff": diff / max(ref.abs().max().item(), 1e-12),
                "same_top1": int(y.argmax()) == int(ref.argmax()),
                "split_s": min(times), "unsplit_s": t_ref,
                "output": [float(v) for v in y.detach().reshape(-1).tolist()],
            })
    if as_json:
        click.echo(json.dumps(results if len(results) > 1 else results[0], indent=2))
        return
    for r in results:
        click.secho(f"{r['image']}  ({r['model']}, {r['plan']}: {r['stages']} stages, "
                    f"{r['tasks']} tasks, in-process)", bold=True)
        for k, t in enumerate(r["top5"], 1):
            click.echo(f"  {k}. {t['label']:40s} {t['p'] * 100:6.2f}%")
        ok = "same top-1" if r["same_top1"] else "TOP-1 DIFFERS"
        click.echo(f"  largest |split - unsplit| = {r['max_abs_diff_vs_unsplit']:.3g} "
                   f"({r['relative_diff']:.2g} of max |output|, {ok}); "
                   f"split {r['split_s'] * 1e3:.1f} ms vs unsplit {r['unsplit_s'] * 1e3:.1f} ms")


@click.command()
@click.argument("image", type=str)
@click.option("--model", "model_name", default="efficientnet_lite0", show_default=True,
              help="A zoo model (`meshdl models`; only efficientnet_lite0 ships pretrained "
              "weights, the others have seeded random weights) or a model file: .onnx, or "
              ".pt2 (torch.export.save).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="A state-dict file (torchvision layout) to load into the zoo model.")
@click.option("--input-size", default=None, metavar="HxW",
              help="Input height x width when the model file does not fix it.")
@click.option("--labels", "labels_file", type=click.Path(dir_okay=False), default=None,
              help="Class names, one per line (or a JSON list); default: the file's "
              "metadata, else class indices.")
@click.option("--mean", default=None, metavar="M1,M2,M3",
              help="Per-channel mean of [0, 1] pixels (default: metadata, else ImageNet).")
@click.option("--std", default=None, metavar="S1,S2,S3",
              help="Per-channel std (default: metadata, else ImageNet).")
@strategy_option()
@alpha_option
@click.option("--in-process", is_flag=True,
              help="Split and run inside this process (no broker, no mesh) and show the "
              "difference from the unsplit model.")
@click.option("--topology", default="home-4", show_default=True,
              help=topology_help("With --in-process: the mesh to plan for."))
@click.option("--grid", default=None, help="With --in-process: hand-made ROWSxCOLS tiles of "
              "one stage instead of a planned split (a grid larger than the feature map "
              "shrinks to fit, with a note).")
@broker_options(default=None, broker_help=(
    "Broker URL of a running mesh (mqtt://host:port or mqtts://). Leave it out to start an "
    "embedded default: a local broker with random credentials plus an emulated home-wifi mesh, "
    "removed at exit. A mesh already at mqtt://127.0.0.1:1883 is used only when "
    "--username/--password are given."))
@bundle_option("client")
@click.option("--repeat", type=click.IntRange(1, 10000), default=1, show_default=True,
              help="Run each image this many times; report the median latency.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True, help="Seconds before a job fails.")
@click.option("--json", "as_json", is_flag=True,
              help="Machine-readable output: top-5 and the full output vector (`output`).")
@click.option("--stream", "as_stream", is_flag=True,
              help="Treat the images (a directory or a glob such as 'frames/*.jpg', in name "
              "order) as a stream: several frames in flight on one plan (objective "
              "throughput), answers in order, frames/s shown live.")
@click.option("--fps", type=click.FloatRange(min=0, min_open=True), default=None,
              help="With --stream: feed frames at this rate (a camera); default: as fast "
              "as the mesh takes them.")
@click.option("--window", type=click.IntRange(1, 64), default=None,
              help="With --stream: frames in flight at most (default: from the plan).")
@click.option("--objective", type=click.Choice(["latency", "energy", "throughput"]),
              default=None, help="What the mesh plans for (default: throughput with "
              "--stream, else the --alpha mix).")
def infer(image, model_name, weights, input_size, labels_file, mean, std, strategy, alpha, in_process, topology, grid, broker,
          mesh_name, username, password, password_file, tls_ca, bundle, repeat, timeout, as_json,
          as_stream, fps, window, objective):
    """Classify IMAGE (a file, a directory of images, or `sample` for a bundled photo):
    top-5 labels and timings.

    Without --broker (and without --in-process) an embedded mesh starts: a local broker
    and one emulated node process per device of home-wifi; everything it starts stops with
    this command (also on Ctrl-C, SIGTERM or a closed terminal).
    """
    ctx = click.get_current_context()
    if not in_process:
        for name, value in (("--grid", grid),):
            if value is not None:
                raise click.UsageError(f"{name} works only with --in-process")
        if ctx.get_parameter_source("topology") == click.core.ParameterSource.COMMANDLINE:
            raise click.UsageError("--topology works only with --in-process (a mesh plans "
                                   "on its live members)")
    if not as_stream:
        for name, value in (("--fps", fps), ("--window", window)):
            if value is not None:
                raise click.UsageError(f"{name} works only with --stream")
    elif in_process:
        raise click.UsageError("--stream runs on a mesh; leave out --in-process")
    grid_rc = parse_grid(grid)
    paths = stream_paths(image) if as_stream else image_paths(image)
    if broker is not None and not in_process and not bundle:
        # before torch loads: a dead address or a mesh with no live member fails in ~1 s
        early = connection(broker, username, password, password_file, tls_ca)
        fail_fast_if_refused(early.url)
        require_live_mesh(early, mesh_name)
    check_model(model_name)
    warn_untrained(model_name, weights)
    if in_process:
        lm = load_model(model_name, weights, input_size, labels_file, mean, std)
        run_in_process(paths, lm, topology, strategy, grid_rc, alpha, as_json, repeat)
        return
    from meshdl.cli import infer_mesh
    conn = None if (broker, username, password, password_file, tls_ca) == (None,) * 5 \
        else connection(broker or DEFAULT_BROKER, username, password,
                                              password_file, tls_ca)
    if bundle:                                  # a secure mesh (meshdl.security)
        from dataclasses import replace as _replace

        from meshdl.cli.options import Connection, bundle_identity
        from meshdl.security.bundle import Bundle
        mesh_name = bundle_identity(Bundle.load(bundle), None, mesh_name)[1]
        conn = _replace(conn, bundle=bundle) if conn else \
            Connection("mqtts://127.0.0.1:8883", bundle=bundle)
    infer_mesh.run(paths, model_name=model_name, weights=weights,
                   model_opts=dict(input_size=input_size, labels=labels_file, mean=mean,
                                   std=std), strategy=strategy,
                   alpha=alpha, conn=conn, explicit=broker is not None or bool(bundle), mesh_name=mesh_name,
                   repeat=repeat, timeout=timeout, as_json=as_json,
                   stream=dict(fps=fps, window=window) if as_stream else None,
                   objective=objective or ("throughput" if as_stream else None))
