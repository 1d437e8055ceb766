"""Feature codecs: the FeatureCodec API, baselines and learned codecs.

``build_codec(name, feature_shape, **kwargs)`` builds any registered codec; ``CODECS``
lists them.
"""

from flowcodec.codecs import raw  # noqa: F401  (registers "raw")
from flowcodec.codecs.base import (
    CODECS,
    CodecOutput,
    FeatureCodec,
    build_codec,
    channel_groups,
    measured_bits,
    register_codec,
)

__all__ = [
    "CODECS",
    "CodecOutput",
    "FeatureCodec",
    "build_codec",
    "channel_groups",
    "measured_bits",
    "register_codec",
]
