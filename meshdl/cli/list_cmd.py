"""``meshdl topologies``, ``meshdl profiles``, ``meshdl strategies``: what ships, one line each."""
from __future__ import annotations

import json

import click


def _read(kind: str) -> list[tuple[str, dict]]:
    import yaml

    from meshdl.data import data_dir
    out = []
    for path in sorted(data_dir(kind).glob("*.yaml")):
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            data = {"description": f"(unreadable: {exc})"}
        out.append((path.stem, data if isinstance(data, dict) else {}))
    return out


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1]
                     for r in rows)


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def topologies(as_json: bool) -> None:
    """List the shipped mesh topologies (use a name with --topology or `meshdl mesh up`)."""
    items = []
    for name, d in _read("topologies"):
        devices = d.get("devices") or {}
        d_defaults = d.get("defaults") or {}
        items.append({"name": name, "devices": len(devices),
                      "source": d_defaults.get("source"), "sink": d_defaults.get("sink"),
                      "description": str(d.get("description") or "")})
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    rows = [["name", "devices", "description"]]
    rows += [[i["name"], str(i["devices"]), i["description"]] for i in items]
    click.echo(_table(rows))


def _gflops(v) -> str:
    try:
        return f"{float(v) / 1e9:.3g}"
    except (TypeError, ValueError):
        return "-"


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def profiles(as_json: bool) -> None:
    """List the shipped device profiles (use a name with `meshdl node start --profile`)."""
    items = [{"name": name, "gflops_per_s": d.get("flops") and float(d["flops"]) / 1e9,
              "memory_bytes": d.get("memory_bytes"),
              "description": str(d.get("description") or "")}
             for name, d in _read("nodes")]
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    rows = [["name", "GFLOP/s", "description"]]
    rows += [[i["name"], _gflops((i["gflops_per_s"] or 0) * 1e9) if i["gflops_per_s"] else "-",
              i["description"]] for i in items]
    click.echo(_table(rows))


@click.command()
def strategies() -> None:
    """List the planning strategies (use a name with --strategy)."""
    from meshdl.planner import describe, strategies as names
    desc = describe()
    rows = [["name", "what it does"]] + [[n, desc.get(n, "")] for n in names()]
    click.echo(_table(rows))
