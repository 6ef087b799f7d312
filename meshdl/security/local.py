"""`meshdl mesh up --secure`: a whole secure mesh on this machine.

``prepare(mesh, devices, directory)`` reuses or creates the mesh authority and the
bundles it needs (one per device, one for the launcher's watcher, one for the
user's client), kept in ``<authority>/bundles`` (0700 dir, 0600 files).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from meshdl.security.authority import (Authority, default_dir, init_authority, private_dir,
                                       write_bundle)

WATCH = "mesh-up-watch"
USER = "me"


@dataclass(frozen=True)
class LocalMesh:
    authority: Authority
    devices: Mapping[str, Path]
    watch: Path
    client: Path


def prepare(mesh: str, profiles: Mapping[str, str], directory: str | Path | None = None
            ) -> LocalMesh:
    """``profiles``: device id -> profile name to enrol it with."""
    d = Path(directory) if directory else default_dir(mesh)
    a = Authority(d) if (d / "mesh.json").is_file() else init_authority(mesh, d)
    out = private_dir(a.dir / "bundles")

    def bundle(ident: str, role: str, profile: str | None = None) -> Path:
        path = out / f"{ident}.bundle"
        if not path.is_file():
            if ident in a.roster():
                raise FileNotFoundError(f"{ident} is enrolled in {a.dir} but its bundle "
                                        f"{path} is gone; use another --dir")
            write_bundle(a.issue(ident, role, profile), path)
        return path
    devices = {dev: bundle(dev, "device", prof) for dev, prof in sorted(profiles.items())}
    return LocalMesh(a, devices, bundle(WATCH, "client"), bundle(USER, "client"))
