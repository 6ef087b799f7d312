"""``meshdl infer``: classify images, split across the mesh (or in this process)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import click

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
    return [p]


def parse_grid(text: str | None):
    if not text:
        return None
    try:
        rows, cols = (int(v) for v in text.lower().split("x"))
        return rows, cols
    except ValueError:
        raise click.BadParameter(f"{text!r} is not ROWSxCOLS, e.g. 2x2") from None


def run_in_process(paths, model_name, weights, topology, strategy, grid, alpha, as_json, repeat):
    """Split inference inside this process: the same task and stitch code as the mesh."""
    import torch
    import meshdl
    from meshdl import imaging

    pretrained = model_name == "efficientnet_lite0" and weights is None
    model = meshdl.models.build(model_name, pretrained=pretrained, weights=weights)
    info = meshdl.models.info(model_name)
    g = meshdl.trace(model, info.input_shape, name=model_name)
    if grid:
        plan = meshdl.manual_plan(g, grids=[grid])
        how = f"manual {grid[0]}x{grid[1]} tiles"
    else:
        mesh = meshdl.load_topology(topology)
        plan = meshdl.plan(g, mesh, strategy=strategy, alpha=alpha)
        how = f"strategy {strategy} on {topology}"
    labels = imaging.imagenet_labels() if info.num_classes == 1000 else None
    prep = imaging.preprocess_for(model_name)
    results = []
    with click.progressbar(length=len(paths) * repeat, label="inferring",
                           hidden=len(paths) * repeat == 1 or as_json) as bar:
        for path in paths:
            x = imaging.load_image(path, size=info.input_shape[-1], preprocessing=prep)
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
                "image": str(path), "model": model_name, "plan": how,
                "tasks": sum(len(s.tasks) for s in plan.stages), "stages": len(plan.stages),
                "top5": [{"index": i, "label": lab, "p": round(p, 5)}
                         for i, lab, p in imaging.topk(y, 5, labels=labels)],
                "max_abs_diff_vs_unsplit": diff,
                "relative_diff": diff / max(ref.abs().max().item(), 1e-12),
                "same_top1": int(y.argmax()) == int(ref.argmax()),
                "split_s": min(times), "unsplit_s": t_ref,
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
              help="Model from the zoo (see `meshdl models`).")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="A state-dict file (torchvision layout) to load into the model.")
@click.option("--strategy", default="meshdl", show_default=True, help="Planning strategy.")
@click.option("--alpha", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="0 = minimum energy, 1 = minimum latency.")
@click.option("--in-process", is_flag=True,
              help="Split and run inside this process (no broker, no mesh).")
@click.option("--topology", default="home-4", show_default=True,
              help="With --in-process: the mesh to plan for.")
@click.option("--grid", default=None, help="With --in-process: hand-made ROWSxCOLS tiles.")
@click.option("--broker", default=None, help="Broker URL (default mqtt://127.0.0.1:1883).")
@click.option("--mesh", "mesh_name", default="default", show_default=True, help="Mesh name.")
@click.option("--repeat", type=click.IntRange(1, 10000), default=1, show_default=True)
@click.option("--timeout", type=float, default=60.0, show_default=True,
              help="Seconds before a job fails.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def infer(image, model_name, weights, strategy, alpha, in_process, topology, grid, broker,
          mesh_name, repeat, timeout, as_json):
    """Classify IMAGE (a file, a directory of images, or `sample` for a bundled photo):
    top-5 labels and timings."""
    import meshdl
    if model_name not in meshdl.models.names():
        raise click.BadParameter(f"unknown model {model_name!r}; choose one of "
                                 f"{', '.join(meshdl.models.names())}", param_hint="--model")
    paths = image_paths(image)
    if in_process:
        run_in_process(paths, model_name, weights, topology, strategy, parse_grid(grid),
                       alpha, as_json, repeat)
        return
    from meshdl.cli import infer_mesh
    infer_mesh.run(paths, model_name=model_name, weights=weights, strategy=strategy,
                   alpha=alpha, broker=broker, mesh_name=mesh_name, repeat=repeat,
                   timeout=timeout, as_json=as_json)
