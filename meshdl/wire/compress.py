"""Lossless compression of tensor pieces, chosen per link.

Codecs (the frame header's ``"z"`` field names the one used; no field = raw bytes):

- ``"zstd"``: byte-shuffle (bytes of equal significance grouped, so the zero high
  bytes of post-ReLU activations and small ints form long runs) + zstd level 1, in
  one call to blosc2 (SIMD shuffle). Best ratio on activations (1.6-1.8x on
  resnet18's post-ReLU maps, ~300 MB/s to compress, ~500-800 MB/s to decompress).
- ``"lz4"``: plain LZ4 block (ratio ~1.4x, ~500-900 MB/s / 2-3 GB/s).

Measured on this machine (tools/bench_stream.py prints the figures); see
``CODECS``. Compression pays when the link is slower than the codec:
``choose_codec`` compares ``n / bw`` (raw) with ``n / compress + n / (ratio * bw)
+ n / decompress`` for each codec and returns the fastest, ``None`` (raw) on fast
links. A compressed chunk that does not shrink travels raw.

Decompression is bounded: the receiver knows from the header how many bytes the
chunk must hold (at most ``MAX_FRAME_BYTES``) and refuses a stream that claims or
produces any other size (a decompression bomb is a ``WireError``, never a large
allocation). Pure functions; no I/O.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from meshdl.errors import WireError

MIN_BYTES = 4096            # smaller chunks travel raw: header and call overhead win
MIN_GAIN = 1.05             # a codec whose measured ratio is below this is not worth it


@dataclass(frozen=True)
class Codec:
    """Speeds in bytes of raw tensor per second (this machine, one thread); ``ratio``:
    the typical raw/compressed ratio on CNN activations, used until a tensor's own
    ratio has been measured."""

    name: str
    compress_bps: float
    decompress_bps: float
    ratio: float


CODECS: dict[str, Codec] = {
    "zstd": Codec("zstd", 300e6, 500e6, 1.65),
    "lz4": Codec("lz4", 600e6, 2000e6, 1.40),
}


def codec_names() -> list[str]:
    return sorted(CODECS)


def check_codec(name: Any) -> str:
    if name not in CODECS:
        raise WireError(f"unknown compression codec {name!r}; use one of {codec_names()} "
                        "or none")
    return name


# ------------------------------------------------------------------ policy (pure)
def transfer_s(nbytes: int, bandwidth_bps: float, codec: str | None,
               ratio: float | None = None) -> float:
    """Seconds to move ``nbytes`` of tensor over a link of ``bandwidth_bps`` (bit/s)
    with ``codec`` (None: raw), codec time on both ends included."""
    if codec is None or nbytes < MIN_BYTES:
        return nbytes * 8.0 / bandwidth_bps
    c = CODECS[check_codec(codec)]
    r = max(1.0, ratio if ratio is not None else c.ratio)
    return (nbytes / c.compress_bps + nbytes * 8.0 / (r * bandwidth_bps)
            + nbytes / c.decompress_bps)


def choose_codec(bandwidth_bps: float, ratios: dict[str, float] | None = None,
                 nbytes: int = 1 << 20, allowed: tuple[str, ...] | None = None
                 ) -> str | None:
    """The codec that moves ``nbytes`` fastest over a link of ``bandwidth_bps``, or
    None when raw bytes are fastest (fast links). ``ratios``: measured ratios by codec
    name (for this tensor); codecs measured below ``MIN_GAIN`` are skipped."""
    if nbytes < MIN_BYTES or bandwidth_bps <= 0:
        return None
    best, best_s = None, nbytes * 8.0 / bandwidth_bps
    for name in (allowed if allowed is not None else codec_names()):
        r = (ratios or {}).get(name)
        if r is not None and r < MIN_GAIN:
            continue
        s = transfer_s(nbytes, bandwidth_bps, name, r)
        if s < best_s:
            best, best_s = name, s
    return best


class RatioLog:
    """Measured compression ratio per (key, codec), as an exponential average: the
    sender's knowledge of each tensor's compressibility. Keys are the caller's (e.g.
    the producing task). Bounded: the oldest keys are forgotten past ``limit``."""

    def __init__(self, limit: int = 4096, weight: float = 0.3) -> None:
        self._r: dict[tuple[str, str], float] = {}
        self.limit, self.weight = limit, weight

    def record(self, key: str, codec: str, raw: int, wire: int) -> None:
        if raw <= 0 or wire <= 0:
            return
        r = raw / wire
        old = self._r.pop((key, codec), None)
        self._r[(key, codec)] = r if old is None else old + self.weight * (r - old)
        while len(self._r) > self.limit:
            self._r.pop(next(iter(self._r)))

    def ratios(self, key: str) -> dict[str, float]:
        return {c: r for (k, c), r in self._r.items() if k == key}


class CodecPolicy:
    """A sender's per-link choice: ``mode`` "auto" (``choose_codec`` with the ratios
    measured so far for the tensor's ``key``), "off", or a codec name (always, for
    pieces of at least ``MIN_BYTES``). Counts the tensor bytes sent and the bytes they
    took on the wire."""

    def __init__(self, mode: str = "auto") -> None:
        if mode not in ("auto", "off", *CODECS):
            raise WireError(f"compression mode {mode!r}: use auto, off or one of "
                            f"{codec_names()}")
        self.mode = mode
        self.log = RatioLog()
        self.raw_bytes = 0
        self.wire_bytes = 0

    def choose(self, key: str, nbytes: int, bandwidth_bps: float) -> str | None:
        if self.mode == "off" or nbytes < MIN_BYTES:
            return None
        if self.mode != "auto":
            return self.mode
        return choose_codec(bandwidth_bps, self.log.ratios(key), nbytes)

    def record(self, key: str, codec: str | None, frames: Any) -> None:
        raw = sum(f.raw for f in frames)
        wire = sum(f.data.nbytes for f in frames)
        self.raw_bytes += raw
        self.wire_bytes += wire
        if codec is not None:
            self.log.record(key, codec, raw, wire)


# ------------------------------------------------------------------ codecs
def compress(data: Any, itemsize: int, codec: str) -> bytes:
    """Compressed bytes of ``data`` (a bytes-like object of whole ``itemsize`` items)."""
    check_codec(codec)
    view = memoryview(data).cast("B")
    if codec == "lz4":
        import lz4.block
        return lz4.block.compress(view, store_size=False)
    import blosc2
    return blosc2.compress2(view, typesize=max(1, min(int(itemsize), 255)), clevel=1,
                            codec=blosc2.Codec.ZSTD, filter=blosc2.Filter.SHUFFLE,
                            nthreads=1)


def decompress(data: Any, codec: str, expect: int) -> bytes | bytearray:
    """The ``expect`` raw bytes of a compressed chunk. Anything that claims or yields
    another size, or does not decode, is a WireError (bounded: never allocates more
    than ``expect`` bytes plus the codec's constant overhead)."""
    check_codec(codec)
    view = memoryview(data).cast("B")
    if expect < 0:
        raise WireError(f"negative decompressed size {expect}")
    try:
        if codec == "lz4":
            import lz4.block
            out = lz4.block.decompress(view, uncompressed_size=expect) if expect else b""
        else:
            import blosc2
            nbytes, cbytes, _ = blosc2.get_cbuffer_sizes(view)
            if nbytes != expect or cbytes != len(view):
                raise WireError(f"zstd chunk claims {nbytes} raw / {cbytes} packed bytes, "
                                f"the frame says {expect} / {len(view)}: refused")
            out = bytearray(expect)
            if expect:
                blosc2.decompress2(view, dst=out)
    except WireError:
        raise
    except Exception as exc:            # the codecs raise assorted errors on bad input
        raise WireError(f"{codec} chunk does not decompress: {exc}") from None
    if len(out) != expect:
        raise WireError(f"{codec} chunk decompressed to {len(out)} bytes, the frame says "
                        f"{expect}: refused")
    return out


__all__ = ["CODECS", "Codec", "CodecPolicy", "RatioLog", "check_codec", "choose_codec", "codec_names",
           "compress", "decompress", "transfer_s"]
