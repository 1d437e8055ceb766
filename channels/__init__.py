"""channels: wireless channel models and digital links (exact via Sionna, and table-driven).

Depends on torch and Sionna 2.x; never on ``flowcodec``. See ``docs/channels.md``.
Analog channels by name: :func:`make_channel` (``channels.registry``).
SNR convention: ``snr_db`` is Es/N0 per complex symbol in dB with unit-energy symbols.
"""

from channels._errors import ChannelError, ChannelTypeError
from channels.analog import (
    AWGN,
    AnalogChannel,
    BlockFading,
    ChannelRealization,
    OFDMTDLChannel,
    RayleighBlockFading,
    RicianBlockFading,
)
from channels.base import LinkReport
from channels.discrete import BEC, BSC, GilbertElliott, IIDPacketErasure
from channels.link import ExactLink, FastLink
from channels.mcs import MCS, MCS_TABLE, get_mcs
from channels.registry import CHANNELS, list_channels, make_channel, register_channel

__all__ = [
    "ChannelError",
    "ChannelTypeError",
    "AnalogChannel",
    "AWGN",
    "BlockFading",
    "RayleighBlockFading",
    "RicianBlockFading",
    "OFDMTDLChannel",
    "ChannelRealization",
    "BSC",
    "BEC",
    "IIDPacketErasure",
    "GilbertElliott",
    "ExactLink",
    "FastLink",
    "LinkReport",
    "MCS",
    "MCS_TABLE",
    "get_mcs",
    "CHANNELS",
    "make_channel",
    "list_channels",
    "register_channel",
]
