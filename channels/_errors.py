"""Error types of the :mod:`channels` package."""

__all__ = ["ChannelError", "ChannelTypeError"]


class ChannelError(ValueError):
    """Raised for invalid inputs to a channel, link or helper (bad SNR, wrong dtype, ...).

    Subclass of :class:`ValueError`, so ``except ValueError`` also catches it.
    """


class ChannelTypeError(TypeError, ChannelError):
    """Raised when an argument has the wrong type (e.g. a real tensor where complex is needed).

    Subclass of both :class:`TypeError` and :class:`ChannelError`.
    """
