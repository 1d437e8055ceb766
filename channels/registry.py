"""Analog channels by name: the names configs and command lines use.

:data:`CHANNELS` maps a name to a builder ``(device, seed, coherence, **kw) -> AnalogChannel``;
:func:`make_channel` builds one, :func:`list_channels` lists the names and
:func:`register_channel` adds one (a new channel is its module plus one registry line).

``coherence`` is the number of symbols that share one fading gain where a channel has such a
thing (``"rayleigh"``); channels without it ignore it, so one call builds any name. Other
keywords go to the channel's constructor (for example ``snr_db``).

Names:

- ``"awgn"``: :class:`~channels.analog.AWGN`;
- ``"rayleigh"``: :class:`~channels.analog.RayleighBlockFading`, one gain per ``coherence``
  symbols;
- ``"rayleigh-block"``: Rayleigh fading with one gain per 4096 symbols (one per image);
- ``"ofdm-tdla"``, ``"ofdm-tdlc"``: :class:`~channels.analog.OFDMTDLChannel` over 3GPP TDL-A /
  TDL-C (100 ns delay spread, 3 m/s, perfect CSI).

Example:
    >>> ch = make_channel("rayleigh", coherence=8, seed=1)
    >>> type(ch).__name__, ch.coherence_length
    ('RayleighBlockFading', 8)
    >>> "awgn" in list_channels()
    True
"""

from __future__ import annotations

from collections.abc import Callable

from channels._errors import ChannelError
from channels.analog import AWGN, AnalogChannel, OFDMTDLChannel, RayleighBlockFading

__all__ = ["CHANNELS", "make_channel", "list_channels", "register_channel"]

#: name -> builder ``(device, seed, coherence, **kw) -> AnalogChannel``.
CHANNELS: dict[str, Callable[..., AnalogChannel]] = {}


def register_channel(name: str):
    """Decorator: register a builder ``(device, seed, coherence, **kw)`` under ``name``."""
    if not isinstance(name, str) or not name:
        raise ChannelError(f"a channel name must be a non-empty str, got {name!r}")

    def add(builder: Callable[..., AnalogChannel]) -> Callable[..., AnalogChannel]:
        if name in CHANNELS:
            raise ChannelError(f"channel {name!r} is already registered")
        CHANNELS[name] = builder
        return builder

    return add


def list_channels() -> list[str]:
    """The registered channel names, in registration order."""
    return list(CHANNELS)


def make_channel(name: str, device: str = "cpu", seed: int = 0, coherence: int = 1,
                 **kwargs) -> AnalogChannel:
    """The analog channel registered as ``name`` (a :class:`ChannelError` names the known ones)."""
    if name not in CHANNELS:
        raise ChannelError(f"unknown channel {name!r}; known: {list(CHANNELS)}")
    return CHANNELS[name](device=device, seed=seed, coherence=coherence, **kwargs)


@register_channel("awgn")
def _awgn(device, seed, coherence, **kw):
    return AWGN(device=device, seed=seed, **kw)


@register_channel("rayleigh")
def _rayleigh(device, seed, coherence, **kw):
    return RayleighBlockFading(coherence_length=coherence, device=device, seed=seed, **kw)


@register_channel("rayleigh-block")
def _rayleigh_block(device, seed, coherence, **kw):  # one gain per image (up to 4096 symbols)
    return RayleighBlockFading(coherence_length=4096, device=device, seed=seed, **kw)


def _ofdm(model: str):
    def build(device, seed, coherence, **kw):
        kw = {"delay_spread": 100e-9, "speed": 3.0, **kw}
        return OFDMTDLChannel(model=model, device=device, seed=seed, **kw)

    return build


register_channel("ofdm-tdla")(_ofdm("A"))
register_channel("ofdm-tdlc")(_ofdm("C"))
