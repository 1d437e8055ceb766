"""Error types raised by flowcodec. Each is a ``ValueError`` or ``RuntimeError`` subclass
so callers that catch the built-in types keep working."""

from __future__ import annotations

from flowcodec.bitstream import BitstreamError

__all__ = ["BitstreamError", "CheckpointError", "DataNotFoundError", "ConfigError", "SplitError"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or made for another architecture."""


class DataNotFoundError(FileNotFoundError):
    """A dataset is not where it was looked for; the message says how to get it."""


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


class SplitError(ValueError):
    """A model cannot be split at the requested point (the message names why)."""
