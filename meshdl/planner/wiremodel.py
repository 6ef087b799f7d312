"""What compressed pieces cost: the simulator's view of ``meshdl.wire.compress``.

``WireModel(mode, ratios)``: ``mode`` is the nodes' compression setting ("auto",
"off" or a codec name); ``ratios[pos]`` the measured raw/compressed ratio of the
tensor at graph position ``pos`` by codec (``measure_ratios``), the codec's typical
ratio where none was measured. For a piece of ``nbytes`` whose path's slowest hop
has ``bps``, ``cost`` gives the bytes on the wire and the codec's seconds (the same
choice the sender's ``CodecPolicy`` makes), so ``simulate(..., wire=model)`` predicts
a compressed run. Pure; ``measure_ratios`` alone runs the model (torch, lazily).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from meshdl.errors import PlanError
from meshdl.wire.compress import CODECS, MIN_BYTES, choose_codec


@dataclass(frozen=True)
class WireModel:
    mode: str = "auto"
    ratios: dict[int, dict[str, float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "off", *CODECS):
            raise PlanError(f"compression mode {self.mode!r}: use auto, off or one of "
                            f"{sorted(CODECS)}")

    def codec(self, pos: int, nbytes: int, bps: float) -> str | None:
        if self.mode == "off" or nbytes < MIN_BYTES:
            return None
        if self.mode != "auto":
            return self.mode
        return choose_codec(bps, self.ratios.get(pos), nbytes)

    def cost(self, pos: int, nbytes: int, bps: float) -> tuple[float, float]:
        """(bytes on the wire, codec seconds) of a piece of the tensor at ``pos``."""
        name = self.codec(pos, nbytes, bps)
        if name is None:
            return float(nbytes), 0.0
        c = CODECS[name]
        r = max(1.0, (self.ratios.get(pos) or {}).get(name, c.ratio))
        return nbytes / r, nbytes / c.compress_bps + nbytes / c.decompress_bps


def synthetic_input(shape: tuple[int, ...], seed: int = 0) -> Any:
    """A deterministic stand-in for a camera frame (smooth shapes, mild noise,
    ImageNet-normalised), for measuring ratios where no real frame is at hand."""
    import torch
    n, c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    yy = torch.linspace(0, 6.0, h).view(h, 1)
    xx = torch.linspace(0, 8.0, w).view(1, w)
    chans = [0.5 + 0.35 * torch.sin(xx * (1 + k * 0.3) + k) * torch.cos(yy * (1.2 - k * 0.2))
             for k in range(c)]
    img = torch.stack(chans).unsqueeze(0).expand(n, c, h, w).clone()
    img += 0.03 * torch.randn(img.shape, generator=g)
    return (img.clamp(0, 1) - 0.45) / 0.225


def measure_ratios(graph: Any, x: Any, codecs: tuple[str, ...] | None = None,
                   sample_bytes: int = 1 << 18) -> dict[int, dict[str, float]]:
    """Compression ratio of every tensor a plan may send (the input, every cut point
    and the output) for input ``x``, by codec: run the model range by range. Each
    tensor's ratio is measured on its first ``sample_bytes`` (whole items; activations
    are alike throughout, and a planner cannot wait for megabytes to compress)."""
    import numpy as np
    import torch

    from meshdl.wire.compress import compress
    names = codecs or tuple(sorted(CODECS))
    out: dict[int, dict[str, float]] = {}
    positions = list(graph.positions)
    t = torch.as_tensor(x)
    with torch.no_grad():
        for k, pos in enumerate(positions):
            if k > 0:
                t = graph.run_range(positions[k - 1], pos, t)
            arr = np.ascontiguousarray(t.detach().numpy())
            raw = memoryview(arr.reshape(-1).view(np.uint8))
            if len(raw) == 0:
                continue
            raw = raw[:max(arr.itemsize, sample_bytes - sample_bytes % arr.itemsize)]
            out[pos] = {n: len(raw) / max(1, len(compress(raw, arr.itemsize, n)))
                        for n in names}
    return out


__all__ = ["WireModel", "measure_ratios", "synthetic_input"]
