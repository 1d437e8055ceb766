"""Feature codecs: the FeatureCodec API, baselines and learned codecs.

``build_codec(name, feature_shape, **kwargs)`` builds any registered codec; ``CODECS``
lists them. Importing this package does not import CompressAI (only coding with a learned
codec does).
"""

from flowcodec.codecs import image, learned, quant, raw  # noqa: F401  (register codecs)
from flowcodec.codecs.base import (
    CODECS,
    CodecOutput,
    FeatureCodec,
    build_codec,
    channel_groups,
    measured_bits,
    register_codec,
)
from flowcodec.codecs.learned import BinaryCodec, FactorizedCodec, HyperpriorCodec

__all__ = [
    "CODECS",
    "BinaryCodec",
    "CodecOutput",
    "FactorizedCodec",
    "FeatureCodec",
    "HyperpriorCodec",
    "build_codec",
    "channel_groups",
    "measured_bits",
    "register_codec",
]
