"""``meshdl models``: the model zoo."""
from __future__ import annotations

import click


@click.command()
@click.option("--trace", "do_trace", is_flag=True,
              help="Also trace each model: ops, GFLOPs, cut points, spatial runs.")
def models(do_trace: bool) -> None:
    """List the model zoo."""
    from meshdl import models as zoo
    rows = []
    for name in zoo.names():
        info = zoo.info(name)
        extra = ""
        if do_trace:
            import meshdl
            g = meshdl.trace(zoo.build(name), info.input_shape, name=name)
            extra = (f"  {g.flops / 1e9:6.2f} GFLOPs  {g.weight_bytes / 2**20:7.1f} MiB  "
                     f"{len(g.ops):3d} ops  {len(g.cut_points):3d} cuts")
        weights = "pretrained" if info.pretrained_available else "seeded init"
        rows.append(f"{name:20s} {str(tuple(info.input_shape)):18s} {weights:12s}{extra}"
                    f"  {info.description}")
    click.echo("\n".join(rows))
