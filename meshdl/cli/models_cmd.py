"""``meshdl models``: the model zoo and the cached user models; ``models rm ID``."""
from __future__ import annotations

import click


def flops_text(flops: float) -> str:
    """FLOPs with sensible digits at every scale (1 multiply-add = 2 FLOPs)."""
    for unit, scale in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if flops >= scale:
            return f"{flops / scale:7.4g} {unit}"
    return f"{flops:7.4g} FLOPs"


def bytes_text(n: float) -> str:
    for unit, scale in (("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:7.4g} {unit}"
    return f"{n:7.4g} B  "


@click.group(invoke_without_command=True)
@click.option("--trace", "do_trace", is_flag=True,
              help="Also trace each model (a few seconds each; progress on stderr): FLOPs "
              "(1 multiply-add = 2 FLOPs), weight size, ops, cut points.")
@click.pass_context
def models(ctx: click.Context, do_trace: bool) -> None:
    """List the model zoo, then the user models cached here (`meshdl models rm ID` frees
    one). Descriptions give multiply-adds as GMACs; --trace counts FLOPs (2 per
    multiply-add), the unit the planner and device profiles use."""
    if ctx.invoked_subcommand is not None:
        return
    from meshdl import models as zoo
    rows = []
    names = zoo.names()
    for k, name in enumerate(names, 1):
        info = zoo.info(name)
        extra = ""
        if do_trace:
            import meshdl
            click.echo(f"[{k}/{len(names)}] tracing {name} ...", err=True)
            g = meshdl.trace(zoo.build(name), info.input_shape, name=name)
            extra = (f"  {flops_text(g.flops)}  {bytes_text(g.weight_bytes)}  "
                     f"{len(g.ops):3d} ops  {len(g.cut_points):3d} cuts  "
                     f"tiled {100.0 * g.tiled_flops() / (g.flops or 1.0):5.1f}%")
            enders = sorted({f"{op.kind} ({op.reason})" for op in g.run_enders()
                             if op.reason != "global"})
            if enders:
                extra += "  whole: " + "; ".join(enders[:3])
        weights = "pretrained" if info.pretrained_available else "seeded init"
        rows.append(f"{name:20s} {str(tuple(info.input_shape)):18s} {weights:12s}{extra}"
                    f"  {info.description}")
    click.echo("\n".join(rows))
    _list_cached()


def _stores():
    """(label, ModelStore): this user's cache, then node caches on this machine."""
    from meshdl.models.store import ModelStore, cache_root
    root = cache_root()
    out = [("client", ModelStore(root))]
    nodes = root / "nodes"
    if nodes.is_dir():
        out += [(f"node {p.name}", ModelStore(p)) for p in sorted(nodes.iterdir())
                if p.is_dir()]
    return out


def _list_cached() -> None:
    from meshdl.models.store import cache_root
    rows = []
    for where, store in _stores():
        for e in store.entries():
            held = "all" if e.present == e.tensors else f"{e.present}/{e.tensors}"
            rows.append(f"{e.id[:16]}  {e.name[:20]:20s} {e.kind:4s} "
                        f"{e.bytes_held / 2**20:8.2f} MiB  tensors {held:9s} {where:14s} "
                        f"{e.origin}")
    click.echo(f"\ncached user models ({cache_root()}):")
    click.echo("\n".join(rows) if rows else "  none (run `meshdl infer IMAGE --model "
               "FILE.onnx`)")


@models.command("rm")
@click.argument("model_id")
def rm(model_id: str) -> None:
    """Remove cached model MODEL_ID (a unique prefix of its hash) and free the tensors no
    other cached model uses, from this user's cache and node caches on this machine."""
    from meshdl.errors import ModelError
    removed, freed = [], 0
    for where, store in _stores():
        before = store.bytes_held()
        try:
            ids = store.remove(model_id)
        except ModelError:
            continue
        freed += before - store.bytes_held()
        removed += [f"{i[:16]} ({where})" for i in ids]
    if not removed:
        raise ModelError(f"no cached model id starts with {model_id!r}; see `meshdl models`")
    click.echo(f"removed {', '.join(removed)}; freed {freed / 2**20:.2f} MiB")


from meshdl.cli.inspect_cmd import inspect as _inspect  # noqa: E402  (issue 9)

models.add_command(_inspect)
