"""One exception family. Every message says what went wrong and what to do next."""
from __future__ import annotations


class MeshdlError(Exception):
    """Base of every error meshdl raises on purpose."""


class TraceError(MeshdlError):
    """torch.fx could not trace the model, or a traced construct is unsupported."""


class PlanError(MeshdlError):
    """A plan cannot be built or is invalid (bad tiles, unknown device, unreachable sink...)."""


class ModelError(MeshdlError):
    """Unknown model name, unreadable weights file, mismatched checkpoint."""


class ImageError(MeshdlError):
    """An input image cannot be read or decoded."""


class TopologyError(MeshdlError):
    """A mesh definition (YAML/JSON) is missing or invalid."""


class WireError(MeshdlError):
    """A frame or topic does not follow the wire contract."""


class TransportError(MeshdlError):
    """The broker is unreachable, refused us, or the connection died."""


class JobError(MeshdlError):
    """An inference job failed or missed its deadline."""


class SplitWarning(UserWarning):
    """Part of a model cannot be split spatially; it will run whole on one device."""
