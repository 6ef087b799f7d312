"""Data-plane frames: tensor pieces (msgpack header + raw bytes), acks and credits.

Layout of a piece frame (DESIGN section 5)::

    msgpack map {"v": 1, "type": "piece", "job", "piece", "src", "dst", "term", "seq",
                 "region": [n, c, h0, h1, w0, w1] | None, "dtype", "shape",
                 "chunk": [i, n], "off", "cs", "crc", "pad"[, "z": codec]}
    `pad` zero bytes (so the data starts 16-byte aligned)
    raw C-order little-endian tensor bytes (this chunk's slice), or with "z" that
    slice compressed losslessly by the named codec (:mod:`meshdl.wire.compress`)

A tensor larger than ``chunk_bytes`` travels as several frames; chunk ``i`` of
``n`` carries bytes ``[off, off + len)`` of the tensor, ``off == i * cs``.
``crc`` is the CRC-32 of this frame's data bytes (as sent: compressed with "z"); a
compressed chunk is decompressed at decode to exactly its raw size, or refused. Decoding reads only the header
(``msgpack.Unpacker``) and wraps the rest with ``np.frombuffer``: no copy.

Acks and credits are plain msgpack maps and may travel back along route topics.
Control-plane messages live in :mod:`meshdl.wire.control`; ``decode_control`` is
re-exported here. Every decoder raises :class:`WireError` and nothing else.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from math import prod
from typing import Any, ClassVar, Iterator, Union

import msgpack
import numpy as np

from meshdl.errors import WireError
from meshdl.wire.compress import check_codec, compress, decompress
from meshdl.wire.control import decode_control, encode_control  # noqa: F401 (re-export)
from meshdl.wire.topics import validate_id

VERSION = 1
CHUNK_BYTES = 1 << 20
MAX_FRAME_BYTES = 64 << 20
MAX_TENSOR_BYTES = 1 << 31
MAX_HEADER_BYTES = 4096
MAX_NDIM = 8
MAX_DIM = 1 << 31
ALIGN = 16
MAX_ACK_BATCH = 64
try:                     # same CRC-32 as zlib, ~6x faster where ISA-L is installed
    from isal.isal_zlib import crc32 as _crc32
except ImportError:      # pragma: no cover - depends on the environment
    _crc32 = zlib.crc32
DTYPES = frozenset({"float16", "float32", "float64", "int8", "uint8", "int16",
                    "int32", "int64", "bool"})


# ------------------------------------------------------------------ frames
@dataclass(frozen=True)
class PieceFrame:
    """One chunk of a tensor piece. ``data`` is a read-only view of this chunk's bytes."""

    TYPE: ClassVar[str] = "piece"
    job: str
    piece: str
    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    region: tuple[int, ...] | None = None
    src_task: str = ""
    dst_task: str = ""
    term: int = 0
    seq: int = 0
    chunk: int = 0
    nchunks: int = 1
    offset: int = 0
    chunk_size: int = 0
    crc: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor (all chunks)."""
        return prod(self.shape) * np.dtype(self.dtype).itemsize

    @property
    def complete(self) -> bool:
        return self.nchunks == 1

    def tensor(self) -> np.ndarray:
        """The tensor of a single-chunk frame, as a zero-copy read-only array."""
        if not self.complete:
            raise WireError(f"piece {self.job}/{self.piece} is chunk {self.chunk + 1} of "
                            f"{self.nchunks}; feed it to a Reassembler")
        arr = np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<"))
        arr = arr.reshape(self.shape)
        return arr if arr.flags.aligned else arr.copy()


@dataclass(frozen=True)
class AckFrame:
    """End-to-end acknowledgement of a piece by its consumer.

    ``chunks`` lists received chunk indices when ``ok`` is False (a selective
    ack asking for the rest); empty with ``ok`` True means all of them arrived.
    ``more`` (``ok`` True only): further pieces of the same job, sender and route
    that this one frame acknowledges too (a batch; at most ``MAX_ACK_BATCH``).
    ``credit``: the bytes ``node`` grants this sender to have unacked in flight to it
    from now on (None: no change; ``meshdl.node.credit``)."""

    TYPE: ClassVar[str] = "ack"
    job: str
    piece: str
    node: str
    term: int = 0
    seq: int = 0
    ok: bool = True
    chunks: tuple[int, ...] = ()
    more: tuple[str, ...] = ()
    credit: int | None = None

    @property
    def pieces(self) -> tuple[str, ...]:
        return (self.piece, *self.more)


@dataclass(frozen=True)
class CreditFrame:
    """Flow control: ``node`` grants its sender ``credits`` more chunks for ``job``."""

    TYPE: ClassVar[str] = "credit"
    node: str
    credits: int
    job: str = ""
    term: int = 0


Frame = Union[PieceFrame, AckFrame, CreditFrame]


# ------------------------------------------------------------------ encoding
def _as_bytes_view(array: np.ndarray) -> tuple[memoryview, str]:
    arr = np.asarray(array)
    name = arr.dtype.name
    if name not in DTYPES:
        raise WireError(f"dtype {arr.dtype} cannot travel; use one of {sorted(DTYPES)}")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    return memoryview(arr.reshape(-1).view(np.uint8)), name


def _header(fields: dict[str, Any]) -> bytes:
    fields["pad"] = 0
    head = msgpack.packb(fields, use_bin_type=True)
    pad = (-len(head)) % ALIGN
    if pad:
        fields["pad"] = pad            # a positive fixint: same encoded size as 0
        head = msgpack.packb(fields, use_bin_type=True) + bytes(pad)
    if len(head) > MAX_HEADER_BYTES:
        raise WireError(f"frame header is {len(head)} bytes (max {MAX_HEADER_BYTES}); "
                        "shorten ids")
    return head


class OutFrame:
    """An encoded frame whose bytes are not joined yet: header + a read-only view of
    the tensor's bytes. ``len()`` is the wire size; ``bytes(frame)`` builds the payload
    (the one copy of the data) when it is published, so a sender holding unacked
    pieces does not also hold a second, freshly allocated (page-faulting) copy of
    every tensor. The viewed array must not change while the frame lives."""

    __slots__ = ("head", "data", "raw")

    def __init__(self, head: bytes, data: Any, raw: int | None = None) -> None:
        self.head, self.data = head, memoryview(data)
        self.raw = self.data.nbytes if raw is None else raw    # tensor bytes carried

    def __len__(self) -> int:
        return len(self.head) + self.data.nbytes

    def __bytes__(self) -> bytes:
        return b"".join((self.head, self.data))


def encode_chunks(job: str, piece: str, array: np.ndarray, **kw: Any) -> Iterator[bytes]:
    """Frames of ``array`` split into ``chunk_bytes`` slices (one frame if it fits).

    Each frame is built with a single join of header and a memoryview slice of
    the array: one copy of the tensor bytes, none made by the caller."""
    for frame in encode_frames(job, piece, array, **kw):
        yield bytes(frame)


def encode_frames(job: str, piece: str, array: np.ndarray, *, region: Any = None,
                  src_task: str = "", dst_task: str = "", term: int = 0, seq: int = 0,
                  chunk_bytes: int = CHUNK_BYTES, codec: str | None = None
                  ) -> list[OutFrame]:
    """``encode_chunks`` as :class:`OutFrame` objects: the CRC is computed now, the
    data is copied only by ``bytes(frame)`` (publish). ``codec``: compress each chunk
    with it (a chunk that does not shrink travels raw); ``OutFrame.raw`` keeps the
    chunk's tensor bytes, so ``raw / len(data)`` is the ratio achieved."""
    if codec is not None:
        check_codec(codec)
    if chunk_bytes <= 0 or chunk_bytes > MAX_FRAME_BYTES - MAX_HEADER_BYTES:
        raise WireError(f"chunk_bytes {chunk_bytes} out of range")
    arr = np.asarray(array)
    view, dtype = _as_bytes_view(arr)
    total = len(view)
    shape = [int(d) for d in arr.shape]
    reg = None if region is None else [int(x) for x in region]
    _check_common(job, piece, src_task, dst_task, term, seq, reg)
    # whole elements per chunk, so every chunk is a valid array of the dtype
    item = np.dtype(dtype).itemsize
    cs = max(item, chunk_bytes - chunk_bytes % item)
    n = max(1, -(-total // cs))
    out = []
    for i in range(n):
        part = view[i * cs:(i + 1) * cs].toreadonly()
        fields = {"v": VERSION, "type": PieceFrame.TYPE, "job": job, "piece": piece,
                  "src": src_task, "dst": dst_task, "term": term, "seq": seq,
                  "region": reg, "dtype": dtype, "shape": shape, "chunk": [i, n],
                  "off": i * cs, "cs": cs}
        data: Any = part
        if codec is not None and len(part) >= 64:
            packed = compress(part, item, codec)
            if len(packed) < len(part):
                data, fields["z"] = packed, codec
        fields["crc"] = _crc32(data)
        out.append(OutFrame(_header(fields), data, len(part)))
    return out


def encode_piece(job: str, piece: str, array: np.ndarray, **kw: Any) -> bytes:
    """A single frame holding the whole tensor (at most MAX_FRAME_BYTES)."""
    if np.asarray(array).nbytes > MAX_FRAME_BYTES - MAX_HEADER_BYTES:
        raise WireError(f"tensor of {np.asarray(array).nbytes} bytes does not fit one frame; "
                        "use encode_chunks")
    kw["chunk_bytes"] = MAX_FRAME_BYTES - MAX_HEADER_BYTES
    frames = list(encode_chunks(job, piece, array, **kw))
    return frames[0]


def encode_ack(ack: AckFrame) -> bytes:
    _check_common(ack.job, ack.piece, ack.node, "", ack.term, ack.seq, None)
    _id(ack.node, "ack node")
    head = {"v": VERSION, "type": AckFrame.TYPE, "job": ack.job, "piece": ack.piece,
            "node": ack.node, "term": ack.term, "seq": ack.seq, "ok": bool(ack.ok),
            "chunks": list(ack.chunks)}
    if ack.more:
        if not ack.ok or len(ack.more) > MAX_ACK_BATCH:
            raise WireError(f"an ack batch needs ok=True and at most {MAX_ACK_BATCH} pieces")
        head["more"] = [_id(p, "piece id") for p in ack.more]
    if ack.credit is not None:
        head["credit"] = _uint(ack.credit, "credit")
    data = msgpack.packb(head)
    if len(data) > MAX_HEADER_BYTES:
        raise WireError(f"ack of {len(data)} bytes exceeds {MAX_HEADER_BYTES}; batch fewer")
    return data


def encode_credit(credit: CreditFrame) -> bytes:
    _id(credit.node, "credit node")
    return msgpack.packb({"v": VERSION, "type": CreditFrame.TYPE, "node": credit.node,
                          "credits": _uint(credit.credits, "credits"), "job": credit.job,
                          "term": _uint(credit.term, "term")})


def encode_frame(frame: Frame) -> bytes:
    if isinstance(frame, AckFrame):
        return encode_ack(frame)
    if isinstance(frame, CreditFrame):
        return encode_credit(frame)
    raise WireError(f"encode_frame takes AckFrame or CreditFrame, not {type(frame).__name__}; "
                    "encode tensors with encode_chunks")


# ------------------------------------------------------------------ validation
def _id(value: Any, what: str, empty_ok: bool = False) -> str:
    if empty_ok and value == "":
        return value
    return validate_id(value, what)


def _uint(value: Any, what: str, limit: int = 1 << 63) -> int:
    if type(value) is not int or not 0 <= value < limit:
        raise WireError(f"{what} must be an integer in [0, {limit}), got {value!r}")
    return value


def _check_common(job: Any, piece: Any, src: Any, dst: Any, term: Any, seq: Any,
                  region: Any) -> None:
    _id(job, "job id")
    _id(piece, "piece id")
    _id(src, "src task", empty_ok=True)
    _id(dst, "dst task", empty_ok=True)
    _uint(term, "term")
    _uint(seq, "seq")
    if region is not None:
        if not isinstance(region, list) or len(region) != 6:
            raise WireError("region must be [n, c, h0, h1, w0, w1]")
        n, c, h0, h1, w0, w1 = (_uint(x, "region bound", MAX_DIM) for x in region)
        if h0 > h1 or w0 > w1:
            raise WireError(f"region {region} has h0 > h1 or w0 > w1")


# ------------------------------------------------------------------ decoding
def _read_header(payload: Any) -> tuple[dict[str, Any], int, memoryview]:
    view = payload if isinstance(payload, memoryview) else memoryview(payload)
    if view.ndim != 1 or view.itemsize != 1:
        view = view.cast("B")
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_HEADER_BYTES,
                                max_str_len=1024, max_bin_len=1024, max_array_len=1024,
                                max_map_len=64, max_ext_len=0, strict_map_key=True)
    unpacker.feed(view[:MAX_HEADER_BYTES])
    try:
        head = unpacker.unpack()
    except msgpack.OutOfData:
        raise WireError("truncated frame: header incomplete") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise WireError(f"undecodable frame header: {exc}") from None
    if not isinstance(head, dict):
        raise WireError("frame header is not a map")
    if head.get("v") != VERSION:
        raise WireError(f"frame version {head.get('v')!r}; this node speaks v{VERSION}: "
                        "upgrade the older side")
    return head, unpacker.tell(), view


def frame_type(payload: Any) -> str:
    """The type ("piece", "ack", "credit") a frame's header names (its header only is
    read). Raises WireError."""
    kind = _read_header(payload)[0].get("type")
    if kind not in (PieceFrame.TYPE, AckFrame.TYPE, CreditFrame.TYPE):
        raise WireError(f"unknown frame type {str(kind)[:40]!r}")
    return kind


def decode_frame(payload: Any, *, max_frame: int = MAX_FRAME_BYTES,
                 verify_crc: bool = True) -> Frame:
    """Decode a data-plane frame (piece, ack or credit). Raises WireError only."""
    try:
        size = len(payload) if not isinstance(payload, memoryview) else payload.nbytes
        if size > max_frame:
            raise WireError(f"frame of {size} bytes exceeds the {max_frame}-byte limit")
        head, at, view = _read_header(payload)
        kind = head.get("type")
        if kind == PieceFrame.TYPE:
            return _decode_piece(head, at, view, verify_crc)
        if kind == AckFrame.TYPE:
            _only_header(at, view)
            chunks = head.get("chunks")
            if not isinstance(chunks, list):
                raise WireError("ack chunks must be a list")
            more = head.get("more", [])
            if not isinstance(more, list) or len(more) > MAX_ACK_BATCH:
                raise WireError(f"ack more must be a list of at most {MAX_ACK_BATCH} pieces")
            ack = AckFrame(head.get("job"), head.get("piece"), head.get("node"),
                           head.get("term"), head.get("seq"), head.get("ok"),
                           tuple(_uint(c, "acked chunk", MAX_DIM) for c in chunks),
                           tuple(_id(p, "piece id") for p in more),
                           None if head.get("credit") is None
                           else _uint(head.get("credit"), "ack credit"))
            if ack.more and ack.ok is not True:
                raise WireError("a selective ack cannot batch pieces")
            _check_common(ack.job, ack.piece, "", "", ack.term, ack.seq, None)
            _id(ack.node, "ack node")
            if type(ack.ok) is not bool:
                raise WireError("ack ok must be a bool")
            return ack
        if kind == CreditFrame.TYPE:
            _only_header(at, view)
            return CreditFrame(_id(head.get("node"), "credit node"),
                               _uint(head.get("credits"), "credits", MAX_DIM),
                               _id(head.get("job"), "job id", empty_ok=True),
                               _uint(head.get("term"), "term"))
        raise WireError(f"unknown frame type {kind!r}")
    except WireError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
        raise WireError(f"malformed frame: {exc}") from None


def _only_header(at: int, view: memoryview) -> None:
    if at != len(view):
        raise WireError(f"{len(view) - at} stray bytes after a header-only frame")


def _decode_piece(head: dict[str, Any], at: int, view: memoryview,
                  verify_crc: bool) -> PieceFrame:
    job, piece, src, dst = head.get("job"), head.get("piece"), head.get("src"), head.get("dst")
    term, seq, region = head.get("term"), head.get("seq"), head.get("region")
    _check_common(job, piece, src, dst, term, seq, region)
    dtype = head.get("dtype")
    if dtype not in DTYPES:
        raise WireError(f"dtype {dtype!r} not allowed; expected one of {sorted(DTYPES)}")
    shape = head.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise WireError(f"shape must be a list of at most {MAX_NDIM} dims")
    shape = tuple(_uint(d, "dimension", MAX_DIM) for d in shape)
    item = np.dtype(dtype).itemsize
    total = prod(shape) * item
    if total > MAX_TENSOR_BYTES:
        raise WireError(f"tensor of {total} bytes exceeds {MAX_TENSOR_BYTES}")
    chunk = head.get("chunk")
    if not isinstance(chunk, list) or len(chunk) != 2:
        raise WireError("chunk must be [index, count]")
    i, n = _uint(chunk[0], "chunk index", MAX_DIM), _uint(chunk[1], "chunk count", MAX_DIM)
    if not 0 <= i < n:
        raise WireError(f"chunk index {i} out of range for {n} chunks")
    off, cs = _uint(head.get("off"), "offset"), _uint(head.get("cs"), "chunk size", 1 << 40)
    pad = _uint(head.get("pad"), "pad", ALIGN)
    crc = _uint(head.get("crc"), "crc", 1 << 32)
    if cs == 0 or cs % item or off != i * cs or n != max(1, -(-total // cs)):
        raise WireError(f"chunk {i}/{n} (offset {off}, size {cs}) does not tile "
                        f"a {total}-byte tensor")
    start = at + pad
    data = view[start:]
    expect = min(cs, total - off)
    z = head.get("z")
    if z is not None:
        check_codec(z)
        if expect > MAX_FRAME_BYTES or len(data) > expect + (expect >> 6) + 1024:
            raise WireError(f"compressed chunk {i}/{n} of {job}/{piece}: {len(data)} bytes "
                            f"for {expect} raw bytes (max {MAX_FRAME_BYTES}): refused")
        if any(view[at:start]):
            raise WireError("non-zero padding after the header")
        if verify_crc and _crc32(data) != crc:
            raise WireError(f"bad crc on {job}/{piece} chunk {i}/{n}: data corrupted in "
                            "transit")
        data = memoryview(decompress(data, z, expect))
        return PieceFrame(job, piece, dtype, shape, data.toreadonly(),
                          None if region is None else tuple(region), src, dst, term, seq,
                          i, n, off, cs, crc)
    if len(data) != expect:
        raise WireError(f"chunk {i}/{n} carries {len(data)} bytes, header says {expect} "
                        f"(shape {shape}, {dtype})")
    if any(view[at:start]):
        raise WireError("non-zero padding after the header")
    if verify_crc and _crc32(data) != crc:
        raise WireError(f"bad crc on {job}/{piece} chunk {i}/{n}: data corrupted in transit")
    return PieceFrame(job, piece, dtype, shape, data.toreadonly(),
                      None if region is None else tuple(region), src, dst, term, seq,
                      i, n, off, cs, crc)
